"""Public functions: same signatures, defaults and semantics as torch.nn.functional.

Kept thin on purpose (small-shape calls are dominated by host overhead). In eager mode each
function goes straight to a C entry point (csrc/python/python_fast.cpp) that calls the op through
the C++ dispatcher; that entry declines (returns NotImplemented) anything but plain tensors
and well-formed arguments, which then take the torch.ops path below -- as does everything
under torch.compile, which traces torch.ops. All checks and math happen in C++.
"""
import operator
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C
from ._autograd import call as _call

_ops = torch.ops.rmsnorm_ext
_rms_fwd = _ops.rms_norm_fwd.default
_ln_fwd = _ops.layer_norm_fwd.default
_fused_fwd = _ops.fused_add_rms_norm_fwd.default
_fused_inplace = _ops.fused_add_rms_norm_inplace.default

_fast_rms = _C._rms_norm
_fast_ln = _C._layer_norm
_fast_fused = _C._fused_add_rms_norm

_is_compiling = torch.compiler.is_compiling

_ShapeT = Union[int, Sequence[int], torch.Size]

# The package exports these (rmsnorm_ext/__init__.py imports *): a new op's public function
# is added here and nowhere else.
__all__ = ["rms_norm", "layer_norm", "fused_add_rms_norm", "fused_add_rms_norm_",
           "gated_rms_norm", "qk_norm_rope", "rms_norm_modulate", "layer_norm_modulate",
           "rms_norm_2d", "layer_norm_2d", "rms_norm_quant", "fused_add_rms_norm_quant",
           "layer_norm_quant"]


def _int_arg(name, v):
    """An integer argument the op takes as int: a float or a bool is refused, not truncated
    (int(2.5) would silently mean 2), as the op itself refuses them."""
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise TypeError(f"rmsnorm_ext: {name} must be an int, got {type(v).__name__} {v!r}")
    return operator.index(v)


def _shape(normalized_shape):
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


# eps=None, as torch's rms_norm takes it: the epsilon of the type the norm computes in --
# float32 for float32, bfloat16 and float16 inputs, float64 for float64 -- not the input
# dtype's (nn.RMSNorm's docstring says torch.finfo(x.dtype).eps, but aten's rms_norm and its
# decomposition use the math type's, so a bfloat16 norm adds 1.2e-7, not 0.0078). Looked up
# here: torch.finfo costs ~1.5 us a call.
_F32_EPS = torch.finfo(torch.float32).eps
_DEFAULT_EPS = {torch.float32: _F32_EPS, torch.bfloat16: _F32_EPS, torch.float16: _F32_EPS,
                torch.float64: torch.finfo(torch.float64).eps}


def _eps(input, eps):
    if eps is not None:
        return float(eps)
    e = _DEFAULT_EPS.get(input.dtype)
    if e is None:
        raise TypeError("rmsnorm_ext: input must be float32, float64, bfloat16 or float16, "
                        f"got {input.dtype}")
    return e


def _fused_eps(input, residual, eps):
    # The default eps is the normalized tensor's (the residual's); an unsupported residual
    # dtype is left for the op's own check, which names the residual.
    if eps is None and residual.dtype in _DEFAULT_EPS:
        return _DEFAULT_EPS[residual.dtype]
    return _eps(input, eps)


# torch.fx.symbolic_trace: the default eps depends on the input's dtype, which a traced
# Proxy does not have, so these are recorded as calls (evaluated when the graph runs)
# instead of being traced into. The ops take Proxies as they are.
torch.fx.wrap("_eps")
torch.fx.wrap("_fused_eps")


