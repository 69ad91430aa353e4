"""DTensor support: sharding rules for the rmsnorm_ext ops (tensor / sequence parallel).

With these rules a DTensor can flow through every rmsnorm_ext op but the quantizing ones
(``rms_norm``, ``layer_norm``, ``fused_add_rms_norm``, ``gated_rms_norm``,
``rms_norm_2d`` / ``layer_norm_2d``, ``rms_norm_modulate`` / ``layer_norm_modulate``,
``qk_norm_rope``, forward and backward, and ``fused_add_rms_norm_``) exactly like through
torch's native norms, so torchtitan-style plans (``SequenceParallel`` on the norms, FSDP2 x
TP, heads sharded in attention) work with our modules.

The rules, per mesh dimension (DTensor expands them over every mesh dimension):

* a shard on a row (non-normalized) dim ``d`` passes through: every row-shaped tensor
  (input, residual, gate, grad_out, outputs) is ``Shard(d)``, the per-row statistics (rstd,
  mean) shard on the matching dim, no communication. Row dims: the leading dims before
  ``normalized_shape``; for ``qk_norm_rope`` batch, sequence and heads of ``[..., S, H, D]``;
  for the 2d ops batch and spatial dims of ``[B, C, *spatial]``;
* per-sample adaLN ``scale`` / ``shift`` (``[B, D]``, ``[B, 1, D]``) are ``Shard(0)`` with a
  batch shard and ``Replicate`` otherwise; their gradients likewise, or ``Partial("sum")``
  (sums over a sharded sequence, or a broadcast ``[1, D]`` scale);
* rotary tables ``cos`` / ``sin`` shard with the sequence (``[S, D]`` on dim 0, ``[B, S, D]``
  on dim 1), with the batch for ``[B, S, D]``, and are replicated when heads are sharded;
* everything ``Replicate``;
* weights and biases are always ``Replicate``; their gradients computed from sharded rows
  are ``Partial("sum")`` (DTensor reduces them when needed);
* any other input placement -- a shard on a normalized dim, ``Partial`` -- is
  redistributed by DTensor to one of the above (an all-gather or all-to-all), so the
  answer is never wrong, only slower.

These are the strategies torch gives its own ``rms_norm``/``layer_norm``
(torch/distributed/tensor/_ops/_math_ops.py).

How they are registered
-----------------------
The functional ops use torch's public ``torch.distributed.tensor.experimental
.register_sharding``. Importing ``torch.distributed.tensor`` costs ~0.5 s, so
``import rmsnorm_ext`` does not do it: it only installs a tiny post-import hook. When
``torch.distributed.tensor`` is imported (by the user, FSDP2, torch.compile...), the hook
registers a ``torch.library.register_torch_dispatch`` rule for ``DTensor`` on each of our
ops (this imports nothing); the first DTensor that reaches one of them registers the
sharding rules (importing ``register_sharding``) and removes those dispatch rules, so from
then on DTensor's own dispatch serves every call at no extra cost. Call
:func:`register_sharding_rules` to do it eagerly. A torch without ``register_sharding``
gets a ``RuntimeError`` that says so when a DTensor reaches our ops.

The in-place op ``fused_add_rms_norm_inplace`` returns nothing, which ``register_sharding``
cannot serve correctly: DTensor would run it on redistributed copies and the in-place
writes would be lost (pytorch#167219). Its DTensor rule therefore runs it directly on the
local shards when ``input`` and ``residual`` have the same placements, sharded only on
leading dims (weight is replicated if needed), and raises a clear error otherwise.

Adding an op
------------
Its entry in the op table (rmsnorm_ext/_table.py) gives its output roles (and a new tensor
argument name needs a role in ``ARG_ROLES`` there); :func:`register_sharding_rules` derives
the rule from those and the op schema.
"""
import importlib.abc
import sys
import threading

import torch

__all__ = ["register_sharding_rules", "sharding_rule"]

