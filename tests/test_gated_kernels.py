"""Gated RMSNorm kernels (torch.ops.rmsnorm_ext.gated_rms_norm_fwd / _bwd) on CPU, against
a float64 reference (reference.gated_rms_norm_reference, backward by autograd on it).

The accuracy bar is the project's (reference.assert_accurate): our error against float64
is at most 2x torch's own error -- the same composite evaluated with torch ops in the
input's dtype -- plus two rounding steps of the output. Outputs are allocated from
NaN-poisoned memory, so an element a kernel fails to write shows up as NaN.
"""
import contextlib
import math

import pytest
import torch

import rmsnorm_ext  # noqa: F401  (loads the ops)
from reference import (assert_accurate, assert_same_kernel_result, gated_rms_norm_reference,
                       poison_allocator)

OPS = torch.ops.rmsnorm_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MODES = [True, False]  # norm_before_gate
ACTS = ["silu", "sigmoid"]
EPS = 1e-6

# (leading shape, normalized_shape, group_size): one group and several per row; odd N
# (1, 7, 257, 4100) and odd groups; many rows; a single row; a 2-D normalized shape.
SHAPES = [
    ((64,), (256,), 256),
    ((64,), (256,), 64),
    ((3, 5), (257,), 257),
    ((9,), (1,), 1),
    ((6,), (7,), 7),
    ((4,), (4100,), 4100),
    ((4,), (4100,), 1025),
    ((1,), (1000,), 250),
    ((1000,), (96,), 24),
    ((2, 3), (4, 16), 16),
]
SHAPE_IDS = [f"{'x'.join(map(str, lead))}-{'x'.join(map(str, ns))}-G{g}"
             for lead, ns, g in SHAPES]


def _param_dtypes(dtype):
    """None: no weight; the input's dtype; float32 next to a bfloat16/float16 input."""
    out = [None, dtype]
    if dtype in (torch.bfloat16, torch.float16):
        out.append(torch.float32)
    return out


def _make(lead, ns, dtype, wdtype, seed=0, gate_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, *ns, generator=gen) + 0.3).to(dtype)
    g = (torch.randn(*lead, *ns, generator=gen) * gate_scale).to(dtype)
    w = None if wdtype is None else (torch.randn(ns, generator=gen) + 1.0).to(wdtype)
    dy = torch.randn(*lead, *ns, generator=gen).to(dtype)
    return x, g, w, dy


def _fwd(x, g, ns, w, G, nbg, act, eps=EPS):
    return OPS.gated_rms_norm_fwd(x, g, list(ns), w, eps, G, nbg, act)


def _bwd(dy, x, g, rstd, w, ns, G, nbg, act, want_dw=True):
    return OPS.gated_rms_norm_bwd(dy, x, g, rstd, w, list(ns), G, nbg, act, want_dw)


