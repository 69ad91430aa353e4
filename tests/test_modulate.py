"""rms_norm_modulate / layer_norm_modulate as a user meets them: autograd to second order,
torch.func, vmap, compile, opcheck, and diffusers' adaLN modules swapped by replace_norms on
a tiny random Flux transformer (same outputs and parameter gradients). The kernels'
accuracy against float64: tests/test_modulate_kernels.py."""
import copy
import warnings

import pytest
import torch
from torch.func import grad, jvp, vmap

import rmsnorm_ext as R
from rmsnorm_ext._table import ln_modulate_composite, rms_modulate_composite


def _inputs(dtype=torch.float64, seed=0, scale_shape=(2, 8), shift_shape=(2, 1, 8)):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return mk(2, 5, 8), mk(*scale_shape), mk(*shift_shape), mk(8), mk(8)


CASES = {
    "layer": (lambda x, sc, sh, w, b: R.layer_norm_modulate(x, (8,), sc, sh, w, b),
              lambda x, sc, sh, w, b: ln_modulate_composite(x, [8], sc, sh, w, b, 1e-6)[0]),
    "rms": (lambda x, sc, sh, w, b: R.rms_norm_modulate(x, (8,), sc, sh, w, 1e-6),
            lambda x, sc, sh, w, b: rms_modulate_composite(x, [8], sc, sh, w, 1e-6)[0]),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_gradcheck_and_gradgradcheck(kind):
    ours, _ = CASES[kind]
    args = [t.requires_grad_() for t in _inputs()]
    if kind == "rms":
        args[4].requires_grad_(False)
    assert torch.autograd.gradcheck(ours, args)
    assert torch.autograd.gradgradcheck(ours, args)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_torch_func_and_vmap(kind):
    ours, ref = CASES[kind]
    args = _inputs()
    an = (0, 1, 2, 3)
    sq = lambda f: (lambda *a: f(*a).square().sum())  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        close(grad(sq(ours), argnums=an)(*args), grad(sq(ref), argnums=an)(*args))
        t = tuple(torch.randn_like(a) for a in args)
        close(jvp(ours, args, t), jvp(ref, args, t))
        stack = [torch.stack([a, a * 0.5]) for a in args]
        close(vmap(ours)(*stack), vmap(ref)(*stack))


def test_compile_fullgraph_and_opcheck():
    x, sc, sh, w, b = (t.float() for t in _inputs())
    x.requires_grad_()
    f = lambda x: R.layer_norm_modulate(x, (8,), sc, sh, w, b)  # noqa: E731
    eager = f(x)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(torch.autograd.grad(comp.sum(), x),
                               torch.autograd.grad(eager.sum(), x))
    ops = torch.ops.rmsnorm_ext
    xd = x.detach()
    torch.library.opcheck(ops.layer_norm_modulate_fwd, (xd, [8], sc, sh, w, b, 1e-6))
    torch.library.opcheck(ops.rms_norm_modulate_fwd, (xd, [8], sc, None, w, 1e-6))
    y, mean, rstd = ops.layer_norm_modulate_fwd(xd, [8], sc, sh, w, b, 1e-6)
    torch.library.opcheck(ops.norm_modulate_bwd, (torch.randn_like(y), xd, mean, rstd, sc, w, b,
                                                  [8], True, True, True, True))


def test_scale_not_broadcastable_same_error_on_cpu_and_meta():
    msgs = []
    for d in ("cpu", "meta"):
        with pytest.raises(ValueError) as ei:
            R.layer_norm_modulate(torch.ones(2, 5, 8, device=d), (8,), torch.ones(3, 8, device=d))
        msgs.append(str(ei.value).replace(d, "<dev>"))
    assert "rmsnorm_ext" in msgs[0] and msgs[0] == msgs[1]


def _tiny_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8))


def test_flux_swap_same_outputs_and_gradients():
    native = _tiny_flux()
    ours = copy.deepcopy(native)
    assert R.replace_norms(ours) > 0
    names = {type(m).__name__ for m in ours.modules()}
    assert {"FusedAdaLayerNormZero", "FusedAdaLayerNormZeroSingle",
            "FusedAdaLayerNormContinuous"} <= names
    g = torch.Generator().manual_seed(1)
    B, Si, St = 2, 16, 8
    args = dict(hidden_states=torch.randn(B, Si, 4, generator=g),
                encoder_hidden_states=torch.randn(B, St, 32, generator=g),
                pooled_projections=torch.randn(B, 32, generator=g),
                timestep=torch.tensor([0.5, 0.7]), img_ids=torch.randn(Si, 3, generator=g),
                txt_ids=torch.randn(St, 3, generator=g))
    yn, yo = native(**args).sample, ours(**args).sample
    torch.testing.assert_close(yo, yn, rtol=1e-5, atol=1e-5)
    yn.square().sum().backward()
    yo.square().sum().backward()
    for (k, pn), (_, po) in zip(native.named_parameters(), ours.named_parameters()):
        if pn.grad is None:
            assert po.grad is None, k
            continue
        err = (po.grad - pn.grad).abs().max() / (pn.grad.abs().max() + 1e-30)
        assert err < 1e-4, (k, err.item())
    print_native = str(native)
    assert "rmsnorm_ext.FusedAdaLayerNormZero" in str(ours) and "Fused" not in print_native