_NS = "rmsnorm_ext"

from ._table import (ARG_ROLES as _ARG_ROLES, BATCH, BATCH_GRAD, GRAD, PARAM,  # noqa: E402,F401
                     REPLICATE, ROPE, ROW, STAT, TABLE)

# Outputs of each op served by register_sharding, in schema order (from the op table).
_SHARDED = {e.name: e for e in TABLE.values() if e.sharded_by_rule}
_OUTPUT_ROLES = {name: e.outputs for name, e in _SHARDED.items()}

# Ops that write their arguments and return nothing: served by a DTensor dispatch rule that
# runs them on the local shards (see module docstring). Value: the mutated arguments.
_INPLACE_OPS = {e.name: e.mutates for e in TABLE.values() if e.mutates}

_lock = threading.Lock()
_registered = False
_hook_installed = False
_dispatch_rules_installed = False


def _op(name):
    return getattr(getattr(torch.ops, _NS), name).default


def _tensor_args(op, arg_roles=None):
    """(name, role) of each Tensor/Tensor? argument in the schema, in order."""
    roles = dict(_ARG_ROLES, **(arg_roles or {}))
    out = []
    for a in op._schema.arguments:
        t = a.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.TensorType):
            if a.name not in roles:
                raise RuntimeError(f"rmsnorm_ext.distributed: no sharding role for argument "
                                   f"'{a.name}' of {op}; add it to _ARG_ROLES")
            out.append((a.name, roles[a.name]))
    return out


