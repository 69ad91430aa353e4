#!/usr/bin/env bash
# One prepared validation run for a lent GPU machine (H100/H200; Python 3.12, torch 2.11+cu130,
# nvcc 13.0, pytest + pytest-xdist + pytest-timeout, Triton, compute-sanitizer; no package
# registry). Fits one device call (~9 minutes):
#   build (sm_90) -> error-path probe -> tests on cuda and cpu (xdist) in parallel with
#   compute-sanitizer memcheck (every kernel path) and racecheck/initcheck/synccheck (a subset)
#   -> benchmarks alone on the GPU (bf16 sweep vs eager and Liger; torch.compile on a few
#   shapes; fp16/fp32; the quantized ops).
# The log goes to $OUT/gpu_check.log; everything else (junit xml, sanitizer reports, bench
# csv/json/md, probe output) is packed into $OUT/gpu_check.tar.gz at the end, because the
# device tool brings back at most 8 files. Without OUT, results stay in
# benchmarks/results/gpu-check/.
#
#   RMSNORM_EXT_COMMIT=<hash> bash benchmarks/gpu_check.sh     # everything
#   STAGES="build bench" bash benchmarks/gpu_check.sh
# STAGES: any of "build tests sanitize bench model" (default: all). DEADLINE (seconds from the
# start, default 540) bounds the run: the benchmark sets and the model runs take what is left,
# in priority order, and are skipped when too little is.
# Knobs: PYTEST_K, PYTEST_JOBS, TEST_TIMEOUT, SAN_TIMEOUT, BENCH_SETS, MODEL_MODES.
# Wheels in .whl/ (Liger-Kernel) are installed to /tmp/site; a probe script in
# .probe/torch_check_crash.py (if carried) runs in the background during the build.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -n "${OUT:-}" ]; then WORK=/tmp/gpu_check; LOG=$OUT/gpu_check.log
else WORK=$REPO/benchmarks/results/gpu-check; LOG=$WORK/gpu_check.log; fi
rm -rf "$WORK"; mkdir -p "$WORK/bench"
exec > >(tee -a "$LOG") 2>&1
STAGES=${STAGES:-"build tests sanitize bench model"}
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$SECONDS
status=0
summary=()
stage() { echo; echo "=== [$((SECONDS - t0))s] $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
note() { summary+=("$*"); echo ">>> $*"; }
pack() {
  [ -n "${OUT:-}" ] || return 0
  cp "$LOG" "$WORK/" 2>/dev/null
  tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" . 2>/dev/null
}
trap pack EXIT

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
gcc --version | head -1; nvcc --version | tail -1; lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
# The device machine gets the tree without .git: pass RMSNORM_EXT_COMMIT=<hash> in the command.
export RMSNORM_EXT_COMMIT=${RMSNORM_EXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $RMSNORM_EXT_COMMIT  date $(date -u +%F)"

# Extra wheels carried in .whl (Liger-Kernel): installed to /tmp/site, never to the system.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The crash probe (TORCH_CHECK messages that format a number, on this machine's toolchain)
# builds four tiny extensions: run it beside our build, read its answer at the end.
probe_pid=
PROBE=${PROBE:-.probe/torch_check_crash.py}
if [ -f "$PROBE" ]; then
  (MAX_JOBS=4 timeout -k 15 240 python3 "$PROBE" /tmp/crash_probe > "$WORK/probe.txt" 2>&1) &
  probe_pid=$!
fi

if want build; then
  stage "build (sm_90)"
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  if ! RMSNORM_EXT_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . \
      > "$WORK/build.txt" 2>&1; then
    tail -40 "$WORK/build.txt"; echo "BUILD FAILED"; exit 1
  fi
  python3 -c "import rmsnorm_ext; print(rmsnorm_ext.build_info())" || exit 1
  python3 -c "import rmsnorm_ext; raise SystemExit(rmsnorm_ext.build_info()['libstdcxx'] == 'static copy')" \
    || note "BUILD LINKED A STATIC libstdc++ (see setup.py _shared_cxx_runtime)"
fi

# Does a bad input raise (as it must) or kill the process? Each case in its own process.
stage "error path: bad inputs must raise, not crash"
crash=0
for case in "R.rms_norm(torch.ones(2, 3), (4,))" \
            "R.rms_norm(torch.ones(2, 3, device='cuda'), (4,))" \
            "R.layer_norm(torch.ones(2, 8, device='cuda'), (8,), torch.ones(7, device='cuda'))" \
            "R.rms_norm(torch.ones(2, 8, device='cuda'), (8,), eps=-1.0)"; do
  timeout -k 15 60 python3 -X faulthandler -c "import torch, rmsnorm_ext as R
try:
    $case
except Exception as e:
    print(type(e).__name__, str(e)[:100]); raise SystemExit(0)
raise SystemExit(3)" > "$WORK/errcase.txt" 2>&1
  rc=$?
  echo "rc=$rc  $case -> $(tail -1 "$WORK/errcase.txt")"
  [ $rc -gt 128 ] && head -30 "$WORK/errcase.txt"
  [ $rc -lt 0 ] || [ $rc -gt 128 ] && crash=1
  [ $rc -ne 0 ] && status=1
done
# Where our std:: references bind at run time (setup.py links libstdc++ first; see there).
if [ -f .probe/check_binding.sh ]; then
  bash .probe/check_binding.sh rmsnorm_ext/_C*.so python3 'import rmsnorm_ext' > "$WORK/binding.txt" 2>&1
  tail -12 "$WORK/binding.txt"
fi
K_DEFAULT="not distributed and not tensor_parallel"
if [ $crash -eq 1 ]; then
  note "ERROR PATH CRASHES on this machine: error-raising tests deselected"
  K_DEFAULT="$K_DEFAULT and not bad_input and not same_error and not raises and not refuse"
else
  note "error path: bad inputs raise"
fi

bg=()
if want sanitize; then
  # memcheck over every kernel path; the slower tools over a subset, all in parallel with the
  # tests (the GPU and 16 cores have room; these are correctness runs, not timings).
  run_san() {  # tool families [label]
    local tool=$1 fam=$2 label=${3:-$1}
    timeout -k 15 "${SAN_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 tests/cuda_paths.py --quick --family "$fam" > "$WORK/sanitize_$label.txt" 2>&1
    echo $? > "$WORK/sanitize_$label.rc"
  }
  stage "compute-sanitizer (background): memcheck all; racecheck/initcheck/synccheck subsets"
  run_san memcheck rms,fused,ln,quant,norm2d & bg+=($!)
  run_san memcheck gated,modulate memcheck_fused_ops & bg+=($!)
  run_san racecheck rms,ln,norm2d & bg+=($!)
  run_san initcheck rms,fused,quant,norm2d & bg+=($!)
  run_san synccheck ln,quant & bg+=($!)
fi

if want tests; then
  stage "tests (cuda and cpu, xdist)"
  # -v with the classic style prints one "[gwN] PASSED/FAILED test" line per test as it ends,
  # so a run cut by the stage's timeout still says which tests failed and which never ended;
  # the thread timeout method dumps the stacks of a hung test before ending its worker.
  timeout -k 15 "${TEST_TIMEOUT:-240}" python3 -m pytest -v -o console_output_style=classic -rfE \
    -n "${PYTEST_JOBS:-12}" --max-worker-restart 300 --timeout=90 --timeout-method=thread \
    -p no:cacheprovider tests -k "${PYTEST_K:-$K_DEFAULT}" --junitxml="$WORK/pytest.xml" \
    --durations=15 > "$WORK/pytest.txt" 2>&1
  rc=$?
  grep -E " (FAILED|ERROR) |crashed|Timeout" "$WORK/pytest.txt" | cut -c1-200 | head -40
  tail -15 "$WORK/pytest.txt" | cut -c1-300
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # cut: which tests started and never ended
    timeout -k 15 60 python3 -m pytest --collect-only -q -p no:cacheprovider tests \
      -k "${PYTEST_K:-$K_DEFAULT}" 2>/dev/null | grep "::" > "$WORK/collected.txt"
    grep -E "^\[gw[0-9]+\] .*(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) tests/" "$WORK/pytest.txt" \
      | sed -E 's/^.*(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) //; s/ +$//' | sort -u > "$WORK/finished.txt"
    echo "tests cut (running or not yet started when the stage ended): $(sort -u "$WORK/collected.txt" | comm -23 - "$WORK/finished.txt" | tee "$WORK/unfinished.txt" | wc -l)"
    head -20 "$WORK/unfinished.txt"
  fi
  if [ $rc -eq 0 ]; then note "tests: $(tail -1 "$WORK/pytest.txt")"
  else note "TESTS FAILED (rc=$rc): $(tail -1 "$WORK/pytest.txt")"; status=1; fi
fi

if [ ${#bg[@]} -gt 0 ]; then
  stage "waiting for the sanitizers"
  wait "${bg[@]}"
  for tool in memcheck memcheck_fused_ops racecheck initcheck synccheck; do
    f=$WORK/sanitize_$tool.txt
    [ -f "$f" ] || continue
    rc=$(cat "$WORK/sanitize_$tool.rc" 2>/dev/null || echo '?')
    echo "--- $tool (rc=$rc)"; grep -E "checks,|ERROR SUMMARY|FAIL" "$f" | head -8; tail -2 "$f"
    if [ "$rc" = 0 ]; then note "sanitizer $tool: clean ($(grep -E 'checks,' "$f" | tail -1))"
    else note "SANITIZER $tool FAILED (rc=$rc): $(grep -E 'ERROR SUMMARY' "$f" | tail -1)"; status=1; fi
  done
fi

if want bench; then
  # Alone on the GPU. Each set: name|arguments. Default sets, in priority order.
  # One set per op for the main sweep, so that a cut run keeps the sets that finished.
  BENCH_SETS=${BENCH_SETS:-"rms|--op rms_norm --pass fwd,fwdbwd --impl ours,eager,liger --dtype bfloat16 --shape 32768x1024,32768x2048,32768x4096,32768x8192,32768x16384,64x4096,1x4096
ln|--op layer_norm --pass fwd,fwdbwd --impl ours,eager,liger --dtype bfloat16 --shape 32768x1024,32768x2048,32768x4096,32768x8192,32768x16384,64x4096,1x4096
fused|--op fused_add_rms_norm --pass fwd,fwdbwd --impl ours,eager,liger --dtype bfloat16 --shape 32768x1024,32768x4096,32768x16384,64x4096,1x4096
compile|--op rms_norm,layer_norm --pass fwd,fwdbwd --impl ours,compile --dtype bfloat16 --shape 32768x1024,32768x4096,1x4096
dtypes|--op rms_norm,layer_norm --pass fwd,fwdbwd --impl ours,eager --dtype float16,float32 --shape 32768x4096
quant|--op rms_norm_quant,fused_add_rms_norm_quant,layer_norm_quant --quant fp8-token,int8-static,fp8-group128 --impl ours,eager --dtype bfloat16 --shape 32768x4096,64x4096"}
  bench_end=$((t0 + DEADLINE - 60))   # the model runs get the last minute at least
  while IFS='|' read -r name args; do
    [ -n "$name" ] || continue
    left=$((bench_end - SECONDS))
    if [ $left -lt 20 ]; then note "bench $name: skipped (out of time)"; continue; fi
    stage "benchmark $name (${left}s left): $args"
    # shellcheck disable=SC2086
    timeout -k 15 "$left" python3 benchmarks/bench.py --device cuda --no-plots --rounds 7 \
      --max-rounds 11 --sample-ms 15 --out "$WORK/bench" --name "$name" $args \
      > "$WORK/bench/$name.txt" 2>&1 < /dev/null
    rc=$?
    if [ $rc -eq 0 ]; then note "bench $name: done"
    elif python3 -c "import json, sys; json.load(open(sys.argv[1]))" "$WORK/bench/$name.json" 2>/dev/null; then note "bench $name: cut by the time box (rc=$rc), finished rows kept"
    else tail -5 "$WORK/bench/$name.txt"; note "BENCH $name FAILED (rc=$rc)"; status=1; fi
  done <<< "$BENCH_SETS"
fi

if want model; then
  # The end-to-end Llama-style stack (bf16, hidden 4096, 4 layers, 8K tokens): native norms vs
  # rmsnorm_ext, train and infer steps; eager first, then torch.compile if time is left.
  for mode in ${MODEL_MODES:-eager compile}; do
    left=$((t0 + DEADLINE - SECONDS))
    if [ $left -lt 45 ]; then note "model $mode: skipped (out of time)"; continue; fi
    stage "model_bench $mode (${left}s left)"
    timeout -k 15 "$left" python3 benchmarks/model_bench.py --device cuda --mode "$mode" --no-traces \
      --out "$WORK/model_$mode" > "$WORK/model_$mode.txt" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then note "model $mode: done"
    else tail -5 "$WORK/model_$mode.txt"; note "MODEL $mode FAILED or cut (rc=$rc)"; fi
  done
fi

if [ -n "$probe_pid" ]; then
  stage "crash probe (TORCH_CHECK formatting, four build variants)"
  wait "$probe_pid"; cat "$WORK/probe.txt" | tail -20
fi

stage "summary (commit $RMSNORM_EXT_COMMIT)"
for f in "$WORK"/bench/*.md "$WORK"/model_*/*.md; do
  [ -f "$f" ] && { echo "--- $f"; grep -E "^\|" "$f" | cut -c1-220 | head -60; }
done
printf '%s\n' "${summary[@]}"
echo "status=$status, $((SECONDS - t0))s"
exit $status
