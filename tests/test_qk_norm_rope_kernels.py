"""Fused QK-norm + RoPE kernels (torch.ops.rmsnorm_ext.qk_norm_rope_fwd / _bwd) on CPU,
against a float64 reference (reference.qk_norm_rope_reference, backward by autograd on
it).

The accuracy bar is the project's (reference.assert_accurate): our error against float64
is at most 2x torch's own error -- the same composite evaluated with torch ops in the
input's dtype (weights and cos/sin cast to it) -- plus two rounding steps of the output.
Outputs are allocated from NaN-poisoned memory, so an element a kernel fails to write
shows up as NaN.
"""
import contextlib
import re

import pytest
import torch

import rmsnorm_ext  # noqa: F401  (loads the ops)
from reference import (CUDA_KERNELS_ON_CPU, assert_accurate, assert_same_kernel_result,
                       poison_allocator, qk_norm_rope_reference, rope_reference)

OPS = torch.ops.rmsnorm_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = 1e-6
CONVENTIONS = [False, True]
CONV_IDS = ["rotate_half", "interleaved"]


def _rope_tables(lead, S, D, interleaved, per_batch, dtype, gen, theta=10000.0):
    """Hugging Face's cos/sin: one frequency per pair, repeated in both halves (rotate-half)
    or in both elements of a pair (GPT-J). Positions differ per batch row when per_batch
    ([B, S, D]); with a random phase so every entry is exercised."""
    B = 1
    for n in lead:
        B *= n
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    if per_batch:
        pos = torch.arange(S, dtype=torch.float64)[None, :] + torch.randint(
            0, 1000, (B, 1), generator=gen).double()
    else:
        pos = torch.arange(S, dtype=torch.float64)
    freqs = pos[..., None] * inv  # [..., S, D/2]
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _make(lead, S, Hq, Hk, D, dtype, wdtype, csdtype, interleaved, per_batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(*lead, S, Hq, D, generator=gen) + 0.2).to(dtype)
    k = (torch.randn(*lead, S, Hk, D, generator=gen) * 3 - 0.1).to(dtype)
    if wdtype is None:
        qw = kw = None
    else:
        qw = (torch.randn(D, generator=gen) * 0.5 + 1.0).to(wdtype)
        kw = (torch.randn(D, generator=gen) * 0.5 + 1.0).to(wdtype)
    cos, sin = _rope_tables(lead, S, D, interleaved, per_batch, csdtype or dtype, gen)
    gq = torch.randn(*lead, S, Hq, D, generator=gen).to(dtype)
    gk = torch.randn(*lead, S, Hk, D, generator=gen).to(dtype)
    return q, k, qw, kw, cos, sin, gq, gk


def _fwd(q, k, qw, kw, cos, sin, il, eps=EPS):
    return OPS.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, eps, il)


def _bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, il, want_dw=True):
    return OPS.qk_norm_rope_bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, il, want_dw)


def _autograd(q, k, qw, kw, cos, sin, gq, gk, il):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    outs = qk_norm_rope_reference(*leaves, cos, sin, EPS, il)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, wanted, (gq, gk))
    it = iter(grads)
    return [o.detach() for o in outs], [None if t is None else next(it) for t in leaves]


def _rstd_ref(x):
    return torch.rsqrt(x.double().pow(2).mean(-1) + EPS)


def _scales(x, w, g, cos, sin, il):
    """One rounding step's scales of dx and of the weight gradient (see
    test_gated_kernels._references): dx = r * (du * w - vhat * mean(du * w * vhat))
    cancels, its error grows with r * |du * w|; dw sums |du * vhat| over rows."""
    r = _rstd_ref(x).unsqueeze(-1)
    u = torch.zeros_like(x, dtype=torch.float64).requires_grad_()
    (du,) = torch.autograd.grad(rope_reference(u, cos.double(), sin.double(), il), u, g.double())
    duw = du * (1.0 if w is None else w.double())
    vhat = x.double() * r
    dx_scale = (r * duw).abs().max().item() if x.numel() else 0.0
    dw_scale = (du.abs() * vhat.abs()).reshape(-1, x.shape[-1]).sum(0).max().item() \
        if x.numel() else 0.0
    return dx_scale, dw_scale


