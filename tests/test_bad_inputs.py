"""The bad-input matrix: every public function and module against malformed arguments.

Each case ends in one of two ways: a Python exception (TypeError / ValueError /
RuntimeError) whose message names the problem, or -- where torch computes a result for
the same call -- the same result as torch.nn.functional. Never a crash or a hang (the
whole file runs in one process; a crash fails it).

"Another device" is "meta" everywhere (it exists on CPU-only machines), plus "cuda" when
a GPU is present.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R
from reference import default_eps

ops = torch.ops.rmsnorm_ext

HAS_CUDA = torch.cuda.is_available()
OTHER_DEVICES = ["meta"] + (["cuda"] if HAS_CUDA else [])

# Every public entry point, called the same way: (x, normalized_shape, weight, bias, eps,
# residual). Bias is ignored by the RMSNorm family; residual by the non-fused ones.
ALL_APIS = ["rms_norm", "layer_norm", "fused_add_rms_norm", "fused_add_rms_norm_", "RMSNorm",
            "LayerNorm"]
WEIGHT_APIS = ALL_APIS
BIAS_APIS = ["layer_norm", "LayerNorm"]
FUSED_APIS = ["fused_add_rms_norm", "fused_add_rms_norm_"]
DIFF_APIS = ["rms_norm", "layer_norm", "fused_add_rms_norm", "RMSNorm", "LayerNorm"]

_UNSET = object()


def call(api, x, ns, weight=_UNSET, bias=_UNSET, eps=_UNSET, residual=None, weight_offset=0.0):
    """Calls `api`; returns its output tensor(s). Modules get `weight`/`bias` assigned as
    parameters as given (even if malformed), bypassing the constructor."""
    if residual is None and api in FUSED_APIS:
        residual = torch.ones_like(x) if x.device.type != "meta" else torch.empty_like(x)
    w = None if weight is _UNSET else weight
    b = None if bias is _UNSET else bias
    if api == "rms_norm":
        e = None if eps is _UNSET else eps
        return R.rms_norm(x, ns, w, e, weight_offset=weight_offset)
    if api == "layer_norm":
        e = 1e-5 if eps is _UNSET else eps
        return R.layer_norm(x, ns, w, b, e)
    if api == "fused_add_rms_norm":
        e = None if eps is _UNSET else eps
        return R.fused_add_rms_norm(x, residual, ns, w, e, weight_offset=weight_offset)
    if api == "fused_add_rms_norm_":
        e = None if eps is _UNSET else eps
        with torch.no_grad():
            return R.fused_add_rms_norm_(x, residual, ns, w, e, weight_offset=weight_offset)
    if api in ("RMSNorm", "LayerNorm"):
        kw = {} if eps is _UNSET else {"eps": eps}
        if api == "RMSNorm":
            m = R.RMSNorm(ns, elementwise_affine=False, weight_offset=weight_offset, **kw)
        else:
            m = R.LayerNorm(ns, elementwise_affine=False, **kw)
        if w is not None:
            m.weight = w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(
                w, requires_grad=w.is_floating_point())
        if b is not None and api == "LayerNorm":
            m.bias = b if isinstance(b, torch.nn.Parameter) else torch.nn.Parameter(
                b, requires_grad=b.is_floating_point())
        return m(x)
    raise AssertionError(api)


def ref(api, x, ns, weight=None, bias=None, eps=_UNSET, residual=None):
    """torch's result for the same call (computed out of place)."""
    if api in ("rms_norm", "RMSNorm"):
        return F.rms_norm(x, ns, weight, None if eps is _UNSET else eps)
    if api in ("layer_norm", "LayerNorm"):
        return F.layer_norm(x, ns, weight, bias, 1e-5 if eps is _UNSET else eps)
    if api in FUSED_APIS:
        if residual is None:
            residual = torch.ones_like(x)
        h = x + residual
        return F.rms_norm(h, ns, weight, None if eps is _UNSET else eps), h
    raise AssertionError(api)


def assert_same(ours, theirs, atol=1e-5, rtol=1e-5):
    if isinstance(theirs, tuple):
        for o, t in zip(ours, theirs):
            assert_same(o, t, atol, rtol)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, equal_nan=True)


# ---------------------------------------------------------------------------------------
# normalized_shape


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("ns,match", [
    ((4,), r"normalized_shape \[4\] does not match the input's trailing dimensions"),
    ((8, 8), r"normalized_shape \[8, 8\] does not match"),
    ((1, 3, 4, 8), r"normalized_shape \[1, 3, 4, 8\] has more dimensions than the input"),
    ((2, 2, 3, 4, 8), r"has more dimensions than the input"),
    ((-8,), r"normalized_shape \[-8\] does not match"),
    ((0,), r"normalized_shape \[0\] does not match"),
    ((), r"normalized_shape must have at least one dimension"),
])
def test_bad_normalized_shape(api, ns, match):
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match=match):
        call(api, x, ns)


@pytest.mark.parametrize("api", ["rms_norm", "layer_norm", "fused_add_rms_norm",
                                 "fused_add_rms_norm_"])
