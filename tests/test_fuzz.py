"""Property-based fuzzing (hypothesis): random shapes, dtypes, layouts, parameters and eps,
forward and backward against a float64 reference built from plain torch ops.

The accuracy bar is relative to torch's own error in the same dtype:

    max|ours - ref64| <= 4 * max|torch_same_dtype - ref64| + 2 * eps(dtype) * scale

where `scale` is the magnitude one rounding step is taken of (max|ref| for elementwise
outputs, the largest term of the reduction for gradients that sum over rows or over a
row). For float64 the bar is tight: 4 * torch's error + 64 * eps(float64) * scale.

Profiles (env RMSNORM_EXT_FUZZ): "ci" (default: 40 examples per test, derandomized, so
CI is reproducible and bounded), "long" (2000 examples, random), "sanitize" (8 examples,
for the ASan/UBSan run in .ci/sanitize.sh).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R
from reference import default_eps

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("rmsnorm_ext-ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_HC, print_blob=True, database=None)
settings.register_profile("rmsnorm_ext-long", max_examples=2000, deadline=None,
                          suppress_health_check=_HC, print_blob=True)
settings.register_profile("rmsnorm_ext-sanitize", max_examples=8, deadline=None,
                          derandomize=True, suppress_health_check=_HC, database=None)
PROFILE = os.environ.get("RMSNORM_EXT_FUZZ", "ci")
# Applied per test (not load_profile), so other test files' hypothesis settings are untouched.
FUZZ = settings(settings.get_profile(f"rmsnorm_ext-{PROFILE}"))

MAX_NUMEL = 1 << 16 if PROFILE != "long" else 1 << 18
F64 = torch.float64
REDUCED = (torch.bfloat16, torch.float16)

# N = 1, small primes, powers of two, primes around them, and a few larger ones.
SPECIAL_N = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 251, 256, 509,
             512, 1021, 1024, 2048, 4093, 4096, 8191, 8192]


# ---------------------------------------------------------------------------------------
# strategies


@st.composite
def cases(draw, op):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    n = draw(st.one_of(st.sampled_from(SPECIAL_N), st.integers(1, 700)))
    # normalized_shape: one dim, or two whose product is n.
    ns = [n]
    if n > 1 and draw(st.booleans()) and draw(st.booleans()):
        divisors = [d for d in range(2, min(n, 64) + 1) if n % d == 0]
        if divisors:
            d = draw(st.sampled_from(divisors))
            ns = [d, n // d]
    lead = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    while lead and math.prod(lead) * n > MAX_NUMEL:
        lead.pop()
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "row_padded",
                                   "offset"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3] + ([3e4] if dtype != torch.float16 else
                                                     [3e2])))
    mean = draw(st.sampled_from([0.0, 0.0, 4.0])) if op == "ln" else 0.0
    has_w = draw(st.booleans()) or op == "fused"
    wdtype = dtype
    if dtype in REDUCED and has_w and draw(st.booleans()):
        wdtype = torch.float32  # fp32 weights with reduced-precision activations
    has_b = op == "ln" and draw(st.booleans())
    offset = draw(st.sampled_from([0.0, 0.0, 1.0])) if op in ("rms", "fused") and has_w \
        else 0.0
    if op == "ln":
        eps = draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1] + ([0.0] if n > 1 else [])))
    else:
        eps = draw(st.sampled_from([None, None, 0.0, 1e-6, 1e-5, 1e-2]))
    rdtype = dtype
    if op == "fused" and dtype in REDUCED and draw(st.booleans()):
        rdtype = torch.float32  # fp32 residual stream
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dtype=dtype, ns=ns, lead=lead, layout=layout, scale=scale, mean=mean,
                has_w=has_w, wdtype=wdtype, has_b=has_b, offset=offset, eps=eps,
                rdtype=rdtype, seed=seed)


def make(shape, layout, dtype, gen, scale=1.0, mean=0.0):
    """A tensor of `shape` with the given memory layout; values ~ mean + scale * N(0, 1)."""
    def rnd(*s):
        return (torch.randn(*s, generator=gen, dtype=F64) * scale + mean).to(dtype)
    if layout == "transposed" and len(shape) >= 2 and shape[-2] > 1:
        return rnd(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced":
        return rnd(*shape[:-1], 2 * shape[-1])[..., 1::2]
    if layout == "row_padded":
        return rnd(*shape[:-1], shape[-1] + 5)[..., 2:2 + shape[-1]]
    if layout == "offset":
        numel = math.prod(shape)
        return rnd(numel + 3)[3:].view(shape)
    return rnd(*shape)


# ---------------------------------------------------------------------------------------
# float64 references (plain torch ops) and the bar


def ref_rms(x, dims, w, eps, offset):
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y if w is None else y * (w + offset)


def ref_ln(x, dims, w, b, eps):
    mu = x.mean(dims, keepdim=True)
    var = (x - mu).pow(2).mean(dims, keepdim=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


def check(ours, ref, torch_same, dtype, scale, what):
    """ours/torch_same: results in `dtype`; ref: float64 reference."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert torch.isfinite(ref).all(), f"{what}: the reference is not finite (test bug)"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values in our result"
    if ours.numel() == 0:
        return
    eps = torch.finfo(dtype).eps
    err = (ours.double() - ref).abs().max().item()
    torch_err = 0.0 if torch_same is None else (torch_same.double() - ref).abs().max().item()
    if not math.isfinite(torch_err):
        torch_err = 0.0
    ulps = 64.0 if dtype == F64 else 2.0
    bound = 4 * torch_err + ulps * eps * scale
    assert err <= bound, (f"{what}: max error {err:.3e} > bound {bound:.3e} "
                          f"(torch's error {torch_err:.3e}, scale {scale:.3e}, {dtype})")