def _rstd_ref(x, g, ns, G, nbg, act, eps=EPS):
    n = math.prod(ns)
    lead = x.shape[:x.dim() - len(ns)]
    xd, gd = x.double(), g.double()
    z = xd if nbg else xd * (torch.nn.functional.silu(gd) if act == "silu" else gd.sigmoid())
    return torch.rsqrt(z.reshape(*lead, n // G, G).pow(2).mean(-1) + eps)


def _autograd(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, dy)
    it = iter(grads)
    return out.detach(), [None if t is None else next(it) for t in leaves]


def _references(x, g, w, dy, ns, G, nbg, act, eps=EPS):
    """(y, [dx, dg, dw]) in float64, torch's composite in the input dtype, and the scales
    of one rounding step of dx, dgate and the weight gradient.

    dx = r * (u - xhat * mean(u * xhat)) (u = dy * w * a; the same with zhat and a factor a
    for the gate-first form) cancels where the group is short or one element dominates it:
    for G = 1 it is r * u * eps / (x^2 + eps), while its terms are r * u (and the rounding
    of the stored fp32 rstd alone moves the second term by an ulp of r * u). Its error,
    torch's too, grows with those terms, so a step is taken of max(|ref|, |r * u|); the
    same for the gate-first dgate = dz * x * a' (dz = r * (dy * w - zhat * c)): of
    max(|ref|, |r * dy * w * x * a'|). The weight gradient's is the sum over rows of
    |dy * y_unweighted| (the terms it adds)."""
    dtype = x.dtype

    def comp(a, b, c):
        return gated_rms_norm_reference(a, b, ns, c, eps, G, nbg, act)

    w64 = None if w is None else w.double()
    ref = _autograd(comp, (x.double(), g.double(), w64), dy.double())
    wt = None if w is None else w.to(dtype)  # torch in the input's dtype throughout
    base = _autograd(comp, (x, g, wt), dy)
    n = math.prod(ns)
    y_unweighted = gated_rms_norm_reference(x.double(), g.double(), ns, None, eps, G, nbg, act)
    dw_scale = (dy.double().abs() * y_unweighted.abs()).reshape(-1, n).sum(0).max().item()
    r = _rstd_ref(x, g, ns, G, nbg, act, eps).repeat_interleave(G, -1).reshape(x.shape)
    gd = g.double()
    a = torch.nn.functional.silu(gd) if act == "silu" else gd.sigmoid()
    s = gd.sigmoid()
    da = s * (1 + gd * (1 - s)) if act == "silu" else s * (1 - s)
    dyw = dy.double() * (1.0 if w is None else w.double())
    dx_scale = max(ref[1][0].abs().max().item(), (r * dyw * a).abs().max().item())
    dg_scale = max(ref[1][1].abs().max().item(), (r * dyw * x.double() * da).abs().max().item())
    return ref, base, (dx_scale, dg_scale, dw_scale)


# ---------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("lead,ns,G", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
def test_forward_backward_accuracy(nbg, act, dtype, lead, ns, G):
    for wdtype in _param_dtypes(dtype):
        what = f"nbg={nbg} {act} {dtype} w={wdtype}"
        x, g, w, dy = _make(lead, ns, dtype, wdtype)
        poison_allocator("cpu", 4 * x.numel() * x.element_size())
        y, rstd = _fwd(x, g, ns, w, G, nbg, act)
        assert y.dtype == dtype and y.shape == x.shape
        n = math.prod(ns)
        assert rstd.shape == (*lead, n // G)
        assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        rstd_ref = _rstd_ref(x, g, ns, G, nbg, act)
        torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-5 if dtype != torch.float64
                                   else 1e-12, atol=0, msg=what)

        (y_ref, grads_ref), (y_base, grads_base), (dx_scale, dg_scale, dw_scale) = _references(
            x, g, w, dy, ns, G, nbg, act)
        assert_accurate(y, y_ref, y_base, what=f"y {what}")

        poison_allocator("cpu", 4 * x.numel() * x.element_size())
        dx, dg, dw = _bwd(dy, x, g, rstd, w, ns, G, nbg, act)
        assert dx.dtype == dtype and dg.dtype == dtype and dx.shape == x.shape == dg.shape
        assert_accurate(dx, grads_ref[0], grads_base[0], dtype=dtype, what=f"dx {what}",
                        scale=dx_scale)
        assert_accurate(dg, grads_ref[1], grads_base[1], dtype=dtype, what=f"dgate {what}",
                        scale=dg_scale)
        if w is None:
            assert dw.numel() == 0
        else:
            assert dw.dtype == wdtype and dw.shape == w.shape
            assert_accurate(dw, grads_ref[2], grads_base[2], dtype=dtype, what=f"dw {what}",
                            scale=dw_scale)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_extreme_gates(nbg, act, dtype):
    """Gates of magnitude up to 1e4: sigmoid(g) never overflows, no NaN or Inf appears, and
    the results stay as accurate as elsewhere."""
    lead, ns, G = (16,), (128,), 32
    x, _, w, dy = _make(lead, ns, dtype, dtype, seed=3)
    mags = torch.tensor([0.0, 1e-3, 1.0, 15.0, 40.0, 90.0, 100.0, 1e4])
    if dtype == torch.float16:  # x * silu(1e4) squared overflows torch's float16 composite,
        mags = mags[:-1]        # the yardstick of assert_accurate
    signs = torch.tensor([1.0, -1.0])
    vals = (mags[:, None] * signs[None, :]).flatten()
    g = vals[torch.arange(x.numel()) % vals.numel()].reshape(x.shape).to(dtype)
    y, rstd = _fwd(x, g, ns, w, G, nbg, act)
    dx, dg, dw = _bwd(dy, x, g, rstd, w, ns, G, nbg, act)
    for t in (y, rstd, dx, dg, dw):
        assert torch.isfinite(t).all()
    (y_ref, grads_ref), (y_base, grads_base), (dx_scale, dg_scale, dw_scale) = _references(
        x, g, w, dy, ns, G, nbg, act)
    what = f"nbg={nbg} {act} {dtype}"
    assert_accurate(y, y_ref, y_base, what=f"y {what}")
    assert_accurate(dx, grads_ref[0], grads_base[0], what=f"dx {what}", scale=dx_scale)
    assert_accurate(dg, grads_ref[1], grads_base[1], what=f"dgate {what}", scale=dg_scale)
    assert_accurate(dw, grads_ref[2], grads_base[2], what=f"dw {what}", scale=dw_scale)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_gate_gives_nan(nbg, act, dtype):
    """A NaN gate element gives NaN where torch's composite does: in its own output (norm
    first) or in its whole group (gate first: it enters the group's RMS), and nowhere else.
    The half-precision kernels' fast exp clamps its input; a NaN must not come out clamped."""
    lead, ns, G = (3,), (2 * 48,), 48
    x, g, w, _ = _make(lead, ns, dtype, dtype, seed=8)
    g[1, 5] = float("nan")
    y, _ = _fwd(x, g, ns, w, G, nbg, act)
    nan = torch.zeros_like(y, dtype=torch.bool)
    if nbg:
        nan[1, 5] = True
    else:
        nan[1, :G] = True
    assert torch.equal(torch.isnan(y), nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grad_many_rows(dtype):
    """M >> N: the weight gradient's sum over rows dominates (tree-summed)."""
    lead, ns, G = (8191,), (64,), 16
    for nbg in MODES:
        x, g, w, dy = _make(lead, ns, dtype, dtype, seed=4)
        y, rstd = _fwd(x, g, ns, w, G, nbg, "silu")
        _, _, dw = _bwd(dy, x, g, rstd, w, ns, G, nbg, "silu")
        (_, grads_ref), (_, grads_base), (_, _, dw_scale) = _references(x, g, w, dy, ns, G, nbg,
                                                                     "silu")
        assert_accurate(dw, grads_ref[2], grads_base[2], what=f"dw nbg={nbg}", scale=dw_scale)


# ---------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unit_sigmoid_gate_is_rms_norm(dtype):
    """A sigmoid gate of +inf is exactly 1 (and its derivative exactly 0): the gated op with
    the norm first is rms_norm, bit for bit, forward and backward."""
    lead, ns = (37,), (300,)
    x, _, w, dy = _make(lead, ns, dtype, dtype, seed=5)
    g = torch.full_like(x, float("inf"))
    y, rstd = _fwd(x, g, ns, w, 300, True, "sigmoid")
    y_rms, rstd_rms = OPS.rms_norm_fwd(x, list(ns), w, EPS, 0.0)
    assert_same_kernel_result(y, y_rms)
    assert_same_kernel_result(rstd.squeeze(-1), rstd_rms)
    dx, dg, dw = _bwd(dy, x, g, rstd, w, ns, 300, True, "sigmoid")
    dx_rms, dw_rms = OPS.rms_norm_bwd(dy, x, rstd_rms, w, list(ns), 0.0, None, True)
    assert_same_kernel_result(dx, dx_rms)
    assert_same_kernel_result(dw, dw_rms, ulps=64)  # 37 rows summed in another order
    assert torch.equal(dg, torch.zeros_like(dg))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
def test_groups_are_independent_rows(nbg, act):
    """Without a weight, groups of G are rows of G: the grouped op equals the op over
    normalized_shape (G,) on the input viewed as [..., N / G, G], bit for bit."""
    lead, n, G = (5, 3), 384, 96
    x, g, _, dy = _make(lead, (n,), torch.float32, None, seed=6)
    y, rstd = _fwd(x, g, (n,), None, G, nbg, act)
    v = (*lead, n // G, G)
    y2, rstd2 = _fwd(x.reshape(v), g.reshape(v), (G,), None, G, nbg, act)
    assert torch.equal(y, y2.reshape(y.shape)) and torch.equal(rstd, rstd2.reshape(rstd.shape))
    dx, dg, _ = _bwd(dy, x, g, rstd, None, (n,), G, nbg, act)
    dx2, dg2, _ = _bwd(dy.reshape(v), x.reshape(v), g.reshape(v), rstd2, None, (G,), G, nbg, act)
    assert torch.equal(dx, dx2.reshape(dx.shape)) and torch.equal(dg, dg2.reshape(dg.shape))


@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
def test_non_contiguous_inputs(nbg):
    """Strided input, gate and grad_out are made contiguous by the host: same bits."""
    n, G = 128, 32
    base = torch.randn(3, 40, 2 * n)
    x = base[..., ::2]
    g = torch.randn(40, 3, n).transpose(0, 1)
    dy = torch.randn(3, 40, 2 * n)[..., 1::2]
    w = torch.randn(n)
    assert not (x.is_contiguous() or g.is_contiguous() or dy.is_contiguous())
    y, rstd = _fwd(x, g, (n,), w, G, nbg, "silu")
    yc, rstdc = _fwd(x.contiguous(), g.contiguous(), (n,), w, G, nbg, "silu")
    assert torch.equal(y, yc) and torch.equal(rstd, rstdc)
    grads = _bwd(dy, x, g, rstd.transpose(0, 1).contiguous().transpose(0, 1), w, (n,), G,
                 nbg, "silu")
    grads_c = _bwd(dy.contiguous(), x.contiguous(), g.contiguous(), rstdc, w, (n,), G, nbg,
                   "silu")
    for a, b in zip(grads, grads_c):
        assert torch.equal(a, b)


@contextlib.contextmanager
def _num_threads(k):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16),
                                          (torch.float64, torch.float64)], ids=str)
@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
def test_weight_grad_deterministic(nbg, dtype, wdtype):
    """The weight gradient is bitwise reproducible for a thread count, and 1 and 2 threads
    agree to rounding (they sum the rows in different trees)."""
    lead, ns, G = (4099,), (257,), 257
    x, g, w, dy = _make(lead, ns, dtype, wdtype, seed=7)
    results = {}
    for k in (1, 2):
        with _num_threads(k):
            y, rstd = _fwd(x, g, ns, w, G, nbg, "silu")
            first = _bwd(dy, x, g, rstd, w, ns, G, nbg, "silu")
            for _ in range(2):
                again = _bwd(dy, x, g, rstd, w, ns, G, nbg, "silu")
                for name, a, b in zip(("dx", "dgate", "dw"), first, again):
                    assert torch.equal(a, b), f"{name} differs between identical runs ({k} threads)"
            results[k] = (y, first)
    (y1, g1), (y2, g2) = results[1], results[2]
    assert torch.equal(y1, y2)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])  # row-local: same bits
    scale = g1[2].double().abs().max().item()
    tol = 64 * torch.finfo(wdtype).eps * max(scale, 1.0)
    assert (g1[2].double() - g2[2].double()).abs().max().item() <= tol


