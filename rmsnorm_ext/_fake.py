"""Fake (meta) kernels: output shapes and dtypes without computing, so the ops trace
under torch.compile(fullgraph=True) and run on meta tensors.

They apply the host layer's rules (csrc/common.h, csrc/host/*.cpp) in the same order, with
the same exception types and messages, so a bad call fails at trace time exactly as it
fails eagerly on any device; tests/test_same_errors.py compares them. Numbers print the way
C++ does (``1e-05``), dtypes the way Python does (``torch.float32``), on both sides.
"""
import math

import torch

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCED = (torch.bfloat16, torch.float16)

def dt(dtype):
    """A dtype as the C++ checks print it (py_dtype in csrc/common.h): torch.float32."""
    return str(dtype)


def num(v):
    """A double as C++'s default ostream prints it (6 significant digits)."""
    return f"{v:g}"


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x, name="input"):
    if x.dtype not in _FLOATS:
        raise TypeError(f"rmsnorm_ext: {name} must be float32, float64, bfloat16 or float16, "
                        f"got {dt(x.dtype)}")


def check_normalized_shape(x, normalized_shape):
    """Returns the leading (statistics) shape."""
    ns = list(normalized_shape)
    if not ns:
        raise ValueError("rmsnorm_ext: normalized_shape must have at least one dimension")
    nd = len(ns)
    if x.dim() < nd:
        raise ValueError(f"rmsnorm_ext: normalized_shape {ns} has more dimensions than the "
                         f"input of shape {list(x.shape)}")
    if list(x.shape[x.dim() - nd:]) != ns:
        raise ValueError(f"rmsnorm_ext: normalized_shape {ns} does not match the input's "
                         f"trailing dimensions: input shape {list(x.shape)} (expected "
                         f"input.shape[-{nd}:] == normalized_shape)")
    return x.shape[:x.dim() - nd]


def check_same_device(a, an, b, bn):
    if a.device != b.device:
        raise RuntimeError(f"rmsnorm_ext: {an} is on {a.device} but {bn} is on {b.device}; "
                           "move them to the same device")


def check_param(p, name, x, normalized_shape):
    if p is None:
        return
    if list(p.shape) != list(normalized_shape):
        raise ValueError(f"rmsnorm_ext: {name} must have shape normalized_shape "
                         f"{list(normalized_shape)}, got {list(p.shape)}")
    check_same_device(p, name, x, "the input")
    if not (p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _REDUCED)):
        raise TypeError(f"rmsnorm_ext: {name} dtype {dt(p.dtype)} is not supported with input "
                        f"dtype {dt(x.dtype)} (use the input's dtype, or float32 with a "
                        "bfloat16/float16 input)")


def check_eps(eps):
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"rmsnorm_ext: eps must be a finite number >= 0, got {num(eps)}")


def check_offset(weight_offset):
    if not math.isfinite(weight_offset):
        raise ValueError(f"rmsnorm_ext: weight_offset must be finite, got {num(weight_offset)}")


def check_stats(s, name, x, lead):
    rows = 1
    for d in lead:
        rows *= d
    if s.numel() != rows:
        raise RuntimeError(f"rmsnorm_ext: {name} must have one value per row ({rows} rows), "
                           f"got {s.numel()}")
    if s.dtype != _stats_dtype(x.dtype):
        raise RuntimeError(f"rmsnorm_ext: {name} must be {dt(_stats_dtype(x.dtype))}, got "
                           f"{dt(s.dtype)}")
    check_same_device(s, name, x, "the input")


def check_grad(g, x):
    if g.shape != x.shape:
        raise ValueError(f"rmsnorm_ext: grad_out shape {list(g.shape)} does not match the input "
                         f"shape {list(x.shape)}")
    check_same_device(g, "grad_out", x, "the input")
    if not (g.dtype == x.dtype or (x.dtype == torch.float32 and g.dtype in _REDUCED)):
        raise TypeError(f"rmsnorm_ext: grad_out dtype {dt(g.dtype)} is not supported with input "
                        f"dtype {dt(x.dtype)}")


