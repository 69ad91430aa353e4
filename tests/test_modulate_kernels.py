"""adaLN modulation kernels on CPU, through the ops themselves (csrc/host/norm_modulate.cpp):
rms_norm_modulate_fwd, layer_norm_modulate_fwd and norm_modulate_bwd against the float64
composite norm(x) * (1 + scale) + shift and torch.autograd on it (tests/reference.py).

The bar (assert_accurate): our error against float64 is at most 2x torch's own error for the
same composite in the input dtype plus a couple of rounding steps of the result; for the sums
over rows (dscale, dshift, dweight, dbias) a rounding step is taken of the sum of the terms'
magnitudes. Also: the per-sample sums over long sequences and across thread counts (samples
cut by the CPU's row chunks), determinism, non-contiguous operands, empty sizes, and every
bad input, with the same exception type and message on meta tensors as on CPU.
"""
import re

import pytest
import torch

import rmsnorm_ext  # noqa: F401  (loads the ops)
from reference import assert_accurate, modulate_reference, modulation_view

ops = torch.ops.rmsnorm_ext
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
F32, F64, BF16, F16, I32 = torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32
EPS = 1e-5
GRADS = ("dx", "dscale", "dshift", "dweight", "dbias")


def run_ours(kind, x, scale, shift, w, b, eps, dy, flags=(True, True, True, True)):
    """Forward and backward ops: (y, mean, rstd, dict of the five gradients)."""
    d = x.shape[-1]
    if kind == "rms":
        assert b is None
        y, rstd = ops.rms_norm_modulate_fwd(x, [d], scale, shift, w, eps)
        mean = None
    else:
        y, mean, rstd = ops.layer_norm_modulate_fwd(x, [d], scale, shift, w, b, eps)
    grads = ops.norm_modulate_bwd(dy, x, mean, rstd, scale, w, b, [d], flags[0],
                                  flags[1] and shift is not None, flags[2], flags[3])
    return y, mean, rstd, dict(zip(GRADS, grads))


