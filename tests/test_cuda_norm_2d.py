"""rms_norm_2d / layer_norm_2d on CUDA against float64, forward and backward: the channels-first
kernels (csrc/cuda/channels_first_kernels.cu) for contiguous [B, C, *S] inputs, the row
kernels for channels_last ones. Every dtype combination, odd spatial sizes (S = 1, 3, 49,
7x7x3), C = 1 to 3000 (channels cached in registers and streamed), misaligned storage,
both memory formats, bitwise-deterministic parameter gradients, ConvNeXt's shapes.

The bar (tests/reference.py assert_accurate): at most 2x torch's own error in the same
dtype -- F.rms_norm / F.layer_norm over the channels moved last -- plus two rounding steps.
The backward references take our saved statistics, as the backward ops do. Skipped without
a GPU."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext  # noqa: F401  (loads the ops)
from reference import (assert_accurate, ln_rows_bwd_ref, ln_rows_ref, reduction_scale,
                       rms_rows_bwd_ref, rms_rows_ref)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEV = "cuda"
ops = torch.ops.rmsnorm_ext
bf, hf, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
PAIRS = [(f32, f32), (f64, f64), (bf, bf), (bf, f32), (hf, hf), (hf, f32)]  # (input, weight)
EPS = {"rms": 1e-6, "ln": 1e-5}


def rows(t):
    """[B, C, *S] -> [B, *S, C] (a view): the layout of the row references and of torch's
    F.rms_norm / F.layer_norm."""
    return t.movedim(1, -1)


def stats_dtype(dt):
    return f64 if dt == f64 else f32


def data(shape, dt, wdt, has_w=True, has_b=True):
    c = shape[1]
    x = torch.randn(shape, device=DEV, dtype=f64).to(dt)
    dy = torch.randn(shape, device=DEV, dtype=f64).to(dt)
    w = (torch.rand(c, device=DEV, dtype=f64) + 0.5).to(wdt) if has_w else None
    b = (torch.randn(c, device=DEV, dtype=f64) * 0.5).to(wdt) if has_b else None
    return x, dy, w, b


def ours(kind, x, dy, w, b):
    """(y, mean, rstd, dx, dw, db) of our ops; mean is None for rms, db None for rms."""
    eps = EPS[kind]
    if kind == "rms":
        y, rstd = ops.rms_norm_2d_fwd(x, w, eps)
        dx, dw = ops.rms_norm_2d_bwd(dy, x, rstd, w, True)
        return y, None, rstd, dx, dw, None
    y, mean, rstd = ops.layer_norm_2d_fwd(x, w, b, eps)
    dx, dw, db = ops.layer_norm_2d_bwd(dy, x, mean, rstd, w, True, True)
    return y, mean, rstd, dx, dw, db


def torch_same_dtype(kind, x, dy, w, b):
    """torch's (y, dx, dw, db) in the input's dtype, channels-first; a weight in another
    dtype (fp32 next to bf16 / fp16) is cast to the input's where torch refuses the pair."""
    c = x.shape[1]
    if kind == "rms":
        b = None

    def run(ww, bb):
        xl = x.detach().clone().requires_grad_()
        wl, bl = (None if t is None else t.detach().clone().requires_grad_() for t in (ww, bb))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Mismatch dtype between input and weight"
            if kind == "rms":
                y = F.rms_norm(rows(xl), (c,), wl, EPS[kind])
            else:
                y = F.layer_norm(rows(xl), (c,), wl, bl, EPS[kind])
            leaves = [t for t in (xl, wl, bl) if t is not None]
            grads = iter(torch.autograd.grad(y, leaves, rows(dy)))
        gx = next(grads)
        gw = next(grads) if wl is not None else None
        gb = next(grads) if bl is not None else None
        return y.detach().movedim(-1, 1), gx, gw, gb

    try:
        return run(w, b)
    except (RuntimeError, TypeError):
        cast = (lambda t: None if t is None else t.to(x.dtype))  # noqa: E731
        return run(cast(w), cast(b))


def xhat_rows(x, mean, rstd):
    """The normalized input in float64, [B, *S, C], from the given statistics."""
    xr = rows(x).double()
    if mean is not None:
        xr = xr - mean.double().unsqueeze(-1)
    return xr * rstd.double().unsqueeze(-1)