def _check(q, k, qw, kw, cos, sin, gq, gk, il, what):
    dtype = q.dtype
    poison_allocator("cpu", 4 * (q.numel() + k.numel()) * q.element_size())
    qo, ko, rq, rk = _fwd(q, k, qw, kw, cos, sin, il)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert qo.dtype == dtype and ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    assert rq.shape == q.shape[:-1] and rk.shape == k.shape[:-1]
    assert rq.dtype == sdt and rk.dtype == sdt
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(rq.double(), _rstd_ref(q), rtol=rtol, atol=0, msg=what)
    torch.testing.assert_close(rk.double(), _rstd_ref(k), rtol=rtol, atol=0, msg=what)

    d64 = [None if t is None else t.double() for t in (q, k, qw, kw, cos, sin, gq, gk)]
    (qo_ref, ko_ref), g_ref = _autograd(*d64, il)
    cast = [None if t is None else t.to(dtype) for t in (q, k, qw, kw, cos, sin, gq, gk)]
    (qo_base, ko_base), g_base = _autograd(*cast, il)
    assert_accurate(qo, qo_ref, qo_base, what=f"q_out {what}")
    assert_accurate(ko, ko_ref, ko_base, what=f"k_out {what}")

    poison_allocator("cpu", 4 * (q.numel() + k.numel()) * q.element_size())
    dq, dk, dwq, dwk = _bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, il)
    assert dq.dtype == dtype and dk.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape
    for i, (x, w, g, dx, dw, name) in enumerate(((q, qw, gq, dq, dwq, "q"),
                                                 (k, kw, gk, dk, dwk, "k"))):
        dx_scale, dw_scale = _scales(x, w, g, cos, sin, il)
        assert_accurate(dx, g_ref[i], g_base[i], dtype=dtype, what=f"d{name} {what}",
                        scale=max(dx_scale, g_ref[i].abs().max().item() if x.numel() else 0.0))
        if w is None:
            assert dw.numel() == 0
        else:
            assert dw.dtype == w.dtype and dw.shape == w.shape
            assert_accurate(dw, g_ref[2 + i], g_base[2 + i], dtype=dtype,
                            what=f"d{name}_weight {what}", scale=dw_scale)
    return qo, ko, rq, rk, dq, dk, dwq, dwk


# ---------------------------------------------------------------------------- accuracy

def _param_combos(dtype):
    """(weight dtype, cos/sin dtype): None = no weight; the input's dtype; float32 weights
    and float32 cos/sin next to bfloat16/float16."""
    out = [(dtype, dtype), (None, dtype)]
    if dtype in (torch.bfloat16, torch.float16):
        out += [(torch.float32, torch.float32), (torch.float32, dtype), (dtype, torch.float32)]
    return out


@pytest.mark.parametrize("D", [2, 64, 128, 130, 1030])  # 1030: past the kept-row limit (AVX-512)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True], ids=["cs_SD", "cs_BSD"])
@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_forward_backward_accuracy(il, per_batch, dtype, D):
    lead, S, Hq, Hk = (2,), 5, 8, 2  # GQA: 8 query heads, 2 key heads
    for wdtype, csdtype in _param_combos(dtype):
        what = f"il={il} per_batch={per_batch} {dtype} D={D} w={wdtype} cs={csdtype}"
        _check(*_make(lead, S, Hq, Hk, D, dtype, wdtype, csdtype, il, per_batch), il, what)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["none", "B3", "2x3"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["cs_SD", "cs_BSD"])
@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_leading_dims(il, per_batch, lead):
    """No leading dims (B = 1) and several (B = their product) with both table layouts."""
    args = _make(lead, 7, 4, 4, 64, torch.float32, torch.float32, None, il, per_batch, seed=1)
    _check(*args, il, f"lead={lead}")


@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("dtype,wdtype,csdtype", [(torch.bfloat16, torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float32, torch.float32)],
                         ids=str)
def test_qwen3_shape(il, dtype, wdtype, csdtype):
    """Qwen3-8B's attention: q [1, 256, 32, 128], k [1, 256, 8, 128]."""
    args = _make((1,), 256, 32, 8, 128, dtype, wdtype, csdtype, il, True, seed=2)
    _check(*args, il, f"qwen3 {dtype} w={wdtype} cs={csdtype}")