def run_composite(kind, x, scale, shift, w, b, eps, dy, dtype):
    """The composite and its autograd gradients, every operand cast to dtype."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_()
              for t in (x, scale, shift, w, b)]
    y = modulate_reference(*leaves, eps, kind, dtype=dtype)
    given = [t for t in leaves if t is not None]
    gs = iter(torch.autograd.grad(y, given, dy.to(dtype)))
    return y.detach(), {n: (None if t is None else next(gs)) for n, t in zip(GRADS, leaves)}


def sum_scales(kind, x, scale, w, b, eps, dy):
    """The magnitude one rounding step of each gradient is taken of (float64): for the sums
    over rows the largest sum of |terms|; for dx the largest rstd * |g| (g = dy * m * w), the
    size of the terms that cancel in rstd * (g - mean(g) - xhat * mean(g * xhat)) -- e.g. to
    eps / (x^2 + eps) of it for RMSNorm over D = 1."""
    d = x.shape[-1]
    if x.numel() == 0:
        return {n: 0.0 for n in GRADS}
    zero = torch.zeros_like(scale, dtype=F64)
    yn = modulate_reference(x, zero, None, w, b, eps, kind)         # the norm's output
    xhat = modulate_reference(x, zero, None, None, None, eps, kind)  # before weight and bias
    m = (1 + modulation_view(scale.double(), x)).abs()
    ady = dy.double().abs()
    bs = scale.shape[0] if scale.dim() >= 2 else 1

    def per_sample(t):
        return t.reshape(bs, -1, d).sum(1).max().item()

    def over_rows(t):
        return t.reshape(-1, d).sum(0).max().item()

    _, rstd = stats_ref(kind, x, eps)
    g = ady * m * (1.0 if w is None else w.double().abs())
    return {"dx": (rstd.unsqueeze(-1) * g).max().item(),
            "dscale": per_sample(ady * yn.abs()), "dshift": per_sample(ady),
            "dweight": over_rows(ady * m * xhat.abs()), "dbias": over_rows(ady * m)}


def stats_ref(kind, x, eps):
    xd = x.double()
    if kind == "rms":
        return None, 1.0 / torch.sqrt(xd.pow(2).mean(-1) + eps)
    mean = xd.mean(-1)
    var = (xd - mean.unsqueeze(-1)).pow(2).mean(-1)
    return mean, 1.0 / torch.sqrt(var + eps)


def check(kind, x, scale, shift=None, w=None, b=None, eps=EPS, dy=None, what=""):
    """Forward and backward against float64, at torch's accuracy in the input dtype."""
    dy = torch.randn(x.shape, device=x.device).to(x.dtype) if dy is None else dy
    y, mean, rstd, g = run_ours(kind, x, scale, shift, w, b, eps, dy)
    y_ref, g_ref = run_composite(kind, x, scale, shift, w, b, eps, dy, F64)
    y_t, g_t = run_composite(kind, x, scale, shift, w, b, eps, dy, x.dtype)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_accurate(y, y_ref, y_t, dtype=x.dtype, what=f"{what} y")
    mean_r, rstd_r = stats_ref(kind, x, eps)
    stat_dtype = F64 if x.dtype == F64 else F32
    rtol = 1e-12 if x.dtype == F64 else 1e-5
    assert rstd.dtype == stat_dtype and rstd.shape == x.shape[:-1]
    torch.testing.assert_close(rstd.double(), rstd_r, rtol=rtol, atol=0)
    if kind == "layer":
        assert mean.dtype == stat_dtype and mean.shape == x.shape[:-1]
        torch.testing.assert_close(mean.double(), mean_r, rtol=rtol,
                                   atol=rtol * float(x.double().abs().max()))

    scales = sum_scales(kind, x, scale, w, b, eps, dy)
    assert_accurate(g["dx"], g_ref["dx"], g_t["dx"], dtype=x.dtype, what=f"{what} dx",
                    scale=max(scales["dx"], g_ref["dx"].abs().max().item()))
    for name, param in (("dscale", scale), ("dshift", shift), ("dweight", w), ("dbias", b)):
        ours = g[name]
        if param is None:
            assert ours.numel() == 0, f"{what} {name}: given without its parameter"
            continue
        # dshift has scale's shape (shift's may differ in its middle dims of size 1).
        shape = scale.shape if name == "dshift" else param.shape
        assert ours.dtype == param.dtype and ours.shape == shape, (what, name, ours.shape)
        assert_accurate(ours, g_ref[name].reshape(shape), g_t[name].reshape(shape),
                        dtype=param.dtype, scale=scales[name], what=f"{what} {name}")
    return y, g


# ---------------------------------------------------------------------------------------
# The matrix: norm x dtypes x scale layouts x row lengths

# name: (input dtype, scale/shift dtype, weight/bias dtype)
DTYPES = {
    "f32": (F32, F32, F32),
    "f64": (F64, F64, F64),
    "bf16": (BF16, BF16, BF16),
    "f16": (F16, F16, F16),
    "bf16+f32": (BF16, F32, F32),
    "f16+f32scale": (F16, F32, F16),
    "bf16+f32params": (BF16, BF16, F32),
}

# name: (input shape, scale shape) as functions of D
LAYOUTS = {
    "BSD/BD": lambda d: ((3, 5, d), (3, d)),
    "BSD/B1D": lambda d: ((3, 5, d), (3, 1, d)),
    "BSD/1D": lambda d: ((3, 5, d), (1, d)),
    "BSD/D": lambda d: ((3, 5, d), (d,)),
    "BSD/11D": lambda d: ((3, 5, d), (1, 1, d)),
    "BD/BD": lambda d: ((6, d), (6, d)),
    "BD/D": lambda d: ((6, d), (d,)),
    "BTHD/BD": lambda d: ((2, 3, 4, d), (2, d)),
    "BTHD/B11D": lambda d: ((2, 3, 4, d), (2, 1, 1, d)),
    "BTHD/1D": lambda d: ((2, 3, 4, d), (1, d)),
    "1SD/1D": lambda d: ((1, 5, d), (1, d)),
}


