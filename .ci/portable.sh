#!/usr/bin/env bash
# The CPU kernels at the portable ISA level, beside the machine's own: CI's main build targets
# this machine (native), so on an AVX-512 machine the portable paths (at::vec's scalar
# fallbacks, the fp8/int8 conversions without AVX-512) would never be compiled, and on an
# AVX2 machine the AVX-512 ones never run. The `default` level is built and tested by the
# sanitizer job (.ci/sanitize.sh builds at RMSNORM_EXT_CPU_ISA=default); this script adds the
# avx2 level where the native one is an AVX-512 one, building a copy of the working tree and
# running the numerics, quant and kernel tests against it. Elsewhere (AVX2) it compiles the
# CPU kernels at the avx512bf16 level without running them.
# Usage: .ci/portable.sh [levels...]   (default: avx2 on AVX-512 machines, none otherwise)
# Budget: ~2-3 min per build + ~1 min of tests on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
source "$ROOT/.ci/scratch.sh"
native=$("$PY" -c "import rmsnorm_ext; print(rmsnorm_ext.build_info()['cpu_isa'])")
levels=("$@")
if [[ ${#levels[@]} -eq 0 ]]; then
  [[ $native == avx512* ]] && levels+=(avx2)
fi
if [[ ${#levels[@]} -eq 0 ]]; then
  # No AVX-512 here: its kernels (masked tails, rcp14, the BF16 stores) can't run, but they
  # must compile. Every CPU kernel file at the avx512bf16 level (the superset), syntax and
  # template instantiation only (~1 min).
  echo "[portable] native level $native: compiling the CPU kernels at avx512bf16 (not run)"
  mapfile -t incs < <("$PY" -c "
from torch.utils.cpp_extension import include_paths
import sysconfig
for p in include_paths() + [sysconfig.get_paths()['include']]: print('-I' + p)")
  for f in "$ROOT"/csrc/cpu/*.cpp; do
    g++ -std=c++20 -fsyntax-only -fopenmp -w "${incs[@]}" -mavx512f -mavx512bw -mavx512vl \
      -mavx512dq -mfma -mf16c -mavx2 -mavx512bf16 -DCPU_CAPABILITY_AVX512 \
      -DCPU_CAPABILITY=AVX512 '-DRMSNORM_EXT_CPU_ISA="avx512bf16"' \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "$f" ||
      { echo "[portable] $f does not compile at avx512bf16"; exit 1; }
  done
  echo "[portable] the default level is the sanitizer job's; nothing else to add"
  exit 0
fi
for isa in "${levels[@]}"; do
  scratch_dir "" "rmsnorm_ext_$isa"
  copy_tree "$ROOT" "$WORK"
  rm -rf "$WORK/build"
  echo "[portable] building RMSNORM_EXT_CPU_ISA=$isa (native here: $native)"
  (cd "$WORK" && RMSNORM_EXT_CUDA=0 RMSNORM_EXT_CPU_ISA=$isa "$PY" setup.py -q build_ext --inplace \
     >"$WORK/build.log" 2>&1) || { tail -n 40 "$WORK/build.log"; exit 1; }
  got=$(cd "$WORK" && "$PY" -c "import rmsnorm_ext; print(rmsnorm_ext.build_info()['cpu_isa'])")
  [[ $got == "$isa" ]] || { echo "[portable] built $got, wanted $isa"; exit 1; }
  (cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider tests/test_numerics.py tests/test_quant.py \
     tests/test_gated_kernels.py tests/test_norm_2d_kernels.py tests/test_short_rows.py)
  rm -rf "$WORK"
done
