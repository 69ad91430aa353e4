"""rmsnorm_ext: fused RMSNorm and LayerNorm kernels (C++ CPU, CUDA) as custom torch ops.

    import rmsnorm_ext
    y = rmsnorm_ext.rms_norm(x, (4096,), weight)          # like F.rms_norm
    norm = rmsnorm_ext.RMSNorm(4096)                        # like torch.nn.RMSNorm
    out, res = rmsnorm_ext.fused_add_rms_norm(x, res, (4096,), weight)
    q, scales = rmsnorm_ext.rms_norm_quant(x, (4096,), weight)   # fp8 + per-token scales
"""
from ._loader import load as _load

_C = _load()  # defines the op schemas; must precede every torch.library call below

from . import _fake  # noqa: E402,F401  (registers fake kernels)
from .functional import (fused_add_rms_norm, fused_add_rms_norm_,  # noqa: E402
                         fused_add_rms_norm_quant, layer_norm, layer_norm_quant, rms_norm,
                         rms_norm_quant)
from .modules import LayerNorm, RMSNorm  # noqa: E402
from .replace import replace_norms  # noqa: E402
from . import distributed  # noqa: E402  (DTensor rules: registered lazily, see distributed.py)

distributed._install()

__version__ = "0.1.0"


def build_info() -> dict:
    """How this extension was built: torch version it was compiled against, whether CUDA
    kernels were compiled (and for which archs), the compiler, OpenMP, and the CPU vector
    ISA of the C++ kernels; plus the threads torch uses now."""
    import torch

    info = dict(_C.build_info())
    cuda_info = dict(kv.split("=", 1) for kv in info.pop("cuda_info").split(";") if "=" in kv)
    info["cuda_archs"] = [a for a in cuda_info.get("archs", "").split(",") if a]
    info["cuda_runtime"] = cuda_info.get("cuda_runtime")
    info["num_threads"] = torch.get_num_threads()
    return info


__all__ = ["rms_norm", "layer_norm", "fused_add_rms_norm", "fused_add_rms_norm_", "RMSNorm",
           "LayerNorm", "replace_norms", "build_info", "rms_norm_quant",
           "fused_add_rms_norm_quant", "layer_norm_quant"]