def make(x_shape, s_shape, dts, shift=True, weight=True, bias=True, kind="layer", device="cpu"):
    xt, st, wt = dts
    d = x_shape[-1]
    x = (torch.randn(x_shape) * 2 + 0.5).to(device, xt)
    scale = (torch.randn(s_shape) * 0.5).to(device, st)
    sh = torch.randn(s_shape).to(device, st) if shift else None
    w = (1 + 0.5 * torch.randn(d)).to(device, wt) if weight else None
    b = torch.randn(d).to(device, wt) if bias and kind == "layer" else None
    return x, scale, sh, w, b


@pytest.mark.parametrize("d", [1, 7, 64, 257])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dts", sorted(DTYPES))
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_matches_float64(kind, dts, layout, d):
    x_shape, s_shape = LAYOUTS[layout](d)
    x, scale, sh, w, b = make(x_shape, s_shape, DTYPES[dts], kind=kind)
    check(kind, x, scale, sh, w, b, what=f"{kind} {dts} {layout} D={d}")


@needs_cuda
@pytest.mark.parametrize("d", [1, 7, 64, 257, 4096])
@pytest.mark.parametrize("layout", ["BSD/BD", "BSD/1D", "BD/BD", "BTHD/B11D"])
@pytest.mark.parametrize("dts", sorted(DTYPES))
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_cuda_matches_float64(kind, dts, layout, d):
    x_shape, s_shape = LAYOUTS[layout](d)
    x, scale, sh, w, b = make(x_shape, s_shape, DTYPES[dts], kind=kind, device="cuda")
    check(kind, x, scale, sh, w, b, what=f"cuda {kind} {dts} {layout} D={d}")


