"""qk_norm_rope as a user meets it: against Hugging Face's Qwen3 attention preamble
(q_norm / k_norm, transpose, apply_rotary_pos_emb), autograd to second order, torch.func,
vmap, compile, opcheck. The kernels' accuracy: tests/test_qk_norm_rope_kernels.py."""
import warnings

import pytest
import torch
from torch.func import grad, jvp, vmap

import rmsnorm_ext as R
from rmsnorm_ext._table import qk_norm_rope_composite


def _inputs(B=2, S=5, Hq=4, Hk=2, D=8, dtype=torch.float64, batched_tables=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, S, Hk, D, generator=g, dtype=dtype)
    qw = torch.randn(D, generator=g, dtype=dtype)
    kw = torch.randn(D, generator=g, dtype=dtype)
    pos = torch.arange(S, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(pos, inv)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if batched_tables:
        cos, sin = cos.expand(B, S, D).contiguous(), sin.expand(B, S, D).contiguous()
    return q, k, qw, kw, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_qwen3_preamble(dtype):
    tr = pytest.importorskip("transformers")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb
    q, k, qw, kw, cos, sin = _inputs(dtype=torch.float32, batched_tables=True, D=16)
    q, k = q.to(dtype), k.to(dtype)
    qn, kn = Qwen3RMSNorm(16, eps=1e-6).to(dtype), Qwen3RMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(qw)
        kn.weight.copy_(kw)
    hq, hk = apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos.to(dtype),
                                  sin.to(dtype))
    oq, ok = R.qk_norm_rope(q, k, qn.weight, kn.weight, cos.to(dtype), sin.to(dtype), 1e-6)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oq.transpose(1, 2), hq, **tol)
    torch.testing.assert_close(ok.transpose(1, 2), hk, **tol)
    del tr


@pytest.mark.parametrize("batch", [1, 3])
def test_takes_hf_rotary_output_as_is(batch):
    """Qwen3's rotary embedding with the model's default position ids returns [1, S, D]
    tables for any batch size (apply_rotary_pos_emb broadcasts them): taken as they are,
    with the values of HF's own norms + rotation."""
    tr = pytest.importorskip("transformers")
    from transformers.models.qwen3 import modeling_qwen3 as m
    cfg = tr.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=1, intermediate_size=64, vocab_size=32)
    torch.manual_seed(0)
    hidden = torch.randn(batch, 5, 64)
    cos, sin = m.Qwen3RotaryEmbedding(cfg)(hidden, torch.arange(5)[None])
    assert cos.shape == (1, 5, 16)
    q, k = torch.randn(batch, 5, 4, 16), torch.randn(batch, 5, 2, 16)
    qn, kn = m.Qwen3RMSNorm(16, eps=1e-6), m.Qwen3RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        qn.weight.add_(torch.randn(16) * 0.1)
        kn.weight.add_(torch.randn(16) * 0.1)
    hq, hk = m.apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos, sin)
    oq, ok = R.qk_norm_rope(q, k, qn.weight, kn.weight, cos, sin, 1e-6)
    torch.testing.assert_close(oq.transpose(1, 2), hq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ok.transpose(1, 2), hk, rtol=1e-5, atol=1e-5)
    # and its gradients, against the composite with the table expanded per batch item
    args = [t.clone().requires_grad_() for t in (q, k, qn.weight, kn.weight)]
    gq = torch.randn_like(q)
    got = torch.autograd.grad(R.qk_norm_rope(*args, cos, sin, 1e-6)[0], args[:3], gq)
    ce, se = cos.expand(batch, 5, 16), sin.expand(batch, 5, 16)
    want = torch.autograd.grad(R.qk_norm_rope(*args, ce, se, 1e-6)[0], args[:3], gq)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    del tr


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_gradcheck_and_gradgradcheck(interleaved, batched_tables):
    q, k, qw, kw, cos, sin = _inputs(S=3, Hq=2, Hk=1, D=4, batched_tables=batched_tables)
    args = [t.requires_grad_() for t in (q, k, qw, kw)]
    f = lambda q, k, qw, kw: R.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6,  # noqa: E731
                                            interleaved=interleaved)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("interleaved", [False, True])
