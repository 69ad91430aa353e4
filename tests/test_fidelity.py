"""The drop-in matrix: every differentiable op x every torch feature that touches a norm,
compared with torch's own op on the same inputs (float64, so the comparison is of the math,
not of rounding). A feature that works with F.rms_norm / F.layer_norm must work with ours
and give the same values."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils.checkpoint import checkpoint

import rmsnorm_ext as R

D = 6
TOL = dict(rtol=1e-9, atol=1e-10)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# Each case: (ours(x, *params), torch's(x, *params), params). The first output is compared;
# fused_add_rms_norm's h is folded in so its derivatives are compared too.
def _fused_ours(x, r, w):
    y, h = R.fused_add_rms_norm(x, r, (D,), w, 1e-5)
    return y + 0.5 * h * h


def _fused_ref(x, r, w):
    h = x + r
    return F.rms_norm(h, (D,), w, 1e-5) + 0.5 * h * h


CASES = {
    "rms_norm": (lambda x, w: R.rms_norm(x, (D,), w, 1e-5),
                 lambda x, w: F.rms_norm(x, (D,), w, 1e-5), lambda lead: (_x(D, seed=1),)),
    "rms_norm_gemma": (lambda x, w: R.rms_norm(x, (D,), w, 1e-5, weight_offset=1.0),
                       lambda x, w: F.rms_norm(x, (D,), 1.0 + w, 1e-5),
                       lambda lead: (_x(D, seed=1),)),
    "rms_norm_no_weight": (lambda x: R.rms_norm(x, (D,), None, 1e-5),
                           lambda x: F.rms_norm(x, (D,), None, 1e-5), lambda lead: ()),
    "layer_norm": (lambda x, w, b: R.layer_norm(x, (D,), w, b),
                   lambda x, w, b: F.layer_norm(x, (D,), w, b),
                   lambda lead: (_x(D, seed=1), _x(D, seed=2))),
    "layer_norm_bias_only": (lambda x, b: R.layer_norm(x, (D,), None, b),
                             lambda x, b: F.layer_norm(x, (D,), None, b),
                             lambda lead: (_x(D, seed=2),)),
    "fused_add_rms_norm": (lambda x, r, w: _fused_ours(x, r, w),
                           lambda x, r, w: _fused_ref(x, r, w),
                           lambda lead: (_x(*lead, D, seed=3), _x(D, seed=1))),
}
# Arguments shaped like the input (batched with it under vmap), after the input itself.
ROW_PARAMS = {"fused_add_rms_norm": 1}


def _case(name, lead=(3,)):
    ours, ref, params = CASES[name]
    return ours, ref, (_x(*lead, D), *params(lead))


def _close(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
    else:
        torch.testing.assert_close(a, b, **TOL)


def _argnums(args):
    return tuple(range(len(args)))


def _scalar(f):
    return lambda *a: (f(*a) ** 2).sum()


@pytest.fixture(autouse=True)
def _no_fallback_warnings():
    # vmap's per-sample fallback ("we have not yet implemented the batching rule") and any
    # other warning fail the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "jacrev", "jacfwd", "hessian"])
def test_func_transforms(case, transform):
    ours, ref, args = _case(case)
    an = _argnums(args)
    if transform == "grad":
        _close(grad(_scalar(ours), argnums=an)(*args), grad(_scalar(ref), argnums=an)(*args))
    elif transform == "vjp":
        out_o, fn_o = vjp(ours, *args)
        out_r, fn_r = vjp(ref, *args)
        ct = _x(*out_r.shape, seed=9)
        _close(out_o, out_r)
        _close(fn_o(ct), fn_r(ct))
    elif transform == "jvp":
        tangents = tuple(_x(*a.shape, seed=10 + i) for i, a in enumerate(args))
        _close(jvp(ours, args, tangents), jvp(ref, args, tangents))
    elif transform == "jacrev":
        _close(jacrev(ours, argnums=an)(*args), jacrev(ref, argnums=an)(*args))
    elif transform == "jacfwd":
        _close(jacfwd(ours, argnums=an)(*args), jacfwd(ref, argnums=an)(*args))
    else:
        _close(hessian(_scalar(ours))(*args), hessian(_scalar(ref))(*args))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_ad(case):
    ours, ref, args = _case(case)
    tangents = [_x(*a.shape, seed=20 + i) for i, a in enumerate(args)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        yo, yr = ours(*duals), ref(*duals)
        to, tr = fwAD.unpack_dual(yo).tangent, fwAD.unpack_dual(yr).tangent
    assert to is not None, "our output carries no tangent"
    _close(fwAD.unpack_dual(yo).primal, fwAD.unpack_dual(yr).primal)
    _close(to, tr)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_forward(case, in_dim):
    ours, ref, args = _case(case, lead=(4, 3))
    rows = 1 + ROW_PARAMS.get(case, 0)
    in_dims = (in_dim,) * rows + (None,) * (len(args) - rows)
    _close(vmap(ours, in_dims=in_dims)(*args), vmap(ref, in_dims=in_dims)(*args))


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c != "rms_norm_no_weight"])
def test_vmap_batched_parameters(case):
    """Ensembles: in_dims on the weight (and bias) too."""
    ours, ref, args = _case(case)
    E = 3
    rows = 1 + ROW_PARAMS.get(case, 0)
    batched = list(args[:rows]) + [torch.stack([a * (1 + 0.1 * k) for k in range(E)])
                                   for a in args[rows:]]
    in_dims = (None,) * rows + (0,) * (len(args) - rows)
    _close(vmap(ours, in_dims=in_dims)(*batched), vmap(ref, in_dims=in_dims)(*batched))


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_gradients(case):
    """vmap(grad(...)) over samples, as Opacus and functional per-sample code do."""
    ours, ref, args = _case(case, lead=(5, 2))
    an = _argnums(args)
    rows = 1 + ROW_PARAMS.get(case, 0)
    in_dims = (0,) * rows + (None,) * (len(args) - rows)
    g_o = vmap(grad(_scalar(ours), argnums=an), in_dims=in_dims)(*args)
    g_r = vmap(grad(_scalar(ref), argnums=an), in_dims=in_dims)(*args)
    _close(g_o, g_r)


def test_functional_call_per_sample_on_modules():
    """functional_call + vmap(grad) on a small model with our modules swapped in."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.RMSNorm(D), torch.nn.Linear(D, D),
                                torch.nn.LayerNorm(D)).double()
    ours = copy.deepcopy(model)
    assert R.replace_norms(ours) == 2
    x = _x(7, D)

    def loss(m):
        def f(params, xi):
            return functional_call(m, params, (xi.unsqueeze(0),)).square().sum()
        return f

    params = {k: v.detach() for k, v in model.named_parameters()}
    g_r = vmap(grad(loss(model)), in_dims=(None, 0))(params, x)
    g_o = vmap(grad(loss(ours)), in_dims=(None, 0))(params, x)
    _close(g_o, g_r)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint(case, reentrant):
    ours, ref, args = _case(case)
    args = [a.clone().requires_grad_() for a in args]
    checkpoint(ours, *args, use_reentrant=reentrant).square().sum().backward()
    g_ck = [a.grad.clone() for a in args]
    g_plain = torch.autograd.grad(ours(*args).square().sum(), args)
    _close(g_ck, g_plain)


