"""Parameter gradients over many rows, against float64 (issue 11), on CPU.

dweight/dbias are sums over all M rows, so a running fp32 sum loses accuracy as M grows;
the kernels sum them as a tree (blocks of rows, added pairwise). The bar: our error
against a float64 reference is at most 2x the best of torch's on the same inputs:
F.rms_norm / F.layer_norm backward in the same dtypes, the same in fp32, and a composite
fp32 backward whose reductions are torch's cascade sum (torch's own LayerNorm backward
sums naively, so without the composite the bar would be lax). No extra rounding term is
needed: every baseline has to round its result to fp32 too.

Results must also be bitwise reproducible for a given thread count: each case runs twice.
The thread counts 1, 3, 4 and 7 give chunks that do not divide M evenly and a chunk count
that is not a power of two (the pairwise reduction over chunks has an odd one out).
The big shapes run once each, spread over dtypes and thread counts, to keep this file fast.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext

EPS = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _grads(fn, inputs, grad_outs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, leaves, grad_outs)


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


# ------------------------------------------------------------- the functions, per form

def _rms(impl, N, offset=0.0):
    def f(x, w):
        if impl == "ours":
            return rmsnorm_ext.rms_norm(x, (N,), w, EPS, weight_offset=offset)
        if impl == "torch":
            return F.rms_norm(x, (N,), w + offset if offset else w, EPS)
        # composite in the input's dtype: fp32 (or float64 for the reference)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (w + offset)
    return f


def _ln(impl, N):
    def f(x, w, b):
        if impl == "ours":
            return rmsnorm_ext.layer_norm(x, (N,), w, b, EPS)
        if impl == "torch":
            return F.layer_norm(x, (N,), w, b, EPS)
        m = x.mean(-1, keepdim=True)
        v = (x - m).pow(2).mean(-1, keepdim=True)
        return (x - m) * torch.rsqrt(v + EPS) * w + b
    return f


def _fused(impl, N, rdtype):
    def f(x, r, w):
        if impl == "ours":
            return rmsnorm_ext.fused_add_rms_norm(x, r, (N,), w, EPS)
        if impl == "torch":
            h = x.to(r.dtype) + r
            return F.rms_norm(h, (N,), w, EPS).to(x.dtype), h
        # The sum as stored (rounded to the residual dtype) with the exact derivative, so
        # the float64 reference computes the op as defined.
        h = x + r
        h = h + (h.to(rdtype).to(h.dtype) - h).detach()
        return _rms(impl, N)(h, w), h
    return f


def _make(op, M, N, dtype, rdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, generator=g).to(dtype)
    w = torch.randn(N, generator=g)  # fp32 weight (and bias), next to any input dtype
    if op == "rms":
        dy = torch.randn(M, N, generator=g).to(dtype)
        return (x, w), (dy,)
    if op == "ln":
        dy = torch.randn(M, N, generator=g).to(dtype)
        return (x, w, torch.randn(N, generator=g)), (dy,)
    r = torch.randn(M, N, generator=g).to(rdtype)
    return (x, r, w), (torch.randn(M, N, generator=g).to(dtype),
                       torch.randn(M, N, generator=g).to(rdtype))


def _fn(op, impl, N, rdtype=None):
    return _fused(impl, N, rdtype) if op == "fused" else {"rms": _rms, "ln": _ln}[op](impl, N)


def _param_slice(op):
    """Positions of the parameters (weight, bias) among the inputs."""
    return slice(1, 3) if op == "ln" else slice(2, 3) if op == "fused" else slice(1, 2)


# (op, M, N, input dtype, residual dtype for fused, threads, seeds). N = 1 runs several
# seeds: with one column a single draw of each error decides, and two draws of the same
# size differ by more than 2x about a third of the time.
CASES = [
    ("rms", 262144, 16, torch.float32, None, 1, 1),
    ("rms", 262144, 16, torch.bfloat16, None, 7, 1),
    ("rms", 65536, 64, torch.float32, None, 3, 1),
    ("rms", 65536, 64, torch.float16, None, 4, 1),
    ("rms", 16384, 1024, torch.float32, None, 4, 1),
    ("rms", 1024, 16384, torch.bfloat16, None, 7, 1),
    ("rms", 262144, 1, torch.float32, None, 3, 4),
    ("rms", 262144, 1, torch.bfloat16, None, 4, 2),
    ("ln", 262144, 16, torch.float32, None, 4, 1),
    ("ln", 262144, 16, torch.bfloat16, None, 3, 1),
    ("ln", 65536, 64, torch.float32, None, 7, 1),
    ("ln", 65536, 64, torch.float16, None, 1, 1),
    ("ln", 16384, 1024, torch.bfloat16, None, 7, 1),
    ("ln", 1024, 16384, torch.float32, None, 1, 1),
    ("ln", 262144, 1, torch.float32, None, 7, 4),
    ("fused", 262144, 16, torch.float32, torch.float32, 3, 1),
    ("fused", 65536, 64, torch.bfloat16, torch.float32, 7, 1),
    ("fused", 16384, 1024, torch.bfloat16, torch.bfloat16, 4, 1),
    ("fused", 262144, 1, torch.float32, torch.float32, 1, 4),
]


def _case_id(c):
    op, M, N, dt, rdt, t, _ = c
    r = f"-r{str(rdt)[6:]}" if rdt is not None else ""
    return f"{op}-{M}x{N}-{str(dt)[6:]}{r}-t{t}"


def _param_ref(op, inputs, gouts, rdtype):
    """float64 dweight (and dbias): sums over rows of dy * xhat (and dy)."""
    x, dy = inputs[0].double(), gouts[0].double()
    if op == "fused":  # normalizes x + r as stored (rounded to the residual dtype)
        x = (x + inputs[1].double()).to(rdtype).double()
    if op == "ln":
        m = x.mean(-1, keepdim=True)
        xhat = (x - m) * torch.rsqrt((x - m).pow(2).mean(-1, keepdim=True) + EPS)
        return (dy * xhat).sum(0), dy.sum(0)
    return ((dy * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).sum(0),)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_param_grads_vs_float64(case):
    op, M, N, dtype, rdtype, threads, seeds = case
    psl = _param_slice(op)
    worst_ours, worst_best = [0.0] * 2, [0.0] * 2
    for seed in range(seeds):
        inputs, gouts = _make(op, M, N, dtype, rdtype, seed)
        with num_threads(threads):
            ours = _grads(_fn(op, "ours", N, rdtype), inputs, gouts)
            again = _grads(_fn(op, "ours", N, rdtype), inputs, gouts)
        for a, b in zip(ours, again):
            assert torch.equal(a, b), f"not bitwise reproducible at {threads} threads"
        ref = _param_ref(op, inputs, gouts, rdtype)
        baselines = [
            _grads(_fn(op, "torch", N, rdtype), inputs, gouts),                      # same dtypes
            _grads(_fn(op, "torch", N, rdtype), [t.float() for t in inputs],         # fp32 upcast
                   [g.float() for g in gouts]),
            _grads(_fn(op, "composite", N, rdtype), [t.float() for t in inputs],     # cascade sums
                   [g.float() for g in gouts]),
        ]
        for k, (o, r) in enumerate(zip(ours[psl], ref)):
            assert o.dtype == torch.float32
            worst_ours[k] = max(worst_ours[k], _err(o, r))
            worst_best[k] = max(worst_best[k], min(_err(b[psl][k], r) for b in baselines))
    for k, name in enumerate(["dweight", "dbias"][: psl.stop - psl.start]):
        assert worst_ours[k] <= 2 * worst_best[k], (
            f"{name}: error {worst_ours[k]:.3e} > 2 x best torch {worst_best[k]:.3e}")


# ----------------------------------------------- exact sums: every row counted once

@pytest.mark.parametrize("threads", [1, 3, 4, 7])
def test_param_grads_exact_integer_sums(threads):
    """With x = +-1 and eps = 0, rstd = 1 and xhat = x exactly, and with small integer dy
    every partial sum is an integer below 2^24: any summation order is exact, so the
    result must equal the float64 sum exactly. A row, block or chunk dropped or counted
    twice shows as an error of at least 1, whatever the tree's shape."""
    g = torch.Generator().manual_seed(threads)
    for M, N in ((100003, 1), (20011, 16), (1031, 1031)):
        x = (torch.randint(0, 2, (M, N), generator=g) * 2 - 1).float()
        if N > 1:
            x[:, 1] = -x[:, 0]  # no constant rows: LayerNorm's variance is never 0
        dy = torch.randint(-8, 9, (M, N), generator=g).float()
        r = torch.zeros(M, N)
        w, b = torch.randn(N), torch.randn(N)
        dw_ref = (dy.double() * x.double()).sum(0)
        db_ref = dy.double().sum(0)
        with num_threads(threads):
            (dw,) = _grads(lambda w_: rmsnorm_ext.rms_norm(x, (N,), w_, 0.0), [w], dy)
            assert torch.equal(dw.double(), dw_ref), f"rms_norm [{M},{N}]"
            lw, lb = _grads(lambda w_, b_: rmsnorm_ext.layer_norm(x, (N,), w_, b_, 0.0),
                            [w, b], dy)
            assert torch.equal(lb.double(), db_ref), f"layer_norm dbias [{M},{N}]"
            if N > 1:  # N = 1: xhat = 0
                # xhat = (x - mean) * rstd is not exact here; the bias sum above is.
                assert (lw.double() - (dy.double() * F.layer_norm(
                    x.double(), (N,), eps=0.0)).sum(0)).abs().max() < 1e-2
            (fw,) = _grads(lambda w_: rmsnorm_ext.fused_add_rms_norm(x, r, (N,), w_, 0.0)[0],
                           [w], dy)
            assert torch.equal(fw.double(), dw_ref), f"fused_add_rms_norm [{M},{N}]"


