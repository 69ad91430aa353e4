"""Fake (meta) kernels: output shapes and dtypes without computing, so the ops trace
under torch.compile(fullgraph=True) and run on meta tensors.

They validate arguments with the same rules and messages as csrc/common.h, so a bad
call fails at trace time exactly as it would fail eagerly.
"""
import math

import torch

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCED = (torch.bfloat16, torch.float16)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x, name="input"):
    if x.dtype not in _FLOATS:
        raise TypeError(f"rmsnorm_ext: {name} must be float32, float64, bfloat16 or float16, "
                        f"got {x.dtype}")


def check_normalized_shape(x, normalized_shape):
    ns = tuple(normalized_shape)
    if not ns:
        raise ValueError("rmsnorm_ext: normalized_shape must have at least one dimension")
    if x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns):]) != ns:
        raise ValueError(f"rmsnorm_ext: normalized_shape {list(ns)} does not match the input's "
                         f"trailing dimensions: input shape {list(x.shape)}")
    return x.shape[:x.dim() - len(ns)]


def check_param(p, name, x, normalized_shape):
    if p is None:
        return
    if tuple(p.shape) != tuple(normalized_shape):
        raise ValueError(f"rmsnorm_ext: {name} must have shape normalized_shape "
                         f"{list(normalized_shape)}, got {list(p.shape)}")
    if p.device != x.device:
        raise RuntimeError(f"rmsnorm_ext: {name} is on {p.device} but the input is on "
                           f"{x.device}; move them to the same device")
    if not (p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _REDUCED)):
        raise TypeError(f"rmsnorm_ext: {name} dtype {p.dtype} is not supported with input "
                        f"dtype {x.dtype}")


def check_eps(eps):
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"rmsnorm_ext: eps must be a finite number >= 0, got {eps}")


def check_offset(weight_offset):
    if not math.isfinite(weight_offset):
        raise ValueError(f"rmsnorm_ext: weight_offset must be finite, got {weight_offset}")


def check_residual(x, r):
    if r.shape != x.shape:
        raise ValueError(f"rmsnorm_ext: residual shape {list(r.shape)} does not match the "
                         f"input shape {list(x.shape)}")
    if r.device != x.device:
        raise RuntimeError(f"rmsnorm_ext: residual is on {r.device} but the input is on "
                           f"{x.device}; move them to the same device")
    if not (r.dtype == x.dtype or (r.dtype == torch.float32 and x.dtype in _REDUCED)):
        raise TypeError(f"rmsnorm_ext: residual dtype {r.dtype} is not supported with input "
                        f"dtype {x.dtype}")


def check_stats(s, name, x, lead):
    rows = 1
    for d in lead:
        rows *= d
    if s.numel() != rows:
        raise RuntimeError(f"rmsnorm_ext: {name} must have one value per row ({rows} rows), "
                           f"got {s.numel()}")
    if s.dtype != _stats_dtype(x.dtype):
        raise RuntimeError(f"rmsnorm_ext: {name} must be {_stats_dtype(x.dtype)}, got {s.dtype}")
    if s.device != x.device:
        raise RuntimeError(f"rmsnorm_ext: {name} is on {s.device} but the input is on {x.device}")


def check_grad(g, x, same_dtype=False):
    if g.shape != x.shape:
        raise ValueError(f"rmsnorm_ext: grad_out shape {list(g.shape)} does not match the input "
                         f"shape {list(x.shape)}")
    if g.device != x.device:
        raise RuntimeError(f"rmsnorm_ext: grad_out is on {g.device} but the input is on "
                           f"{x.device}")
    ok = g.dtype == x.dtype or (not same_dtype and x.dtype == torch.float32 and
                                g.dtype in _REDUCED)
    if not ok:
        raise TypeError(f"rmsnorm_ext: grad_out dtype {g.dtype} is not supported with input "
                        f"dtype {x.dtype}")


def _stats(x, lead):
    return x.new_empty(lead, dtype=_stats_dtype(x.dtype))


def _param_grad(p, x, want):
    return p.new_empty(p.shape) if (want and p is not None) else x.new_empty((0,))


@torch.library.register_fake("rmsnorm_ext::rms_norm_fwd")
def _(input, normalized_shape, weight, eps, weight_offset):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_eps(eps)
    return torch.empty_like(input, memory_format=torch.contiguous_format), _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::rms_norm_bwd")
def _(grad_out, input, rstd, weight, normalized_shape, weight_offset, grad_residual,
      compute_weight_grad):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_grad(grad_out, input)
    check_param(weight, "weight", grad_out, normalized_shape)
    check_stats(rstd, "rstd", input, lead)
    if grad_residual is not None:
        if grad_residual.shape != input.shape or grad_residual.dtype != input.dtype:
            raise ValueError("rmsnorm_ext: grad_residual must match the input's shape and dtype")
        if grad_residual.device != input.device:
            raise RuntimeError(f"rmsnorm_ext: grad_residual is on {grad_residual.device} but "
                               f"the input is on {input.device}")
    dx = torch.empty_like(input, memory_format=torch.contiguous_format)
    return dx, _param_grad(weight, input, compute_weight_grad)


@torch.library.register_fake("rmsnorm_ext::layer_norm_fwd")
def _(input, normalized_shape, weight, bias, eps):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_param(bias, "bias", input, normalized_shape)
    check_eps(eps)
    y = torch.empty_like(input, memory_format=torch.contiguous_format)
    return y, _stats(input, lead), _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::layer_norm_bwd")