def test_normalized_shape_not_ints(api):
    x = torch.randn(3, 8)
    with pytest.raises((TypeError, RuntimeError), match="normalized_shape|int"):
        call(api, x, (8.0,))
    with pytest.raises(TypeError):
        call(api, x, None)


@pytest.mark.parametrize("api", ALL_APIS)
def test_normalized_shape_spellings(api):
    """int, tuple, list and torch.Size all mean the same."""
    x = torch.randn(3, 4, 8)
    outs = [call(api, x.clone(), ns) for ns in (8, (8,), [8], torch.Size([8]))]
    for o in outs[1:]:
        assert_same(o, outs[0], atol=0, rtol=0)


@pytest.mark.parametrize("api", ALL_APIS)
def test_zero_dim_input(api):
    with pytest.raises(ValueError, match="normalized_shape"):
        call(api, torch.tensor(1.0), (1,))


# ---------------------------------------------------------------------------------------
# weight / bias


@pytest.mark.parametrize("api", WEIGHT_APIS)
@pytest.mark.parametrize("shape", [(7,), (9,), (1,), (), (8, 1), (1, 8), (2, 8)])
def test_weight_wrong_shape(api, shape):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \[8\], got"):
        call(api, x, (8,), weight=torch.ones(shape))


@pytest.mark.parametrize("api", BIAS_APIS)
@pytest.mark.parametrize("shape", [(7,), (1,), (), (2, 8)])
def test_bias_wrong_shape(api, shape):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"bias must have shape normalized_shape \[8\], got"):
        call(api, x, (8,), weight=torch.ones(8), bias=torch.ones(shape))


@pytest.mark.parametrize("api", WEIGHT_APIS)
@pytest.mark.parametrize("xdtype,wdtype", [
    (torch.float32, torch.float64), (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float64), (torch.float32, torch.int64), (torch.float32, torch.bool),
    (torch.float32, torch.complex64),
])
def test_weight_wrong_dtype(api, xdtype, wdtype):
    x = torch.randn(3, 8).to(xdtype)
    w = torch.randn(8).to(wdtype) if wdtype.is_floating_point else torch.ones(8, dtype=wdtype)
    if api in ("rms_norm", "RMSNorm") and wdtype.is_floating_point:
        # F.rms_norm takes any floating weight (the output keeps the input's dtype): so do
        # we, within an ulp of torch (an fp64 weight of an fp32 input is rounded to fp32).
        want = F.rms_norm(x, (8,), w)
        got = call(api, x, (8,), weight=w)
        assert got.dtype == want.dtype == xdtype
        torch.testing.assert_close(got, want, atol=0, rtol=2 * torch.finfo(xdtype).eps)
        return
    with pytest.raises(TypeError, match="weight dtype .* is not supported with input dtype"):
        call(api, x, (8,), weight=w)


@pytest.mark.parametrize("api", ["rms_norm", "RMSNorm", "scripted RMSNorm", "compiled"])
@pytest.mark.parametrize("xdtype,wdtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.bfloat16, torch.float16), (torch.float16, torch.float64),
])
def test_rms_norm_takes_any_float_weight_like_torch(api, xdtype, wdtype):
    """What F.rms_norm / nn.RMSNorm accept (a .half()'d RMSNorm fed fp32, say), ours accepts
    with the same output dtype and values, and the weight's gradient in its own dtype."""
    torch.manual_seed(0)
    x = torch.randn(5, 16).to(xdtype)
    w0 = (torch.randn(16) + 1).to(wdtype)
    dy = torch.randn(5, 16).to(xdtype)

    def run(f):
        xl, wl = x.clone().requires_grad_(), w0.clone().requires_grad_()
        y = f(xl, wl)
        return (y, *torch.autograd.grad(y, (xl, wl), dy))

    if api in ("RMSNorm", "scripted RMSNorm"):
        def ours(xl, wl):
            m = R.RMSNorm(16)
            m.weight = torch.nn.Parameter(wl.detach().clone())
            m = torch.jit.script(m) if api.startswith("scripted") else m
            y = m(xl)
            return y, m.weight
        xl, = (x.clone().requires_grad_(),)
        y, wp = ours(xl, w0)
        got = (y, *torch.autograd.grad(y, (xl, wp), dy))
    elif api == "compiled":
        got = run(torch.compile(lambda a, b: R.rms_norm(a, (16,), b), fullgraph=True))
    else:
        got = run(lambda a, b: R.rms_norm(a, (16,), b))
    want = run(lambda a, b: F.rms_norm(a, (16,), b))
    for name, g, t in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == t.dtype, (name, g.dtype, t.dtype)
        tol = 4 * torch.finfo(g.dtype if g.dtype != torch.float64 else torch.float32).eps
        torch.testing.assert_close(g.double(), t.double(), rtol=tol,
                                   atol=tol * t.double().abs().max().item(), msg=name)