# ---------------------------------------------------------------------------- empty sizes

@pytest.mark.parametrize("nbg", MODES, ids=["norm_first", "gate_first"])
def test_empty_inputs(nbg):
    w = torch.randn(64)
    x = torch.randn(0, 3, 64)
    g = torch.randn(0, 3, 64)
    y, rstd = _fwd(x, g, (64,), w, 16, nbg, "silu")
    assert y.shape == x.shape and rstd.shape == (0, 3, 4) and rstd.dtype == torch.float32
    dx, dg, dw = _bwd(torch.randn(0, 3, 64), x, g, rstd, w, (64,), 16, nbg, "silu")
    assert dx.shape == x.shape and dg.shape == x.shape
    assert torch.equal(dw, torch.zeros(64))
    _, _, dw = _bwd(torch.randn(0, 3, 64), x, g, rstd, w, (64,), 16, nbg, "silu", False)
    assert dw.numel() == 0
    # rows of no elements: no groups
    x0 = torch.randn(3, 0)
    y, rstd = _fwd(x0, x0.clone(), (0,), None, 1, nbg, "sigmoid")
    assert y.shape == (3, 0) and rstd.shape == (3, 0)
    dx, dg, dw = _bwd(x0.clone(), x0, x0.clone(), rstd, None, (0,), 1, nbg, "sigmoid")
    assert dx.shape == (3, 0) and dg.shape == (3, 0) and dw.numel() == 0