def _(grad_out, input, mean, rstd, weight, normalized_shape, compute_weight_grad,
      compute_bias_grad):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_grad(grad_out, input, same_dtype=True)
    check_param(weight, "weight", input, normalized_shape)
    check_stats(mean, "mean", input, lead)
    check_stats(rstd, "rstd", input, lead)
    dx = torch.empty_like(input, memory_format=torch.contiguous_format)
    pdtype = weight.dtype if weight is not None else input.dtype
    db = (input.new_empty(tuple(normalized_shape), dtype=pdtype) if compute_bias_grad
          else input.new_empty((0,)))
    return dx, _param_grad(weight, input, compute_weight_grad), db


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_fwd")
def _(input, residual, normalized_shape, weight, eps, weight_offset):
    check_input(input)
    check_residual(input, residual)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_eps(eps)
    y = torch.empty_like(input, memory_format=torch.contiguous_format)
    h = torch.empty_like(residual, memory_format=torch.contiguous_format)
    return y, h, _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_inplace")
def _(input, residual, normalized_shape, weight, eps, weight_offset):
    check_input(input)
    check_residual(input, residual)
    check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_eps(eps)
    return None


# ---------------------------------------------------------------------------------------
# Norm + quantize (csrc/host/norm_quant.cpp; checks in csrc/common.h, same messages)

_QUANT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
QUANT_MIN_SCALE = {torch.float8_e4m3fn: 1.0 / (448.0 * 512.0),
                   torch.float8_e5m2: 1.0 / (57344.0 * 512.0),
                   torch.int8: torch.finfo(torch.float32).eps}


def check_quant_input(x, op):
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"rmsnorm_ext: {op}: input must be float32, bfloat16 or float16, "
                        f"got {x.dtype}")


def _check_quant_scalar(s, name, x, op):
    if s is None:
        return
    if s.dtype != torch.float32:
        raise TypeError(f"rmsnorm_ext: {op}: {name} must be a float32 tensor, got {s.dtype}")
    if s.numel() != 1:
        raise ValueError(f"rmsnorm_ext: {op}: {name} must have exactly one element, got shape "
                         f"{list(s.shape)}")
    if s.device != x.device:
        raise RuntimeError(f"rmsnorm_ext: {op}: {name} is on {s.device} but the input is on "
                           f"{x.device}; move them to the same device")


def check_quant_args(x, n, scale, quant_dtype, group_size, scale_ub, op):
    """Returns the number of scales per row (1 for per-token; unused for static)."""
    if quant_dtype not in _QUANT_DTYPES:
        raise TypeError(f"rmsnorm_ext: {op}: quant_dtype must be torch.float8_e4m3fn, "
                        f"torch.float8_e5m2 or torch.int8, got {quant_dtype}")
    _check_quant_scalar(scale, "scale", x, op)
    _check_quant_scalar(scale_ub, "scale_ub", x, op)
    if scale is not None and group_size is not None:
        raise ValueError(f"rmsnorm_ext: {op}: a static scale cannot be combined with group_size "
                         "(per-group scales are dynamic); pass scale=None for dynamic "
                         "per-group scales")
    if scale is not None and scale_ub is not None:
        raise ValueError(f"rmsnorm_ext: {op}: scale_ub bounds dynamic scales; it cannot be "
                         "combined with a static scale")
    if group_size is None:
        return 1
    if group_size <= 0:
        raise ValueError(f"rmsnorm_ext: {op}: group_size must be positive, got {group_size}")
    if n % group_size != 0:
        raise ValueError(f"rmsnorm_ext: {op}: group_size {group_size} does not divide the "
                         f"normalized size {n}")
    return n // group_size


def _quant_outputs(x, lead, normalized_shape, scale, quant_dtype, group_size, scale_ub, op):
    n = math.prod(normalized_shape)
    groups = check_quant_args(x, n, scale, quant_dtype, group_size, scale_ub, op)
    out = x.new_empty(x.shape, dtype=quant_dtype)
    if scale is not None:
        scales = scale.new_empty(scale.shape)
    else:
        scales = x.new_empty((*lead, groups), dtype=torch.float32)
    return out, scales


@torch.library.register_fake("rmsnorm_ext::rms_norm_quant")
def _(input, normalized_shape, weight, eps, weight_offset, scale, quant_dtype, group_size,
      scale_ub):
    op = "rms_norm_quant"
    check_quant_input(input, op)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_eps(eps)
    check_offset(weight_offset)
    return _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                          scale_ub, op)


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_quant")
def _(input, residual, normalized_shape, weight, eps, weight_offset, scale, quant_dtype,
      group_size, scale_ub):
    op = "fused_add_rms_norm_quant"
    check_quant_input(input, op)
    check_residual(input, residual)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_eps(eps)
    check_offset(weight_offset)
    out, scales = _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                                 scale_ub, op)
    h = torch.empty_like(residual, memory_format=torch.contiguous_format)
    return out, scales, h


@torch.library.register_fake("rmsnorm_ext::layer_norm_quant")
def _(input, normalized_shape, weight, bias, eps, scale, quant_dtype, group_size, scale_ub):
    op = "layer_norm_quant"
    check_quant_input(input, op)
    lead = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", input, normalized_shape)
    check_param(bias, "bias", input, normalized_shape)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"rmsnorm_ext: weight dtype {weight.dtype} and bias dtype {bias.dtype} "
                        "must match")
    check_eps(eps)
    return _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                          scale_ub, op)
