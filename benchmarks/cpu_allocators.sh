#!/usr/bin/env bash
# What bounds a CPU norm at large sizes, per allocator setting: cpu_floor.py (one run each,
# same shape) by default, with our huge-page advice off (RMSNORM_EXT_HUGEPAGES=0), with
# torch's THP_MEM_ALLOC_ENABLE=1, and with jemalloc / tcmalloc preloaded (Debian's
# libjemalloc2 / libtcmalloc-minimal4). Needs an idle machine (cpu_floor.py refuses a busy one).
# Usage: bash benchmarks/cpu_allocators.sh OUT_DIR [cpu_floor.py args]
set -euo pipefail
out=${1:?output folder}; shift
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
lib=/usr/lib/x86_64-linux-gnu
run() {  # name, then env assignments
  local name=$1; shift
  echo "== $name"
  env "$@" python "$here/cpu_floor.py" --out "$out/$name.json" "${ARGS[@]}" | grep -E "floors|fwd "
}
ARGS=("$@")
run default
run no_hugepage_advice RMSNORM_EXT_HUGEPAGES=0
run thp_mem_alloc THP_MEM_ALLOC_ENABLE=1
[[ -e $lib/libjemalloc.so.2 ]] && run jemalloc LD_PRELOAD=$lib/libjemalloc.so.2
[[ -e $lib/libtcmalloc_minimal.so.4 ]] && run tcmalloc LD_PRELOAD=$lib/libtcmalloc_minimal.so.4
