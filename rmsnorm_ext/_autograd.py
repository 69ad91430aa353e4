"""Autograd, forward-mode AD, vmap and autocast for every op, built from the op table.

Two paths serve a differentiable op:

* The eager fast path (csrc/python/python_fast.cpp): plain tensors, no torch.func transform, no
  forward-AD tangent, no CUDA autocast, no mode -- the common training and inference call.
  It records a C++ autograd node (csrc/autograd/autograd.cpp) whose backward is the fused kernel:
  a Python autograd node costs ~10-30 us a call, more than a whole small-shape norm.
* Everything else goes through the dispatcher, whose Autograd kernel is registered here:
  an ``autograd.Function`` per op (forward: the op below autograd; backward: the fused
  ``*_bwd`` op; ``jvp``: forward-mode AD of the op's composite; ``generate_vmap_rule``), so
  ``torch.func.grad/vjp/jvp/jacrev/jacfwd/hessian/vmap``, ``forward_ad``, DTensor and
  ``torch.compile`` (AOTAutograd traces it) all work. With ``create_graph=True`` (and under
  torch.func, which always builds the graph) the backward is the vjp of the composite,
  so derivatives of every order are correct. Outside torch.func the same node comes from
  a twin Function without ``setup_context`` (``EAGER``: no per-call signature binding),
  applied by ``call`` directly for plain tensors with no mode or autocast active.

vmap rules (``torch.library.register_vmap``): the vmapped dimension is one more leading
(row) dimension, so a batched call is one kernel call; a batched parameter (weight/bias:
ensembles) or a per-sample parameter gradient is computed sample by sample with the same
kernels (the same values as an unbatched call).
"""
import torch
from torch.autograd import forward_ad

from ._table import ARG_ROLES, PARAM, ROW, STAT, TABLE, op, schema_args

_lib = torch.library.Library("rmsnorm_ext", "FRAGMENT")


def _graph_needed(tensors):
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def transform_active():
    """A torch.func transform or a forward-AD level is active: the fast path must not
    serve the call (it records a C++ node that functorch cannot see, and no tangent)."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _composite_vjp(e, names, s, grads, need):
    """Gradients by differentiating the composite at the saved arguments (create_graph)."""
    diff = [n for n in e.diff_args if s.get(n) is not None]
    base = {n: s.get(n) for n in names}

    def f(*d):
        a = dict(base)
        a.update(zip(diff, d))
        return tuple(e.composite(*(a[n] for n in names))[:e.n_diff_outputs])

    outs, vjp_fn = torch.func.vjp(f, *(s[n] for n in diff))
    cot = tuple(g if g is not None else torch.zeros_like(o) for g, o in zip(grads, outs))
    return dict(zip(diff, vjp_fn(cot)))


def _jvp_by_double_vjp(f, primals, tangents):
    """jvp of f by differentiating its vjp (linear in the cotangent u) w.r.t. u: under a
    torch.autograd.forward_ad level, where torch.func.jvp would nest forward AD."""
    with torch.enable_grad():
        p = [x.detach().requires_grad_() for x in primals]
        outs = f(*p)
        u = [torch.zeros_like(o).requires_grad_() for o in outs]
        gs = torch.autograd.grad(outs, p, u, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(gs, tangents) if g is not None]
        res = torch.autograd.grad([g for g, _ in pairs], u, [t for _, t in pairs],
                                  allow_unused=True)
    # (autograd.grad without create_graph returns tensors outside any graph: no detach, which
    # a legacy-vmap BatchedTensor tangent -- gradcheck(check_batched_forward_grad) -- lacks)
    return tuple(torch.zeros_like(o) if r is None else r for r, o in zip(res, outs))


def make_function(e):
    """The autograd.Function of differentiable forward op entry ``e``."""
    names = schema_args(e.name)
    fwd = op(e.name)
    n_out = len(fwd._schema.returns)
    saved_args = [n for n in e.saved if not n.startswith("out")]
    # Every Tensor / Tensor? argument: jvp re-evaluates the composite at all of them.
    tensor_args = [a.name for a in fwd._schema.arguments
                   if "Tensor" in str(a.type)]
    saved_outs = [int(n[3:]) for n in e.saved if n.startswith("out")]
    saved_idx = [names.index(n) for n in saved_args]
    tensor_idx = [names.index(n) for n in tensor_args]

    class Fn(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return fwd(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            a = list(inputs)
            for i in tensor_idx:
                v = a[i]
                # An inference tensor cannot be saved for backward; torch's composite norms
                # save only tensors they compute, so they accept one: a copy keeps us as
                # permissive.
                if v is not None and v.is_inference():
                    a[i] = v.clone()
            ctx.attrs = {n: v for n, v in zip(names, a) if not isinstance(v, torch.Tensor)}
            ctx.dtypes = {names[i]: a[i].dtype for i in tensor_idx if a[i] is not None}
            ctx.save_for_backward(*(a[i] for i in saved_idx), *(output[i] for i in saved_outs))
            # jvp differentiates the composite at the inputs; it can only be asked for while
            # a forward-AD level or a torch.func transform is active.
            if forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
                ctx.save_for_forward(*(a[i] for i in tensor_idx))
            ctx.mark_non_differentiable(*output[e.n_diff_outputs:])
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, *grads):
            grads = grads[:e.n_diff_outputs]
            if all(g is None for g in grads):
                return (None,) * len(names)
            # saved_tensors unpacked once: non-reentrant activation checkpointing recomputes
            # the forward for the first unpack and refuses a second one.
            saved = ctx.saved_tensors
            s = dict(ctx.attrs)
            s.update(zip(e.saved, saved))
            need = {n for n in e.diff_args if ctx.needs_input_grad[names.index(n)]}
            if _graph_needed([*grads, *saved]):
                if e.graph_backward is not None:
                    res = e.graph_backward(s, grads, need, ctx.dtypes)
                else:
                    res = _composite_vjp(e, names, s, grads, need)
            else:
                res = e.backward(s, grads, need)
            out = [None] * len(names)
            for n in need:
                g = res.get(n)
                if g is not None:
                    out[names.index(n)] = g if g.dtype == ctx.dtypes[n] else g.to(ctx.dtypes[n])
            return tuple(out)

        @staticmethod
        def jvp(ctx, *tangents):
            primals = dict(zip(tensor_args, ctx.saved_tensors))
            primals.update(ctx.attrs)
            diff = [n for n in e.diff_args if primals[n] is not None]
            tan = [tangents[names.index(n)] for n in diff]
            tan = [torch.zeros_like(primals[n]) if t is None else t for n, t in zip(diff, tan)]

            def f(*d):
                a = dict(primals)
                a.update(zip(diff, d))
                return tuple(e.composite(*(a[n] for n in names))[:e.n_diff_outputs])

            p = tuple(primals[n] for n in diff)
            if forward_ad._current_level >= 0 and not torch._C._are_functorch_transforms_active():
                out_t = _jvp_by_double_vjp(f, p, tan)
            else:
                _, out_t = torch.func.jvp(f, p, tuple(tan))
            return (*out_t, *([None] * (n_out - e.n_diff_outputs)))

    Fn.__name__ = Fn.__qualname__ = f"{e.name}_autograd"

    class FnEager(torch.autograd.Function):
        """Fn for calls outside torch.func transforms (the dispatcher's Autograd kernel and
        the eager training path of ``call``): the same node, set up inside forward. A Function
        with ``setup_context`` (which functorch requires) has its arguments bound to
        forward's signature by inspect on every apply, ~20 us of a ~70 us small call."""

        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = fwd(*args)
            Fn.setup_context(ctx, args, out)
            return out

        backward = Fn.backward
        jvp = Fn.jvp

    FnEager.__name__ = FnEager.__qualname__ = f"{e.name}_autograd"
    EAGER[e.name] = FnEager
    return Fn