# ------------------------------------------------------------- Gemma's weight offset

def _gemma_bar(ref):
    # One bf16 rounding of each output element: half an ulp of the reference value
    # (bf16 has 8 significant bits, so 2^(e - 9) for |ref| in [2^(e-1), 2^e)), plus the
    # fp32 arithmetic before it, well below that (2^-16 of the largest element).
    _, e = torch.frexp(ref)
    return torch.ldexp(torch.ones_like(ref), e - 9) + 2.0 ** -16 * ref.abs().max()


def test_gemma_offset_vs_fp32_one_plus_w():
    """y = x * rstd * (1 + w) with 1 + w formed in fp32 from a bf16 weight near 0, as Gemma
    stores it. The reference takes that fp32 1 + w to float64; the bar is fixed (one bf16
    rounding of the output), and it is checked to reject the lossy way (1 + w rounded to
    bf16), so the test can tell the two apart."""
    M, N = 64, 2048
    x = torch.randn(M, N).to(torch.bfloat16)
    w = (torch.randn(N) * 1e-2).to(torch.bfloat16)
    w_eff = (1.0 + w.float()).double()  # fp32 1 + w, then exact in float64
    x64 = x.double()
    xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    ref = xhat * w_eff
    y = rmsnorm_ext.rms_norm(x, (N,), w, EPS, weight_offset=1.0)
    assert ((y.double() - ref).abs() <= _gemma_bar(ref)).all()
    lossy = rmsnorm_ext.rms_norm(x, (N,), (1.0 + w).to(torch.bfloat16), EPS)
    assert not ((lossy.double() - ref).abs() <= _gemma_bar(ref)).all(), "bar too loose"

    # Backward: dx uses g = dy * (1 + w) in fp32.
    dy = torch.randn(M, N).to(torch.bfloat16)
    dx, dw = _grads(lambda a, b: rmsnorm_ext.rms_norm(a, (N,), b, EPS, weight_offset=1.0),
                    [x, w], dy)
    g = dy.double() * w_eff
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    dx_ref = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    assert ((dx.double() - dx_ref).abs() <= _gemma_bar(dx_ref)).all()
    dx_lossy, _ = _grads(lambda a, b: rmsnorm_ext.rms_norm(a, (N,), b, EPS),
                         [x, (1.0 + w).to(torch.bfloat16)], dy)
    assert not ((dx_lossy.double() - dx_ref).abs() <= _gemma_bar(dx_ref)).all()
    # dweight (bf16, the weight's dtype) = sum(dy * xhat): the offset does not enter it.
    dw_ref = (dy.double() * xhat).sum(0)
    assert ((dw.double() - dw_ref).abs() <= _gemma_bar(dw_ref)).all()

    # The fused form adds the offset the same way.
    r = torch.randn(M, N)
    yf, _ = rmsnorm_ext.fused_add_rms_norm(x, r, (N,), w, EPS, weight_offset=1.0)
    h64 = (x.float() + r).double()
    ref_f = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + EPS) * w_eff
    assert ((yf.double() - ref_f).abs() <= _gemma_bar(ref_f)).all()