def amax(t):
    return t.abs().max().item() if t.numel() else 0.0


def col_scale(terms, nd):
    """Largest sum of |terms| over the leading (row) dims: the scale of a row reduction."""
    t = terms.abs().reshape(-1, *terms.shape[terms.dim() - nd:]).sum(0)
    return amax(t)


def setup(c, op):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, ns = c["dtype"], c["ns"]
    shape = [*c["lead"], *ns]
    x = make(shape, c["layout"], dtype, gen, c["scale"], c["mean"])
    w = b = None
    if c["has_w"]:
        w = (torch.randn(ns, generator=gen, dtype=F64) * (0.1 if c["offset"] else 1.0) +
             (0.0 if c["offset"] else 1.0)).to(c["wdtype"])
    if c["has_b"]:
        b = torch.randn(ns, generator=gen, dtype=F64).to(c["wdtype"])
    dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    return gen, shape, x, w, b, dy


def grads(out_and_grads, inputs):
    outs, gys = out_and_grads
    return torch.autograd.grad(outs, [t for t in inputs if t is not None], gys,
                               allow_unused=True)


def leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


# ---------------------------------------------------------------------------------------
# the properties


@FUZZ
@given(c=cases("rms"))
def test_fuzz_rms_norm(c):
    gen, shape, x, w, b, dy = setup(c, "rms")
    ns, dtype, off = c["ns"], c["dtype"], c["offset"]
    dims = tuple(range(-len(ns), 0))
    eps_used = default_eps(dtype) if c["eps"] is None else c["eps"]

    # ours
    xo, wo = leaf(x), leaf(w)
    y = R.rms_norm(xo, ns, wo, c["eps"], weight_offset=off)
    assert y.dtype == dtype and y.shape == x.shape
    g_ours = grads(([y], [dy]), [xo, wo])
    # float64 reference
    x64, w64 = leaf(x, F64), leaf(w, F64)
    y64 = ref_rms(x64, dims, w64, eps_used, off)
    g64 = grads(([y64], [dy.double()]), [x64, w64])
    # torch, same dtype (a mixed fp32 weight is cast to the input's dtype)
    xt = leaf(x)
    wt = None if w is None else (w.to(dtype) + off).detach().requires_grad_()
    yt = F.rms_norm(xt, ns, wt, eps_used)
    g_t = grads(([yt], [dy]), [xt, wt])

    check(y, y64.detach(), yt, dtype, amax(y64), "rms_norm y")
    rstd = torch.rsqrt(x.double().pow(2).mean(dims, keepdim=True) + eps_used)
    g = dy.double() * (1.0 if w is None else (w.double() + off))
    check(g_ours[0], g64[0], g_t[0], dtype, amax(g * rstd) + amax(g64[0]), "rms_norm dx")
    if w is not None:
        check(g_ours[1], g64[1], g_t[1], c["wdtype"],
              col_scale(dy.double() * x.double() * rstd, len(ns)), "rms_norm dweight")