def _kernel_weight(input: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    """A weight of any floating dtype in one the kernels take next to ``input``: the input's
    own, or float32 (bf16 / fp16 / fp32 input) / float64 (fp64 input) -- exact from a narrower
    dtype, and a float64 weight of a float32 input rounded to float32 (within an ulp of torch,
    which scales by the float64 value). F.rms_norm and HF's norms take any floating weight; its
    gradient flows back through the conversion in its own dtype. Anything else (an integer
    weight, an unsupported input) is left to the op's check. Scriptable (the modules'
    TorchScript bodies call it too)."""
    if weight is None or weight.dtype == input.dtype or not weight.is_floating_point():
        return weight
    if input.dtype == torch.float64:
        return weight.to(torch.float64)
    if input.dtype == torch.float32 or input.dtype == torch.bfloat16 or \
            input.dtype == torch.float16:
        return weight if weight.dtype == torch.float32 else weight.to(torch.float32)
    return weight


torch.fx.wrap("_kernel_weight")


def rms_norm(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, weight_offset: float = 0.0) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims, like ``F.rms_norm``.

    ``y = x / sqrt(mean(x**2) + eps) * (weight_offset + weight)``; ``eps=None`` is
    torch's default: float32's epsilon (float64's for float64 input; not bfloat16's or
    float16's, which torch does not use either). ``weight_offset=1.0`` gives Gemma's ``1 + w``
    (added in fp32). Statistics accumulate in fp32 (fp64 for fp64).
    """
    if not _is_compiling():
        y = _fast_rms(input, normalized_shape, weight, eps, weight_offset)
        if y is not NotImplemented:
            return y
        return _call("rms_norm_fwd", input, _shape(normalized_shape),
                     _kernel_weight(input, weight), _eps(input, eps), float(weight_offset))[0]
    return _rms_fwd(input, _shape(normalized_shape), _kernel_weight(input, weight),
                    _eps(input, eps), float(weight_offset))[0]


def layer_norm(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims, like ``F.layer_norm``."""
    if not _is_compiling():
        y = _fast_ln(input, normalized_shape, weight, bias, eps)
        if y is not NotImplemented:
            return y
        return _call("layer_norm_fwd", input, _shape(normalized_shape), weight, bias,
                     float(eps))[0]
    return _ln_fwd(input, _shape(normalized_shape), weight, bias, float(eps))[0]


def fused_add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: _ShapeT,
                       weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                       weight_offset: float = 0.0) -> Tuple[Tensor, Tensor]:
    """``residual_out = input + residual``; ``output = rms_norm(residual_out)``, in one pass.

    Returns ``(output, residual_out)``. ``residual`` may be float32 while ``input`` is
    bfloat16/float16 (an fp32 residual stream): ``residual_out`` keeps the residual's
    dtype, ``output`` the input's. ``eps=None`` is :func:`rms_norm`'s default for the
    residual's dtype (the tensor being normalized), so the result equals
    ``F.rms_norm(input + residual, ...)``. Differentiable w.r.t. input, residual and weight.
    """
    if not _is_compiling():
        out = _fast_fused(input, residual, normalized_shape, weight, eps, weight_offset)
        if out is not NotImplemented:
            return out
        y, h, _ = _call("fused_add_rms_norm_fwd", input, residual, _shape(normalized_shape),
                        weight, _fused_eps(input, residual, eps), float(weight_offset))
        return y, h
    y, h, _ = _fused_fwd(input, residual, _shape(normalized_shape), weight,
                         _fused_eps(input, residual, eps), float(weight_offset))
    return y, h


def fused_add_rms_norm_(input: Tensor, residual: Tensor, normalized_shape: _ShapeT,
                        weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                        weight_offset: float = 0.0) -> Tuple[Tensor, Tensor]:
    """In-place inference variant: ``residual += input``; ``input = rms_norm(residual)``.

    Returns ``(input, residual)``, both modified in place. Not differentiable: use
    :func:`fused_add_rms_norm` for training.
    """
    if torch.is_grad_enabled() and (input.requires_grad or residual.requires_grad or (
            weight is not None and weight.requires_grad)):
        raise RuntimeError(
            "rmsnorm_ext: fused_add_rms_norm_ is in-place and not differentiable; call it "
            "under torch.no_grad()/torch.inference_mode(), or use fused_add_rms_norm")
    _fused_inplace(input, residual, _shape(normalized_shape), weight, _fused_eps(input, residual, eps),
                   float(weight_offset))
    return input, residual


def gated_rms_norm(input: Tensor, gate: Tensor, normalized_shape: _ShapeT,
                   weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                   group_size: Optional[int] = None, norm_before_gate: bool = True,
                   activation: str = "silu") -> Tensor:
    """Gated RMSNorm in one pass (Mamba2, Nemotron-H, Bamba, Falcon-H1, Granite-4 hybrid,
    Qwen3-Next, Kimi Linear). ``gate`` has the input's shape and dtype; ``act`` is
    ``"silu"`` or ``"sigmoid"``:

    - ``norm_before_gate=True``: ``y = rms_norm(x) * weight * act(gate)`` (Qwen3-Next, FLA
      ``FusedRMSNormGated``, Kimi Linear with sigmoid);
    - ``norm_before_gate=False``: ``y = rms_norm(x * act(gate)) * weight`` (Mamba2,
      mamba_ssm ``rmsnorm_fn``).

    ``group_size`` (dividing the normalized size) takes the RMS over each group of that many
    consecutive elements separately (Mamba2's ``ngroups``); ``None`` is one group. fp32
    math (fp64 for fp64), one rounding to the input dtype; ``eps=None`` is
    :func:`rms_norm`'s default. Differentiable w.r.t. input, gate and weight.
    """
    ns = _shape(normalized_shape)
    n = 1
    for d in ns:
        n *= d
    g = max(n, 1) if group_size is None else _int_arg("group_size", group_size)
    args = (input, gate, ns, weight, _eps(input, eps), g, bool(norm_before_gate),
            str(activation))
    return _call("gated_rms_norm_fwd", *args)[0]


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, eps: float = 1e-6, *,
                 interleaved: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k, then rotary embedding, in one pass (Qwen3, Gemma 3, GLM).

    ``q`` is ``[..., S, Hq, D]`` and ``k`` ``[..., S, Hk, D]`` (Hugging Face's layout before
    its transpose to ``[B, H, S, D]``); each head vector is normalized over ``D`` with its
    weight (``[D]``, or None), then rotated by ``cos`` / ``sin`` (``[S, D]``, ``[1, S, D]``
    or ``[B, S, D]``, as HF's rotary embedding returns them): ``interleaved=False`` is
    rotate-half (Llama, Qwen, NeoX: ``u * cos + rotate_half(u) * sin``), ``True`` rotates
    adjacent pairs (GPT-J).
    fp32 math, one rounding. Returns ``(q_out, k_out)``; differentiable w.r.t. q, k and the
    weights (not cos / sin).
    """
    args = (q, k, q_weight, k_weight, cos, sin, float(eps), bool(interleaved))
    out = _call("qk_norm_rope_fwd", *args)
    return out[0], out[1]


def rms_norm_modulate(input: Tensor, normalized_shape: _ShapeT, scale: Tensor,
                      shift: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                      eps: Optional[float] = None) -> Tensor:
    """adaLN modulation on RMSNorm, one pass: ``rms_norm(x) * (1 + scale) + shift``.

    ``input`` is ``[B, ..., D]``; ``scale`` / ``shift`` are ``[B, D]`` (one vector per sample,
    broadcast over the middle dims) or any shape with ``D`` last, 1 in every middle dim and
    ``B`` or 1 first (``[B, 1, D]``, ``[1, D]``, ``[D]``). fp32 math, one rounding; gradients
    to input, scale, shift and weight (dscale / dshift: per-sample sums over the sequence,
    blocked and deterministic). ``eps=None`` is :func:`rms_norm`'s default.
    """
    args = (input, _shape(normalized_shape), scale, shift, weight, _eps(input, eps))
    return _call("rms_norm_modulate_fwd", *args)[0]


def layer_norm_modulate(input: Tensor, normalized_shape: _ShapeT, scale: Tensor,
                        shift: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """adaLN modulation on LayerNorm (DiT, Flux, SD3, Wan): ``layer_norm(x) * (1 + scale) +
    shift`` in one pass; shapes and gradients as :func:`rms_norm_modulate`."""
    args = (input, _shape(normalized_shape), scale, shift, weight, bias, float(eps))
    return _call("layer_norm_modulate_fwd", *args)[0]


# ---------------------------------------------------------------------------------------
# Channels-first norms (vision: ConvNeXt, SAM, Hiera; timm's LayerNorm2d / RmsNorm2d)

def rms_norm_2d(input: Tensor, weight: Optional[Tensor] = None,
                eps: Optional[float] = 1e-6) -> Tensor:
    """RMSNorm over the channels (dim 1) of ``[N, C, *spatial]`` (one or more spatial dims),
    ``weight`` of shape ``[C]``: what timm's ``RmsNorm2d`` computes, without its permutes.

    The input is read in its own memory format (contiguous or ``channels_last``) and the
    output has the same one; fp32 math (fp64 for fp64), one rounding. ``eps=None`` is
    :func:`rms_norm`'s default.
    """
    args = (input, weight, _eps(input, eps))
    return _call("rms_norm_2d_fwd", *args)[0]


def layer_norm_2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-6) -> Tensor:
    """LayerNorm over the channels (dim 1) of ``[N, C, *spatial]``, ``weight`` / ``bias`` of
    shape ``[C]``: ``F.layer_norm(x.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)``
    (timm's / torchvision's ``LayerNorm2d``, HF ConvNeXt's ``channels_first``) in one pass,
    in the input's memory format (contiguous or ``channels_last``, never a permuted copy).
    """
    args = (input, weight, bias, _eps(input, eps))
    return _call("layer_norm_2d_fwd", *args)[0]


# ---------------------------------------------------------------------------------------
# Norm + quantize (inference only)

_rms_quant = _ops.rms_norm_quant.default
_fused_quant = _ops.fused_add_rms_norm_quant.default
_ln_quant = _ops.layer_norm_quant.default


def _refuse_grad(op, *tensors):
    # Same text as the ops' Autograd kernels (csrc/autograd/inference_autograd.cpp), raised here first so
    # that torch.compile reports it at trace time too.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"rmsnorm_ext: {op} is inference-only: its quantized output has no gradient. Call "
            "it under torch.no_grad() or torch.inference_mode(), or pass tensors that do not "
            "require grad (.detach())")


def _quant_eps(dtype, eps):
    # An unsupported input dtype is left to the op, whose message names the quantized op.
    return float(eps) if eps is not None else _DEFAULT_EPS.get(dtype, 0.0)


def _group(group_size):
    return None if group_size is None else _int_arg("group_size", group_size)


def rms_norm_quant(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
                   eps: Optional[float] = None, *, scale: Optional[Tensor] = None,
                   quant_dtype: torch.dtype = torch.float8_e4m3fn,
                   group_size: Optional[int] = None, scale_ub: Optional[Tensor] = None,
                   weight_offset: float = 0.0) -> Tuple[Tensor, Tensor]:
    """RMSNorm and quantization in one pass (inference only). Returns ``(out, scales)``.

    ``y = rms_norm(input, normalized_shape, weight, eps, weight_offset=weight_offset)`` in
    fp32 (not rounded to the input dtype), then ``out = quantize(y / s)`` in ``quant_dtype``
    (``torch.float8_e4m3fn``: saturated to +-448; ``torch.float8_e5m2``: +-57344; both round
    to nearest even; ``torch.int8``: round half to even, clamped to [-128, 127]):

    - ``scale`` given (a one-element float32 tensor, the dequantization scale): ``s = scale``,
      ``scales`` is a copy of it;
    - otherwise dynamic, per row (``group_size=None``) or per group of ``group_size``
      consecutive elements of a row: ``s = max(min(absmax(y), scale_ub) / qmax, min_scale)``
      (``qmax`` = 448, 57344 or 127; ``min_scale`` = ``1 / (qmax * 512)`` for fp8, float32
      epsilon for int8; the ``min`` only with ``scale_ub``), ``scales`` float32 of shape
      ``input.shape[:-len(normalized_shape)] + (groups,)``.

    ``out.float() * s`` dequantizes. Scale values are not checked (that would need a device
    sync). A NaN in ``y`` makes its row's (group's) dynamic scale NaN and the whole row
    (group) quantizes to NaN (fp8) or 0 (int8); with a static scale only NaN elements do,
    and +-Inf saturates to +-qmax.
    """
    _refuse_grad("rms_norm_quant", input, weight, scale, scale_ub)
    args = (input, _shape(normalized_shape), weight, _quant_eps(input.dtype, eps),
            float(weight_offset), scale, quant_dtype, _group(group_size), scale_ub)
    return _rms_quant(*args)


def fused_add_rms_norm_quant(input: Tensor, residual: Tensor, normalized_shape: _ShapeT,
                             weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                             scale: Optional[Tensor] = None,
                             quant_dtype: torch.dtype = torch.float8_e4m3fn,
                             group_size: Optional[int] = None, scale_ub: Optional[Tensor] = None,
                             weight_offset: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """``residual_out = input + residual``, then :func:`rms_norm_quant` of it, in one pass.

    Returns ``(out, scales, residual_out)``. As in :func:`fused_add_rms_norm`,
    ``residual`` may be float32 next to a bfloat16/float16 input (``residual_out`` keeps the
    residual's dtype, and ``y`` is the norm of ``residual_out`` as stored) and ``eps=None``
    is :func:`rms_norm`'s default for the residual's dtype. Inference only.
    """
    _refuse_grad("fused_add_rms_norm_quant", input, residual, weight, scale, scale_ub)
    args = (input, residual, _shape(normalized_shape), weight,
            _quant_eps(residual.dtype, eps), float(weight_offset), scale, quant_dtype,
            _group(group_size), scale_ub)
    return _fused_quant(*args)


def layer_norm_quant(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                     scale: Optional[Tensor] = None,
                     quant_dtype: torch.dtype = torch.float8_e4m3fn,
                     group_size: Optional[int] = None,
                     scale_ub: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """LayerNorm (as :func:`layer_norm`) and quantization in one pass, with the scale
    modes of :func:`rms_norm_quant`. Returns ``(out, scales)``. Inference only."""
    _refuse_grad("layer_norm_quant", input, weight, bias, scale, scale_ub)
    args = (input, _shape(normalized_shape), weight, bias, float(eps), scale, quant_dtype,
            _group(group_size), scale_ub)
    return _ln_quant(*args)