@pytest.mark.parametrize("api", BIAS_APIS)
@pytest.mark.parametrize("xdtype,bdtype", [
    (torch.float32, torch.float64), (torch.bfloat16, torch.float16), (torch.float32, torch.int32),
])
def test_bias_wrong_dtype(api, xdtype, bdtype):
    x = torch.randn(3, 8).to(xdtype)
    with pytest.raises(TypeError, match="bias dtype .* is not supported with input dtype"):
        call(api, x, (8,), bias=torch.ones(8, dtype=bdtype))


@pytest.mark.parametrize("api", BIAS_APIS)
def test_weight_bias_dtypes_disagree(api):
    """Each is allowed alone (bf16, or fp32 with a bf16 input), but not mixed."""
    x = torch.randn(3, 8).bfloat16()
    with pytest.raises(TypeError, match="weight dtype .* and bias dtype .* must match"):
        call(api, x, (8,), weight=torch.ones(8, dtype=torch.bfloat16), bias=torch.ones(8))


@pytest.mark.parametrize("api", WEIGHT_APIS)
@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_weight_other_device(api, other):
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=f"weight is on {other}.* but the input is on cpu"):
        call(api, x, (8,), weight=torch.ones(8, device=other))


@pytest.mark.parametrize("api", BIAS_APIS)
@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_bias_other_device(api, other):
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=f"bias is on {other}.* but the input is on cpu"):
        call(api, x, (8,), weight=torch.ones(8), bias=torch.ones(8, device=other))


@pytest.mark.parametrize("api", WEIGHT_APIS)
@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_input_other_device_than_weight(api, other):
    """The mirror image: input elsewhere, weight on the CPU."""
    x = torch.randn(3, 8, device=other)
    residual = torch.empty_like(x)
    with pytest.raises(RuntimeError, match=f"weight is on cpu but the input is on {other}"):
        call(api, x, (8,), weight=torch.ones(8), residual=residual)


@pytest.mark.parametrize("api", WEIGHT_APIS)
@pytest.mark.parametrize("layout", ["strided", "expanded", "fp32_with_bf16"])
def test_unusual_weight_layouts_are_fine(api, layout):
    x = torch.randn(5, 8)
    if layout == "strided":
        w = torch.randn(8, 3)[:, 1]
    elif layout == "expanded":
        w = torch.randn(1).expand(8)
    else:
        x = x.bfloat16()
        w = torch.randn(8)
    b = torch.randn(8, 2)[:, 0] if api in BIAS_APIS and layout != "fp32_with_bf16" else None
    ours = call(api, x.clone(), (8,), weight=w, bias=b)
    if layout == "fp32_with_bf16":
        # torch has no mixed-dtype result to compare with: reference in fp32, then round.
        theirs = ref(api, x.float(), (8,), w, b, eps=default_eps(torch.bfloat16)
                     if api not in BIAS_APIS else 1e-5)
        theirs = tuple(t.bfloat16() for t in theirs) if isinstance(theirs, tuple) \
            else theirs.bfloat16()
        assert_same(ours, theirs, atol=2e-2, rtol=2e-2)
    else:
        assert_same(ours, ref(api, x, (8,), w, b))


# ---------------------------------------------------------------------------------------
# input dtype


BAD_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64,
              torch.complex128]


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("explicit_eps", [False, True])
def test_input_bad_dtype(api, dtype, explicit_eps):
    x = torch.ones(3, 8).to(dtype)
    eps = 1e-5 if explicit_eps else _UNSET
    with pytest.raises(TypeError, match="input must be float32, float64, bfloat16 or float16"):
        call(api, x, (8,), eps=eps)


@pytest.mark.parametrize("api", FUSED_APIS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("explicit_eps", [
    True, False])
def test_residual_bad_dtype(api, dtype, explicit_eps):
    x = torch.randn(3, 8)
    eps = 1e-5 if explicit_eps else _UNSET
    with pytest.raises(TypeError, match="residual dtype .* is not supported with input dtype"):
        call(api, x, (8,), residual=torch.ones(3, 8).to(dtype), eps=eps)


# ---------------------------------------------------------------------------------------
# residual


@pytest.mark.parametrize("api", FUSED_APIS)
@pytest.mark.parametrize("shape", [(3, 9), (1, 8), (8,), (3, 1, 8), (6, 8), (0, 8)])
def test_residual_wrong_shape(api, shape):
    """No broadcasting: the residual must have the input's exact shape."""
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"residual shape .* does not match the input shape"):
        call(api, x, (8,), residual=torch.ones(shape))


@pytest.mark.parametrize("api", FUSED_APIS)
@pytest.mark.parametrize("xdtype,rdtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64),
])
def test_residual_wrong_dtype(api, xdtype, rdtype):
    x = torch.randn(3, 8).to(xdtype)
    with pytest.raises(TypeError, match="residual dtype .* is not supported with input dtype"):
        call(api, x, (8,), residual=torch.ones(3, 8, dtype=rdtype))


@pytest.mark.parametrize("api", FUSED_APIS)
@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_residual_other_device(api, other):
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=f"residual is on {other}.* but the input is on cpu"):
        call(api, x, (8,), residual=torch.ones(3, 8, device=other))