def _register_autograd(e):
    Fn = make_function(e)
    fwd = op(e.name)
    after = torch._C._after_autograd_keyset

    def kernel(keyset, *args):
        if torch._C._are_functorch_transforms_active():
            # Reached from inside a torch.func transform's dispatch (torch.ops called
            # directly; the public functions call Fn.apply before the dispatcher instead),
            # where an autograd.Function cannot run: the composite, whose ATen ops the
            # transform differentiates and batches; the statistics from the kernel.
            with torch._C._AutoDispatchBelowAutograd():
                out = fwd.redispatch(keyset & after, *args)
            ys = e.composite(*args)
            return (*ys, *(o.detach() for o in out[len(ys):]))
        if forward_ad._current_level >= 0 or _graph_needed(
                [a for a in args if isinstance(a, torch.Tensor)]):
            return EAGER[e.name].apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return fwd.redispatch(keyset & after, *args)


    _lib.impl(e.name, kernel, "Autograd", with_keyset=True)
    return Fn


# ---------------------------------------------------------------------------------------
# vmap

def _move(t, d, size):
    """The batched dimension of `t` to the front (expanding an unbatched `t`)."""
    if d is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(d, 0)


def _vmap_rule(e):
    names = schema_args(e.name)
    fn = op(e.name)
    roles = [ARG_ROLES.get(n) for n in names]
    out_roles = e.outputs
    grad_flags = [o.flag for o in out_roles if not isinstance(o, str)]

    def rule_per_sample(B, args, in_dims):
        outs = []
        for b in range(B):
            sl = [x if (d is None or not isinstance(x, torch.Tensor)) else x.select(d, b)
                  for x, d in zip(args, in_dims)]
            outs.append(fn(*sl))
        if not isinstance(outs[0], tuple):
            return torch.stack(outs), 0
        return tuple(torch.stack(list(o)) for o in zip(*outs)), (0,) * len(outs[0])

    def rule(info, in_dims, *args):
        B = info.batch_size
        a = dict(zip(names, args))
        per_sample = any(d is not None and r not in (ROW, STAT)
                         for d, r in zip(in_dims, roles))
        # A parameter gradient summed over rows must stay per sample.
        per_sample |= any(bool(a.get(f)) for f in grad_flags)
        if per_sample:
            return rule_per_sample(B, args, in_dims)
        # Fold the batch into the leading dims: one kernel call (an argument tied to the
        # leading dims' count, e.g. per-batch rotary tables, refuses: then sample by sample).
        # A channels-first op normalizes dim 1: the batch merges into dim 0 instead.
        def fold(x, d):
            x = _move(x, d, B)
            return x.flatten(0, 1) if e.channels_first else x

        folded = [(fold(x, d) if r in (ROW, STAT) and isinstance(x, torch.Tensor) else x)
                  for x, d, r in zip(args, in_dims, roles)]
        try:
            out = fn(*folded)
        except (RuntimeError, ValueError):
            return rule_per_sample(B, args, in_dims)

        def unfold(o, r):
            if r not in (ROW, STAT):
                return o, None
            return (o.unflatten(0, (B, -1)) if e.channels_first else o), 0

        if not isinstance(out, tuple):
            return unfold(out, out_roles[0] if out_roles else None)
        res = [unfold(o, r) for o, r in zip(out, out_roles)]
        return tuple(o for o, _ in res), tuple(d for _, d in res)

    return rule