# ------------------------------------------------- LayerNorm rows with |mean| >> std

@pytest.mark.parametrize("threads", [1, 3])
def test_layer_norm_large_mean_fixed_bar(threads):
    """Rows 1e4 + N(0, 1): the output depends on x - mean, so an error in the mean is
    multiplied by rstd ~ 1. The fixed bar: half an ulp of the mean as stored in fp32 (the
    mean's unavoidable rounding; x - mean is then exact, by Sterbenz) times rstd, plus a
    few fp32 roundings of the output. A mean that is off by a few ulps (a plain two-pass
    sum without the correction) exceeds it."""
    M, N = 64, 16384
    g = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(M, N, generator=g)
    dy = torch.randn(M, N, generator=g)
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x64 - mean).pow(2).mean(-1, keepdim=True) + EPS)
    xhat = (x64 - mean) * rstd
    half_ulp = 2.0 ** (math.floor(math.log2(1e4)) - 24)  # half an fp32 ulp at 1e4
    with num_threads(threads):
        y = rmsnorm_ext.layer_norm(x, (N,), None, None, EPS)
        (dx,) = _grads(lambda a: rmsnorm_ext.layer_norm(a, (N,), None, None, EPS), [x], dy)
    bar_y = half_ulp * rstd.max().item() + 4 * 2.0 ** -24 * xhat.abs().max().item()
    err_y = _err(y, xhat)
    assert err_y <= bar_y, f"forward: {err_y:.3e} > {bar_y:.3e}"
    # dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)). A mean off by d moves xhat
    # by e = d * rstd and so dx by rstd * e * (|mean(dy * xhat)| + |xhat| |mean(dy)|),
    # to first order; d is the same half ulp, plus a few fp32 roundings of dx.
    dy64 = dy.double()
    c1, c2 = dy64.mean(-1, keepdim=True), (dy64 * xhat).mean(-1, keepdim=True)
    dx_ref = rstd * (dy64 - c1 - xhat * c2)
    e = half_ulp * rstd
    bar_dx = (rstd * e * (c2.abs() + xhat.abs().amax(-1, keepdim=True) * c1.abs())).max().item()
    bar_dx += 8 * 2.0 ** -24 * dx_ref.abs().max().item()
    err_dx = _err(dx, dx_ref)
    assert err_dx <= bar_dx, f"backward: {err_dx:.3e} > {bar_dx:.3e}"


