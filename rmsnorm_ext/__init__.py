"""rmsnorm_ext: fused RMSNorm and LayerNorm kernels (C++ CPU, CUDA) as custom torch ops.

    import rmsnorm_ext
    y = rmsnorm_ext.rms_norm(x, (4096,), weight)          # like F.rms_norm
    norm = rmsnorm_ext.RMSNorm(4096)                        # like torch.nn.RMSNorm
    out, res = rmsnorm_ext.fused_add_rms_norm(x, res, (4096,), weight)
    q, scales = rmsnorm_ext.rms_norm_quant(x, (4096,), weight)   # fp8 + per-token scales
"""
from ._loader import load as _load

_C = _load()  # defines the op schemas; must precede every torch.library call below

from . import _elf  # noqa: E402,F401
from . import _autograd  # noqa: E402  (Autograd, vmap and autocast kernels from the op table)

_autograd.install()
from . import functional as _functional  # noqa: E402
from .functional import *  # noqa: E402,F401,F403  (every public op: functional.__all__)
from . import modules as _modules  # noqa: E402
from .modules import *  # noqa: E402,F401,F403  (the modules: modules.__all__)
from .replace import replace_norms  # noqa: E402
from . import distributed  # noqa: E402  (DTensor rules: registered lazily, see distributed.py)

distributed._install()

__version__ = "0.1.0"


# OpenMP's _OPENMP macro is the release date of the spec the compiler implements.
_OPENMP_VERSIONS = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0",
                    201511: "4.5", 201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0"}


def build_info() -> dict:
    """How this extension was built, and what this process can use now.

    Built: ``torch_version`` compiled against, ``compiler``, ``openmp`` (the spec version,
    e.g. "4.5"), ``cpu_isa`` of the C++ kernels, ``cuda`` (whether CUDA kernels were
    compiled), ``cuda_runtime`` (e.g. "13.0"), ``cuda_archs`` (the arch list given to nvcc,
    e.g. ["8.0", "9.0+PTX"]), ``libstdcxx`` ("shared": linked against libstdc++.so.6 as it
    must be; "static copy": see the import-time warning). Now: ``gpu_visible`` (torch.cuda.is_available()), ``gpu`` (its
    name), ``num_threads`` (torch's CPU threads). ``kernels``: each kernel's name (the tags
    of csrc/kernel_params.h) and the devices this binary has it for, e.g.
    {"RmsFwd": ["cpu", "cuda"], ...}. ``cuda_emulation``: True only in the test build whose CPU
    tensors run the CUDA kernels on an emulator (.ci/cuda_emulation.sh)."""
    import torch

    raw = dict(_C.build_info())
    cuda_info = dict(kv.split("=", 1) for kv in raw.pop("cuda_info").split(";") if "=" in kv)
    omp = raw.pop("openmp")
    runtime = cuda_info.get("cuda_runtime")
    archs = [a for a in raw.pop("cuda_arch_list", "").split(",") if a]
    if not archs and raw["cuda"]:
        # A build from before the arch list was recorded: the real archs nvcc reported
        # (e.g. "800,900"), without knowing about PTX.
        archs = [f"{int(a) // 10 // 10}.{int(a) // 10 % 10}"
                 for a in cuda_info.get("archs", "").split(",") if a.isdigit()]
    gpu_visible = torch.cuda.is_available()
    return {
        "torch_version": raw["torch_version"],
        "compiler": raw["compiler"],
        "openmp": None if omp is None else _OPENMP_VERSIONS.get(omp, f"date code {omp}"),
        "cpu_isa": raw["cpu_isa"],
        "cuda": raw["cuda"],
        "cuda_runtime": (f"{int(runtime) // 1000}.{int(runtime) % 1000 // 10}"
                         if runtime and runtime.isdigit() else runtime),
        "cuda_archs": archs,
        "libstdcxx": _elf.cxx_runtime(_C.__file__),
        "gpu_visible": gpu_visible,
        "gpu": torch.cuda.get_device_name() if gpu_visible else None,
        "num_threads": torch.get_num_threads(),
        "kernels": _kernel_devices(raw.get("kernels", [])),
        "cuda_emulation": bool(raw.get("cuda_emulation", False)),
    }


def _kernel_devices(entries) -> dict:
    out: dict = {}
    for entry in entries:
        name, _, device = entry.partition(":")
        out.setdefault(name, []).append(device)
    return {name: sorted(devices) for name, devices in sorted(out.items())}


__all__ = [*_functional.__all__, *_modules.__all__, "replace_norms", "build_info"]