_COS6 = torch.full((3, 4), 0.6, dtype=torch.float64)
_SIN8 = torch.full((3, 4), 0.8, dtype=torch.float64)
# The ops whose Autograd kernel is the op table's Python Function (not the C++ fast path),
# with float64 arguments: (f, argument shapes).
TABLE_OPS = {
    "rms_norm_fwd op": (lambda x, w: torch.ops.rmsnorm_ext.rms_norm_fwd(x, [4], w, 1e-5, 0.0)[0],
                        [(3, 4), (4,)]),
    "gated_rms_norm": (lambda x, g, w: R.gated_rms_norm(x, g, (4,), w), [(3, 4), (3, 4), (4,)]),
    "layer_norm_modulate": (lambda x, s, t: R.layer_norm_modulate(x, (4,), s, t),
                            [(2, 3, 4), (2, 4), (2, 4)]),
    "rms_norm_modulate": (lambda x, s, w: R.rms_norm_modulate(x, (4,), s, None, w),
                          [(2, 3, 4), (2, 4), (4,)]),
    "qk_norm_rope": (lambda q, k, qw: R.qk_norm_rope(q, k, qw, None, _COS6, _SIN8)[0] * 2
                     + R.qk_norm_rope(q, k, qw, None, _COS6, _SIN8)[1].sum(-2, keepdim=True),
                     [(2, 3, 2, 4), (2, 3, 1, 4), (4,)]),
    "layer_norm_2d": (lambda x, w, b: R.layer_norm_2d(x, w, b), [(2, 4, 3, 3), (4,), (4,)]),
    "rms_norm_2d": (lambda x, w: R.rms_norm_2d(x, w), [(2, 4, 3, 3), (4,)]),
}


