"""Rewrites csrc/cuda's sources into plain C++ for the CPU emulation build (cuda_emulation.h).

Two constructs have no C++ spelling that a macro could produce:
  `kernel<T><<<grid, block, smem, stream>>>(args)`  ->  `kernel<T> % ::cuda_emu::Cfg{grid, block, smem, stream}(args)`
      (the call binds to Cfg first, then operator% runs the launch: no need to find where
      the kernel expression starts);
  `extern __shared__ <type> name[];`  ->  `<type>* name = ::cuda_emu::dynamic_smem<type>();`
Everything else compiles as it is, with the header's macros.

Usage: python rewrite.py SRC_DIR OUT_DIR   (every .cu -> .cpp, .cuh/.h copied rewritten)
       python rewrite.py FILE.cu OUT.cpp
The build compiles OUT_DIR's files with -I SRC_DIR, so their `../x.h` includes still resolve.
"""
import pathlib
import re
import sys

LAUNCH_OPEN = re.compile(r"<<<")
LAUNCH_CLOSE = re.compile(r">>>")
EXTERN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(text: str) -> str:
    n_open = len(LAUNCH_OPEN.findall(text))
    if n_open != len(LAUNCH_CLOSE.findall(text)):
        raise SystemExit("rewrite.py: unbalanced <<< >>> in a CUDA source")
    text = LAUNCH_OPEN.sub(" % ::cuda_emu::Cfg{", text)
    text = LAUNCH_CLOSE.sub("}", text)
    return EXTERN_SMEM.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::cuda_emu::dynamic_smem<{m.group(1)}>();",
                           text)


def main(src: str, out: str) -> None:
    if src.endswith(".cu"):  # one file (the emulator's selftest.cu) -> OUT (a .cpp path)
        pathlib.Path(out).write_text('#include "cuda_emulation.h"\n' + rewrite(pathlib.Path(src).read_text()))
        return
    src_dir, out_dir = pathlib.Path(src), pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir()):
        if f.suffix not in (".cu", ".cuh", ".h"):
            continue
        target = out_dir / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
        new = rewrite(f.read_text())
        if f.suffix == ".cu":  # the emulator's definitions come before anything else
            new = '#include "emulation/cuda_emulation.h"\n' + new
        if not target.exists() or target.read_text() != new:  # keep mtimes for ninja
            target.write_text(new)


if __name__ == "__main__":
    main(*sys.argv[1:3])
