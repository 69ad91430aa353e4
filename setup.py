"""Build rmsnorm_ext's C++ (and, when possible, CUDA) kernels with torch.utils.cpp_extension.

Install after torch, without build isolation, so the extension compiles against the
torch you will run it with:

    pip install --no-build-isolation -e .

Environment knobs:
  RMSNORM_EXT_CUDA=0|1     0: CPU-only build; 1: require CUDA (fail loudly if impossible);
                           unset: build CUDA when torch has CUDA and a toolkit is found.
  RMSNORM_EXT_CPU_ISA=native|avx512bf16|avx512|avx2|default
                           the x86 vector ISA of the CPU kernels (default: native, the best
                           the building machine supports). Pick avx2 or default for a
                           build that must run on other machines.
  TORCH_CUDA_ARCH_LIST     CUDA archs (default when no GPU is visible: 8.0;9.0+PTX).
  RMSNORM_EXT_SANITIZE=1   CPU-only build with AddressSanitizer + UBSan (for CI).
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit root. `nvcc` on PATH may be a wrapper script (`exec /x/bin/nvcc "$@"`),
    so follow it instead of taking dirname(dirname(which nvcc))."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it execs
                for m in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                    real = m.group(1).decode()
                    if os.path.exists(real) and real != nvcc:
                        nvcc = os.path.realpath(real)
                        break
        except OSError:
            pass
        home = os.path.dirname(os.path.dirname(nvcc))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # cpp_extension reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = _cuda_home

_NO_TORCH = """
rmsnorm_ext: cannot import torch in the environment that runs this build.

The extension compiles against the torch you will run it with, so pip must not build it in
an isolated environment (where torch is absent). Install torch first, then build without
isolation:

    pip install torch            # CPU-only machine: add --index-url https://download.pytorch.org/whl/cpu
    pip install ninja setuptools wheel
    pip install --no-build-isolation -e .     # or: pip install --no-build-isolation .
"""

try:
    import torch  # noqa: E402
    from torch.utils.cpp_extension import (BuildExtension, CppExtension,  # noqa: E402
                                           CUDAExtension)
except ImportError as e:
    # pip shows the build backend's output, where the SystemExit message lands; a bare
    # ModuleNotFoundError traceback would not say what to do.
    raise SystemExit(f"{_NO_TORCH}\n(the import error was: {e})") from None


def _want_cuda():
    flag = os.environ.get("RMSNORM_EXT_CUDA", "").strip()
    sanitize = os.environ.get("RMSNORM_EXT_SANITIZE", "") == "1"
    possible = torch.version.cuda is not None and _cuda_home is not None
    if flag == "1":
        if sanitize:
            sys.exit("rmsnorm_ext: RMSNORM_EXT_SANITIZE=1 builds CPU only; unset RMSNORM_EXT_CUDA")
        if not possible:
            why = ("torch has no CUDA (torch.version.cuda is None)" if torch.version.cuda is None
                   else "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
            sys.exit(f"rmsnorm_ext: RMSNORM_EXT_CUDA=1 but {why}")
        return True
    if flag == "0" or sanitize:
        return False
    return possible


def _cpu_flags():
    """-m flags and the at::vec capability macro for the chosen x86 ISA.

    at::vec::Vectorized picks its implementation from CPU_CAPABILITY_* macros, not from
    the compiler's -m flags: without them an extension gets the generic 8-lane fallback.
    """
    isa = os.environ.get("RMSNORM_EXT_CPU_ISA", "native").strip().lower()
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default", []
    if isa == "native":
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
        except (OSError, AttributeError):
            flags = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c", "avx512_bf16"} <= flags:
            isa = "avx512bf16"
        elif {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            isa = "avx2"
        else:
            isa = "default"
    avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2",
              "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if isa == "avx512":
        return isa, avx512
    if isa == "avx512bf16":
        # AVX-512 plus the BF16 conversion instruction for bfloat16 stores (csrc/cpu/vec_io.h).
        return isa, avx512 + ["-mavx512bf16"]
    if isa == "avx2":
        return isa, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa == "default":
        return isa, ["-DCPU_CAPABILITY=DEFAULT"]
    sys.exit(f"rmsnorm_ext: unknown RMSNORM_EXT_CPU_ISA={isa!r} (native, avx512bf16, avx512, avx2, default)")


def _default_arch_list():
    # With no GPU visible, torch's own arch detection fails (IndexError); choose for it.
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def _arch_list_as_built():
    """The CUDA archs nvcc will be given, as "8.0,9.0+PTX", read from the very -gencode flags
    torch's build helper derives from TORCH_CUDA_ARCH_LIST (or from the visible GPU), so
    build_info() reports what was compiled, PTX included."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    real, ptx = [], []
    for flag in _get_cuda_arch_flags():
        m = re.search(r"arch=compute_(\d+)([af]?),code=(sm|compute)_(\d+)", flag)
        if not m:
            continue
        arch = f"{m.group(4)[:-1]}.{m.group(4)[-1]}{m.group(2)}"
        (real if m.group(3) == "sm" else ptx).append(arch)
    archs = sorted(dict.fromkeys(real + ptx), key=lambda a: float(a.rstrip("af")))
    return ",".join(a + ("+PTX" if a in ptx else "") for a in archs)