@pytest.mark.parametrize("api", FUSED_APIS)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_fp32_residual_stream_is_fine(api, xdtype):
    x = torch.randn(3, 8).to(xdtype)
    r = torch.randn(3, 8)
    y, h = call(api, x.clone(), (8,), residual=r.clone())
    assert y.dtype == xdtype and h.dtype == torch.float32
    h_ref = x.float() + r
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y.float(), F.rms_norm(h_ref, (8,), None),
                               atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------
# eps and weight_offset


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("eps", [-1e-6, -1.0, float("nan"), float("inf"), float("-inf")])
def test_bad_eps(api, eps):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got"):
        call(api, x, (8,), eps=eps)


@pytest.mark.parametrize("api", ["rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_",
                                 "RMSNorm"])
@pytest.mark.parametrize("off", [float("nan"), float("inf"), float("-inf")])
def test_bad_weight_offset(api, off):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight_offset must be finite, got"):
        call(api, x, (8,), weight=torch.ones(8), weight_offset=off)


@pytest.mark.parametrize("api", ALL_APIS)
def test_eps_not_a_number(api):
    x = torch.randn(3, 8)
    with pytest.raises((TypeError, ValueError)):
        call(api, x, (8,), eps="small")


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("eps", [0.0, 1e-30, 1.0, 1e6])
def test_extreme_but_valid_eps(api, eps):
    x = torch.randn(3, 8)
    assert_same(call(api, x.clone(), (8,), eps=eps), ref(api, x, (8,), eps=eps))


# ---------------------------------------------------------------------------------------
# meta tensors: shapes and dtypes propagate through the fake kernels


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_meta_forward(api, dtype):
    x = torch.empty(2, 3, 16, device="meta", dtype=dtype)
    w = torch.empty(16, device="meta", dtype=dtype)
    b = torch.empty(16, device="meta", dtype=dtype)
    out = call(api, x, (16,), weight=w, bias=b)
    for o in (out if isinstance(out, tuple) else (out,)):
        assert o.device.type == "meta" and o.shape == x.shape and o.dtype == dtype


@pytest.mark.parametrize("api", DIFF_APIS)
def test_meta_backward(api):
    x = torch.empty(2, 3, 16, device="meta", requires_grad=True)
    w = torch.empty(16, device="meta", requires_grad=True)
    b = torch.empty(16, device="meta", requires_grad=True)
    r = torch.empty(2, 3, 16, device="meta", requires_grad=True)
    if api in ("RMSNorm", "LayerNorm"):
        m = (R.RMSNorm if api == "RMSNorm" else R.LayerNorm)(16, device="meta")
        params = list(m.parameters())
        out = m(x)
    else:
        out = call(api, x, (16,), weight=w, bias=b, residual=r)
        params = [w] + ([b] if api == "layer_norm" else []) + ([r] if api in FUSED_APIS else [])
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.device.type == "meta"
    for p in params:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device.type == "meta"


@pytest.mark.parametrize("api", ALL_APIS)
def test_meta_bad_inputs_raise_the_same(api):
    """The fake kernels apply the same checks, with the same messages."""
    x = torch.empty(3, 8, device="meta")
    with pytest.raises(ValueError, match=r"normalized_shape \[4\] does not match"):
        call(api, x, (4,))
    with pytest.raises(ValueError, match="weight must have shape normalized_shape"):
        call(api, x, (8,), weight=torch.empty(7, device="meta"))
    with pytest.raises(TypeError, match="weight dtype .* is not supported"):
        call(api, x, (8,), weight=torch.empty(8, device="meta", dtype=torch.int64))
    with pytest.raises(ValueError, match="eps must be a finite number"):
        call(api, x, (8,), eps=-1.0)
    with pytest.raises(TypeError, match="input must be float32"):
        call(api, torch.empty(3, 8, device="meta", dtype=torch.int32), (8,), eps=1e-5)
    if api in FUSED_APIS:
        with pytest.raises(ValueError, match="residual shape"):
            call(api, x, (8,), residual=torch.empty(3, 9, device="meta"))


# ---------------------------------------------------------------------------------------
# zero-size dimensions: torch gives a result, so must we