def test_no_weight_grad_when_not_wanted():
    x, g, w, dy = _make((8,), (64,), torch.float32, torch.float32)
    y, rstd = _fwd(x, g, (64,), w, 64, True, "silu")
    dx, dg, dw = _bwd(dy, x, g, rstd, w, (64,), 64, True, "silu", False)
    assert dw.numel() == 0
    dx2, dg2, dw2 = _bwd(dy, x, g, rstd, w, (64,), 64, True, "silu", True)
    assert torch.equal(dx, dx2) and torch.equal(dg, dg2) and dw2.shape == (64,)


# ---------------------------------------------------------------------------- bad inputs

def _good():
    x = torch.randn(4, 64)
    g = torch.randn(4, 64)
    w = torch.randn(64)
    y, rstd = _fwd(x, g, (64,), w, 16, True, "silu")
    return x, g, w, torch.randn(4, 64), rstd


def _both(kind, match, fwd_kw=None, bwd_kw=None):
    """Runs the forward and the backward with one argument replaced; both must raise."""
    x, g, w, dy, rstd = _good()
    f = dict(x=x, g=g, ns=[64], w=w, eps=EPS, G=16, nbg=True, act="silu")
    b = dict(dy=dy, x=x, g=g, rstd=rstd, w=w, ns=[64], G=16, nbg=True, act="silu")
    if fwd_kw is not None:
        f.update(fwd_kw)
        with pytest.raises(kind, match=match):
            OPS.gated_rms_norm_fwd(f["x"], f["g"], f["ns"], f["w"], f["eps"], f["G"], f["nbg"],
                                   f["act"])
    if bwd_kw is not None:
        b.update(bwd_kw)
        with pytest.raises(kind, match=match):
            OPS.gated_rms_norm_bwd(b["dy"], b["x"], b["g"], b["rstd"], b["w"], b["ns"], b["G"],
                                   b["nbg"], b["act"], True)