@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_usual_formulas(il):
    """With Hugging Face's repeated tables the rotation is the usual one: (x1, x2) pairs
    rotated by theta_i = pos * inv_freq[i] (half-split pairs, or adjacent pairs for GPT-J),
    checked independently of rope_reference on an unweighted row."""
    D, S = 8, 3
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, S, 1, D, generator=gen, dtype=torch.float64)
    cos, sin = _rope_tables((1,), S, D, il, False, torch.float64, gen)
    qo, _, rq, _ = _fwd(q, q, None, None, cos, sin, il, eps=0.0)
    u = q * rq.unsqueeze(-1)
    theta = torch.arange(S, dtype=torch.float64)[:, None] / 10000.0 ** (
        torch.arange(0, D, 2, dtype=torch.float64) / D)
    if il:
        x1, x2 = u[..., 0::2], u[..., 1::2]
    else:
        x1, x2 = u[..., :D // 2], u[..., D // 2:]
    c, s = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    want = torch.stack((o1, o2), -1).flatten(-2) if il else torch.cat((o1, o2), -1)
    torch.testing.assert_close(qo, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_general_tables(il):
    """Arbitrary (not repeated, not unit-norm) cos/sin: each output element uses the entries
    of its own index, exactly as documented; the backward is the transpose."""
    args = list(_make((2,), 3, 2, 3, 12, torch.float64, torch.float64, None, il, True, seed=4))
    gen = torch.Generator().manual_seed(5)
    args[4] = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64)
    args[5] = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64)
    _check(*args, il, "general tables")