ZERO_SHAPES = [((0, 8), (8,)), ((2, 0, 8), (8,)), ((3, 0), (0,)), ((0, 0), (0,)),
               ((2, 0, 4), (0, 4)), ((0,), (0,))]


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("shape,ns", ZERO_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_zero_size(api, shape, ns, affine):
    x = torch.randn(shape)
    w = torch.randn(ns) if affine else None
    b = torch.randn(ns) if affine and api in BIAS_APIS else None
    assert_same(call(api, x.clone(), ns, weight=w, bias=b), ref(api, x, ns, w, b))


@pytest.mark.parametrize("api", DIFF_APIS)
@pytest.mark.parametrize("shape,ns", ZERO_SHAPES)
def test_zero_size_backward(api, shape, ns):
    def grads(fn):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = torch.nn.Parameter(torch.randn(ns, generator=torch.Generator().manual_seed(2)))
        b = torch.nn.Parameter(torch.randn(ns, generator=torch.Generator().manual_seed(3)))
        r = torch.randn(shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
        out = fn(x, w, b, r)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs).backward()
        return [t.grad for t in (x, w, b, r)]

    def ours(x, w, b, r):
        if api in ("RMSNorm", "LayerNorm"):
            return call(api, x, ns, weight=w, bias=b)
        return call(api, x, ns, weight=w, bias=b, residual=r)

    def theirs(x, w, b, r):
        return ref(api, x, ns, w, b if api in BIAS_APIS else None, residual=r)

    for g_ours, g_theirs in zip(grads(ours), grads(theirs)):
        assert (g_ours is None) == (g_theirs is None) or (
            g_theirs is None and g_ours is not None and not g_ours.any())
        if g_ours is not None and g_theirs is not None:
            assert_same(g_ours, g_theirs, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# memory layouts: non-contiguous, expanded (stride 0), overlapping rows


def _layouts():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 40, generator=g)
    return {
        "transposed": lambda: torch.randn(8, 6, generator=g).t(),                    # (6, 8)
        "sliced_rows": lambda: base[::3, :8],                                        # (22, 8)
        "sliced_cols": lambda: base[:6, 1:17:2],                                     # (6, 8)
        "offset": lambda: base.view(-1)[7:7 + 48].view(6, 8),                        # (6, 8)
        "expanded_rows": lambda: torch.randn(1, 8, generator=g).expand(6, 8),        # stride 0
        "expanded_cols": lambda: torch.randn(6, 1, generator=g).expand(6, 8),        # stride 0
        "expanded_3d": lambda: torch.randn(3, 1, 8, generator=g).expand(3, 4, 8),
        "overlapping": lambda: torch.randn(40, generator=g).as_strided((6, 8), (3, 1)),
        "channels_last": lambda: torch.randn(2, 8, 3, 5, generator=g).to(
            memory_format=torch.channels_last).permute(0, 2, 3, 1),                   # (2,3,5,8)
    }


LAYOUTS = list(_layouts())


@pytest.mark.parametrize("api", ["rms_norm", "layer_norm", "fused_add_rms_norm", "RMSNorm",
                                 "LayerNorm"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_forward(api, layout):
    x = _layouts()[layout]()
    w = torch.randn(8)
    b = torch.randn(8) if api in BIAS_APIS else None
    residual = _layouts()["transposed"]() if x.shape == (6, 8) else torch.randn(x.shape)
    assert_same(call(api, x, (8,), weight=w, bias=b, residual=residual),
                ref(api, x, (8,), w, b, residual=residual))
    # Non-contiguous views must not be written through.
    assert_same(x, _layouts()[layout](), atol=0, rtol=0)


@pytest.mark.parametrize("api", DIFF_APIS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_backward(api, layout):
    def grads(fn, dtype=torch.float32):
        torch.manual_seed(11)
        src = _layouts()[layout]().detach()
        # Rebuild the same view structure on a leaf, so gradients flow through the view.
        storage = src.untyped_storage()
        base = torch.tensor([], dtype=src.dtype).set_(storage, 0, (storage.nbytes() // 4,),
                                                      (1,)).to(dtype).requires_grad_()
        x = base.as_strided(src.shape, src.stride(), src.storage_offset())
        w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=dtype))
        b = torch.nn.Parameter(torch.linspace(-1, 1, 8, dtype=dtype))
        r = torch.linspace(-2, 2, x.numel(), dtype=dtype).view(x.shape).requires_grad_()
        out = fn(x, w, b, r)
        outs = out if isinstance(out, tuple) else (out,)
        gy = [torch.linspace(-1, 1, o.numel(), dtype=dtype).view(o.shape) for o in outs]
        torch.autograd.backward(outs, gy)
        return [base.grad, w.grad, b.grad, r.grad]

    def ours(x, w, b, r):
        if api in ("RMSNorm", "LayerNorm"):
            return call(api, x, (8,), weight=w, bias=b)
        return call(api, x, (8,), weight=w, bias=b, residual=r)

    def theirs(x, w, b, r):
        return ref(api, x, (8,), w, b if api in BIAS_APIS else None, residual=r)

    # Some layouts make rows constant (expanded_cols): LayerNorm's gradient is then
    # ill-conditioned (rstd = 1/sqrt(eps)), so the bar is relative to torch's own error.
    for g_ours, g_theirs, g64 in zip(grads(ours), grads(theirs), grads(theirs, torch.float64)):
        assert (g_ours is None) == (g_theirs is None)
        if g_ours is not None:
            assert g_ours.shape == g64.shape and g_ours.dtype == torch.float32
            err = (g_ours.double() - g64).abs().max().item()
            torch_err = (g_theirs.double() - g64).abs().max().item()
            assert err <= 4 * torch_err + 1e-5 * max(1.0, g64.abs().max().item()), (
                err, torch_err)


@pytest.mark.parametrize("layout", ["transposed", "sliced_rows", "sliced_cols", "offset",
                                    "channels_last"])
@pytest.mark.parametrize("which", ["input", "residual", "both"])
def test_inplace_non_contiguous(layout, which):
    """Strided (non-overlapping) arguments to the in-place op are updated in place."""
    x = _layouts()[layout]()
    r = _layouts()[layout]() * 0.5 + 0.25
    if which == "input":
        r = r.contiguous()
    elif which == "residual":
        x = x.contiguous()
    x_ptr, r_ptr = x.data_ptr(), r.data_ptr()
    y_ref, h_ref = ref("fused_add_rms_norm_", x, (8,), residual=r)
    with torch.no_grad():
        y, h = R.fused_add_rms_norm_(x, r, (8,))
    assert y is x and h is r and x.data_ptr() == x_ptr and r.data_ptr() == r_ptr
    assert_same(h, h_ref, atol=0, rtol=0)
    assert_same(y, y_ref)


@pytest.mark.parametrize("which", ["input", "residual"])
def test_inplace_expanded_refused_before_writing(which):
    x = torch.randn(4, 8)
    r = torch.randn(4, 8)
    if which == "input":
        x = torch.randn(1, 8).expand(4, 8)
    else:
        r = torch.randn(1, 8).expand(4, 8)
    x0, r0 = x.clone(), r.clone()
    with pytest.raises((RuntimeError, ValueError), match=which):
        with torch.no_grad():
            R.fused_add_rms_norm_(x, r, (8,))
    assert torch.equal(x, x0) and torch.equal(r, r0), "arguments modified by a failed call"


def test_inplace_expanded_raises():
    """Whatever else happens, an expanded argument to the in-place op raises, not crashes."""
    for which in ("input", "residual"):
        x, r = torch.randn(4, 8), torch.randn(4, 8)
        if which == "input":
            x = torch.randn(1, 8).expand(4, 8)
        else:
            r = torch.randn(1, 8).expand(4, 8)
        with pytest.raises((RuntimeError, ValueError), match="memory location|expanded|overlap|" + which):
            with torch.no_grad():
                R.fused_add_rms_norm_(x, r, (8,))


def test_inplace_overlapping_rows():
    """Overlapping (as_strided) rows: torch cannot detect this overlap either; the result
    must be what torch's own copy_ semantics give: compute out of place, copy back."""
    def make():
        g = torch.Generator().manual_seed(3)
        return torch.randn(40, generator=g).as_strided((6, 8), (3, 1)), torch.randn(6, 8,
                                                                                    generator=g)
    x, r = make()
    x_ref, r_ref = make()
    y_ref, h_ref = ref("fused_add_rms_norm", x_ref.clone(), (8,), residual=r_ref.clone())
    try:
        with torch.no_grad():
            R.fused_add_rms_norm_(x, r, (8,))
    except RuntimeError as e:  # refusing is acceptable too, with a clear message
        assert "overlap" in str(e) or "memory" in str(e)
        return
    r_ref.copy_(h_ref)
    x_ref.copy_(y_ref)
    assert_same(r, r_ref, atol=0, rtol=0)
    assert_same(x, x_ref)
    assert_same(x._base if x._base is not None else x, x_ref._base if x_ref._base is not None
                else x_ref)


# ---------------------------------------------------------------------------------------
# the in-place op: aliasing and autograd


@pytest.mark.parametrize("alias", ["same", "view", "overlapping_views", "transposed_self"])
def test_inplace_aliasing_refused(alias):
    # The rule, the same on every device: refuse operands whose written elements overlap.
    base = torch.randn(8, 8)
    if alias == "same":
        x, r = base, base
    elif alias == "view":
        x, r = base, base.view(8, 8)
    elif alias == "overlapping_views":
        x, r = base[:5], base[3:]
    else:
        x, r = base, base.t()
    b0 = base.clone()
    with pytest.raises(ValueError, match="input and residual overlap in memory"):
        with torch.no_grad():
            R.fused_add_rms_norm_(x, r, (8,))
    assert torch.equal(base, b0), "arguments modified by a refused call"


@pytest.mark.parametrize("layout", ["rows", "interleaved_columns"])
def test_inplace_disjoint_views_of_one_buffer(layout):
    # Views of one buffer that share no element are computed, not refused.
    base = torch.randn(8, 8)
    x, r = (base[:4], base[4:]) if layout == "rows" else (base[:, 0::2], base[:, 1::2])
    y_ref, h_ref = ref("fused_add_rms_norm", x.clone(), (x.shape[-1],), residual=r.clone())
    with torch.no_grad():
        R.fused_add_rms_norm_(x, r, (x.shape[-1],))
    assert_same(r, h_ref, atol=0, rtol=0)
    assert_same(x, y_ref)


@pytest.mark.parametrize("grad_of", ["input", "residual", "weight"])
def test_inplace_refuses_autograd(grad_of):
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.ones(8)
    {"input": x, "residual": r, "weight": w}[grad_of].requires_grad_()
    with pytest.raises(RuntimeError, match="in-place and not differentiable"):
        R.fused_add_rms_norm_(x, r, (8,), w)
    with torch.no_grad():  # fine without grad mode
        R.fused_add_rms_norm_(x.detach(), r.detach(), (8,), w.detach())


def test_inplace_inference_mode():
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    y_ref, h_ref = ref("fused_add_rms_norm", x, (8,), residual=r)
    with torch.inference_mode():
        x, r = x.clone(), r.clone()
        R.fused_add_rms_norm_(x, r, (8,))
    assert_same(r, h_ref, atol=0, rtol=0)
    assert_same(x, y_ref)


# ---------------------------------------------------------------------------------------
# direct torch.ops calls with inconsistent statistics / gradients


def _x(m=4, n=8, dtype=torch.float32):
    return torch.randn(m, n, dtype=dtype)


@pytest.mark.parametrize("rstd,exc,match", [
    (torch.ones(3), RuntimeError, r"rstd must have one value per row \(4 rows\), got 3"),
    (torch.ones(5), RuntimeError, r"rstd must have one value per row \(4 rows\), got 5"),
    (torch.ones(0), RuntimeError, r"rstd must have one value per row"),
    (torch.ones(4, 8), RuntimeError, r"rstd must have one value per row"),
    (torch.ones(4, dtype=torch.float64), RuntimeError, r"rstd must be torch.float32, got torch.float64"),
    (torch.ones(4, dtype=torch.bfloat16), RuntimeError, r"rstd must be torch.float32, got torch.bfloat16"),
    pytest.param(torch.ones(4, device="meta"), RuntimeError, r"rstd is on meta"),
])
def test_rms_bwd_bad_rstd(rstd, exc, match):
    x = _x()
    with pytest.raises(exc, match=match):
        ops.rms_norm_bwd(x, x, rstd, None, [8], 0.0, None, True)


@pytest.mark.parametrize("which", ["mean", "rstd"])
@pytest.mark.parametrize("bad,match", [
    (torch.ones(3), r"must have one value per row \(4 rows\), got 3"),
    (torch.ones(40), r"must have one value per row"),
    (torch.ones(4, dtype=torch.float64), r"must be torch.float32, got torch.float64"),
    pytest.param(torch.ones(4, device="meta"), r"is on meta"),
])
def test_ln_bwd_bad_stats(which, bad, match):
    x = _x()
    good = torch.ones(4)
    mean, rstd = (bad, good) if which == "mean" else (good, bad)
    with pytest.raises(RuntimeError, match=which + " " + match):
        ops.layer_norm_bwd(x, x, mean, rstd, None, [8], True, True)


@pytest.mark.parametrize("case", ["rms_rstd", "rms_grad_out", "rms_grad_residual", "ln_mean",
                                  "ln_grad_out"])
def test_meta_bwd_inconsistent_args(case):
    """All-meta calls: the fake kernels must apply the C++ checks too."""
    x = torch.empty(4, 8, device="meta")
    st = torch.empty(4, device="meta")
    bad_st = torch.empty(3, device="meta")
    bad_g = torch.empty(4, 9, device="meta")
    with pytest.raises((RuntimeError, ValueError)):
        if case == "rms_rstd":
            ops.rms_norm_bwd(x, x, bad_st, None, [8], 0.0, None, True)
        elif case == "rms_grad_out":
            ops.rms_norm_bwd(bad_g, x, st, None, [8], 0.0, None, True)
        elif case == "rms_grad_residual":
            ops.rms_norm_bwd(x, x, st, None, [8], 0.0, bad_g, True)
        elif case == "ln_mean":
            ops.layer_norm_bwd(x, x, bad_st, st, None, [8], True, True)
        else:
            ops.layer_norm_bwd(bad_g, x, st, st, None, [8], True, True)


def test_bwd_stats_as_another_shape_with_right_count():
    """One value per row is what matters: a (2, 2) rstd for 4 rows is accepted and used
    row-major, matching a (4,) rstd."""
    x = _x()
    rstd = torch.rand(4) + 0.5
    a = ops.rms_norm_bwd(x, x, rstd, None, [8], 0.0, None, False)[0]
    b = ops.rms_norm_bwd(x, x, rstd.view(2, 2), None, [8], 0.0, None, False)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["rms", "ln"])
@pytest.mark.parametrize("g,exc,match", [
    (torch.ones(4, 9), ValueError, r"grad_out shape \[4, 9\] does not match the input shape"),
    (torch.ones(8), ValueError, r"grad_out shape"),
    (torch.ones(4, 8, dtype=torch.float64), TypeError, r"grad_out dtype"),
    (torch.ones(4, 8, dtype=torch.int32), TypeError, r"grad_out dtype"),
    pytest.param(torch.ones(4, 8, device="meta"), RuntimeError, r"grad_out is on meta"),
])
def test_bwd_bad_grad_out(op, g, exc, match):
    x = _x()
    with pytest.raises(exc, match=match):
        if op == "rms":
            ops.rms_norm_bwd(g, x, torch.ones(4), None, [8], 0.0, None, True)
        else:
            ops.layer_norm_bwd(g, x, torch.ones(4), torch.ones(4), None, [8], True, True)


@pytest.mark.parametrize("gres,exc,match", [
    (torch.ones(3, 8), ValueError, r"grad_residual shape \[3, 8\] does not match the input "
     r"shape \[4, 8\]"),
    (torch.ones(4, 8, dtype=torch.float64), TypeError,
     "grad_residual dtype torch.float64 must match the input dtype torch.float32"),
    pytest.param(torch.ones(4, 8, device="meta"), RuntimeError, "grad_residual is on meta"),
])
def test_rms_bwd_bad_grad_residual(gres, exc, match):
    x = _x()
    with pytest.raises(exc, match=match):
        ops.rms_norm_bwd(x, x, torch.ones(4), None, [8], 0.0, gres, True)


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_bwd_bad_weight_and_shape(op):
    x = _x()
    args_rms = lambda w, ns: ops.rms_norm_bwd(x, x, torch.ones(4), w, ns, 0.0, None, True)  # noqa
    args_ln = lambda w, ns: ops.layer_norm_bwd(x, x, torch.ones(4), torch.ones(4), w, ns,  # noqa
                                               True, True)
    f = args_rms if op == "rms" else args_ln
    with pytest.raises(ValueError, match="weight must have shape"):
        f(torch.ones(7), [8])
    with pytest.raises(TypeError, match="weight dtype"):
        f(torch.ones(8, dtype=torch.float64), [8])
    with pytest.raises(ValueError, match="normalized_shape"):
        f(None, [7])
    with pytest.raises(ValueError, match="normalized_shape"):
        f(None, [])
    with pytest.raises(TypeError, match="input must be float32"):
        (ops.rms_norm_bwd(x, x.int(), torch.ones(4), None, [8], 0.0, None, True) if op == "rms"
         else ops.layer_norm_bwd(x, x.int(), torch.ones(4), torch.ones(4), None, [8], True,
                                 True))


def test_ops_reject_bad_eps_and_offset_directly():
    x = _x()
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm_fwd(x, [8], None, -1.0, 0.0)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_fwd(x, [8], None, None, float("nan"))
    with pytest.raises(ValueError, match="eps"):
        ops.fused_add_rms_norm_fwd(x, x, [8], None, float("inf"), 0.0)
    with pytest.raises(ValueError, match="weight_offset"):
        ops.rms_norm_bwd(x, x, torch.ones(4), None, [8], float("nan"), None, True)


# ---------------------------------------------------------------------------------------
# CUDA: the same checks on the GPU path (skipped without a GPU)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("api", ALL_APIS)
def test_cuda_input_cpu_params(api):
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but the input is on cuda"):
        call(api, x, (8,), weight=torch.ones(8), residual=torch.ones_like(x))
    if api in FUSED_APIS:
        with pytest.raises(RuntimeError, match="residual is on cpu"):
            call(api, x, (8,), residual=torch.ones(3, 8))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_layouts(api, layout):
    if api == "fused_add_rms_norm_" and layout.startswith(("expanded", "overlapping")):
        pytest.skip("covered on CPU")
    x = _layouts()[layout]().cuda()
    w = torch.randn(8, device="cuda")
    res = torch.randn(x.shape, device="cuda")
    theirs = ref(api, x.clone(), (8,), w, None, residual=res.clone())
    atol = 1e-5
    if layout == "expanded_cols" and api in BIAS_APIS:
        # Constant rows: x - mean is ~0 and rstd = 1/sqrt(eps); a kernel that computes
        # x * s + (b - mean * s) is off by a rounding step of x * s (torch's is exact).
        atol = 4 * torch.finfo(torch.float32).eps * 1e5 ** 0.5 * (x.abs().max() *
                                                                  w.abs().max()).item()
    with contextlib.suppress(NotImplementedError):
        assert_same(call(api, x, (8,), weight=w, residual=res), theirs, atol=atol)


@pytest.mark.parametrize("bad", [2.5, 4.0, True])
@pytest.mark.parametrize("api", ["gated_rms_norm", "rms_norm_quant", "layer_norm_quant"])
def test_group_size_must_be_an_int(api, bad):
    """A float or bool group_size is refused (the op's schema takes an int); it was truncated
    (2.5 -> 2, True -> 1) and silently computed another grouping."""
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="rmsnorm_ext: group_size must be an int"):
        if api == "gated_rms_norm":
            R.gated_rms_norm(x, torch.randn(2, 8), (8,), group_size=bad)
        else:
            with torch.no_grad():
                getattr(R, api)(x, (8,), group_size=bad)
    import numpy as np
    if api == "gated_rms_norm":  # an integer type other than int is fine
        torch.testing.assert_close(R.gated_rms_norm(x, x, (8,), group_size=np.int64(4)),
                                   R.gated_rms_norm(x, x, (8,), group_size=4))