@needs_cuda
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_cuda_matches_cpu_without_optional_operands(kind):
    """The CUDA kernels' branches for absent shift / weight / bias, against the CPU's."""
    for shift, weight, bias in [(False, False, False), (True, False, True), (False, True, False)]:
        x, scale, sh, w, b = make((3, 50, 96), (3, 1, 96), DTYPES["f32"], shift, weight, bias,
                                  kind)
        dy = torch.randn_like(x)
        cpu = run_ours(kind, x, scale, sh, w, b, EPS, dy)
        dev = [None if t is None else t.cuda() for t in (x, scale, sh, w, b, dy)]
        gpu = run_ours(kind, *dev[:5], EPS, dev[5])
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
        for name in GRADS:
            torch.testing.assert_close(gpu[3][name].cpu(), cpu[3][name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dts", ["f32", "bf16", "bf16+f32"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_optional_operands(kind, dts, shift, weight, bias):
    if kind == "rms" and bias:
        pytest.skip("RMSNorm has no bias")
    x, scale, sh, w, b = make((4, 9, 40), (4, 40), DTYPES[dts], shift, weight, bias, kind)
    check(kind, x, scale, sh, w, b, what=f"{kind} {dts}")


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_eps_zero_and_large_magnitudes(kind):
    x, scale, sh, w, b = make((2, 6, 48), (2, 1, 48), DTYPES["f32"], kind=kind)
    check(kind, x * 1e4 + 3e4, scale, sh, w, b, eps=0.0, what="large")
    check(kind, x * 1e-4, scale, sh, w, b, eps=0.0, what="small")


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gradient_flags(kind):
    """Each flag off (or its parameter absent) gives an empty tensor; the others are unchanged."""
    x, scale, sh, w, b = make((3, 7, 24), (3, 24), DTYPES["f32"], kind=kind)
    dy = torch.randn_like(x)
    _, _, _, full = run_ours(kind, x, scale, sh, w, b, EPS, dy)
    for off in range(4):
        flags = tuple(i != off for i in range(4))
        _, _, _, g = run_ours(kind, x, scale, sh, w, b, EPS, dy, flags)
        for i, name in enumerate(GRADS):
            if i > 0 and not flags[i - 1] or name == "dbias" and b is None:
                assert g[name].shape == (0,), (off, name)
            else:
                assert torch.equal(g[name], full[name]), (off, name)
    # Parameters absent: their gradients are empty whatever the flags say.
    _, _, _, g = run_ours(kind, x, scale, None, None, None, EPS, dy)
    assert [g[n].shape for n in GRADS[2:]] == [(0,)] * 3
    # No gradient wanted but dx.
    _, _, _, g = run_ours(kind, x, scale, sh, w, b, EPS, dy, (False,) * 4)
    assert [g[n].shape for n in GRADS[1:]] == [(0,)] * 4
    assert torch.equal(g["dx"], full["dx"])


# ---------------------------------------------------------------------------------------
# Sums over rows: long sequences, samples cut by the row chunks of several threads,
# determinism


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_long_sequence_sums(kind, dtype, device):
    """B = 2 samples of S = 40000 rows: dscale / dshift (and dweight / dbias) against float64
    at each thread count (CPU: 3 and 5 threads cut a sample between chunks, 5 across three),
    and bitwise the same on a second call."""
    torch.manual_seed(3)
    x, scale, sh, w, b = make((2, 40000, 64), (2, 64), (dtype, dtype, dtype), kind=kind,
                              device=device)
    dy = torch.randn(x.shape, device=device).to(dtype)
    y_ref, g_ref = run_composite(kind, x, scale, sh, w, b, EPS, dy, F64)
    y_t, g_t = run_composite(kind, x, scale, sh, w, b, EPS, dy, dtype)
    scales = sum_scales(kind, x, scale, w, b, EPS, dy)
    for threads in ((1, 2, 3, 5) if device == "cpu" else (torch.get_num_threads(),)):
        def call():
            return run_ours(kind, x, scale, sh, w, b, EPS, dy)
        y, _, _, g = _with_threads(threads, call)
        _, _, _, g2 = _with_threads(threads, call)
        for name in GRADS:
            assert torch.equal(g[name], g2[name]), f"{name}: not deterministic ({threads} threads)"
        assert_accurate(y, y_ref, y_t, what=f"y {threads} threads")
        for name in GRADS[1:]:
            if g_ref[name] is None:
                continue
            assert_accurate(g[name], g_ref[name], g_t[name], scale=scales[name],
                            what=f"{name} ({threads} threads)")
        # Tighter than the bar: the cascaded fp32 sums stay within ~100 fp32 rounding steps
        # of a single term scale (a running sum over 40000 rows would not).
        for name in ("dscale", "dshift"):
            err = (g[name].double() - g_ref[name]).abs().max().item()
            if dtype == F32:
                assert err <= 1e-5 * scales[name], (name, threads, err, scales[name])


@pytest.mark.parametrize("shape", [(700, 13, 64), (3, 1001, 64), (4096, 1, 48), (5, 2000, 7)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_sums_across_thread_counts(kind, shape):
    """Chunk boundaries inside samples (and samples of one row): every thread count gives an
    accurate, deterministic result."""
    torch.manual_seed(4)
    x_shape = shape if shape[1] > 1 else (shape[0], shape[2])
    x, scale, sh, w, b = make(x_shape, (shape[0], shape[2]), DTYPES["f32"], kind=kind)
    dy = torch.randn_like(x)
    _, g_ref = run_composite(kind, x, scale, sh, w, b, EPS, dy, F64)
    _, g_t = run_composite(kind, x, scale, sh, w, b, EPS, dy, F32)
    scales = sum_scales(kind, x, scale, w, b, EPS, dy)
    for threads in (1, 2, 3, 5, 8):
        def call():
            return run_ours(kind, x, scale, sh, w, b, EPS, dy)
        _, _, _, g = _with_threads(threads, call)
        _, _, _, g2 = _with_threads(threads, call)
        for name in GRADS[1:]:
            if g_ref[name] is None:
                continue
            assert torch.equal(g[name], g2[name]), (name, threads)
            assert_accurate(g[name], g_ref[name], g_t[name], scale=scales[name],
                            what=f"{name} ({threads} threads)")


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_nan_stays_in_its_sample(kind):
    """A NaN in one row of sample 0: sample 1's y, dx, dscale and dshift stay finite."""
    x, scale, sh, w, b = make((2, 300, 32), (2, 32), DTYPES["f32"], kind=kind)
    x[0, 17, 5] = float("nan")
    dy = torch.randn_like(x)
    y, _, _, g = run_ours(kind, x, scale, sh, w, b, EPS, dy)
    assert y[0, 17].isnan().all() and torch.isfinite(y[1]).all()
    assert torch.isfinite(g["dx"][1]).all() and torch.isfinite(g["dx"][0, :17]).all()
    for name in ("dscale", "dshift"):
        assert torch.isfinite(g[name][1]).all(), name
    assert g["dscale"][0].isnan().any()


# ---------------------------------------------------------------------------------------
# Layouts: non-contiguous operands, empty sizes


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_non_contiguous(kind, dtype):
    """A transposed input, scale / shift chunks of one embedding (as DiT, Flux, SD3 slice
    them), strided parameters and a transposed grad_out give the contiguous results."""
    B, S, D = 3, 10, 24
    x = torch.randn(B, D, S).to(dtype).transpose(1, 2)
    emb = torch.randn(B, 3 * D).to(dtype)
    shift, scale, _ = emb.chunk(3, dim=1)
    scale3 = scale.unsqueeze(1)  # [B, 1, D], non-contiguous
    pw = torch.randn(2 * D).to(dtype)
    w = pw[::2]
    b = pw[1::2] if kind == "layer" else None
    dy = torch.randn(B, D, S).to(dtype).transpose(1, 2)
    assert not (x.is_contiguous() or scale.is_contiguous() or w.is_contiguous()
                or dy.is_contiguous())
    for s in (scale, scale3):
        y, _, _, g = run_ours(kind, x, s, shift, w, b, EPS, dy)
        cb = None if b is None else b.contiguous()
        y_c, _, _, g_c = run_ours(kind, x.contiguous(), s.contiguous(), shift.contiguous(),
                                  w.contiguous(), cb, EPS, dy.contiguous())
        assert torch.equal(y, y_c)
        for name in GRADS:
            assert torch.equal(g[name], g_c[name]), name
        assert g["dscale"].shape == s.shape
        check(kind, x, s, shift, w, b, dy=dy, what="non-contiguous")


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("x_shape,s_shape", [((0, 5, 8), (0, 8)), ((0, 5, 8), (1, 8)),
                                             ((3, 0, 8), (3, 8)), ((3, 0, 8), (8,)),
                                             ((3, 5, 0), (3, 0)), ((0, 8), (0, 8))])
def test_empty(kind, x_shape, s_shape):
    """No kernel runs: empty outputs, NaN statistics of zero-length rows, zero sums."""
    x, scale, sh, w, b = make(x_shape, s_shape, DTYPES["f32"], kind=kind)
    dy = torch.randn(x_shape)
    y, mean, rstd, g = run_ours(kind, x, scale, sh, w, b, EPS, dy)
    assert y.shape == x.shape and rstd.shape == x.shape[:-1]
    if x_shape[-1] == 0:
        assert rstd.isnan().all()
    assert g["dx"].shape == x.shape
    for name, p in (("dscale", scale), ("dshift", sh), ("dweight", w), ("dbias", b)):
        if p is None:
            continue
        assert g[name].shape == p.shape and g[name].dtype == p.dtype
        assert (g[name] == 0).all(), name


# ---------------------------------------------------------------------------------------
# Bad inputs: the same exception type and message on CPU and on meta tensors


def _t(dev, *shape, dtype=F32):
    return torch.ones(*shape, dtype=dtype, device=dev)


def _other(dev):
    return "meta" if dev == "cpu" else "cpu"


DEVICES = ["cpu", "meta"] + (["cuda"] if HAS_CUDA else [])


def _rms(d, x=None, scale=None, shift=None, w=None, ns=None, eps=EPS):
    x = _t(d, 2, 3, 8) if x is None else x
    scale = _t(d, 2, 8) if scale is None else scale
    ns = [x.shape[-1]] if ns is None else ns
    return ops.rms_norm_modulate_fwd(x, ns, scale, shift, w, eps)


def _ln(d, x=None, scale=None, shift=None, w=None, b=None, ns=None, eps=EPS):
    x = _t(d, 2, 3, 8) if x is None else x
    scale = _t(d, 2, 8) if scale is None else scale
    ns = [x.shape[-1]] if ns is None else ns
    return ops.layer_norm_modulate_fwd(x, ns, scale, shift, w, b, eps)


def _bwd(d, g=None, x=None, mean="ln", rstd=None, scale=None, w=None, b=None, ns=None):
    x = _t(d, 2, 3, 8) if x is None else x
    g = _t(d, 2, 3, 8) if g is None else g
    mean = _t(d, 2, 3) if isinstance(mean, str) else mean
    rstd = _t(d, 2, 3) if rstd is None else rstd
    scale = _t(d, 2, 8) if scale is None else scale
    ns = [x.shape[-1]] if ns is None else ns
    return ops.norm_modulate_bwd(g, x, mean, rstd, scale, w, b, ns, True, True, True, True)


# name: (call(device), exception type, message pattern)
BAD = {
    # forward: input and normalized_shape
    "int input": (lambda d: _rms(d, x=_t(d, 2, 3, 8, dtype=I32)), TypeError,
                  r"input must be float32, float64, bfloat16 or float16, got torch.int32"),
    "shape mismatch": (lambda d: _ln(d, ns=[4]), ValueError,
                       r"normalized_shape \[4\] does not match the input's trailing"),
    "shape of two dims": (lambda d: _rms(d, ns=[3, 8]), ValueError,
                          r"rms_norm_modulate_fwd: normalized_shape must have exactly one "
                          r"dimension"),
    "1-D input": (lambda d: _ln(d, x=_t(d, 8), scale=_t(d, 8)), ValueError,
                  r"layer_norm_modulate_fwd: input must have a batch dimension"),
    # forward: scale and shift layouts
    "scale D wrong": (lambda d: _rms(d, scale=_t(d, 2, 7)), ValueError,
                      r"scale of shape \[2, 7\] does not fit the input of shape \[2, 3, 8\]"),
    "scale B wrong": (lambda d: _ln(d, scale=_t(d, 3, 8)), ValueError,
                      r"scale of shape \[3, 8\] does not fit .* B = 2"),
    "scale middle not 1": (lambda d: _rms(d, scale=_t(d, 2, 3, 8)), ValueError,
                           r"scale of shape \[2, 3, 8\] does not fit"),
    "scale too many dims": (lambda d: _rms(d, scale=_t(d, 2, 1, 1, 8)), ValueError,
                            r"scale of shape \[2, 1, 1, 8\] does not fit .* at most 3 dims"),
    "scale 0-d": (lambda d: _ln(d, scale=torch.ones((), device=d)), ValueError,
                  r"scale of shape \[\] does not fit"),
    "scale [B, D] on [B, D'] input": (lambda d: _rms(d, x=_t(d, 2, 8), scale=_t(d, 1, 2, 8)),
                                      ValueError, r"scale of shape \[1, 2, 8\] does not fit"),
    "shift shape": (lambda d: _ln(d, shift=_t(d, 2, 9)), ValueError,
                    r"shift of shape \[2, 9\] does not fit"),
    "shift shared, scale per sample": (lambda d: _rms(d, shift=_t(d, 8)), ValueError,
                                       r"scale of shape \[2, 8\] and shift of shape \[8\] must "
                                       r"both hold one vector per sample"),
    "scale dtype f64": (lambda d: _rms(d, scale=_t(d, 2, 8, dtype=F64)), TypeError,
                        r"scale dtype torch.float64 is not supported with input dtype "
                        r"torch.float32"),
    "scale bf16, input f32": (lambda d: _ln(d, scale=_t(d, 2, 8, dtype=BF16)), TypeError,
                              r"scale dtype torch.bfloat16 is not supported"),
    "scale f16, input bf16": (lambda d: _ln(d, x=_t(d, 2, 3, 8, dtype=BF16),
                                            scale=_t(d, 2, 8, dtype=F16)), TypeError,
                              r"scale dtype torch.float16 is not supported with input dtype "
                              r"torch.bfloat16"),
    "shift dtype": (lambda d: _ln(d, x=_t(d, 2, 3, 8, dtype=BF16),
                                  scale=_t(d, 2, 8, dtype=BF16), shift=_t(d, 2, 8)), TypeError,
                    r"scale dtype torch.bfloat16 and shift dtype torch.float32 must match"),
    "scale device": (lambda d: _rms(d, scale=_t(_other(d), 2, 8)), RuntimeError,
                     r"scale is on \w+ but the input is on \w+"),
    "shift device": (lambda d: _ln(d, shift=_t(_other(d), 2, 8)), RuntimeError,
                     r"shift is on \w+ but the input is on \w+"),
    # forward: parameters, eps
    "weight shape": (lambda d: _rms(d, w=_t(d, 7)), ValueError,
                     r"weight must have shape normalized_shape \[8\], got \[7\]"),
    "weight dtype": (lambda d: _ln(d, w=_t(d, 8, dtype=F64)), TypeError,
                     r"weight dtype torch.float64 is not supported"),
    "bias shape": (lambda d: _ln(d, b=_t(d, 9)), ValueError, r"bias must have shape"),
    "weight and bias dtypes": (lambda d: _ln(d, x=_t(d, 2, 3, 8, dtype=BF16),
                                             scale=_t(d, 2, 8, dtype=BF16), w=_t(d, 8),
                                             b=_t(d, 8, dtype=BF16)), TypeError,
                               r"weight dtype torch.float32 and bias dtype torch.bfloat16 must "
                               r"match"),
    "weight device": (lambda d: _rms(d, w=_t(_other(d), 8)), RuntimeError,
                      r"weight is on \w+ but the input is on \w+"),
    "eps negative": (lambda d: _rms(d, eps=-1.0), ValueError, r"eps must be a finite number"),
    "eps nan": (lambda d: _ln(d, eps=float("nan")), ValueError, r"eps must be a finite number"),
    # backward
    "bwd int input": (lambda d: _bwd(d, x=_t(d, 2, 3, 8, dtype=I32)), TypeError,
                      r"input must be float32"),
    "bwd shape of two dims": (lambda d: _bwd(d, ns=[3, 8]), ValueError,
                              r"norm_modulate_bwd: normalized_shape must have exactly one"),
    "bwd grad_out shape": (lambda d: _bwd(d, g=_t(d, 2, 3, 7)), ValueError,
                           r"grad_out shape \[2, 3, 7\] does not match the input shape"),
    "bwd grad_out dtype": (lambda d: _bwd(d, g=_t(d, 2, 3, 8, dtype=BF16)), TypeError,
                           r"norm_modulate_bwd: grad_out dtype torch.bfloat16 must match the "
                           r"input dtype torch.float32"),
    "bwd grad_out dtype f32 vs bf16": (lambda d: _bwd(d, x=_t(d, 2, 3, 8, dtype=BF16),
                                                      scale=_t(d, 2, 8, dtype=BF16)),
                                       TypeError, r"norm_modulate_bwd: grad_out dtype "
                                       r"torch.float32 must match the input dtype"),
    "bwd grad_out device": (lambda d: _bwd(d, g=_t(_other(d), 2, 3, 8)), RuntimeError,
                            r"grad_out is on \w+ but the input is on \w+"),
    "bwd bias without mean": (lambda d: _bwd(d, mean=None, b=_t(d, 8)), ValueError,
                              r"a bias needs the LayerNorm statistics"),
    "bwd rstd count": (lambda d: _bwd(d, rstd=_t(d, 5)), RuntimeError,
                       r"rstd must have one value per row \(6 rows\), got 5"),
    "bwd rstd dtype": (lambda d: _bwd(d, rstd=_t(d, 2, 3, dtype=F64)), RuntimeError,
                       r"rstd must be torch.float32, got torch.float64"),
    "bwd mean count": (lambda d: _bwd(d, mean=_t(d, 7)), RuntimeError,
                       r"mean must have one value per row"),
    "bwd rstd device": (lambda d: _bwd(d, rstd=_t(_other(d), 2, 3)), RuntimeError,
                        r"rstd is on \w+ but the input is on \w+"),
    "bwd scale shape": (lambda d: _bwd(d, scale=_t(d, 2, 2, 8)), ValueError,
                        r"scale of shape \[2, 2, 8\] does not fit"),
    "bwd scale dtype": (lambda d: _bwd(d, scale=_t(d, 2, 8, dtype=F64)), TypeError,
                        r"scale dtype torch.float64 is not supported"),
    "bwd weight shape": (lambda d: _bwd(d, w=_t(d, 3)), ValueError, r"weight must have shape"),
}


def _outcome(case, dev):
    call, _, _ = BAD[case]
    try:
        call(dev)
    except Exception as e:  # noqa: BLE001 -- the type is what is compared
        msg = str(e).split("\n")[0]
        return type(e), re.sub(r"\b(cuda(:\d+)?|cpu|meta)\b", "<dev>", msg), msg
    return None, "no error", ""


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case):
    """On CPU: the exception type and message; on meta (and CUDA): the same ones."""
    _, exc, pattern = BAD[case]
    t_cpu, norm_cpu, msg = _outcome(case, "cpu")
    assert t_cpu is exc, f"{case}: expected {exc.__name__}, got {t_cpu}: {msg}"
    assert msg.startswith("rmsnorm_ext: "), msg
    assert re.search(pattern, msg), f"{case}: {msg!r} does not match {pattern!r}"
    for dev in DEVICES[1:]:
        t_dev, norm_dev, dev_msg = _outcome(case, dev)
        assert (t_dev, norm_dev) == (t_cpu, norm_cpu), (case, dev, dev_msg, msg)


# ---------------------------------------------------------------------------------------
# Meta tensors and the op contract


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dts", ["f32", "bf16+f32", "bf16+f32params"])
def test_meta_shapes(kind, dts):
    xt, st, wt = DTYPES[dts]
    x = torch.empty(2, 5, 16, device="meta", dtype=xt)
    scale = torch.empty(2, 1, 16, device="meta", dtype=st)
    w = torch.empty(16, device="meta", dtype=wt)
    b = torch.empty(16, device="meta", dtype=wt) if kind == "layer" else None
    y, mean, rstd, g = run_ours(kind, x, scale, scale, w, b, EPS, torch.empty_like(x))
    stat = F64 if xt == F64 else F32
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == xt
    assert rstd.shape == (2, 5) and rstd.dtype == stat
    if kind == "layer":
        assert mean.shape == (2, 5) and mean.dtype == stat
    assert g["dx"].shape == x.shape and g["dx"].dtype == xt
    for name in ("dscale", "dshift"):
        assert g[name].shape == scale.shape and g[name].dtype == st
    assert g["dweight"].shape == (16,) and g["dweight"].dtype == wt
    if kind == "layer":
        assert g["dbias"].shape == (16,) and g["dbias"].dtype == wt
    else:
        assert g["dbias"].shape == (0,)


def test_opcheck():
    """Schemas, fake (meta) kernels against the real ones, dynamic shapes."""
    x = torch.randn(2, 5, 16)
    scale = torch.randn(2, 16)
    shift = torch.randn(2, 1, 16)
    w = torch.randn(16)
    b = torch.randn(16)
    y, rstd = ops.rms_norm_modulate_fwd(x, [16], scale, shift, w, 1e-6)
    _, mean, lrstd = ops.layer_norm_modulate_fwd(x, [16], scale, shift, w, b, 1e-6)
    dy = torch.randn_like(y)
    cases = [
        (ops.rms_norm_modulate_fwd.default, (x, [16], scale, shift, w, 1e-6)),
        (ops.rms_norm_modulate_fwd.default, (x, [16], torch.randn(16), None, None, 1e-6)),
        (ops.layer_norm_modulate_fwd.default, (x, [16], scale, shift, w, b, 1e-6)),
        (ops.layer_norm_modulate_fwd.default, (x, [16], scale[:1], None, None, None, 1e-6)),
        (ops.norm_modulate_bwd.default,
         (dy, x, None, rstd, scale, w, None, [16], True, True, True, False)),
        (ops.norm_modulate_bwd.default,
         (dy, x, mean, lrstd, scale, w, b, [16], True, False, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_registered_for_cpu_and_meta():
    for name in ("rms_norm_modulate_fwd", "layer_norm_modulate_fwd", "norm_modulate_bwd"):
        for key in ["CPU", "Meta"] + (["CUDA"] if rmsnorm_ext.build_info()["cuda"] else []):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmsnorm_ext::{name}", key), \
                (name, key)