def check_ln_grad(g, x):
    check_grad(g, x)
    if g.dtype != x.dtype:
        raise TypeError(f"rmsnorm_ext: layer_norm_bwd: grad_out dtype {dt(g.dtype)} must match "
                        f"the input dtype {dt(x.dtype)}")


def check_grad_residual(g, x):
    if g.shape != x.shape:
        raise ValueError(f"rmsnorm_ext: grad_residual shape {list(g.shape)} does not match the "
                         f"input shape {list(x.shape)}")
    check_same_device(g, "grad_residual", x, "the input")
    if g.dtype != x.dtype:
        raise TypeError(f"rmsnorm_ext: grad_residual dtype {dt(g.dtype)} must match the input "
                        f"dtype {dt(x.dtype)}")


def check_residual(x, r):
    if r.shape != x.shape:
        raise ValueError(f"rmsnorm_ext: residual shape {list(r.shape)} does not match the "
                         f"input shape {list(x.shape)}")
    check_same_device(r, "residual", x, "the input")
    if not (r.dtype == x.dtype or (r.dtype == torch.float32 and x.dtype in _REDUCED)):
        raise TypeError(f"rmsnorm_ext: residual dtype {dt(r.dtype)} is not supported with input "
                        f"dtype {dt(x.dtype)} (use the input's dtype, or float32 with a "
                        "bfloat16/float16 input)")


def check_same_param_dtype(w, b):
    if w is not None and b is not None and w.dtype != b.dtype:
        raise TypeError(f"rmsnorm_ext: weight dtype {dt(w.dtype)} and bias dtype {dt(b.dtype)} "
                        "must match")


def check_rms_norm(x, normalized_shape, weight, eps, weight_offset):
    check_input(x)
    lead = check_normalized_shape(x, normalized_shape)
    check_param(weight, "weight", x, normalized_shape)
    check_eps(eps)
    check_offset(weight_offset)
    return lead


def check_layer_norm(x, normalized_shape, weight, bias, eps):
    check_input(x)
    lead = check_normalized_shape(x, normalized_shape)
    check_param(weight, "weight", x, normalized_shape)
    check_param(bias, "bias", x, normalized_shape)
    check_same_param_dtype(weight, bias)
    check_eps(eps)
    return lead


def check_fused(x, r, normalized_shape, weight, eps, weight_offset):
    check_input(x)
    check_residual(x, r)
    lead = check_normalized_shape(x, normalized_shape)
    check_param(weight, "weight", x, normalized_shape)
    check_eps(eps)
    check_offset(weight_offset)
    return lead


def _non_overlapping_and_dense(t):
    """Whether the elements fill a contiguous block, in some order of the dims (c10's
    is_non_overlapping_and_dense)."""
    if t.is_contiguous():
        return True
    expected = 1
    for i in sorted(range(t.dim()), key=lambda i: (t.stride(i), t.size(i))):
        if t.size(i) == 1:
            continue
        if t.stride(i) != expected:
            return False
        expected *= t.size(i)
    return True


def _has_internal_overlap(t):
    """at::has_internal_overlap == MemOverlap::Yes: a dim of size > 1 with stride 0."""
    if _non_overlapping_and_dense(t):
        return False
    return any(t.stride(i) == 0 and t.size(i) > 1 for i in range(t.dim()))


def check_inplace_operands(a, an, b, bn, op):
    """at::has_internal_overlap / at::get_overlap_status, as csrc/common.h applies them."""
    for t, n in ((a, an), (b, bn)):
        if _has_internal_overlap(t):
            raise ValueError(f"rmsnorm_ext: {op}: {n} has elements that share memory (expanded "
                             "or overlapping); it cannot be written in place")
    if a.numel() == 0 or b.numel() == 0:
        return
    overlap = a is b
    if (not overlap and _non_overlapping_and_dense(a) and _non_overlapping_and_dense(b)
            and a.untyped_storage()._cdata == b.untyped_storage()._cdata):
        # Byte ranges of the elements in the shared storage (dense, so begin..begin+numel).
        a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
        overlap = a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
    if overlap:
        raise ValueError(f"rmsnorm_ext: {op}: {an} and {bn} overlap in memory; they cannot "
                         "both be written in place")


