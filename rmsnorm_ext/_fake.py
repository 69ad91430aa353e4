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