def param_grad_scales(x, dy, mean, rstd):
    """The magnitudes one rounding step of dweight and dbias is taken of: the largest
    column sums of |dy * xhat| and |dy| (a sum's error grows with its terms)."""
    c = x.shape[1]
    xh = xhat_rows(x, mean, rstd)
    return reduction_scale(rows(dy), xh, c), reduction_scale(rows(dy), torch.ones_like(xh), c)


def check(kind, x, dy, w, b, what=""):
    """Our forward and backward against float64 with torch's error as the bar; returns our
    outputs."""
    dt = x.dtype
    c = x.shape[1]
    eps = EPS[kind]
    y, mean, rstd, dx, dw, db = ours(kind, x, dy, w, b)
    ty, tdx, tdw, tdb = torch_same_dtype(kind, x, dy, w, b)
    what = f"{kind} {list(x.shape)} {dt} w={None if w is None else w.dtype} {what}"

    # Outputs in the input's dtype and layout, statistics [B, *S].
    assert y.dtype == dt and dx.dtype == dt, what
    assert y.stride() == x.stride() and dx.stride() == x.stride(), what
    assert rstd.shape == (x.shape[0],) + x.shape[2:] and rstd.dtype == stats_dtype(dt), what

    if kind == "rms":
        y_ref, rstd_ref = rms_rows_ref(rows(x), w, eps, 0.0)
        dx_ref, dw_ref = rms_rows_bwd_ref(rows(dy), rows(x), rstd, w, 0.0, None)
        db_ref = None
    else:
        y_ref, mean_ref, rstd_ref = ln_rows_ref(rows(x), w, b, eps)
        dx_ref, dw_ref, db_ref = ln_rows_bwd_ref(rows(dy), rows(x), mean, rstd, w)
        # The mean's error scale is the data's: d = x - mean0 rounds at ulp(|x|).
        xmax = x.double().abs().max().item()
        tol = 1e-13 if dt == f64 else 2e-6
        assert (mean.double() - mean_ref).abs().max().item() <= tol * xmax, what + " mean"

    assert_accurate(rows(y), y_ref, rows(ty), dtype=dt, what=what + " y")
    rtol = 1e-12 if dt == f64 else 2e-5
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=rtol, atol=0, msg=what + " rstd")
    # dx's rounding is of its terms (rstd * g), not of the result: for C = 1, RMSNorm's dx
    # is rstd * g * eps / (x^2 + eps), a cancellation torch suffers alike.
    g = rows(dy).double() * (1.0 if w is None else w.double())
    dx_scale = (g * rstd.double().unsqueeze(-1)).abs().max().item()
    assert_accurate(rows(dx), dx_ref, rows(tdx), dtype=dt, scale=dx_scale, what=what + " dx")

    pdt = w.dtype if w is not None else stats_dtype(dt)
    dw_scale, db_scale = param_grad_scales(x, dy, mean, rstd)
    if w is not None:
        assert dw.dtype == pdt, what
        assert_accurate(dw, dw_ref, tdw, dtype=pdt, scale=dw_scale, what=what + " dw")
    else:
        assert dw.numel() == 0, what + ": dw without a weight"
    if db is not None:
        # Without a weight, dbias comes in the statistics dtype (autograd casts it to the
        # bias's own).
        assert db.dtype == pdt, what
        assert_accurate(db, db_ref, tdb, dtype=pdt, scale=db_scale, what=what + " db")
    return y, mean, rstd, dx, dw, db


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                        else torch.channels_last_3d)