def _write_build_config(isa, use_cuda, sanitize):
    # Read by rmsnorm_ext at import, before loading _C, to refuse a build whose vector ISA
    # the running CPU lacks (loading it would die of SIGILL, not raise).
    with open(os.path.join(ROOT, "rmsnorm_ext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CPU_ISA = {isa!r}\nCUDA = {use_cuda!r}\nSANITIZE = {sanitize!r}\n")


def _shared_cxx_runtime():
    """`libraries` entries that link the C++ runtime as the shared libstdc++.so.6, first on the
    link line (torch appends c10, torch, ... after them).

    Why: on a GPU machine of 2026-11 (Ubuntu gcc 13.3, torch 2.11 wheel) the compiler found no
    shared libstdc++ to link and linked a static copy into _C; two copies of libstdc++'s
    locale state in one process then crashed (SIGSEGV in std::ostream::_M_insert<long>) on
    every error message that formats a number, i.e. on bad input. `-l:libstdc++.so.6` names
    the run-time library itself, which every machine running torch has; first on the line,
    it also binds the std:: symbols torch's libraries export their own copies of (libc10
    carries newer-GCC instantiations) to libstdc++. rmsnorm_ext.build_info()["libstdcxx"]
    and the import-time check say which one a build got."""
    # The compiler setuptools links with: $CXX, else the one Python was built with.
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    try:
        path = subprocess.run(cxx + ["-print-file-name=libstdc++.so.6"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [":libstdc++.so.6"] if os.path.isabs(path) and os.path.exists(path) else []


STDCXX_FIRST = _shared_cxx_runtime()


def _emulation_extension(cxx, ldflags):
    """RMSNORM_EXT_CUDA_EMULATION=1: a test build whose CPU tensors run the CUDA kernels on a CPU
    emulator (csrc/cuda/emulation; .ci/cuda_emulation.sh builds it in a scratch copy). The .cu
    files are rewritten to C++ into build/cuda_emulation/ and compiled by the host compiler;
    the CPU kernels are not built."""
    if not _cuda_home:
        sys.exit("rmsnorm_ext: RMSNORM_EXT_CUDA_EMULATION=1 needs the CUDA headers (CUDA_HOME)")
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "build", "cuda_emulation")
    subprocess.run([sys.executable, "csrc/cuda/emulation/rewrite.py", "csrc/cuda", out], check=True)
    sources = [f for d in ("library", "host", "autograd", "python")
               for f in sorted(glob.glob(f"csrc/{d}/*.cpp"))]
    sources += [f for f in sorted(glob.glob(os.path.join(out, "*.cpp")))
                if os.path.basename(f) != "build_info.cpp"]
    sources += ["csrc/cuda/emulation/cuda_emulation.cpp", "csrc/cuda/emulation/launch_emulated.cpp"]
    flags = ["-DRMSNORM_EXT_CUDA_EMULATION", "-I" + os.path.join(here, "csrc", "cuda"), f"-I{_cuda_home}/include",
             "-Wno-unused-variable", "-Wno-unused-but-set-variable"]
    return CppExtension("rmsnorm_ext._C", sources, libraries=list(STDCXX_FIRST),
                        extra_compile_args={"cxx": [f for f in cxx if f != "-O3"] + ["-O1"] + flags},
                        extra_link_args=ldflags)


def _extension():
    if os.environ.get("RMSNORM_EXT_CUDA_EMULATION", "") == "1":
        isa, isa_flags = _cpu_flags()
        return _emulation_extension(
            ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", f'-DRMSNORM_EXT_CPU_ISA="{isa}"'],
            ["-fopenmp"])
    use_cuda = _want_cuda()
    isa, isa_flags = _cpu_flags()
    sanitize = os.environ.get("RMSNORM_EXT_SANITIZE", "") == "1"
    if not sanitize:  # a sanitizer build goes elsewhere (see .ci/sanitize.sh); keep this one's
        _write_build_config(isa, use_cuda, sanitize)
    # Every C++ layer but CUDA's: library/ (the op library, the _C module), host/ (checks and
    # host functions), cpu/ (kernels), autograd/, python/ (the eager fast path).
    sources = [f for d in ("library", "host", "cpu", "autograd", "python")
               for f in sorted(glob.glob(f"csrc/{d}/*.cpp"))]
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", f'-DRMSNORM_EXT_CPU_ISA="{isa}"']
    cxx += isa_flags
    ldflags = ["-fopenmp"]
    if sanitize:
        cxx += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    if use_cuda:
        _default_arch_list()
        cxx.append(f'-DRMSNORM_EXT_CUDA_ARCHS="{_arch_list_as_built()}"')
        cu = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        if not cu:
            sys.exit("rmsnorm_ext: CUDA build requested but csrc/cuda/*.cu is empty")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                "-DRMSNORM_EXT_WITH_CUDA"]
        return CUDAExtension(
            "rmsnorm_ext._C", sources + cu, libraries=list(STDCXX_FIRST),
            extra_compile_args={"cxx": cxx + ["-DRMSNORM_EXT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=ldflags)
    return CppExtension("rmsnorm_ext._C", sources, libraries=list(STDCXX_FIRST),
                        extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