def sharding_rule(op, output_roles, channels_first=False, arg_roles=None):
    """Build the ``register_sharding`` function for ``op`` from its output roles.

    The "row" dims, whose shards pass through, are those of the first tensor argument (the
    input, or q) that are not normalized: the leading dims before ``normalized_shape``; all
    but the last for an op without one (qk_norm_rope: batch, sequence and heads). With
    ``channels_first`` the op normalizes dim 1 of [B, C, *spatial] (the 2d ops): batch and
    spatial dims pass through (the statistics, [B, *spatial], shard on the matching dim), a
    shard on the channels is redistributed. ``arg_roles`` overrides ARG_ROLES by name."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    arg_names = [a.name for a in op._schema.arguments]
    tensor_args = _tensor_args(op, arg_roles)
    if len(output_roles) != len(op._schema.returns):
        raise RuntimeError(f"rmsnorm_ext.distributed: {op} returns {len(op._schema.returns)} "
                           f"tensors but {len(output_roles)} output roles are given")
    infeasible = object()

    def rule(*args, **kwargs):
        bound = dict(zip(arg_names, args))
        bound.update(kwargs)
        x = bound[tensor_args[0][0]]
        if channels_first:
            row_dims = [0, *range(2, x.ndim)]
            stat_dim = {d: (0 if d == 0 else d - 1) for d in row_dims}
        else:
            ns = bound.get("normalized_shape")
            row_dims = list(range(x.ndim - (1 if ns is None else len(ns))))
            stat_dim = {d: d for d in row_dims}

        def batch_sized(t):  # a per-sample tensor with one row per sample
            return t is not None and t.ndim >= 2 and t.shape[0] == x.shape[0]

        def place(role, d, t=None):
            if d is None:
                return Replicate()
            if isinstance(role, BATCH_GRAD):
                if not bound[role.flag] or bound[role.param] is None:
                    return Replicate()  # not computed: an empty tensor
                return Shard(0) if d == 0 and batch_sized(bound[role.param]) else Partial("sum")
            if isinstance(role, GRAD):
                computed = bool(bound[role.flag]) and (role.param is None or
                                                      bound[role.param] is not None)
                return Partial("sum") if computed else Replicate()
            if role == ROW:
                return Shard(d)
            if role == STAT:
                return Shard(stat_dim[d])
            if role == BATCH:
                return Shard(0) if d == 0 and batch_sized(t) else Replicate()
            if role == ROPE:  # x: [..., S, H, D]; t: [S, D], [1, S, D] or [B, S, D]
                seq = x.ndim - 3
                if d == seq:
                    return Shard(t.ndim - 2)
                if d > seq or t.ndim == 2 or t.shape[0] == 1:
                    return Replicate()  # heads sharded, or a table shared by the batch
                return Shard(0) if (d == 0 and x.ndim == 4) else infeasible
            return Replicate()

        strategies = []
        for d in [None, *row_dims]:  # None: all replicated
            outs = [place(r, d) for r in output_roles]
            ins = [None if bound[n] is None else place(r, d, bound[n]) for n, r in tensor_args]
            if infeasible not in ins:
                strategies.append((outs, ins))
        return strategies

    rule.__name__ = f"{op._schema.name.split('::')[-1]}_sharding"
    return rule


def register_sharding_rules():
    """Register DTensor sharding rules for every rmsnorm_ext op (idempotent).

    Called automatically the first time a DTensor reaches one of our ops; call it yourself
    to pay the import cost up front. Raises ``RuntimeError`` on a torch without
    ``torch.distributed.tensor.experimental.register_sharding``.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        if not torch.distributed.is_available():
            raise RuntimeError("rmsnorm_ext: DTensor sharding rules need torch.distributed, "
                               "which this torch build does not have")
        try:
            from torch.distributed.tensor import DTensor
            from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
            from torch.distributed.tensor.experimental import register_sharding
            propagator = DTensor._op_dispatcher.sharding_propagator
            schema_infos = propagator.op_to_schema_info
        except (ImportError, AttributeError) as e:
            raise RuntimeError(
                f"rmsnorm_ext: a DTensor reached an rmsnorm_ext op, but torch {torch.__version__} "
                "lacks the API the sharding rules are registered with "
                "(torch.distributed.tensor.experimental.register_sharding and DTensor's "
                f"sharding propagator): {e}. Use a torch that has it (tested with 2.14), or call "
                "the op on local tensors (dtensor.full_tensor() / to_local()).") from e
        for name, roles in _OUTPUT_ROLES.items():
            op = _op(name)
            e = _SHARDED[name]
            register_sharding(op)(sharding_rule(op, roles, e.channels_first, e.arg_roles))
            # register_sharding keys DTensor's sharding cache only on arguments from the first
            # `int` argument on; ours are int[]/float/bool, and the bool flags change the
            # outputs' shapes (an empty gradient vs a weight-shaped one), so every argument
            # from index 1 must be part of the key.
            schema_infos[op] = RuntimeSchemaInfo(static_argnum=1, needs_pytree=True)
        _registered = True
    _drop_lazy_rules()


# ---------------------------------------------------------------------------------------
# In-place op on DTensors: run on the local shards.

def _inplace_on_dtensors(op, mutated, args, kwargs):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    names = [a.name for a in op._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, r = (bound[n] for n in mutated)
    name = f"rmsnorm_ext.{op._schema.name.split('::')[-1]}"
    if not (isinstance(x, DTensor) and isinstance(r, DTensor)):
        raise RuntimeError(f"{name}: {mutated[0]} and {mutated[1]} must both be DTensors or "
                           "both plain tensors")
    axis = x.ndim - len(bound["normalized_shape"])
    ok = (x.device_mesh == r.device_mesh and tuple(x.placements) == tuple(r.placements) and
          all(isinstance(p, Replicate) or (type(p) is Shard and p.dim % x.ndim < axis)
              for p in x.placements))
    if not ok:
        raise RuntimeError(
            f"{name} (in place) on DTensors needs {mutated[0]} and {mutated[1]} on the same "
            "mesh with the same placements, each Replicate() or Shard(d) on a leading "
            f"(non-normalized) dim d < {axis}; got {tuple(x.placements)} and "
            f"{tuple(r.placements)}. Redistribute them first, or use the out-of-place "
            "rmsnorm_ext.fused_add_rms_norm.")
    local = dict(bound)
    local[mutated[0]], local[mutated[1]] = x.to_local(), r.to_local()
    for n, v in bound.items():
        if n in mutated or not isinstance(v, torch.Tensor):
            continue
        if not isinstance(v, DTensor):
            raise RuntimeError(f"{name}: got a DTensor {mutated[0]} and a plain tensor {n}; "
                               "make it a DTensor (e.g. distribute_tensor(..., [Replicate()]))")
        if v.device_mesh != x.device_mesh:
            raise RuntimeError(f"{name}: {n} is on a different device mesh than {mutated[0]}")
        local[n] = v.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim).to_local()
    op(*(local[n] for n in names))
    return None