@pytest.mark.parametrize("name", sorted(TABLE_OPS))
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_table_ops(name, reentrant):
    """Activation checkpointing (both kinds) of the ops on the table's autograd Function:
    its backward must unpack the saved tensors once (a non-reentrant checkpoint recomputes
    the forward on the first unpack and refuses a second: every model with gradient
    checkpointing and a swapped 2d / adaLN norm failed its backward)."""
    f, shapes = TABLE_OPS[name]
    args = [_x(*s, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    checkpoint(f, *args, use_reentrant=reentrant).square().sum().backward()
    g_ck = [a.grad.clone() for a in args]
    g_plain = torch.autograd.grad(f(*args).square().sum(), args)
    _close(g_ck, g_plain)


def test_inference_mode_and_inference_tensors():
    x = _x(3, D)
    w = _x(D, seed=1).requires_grad_()
    with torch.inference_mode():
        yo, yr = R.rms_norm(x, (D,), w, 1e-5), F.rms_norm(x, (D,), w, 1e-5)
        _close(yo, yr)
        xi = x.clone()
    # An inference tensor in grad mode, with a weight that requires grad: where torch
    # computes, we compute the same values and gradients (F.rms_norm); where torch refuses
    # (F.layer_norm saves the input), we may refuse with the same exception or compute.
    for ours_fn, ref_fn in ((lambda: R.rms_norm(xi, (D,), w, 1e-5), lambda: F.rms_norm(xi, (D,), w, 1e-5)),
                            (lambda: R.layer_norm(xi, (D,), w), lambda: F.layer_norm(xi, (D,), w))):
        try:
            ref_fn()
            ref_exc = None
        except Exception as e:  # noqa: BLE001
            ref_exc = type(e)
        if ref_exc is None:
            _close(torch.autograd.grad(ours_fn().sum(), w), torch.autograd.grad(ref_fn().sum(), w))
        else:
            try:
                ours_fn()
            except Exception as e:  # noqa: BLE001
                assert type(e) is ref_exc


def test_inplace_bumps_version_counters():
    """A tensor saved for backward, then overwritten by fused_add_rms_norm_: backward must
    raise as after any torch in-place op, not compute with the new values."""
    a = _x(3, D).requires_grad_()
    x = a * 2          # a non-leaf
    r = _x(3, D, seed=1)
    loss = (x * x).sum()   # saves x
    with torch.no_grad():
        v0, r0 = x._version, r._version
        R.fused_add_rms_norm_(x, r, (D,), None, 1e-5)
        assert x._version > v0 and r._version > r0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_residual_changed_in_place_like_the_composite():
    """h = fused_add_rms_norm's residual output, changed in place after the call: as with the
    composite (h = x + r; y = F.rms_norm(h)), a loss on h alone still backpropagates (the add
    saves nothing), and one through y raises (the norm saved h)."""
    def run(fused, use_y):
        x, r = _x(3, D).requires_grad_(), _x(3, D, seed=1).requires_grad_()
        w = _x(D, seed=2).requires_grad_()
        if fused:
            y, h = R.fused_add_rms_norm(x, r, (D,), w, 1e-5)
        else:
            h = x + r
            y = F.rms_norm(h, (D,), w, 1e-5)
        h.mul_(2.0)
        loss = h.sum() + (y.sum() if use_y else 0)
        try:
            return torch.autograd.grad(loss, (x, r))
        except RuntimeError as e:
            return e
    ours, theirs = run(True, False), run(False, False)
    assert not isinstance(theirs, Exception)
    assert not isinstance(ours, Exception), ours
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert "modified by an inplace operation" in str(run(False, True))
    assert "modified by an inplace operation" in str(run(True, True))


def test_inplace_refuses_a_graph():
    x, r = _x(3, D).requires_grad_(), _x(3, D, seed=1)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.rmsnorm_ext.fused_add_rms_norm_inplace(x, r, [D], None, 1e-5, 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autocast_cpu_same_dtypes_as_torch(dtype):
    warnings.simplefilter("ignore", UserWarning)  # torch's own mixed-dtype notice
    x = torch.randn(4, D, dtype=dtype)
    w32 = torch.randn(D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert R.rms_norm(x, (D,), None).dtype == F.rms_norm(x, (D,), None).dtype
        assert R.layer_norm(x, (D,)).dtype == F.layer_norm(x, (D,)).dtype
        if dtype == torch.bfloat16:
            assert R.rms_norm(x, (D,), w32).dtype == F.rms_norm(x, (D,), w32).dtype


def test_autocast_cuda_rule_registered():
    # torch runs layer_norm / rms_norm in float32 under CUDA autocast (AutocastCUDA kernels);
    # ours have kernels on the same key (exercised on a GPU in test_cuda.py).
    if not torch._C._is_autocast_available("cuda"):
        pytest.skip("this torch has no CUDA autocast")
    for op in ("rms_norm_fwd", "layer_norm_fwd", "fused_add_rms_norm_fwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmsnorm_ext::{op}", "AutocastCUDA")


@pytest.mark.parametrize("module", ["RMSNorm", "LayerNorm"])
def test_pickle_deepcopy_meta_init(module):
    cls = getattr(R, module)
    m = cls(D).double()
    with torch.no_grad():
        m.weight.normal_()
    x = _x(2, D)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is cls
        _close(clone(x), m(x))
    with torch.device("meta"):
        mm = cls(D, dtype=torch.float64)
    assert mm.weight.is_meta
    assert mm(torch.empty(2, D, device="meta", dtype=torch.float64)).is_meta
    mm = mm.to_empty(device="cpu")
    mm.load_state_dict(m.state_dict())
    _close(mm(x), m(x))


def test_export_save_load():
    model = torch.nn.Sequential(torch.nn.Linear(D, D), R.RMSNorm(D), R.LayerNorm(D)).double()
    x = _x(3, D)
    ep = torch.export.export(model, (x,))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    _close(loaded.module()(x), model(x))


def test_layer_norm_dbias_keeps_fp32_bits_with_bf16_input():
    """bf16 input, fp32 bias, no weight: dbias is the fp32 sum, not rounded through bf16."""
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    b = torch.zeros(512, requires_grad=True)
    dy = torch.randn(64, 512, dtype=torch.bfloat16)
    (db,) = torch.autograd.grad(R.layer_norm(x, (512,), None, b), b, dy)
    exact = dy.double().sum(0)
    assert db.dtype == torch.float32
    err = (db.double() - exact).abs().max().item()
    bf16_err = (exact.to(torch.bfloat16).double() - exact).abs().max().item()
    assert err < bf16_err / 16, (err, bf16_err)


def test_compile_fullgraph_grads_match_eager():
    x = _x(3, D).requires_grad_()
    w = _x(D, seed=1).requires_grad_()
    f = lambda x, w: R.rms_norm(x, (D,), w, 1e-5).square().sum()  # noqa: E731
    g_e = torch.autograd.grad(f(x, w), (x, w))
    g_c = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w), (x, w))
    _close(g_c, g_e)


# The ops without a C++ fast path (gated, adaLN, QK-norm + RoPE, 2d norms) run below autograd
# straight from the public function when a call needs no graph and carries no tangent
# (rmsnorm_ext/_autograd.call). The conditions of that shortcut, per op family: a tangent
# under no_grad still propagates, grad mode with an input requiring grad still records a
# node, and a call needing neither records none.
def _gated_ref(x, g, w):
    return F.rms_norm(x, (D,), w, 1e-5) * F.silu(g)


def _ln2d_ref(x, w, b):
    return F.layer_norm(x.movedim(1, -1), (D,), w, b, 1e-6).movedim(-1, 1)


def _mod_ref(x, s, w):
    return F.rms_norm(x, (D,), w, 1e-6) * (1 + s[:, None])


SHORTCUT_CASES = {
    "gated_rms_norm": (lambda x, g, w: R.gated_rms_norm(x, g, (D,), w, 1e-5), _gated_ref,
                       lambda: (_x(2, 3, D), _x(2, 3, D, seed=4), _x(D, seed=1))),
    "layer_norm_2d": (lambda x, w, b: R.layer_norm_2d(x, w, b, 1e-6), _ln2d_ref,
                      lambda: (_x(2, D, 3, 2), _x(D, seed=1), _x(D, seed=2))),
    "rms_norm_modulate": (lambda x, s, w: R.rms_norm_modulate(x, (D,), s, None, w, 1e-6),
                          _mod_ref, lambda: (_x(2, 3, D), _x(2, D, seed=5), _x(D, seed=1))),
}


@pytest.mark.parametrize("case", sorted(SHORTCUT_CASES))
def test_no_grad_call_keeps_forward_ad_tangents(case):
    ours, ref, make = SHORTCUT_CASES[case]
    args = make()
    tangents = [_x(*a.shape, seed=30 + i) for i, a in enumerate(args)]
    with fwAD.dual_level(), torch.no_grad():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        to = fwAD.unpack_dual(ours(*duals)).tangent
        tr = fwAD.unpack_dual(ref(*duals)).tangent
    assert to is not None, "a tangent was dropped under no_grad"
    _close(to, tr)


@pytest.mark.parametrize("case", sorted(SHORTCUT_CASES))
def test_graph_recorded_exactly_when_needed(case):
    ours, ref, make = SHORTCUT_CASES[case]
    args = make()
    leaves = [a.clone().requires_grad_() for a in args]
    y = ours(*leaves)
    assert y.grad_fn is not None
    _close(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(ref(*leaves).sum(), leaves))
    with torch.no_grad():
        assert ours(*leaves).grad_fn is None
    assert ours(*args).grad_fn is None
    # only a parameter requires grad (BitFit-style): still a graph
    y = ours(*args[:-1], leaves[-1])
    assert y.grad_fn is not None
    _close(torch.autograd.grad(y.sum(), leaves[-1]),
           torch.autograd.grad(ref(*args[:-1], leaves[-1]).sum(), leaves[-1]))