def test_bad_gate_shape():
    g = torch.randn(4, 32)
    _both(ValueError, r"rmsnorm_ext: gate shape \[4, 32\] does not match the input shape "
          r"\[4, 64\]", dict(g=g), dict(g=g))


def test_bad_gate_dtype():
    g = torch.randn(4, 64, dtype=torch.bfloat16)
    _both(TypeError, "rmsnorm_ext: gate dtype torch.bfloat16 must match the input dtype "
          "torch.float32", dict(g=g), dict(g=g))


@pytest.mark.parametrize("G", [3, 128, 48])
def test_group_size_not_dividing(G):
    _both(ValueError, f"rmsnorm_ext: group_size {G} does not divide the normalized size 64",
          dict(G=G), dict(G=G))


@pytest.mark.parametrize("G", [0, -16])
def test_group_size_not_positive(G):
    _both(ValueError, f"rmsnorm_ext: group_size must be positive, got {G}", dict(G=G),
          dict(G=G))


@pytest.mark.parametrize("act", ["relu", "SiLU", "", "swish"])
def test_unknown_activation(act):
    _both(ValueError, f'rmsnorm_ext: activation must be "silu" or "sigmoid", got "{act}"',
          dict(act=act), dict(act=act))


def test_bad_weight():
    w = torch.randn(32)
    _both(ValueError, r"rmsnorm_ext: weight must have shape normalized_shape \[64\], got \[32\]",
          dict(w=w), dict(w=w))
    w = torch.randn(64, dtype=torch.float64)
    _both(TypeError, "rmsnorm_ext: weight dtype torch.float64 is not supported with input "
          "dtype torch.float32", dict(w=w), dict(w=w))