# ---------------------------------------------------------------------------------------
# Lazy installation.

def _inplace_rule(cls, func, types, args=(), kwargs=None):
    name = func._schema.name.split("::")[-1]
    return _inplace_on_dtensors(func, _INPLACE_OPS[name], args, kwargs or {})


def _first_dtensor_call(cls, func, types, args=(), kwargs=None):
    # Registers the sharding rules, which also removes this rule (see _drop_lazy_rules),
    # then calls the op again: this time DTensor's own dispatch serves it.
    register_sharding_rules()
    return func(*args, **(kwargs or {}))


_lazy_lib = None  # holds the _first_dtensor_call rules; dropping it removes them
_inplace_lib = None


def _drop_lazy_rules():
    global _lazy_lib
    lib, _lazy_lib = _lazy_lib, None
    if lib is not None:
        destroy = getattr(lib, "_destroy", None)
        if destroy is not None:
            destroy()
        # else: the Library's finalizer removes its registrations once `lib` is collected


def _install_dispatch_rules(dtensor_module):
    """Route DTensors reaching our ops through the rules above. Cheap: imports nothing
    (torch.distributed.tensor is already loaded)."""
    global _dispatch_rules_installed, _lazy_lib, _inplace_lib
    if _dispatch_rules_installed:
        return
    dtensor_cls = getattr(dtensor_module, "DTensor", None)
    if dtensor_cls is None or not hasattr(torch.library, "register_torch_dispatch"):
        return  # too old: DTensors reaching our ops get DTensor's own "no strategy" error
    _dispatch_rules_installed = True
    _inplace_lib = torch.library.Library(_NS, "FRAGMENT")
    for name in _INPLACE_OPS:
        torch.library.register_torch_dispatch(f"{_NS}::{name}", dtensor_cls, _inplace_rule,
                                              lib=_inplace_lib)
    if not _registered:
        _lazy_lib = torch.library.Library(_NS, "FRAGMENT")
        for name in _OUTPUT_ROLES:
            torch.library.register_torch_dispatch(f"{_NS}::{name}", dtensor_cls,
                                                  _first_dtensor_call, lib=_lazy_lib)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs _install_dispatch_rules right after torch.distributed.tensor is imported."""

    _target = "torch.distributed.tensor"

    def find_spec(self, fullname, path, target=None):
        if fullname != self._target:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        from importlib.util import find_spec
        spec = find_spec(fullname)  # the real finders (we are off sys.meta_path now)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            try:
                _install_dispatch_rules(module)
            except Exception as e:  # never break the user's import
                import warnings
                warnings.warn(f"rmsnorm_ext: could not install DTensor support: {e}")

        spec.loader.exec_module = exec_then_install
        return spec


def _install():
    """Called by ``import rmsnorm_ext``: cheap (no torch.distributed.tensor import)."""
    global _hook_installed
    if _hook_installed or not torch.distributed.is_available():
        return
    _hook_installed = True
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is not None and hasattr(mod, "DTensor"):
        _install_dispatch_rules(mod)
    else:
        sys.meta_path.insert(0, _PostImportHook())
