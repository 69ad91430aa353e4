"""The op table: what every op of the library is, in one place.

An entry names an op (its schema and its one host function live in C++: csrc/host/<op>.cpp or
the op's own host file; the same host function serves CPU, CUDA and Meta, so shapes and
argument checks have one source) and says what the Python layer needs to know about it:

* ``outputs``: the DTensor role of each output (rmsnorm_ext/distributed.py derives the
  sharding rules from these and the schema's argument names);
* for a differentiable forward op: ``diff_args`` (the tensor arguments gradients flow to),
  ``saved`` (what the backward reads), ``composite`` (the op's math as differentiable ATen
  ops -- fp32 or fp64 compute, one rounding, like the kernels) and ``backward`` (the
  first-order backward on the fused ``*_bwd`` kernel). rmsnorm_ext/_autograd.py builds from
  them the autograd kernel, forward-mode AD (jvp of the composite), second and higher
  derivatives (vjp of the composite), the vmap rules and the autocast rule;
* for a backward op: ``grads_of`` (the forward op), and which outputs are parameter
  gradients (per-sample under vmap);
* ``inference_only``: no gradient (the quantized outputs); ``mutates``: in-place.

Adding an op: its schema and host function in C++, a kernel per device, one entry here
(with its composite and backward if it is differentiable) and its public function in
functional.py.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

# DTensor roles of tensors. ROW: the input's shape (sharded with the input); STAT: one value
# per row (or per group of a row), indexed by the input's leading dims; PARAM:
# normalized_shape-shaped, replicated; REPLICATE: always replicated (a one-element scale).
# GRAD(param, flag): gradient of PARAM `param`, computed when argument `flag` is true (and
# `param` is given): Partial("sum") when rows are sharded; otherwise an empty tensor.
ROW, STAT, PARAM, REPLICATE = "row", "stat", "param", "replicate"
# BATCH: per-sample (adaLN scale / shift: [B, D], [B, 1, ..., D], or broadcast [1, D] / [D]):
# sharded with the input's dim 0 when it has B rows, else replicated. ROPE: rotary tables
# (cos / sin, [S, D], [1, S, D] or [B, S, D]): sharded with the sequence dim (and with the
# batch for a [B, S, D] table next to a [B, S, H, D] input), replicated when heads are sharded.
BATCH, ROPE = "batch", "rope"


class GRAD:
    __slots__ = ("param", "flag")

    def __init__(self, param, flag):
        self.param, self.flag = param, flag


class BATCH_GRAD(GRAD):
    """Gradient of a BATCH argument: per-sample sums over the other leading dims. Sharded on
    dim 0 when the rows are sharded on the batch and the argument has B rows;
    Partial("sum") when rows are sharded otherwise."""
    __slots__ = ()


# Roles of tensor arguments, by schema name (the same name means the same role in every op).
ARG_ROLES = {
    "input": ROW, "residual": ROW, "grad_out": ROW, "grad_residual": ROW, "gate": ROW,
    "q": ROW, "k": ROW, "grad_q": ROW, "grad_k": ROW, "q_rstd": STAT, "k_rstd": STAT,
    "rstd": STAT, "mean": STAT,
    "weight": PARAM, "bias": PARAM, "q_weight": PARAM, "k_weight": PARAM,
    "scale": REPLICATE, "scale_ub": REPLICATE, "shift": BATCH,
    "cos": ROPE, "sin": ROPE,
}


@dataclass(frozen=True)
class OpEntry:
    name: str                                  # op name in torch.ops.rmsnorm_ext
    outputs: Tuple                             # DTensor role of each output
    diff_args: Tuple[str, ...] = ()            # differentiable tensor arguments
    n_diff_outputs: int = 0                    # leading outputs that carry gradients
    saved: Tuple[str, ...] = ()                # names (args or "out0".."outK") kept for bwd
    composite: Optional[Callable] = None       # (**args) -> differentiable outputs
    backward: Optional[Callable] = None        # (saved dict, grads, need) -> {arg: grad}
    # The create_graph backward, when the saved tensors are not the composite's arguments
    # (default: vjp of `composite` at the saved arguments).
    graph_backward: Optional[Callable] = None
    grads_of: Optional[str] = None             # a backward op: the forward op's name
    param_grad_outputs: Tuple[int, ...] = ()   # backward op: outputs summed over rows
    inference_only: bool = False
    mutates: Tuple[str, ...] = ()
    sharded_by_rule: bool = True               # DTensor via register_sharding
    # Normalizes over dim 1 of [B, C, *spatial] (the 2d ops): ROW tensors have the input's
    # shape, STAT tensors are [B, *spatial]; batch and spatial dims are the "row" dims.
    channels_first: bool = False
    # Roles of this op's arguments where they differ from ARG_ROLES (a name another op
    # uses differently: adaLN's per-sample `scale` vs the quantizers' one-element `scale`).
    arg_roles: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def role(self, arg):
        return self.arg_roles.get(arg, ARG_ROLES.get(arg))


# ---------------------------------------------------------------------------------------
# Composites: the ops' math in ATen, differentiable to any order. Used for forward-mode AD,
# for derivatives of the backward (create_graph=True) and for vmap with a batched
# parameter; never on the first-order eager/compiled path (the fused kernels serve it).

def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(normalized_shape):
    return tuple(range(-len(normalized_shape), 0))


def rms_composite(input, normalized_shape, weight, eps, weight_offset):
    acc = acc_dtype(input)
    x = input.to(acc)
    y = x * torch.rsqrt(x.square().mean(_dims(normalized_shape), keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    return (y.to(input.dtype),)


def ln_composite(input, normalized_shape, weight, bias, eps):
    acc = acc_dtype(input)
    dims = _dims(normalized_shape)
    x = input.to(acc)
    xc = x - x.mean(dims, keepdim=True)
    y = xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return (y.to(input.dtype),)


def fused_add_rms_composite(input, residual, normalized_shape, weight, eps, weight_offset):
    h = (input.to(acc_dtype(residual)) + residual).to(residual.dtype)
    (y,) = rms_composite(h, normalized_shape, weight, eps, weight_offset)
    return y.to(input.dtype), h


def act_fn(activation):
    return torch.nn.functional.silu if activation == "silu" else torch.sigmoid


def gated_rms_composite(input, gate, normalized_shape, weight, eps, group_size,
                        norm_before_gate, activation):
    acc = acc_dtype(input)
    x = input.to(acc)
    a = act_fn(activation)(gate.to(acc))
    if not norm_before_gate:
        x = x * a
    lead = x.shape[:x.dim() - len(normalized_shape)]
    xg = x.reshape(*lead, -1, group_size)
    y = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight.to(acc)
    if norm_before_gate:
        y = y * a
    return (y.to(input.dtype),)


def _rope_table(t, x, acc):
    """cos/sin [S, D], [1, S, D] or [B, S, D] (B the product of x's leading dims) as x's
    [..., S, 1, D] broadcast."""
    t = t.to(acc)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]  # shared by the batch, as [S, D]
    elif t.dim() == 3:
        t = t.reshape(*x.shape[:-3], *t.shape[1:])
    return t.unsqueeze(-2)


def _rotate(u, interleaved):
    if interleaved:  # GPT-J: pairs (2i, 2i+1)
        return torch.stack((-u[..., 1::2], u[..., 0::2]), dim=-1).flatten(-2)
    h = u.shape[-1] // 2  # rotate-half (Llama, Qwen, NeoX)
    return torch.cat((-u[..., h:], u[..., :h]), dim=-1)


def qk_norm_rope_composite(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    def one(x, w):
        acc = acc_dtype(x)
        xf = x.to(acc)
        u = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if w is not None:
            u = u * w.to(acc)
        out = u * _rope_table(cos, x, acc) + _rotate(u, interleaved) * _rope_table(sin, x, acc)
        return out.to(x.dtype)
    return one(q, q_weight), one(k, k_weight)


def rms_2d_composite(input, weight, eps):
    (y,) = rms_composite(input.movedim(1, -1), (input.shape[1],), weight, eps, 0.0)
    return (y.movedim(-1, 1),)


def ln_2d_composite(input, weight, bias, eps):
    (y,) = ln_composite(input.movedim(1, -1), (input.shape[1],), weight, bias, eps)
    return (y.movedim(-1, 1),)


def modulation_view(s, x):
    """scale / shift ([B, D], [B, 1, ..., D], [1, D] or [D]) broadcast against x [B, ..., D]."""
    bs = s.shape[0] if s.dim() >= 2 else 1
    return s.reshape((bs,) + (1,) * (x.dim() - 2) + (x.shape[-1],))


def _modulate(y, x, scale, shift, acc):
    y = y * (1 + modulation_view(scale, x).to(acc))
    if shift is not None:
        y = y + modulation_view(shift, x).to(acc)
    return y


def rms_modulate_composite(input, normalized_shape, scale, shift, weight, eps):
    acc = acc_dtype(input)
    (y,) = rms_composite(input.to(acc), normalized_shape, weight, eps, 0.0)
    return (_modulate(y, input, scale, shift, acc).to(input.dtype),)


def ln_modulate_composite(input, normalized_shape, scale, shift, weight, bias, eps):
    acc = acc_dtype(input)
    (y,) = ln_composite(input.to(acc), normalized_shape, weight, bias, eps)
    return (_modulate(y, input, scale, shift, acc).to(input.dtype),)


# ---------------------------------------------------------------------------------------
# First-order backwards on the fused kernels. `s` holds the saved tensors and the
# non-tensor arguments by name; `need` the arguments whose gradient is wanted.

_ops = torch.ops.rmsnorm_ext


def _rms_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    want_dw = "weight" in need and s["weight"] is not None
    dx, dw = _ops.rms_norm_bwd.default(dy, s["input"], s["out1"], s["weight"],
                                       s["normalized_shape"], s["weight_offset"], None, want_dw)
    return {"input": dx, "weight": dw if want_dw else None}


def _ln_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    want_dw = "weight" in need and s["weight"] is not None
    want_db = "bias" in need and s["bias"] is not None
    dx, dw, db = _ops.layer_norm_bwd.default(dy, s["input"], s["out1"], s["out2"], s["weight"],
                                             s["normalized_shape"], want_dw, want_db)
    return {"input": dx, "weight": dw if want_dw else None, "bias": db if want_db else None}


def _rms_2d_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    want_dw = "weight" in need and s["weight"] is not None
    dx, dw = _ops.rms_norm_2d_bwd.default(dy, s["input"], s["out1"], s["weight"], want_dw)
    return {"input": dx, "weight": dw if want_dw else None}


def _ln_2d_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    want_dw = "weight" in need and s["weight"] is not None
    want_db = "bias" in need and s["bias"] is not None
    dx, dw, db = _ops.layer_norm_2d_bwd.default(dy, s["input"], s["out1"], s["out2"],
                                                s["weight"], want_dw, want_db)
    return {"input": dx, "weight": dw if want_dw else None, "bias": db if want_db else None}


def _fused_backward(s, grads, need):
    dy, dh_direct = grads[0], grads[1]
    want_dw = "weight" in need and s["weight"] is not None and dy is not None
    dw = None
    if dy is None:
        dh = dh_direct  # only h was used: its gradient passes straight to both summands
    else:
        # The gradient reaching h directly is added inside the kernel.
        dh, dw = _ops.rms_norm_bwd.default(dy, s["out1"], s["out2"], s["weight"],
                                           s["normalized_shape"], s["weight_offset"],
                                           dh_direct, want_dw)
    return {"input": dh, "residual": dh, "weight": dw if want_dw else None}


def _fused_graph_backward(s, grads, need, dtypes):
    # Saved: h (out1), not input/residual; y = rms_norm(h) in the input's dtype.
    dy, dh_direct = grads[0], grads[1]
    h, w = s["out1"], s["weight"]
    dh, dw = None, None
    if dy is not None:
        def f(h, *w):
            return rms_composite(h, s["normalized_shape"], w[0] if w else None, s["eps"],
                                 s["weight_offset"])[0].to(dtypes["input"])
        primals = (h,) if w is None else (h, w)
        _, vjp_fn = torch.func.vjp(f, *primals)
        grads_hw = vjp_fn(dy)
        dh = grads_hw[0]
        dw = grads_hw[1] if w is not None else None
    if dh_direct is not None:
        dh = dh_direct if dh is None else dh + dh_direct
    return {"input": dh, "residual": dh, "weight": dw}


def _gated_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    want_dw = "weight" in need and s["weight"] is not None
    dx, dg, dw = _ops.gated_rms_norm_bwd.default(
        dy, s["input"], s["gate"], s["out1"], s["weight"], s["normalized_shape"],
        s["group_size"], s["norm_before_gate"], s["activation"], want_dw)
    return {"input": dx, "gate": dg, "weight": dw if want_dw else None}


def _qk_backward(s, grads, need):
    gq, gk = grads
    if gq is None and gk is None:
        return {}
    gq = torch.zeros_like(s["q"]) if gq is None else gq
    gk = torch.zeros_like(s["k"]) if gk is None else gk
    want_dw = bool({"q_weight", "k_weight"} & need)
    dq, dk, dqw, dkw = _ops.qk_norm_rope_bwd.default(
        gq, gk, s["q"], s["k"], s["q_weight"], s["k_weight"], s["cos"], s["sin"], s["out2"],
        s["out3"], s["interleaved"], want_dw)
    return {"q": dq, "k": dk, "q_weight": dqw if want_dw else None,
            "k_weight": dkw if want_dw else None}


def _modulate_backward(s, grads, need):
    dy = grads[0]
    if dy is None:
        return {}
    layer = "out2" in s
    mean, rstd = (s["out1"], s["out2"]) if layer else (None, s["out1"])
    bias = s.get("bias")
    want = {n: n in need and s.get(n) is not None for n in ("scale", "shift", "weight", "bias")}
    dx, dscale, dshift, dw, db = _ops.norm_modulate_bwd.default(
        dy, s["input"], mean, rstd, s["scale"], s["weight"], bias, s["normalized_shape"],
        want["scale"], want["shift"], want["weight"], want["bias"])
    if want["shift"]:  # the kernel writes dshift in scale's layout; shift may differ in 1s
        dshift = dshift.reshape(s["shift"].shape)
    got = {"input": dx, "scale": dscale, "shift": dshift, "weight": dw, "bias": db}
    return {n: g for n, g in got.items() if n == "input" or want[n]}


# ---------------------------------------------------------------------------------------
# The table.

_ENTRIES = [
    OpEntry("rms_norm_fwd", (ROW, STAT), diff_args=("input", "weight"), n_diff_outputs=1,
            saved=("input", "weight", "out1"), composite=rms_composite,
            backward=_rms_backward),
    OpEntry("rms_norm_bwd", (ROW, GRAD("weight", "compute_weight_grad")),
            grads_of="rms_norm_fwd", param_grad_outputs=(1,)),
    OpEntry("layer_norm_fwd", (ROW, STAT, STAT), diff_args=("input", "weight", "bias"),
            n_diff_outputs=1, saved=("input", "weight", "bias", "out1", "out2"),
            composite=ln_composite, backward=_ln_backward),
    OpEntry("layer_norm_bwd", (ROW, GRAD("weight", "compute_weight_grad"),
                               GRAD(None, "compute_bias_grad")),
            grads_of="layer_norm_fwd", param_grad_outputs=(1, 2)),
    # h is saved as an output: in a create_graph backward its gradient flows back through
    # this node (h = input + residual), so no copy of the inputs is kept.
    OpEntry("fused_add_rms_norm_fwd", (ROW, ROW, STAT),
            diff_args=("input", "residual", "weight"), n_diff_outputs=2,
            saved=("weight", "out1", "out2"), composite=fused_add_rms_composite,
            backward=_fused_backward, graph_backward=_fused_graph_backward),
    OpEntry("gated_rms_norm_fwd", (ROW, STAT), diff_args=("input", "gate", "weight"),
            n_diff_outputs=1, saved=("input", "gate", "weight", "out1"),
            composite=gated_rms_composite, backward=_gated_backward),
    OpEntry("gated_rms_norm_bwd", (ROW, ROW, GRAD("weight", "compute_weight_grad")),
            grads_of="gated_rms_norm_fwd", param_grad_outputs=(2,)),
    # cos / sin get no gradient (rotary tables are computed from positions).
    OpEntry("qk_norm_rope_fwd", (ROW, ROW, STAT, STAT),
            diff_args=("q", "k", "q_weight", "k_weight"), n_diff_outputs=2,
            saved=("q", "k", "q_weight", "k_weight", "cos", "sin", "out2", "out3"),
            composite=qk_norm_rope_composite, backward=_qk_backward),
    OpEntry("qk_norm_rope_bwd", (ROW, ROW, GRAD("q_weight", "compute_weight_grad"),
                                 GRAD("k_weight", "compute_weight_grad")),
            grads_of="qk_norm_rope_fwd", param_grad_outputs=(2, 3)),
    # adaLN modulation: scale / shift are per sample.
    OpEntry("rms_norm_modulate_fwd", (ROW, STAT),
            diff_args=("input", "scale", "shift", "weight"), n_diff_outputs=1,
            saved=("input", "scale", "shift", "weight", "out1"),
            composite=rms_modulate_composite, backward=_modulate_backward,
            arg_roles={"scale": BATCH}),
    OpEntry("layer_norm_modulate_fwd", (ROW, STAT, STAT),
            diff_args=("input", "scale", "shift", "weight", "bias"), n_diff_outputs=1,
            saved=("input", "scale", "shift", "weight", "bias", "out1", "out2"),
            composite=ln_modulate_composite, backward=_modulate_backward,
            arg_roles={"scale": BATCH}),
    # dshift has scale's layout (the kernel's); its BATCH_GRAD role follows scale's rows.
    OpEntry("norm_modulate_bwd", (ROW, BATCH_GRAD("scale", "compute_scale_grad"),
                                  BATCH_GRAD("scale", "compute_shift_grad"),
                                  GRAD("weight", "compute_weight_grad"),
                                  GRAD("bias", "compute_bias_grad")),
            grads_of="layer_norm_modulate_fwd", param_grad_outputs=(1, 2, 3, 4),
            arg_roles={"scale": BATCH}),
    # Channels-first norms (csrc/host/norm_2d.cpp): over dim 1 of [B, C, *spatial].
    OpEntry("rms_norm_2d_fwd", (ROW, STAT), diff_args=("input", "weight"), n_diff_outputs=1,
            saved=("input", "weight", "out1"), composite=rms_2d_composite,
            backward=_rms_2d_backward, channels_first=True),
    OpEntry("rms_norm_2d_bwd", (ROW, GRAD("weight", "compute_weight_grad")),
            grads_of="rms_norm_2d_fwd", param_grad_outputs=(1,), channels_first=True),
    OpEntry("layer_norm_2d_fwd", (ROW, STAT, STAT), diff_args=("input", "weight", "bias"),
            n_diff_outputs=1, saved=("input", "weight", "bias", "out1", "out2"),
            composite=ln_2d_composite, backward=_ln_2d_backward, channels_first=True),
    OpEntry("layer_norm_2d_bwd", (ROW, GRAD("weight", "compute_weight_grad"),
                                  GRAD(None, "compute_bias_grad")),
            grads_of="layer_norm_2d_fwd", param_grad_outputs=(1, 2), channels_first=True),
    OpEntry("fused_add_rms_norm_inplace", (), mutates=("input", "residual"),
            sharded_by_rule=False),
    OpEntry("rms_norm_quant", (ROW, STAT), inference_only=True, sharded_by_rule=False),
    OpEntry("fused_add_rms_norm_quant", (ROW, STAT, ROW), inference_only=True,
            sharded_by_rule=False),
    OpEntry("layer_norm_quant", (ROW, STAT), inference_only=True, sharded_by_rule=False),
]

TABLE = {e.name: e for e in _ENTRIES}


def op(name):
    return getattr(_ops, name).default


def schema_args(name):
    return [a.name for a in op(name)._schema.arguments]
