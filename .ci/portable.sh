#!/usr/bin/env bash
# The CPU kernels at the portable ISA level, beside the machine's own: CI's main build targets
# this machine (native), so on an AVX-512 machine the portable paths (at::vec's scalar
# fallbacks, the fp8/int8 conversions without AVX-512) would never be compiled, and on an
# AVX2 machine the AVX-512 ones never run. The `default` level is built and tested by the
# sanitizer job (.ci/sanitize.sh builds at RMSNORM_EXT_CPU_ISA=default); this script adds the
# avx2 level where the native one is an AVX-512 one, building a copy of the working tree and
# running the numerics, quant and kernel tests against it. Elsewhere it has nothing to add.
# Usage: .ci/portable.sh [levels...]   (default: avx2 on AVX-512 machines, none otherwise)
# Budget: ~2-3 min per build + ~1 min of tests on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
native=$("$PY" -c "import rmsnorm_ext; print(rmsnorm_ext.build_info()['cpu_isa'])")
levels=("$@")
if [[ ${#levels[@]} -eq 0 ]]; then
  [[ $native == avx512* ]] && levels+=(avx2)
fi
if [[ ${#levels[@]} -eq 0 ]]; then
  echo "[portable] native level $native: the default level is the sanitizer job's; nothing to add"
  exit 0
fi
for isa in "${levels[@]}"; do
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/rmsnorm_ext_$isa.XXXXXX")
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$WORK"
  rm -rf "$WORK/build" "$WORK"/rmsnorm_ext/_C*.so "$WORK/rmsnorm_ext/_build_config.py"
  echo "[portable] building RMSNORM_EXT_CPU_ISA=$isa (native here: $native)"
  (cd "$WORK" && RMSNORM_EXT_CUDA=0 RMSNORM_EXT_CPU_ISA=$isa "$PY" setup.py -q build_ext --inplace \
     >"$WORK/build.log" 2>&1) || { tail -n 40 "$WORK/build.log"; exit 1; }
  got=$(cd "$WORK" && "$PY" -c "import rmsnorm_ext; print(rmsnorm_ext.build_info()['cpu_isa'])")
  [[ $got == "$isa" ]] || { echo "[portable] built $got, wanted $isa"; exit 1; }
  (cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider tests/test_numerics.py tests/test_quant.py \
     tests/test_gated_kernels.py tests/test_norm_2d_kernels.py tests/test_short_rows.py)
  rm -rf "$WORK"
done