def test_bad_input_and_normalized_shape():
    xi = torch.ones(4, 64, dtype=torch.int32)
    _both(TypeError, "rmsnorm_ext: input must be float32, float64, bfloat16 or float16, got "
          "torch.int32", dict(x=xi, g=xi), dict(x=xi, g=xi, dy=xi))
    _both(ValueError, r"rmsnorm_ext: normalized_shape \[32\] does not match",
          dict(ns=[32], w=None), dict(ns=[32], w=None))
    _both(ValueError, "rmsnorm_ext: eps must be a finite number >= 0, got -1",
          dict(eps=-1.0))


def test_bad_backward_arguments():
    _both(ValueError, r"rmsnorm_ext: grad_out shape \[4, 32\] does not match the input shape",
          bwd_kw=dict(dy=torch.randn(4, 32)))
    _both(TypeError, "rmsnorm_ext: gated_rms_norm_bwd: grad_out dtype torch.bfloat16 must "
          "match the input dtype torch.float32",
          bwd_kw=dict(dy=torch.randn(4, 64, dtype=torch.bfloat16)))
    _both(RuntimeError, r"rmsnorm_ext: rstd must have one value per row and group \(4 rows x 4 "
          r"groups\), got 4", bwd_kw=dict(rstd=torch.ones(4)))
    _both(RuntimeError, "rmsnorm_ext: rstd must be torch.float32, got torch.float64",
          bwd_kw=dict(rstd=torch.ones(4, 4, dtype=torch.float64)))


# ---------------------------------------------------------------------------- meta tensors

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_meta_shapes_and_checks(dtype):
    """Meta tensors run the same host function: output shapes and dtypes, no kernel, and the
    same argument errors."""
    x = torch.empty(2, 3, 4, 16, device="meta", dtype=dtype)
    g = torch.empty_like(x)
    w = torch.empty(4, 16, device="meta", dtype=dtype)
    y, rstd = _fwd(x, g, (4, 16), w, 8, False, "sigmoid")
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == dtype
    assert rstd.shape == (2, 3, 8) and rstd.dtype == sdt
    dx, dg, dw = _bwd(torch.empty_like(x), x, g, rstd, w, (4, 16), 8, False, "sigmoid")
    assert dx.shape == dg.shape == x.shape and dw.shape == w.shape and dw.dtype == dtype
    _, _, dw = _bwd(torch.empty_like(x), x, g, rstd, w, (4, 16), 8, False, "sigmoid", False)
    assert dw.numel() == 0
    with pytest.raises(ValueError, match="group_size 6 does not divide the normalized size 64"):
        _fwd(x, g, (4, 16), w, 6, False, "sigmoid")
    with pytest.raises(ValueError, match='got "tanh"'):
        _fwd(x, g, (4, 16), w, 8, False, "tanh")
    with pytest.raises(ValueError, match="gate shape"):
        _fwd(x, g[:1], (4, 16), w, 8, False, "silu")