@FUZZ
@given(c=cases("ln"))
def test_fuzz_layer_norm(c):
    gen, shape, x, w, b, dy = setup(c, "ln")
    ns, dtype, eps = c["ns"], c["dtype"], c["eps"]
    dims = tuple(range(-len(ns), 0))

    xo, wo, bo = leaf(x), leaf(w), leaf(b)
    y = R.layer_norm(xo, ns, wo, bo, eps)
    assert y.dtype == dtype and y.shape == x.shape
    g_ours = grads(([y], [dy]), [xo, wo, bo])
    x64, w64, b64 = leaf(x, F64), leaf(w, F64), leaf(b, F64)
    y64 = ref_ln(x64, dims, w64, b64, eps)
    if not torch.isfinite(y64).all():  # eps = 0 on a constant row: nothing to compare
        return
    g64 = grads(([y64], [dy.double()]), [x64, w64, b64])
    xt = leaf(x)
    wt = None if w is None else leaf(w, dtype)
    bt = None if b is None else leaf(b, dtype)
    yt = F.layer_norm(xt, ns, wt, bt, eps)
    g_t = grads(([yt], [dy]), [xt, wt, bt])

    xc = x.double() - x.double().mean(dims, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)
    # One rounding of the mean moves every (x - mean) * rstd * w by eps * |mean| * rstd * |w|:
    # rows with |mean| >> std are that ill-conditioned in any precision, ours or torch's.
    mean_term = x.double().mean(dims, keepdim=True).abs() * rstd
    if w is not None:
        mean_term = mean_term * w.double().abs()
    check(y, y64.detach(), yt, dtype, amax(y64) + amax(mean_term), "layer_norm y")
    g = dy.double() * (1.0 if w is None else w.double())
    # dx inherits the same conditioning: xhat carries the mean's rounding amplified by
    # |mean| * rstd, and dx scales xhat by rstd * |g|.
    mean_cond = amax(x.double().mean(dims, keepdim=True).abs() * rstd)
    check(g_ours[0], g64[0], g_t[0], dtype, amax(g * rstd) * (1 + mean_cond) + amax(g64[0]),
          "layer_norm dx")
    k = 1
    if w is not None:
        check(g_ours[k], g64[k], g_t[k], c["wdtype"],
              col_scale(dy.double() * xc * rstd, len(ns)), "layer_norm dweight")
        k += 1
    if b is not None:
        check(g_ours[k], g64[k], g_t[k], c["wdtype"], col_scale(dy.double(), len(ns)),
              "layer_norm dbias")


@FUZZ
@given(c=cases("fused"))
def test_fuzz_fused_add_rms_norm(c):
    gen, shape, x, w, b, dy = setup(c, "fused")
    ns, dtype, rdtype, off = c["ns"], c["dtype"], c["rdtype"], c["offset"]
    dims = tuple(range(-len(ns), 0))
    eps_used = default_eps(rdtype) if c["eps"] is None else c["eps"]
    r = make(shape, "contiguous" if c["layout"] == "transposed" else "transposed", rdtype,
             gen, c["scale"])
    dh = torch.randn(shape, generator=gen, dtype=F64).to(rdtype)

    xo, ro, wo = leaf(x), leaf(r), leaf(w)
    y, h = R.fused_add_rms_norm(xo, ro, ns, wo, c["eps"], weight_offset=off)
    assert y.dtype == dtype and h.dtype == rdtype and y.shape == h.shape == x.shape
    # h is input + residual rounded once to the residual's dtype: exactly torch's add.
    h_torch = x.to(rdtype) + r
    assert torch.equal(h.detach(), h_torch), "fused_add_rms_norm: h != input + residual"
    g_ours = grads(([y, h], [dy, dh]), [xo, ro, wo])

    # Reference: rms_norm of the rounded h in float64; d(input) = d(residual) = dh_total.
    h64, w64 = leaf(h_torch, F64), leaf(w, F64)
    y64 = ref_rms(h64, dims, w64, eps_used, off)
    g64 = grads(([y64, h64], [dy.double(), dh.double()]), [h64, w64])
    # torch in the same dtypes
    xt, rt = leaf(x), leaf(r)
    wt = None if w is None else (w.to(rdtype) + off).detach().requires_grad_()
    ht = xt.to(rdtype) + rt
    yt = F.rms_norm(ht, ns, wt, eps_used).to(dtype)
    g_t = grads(([yt, ht], [dy, dh]), [xt, rt, wt])

    check(y, y64.detach(), yt, dtype, amax(y64), "fused y")
    rstd = torch.rsqrt(h_torch.double().pow(2).mean(dims, keepdim=True) + eps_used)
    g = dy.double() * (1.0 if w is None else (w.double() + off))
    dscale = amax(g * rstd) + amax(g64[0]) + amax(dh.double())
    check(g_ours[0], g64[0], g_t[0], dtype, dscale, "fused d(input)")
    check(g_ours[1], g64[0], g_t[1], rdtype, dscale, "fused d(residual)")
    if w is not None:
        check(g_ours[2], g64[1], g_t[2], c["wdtype"],
              col_scale(dy.double() * h_torch.double() * rstd, len(ns)), "fused dweight")


@FUZZ
@given(c=cases("fused"))
def test_fuzz_fused_inplace_matches_out_of_place(c):
    """The in-place variant computes exactly what the out-of-place op does."""
    gen, shape, x, w, b, dy = setup(c, "fused")
    rdtype = c["rdtype"]
    r = make(shape, "contiguous" if c["layout"] == "transposed" else "transposed", rdtype,
             gen, c["scale"])
    with torch.no_grad():
        y, h = R.fused_add_rms_norm(x, r, c["ns"], w, c["eps"], weight_offset=c["offset"])
        xi, ri = x.clone(), r.clone()  # clone keeps the (strided) layout
        out = R.fused_add_rms_norm_(xi, ri, c["ns"], w, c["eps"], weight_offset=c["offset"])
    assert out[0] is xi and out[1] is ri
    assert torch.equal(ri, h) and torch.equal(xi, y)
