#!/usr/bin/env bash
# Test the CUDA kernels without a GPU: build the emulation variant of the extension (CPU
# tensors run csrc/cuda's kernels on the CPU emulator of csrc/cuda/emulation: one fiber per
# CUDA thread, real barriers, shuffles and shared memory) in a scratch copy of the working
# tree, and run the kernel tests on it -- the same float64 references and accuracy rule the
# CPU kernels meet. The emulator also aborts on threads of a block waiting at different
# __syncthreads, a full-mask shuffle with a lane missing, and deadlocks.
#
# It does not replace a GPU run (no timing, no memory-model races, exact instead of fast-math
# intrinsics), but every index, tail, launch shape, reduction tree and workspace of the CUDA
# code runs here.
#
# Usage: .ci/cuda_emulation.sh [pytest args]     (default: the kernel test files below, and
#        tests/test_cuda_paths.py: its cpu case runs tests/cuda_paths.py's shapes, chosen to hit
#        every CUDA launch path, on the emulated kernels)
# Env:   RMSNORM_EXT_EMU_DIR    scratch directory (default: fresh mktemp -d, removed on success)
#        RMSNORM_EXT_EMU_ORDER  "reverse": run blocks and threads in reverse order
#        RMSNORM_EXT_EMU_SMS    the SM count the launches see (default 4)
# Budget: ~2 min build + a few minutes of tests on 2 cores.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
source "$ROOT/.ci/scratch.sh"
scratch_dir "${RMSNORM_EXT_EMU_DIR:-}" rmsnorm_ext_cuda_emu

say() { printf '[cuda-emulation] %s\n' "$*"; }
fail() { printf '[cuda-emulation] FAIL: %s\n' "$*" >&2; say "scratch dir kept: $WORK"; exit 1; }

say "copying $ROOT -> $WORK"
copy_tree "$ROOT" "$WORK"

say "emulator selftest (csrc/cuda/emulation/selftest.cu)"
# The toolkit root as setup.py finds it (its _find_cuda_home, run on its own).
CUDA_INC=$(cd "$ROOT" && "$PY" - <<'EOF'
import ast
tree = ast.parse(open("setup.py").read())
fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_find_cuda_home")
ns = {}
exec("import glob, os, re, shutil\n" + ast.unparse(fn), ns)
print(ns["_find_cuda_home"]() or "")
EOF
)
[[ -n "$CUDA_INC" && -e "$CUDA_INC/include/cuda_runtime.h" ]] || fail "no CUDA headers (CUDA_HOME)"
"$PY" "$ROOT/csrc/cuda/emulation/rewrite.py" "$ROOT/csrc/cuda/emulation/selftest.cu" "$WORK/selftest.cpp"
${CXX:-g++} -std=c++20 -O1 -Wall -Wno-unknown-pragmas -I"$CUDA_INC/include" -I"$ROOT/csrc/cuda/emulation" \
  "$WORK/selftest.cpp" "$ROOT/csrc/cuda/emulation/cuda_emulation.cpp" -o "$WORK/emu_selftest" ||
  fail "the emulator selftest does not compile"
"$WORK/emu_selftest" || fail "emulator selftest"

say "building with RMSNORM_EXT_CUDA_EMULATION=1"
t0=$SECONDS
(
  cd "$WORK"
  unset RMSNORM_EXT_CUDA RMSNORM_EXT_SANITIZE
  export RMSNORM_EXT_CUDA_EMULATION=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1
) || { tail -n 60 "$WORK/build.log" >&2; fail "emulation build failed (log: $WORK/build.log)"; }
say "built in $((SECONDS - t0)) s"

cd "$WORK"
export PYTHONPATH=$WORK${PYTHONPATH:+:$PYTHONPATH} RMSNORM_EXT_EMU_ROOT=$WORK
export RMSNORM_EXT_FUZZ=${RMSNORM_EXT_FUZZ:-sanitize}
"$PY" - <<'EOF' || fail "the imported rmsnorm_ext is not the emulation build of the copy"
import os, sys
import rmsnorm_ext
f = os.path.realpath(rmsnorm_ext._C.__file__)
info = rmsnorm_ext.build_info()
print("[cuda-emulation] rmsnorm_ext._C:", f)
sys.exit(0 if f.startswith(os.environ["RMSNORM_EXT_EMU_ROOT"] + os.sep) and info["cuda_emulation"] else 1)
EOF

if [[ $# -eq 0 ]]; then
  set -- -m "not slow and not cuda" -k "not compile and not Compile" \
    tests/test_ops.py tests/test_numerics.py tests/test_fuzz.py tests/test_gated_kernels.py \
    tests/test_modulate_kernels.py tests/test_qk_norm_rope_kernels.py \
    tests/test_norm_2d_kernels.py tests/test_quant.py tests/test_short_rows.py \
    tests/test_param_grads.py tests/test_bad_inputs.py tests/test_double_backward.py \
    tests/test_cuda_paths.py
fi
t0=$SECONDS
set +e
"$PY" -m pytest -q -p no:cacheprovider -rfE "$@"
rc=$?
set -e
say "tests took $((SECONDS - t0)) s (pytest exit $rc)"
[[ $rc -eq 0 ]] || fail "pytest exited with $rc"
say "clean"
[[ $KEEP -eq 1 ]] || rm -rf "$WORK"
