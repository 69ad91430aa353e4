"""The channels-first norms' ops (rms_norm_2d / layer_norm_2d: normalized over dim 1 of
[B, C, *spatial]) called directly, on CPU, against float64.

A contiguous input runs the strided kernels (csrc/cpu/channels_first_cpu.cpp): positions in
vector windows, the last one shifted back to the end of the tile (S not a whole number of
steps, e.g. 49), one zero-padded window where S is under a step (S = 3), several tiles per
item (S = 3136, 1031); a channels_last input runs the row kernels. The bar is
tests/reference.py's: our error against float64 within a small multiple of torch's own
error in the same dtype (F.rms_norm / F.layer_norm over x.movedim(1, -1)).
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import assert_accurate, poison_allocator

OPS = torch.ops.rmsnorm_ext
EPS = 1e-5
F64 = torch.float64

# (input dtype, weight/bias dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
SHAPES = [
    (3, 96, 7, 7),      # S = 49: whole steps plus a shifted last window
    (1, 3, 50),         # 1-D spatial
    (3, 768, 3),        # S = 3: under one step, a zero-padded window
    (1, 1, 49),         # C = 1 (LayerNorm: xhat = 0)
    (1, 2048, 4, 5),    # long rows, S = 20
    (2, 3, 7, 7, 3),    # 3-D spatial, S = 147
    (1, 16, 1031),      # two tiles per item, the last with a remainder
    (1, 24, 56, 56),    # S = 3136: many tiles per item
    (2, 5, 1, 1),       # S = 1: contiguous rows (the row kernels)
]


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) and isinstance(v[0], int) else str(v)


def _last(t):
    return t.movedim(1, -1)


def _ref_fwd(op, x, w, b):
    """float64 reference: y (input's shape) and the statistics [B, *S]."""
    xd = _last(x.double())
    if op == "ln":
        mean = xd.mean(-1, keepdim=True)
        xd = xd - mean
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
    y = xd * rstd
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    stats = (rstd.squeeze(-1),) if op == "rms" else (mean.squeeze(-1), rstd.squeeze(-1))
    return y.movedim(-1, 1), stats


def _torch_fwd(op, x, w, b):
    """torch's own result in the input dtype (parameters cast to it)."""
    cast = [None if t is None else t.to(x.dtype) for t in (w, b)]
    C = x.shape[1]
    if op == "rms":
        return F.rms_norm(_last(x), (C,), cast[0], EPS).movedim(-1, 1)
    return F.layer_norm(_last(x), (C,), cast[0], cast[1], EPS).movedim(-1, 1)


def _fwd(op, x, w, b):
    if op == "rms":
        return OPS.rms_norm_2d_fwd(x, w, EPS)
    return OPS.layer_norm_2d_fwd(x, w, b, EPS)


def _bwd(op, dy, x, stats, w, want_dw, want_db):
    if op == "rms":
        return OPS.rms_norm_2d_bwd(dy, x, stats[0], w, want_dw)
    return OPS.layer_norm_2d_bwd(dy, x, stats[0], stats[1], w, want_dw, want_db)


def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return dict(zip([i for i, t in enumerate(leaves) if t is not None],
                    torch.autograd.grad(out, wanted, dy)))


def _make(op, shape, dtype, pdtype, params, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + (2.0 if op == "ln" else 0.5)).to(dtype)
    C = shape[1]
    w = (torch.randn(C, generator=g) + 1).to(pdtype) if params >= 1 else None
    b = torch.randn(C, generator=g).to(pdtype) if params >= 2 else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def _param_modes(op):
    return (0, 1, 2) if op == "ln" else (0, 1)  # none, weight, weight + bias


def _stats_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def _check_stats(stats, ref_stats, dtype, what):
    tol = 1e-12 if dtype == F64 else 1e-5
    for name, s, r in zip(("mean", "rstd")[-len(stats):], stats, ref_stats):
        assert s.dtype == _stats_dtype(dtype) and s.shape == r.shape, what
        # rstd relative; the mean against the row's scale (|x| ~ 3)
        torch.testing.assert_close(s.double(), r, rtol=tol, atol=tol * 4 if name == "mean" else 0,
                                   msg=f"{what} {name}")


def _expected(op, x, w, b, dy):
    """name -> (float64 reference, torch's own in the input dtype, error scale) for y, dx and
    the parameter gradients the backward computes (dw with a weight, db for LayerNorm)."""
    C = x.shape[1]
    zeros = (lambda dt: torch.zeros(C, dtype=dt)) if op == "ln" else (lambda dt: None)
    ref = _grads(lambda a, c, d: _ref_fwd(op, a, c, d)[0],
                 [x.double(), None if w is None else w.double(), zeros(F64)], dy.double())
    base = _grads(lambda a, c, d: _torch_fwd(op, a, c, d),
                  [x, None if w is None else w.to(x.dtype), zeros(x.dtype)], dy)
    # a parameter gradient's error grows with its terms: the sum over rows of |dy * xhat|
    xhat = _ref_fwd(op, x, None, None)[0]
    terms = {1: (dy.double() * xhat).abs(), 2: dy.double().abs()}
    out = {"y": (_ref_fwd(op, x, w, b)[0], _torch_fwd(op, x, w, b), None),
           "dx": (ref[0], base[0], None)}
    for k, name in ((1, "dw"), (2, "db")):
        if k in ref:
            out[name] = (ref[k], base[k], _last(terms[k]).reshape(-1, C).sum(0).max().item())
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype,pdtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_forward_backward_vs_float64(op, dtype, pdtype, shape):
    for params in _param_modes(op):
        what = f"{op} {shape} {dtype} params={params} ({pdtype})"
        x, w, b, dy = _make(op, shape, dtype, pdtype, params)
        exp = _expected(op, x, w, b, dy)
        poison_allocator("cpu", 4 * x.numel() * x.element_size())
        y, *stats = _fwd(op, x, w, b)
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(), what
        _check_stats(stats, _ref_fwd(op, x, w, b)[1], dtype, what)

        want = (w is not None, op == "ln")
        poison_allocator("cpu", 4 * x.numel() * x.element_size())
        dx, *pgrads = _bwd(op, dy, x, stats, w, *want)
        assert dx.dtype == dtype and dx.shape == x.shape, what
        for name, got, wanted in zip(["dw", "db"], pgrads, want):
            if not wanted:
                assert got.numel() == 0, f"{name} {what}"
            else:  # the weight's dtype; dbias without a weight: the statistics dtype
                assert got.dtype == (pdtype if w is not None else _stats_dtype(dtype)), what
        ours = {"y": y, "dx": dx, "dw": pgrads[0], "db": pgrads[-1]}
        for name, (ref, base, scale) in exp.items():
            assert_accurate(ours[name], ref, base, dtype=dtype, what=f"{name} {what}", scale=scale)


# ------------------------------------------------ layouts: channels_last, non-contiguous

def _channels_last(x):
    """The same values with stride 1 on dim 1 (channels_last-dense, any rank)."""
    return _last(x).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("shape", [(3, 96, 7, 7), (2, 3, 7, 7, 3), (1, 16, 1031), (2, 768, 3)],
                         ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_channels_last_matches_contiguous(op, dtype, shape):
    """A channels_last input (the row kernels) and the same values contiguous (the strided
    kernels): each output keeps its input's layout, both are accurate, and they differ by
    no more than torch's own accuracy bar (they sum in different orders, so not bitwise)."""
    x, w, b, dy = _make(op, shape, dtype, torch.float32, 2 if op == "ln" else 1, seed=1)
    xc, dyc = _channels_last(x), _channels_last(dy)
    assert not xc.is_contiguous()
    y_n, *st_n = _fwd(op, x, w, b)
    y_c, *st_c = _fwd(op, xc, w, b)
    assert y_n.is_contiguous() and y_c.stride() == xc.stride()
    g_n = _bwd(op, dy, x, st_n, w, True, True)
    g_c = _bwd(op, dyc, xc, st_c, w, True, True)
    assert g_c[0].stride() == xc.stride()
    for a, c in zip(st_n, st_c):  # fp32: a few ulps apart
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    exp = _expected(op, x, w, b, dy)
    for name, a, c in zip(exp, [y_n, *g_n], [y_c, *g_c]):
        ref, base, scale = exp[name]
        for got in (a, c):
            assert_accurate(got, ref, base, dtype=dtype, what=f"{op} {name}", scale=scale)
        # |a - c| within the bar: the bar applied to ref + (a - c)
        assert_accurate(ref + (a.double() - c.double()), ref, base, dtype=dtype,
                        what=f"{op} {name} NCHW - channels_last", scale=scale)


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_non_contiguous_input(op):
    """A view that is neither contiguous nor channels_last is made contiguous by the host."""
    base = torch.randn(2, 48, 9, 14)
    x = base[:, :, :, ::2].transpose(2, 3)  # [2, 48, 7, 9], strided everywhere
    assert not x.is_contiguous() and not _last(x).is_contiguous()
    w, b = torch.randn(48), torch.randn(48)
    dy = torch.randn(2, 48, 9, 7).transpose(2, 3)
    out = _fwd(op, x, w, b if op == "ln" else None)
    y_ref, stats_ref = _ref_fwd(op, x, w, b if op == "ln" else None)
    assert_accurate(out[0], y_ref, _torch_fwd(op, x, w, b if op == "ln" else None), what=op)
    _check_stats(out[1:], stats_ref, torch.float32, op)
    grads = _bwd(op, dy, x, out[1:], w, True, True)
    ref = _bwd(op, dy.contiguous(), x.contiguous(), out[1:], w, True, True)
    for a, r in zip(grads, ref):
        assert torch.equal(a, r)


# --------------------------------------------------------- special values, coverage

@pytest.mark.parametrize("shape", [(3, 96, 7, 7), (2, 7, 3), (1, 16, 1031)], ids=_id)
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_nan_stays_in_its_row(op, shape):
    """A NaN at one position makes exactly that row (all channels there) NaN: lanes are
    independent, and the repeated lanes of a shifted window do not spread it. Every other
    output is finite, so no unwritten (poisoned) element leaks either."""
    x = torch.randn(shape)
    pos = (shape[0] - 1, shape[1] // 2) + tuple(s - 1 for s in shape[2:])  # the last position
    x[pos] = float("nan")
    poison_allocator("cpu", 4 * x.numel() * x.element_size())
    y, *stats = _fwd(op, x, torch.randn(shape[1]), None)
    bad = torch.zeros(shape, dtype=torch.bool)
    bad[(pos[0], slice(None)) + pos[2:]] = True
    assert torch.equal(y.isnan(), bad)
    for s in stats:
        assert s.isnan().sum() == 1 and s[(pos[0],) + pos[2:]].isnan()


# ------------------------------------------------------ parameter gradients over many rows

@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("shape", [(3, 96, 7, 7), (2, 6, 3), (2, 16, 1031), (3, 4, 56, 56)],
                         ids=_id)
@pytest.mark.parametrize("threads", [1, 3])
def test_param_grads_exact_integer_sums(shape, threads):
    """x = +-1 with a zero mean at every position and eps = 0: rstd = 1 and xhat = x exactly
    (both norms); with small integer dy every partial sum is an exact integer, so dweight and
    dbias must equal the float64 sums exactly. A position dropped or counted twice (a shifted
    window's repeated lanes, a padded lane, a tile or chunk boundary) shows as an error of at
    least 1."""
    g = torch.Generator().manual_seed(threads)
    B, C = shape[:2]
    half = torch.randint(0, 2, (B, C // 2) + shape[2:], generator=g).float() * 2 - 1
    x = torch.cat([half, -half], 1)
    dy = torch.randint(-8, 9, shape, generator=g).float()
    w = torch.randn(C)
    dw_ref = _last(dy.double() * x.double()).reshape(-1, C).sum(0)
    db_ref = _last(dy.double()).reshape(-1, C).sum(0)
    with _threads(threads):
        _, rstd = OPS.rms_norm_2d_fwd(x, w, 0.0)
        assert torch.equal(rstd, torch.ones_like(rstd))
        _, dw = OPS.rms_norm_2d_bwd(dy, x, rstd, w, True)
        assert torch.equal(dw.double(), dw_ref), "rms dweight"
        _, mean, rstd = OPS.layer_norm_2d_fwd(x, w, None, 0.0)
        assert torch.equal(mean, torch.zeros_like(mean))
        assert torch.equal(rstd, torch.ones_like(rstd))
        _, dw, db = OPS.layer_norm_2d_bwd(dy, x, mean, rstd, w, True, True)
        assert torch.equal(dw.double(), dw_ref), "ln dweight"
        assert torch.equal(db.double(), db_ref), "ln dbias"


def _naive_fp32_sum_error(terms):
    """Relative error of a plain running fp32 sum over the rows (per column; the worst)."""
    run = np.add.accumulate(terms.float().numpy(), axis=0)[-1].astype(np.float64)
    exact = terms.double().sum(0).numpy()
    return float((np.abs(run - exact) / terms.double().abs().sum(0).numpy()).max())


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_param_grads_accurate_over_many_rows(op):
    """ConvNeXt's first stage has B * S = 32 * 3136 rows per channel. dweight = sum of
    dy * xhat over them: with dy correlated with x the terms share a sign, so a plain running
    fp32 sum drifts (relative error ~7e-6 here, checked below against the bar) while a
    cascade / tree stays near 1e-7 (as torch's fp32 sum). Bitwise reproducible: two calls
    agree exactly."""
    shape = (32, 8, 56, 56)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g) + (1.0 if op == "ln" else 0.0)
    dy = x + torch.rand(shape, generator=g)  # dy * xhat > 0 mostly, dy > 0 mostly
    w = torch.randn(8)
    xhat = _ref_fwd(op, x, None, None)[0]
    out = _fwd(op, x, w, None)
    res = _bwd(op, dy, x, out[1:], w, True, True)
    again = _bwd(op, dy, x, out[1:], w, True, True)
    for a, b in zip(res[1:], again[1:]):
        assert torch.equal(a, b), "parameter gradients not bitwise reproducible"
    terms = [_last(dy.double() * xhat).reshape(-1, 8)]
    if op == "ln":
        terms.append(_last(dy.double()).reshape(-1, 8))
    bar = 5e-7
    for got, t in zip(res[1:], terms):
        rel = ((got.double() - t.sum(0)).abs() / t.abs().sum(0)).max().item()
        assert rel <= bar, f"{op}: relative error {rel:.2e} > {bar:.0e}"
        naive = _naive_fp32_sum_error(t)
        assert naive > 4 * bar, f"the bar does not reject a running fp32 sum ({naive:.2e})"