# [B, C, *S]: C = 1; S = 3 (3D input); S = 7x7x3 = 147 (5D, odd); S = 1 (a row); S = 196
# (packed rows); C = 768 at S = 49 (scalar loads); C = 2048 (backward: streamed channels);
# C = 3000 (forward too).
SHAPES = [(2, 1, 7, 7), (3, 3, 3), (2, 96, 7, 7, 3), (4, 96, 1, 1), (2, 96, 14, 14),
          (2, 768, 7, 7), (2, 2048, 4, 4), (1, 3000, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dt,wdt", PAIRS, ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_vs_float64(kind, dt, wdt, shape):
    check(kind, *data(shape, dt, wdt))


@pytest.mark.parametrize("has_w,has_b", [(True, True), (False, True), (True, False),
                                         (False, False)])
@pytest.mark.parametrize("dt", [bf, f32, f64], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_without_weight_or_bias(kind, dt, has_w, has_b):
    if kind == "rms" and has_b:
        pytest.skip("RMSNorm has no bias")
    for shape in ((2, 96, 8, 8), (2, 40, 7, 7)):
        check(kind, *data(shape, dt, dt, has_w, has_b))


@pytest.mark.parametrize("dt", [bf, hf, f32, f64], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_misaligned_storage(kind, dt):
    # S = 64 would take packed loads; a storage offset of one element forces scalar ones.
    shape = (2, 64, 8, 8)
    n = math.prod(shape)
    x0, dy0, w, b = data(shape, dt, dt)
    x = torch.empty(n + 1, device=DEV, dtype=dt)[1:].view(shape).copy_(x0)
    dy = torch.empty(n + 1, device=DEV, dtype=dt)[1:].view(shape).copy_(dy0)
    check(kind, x, dy, w, b, "misaligned")


@pytest.mark.parametrize("shape", [(2, 96, 14, 14), (2, 40, 7, 7), (2, 64, 7, 7, 3),
                                   (2, 2048, 4, 4)], ids=str)
@pytest.mark.parametrize("dt", [bf, f32], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_channels_last_same_values(kind, dt, shape):
    """The same values in either memory format (channels_last reads rows of C, contiguous
    the channels-first kernels), each in its input's layout."""
    x, dy, w, b = data(shape, dt, f32 if dt == bf else dt)
    first = check(kind, x, dy, w, b, "contiguous")
    xl, dyl = channels_last(x), channels_last(dy)
    last = check(kind, xl, dyl, w, b, "channels_last")
    assert first[0].is_contiguous() and last[0].is_contiguous(memory_format=(
        torch.channels_last if x.dim() == 4 else torch.channels_last_3d))
    dw_scale, db_scale = param_grad_scales(x, dy, first[1], first[2])
    xmax = x.double().abs().max().item()
    for a, c, name in zip(first, last, ("y", "mean", "rstd", "dx", "dw", "db")):
        if a is None or a.numel() == 0:
            continue
        # Two summation orders: the statistics within check's bars, the rest a few roundings
        # of the output dtype apart (of the terms' magnitude for the parameter gradients).
        eps = torch.finfo(a.dtype).eps
        amax = a.double().abs().max().item()
        tol = {"mean": (1e-13 if dt == f64 else 2e-6) * xmax,
               "rstd": (1e-12 if dt == f64 else 2e-5) * amax,
               "dx": 8 * eps * amax,
               "dw": 4 * eps * dw_scale, "db": 4 * eps * db_scale}.get(name, 4 * eps * amax)
        err = (a.double() - c.double()).abs().max().item()
        assert err <= tol, f"{kind} {shape} {dt} {name}: formats differ by {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("shape,dt,wdt", [((8, 1024, 32, 32), bf, bf), ((32, 96, 56, 56), bf, f32),
                                          ((16, 32, 128, 128), f32, f32), ((4, 768, 7, 7), hf, hf)],
                         ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_param_grads_bitwise_deterministic(kind, shape, dt, wdt):
    """Many rows (several tiles per backward block; streamed channels for C = 1024): the
    partial sums are added in an order fixed by the launch shape, never by timing."""
    x, dy, w, b = data(shape, dt, wdt)
    first = ours(kind, x, dy, w, b)
    for _ in range(2):
        again = ours(kind, x, dy, w, b)
        for a, c in zip(first, again):
            if a is not None:
                assert torch.equal(a, c)


# ConvNeXt's channels-first LayerNorms (and an RMSNorm of the same shapes): stages 1, 2 and
# 4 of ConvNeXt-T at batch 32, bf16, in both memory formats.
CONVNEXT = [(32, 96, 56, 56), (32, 192, 28, 28), (32, 768, 7, 7)]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CONVNEXT, ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_convnext_shapes(kind, shape, fmt):
    x, dy, w, b = data(shape, bf, bf)
    if fmt == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    check(kind, x, dy, w, b, fmt)
