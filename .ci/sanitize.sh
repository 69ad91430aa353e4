#!/usr/bin/env bash
# Build the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run a
# subset of the tests under them. Exits non-zero on any sanitizer report.
#
# The checkout's own build (build/, rmsnorm_ext/_C*.so, _build_config.py) is left alone:
# the working tree (tracked + untracked-but-not-ignored files) is copied to a scratch
# directory, built there with RMSNORM_EXT_SANITIZE=1 (CPU only, -fsanitize=address,undefined,
# UB aborts), and the tests run against that copy, with libasan preloaded into python.
#
# The sanitized build is also CI's portable-ISA build: it compiles the CPU kernels at
# RMSNORM_EXT_CPU_ISA=default (at::vec's generic code, the fp8/int8 conversions without
# AVX-512), which the native build never compiles on an AVX-512 machine and never runs on any
# x86 one, and runs the numerics, quant and kernel tests on it. The generic Vectorized<float>
# has AVX2's 8 lanes, so row tails and chunk boundaries are the ones an AVX2 build takes:
# one build checks both the portable code and the memory safety of the shared loops
# (.ci/portable.sh adds the avx2 level on AVX-512 machines).
#
# Usage: .ci/sanitize.sh [extra pytest args]
# Env:   RMSNORM_EXT_SANITIZE_DIR  scratch directory (default: a fresh mktemp -d, removed
#                                  on success; kept on failure for the logs)
#        RMSNORM_EXT_SANITIZE_ISA  the CPU ISA level of the sanitized build (default: default)
#        MAX_JOBS                  parallel compile jobs (default: nproc)
# Budget: ~1 min build + ~3 min tests on 2 cores.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
source "$ROOT/.ci/scratch.sh"
scratch_dir "${RMSNORM_EXT_SANITIZE_DIR:-}" rmsnorm_ext_sanitize
LOGDIR=$WORK/sanitizer-logs

say() { printf '[sanitize] %s\n' "$*"; }
fail() { printf '[sanitize] FAIL: %s\n' "$*" >&2; say "scratch dir kept: $WORK"; exit 1; }

# --- 1. copy the working tree -------------------------------------------------------------
say "copying $ROOT -> $WORK"
copy_tree "$ROOT" "$WORK"  # never a stale, unsanitized binary or build config
rm -rf "$WORK/build"

# --- 2. build -----------------------------------------------------------------------------
say "building with RMSNORM_EXT_SANITIZE=1"
t0=$SECONDS
(
  cd "$WORK"
  unset RMSNORM_EXT_CUDA
  export RMSNORM_EXT_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export RMSNORM_EXT_CPU_ISA=${RMSNORM_EXT_SANITIZE_ISA:-default}
  "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1
) || { tail -n 60 "$WORK/build.log" >&2; fail "sanitized build failed (log: $WORK/build.log)"; }
say "built in $((SECONDS - t0)) s"

SO=$(ls "$WORK"/rmsnorm_ext/_C*.so 2>/dev/null | head -n 1)
[[ -n "$SO" ]] || fail "no rmsnorm_ext/_C*.so produced"
ldd "$SO" | grep -q libasan || fail "$SO is not linked against libasan"
ldd "$SO" | grep -q libubsan || fail "$SO is not linked against libubsan"
[[ ! -e "$WORK/rmsnorm_ext/_build_config.py" ]] ||
  fail "the sanitized build wrote rmsnorm_ext/_build_config.py"

# --- 3. run the tests under the sanitizers --------------------------------------------------
LIBASAN=$(gcc -print-file-name=libasan.so)
[[ -e "$LIBASAN" ]] || fail "libasan not found (gcc -print-file-name=libasan.so -> $LIBASAN)"
# libstdc++ preloaded too: python does not link it, so ASan's __cxa_throw interceptor would
# otherwise find no real __cxa_throw at startup and abort ("CHECK failed:
# asan_interceptors.cpp ... real___cxa_throw") on the first C++ exception thrown by a library
# loaded later (triton, imported by torch._dynamo / opcheck).
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so.6)
[[ -e "$LIBSTDCXX" ]] || fail "libstdc++.so.6 not found"
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*