# ---------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("D", [96, 1024, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_identity_rotation_is_rms_norm(il, dtype, D):
    """cos = 1, sin = 0: q and k normalized by rms_norm, bit for bit (forward), and the
    backward equals rms_norm's. In bfloat16 the two kernels may differ in whether they keep
    a row converted to fp32 between passes (row_stats.h keep_row: on AVX-512 rms_norm never
    does, qk_norm_rope does up to D = 1024): the statistics must not depend on it. D = 1024
    is kept by one and not the other there, with enough terms per lane that the order of
    the sums shows (at D = 96 bfloat16 squares add exactly in fp32)."""
    q, k, qw, kw, _, _, gq, gk = _make((2,), 9, 4, 2, D, dtype, dtype, None, il, False, seed=6)
    cos, sin = torch.ones(9, D, dtype=dtype), torch.zeros(9, D, dtype=dtype)
    qo, ko, rq, rk = _fwd(q, k, qw, kw, cos, sin, il)
    for x, w, o, r in ((q, qw, qo, rq), (k, kw, ko, rk)):
        y, r2 = OPS.rms_norm_fwd(x, [D], w, EPS, 0.0)
        assert_same_kernel_result(r, r2)
        if dtype == torch.float32:
            torch.testing.assert_close(o, y, rtol=2e-7 if not CUDA_KERNELS_ON_CPU else 5e-7,
                                       atol=0)
        else:
            assert_same_kernel_result(o, y)
    dq, dk, dwq, dwk = _bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, il)
    for x, w, g, r, dx, dw in ((q, qw, gq, rq, dq, dwq), (k, kw, gk, rk, dk, dwk)):
        dx2, dw2 = OPS.rms_norm_bwd(g, x, r, w, [D], 0.0, None, True)
        if dtype == torch.float32:
            torch.testing.assert_close(dx, dx2, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(dw, dw2, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(dx, dx2)
            torch.testing.assert_close(dw, dw2)


@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_shared_tables_equal_repeated(il):
    """cos/sin [S, D] give the same bits as the same table repeated per batch [B, S, D]."""
    q, k, qw, kw, cos, sin, gq, gk = _make((3,), 6, 4, 2, 64, torch.bfloat16, torch.float32,
                                           torch.float32, il, False, seed=7)
    a = _fwd(q, k, qw, kw, cos, sin, il)
    cb, sb = cos.expand(3, 6, 64), sin.expand(3, 6, 64)
    b = _fwd(q, k, qw, kw, cb, sb, il)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ga = _bwd(gq, gk, q, k, qw, kw, cos, sin, a[2], a[3], il)
    gb = _bwd(gq, gk, q, k, qw, kw, cb, sb, a[2], a[3], il)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_non_contiguous_inputs(il):
    """Strided q, k (a slice of a fused qkv projection, a transposed [B, H, S, D] view),
    grads, weights, tables and statistics are made contiguous by the host: same bits."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hk, D)
    q = qkv[:, :, :Hq]
    k = torch.randn(B, Hk, S, D).transpose(1, 2)
    gq = torch.randn(B, S, Hq, 2 * D)[..., ::2]
    gk = torch.randn(B, Hk, S, D).transpose(1, 2)
    qw = torch.randn(2 * D)[::2]
    kw = torch.randn(D)
    cos, sin = _rope_tables((B,), S, D, il, True, torch.float32, torch.Generator().manual_seed(8))
    cos_nc = cos.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (q, k, gq, gk, qw, cos_nc))
    a = _fwd(q, k, qw, kw, cos_nc, sin, il)
    c = [t.contiguous() for t in (q, k, qw, kw, cos, sin)]
    b = _fwd(*c, il)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    rq_nc = a[2].transpose(0, 1).contiguous().transpose(0, 1)
    ga = _bwd(gq, gk, q, k, qw, kw, cos_nc, sin, rq_nc, a[3], il)
    gb = _bwd(gq.contiguous(), gk.contiguous(), *c[:4], c[4], c[5], b[2], b[3], il)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


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
@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_weight_grad_deterministic(il, dtype, wdtype):
    """The weight gradients are bitwise reproducible for a thread count, and 1 and 2
    threads agree to rounding (they sum the rows in different trees)."""
    q, k, qw, kw, cos, sin, gq, gk = _make((2,), 300, 16, 4, 128, dtype, wdtype, None, il, True,
                                           seed=9)
    results = {}
    for n in (1, 2):
        with _num_threads(n):
            fwd = _fwd(q, k, qw, kw, cos, sin, il)
            first = _bwd(gq, gk, q, k, qw, kw, cos, sin, fwd[2], fwd[3], il)
            for _ in range(2):
                again = _bwd(gq, gk, q, k, qw, kw, cos, sin, fwd[2], fwd[3], il)
                for name, a, b in zip(("dq", "dk", "dwq", "dwk"), first, again):
                    assert torch.equal(a, b), f"{name} differs between identical runs ({n} threads)"
            results[n] = (fwd, first)
    (f1, g1), (f2, g2) = results[1], results[2]
    for a, b in zip(f1, f2):
        assert torch.equal(a, b)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])  # row-local: same bits
    for a, b in zip(g1[2:], g2[2:]):
        tol = 64 * torch.finfo(wdtype).eps * max(a.double().abs().max().item(), 1.0)
        assert (a.double() - b.double()).abs().max().item() <= tol


def test_weight_grad_many_rows():
    """Many head rows (M >> D): the weight gradients' sums over rows are tree-summed."""
    il = False
    args = _make((4,), 512, 8, 2, 64, torch.float32, torch.float32, None, il, True, seed=10)
    _check(*args, il, "many rows")


def test_no_weight_grad_when_not_wanted():
    q, k, qw, kw, cos, sin, gq, gk = _make((1,), 4, 2, 1, 32, torch.float32, torch.float32,
                                           None, False, False)
    _, _, rq, rk = _fwd(q, k, qw, kw, cos, sin, False)
    a = _bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, False, False)
    assert a[2].numel() == 0 and a[3].numel() == 0
    b = _bwd(gq, gk, q, k, qw, kw, cos, sin, rq, rk, False, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert b[2].shape == (32,) and b[3].shape == (32,)
    # one weight only
    c = _bwd(gq, gk, q, k, qw, None, cos, sin, rq, rk, False, True)
    assert c[2].shape == (32,) and c[3].numel() == 0


# ---------------------------------------------------------------------------- empty sizes

@pytest.mark.parametrize("il", CONVENTIONS, ids=CONV_IDS)
def test_empty_inputs(il):
    qw, kw = torch.randn(64), torch.randn(64)
    for q, k, cos in ((torch.randn(2, 0, 4, 64), torch.randn(2, 0, 2, 64), torch.randn(0, 64)),
                      (torch.randn(0, 3, 4, 64), torch.randn(0, 3, 2, 64), torch.randn(0, 3, 64)),
                      (torch.randn(2, 3, 4, 64), torch.randn(2, 3, 0, 64), torch.randn(3, 64))):
        sin = torch.randn_like(cos)
        qo, ko, rq, rk = _fwd(q, k, qw, kw, cos, sin, il)
        assert qo.shape == q.shape and ko.shape == k.shape
        assert rq.shape == q.shape[:-1] and rk.shape == k.shape[:-1]
        dq, dk, dwq, dwk = _bwd(torch.randn_like(q), torch.randn_like(k), q, k, qw, kw, cos, sin,
                                rq, rk, il)
        assert dq.shape == q.shape and dk.shape == k.shape
        if k.numel() == 0:
            assert torch.equal(dwk, torch.zeros(64))
        if q.numel() == 0:
            assert torch.equal(dwq, torch.zeros(64))
        _, _, dwq, dwk = _bwd(torch.randn_like(q), torch.randn_like(k), q, k, qw, kw, cos, sin,
                              rq, rk, il, False)
        assert dwq.numel() == 0 and dwk.numel() == 0
    # D = 0: rows of no elements have rstd NaN, as rms_norm_fwd gives
    q, k, cos = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 1, 0), torch.randn(2, 0)
    qo, ko, rq, rk = _fwd(q, k, None, None, cos, cos, il)
    assert rq.shape == (1, 2, 3) and rq.isnan().all() and rk.isnan().all()


# ---------------------------------------------------------------------------- bad inputs

def _good(device="cpu"):
    q = torch.randn(2, 4, 8, 64, device=device)
    k = torch.randn(2, 4, 2, 64, device=device)
    qw, kw = torch.randn(64, device=device), torch.randn(64, device=device)
    cos, sin = torch.randn(4, 64, device=device), torch.randn(4, 64, device=device)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    rq = torch.ones(2, 4, 8, device=device)
    rk = torch.ones(2, 4, 2, device=device)
    return dict(q=q, k=k, qw=qw, kw=kw, cos=cos, sin=sin, gq=gq, gk=gk, rq=rq, rk=rk, eps=EPS)


def _raise(device, kind, match, fwd=None, bwd=None):
    """Runs the forward and/or the backward with arguments replaced (tensors made by
    functions of the device, so meta and CPU see the same call); both must raise `kind`
    with `match`. Returns the messages."""
    msgs = []
    for which, repl in (("fwd", fwd), ("bwd", bwd)):
        if repl is None:
            continue
        a = _good(device)
        a.update({n: (f(device) if callable(f) else f) for n, f in repl.items()})
        with pytest.raises(kind, match=match) as ei:
            if which == "fwd":
                OPS.qk_norm_rope_fwd(a["q"], a["k"], a["qw"], a["kw"], a["cos"], a["sin"],
                                     a["eps"], False)
            else:
                OPS.qk_norm_rope_bwd(a["gq"], a["gk"], a["q"], a["k"], a["qw"], a["kw"],
                                     a["cos"], a["sin"], a["rq"], a["rk"], False, True)
        msgs.append(str(ei.value).split("\n")[0])
    return msgs


def _t(*shape, dtype=torch.float32):
    return lambda d: torch.randn(*shape, device=d).to(dtype)


BAD = [
    # (id, exception, message regex, forward replacements, backward replacements)
    ("odd_D", ValueError, "rmsnorm_ext: the head dimension D must be even for the rotary "
     "embedding, got D = 63",
     dict(q=_t(2, 4, 8, 63), k=_t(2, 4, 2, 63), qw=None, kw=None, cos=_t(4, 63), sin=_t(4, 63)),
     dict(q=_t(2, 4, 8, 63), k=_t(2, 4, 2, 63), gq=_t(2, 4, 8, 63), gk=_t(2, 4, 2, 63), qw=None,
          kw=None, cos=_t(4, 63), sin=_t(4, 63))),
    ("rank", ValueError, r"rmsnorm_ext: q must have shape \[\.\.\., S, Hq, D\] \(at least 3 "
     r"dimensions\), got \[4, 64\]", dict(q=_t(4, 64)), dict(q=_t(4, 64), gq=_t(4, 64))),
    ("k_rank", ValueError, r"rmsnorm_ext: k must have shape \[\.\.\., S, Hk, D\]",
     dict(k=_t(64)), dict(k=_t(64), gk=_t(64))),
    ("S_mismatch", ValueError, r"rmsnorm_ext: q and k must have the same leading dimensions "
     r"and sequence length \(shape\[:-2\]\), got q shape \[2, 4, 8, 64\] and k shape "
     r"\[2, 5, 2, 64\]", dict(k=_t(2, 5, 2, 64)), dict(k=_t(2, 5, 2, 64), gk=_t(2, 5, 2, 64))),
    ("lead_mismatch", ValueError, "rmsnorm_ext: q and k must have the same leading dimensions",
     dict(k=_t(3, 4, 2, 64)), dict(k=_t(3, 4, 2, 64), gk=_t(3, 4, 2, 64))),
    ("ndim_mismatch", ValueError, "rmsnorm_ext: q and k must have the same leading dimensions",
     dict(k=_t(1, 2, 4, 2, 64)), None),
    ("D_mismatch", ValueError, r"rmsnorm_ext: q and k must have the same head dimension D "
     r"\(shape\[-1\]\), got q shape \[2, 4, 8, 64\] and k shape \[2, 4, 2, 32\]",
     dict(k=_t(2, 4, 2, 32)), dict(k=_t(2, 4, 2, 32), gk=_t(2, 4, 2, 32))),
    ("qk_dtype", TypeError, "rmsnorm_ext: k dtype torch.bfloat16 must match the q dtype "
     "torch.float32", dict(k=_t(2, 4, 2, 64, dtype=torch.bfloat16)),
     dict(k=_t(2, 4, 2, 64, dtype=torch.bfloat16))),
    ("int_q", TypeError, "rmsnorm_ext: q must be float32, float64, bfloat16 or float16, got "
     "torch.int32", dict(q=_t(2, 4, 8, 64, dtype=torch.int32)), None),
    ("weight_shape", ValueError, r"rmsnorm_ext: q_weight must have shape \[D\] = \[64\], got "
     r"\[32\]", dict(qw=_t(32)), dict(qw=_t(32))),
    ("weight_2d", ValueError, r"rmsnorm_ext: k_weight must have shape \[D\] = \[64\], got "
     r"\[1, 64\]", dict(kw=_t(1, 64)), dict(kw=_t(1, 64))),
    ("weight_dtype", TypeError, "rmsnorm_ext: k_weight dtype torch.float64 is not supported "
     "with q dtype torch.float32", dict(kw=_t(64, dtype=torch.float64)),
     dict(kw=_t(64, dtype=torch.float64))),
    ("cos_shape", ValueError, r"rmsnorm_ext: cos must have shape \[S, D\] = \[4, 64\], "
     r"\[1, S, D\] or \[B, S, D\] = \[2, 4, 64\] \(B: the product of q's leading dims\), "
     r"got \[5, 64\]",
     dict(cos=_t(5, 64)), dict(cos=_t(5, 64))),
    ("cos_batch", ValueError, r"rmsnorm_ext: cos must have shape .* got \[3, 4, 64\]",
     dict(cos=_t(3, 4, 64)), dict(cos=_t(3, 4, 64))),
    ("sin_D", ValueError, r"rmsnorm_ext: sin must have shape .* got \[4, 32\]",
     dict(sin=_t(4, 32)), dict(sin=_t(4, 32))),
    ("sin_layout", ValueError, r"rmsnorm_ext: sin shape \[2, 4, 64\] must match the cos shape "
     r"\[4, 64\]", dict(sin=_t(2, 4, 64)), dict(sin=_t(2, 4, 64))),
    ("sin_batch_vs_shared", ValueError, r"rmsnorm_ext: sin shape \[2, 4, 64\] must match the "
     r"cos shape \[1, 4, 64\]", dict(cos=_t(1, 4, 64), sin=_t(2, 4, 64)),
     dict(cos=_t(1, 4, 64), sin=_t(2, 4, 64))),
    ("cos_dtype", TypeError, "rmsnorm_ext: cos/sin dtype torch.float64 is not supported with q "
     "dtype torch.float32", dict(cos=_t(4, 64, dtype=torch.float64),
                                 sin=_t(4, 64, dtype=torch.float64)),
     dict(cos=_t(4, 64, dtype=torch.float64), sin=_t(4, 64, dtype=torch.float64))),
    ("sin_dtype", TypeError, "rmsnorm_ext: sin dtype torch.float16 must match the cos dtype "
     "torch.float32", dict(sin=_t(4, 64, dtype=torch.float16)),
     dict(sin=_t(4, 64, dtype=torch.float16))),
    ("cos_int", TypeError, "rmsnorm_ext: cos must be float32, float64, bfloat16 or float16, "
     "got torch.int64", dict(cos=lambda d: torch.ones(4, 64, dtype=torch.long, device=d)), None),
    ("eps", ValueError, "rmsnorm_ext: eps must be a finite number >= 0, got -1",
     dict(eps=-1.0), None),
    ("grad_q_shape", ValueError, r"rmsnorm_ext: grad_q shape \[2, 4, 8, 32\] does not match "
     r"the q shape \[2, 4, 8, 64\]", None, dict(gq=_t(2, 4, 8, 32))),
    ("grad_k_dtype", TypeError, "rmsnorm_ext: grad_k dtype torch.float16 must match the k "
     "dtype torch.float32", None, dict(gk=_t(2, 4, 2, 64, dtype=torch.float16))),
    ("rstd_numel", RuntimeError, r"rmsnorm_ext: q_rstd must have one value per row \(64 rows\), "
     "got 8", None, dict(rq=_t(8))),
    ("rstd_dtype", RuntimeError, "rmsnorm_ext: k_rstd must be torch.float32, got torch.float64",
     None, dict(rk=_t(2, 4, 2, dtype=torch.float64))),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(case, device):
    _, kind, match, fwd, bwd = case
    _raise(device, kind, match, fwd, bwd)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_same_on_meta(case):
    """Meta tensors get the very same exception type and message as CPU ones."""
    _, kind, match, fwd, bwd = case
    cpu = _raise("cpu", kind, match, fwd, bwd)
    meta = _raise("meta", kind, match, fwd, bwd)
    norm = [re.sub(r"\b(cpu|meta)\b", "<dev>", m) for m in cpu + meta]
    assert norm[:len(cpu)] == norm[len(cpu):]


@pytest.mark.parametrize("name", ["k", "qw", "kw", "cos", "sin", "gq", "gk", "rq", "rk"])
def test_device_mismatch(name):
    """An argument on another device than q: a RuntimeError naming both devices (meta is
    the other device here; the same check covers CPU / CUDA)."""
    other = _good("meta")[name]
    msg = {"qw": "q_weight", "kw": "k_weight", "gq": "grad_q", "gk": "grad_k", "rq": "q_rstd",
           "rk": "k_rstd"}.get(name, name)
    for dev, arg in (("cpu", other), ("meta", _good("cpu")[name])):
        a = _good(dev)
        a[name] = arg
        with pytest.raises(RuntimeError, match=f"rmsnorm_ext: {msg} is on"):
            OPS.qk_norm_rope_bwd(a["gq"], a["gk"], a["q"], a["k"], a["qw"], a["kw"], a["cos"],
                                 a["sin"], a["rq"], a["rk"], False, True)
        if name in ("k", "qw", "kw", "cos", "sin"):
            with pytest.raises(RuntimeError, match=f"rmsnorm_ext: {msg} is on"):
                OPS.qk_norm_rope_fwd(a["q"], a["k"], a["qw"], a["kw"], a["cos"], a["sin"], EPS,
                                     True)


def test_meta_shapes():
    """Meta tensors: the output shapes and dtypes, no data touched."""
    q = torch.empty(2, 16, 8, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 16, 2, 128, device="meta", dtype=torch.bfloat16)
    w = torch.empty(128, device="meta")
    cos = torch.empty(2, 16, 128, device="meta")
    qo, ko, rq, rk = _fwd(q, k, w, w, cos, cos, True)
    assert qo.shape == q.shape and qo.dtype == torch.bfloat16 and qo.is_meta
    assert rq.shape == (2, 16, 8) and rk.shape == (2, 16, 2) and rq.dtype == torch.float32
    dq, dk, dwq, dwk = _bwd(q, k, q, k, w, None, cos, cos, rq, rk, True)
    assert dq.shape == q.shape and dk.shape == k.shape
    assert dwq.shape == (128,) and dwq.dtype == torch.float32 and dwk.numel() == 0