# -------------------------------------------- fused add, every output against float64

@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16)])
def test_fused_add_vs_float64(dtype, rdtype):
    """Outputs and all three gradients of fused_add_rms_norm against float64, each within
    2x torch's error for the unfused add-then-F.rms_norm in the same dtypes (plus two
    roundings of the output, where torch's error can be ~0) - not against our own
    rms_norm, which would share any defect."""
    from reference import assert_accurate

    M, N, off = 512, 1000, 0.5
    (x, r, w), (gy, gh) = _make("fused", M, N, dtype, rdtype, 3)
    w = w * 0.1
    # The definition: the float64 sum (exact here) rounded once to the residual dtype.
    h_stored = (x.double() + r.double()).to(rdtype).double()

    def ref_fn(a, b, c):
        h = a + b
        h = h + (h.to(rdtype).double() - h).detach()  # rounded as stored, exact derivative
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * (c + off)
        return y, h

    def torch_fn(a, b, c):
        h = a.to(rdtype) + b
        y = F.rms_norm(h, (N,), c + off, EPS).to(dtype)
        return y, h

    ours_fn = lambda a, b, c: rmsnorm_ext.fused_add_rms_norm(a, b, (N,), c, EPS,  # noqa: E731
                                                              weight_offset=off)
    y, h = ours_fn(x, r, w)
    assert y.dtype == dtype and h.dtype == rdtype
    assert torch.equal(h.double(), h_stored), "residual_out is not x + r rounded once"
    y_ref, _ = ref_fn(x.double(), r.double(), w.double())
    y_t, _ = torch_fn(x, r, w)
    assert_accurate(y, y_ref, y_t, dtype=dtype, what="fused y")

    ours = _grads(ours_fn, [x, r, w], (gy, gh))
    ref = _grads(ref_fn, [x.double(), r.double(), w.double()], (gy.double(), gh.double()))
    tg = _grads(torch_fn, [x, r, w], (gy, gh))
    for name, o, rf, t in zip(["dx", "dresidual", "dweight"], ours, ref, tg):
        assert_accurate(o, rf, t, dtype=o.dtype, what=f"fused {name}")
    assert torch.equal(ours[0].double(), ours[1].double()) or dtype != rdtype


# ------------------------------------- RMSNorm backward at extreme scales (eps = 0)

@pytest.mark.parametrize("scale", [3e-20, 1e15])
def test_rms_norm_backward_extreme_scale(scale):
    """rms ~ 3e-20 with eps = 0: rstd ~ 3e19, so rstd^2 overflows fp32 (> 3.4e38) and a
    backward that forms rstd * rstd * mean(g * x) returns inf/NaN. rms ~ 1e15: rstd^3
    underflows. The kernel forms c = rstd * mean(g * x) and dx = rstd * (g - xhat * c),
    whose intermediates are O(|dx|). Bar: relative to the largest element; loose at the
    small scale, where the forward's squares (~1e-39) are fp32 subnormals with fewer bits."""
    M, N = 8, 512
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, N, generator=g) * scale
    dy = torch.randn(M, N, generator=g)
    w = torch.randn(N, generator=g)
    dx, dw = _grads(lambda a, b: rmsnorm_ext.rms_norm(a, (N,), b, 0.0), [x, w], dy)
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True))
    xhat, gw = x64 * rstd, dy.double() * w.double()
    dx_ref = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw_ref = (dy.double() * xhat).sum(0)
    rel = 1e-4 if scale < 1 else 1e-5
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert _err(dx, dx_ref) <= rel * dx_ref.abs().max().item()
    assert _err(dw, dw_ref) <= rel * dw_ref.abs().max().item()
