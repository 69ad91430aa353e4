"""Short rows on CPU (vision widths): the forward and backward kernels reduce short rows
(N <= 1024) in groups of rows (csrc/cpu/row_group_stats.h). A grouped row must give
bitwise the result of the same row computed alone (a [1, N] call never groups), be accurate
against the float64 reference, and leave no row unwritten: row lengths around the
threshold and the vector widths (8/16/32 lanes), odd and large row counts (several
threads' chunks, each with a remainder row), every dtype and weight dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import rmsnorm_ext as R
from reference import assert_accurate, ln_ref, poison_allocator, rms_ref

OPS = torch.ops.rmsnorm_ext
# Tails of 8/16/32-element steps, the ConvNeXt/ViT widths, the 4-row group threshold 64, the
# group threshold 1024.
NS = [1, 3, 8, 15, 16, 17, 31, 33, 40, 63, 64, 65, 96, 100, 192, 255, 384, 768, 1023, 1024,
      1025]
DT_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
            (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
            (torch.float16, torch.float16), (torch.float16, torch.float32)]


def _ids(p):
    return f"{str(p[0])[6:]}-w{str(p[1])[6:]}"


def _rows(m, n, dtype, offset):
    return (torch.randn(m, n) * 2 + offset).to(dtype)


def _same(a, b, what):
    """Bitwise equality, NaN included (NaN == NaN here)."""
    assert a.shape == b.shape, what
    eq = (a == b) | (a.isnan() & b.isnan())
    assert eq.all(), (f"{what}: {int((~eq).sum())} values differ from the single-row result, "
                      f"first at {(~eq).nonzero()[:4].tolist()}")


@pytest.mark.parametrize("pair", DT_PAIRS, ids=_ids)
@pytest.mark.parametrize("n", NS)
def test_grouped_rows_equal_single_rows(pair, n):
    dtype, wdtype = pair
    m = 9  # odd: the last row of the call is never in a group
    x = _rows(m, n, dtype, 3.0)
    w, b = torch.randn(n).to(wdtype), torch.randn(n).to(wdtype)
    y, rstd = OPS.rms_norm_fwd(x, [n], w, 1e-6, 0.0)
    yl, mean, lrstd = OPS.layer_norm_fwd(x, [n], w, b, 1e-5)
    for i in range(m):
        y1, r1 = OPS.rms_norm_fwd(x[i:i + 1], [n], w, 1e-6, 0.0)
        _same(y[i:i + 1], y1, f"rms y row {i}")
        _same(rstd[i:i + 1], r1, f"rms rstd row {i}")
        yl1, m1, lr1 = OPS.layer_norm_fwd(x[i:i + 1], [n], w, b, 1e-5)
        _same(yl[i:i + 1], yl1, f"ln y row {i}")
        _same(mean[i:i + 1], m1, f"ln mean row {i}")
        _same(lrstd[i:i + 1], lr1, f"ln rstd row {i}")


@pytest.mark.parametrize("pair", DT_PAIRS, ids=_ids)
@pytest.mark.parametrize("n", [1, 15, 17, 40, 96, 192, 255, 384, 768, 1024, 1025])
def test_grouped_backward_rows_equal_single_rows(pair, n):
    """The backward kernels reduce short rows in groups too: a row's input gradient is
    bitwise the one it gets alone (m = 19: groups of 8, 4 or 2 and a remainder)."""
    dtype, wdtype = pair
    m = 19
    x = _rows(m, n, dtype, 1.0)
    dy = torch.randn(m, n).to(dtype)
    w = torch.randn(n).to(wdtype)
    _, rstd = OPS.rms_norm_fwd(x, [n], w, 1e-6, 0.0)
    _, mean, lrstd = OPS.layer_norm_fwd(x, [n], w, None, 1e-5)
    dx, _ = OPS.rms_norm_bwd(dy, x, rstd, w, [n], 0.0, None, True)
    dxl, _, _ = OPS.layer_norm_bwd(dy, x, mean, lrstd, w, [n], True, True)
    for i in range(m):
        one = slice(i, i + 1)
        dx1, _ = OPS.rms_norm_bwd(dy[one], x[one], rstd[one], w, [n], 0.0, None, False)
        _same(dx[one], dx1, f"rms dx row {i}")
        dxl1, _, _ = OPS.layer_norm_bwd(dy[one], x[one], mean[one], lrstd[one], w, [n], False,
                                        False)
        _same(dxl[one], dxl1, f"ln dx row {i}")


@pytest.mark.parametrize("pair", DT_PAIRS, ids=_ids)
@pytest.mark.parametrize("n", [17, 96, 1024])
@pytest.mark.parametrize("m", [1, 2, 3, 4099])
def test_short_rows_accurate(pair, n, m):
    """Many rows (4099: every thread's chunk has rows in groups and a remainder) against
    float64, with weight and bias, a mean to subtract, NaN-poisoned fresh outputs."""
    dtype, wdtype = pair
    x = _rows(m, n, dtype, 3.0)
    w, b = torch.randn(n).to(wdtype), torch.randn(n).to(wdtype)
    tw = w.to(dtype)
    poison_allocator("cpu", x.numel() * x.element_size())
    y = R.rms_norm(x, (n,), w, 1e-6)
    assert_accurate(y, rms_ref(x, (n,), w, 1e-6), F.rms_norm(x, (n,), tw, 1e-6),
                    what=f"rms [{m}, {n}]")
    poison_allocator("cpu", x.numel() * x.element_size())
    y = R.layer_norm(x, (n,), w, b)
    assert_accurate(y, ln_ref(x, (n,), w, b), F.layer_norm(x, (n,), tw, b.to(dtype)),
                    what=f"ln [{m}, {n}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_stay_in_their_row(dtype):
    """NaN / Inf in one row of a group: its neighbour in the group stays finite and equal to
    its single-row result (the grouped loop keeps each row's accumulators apart)."""
    n = 96
    x = _rows(8, n, dtype, 0.0)
    x[0, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4] = 0  # all-zero row with eps = 0: rstd = inf, y = NaN (as torch)
    for eps in (1e-6, 0.0):
        y = R.rms_norm(x, (n,), None, eps)
        yl = R.layer_norm(x, (n,), None, None, eps)
        for i in range(8):
            _same(y[i:i + 1], R.rms_norm(x[i:i + 1], (n,), None, eps), f"rms row {i}")
            _same(yl[i:i + 1], R.layer_norm(x[i:i + 1], (n,), None, None, eps), f"ln row {i}")
        assert torch.isfinite(y[1]).all() and torch.isfinite(yl[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40, 5, 7), (2, 96, 9, 9), (2, 192, 3, 5)])
def test_layer_norm_2d_channels_last_short_rows(dtype, shape):
    """channels_last layer_norm_2d runs the row kernels on [B*H*W, C] rows."""
    c = shape[1]
    x = (torch.randn(shape) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    y = R.layer_norm_2d(x, w, b, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xr = x.permute(0, 2, 3, 1)
    ref = ln_ref(xr, (c,), w, b, 1e-6).permute(0, 3, 1, 2)
    native = F.layer_norm(xr, (c,), w, b, 1e-6).permute(0, 3, 1, 2)
    assert_accurate(y, ref, native, what=f"layer_norm_2d {shape}")


# Long bfloat16/float16 rows: up to kKeepMaxN (csrc/cpu/row_stats.h, 65536) the first pass
# keeps the row converted to fp32 for the later passes; past it the later passes convert the
# row again. Both paths, with odd tails, against the float64 reference.
@pytest.mark.parametrize("n", [65536 - 40, 65536, 65536 + 1, 70001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_rows_either_side_of_the_keep_limit(n, dtype):
    from reference import modulate_reference
    x = _rows(3, n, dtype, 0.5)
    w = (torch.rand(n) + 0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    x64, w64, b64 = x.double(), w.double(), b.double()
    assert_accurate(R.rms_norm(x, (n,), w, 1e-6), rms_ref(x64, (n,), w64, 1e-6),
                    F.rms_norm(x, (n,), w, 1e-6), what=f"rms {n}")
    assert_accurate(R.layer_norm(x, (n,), w, b, 1e-6), ln_ref(x64, (n,), w64, b64, 1e-6),
                    F.layer_norm(x, (n,), w, b, 1e-6), what=f"ln {n}")
    x3 = x.view(1, 3, n)
    sc, sh = torch.randn(1, n).to(dtype), torch.randn(1, n).to(dtype)
    for kind, f, bias in (("layer", R.layer_norm_modulate, b), ("rms", R.rms_norm_modulate, None)):
        args = (x3, (n,), sc, sh, w) + ((bias,) if bias is not None else ())
        ref = modulate_reference(x3, sc, sh, w, bias, 1e-6, kind)
        base = modulate_reference(x3, sc, sh, w, bias, 1e-6, kind, dtype=dtype)
        assert_accurate(f(*args, eps=1e-6), ref, base, what=f"{kind} modulate {n}")
