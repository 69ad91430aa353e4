"""diffusers' adaLN modules on the fused modulation op (replace_norms).

``AdaLayerNormZero``, ``AdaLayerNormZeroSingle`` and ``AdaLayerNormContinuous`` compute
``norm(x) * (1 + scale) + shift`` in three passes over the block's largest activation; their
replacements (subclasses, so isinstance checks hold; the same submodules and Parameters)
compute it with :func:`rmsnorm_ext.layer_norm_modulate` in one. Only exact classes whose
``norm`` is a plain LayerNorm are replaced (an ``fp32_layer_norm`` or RMSNorm variant is
left alone). The modulation is done in fp32 and rounded once, where diffusers rounds the
norm's output first: values agree within the dtype's rounding.
"""
import sys

import torch
from torch import nn

from .functional import layer_norm_modulate
from .modules import LayerNorm as _OurLayerNorm

_REDUCED = (torch.bfloat16, torch.float16)


def _plain_layer_norm(norm) -> bool:
    return type(norm) in (nn.LayerNorm, _OurLayerNorm) and len(norm.normalized_shape) == 1


def _kernel_dtype(t, x):
    """t in a dtype the kernel takes beside x: x's, or float32 beside bf16/fp16."""
    if t is None or t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in _REDUCED):
        return t
    return t.to(torch.float32 if x.dtype in _REDUCED else x.dtype)


def _modulated(norm, x, scale, shift):
    out = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
    scale, shift = _kernel_dtype(scale, x), _kernel_dtype(shift, x)
    if shift.dtype != scale.dtype:
        shift = shift.to(scale.dtype)
    w, b = _kernel_dtype(norm.weight, x), _kernel_dtype(norm.bias, x)
    if w is not None and b is not None and w.dtype != b.dtype:
        b = b.to(w.dtype)
    y = layer_norm_modulate(x, norm.normalized_shape, scale, shift, w, b, norm.eps)
    return y if y.dtype == out else y.to(out)


def _zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return _modulated(self.norm, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _zero_single_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return _modulated(self.norm, x, scale_msa, shift_msa), gate_msa


def _continuous_forward(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return _modulated(self.norm, x, scale, shift)


_FORWARDS = {"AdaLayerNormZero": _zero_forward, "AdaLayerNormZeroSingle": _zero_single_forward,
             "AdaLayerNormContinuous": _continuous_forward}
_CLASSES = {}


def _fused_class(cls):
    if cls not in _CLASSES:
        name = f"Fused{cls.__name__}"
        _CLASSES[cls] = type(name, (cls,), {
            "forward": _FORWARDS[cls.__name__],
            "_get_name": lambda self: f"rmsnorm_ext.{name}",
            "__module__": __name__,
        })
    return _CLASSES[cls]


def replacement(module: nn.Module):
    """The fused replacement of a diffusers adaLN module, or None (diffusers not imported,
    another class, or a norm other than a plain LayerNorm)."""
    normalization = sys.modules.get("diffusers.models.normalization")
    if normalization is None:
        return None
    t = type(module)
    if getattr(normalization, t.__name__, None) is not t or t.__name__ not in _FORWARDS:
        return None
    if "forward" in module.__dict__ or not _plain_layer_norm(getattr(module, "norm", None)):
        return None
    new = _fused_class(t).__new__(_fused_class(t))
    new.__dict__.update(module.__dict__)  # the same submodules, Parameters, hooks, flags
    return new
