"""gated_rms_norm as a user meets it: the public function and module, autograd to second
order, torch.func, vmap, compile, opcheck, the same errors on cpu and meta, and the
Hugging Face gated norms swapped by replace_norms (same outputs and gradients). The
kernels' accuracy against float64 is tests/test_gated_kernels.py."""
import copy
import warnings

import pytest
import torch
from torch.func import grad, jacfwd, vmap

import rmsnorm_ext as R
from _errors import assert_same_errors
from rmsnorm_ext._table import gated_rms_composite

MODES = [(nbg, act) for nbg in (True, False) for act in ("silu", "sigmoid")]


def _inputs(n=16, lead=(3,), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((*lead, n), (*lead, n), (n,))]


def _ref(x, gate, w, group, nbg, act, eps=1e-6):
    n = x.shape[-1]
    return gated_rms_composite(x, gate, [n], w, eps, group or n, nbg, act)[0]


@pytest.mark.parametrize("nbg,act", MODES)
@pytest.mark.parametrize("group", [None, 4])
def test_gradcheck_and_gradgradcheck(nbg, act, group):
    x, g, w = (t.requires_grad_() for t in _inputs())
    f = lambda x, g, w: R.gated_rms_norm(x, g, (16,), w, 1e-6, group_size=group,  # noqa: E731
                                         norm_before_gate=nbg, activation=act)
    assert torch.autograd.gradcheck(f, (x, g, w))
    assert torch.autograd.gradgradcheck(f, (x, g, w))


