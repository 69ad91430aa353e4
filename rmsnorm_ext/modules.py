"""nn.Modules: drop-ins for torch.nn.RMSNorm and torch.nn.LayerNorm.

They subclass the torch modules, so constructor parameters, parameter names,
state_dicts, repr and isinstance checks are the same; only forward changes.
"""
import torch

from .functional import layer_norm, rms_norm


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