def _stats(x, lead):
    return x.new_empty(lead, dtype=_stats_dtype(x.dtype))


def _param_grad(p, x, want):
    return p.new_empty(p.shape) if (want and p is not None) else x.new_empty((0,))


def _like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("rmsnorm_ext::rms_norm_fwd")
def _(input, normalized_shape, weight, eps, weight_offset):
    lead = check_rms_norm(input, normalized_shape, weight, eps, weight_offset)
    return _like(input), _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::rms_norm_bwd")
def _(grad_out, input, rstd, weight, normalized_shape, weight_offset, grad_residual,
      compute_weight_grad):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_grad(grad_out, input)
    check_param(weight, "weight", grad_out, normalized_shape)
    check_stats(rstd, "rstd", input, lead)
    check_offset(weight_offset)
    if grad_residual is not None:
        check_grad_residual(grad_residual, input)
    return _like(input), _param_grad(weight, input, compute_weight_grad)


@torch.library.register_fake("rmsnorm_ext::layer_norm_fwd")
def _(input, normalized_shape, weight, bias, eps):
    lead = check_layer_norm(input, normalized_shape, weight, bias, eps)
    return _like(input), _stats(input, lead), _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::layer_norm_bwd")
def _(grad_out, input, mean, rstd, weight, normalized_shape, compute_weight_grad,
      compute_bias_grad):
    check_input(input)
    lead = check_normalized_shape(input, normalized_shape)
    check_ln_grad(grad_out, input)
    check_param(weight, "weight", input, normalized_shape)
    check_stats(mean, "mean", input, lead)
    check_stats(rstd, "rstd", input, lead)
    pdtype = weight.dtype if weight is not None else input.dtype
    db = (input.new_empty(tuple(normalized_shape), dtype=pdtype) if compute_bias_grad
          else input.new_empty((0,)))
    return _like(input), _param_grad(weight, input, compute_weight_grad), db


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_fwd")
def _(input, residual, normalized_shape, weight, eps, weight_offset):
    lead = check_fused(input, residual, normalized_shape, weight, eps, weight_offset)
    return _like(input), _like(residual), _stats(input, lead)


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_inplace")
def _(input, residual, normalized_shape, weight, eps, weight_offset):
    check_fused(input, residual, normalized_shape, weight, eps, weight_offset)
    check_inplace_operands(input, "input", residual, "residual", "fused_add_rms_norm_")
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
    lead = check_rms_norm(input, normalized_shape, weight, eps, weight_offset)
    return _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                          scale_ub, op)


@torch.library.register_fake("rmsnorm_ext::fused_add_rms_norm_quant")
def _(input, residual, normalized_shape, weight, eps, weight_offset, scale, quant_dtype,
      group_size, scale_ub):
    op = "fused_add_rms_norm_quant"
    check_quant_input(input, op)
    lead = check_fused(input, residual, normalized_shape, weight, eps, weight_offset)
    out, scales = _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                                 scale_ub, op)
    h = torch.empty_like(residual, memory_format=torch.contiguous_format)
    return out, scales, h


@torch.library.register_fake("rmsnorm_ext::layer_norm_quant")
def _(input, normalized_shape, weight, bias, eps, scale, quant_dtype, group_size, scale_ub):
    op = "layer_norm_quant"
    check_quant_input(input, op)
    lead = check_layer_norm(input, normalized_shape, weight, bias, eps)
    return _quant_outputs(input, lead, normalized_shape, scale, quant_dtype, group_size,
                          scale_ub, op)
