"""nn.Modules: drop-ins for torch.nn.RMSNorm and torch.nn.LayerNorm.

They subclass the torch modules, so constructor parameters, parameter names,
state_dicts, repr and isinstance checks are the same; only forward changes.
"""
import torch

from .functional import layer_norm, rms_norm

_REDUCED = (torch.bfloat16, torch.float16)
_OUT_POLICIES = ("promote", "input", "weight")


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """A Hugging Face-style RMSNorm forward (weight of any float dtype, output in
    ``out_dtype``) on the fused kernel; shared by :class:`HFRMSNorm` and the hub layers."""
    w = weight
    if not (w.dtype == x.dtype or (w.dtype == torch.float32 and x.dtype in _REDUCED)):
        # The kernel takes the weight in the input dtype or fp32; upcasting is exact for the
        # usual cases (a bf16/fp16 weight with fp32 input).
        w = w.to(torch.float32 if x.dtype in _REDUCED else x.dtype)
    y = rms_norm(x, weight.shape, w, eps, weight_offset=weight_offset)
    return y if y.dtype == out_dtype else y.to(out_dtype)



class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by rmsnorm_ext's fused kernels.

    Extra keyword-only ``weight_offset`` (default 0.0): the output is scaled by
    ``weight_offset + weight`` computed in fp32 (Gemma: ``weight_offset=1.0``, weight
    stored around 0). With an offset, the weight initializes to ``1 - weight_offset`` so
    a fresh module still computes plain RMSNorm.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None, *, weight_offset: float = 0.0):
        self.weight_offset = float(weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps,
                        weight_offset=self.weight_offset)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + f", weight_offset={self.weight_offset}" if self.weight_offset else s


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by rmsnorm_ext's fused kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class HFRMSNorm(RMSNorm):
    """Replacement for Hugging Face-style RMSNorm modules, computed by rmsnorm_ext's kernels.

    A :class:`rmsnorm_ext.RMSNorm` that also keeps the HF attribute names (``weight``,
    ``eps`` and ``variance_epsilon``, the latter two aliases of each other) and the replaced
    module's output-dtype rule ``out_dtype``: ``"promote"`` (Llama: ``promote_types(x, w)``),
    ``"input"`` (Gemma) or ``"weight"`` (T5). ``weight_offset=1.0`` gives Gemma's ``1 + w``
    (added in fp32). See :mod:`rmsnorm_ext.replace` for the numeric differences from HF.
    """

    def __init__(self, normalized_shape, eps: float = 1e-6, device=None, dtype=None, *,
                 weight_offset: float = 0.0, out_dtype: str = "promote"):
        if out_dtype not in _OUT_POLICIES:
            raise ValueError(f"rmsnorm_ext: out_dtype must be one of {_OUT_POLICIES}, "
                             f"got {out_dtype!r}")
        super().__init__(normalized_shape, float(eps), True, device=device, dtype=dtype,
                         weight_offset=weight_offset)
        self.out_dtype = out_dtype

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_dtype == "input":
            out = x.dtype
        elif self.out_dtype == "weight":
            out = self.weight.dtype
        else:
            out = torch.promote_types(x.dtype, self.weight.dtype)
        return hf_rms_norm(x, self.weight, self.eps, self.weight_offset, out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_dtype={self.out_dtype!r}"
