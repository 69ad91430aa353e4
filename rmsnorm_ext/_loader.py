"""Loads the compiled extension `_C`, turning the usual failures into instructions.

Must run before any torch.library call of this package: the op schemas are defined in
C++ (csrc/host/*.cpp, csrc/library/module.cpp) and exist only once `_C` is loaded.
"""
import os
import re

import torch

_REBUILD = ("rebuild it against the torch you run with: "
            "pip install --no-build-isolation -e . (from the rmsnorm_ext checkout)")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
        return set(m.group(1).split()) if m else None
    except OSError:
        return None


def _check_cpu_isa():
    """Refuse to load a build whose vector ISA this CPU lacks (it would die of SIGILL)."""
    try:
        from ._build_config import CPU_ISA
    except ImportError:
        return
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    levels = {"avx512bf16": avx512 | {"avx512_bf16"}, "avx512": avx512,
              "avx2": {"avx2", "fma", "f16c"}}
    need = levels.get(CPU_ISA)
    flags = _cpu_flags()
    if need and flags is not None and not need <= flags:
        here = next((k for k, v in levels.items() if v <= flags), "default")
        raise ImportError(
            f"rmsnorm_ext was built for {CPU_ISA.upper()} but this CPU lacks "
            f"{sorted(need - flags)}; rebuild here (this CPU takes RMSNORM_EXT_CPU_ISA={here}), "
            f"or build a portable one with RMSNORM_EXT_CPU_ISA=avx2 or default "
            f"(pip install --no-build-isolation -e .)")


def _check_cxx_runtime(path):
    """Warn about a build that carries its own static libstdc++ (setup.py links the shared one;
    a toolchain without a linkable libstdc++.so did this once): two copies of the C++
    runtime's locale state in one process crashed on error messages that format numbers,
    so a bad input would kill the process instead of raising."""
    from ._elf import cxx_runtime
    if cxx_runtime(path) == "static copy":
        import warnings
        warnings.warn(
            f"rmsnorm_ext._C ({path}) was linked with a static copy of libstdc++ instead of "
            "libstdc++.so.6; on such builds a bad input has crashed the process instead of "
            f"raising. Rebuild with a toolchain that links libstdc++.so.6: {_REBUILD}",
            RuntimeWarning, stacklevel=3)


def load():
    _check_cpu_isa()
    try:
        from . import _C
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg or "cannot open shared object" in msg or "GLIBCXX" in msg:
            raise ImportError(
                f"rmsnorm_ext._C does not load against torch {torch.__version__} "
                f"(it was probably built against a different torch): {msg}\n"
                f"Fix: {_REBUILD}") from e
        if "_C" in msg:
            raise ImportError(
                f"rmsnorm_ext._C is missing: the C++ extension was not built ({msg}).\n"
                f"Fix: {_REBUILD}") from e
        raise
    _check_cxx_runtime(_C.__file__)
    built = _C.build_info()["torch_version"]
    running = torch.__version__.split("+")[0]
    if built.split("+")[0] != running and not os.environ.get("RMSNORM_EXT_SKIP_VERSION_CHECK"):
        raise ImportError(
            f"rmsnorm_ext._C was built against torch {built} but torch {running} is running; "
            f"{_REBUILD}")
    return _C