# Only the python processes get the sanitizer environment.
SANENV=(
  "LD_PRELOAD=$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
  # detect_leaks=0: CPython and torch "leak" by design at exit.
  "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:log_path=$LOGDIR/asan"
  "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$LOGDIR/ubsan"
  "PYTHONPATH=$WORK${PYTHONPATH:+:$PYTHONPATH}"
  "RMSNORM_EXT_SANITIZE_ROOT=$WORK"
  "RMSNORM_EXT_FUZZ=${RMSNORM_EXT_FUZZ:-sanitize}"   # a smaller fuzz profile
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}"
)

cd "$WORK"
# The copy's package must be the one imported (not the editable install of $ROOT).
env "${SANENV[@]}" "$PY" - <<'EOF' || fail "the sanitized copy is not the imported rmsnorm_ext"
import os, sys
import rmsnorm_ext
root = os.environ["RMSNORM_EXT_SANITIZE_ROOT"]
f = os.path.realpath(rmsnorm_ext._C.__file__)
print("[sanitize] rmsnorm_ext._C:", f, "cpu_isa:", rmsnorm_ext.build_info()["cpu_isa"])
want = os.environ.get("RMSNORM_EXT_SANITIZE_ISA") or "default"
if rmsnorm_ext.build_info()["cpu_isa"] != want:
    sys.exit(f"[sanitize] built cpu_isa {rmsnorm_ext.build_info()['cpu_isa']}, wanted {want}")
sys.exit(0 if f.startswith(root + os.sep) else 1)
EOF

# A pytest plugin that re-checks the same thing inside the test process.
cat >"$WORK/_sanitize_guard.py" <<'EOF'
import os


def pytest_sessionstart(session):
    import rmsnorm_ext
    f = os.path.realpath(rmsnorm_ext._C.__file__)
    root = os.environ["RMSNORM_EXT_SANITIZE_ROOT"]
    if not f.startswith(root + os.sep):
        raise RuntimeError(f"sanitize: imported {f}, not the sanitized copy under {root}")
EOF

TESTS=()
for t in tests/test_ops.py tests/test_bad_inputs.py tests/test_fuzz.py tests/test_numerics.py \
         tests/test_quant.py tests/test_same_errors.py tests/test_double_backward.py \
         tests/test_gated_kernels.py tests/test_norm_2d_kernels.py tests/test_short_rows.py; do
  [[ -f "$t" ]] && TESTS+=("$t")
done
[[ ${#TESTS[@]} -gt 0 ]] || fail "no tests to run"
say "running: ${TESTS[*]}"
t0=$SECONDS
set +e
env "${SANENV[@]}" "$PY" -m pytest -p _sanitize_guard -q -x -p no:cacheprovider \
  -rfE -m "not slow and not cuda" -k "not compile and not Compile" "${TESTS[@]}" "$@"
rc=$?
if [[ $rc -eq 0 && -f tests/test_param_grads.py ]]; then
  # The parameter-gradient tree (workspace rows, chunk pairing) at 1/3/4/7 threads, on the
  # cases small enough for a sanitized build.
  env "${SANENV[@]}" "$PY" -m pytest -p _sanitize_guard -q -x -p no:cacheprovider -rfE \
    tests/test_param_grads.py -k "exact_integer or extreme or gemma or large_mean"
  rc=$?
fi
set -e
say "tests took $((SECONDS - t0)) s (pytest exit $rc)"

# Any report, even from a thread or a subprocess that did not kill pytest, fails the run.
if compgen -G "$LOGDIR/*" >/dev/null; then
  for f in "$LOGDIR"/*; do
    printf '===== %s =====\n' "$f" >&2
    head -n 80 "$f" >&2
  done
  fail "sanitizer reports found"
fi
[[ $rc -eq 0 ]] || fail "pytest exited with $rc"
say "clean"
[[ $KEEP -eq 1 ]] || rm -rf "$WORK"
