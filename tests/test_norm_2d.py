"""rms_norm_2d / layer_norm_2d (norms over the channels of [N, C, *spatial]) as a user meets
them: the public functions and modules against torch's own norm on the permuted view (what
timm's LayerNorm2d does), in both memory formats; autograd to second order, torch.func,
vmap, forward AD, compile, opcheck (the meta function's strides included), the same errors
on cpu and meta, TorchScript. The kernels' accuracy against float64 over many shapes and
dtypes is tests/test_norm_2d_kernels.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import rmsnorm_ext as R
from _errors import assert_same_errors

ops = torch.ops.rmsnorm_ext
FORMATS = ["contiguous", "channels_last"]


def _x(shape=(2, 6, 5, 3), fmt="contiguous", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 2 + 0.5
    if fmt == "channels_last":
        order = [0, *range(2, len(shape)), 1]
        x = x.permute(order).contiguous().permute([0, len(shape) - 1, *range(1, len(shape) - 1)])
    return x


def _params(C, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype))


def native_ln(x, w, b, eps=1e-6):  # timm LayerNorm2d's forward
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)


def native_rms(x, w, eps=1e-6):  # timm RmsNorm2d's forward
    return F.rms_norm(x.movedim(1, -1), (x.shape[1],), w, eps).movedim(-1, 1)


CASES = {
    "ln": (lambda x, w, b: R.layer_norm_2d(x, w, b), native_ln),
    "ln_no_bias": (lambda x, w, b: R.layer_norm_2d(x, w), lambda x, w, b: native_ln(x, w, None)),
    "ln_no_affine": (lambda x, w, b: R.layer_norm_2d(x), lambda x, w, b: native_ln(x, None, None)),
    "rms": (lambda x, w, b: R.rms_norm_2d(x, w), lambda x, w, b: native_rms(x, w)),
    "rms_no_weight": (lambda x, w, b: R.rms_norm_2d(x), lambda x, w, b: native_rms(x, None)),
}


def _is_channels_last(t):
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (3, 4, 7), (1, 5, 2, 3, 2)])
def test_values_grads_and_layout_match_torch(case, fmt, shape):
    ours, native = CASES[case]
    x = _x(shape, fmt).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(shape[1]))
    y, ref = ours(x, w, b), native(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # The output keeps the input's memory format (timm's permute path returns a permuted
    # view instead; its values are what matters there).
    assert y.is_contiguous() if fmt == "contiguous" else _is_channels_last(y)
    go = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), go, allow_unused=True)
    want = torch.autograd.grad(ref, (x, w, b), go, allow_unused=True)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_dtypes_close_to_torch(fmt, dtype):
    x = _x((2, 32, 7, 7), fmt, dtype)
    w, b = (t.to(dtype) for t in _params(32))
    w64, b64 = w.double(), b.double()
    pairs = ((R.layer_norm_2d(x, w, b), native_ln(x, w, b), native_ln(x.double(), w64, b64)),
             (R.rms_norm_2d(x, w), native_rms(x, w), native_rms(x.double(), w64)))
    for ours, torch_own, ref in pairs:
        assert ours.dtype == dtype
        err = (ours.double() - ref).abs().max()
        # torch's own error in the same dtype, on the same permuted view
        own = (torch_own.double() - ref).abs().max()
        assert err <= 2 * max(own, torch.finfo(dtype).eps), (err, own)


def test_mixed_fp32_params_with_bf16_input():
    x = _x((2, 16, 4, 4), "contiguous", torch.bfloat16)
    w, b = (t.float() for t in _params(16))
    y = R.layer_norm_2d(x, w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), native_ln(x.double(), w.double(), b.double()),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_and_gradgradcheck(fmt):
    x = _x((2, 4, 3, 2), fmt).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(4))
    assert torch.autograd.gradcheck(lambda x, w, b: R.layer_norm_2d(x, w, b), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: R.layer_norm_2d(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: R.rms_norm_2d(x, w), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: R.rms_norm_2d(x, w), (x, w))


@pytest.mark.parametrize("case", ["ln", "rms"])
def test_torch_func_transforms(case):
    ours, native = CASES[case]
    x = _x((3, 2, 4, 3, 2))  # vmapped over dim 0 (and 1), each sample [2, 4, 3, 2]
    w, b = _params(4)
    sq = lambda f: (lambda x, w, b: f(x, w, b).square().sum())  # noqa: E731
    pairs = [
        (vmap(ours, in_dims=(0, None, None))(x, w, b), vmap(native, in_dims=(0, None, None))(x, w, b)),
        (vmap(ours, in_dims=(1, None, None))(x, w, b), vmap(native, in_dims=(1, None, None))(x, w, b)),
        (grad(sq(ours), argnums=(0, 1, 2))(x[0], w, b), grad(sq(native), argnums=(0, 1, 2))(x[0], w, b)),
        # per-sample weight gradients (vmap over grad)
        (vmap(grad(sq(ours), argnums=1), in_dims=(0, None, None))(x, w, b),
         vmap(grad(sq(native), argnums=1), in_dims=(0, None, None))(x, w, b)),
        (jacfwd(ours, argnums=0)(x[0, :1], w, b), jacfwd(native, argnums=0)(x[0, :1], w, b)),
        (jacrev(ours, argnums=1)(x[0, :1], w, b), jacrev(native, argnums=1)(x[0, :1], w, b)),
        (jvp(lambda t: ours(t, w, b), (x[0],), (torch.ones_like(x[0]),))[1],
         jvp(lambda t: native(t, w, b), (x[0],), (torch.ones_like(x[0]),))[1]),
    ]
    for i, (a, e) in enumerate(pairs):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"pair {i}: {m}")
    # forward-mode AD outside torch.func
    import torch.autograd.forward_ad as fwAD
    t = torch.randn_like(x[0])
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x[0], t), w, b)).tangent
        want = fwAD.unpack_dual(native(fwAD.make_dual(x[0], t), w, b)).tangent
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_fullgraph_and_opcheck(fmt):
    x = _x((2, 6, 5, 3), fmt, torch.float32).requires_grad_()
    m = R.LayerNorm2d(6)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    eager = m(x)
    comp = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(comp, eager)
    assert comp.stride() == eager.stride()
    ge = torch.autograd.grad(eager.sum(), (x, m.weight, m.bias))
    gc = torch.autograd.grad(comp.sum(), (x, m.weight, m.bias))
    torch.testing.assert_close(gc, ge)
    xd, w, b = x.detach(), m.weight.detach(), m.bias.detach()
    # opcheck compares the fake (meta) outputs' shapes and strides with the real ones.
    torch.library.opcheck(ops.layer_norm_2d_fwd, (xd, w, b, 1e-6))
    torch.library.opcheck(ops.rms_norm_2d_fwd, (xd, w, 1e-6))
    y, mean, rstd = ops.layer_norm_2d_fwd(xd, w, b, 1e-6)
    torch.library.opcheck(ops.layer_norm_2d_bwd, (torch.randn_like(y), xd, mean, rstd, w, True, True))
    y, rstd = ops.rms_norm_2d_fwd(xd, w, 1e-6)
    torch.library.opcheck(ops.rms_norm_2d_bwd, (torch.randn_like(y), xd, rstd, w, True))


def test_grad_out_in_the_other_memory_format():
    for fmt, other in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
        x = _x((2, 6, 5, 3), fmt).requires_grad_()
        w, b = (t.requires_grad_() for t in _params(6))
        go = _x((2, 6, 5, 3), other, seed=3)
        got = torch.autograd.grad(R.layer_norm_2d(x, w, b), (x, w, b), go)
        want = torch.autograd.grad(native_ln(x, w, b), (x, w, b), go)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_non_dense_input_and_empty():
    x = _x((2, 6, 10, 3))[:, :, ::2]  # neither contiguous nor channels_last
    w, b = _params(6)
    torch.testing.assert_close(R.layer_norm_2d(x, w, b), native_ln(x, w, b))
    for shape in ((0, 6, 2, 2), (2, 6, 0, 3), (2, 0, 2, 2)):
        e = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        C = shape[1]
        y = R.layer_norm_2d(e, torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64))
        assert y.shape == e.shape
        y.sum().backward()
        assert e.grad.shape == e.shape


BAD = {
    "2-D input": lambda d: R.layer_norm_2d(torch.ones(4, 8, device=d)),
    "weight shape": lambda d: R.layer_norm_2d(torch.ones(2, 8, 3, 3, device=d), torch.ones(3, device=d)),
    "weight 2-D": lambda d: R.rms_norm_2d(torch.ones(2, 8, 3, 3, device=d), torch.ones(8, 1, device=d)),
    "weight dtype": lambda d: R.rms_norm_2d(torch.ones(2, 8, 3, 3, device=d),
                                            torch.ones(8, device=d, dtype=torch.float64)),
    "bias dtype vs weight": lambda d: R.layer_norm_2d(
        torch.ones(2, 8, 3, 3, device=d, dtype=torch.bfloat16), torch.ones(8, device=d),
        torch.ones(8, device=d, dtype=torch.bfloat16)),
    "weight device": lambda d: R.layer_norm_2d(torch.ones(2, 8, 3, 3, device=d),
                                               torch.ones(8, device="cpu" if d != "cpu" else "meta")),
    "integer input": lambda d: R.layer_norm_2d(torch.ones(2, 8, 3, 3, device=d, dtype=torch.int32)),
    "negative eps": lambda d: R.layer_norm_2d(torch.ones(2, 8, 3, 3, device=d), eps=-1.0),
    "bwd stats size": lambda d: ops.layer_norm_2d_bwd(
        torch.ones(2, 8, 3, 3, device=d), torch.ones(2, 8, 3, 3, device=d),
        torch.ones(2, 3, device=d), torch.ones(2, 3, 3, device=d), None, False, False),
    "bwd grad dtype": lambda d: ops.rms_norm_2d_bwd(
        torch.ones(2, 8, 3, 3, device=d, dtype=torch.float64), torch.ones(2, 8, 3, 3, device=d),
        torch.ones(2, 3, 3, device=d), None, False),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_same_errors_cpu_and_meta(case):
    assert_same_errors(BAD[case])


def test_modules_state_dict_repr_script_meta():
    ln, rms = R.LayerNorm2d(6), R.RMSNorm2d(6, eps=1e-5)
    assert set(ln.state_dict()) == {"weight", "bias"} and set(rms.state_dict()) == {"weight"}
    assert repr(ln) == "rmsnorm_ext.LayerNorm2d(6, eps=1e-06, affine=True)"
    assert R.LayerNorm2d(6, affine=False).weight is None
    assert R.LayerNorm2d(6, bias=False).bias is None
    x = _x((2, 6, 5, 3), "channels_last", torch.float32)
    for m in (ln, rms):
        with torch.no_grad():
            m.weight.normal_()
        torch.testing.assert_close(torch.jit.script(m)(x), m(x))
        torch.testing.assert_close(copy.deepcopy(m)(x), m(x))
    with torch.device("meta"):
        mm = R.LayerNorm2d(6)
    assert mm.weight.is_meta and mm(torch.empty(2, 6, 3, 3, device="meta")).shape == (2, 6, 3, 3)


def test_autocast_cpu_dtype_like_torch():
    x = _x((2, 8, 4, 4), "contiguous", torch.float32)
    w, b = (t.float() for t in _params(8))
    for xin in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert R.layer_norm_2d(xin, w, b).dtype == native_ln(xin, w, b).dtype