# ---------------------------------------------------------------------------------------
# Autocast: torch's CUDA autocast runs aten::layer_norm / aten::rms_norm in float32 (their
# AutocastCUDA kernels cast floating inputs to float32); ours follow the same policy on the
# same dispatch key. On CPU torch registers no autocast kernel for them: neither do we.

def _register_autocast():
    if not torch._C._is_autocast_available("cuda"):
        return
    for name in ("rms_norm_fwd", "layer_norm_fwd", "rms_norm_2d_fwd", "layer_norm_2d_fwd"):
        torch.library.register_autocast(f"rmsnorm_ext::{name}", "cuda", torch.float32,
                                        lib=_lib)
    # fused_add_rms_norm = rms_norm(input + residual): torch's composite adds in the
    # promoted dtype (autocast leaves the add alone) and normalizes in float32.
    rms = op("rms_norm_fwd")

    def fused_autocast(input, residual, normalized_shape, weight, eps, weight_offset):
        with torch.autocast("cuda", enabled=False):
            h = input + residual
            w = None if weight is None else weight.float()
            y, rstd = rms(h.float(), normalized_shape, w, eps, weight_offset)
        return y, h, rstd

    _lib.impl("fused_add_rms_norm_fwd", fused_autocast, "AutocastCUDA")


FUNCTIONS = {}
EAGER = {}  # op name -> its FnEager (make_function)


_CALL_OPS = {}


def call(name, *args):
    """The public functions' dispatcher path: under a torch.func transform the op's
    autograd.Function is applied here, above the dispatcher, where functorch can see it
    (custom_function_call); while torch.compile traces (which sees the op and its
    registered rules), the op itself. In eager mode a call that needs no graph and carries
    no forward-AD tangent (inference, or no input requiring grad) runs the op below
    autograd at once: the same decision the op's Autograd kernel (below) makes, taken
    before the dispatcher boxes the call into that Python kernel (~10 us of a small call).
    Autocast and __torch_dispatch__ modes (DTensor, fake tensors) sit outside autograd's
    keys and still run."""
    f = _CALL_OPS.get(name)
    if f is None:
        f = _CALL_OPS[name] = op(name)
    if torch.compiler.is_compiling():
        return f(*args)
    if torch._C._are_functorch_transforms_active():
        return FUNCTIONS[name].apply(*args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if forward_ad._current_level < 0 and not _graph_needed(tensors):
        with torch._C._AutoDispatchBelowAutograd():
            return f(*args)
    eager = EAGER.get(name)
    if eager is not None and _plain_eager(tensors):
        # What the op's Autograd kernel would do, without the dispatcher boxing the call
        # into that Python kernel first (~20 us of a small training call).
        return eager.apply(*args)
    return f(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors):
    """Nothing between the caller and the Autograd kernel would act on this call: plain
    tensors (no __torch_function__ / __torch_dispatch__ subclass such as DTensor), no
    dispatch or torch-function mode, no autocast (it casts the arguments before autograd
    records them)."""
    return (all(type(t) in _PLAIN for t in tensors)
            and not torch._C._is_any_autocast_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled())


def install():
    for e in TABLE.values():
        if e.composite is not None:
            FUNCTIONS[e.name] = _register_autograd(e)
        if not e.mutates:
            torch.library.register_vmap(f"rmsnorm_ext::{e.name}", _vmap_rule(e), lib=_lib)
    _register_autocast()