@pytest.mark.parametrize("nbg,act", MODES)
def test_torch_func_and_vmap(nbg, act):
    x, g, w = _inputs(lead=(5, 3))
    ours = lambda x, g, w: R.gated_rms_norm(x, g, (16,), w, 1e-6, group_size=8,  # noqa: E731
                                            norm_before_gate=nbg, activation=act)
    ref = lambda x, g, w: _ref(x, g, w, 8, nbg, act)  # noqa: E731
    sq = lambda f: (lambda *a: f(*a).square().sum())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # vmap's slow fallback warns
        for a, b in ((grad(sq(ours), argnums=(0, 1, 2))(x, g, w),
                      grad(sq(ref), argnums=(0, 1, 2))(x, g, w)),
                     (vmap(ours, in_dims=(1, 1, None))(x, g, w),
                      vmap(ref, in_dims=(1, 1, None))(x, g, w)),
                     (vmap(grad(sq(ours), argnums=2), in_dims=(0, 0, None))(x, g, w),
                      vmap(grad(sq(ref), argnums=2), in_dims=(0, 0, None))(x, g, w)),
                     (jacfwd(ours, argnums=1)(x[0], g[0], w), jacfwd(ref, argnums=1)(x[0], g[0], w))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_compile_fullgraph_and_opcheck():
    x, g, w = (t.float().requires_grad_() for t in _inputs(lead=(4, 3)))
    m = R.GatedRMSNorm(16, group_size=4, norm_before_gate=False)
    with torch.no_grad():
        m.weight.copy_(w)
    eager = m(x, g)
    comp = torch.compile(m, fullgraph=True, backend="aot_eager")(x, g)
    torch.testing.assert_close(comp, eager)
    ge = torch.autograd.grad(eager.sum(), (x, g, m.weight))
    gc = torch.autograd.grad(comp.sum(), (x, g, m.weight))
    torch.testing.assert_close(gc, ge)
    ops = torch.ops.rmsnorm_ext
    xd, gd, wd = (t.detach() for t in (x, g, w))
    torch.library.opcheck(ops.gated_rms_norm_fwd, (xd, gd, [16], wd, 1e-6, 4, False, "silu"))
    y, rstd = ops.gated_rms_norm_fwd(xd, gd, [16], wd, 1e-6, 4, True, "sigmoid")
    torch.library.opcheck(ops.gated_rms_norm_bwd,
                          (torch.randn_like(y), xd, gd, rstd, wd, [16], 4, True, "sigmoid", True))


BAD = {
    "gate shape": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d), torch.ones(4, 7, device=d), (8,)),
    "gate dtype": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d),
                                             torch.ones(4, 8, device=d, dtype=torch.float64), (8,)),
    "gate device": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d),
                                              torch.ones(4, 8, device="cpu" if d != "cpu" else "meta"), (8,)),
    "group not dividing": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d), torch.ones(4, 8, device=d),
                                                     (8,), group_size=3),
    "group zero": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d), torch.ones(4, 8, device=d),
                                             (8,), group_size=0),
    "unknown activation": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d), torch.ones(4, 8, device=d),
                                                     (8,), activation="gelu"),
    "weight shape": lambda d: R.gated_rms_norm(torch.ones(4, 8, device=d), torch.ones(4, 8, device=d),
                                               (8,), torch.ones(4, device=d)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_same_errors_cpu_and_meta(case):
    assert_same_errors(BAD[case])


def _hf_classes():
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearRMSNormGated
    from transformers.models.mamba2.modeling_mamba2 import Mamba2RMSNormGated
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated
    return {"mamba2_groups": lambda: Mamba2RMSNormGated(64, 16),
            "mamba2": lambda: Mamba2RMSNormGated(64, 64),
            "qwen3_next": lambda: Qwen3NextRMSNormGated(64),
            "kimi_linear": lambda: KimiLinearRMSNormGated(64),
            # n_groups (a count, not a size): left alone before; norm before the gate
            "falcon_h1_groups": lambda: FalconH1RMSNormGated(64, n_groups=4)}


class _Block(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, g):
        return self.norm(x, g)


@pytest.mark.parametrize("name", ["mamba2_groups", "mamba2", "qwen3_next", "kimi_linear",
                                  "falcon_h1_groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replace_norms_hf_gated(name, dtype):
    pytest.importorskip("transformers")
    native = _Block(_hf_classes()[name]()).to(dtype)
    with torch.no_grad():
        native.norm.weight.normal_()
    ours = copy.deepcopy(native)
    assert R.replace_norms(ours) == 1
    assert type(ours.norm).__name__ == "HFGatedRMSNorm"
    assert ours.norm.weight is not native.norm.weight  # deepcopy: its own Parameter
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(2, 5, 64, generator=gen).to(dtype).requires_grad_()
    yn, yo = native(x, g), ours(x, g)
    assert yo.dtype == yn.dtype
    # HF rounds to the input dtype mid-way; we round once: within a couple of ulps.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yo, yn, **tol)
    gn = torch.autograd.grad(yn.float().square().sum(), (x, g, native.norm.weight))
    go = torch.autograd.grad(yo.float().square().sum(), (x, g, ours.norm.weight))
    for a, b in zip(go, gn):
        scale = b.float().abs().max()
        assert ((a.float() - b.float()).abs().max() / scale) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    if name.startswith("mamba2"):  # the Mamba2 style takes no gate too
        torch.testing.assert_close(ours.norm(x), native.norm(x), **tol)


@pytest.mark.parametrize("name", ["mamba2", "qwen3_next", "falcon_h1_groups"])
def test_replace_norms_hf_gated_dtype_rules(name):
    """Swapped while the model is bf16, then used as a bf16 model's torch path uses it (an
    fp32 scan output with a bf16 gate: Mamba2, Bamba, NemotronH, Zamba2 raised TypeError),
    after an upcast of the weights, and with fp16 activations: the original's output dtype
    and values every time (the probes tell "promote" from "input" with an fp16 input)."""
    pytest.importorskip("transformers")
    native = _Block(_hf_classes()[name]()).to(torch.bfloat16)
    with torch.no_grad():
        native.norm.weight.normal_()
    ours = copy.deepcopy(native)
    assert R.replace_norms(ours) == 1
    gen = torch.Generator().manual_seed(2)
    x32, g32 = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    cases = [(x32, g32.bfloat16()), (x32.bfloat16(), g32), (x32.half(), g32.half())]
    from test_replace_norms import swap_stages

    for stage in swap_stages(native, ours):
        for x, g in cases:
            yn, yo = native(x, g), ours(x, g)
            assert yo.dtype == yn.dtype, (stage, x.dtype, g.dtype, yo.dtype, yn.dtype)
            # HF rounds to the input dtype mid-way when that is narrow: a couple of its ulps
            tol = 2e-2 if torch.bfloat16 in (x.dtype, yn.dtype) else 4e-3
            torch.testing.assert_close(yo.float(), yn.float(), rtol=tol, atol=tol)


def test_mamba2_model_bf16_after_replace_norms():
    """A tiny bf16 Mamba2 (HF's torch path on CPU) runs and generates after replace_norms,
    with the original's logits within bf16 rounding."""
    tr = pytest.importorskip("transformers")
    cfg = tr.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=4,
                          head_dim=16, n_groups=1, state_size=8, expand=2, chunk_size=8)
    torch.manual_seed(0)
    native = tr.Mamba2ForCausalLM(cfg).to(torch.bfloat16).eval()
    ours = copy.deepcopy(native)
    assert R.replace_norms(ours) >= 2
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = native(ids).logits, ours(ids).logits
    assert a.dtype == b.dtype
    torch.testing.assert_close(b.float(), a.float(), rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        assert ours.generate(ids[:1, :4], max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_replace_norms_keeps_parameters():
    pytest.importorskip("transformers")
    native = _Block(_hf_classes()["mamba2_groups"]())
    w = native.norm.weight
    assert R.replace_norms(native) == 1
    assert native.norm.weight is w and native.norm.group_size == 16
    assert not native.norm.norm_before_gate and native.norm.out_dtype == "promote"
    assert R.replace_norms(native) == 0