def test_torch_func_vmap_and_values(interleaved):
    q, k, qw, kw, cos, sin = _inputs()
    ours = lambda q, k, qw, kw: R.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6,  # noqa: E731
                                               interleaved=interleaved)
    ref = lambda q, k, qw, kw: qk_norm_rope_composite(q, k, qw, kw, cos, sin, 1e-6,  # noqa: E731
                                                      interleaved)
    sq = lambda f: (lambda *a: sum(o.square().sum() for o in f(*a)))  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        close(ours(q, k, qw, kw), ref(q, k, qw, kw))
        close(grad(sq(ours), argnums=(0, 1, 2, 3))(q, k, qw, kw),
              grad(sq(ref), argnums=(0, 1, 2, 3))(q, k, qw, kw))
        t = tuple(torch.randn_like(a) for a in (q, k, qw, kw))
        close(jvp(ours, (q, k, qw, kw), t), jvp(ref, (q, k, qw, kw), t))
        close(vmap(ours, in_dims=(0, 0, None, None))(q, k, qw, kw),
              vmap(ref, in_dims=(0, 0, None, None))(q, k, qw, kw))
        close(vmap(grad(sq(ours), argnums=2), in_dims=(0, 0, None, None))(q, k, qw, kw),
              vmap(grad(sq(ref), argnums=2), in_dims=(0, 0, None, None))(q, k, qw, kw))


def test_compile_fullgraph_and_opcheck():
    q, k, qw, kw, cos, sin = (t.float() for t in _inputs())
    q.requires_grad_()
    f = lambda q: R.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)  # noqa: E731
    eager = f(q)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(torch.autograd.grad(comp[0].sum(), q),
                               torch.autograd.grad(eager[0].sum(), q))
    ops = torch.ops.rmsnorm_ext
    qd = q.detach()
    torch.library.opcheck(ops.qk_norm_rope_fwd, (qd, k, qw, kw, cos, sin, 1e-6, False))
    oq, ok, rq, rk = ops.qk_norm_rope_fwd(qd, k, qw, kw, cos, sin, 1e-6, True)
    torch.library.opcheck(ops.qk_norm_rope_bwd, (torch.randn_like(oq), torch.randn_like(ok), qd,
                                                 k, qw, kw, cos, sin, rq, rk, True, True))


# ------------------------------------------------ the CPU kernels' position-major paths
# (csrc/cpu/qk_norm_rope_cpu.cpp): tails of the half-row / row steps, odd and single head
# counts, cos/sin converted per position (Tables), interleaved lane swaps, rstd in
# row_sumsq's order.

from test_qk_norm_rope_kernels import (  # noqa: E402
    DTYPES, EPS, OPS, _check, _make, _param_combos)


@pytest.mark.parametrize("D", [6, 40, 72, 136])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("il", [False, True], ids=["rotate_half", "interleaved"])
def test_step_tails_and_odd_heads(il, dtype, D):
    """D / 2 (rotate-half) or D (interleaved) not a multiple of the vector step, 3 query
    heads and 1 key head (a table reused by several rows, and by one), both table layouts,
    every weight / cos-sin dtype combination; forward and backward against float64."""
    for per_batch in (False, True):
        for wdtype, csdtype in _param_combos(dtype):
            what = f"il={il} {dtype} D={D} per_batch={per_batch} w={wdtype} cs={csdtype}"
            args = _make((2,), 5, 3, 1, D, dtype, wdtype, csdtype, il, per_batch, seed=D)
            _check(*args, il, what)


@pytest.mark.parametrize("D", [40, 128, 136, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rstd_is_rms_norms_bit_for_bit(dtype, D):
    """The kernels' own sum of squares follows row_sumsq's order (accumulators, blocks of
    32 steps -- D = 2048 spans several -- and the final reduction): rstd equals
    rms_norm_fwd's bit for bit, for q and k, rotate-half and interleaved."""
    q, k, qw, kw, cos, sin, _, _ = _make((1,), 3, 5, 2, D, dtype, dtype, None, False, False,
                                         seed=11)
    for il in (False, True):
        _, _, rq, rk = OPS.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, EPS, il)
        for x, r in ((q, rq), (k, rk)):
            _, r2 = OPS.rms_norm_fwd(x, [D], None, EPS, 0.0)
            assert torch.equal(r, r2), f"il={il} {dtype} D={D}"


@pytest.mark.parametrize("il", [False, True], ids=["rotate_half", "interleaved"])
def test_positions_split_across_threads(il):
    """An odd number of positions (37) over several threads, with per-batch tables: each
    thread's first position converts its own tables; the outputs and input gradients do
    not depend on the thread count."""
    args = _make((1,), 37, 3, 1, 64, torch.bfloat16, torch.float32, torch.bfloat16, il, True,
                 seed=12)
    q, k, qw, kw, cos, sin, gq, gk = args
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            f = OPS.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, EPS, il)
            b = OPS.qk_norm_rope_bwd(gq, gk, q, k, qw, kw, cos, sin, f[2], f[3], il, False)
            outs.append(list(f) + list(b[:2]))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    _check(*args, il, "37 positions")
