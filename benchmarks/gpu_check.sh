#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100/H200), in stages, each under its own time budget
# (a stage that runs out is killed and reported; the later stages still run and the results are
# written):
#   install       pip install --no-build-isolation --no-deps -e .   (builds sparsefast._C for this GPU only)
#   self-check    sparsefast.backends.self_check() in a fresh process: every kernel family (CUDA mma.sp
#                 tiles / wgmma.sp / fp32 split / 2:4 conv / CSR, Triton N:M / unstructured / block) on a
#                 small problem against the reference, bf16; verdict table per family -> self_check.txt,
#                 self_check.json. Verdicts go to the on-disk cache, so later stages do not check again.
#                 Checks still due when its time budget is near are listed "n/a" (run lazily later).
#   backends      import + availability of every backend (and the wgmma.sp status on sm_90)
#   gpu-tests     pytest -m gpu tests                     (every GPU test against the reference; junit xml)
#   triton-tests  pytest -m "triton and not gpu" tests    (the Triton kernels compiled for this GPU; junit xml)
#   benchmarks    pytest benchmarks                       (if the suite exists; it prints the ratio table)
# then appends date / GPU / versions / command and the printed tables to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh --plan   prints the stages and their budgets and `total: N s`, exit 0
#                                         (needs no GPU; CI runs it)
#
# Logs go to $SPARSEFAST_OUT, else $OUT (e.g. on the device tool), else benchmarks/logs/. Exit status:
# non-zero when the install or any test/benchmark failed or ran out of time (results are appended anyway).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# stage budgets in seconds; their sum stays <= 540 (9 minutes) with room for the kill grace below
STAGES=(install self-check backends gpu-tests triton-tests benchmarks)
declare -A BUDGET=([install]=180 [self-check]=30 [backends]=30 [gpu-tests]=140 [triton-tests]=110 [benchmarks]=50)
SELF_CHECK_STOP=20  # seconds after which the self-check starts no new family (its stage budget is larger)
declare -A WHAT=(
  [install]="pip install -e . (sparsefast._C for this GPU's arch only)"
  [self-check]="sparsefast.backends.self_check() per kernel family, bf16 (self_check.txt/.json)"
  [backends]="import sparsefast.backends; availability + wgmma.sp status"
  [gpu-tests]="pytest -m gpu tests (junit: gpu_tests.xml)"
  [triton-tests]="pytest -m 'triton and not gpu' tests (junit: triton_tests.xml)"
  [benchmarks]="pytest benchmarks (ratio tables)"
)
KILL_GRACE=5   # seconds between SIGTERM and SIGKILL when a stage runs out

plan() {
  local total=0 s
  echo "gpu_check plan (stage: budget):"
  for s in "${STAGES[@]}"; do
    printf '  %-13s %4d s  %s\n' "$s" "${BUDGET[$s]}" "${WHAT[$s]}"
    total=$(( total + BUDGET[$s] ))
  done
  echo "total: $total s"
}

if [ "${1:-}" = "--plan" ]; then
  plan
  exit 0
fi
if [ $# -gt 0 ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--plan]" >&2
  exit 2
fi

LOGDIR=${SPARSEFAST_OUT:-${OUT:-$ROOT/benchmarks/logs}}
mkdir -p "$LOGDIR"
RESULTS=${SPARSEFAST_RESULTS:-$ROOT/benchmarks/RESULTS.md}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

if ! command -v nvidia-smi >/dev/null || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch here" >&2
  exit 2
fi
# build only for the GPU in this machine (faster), unless the caller chose
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if (M,m)==(9,0) else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
VERS=$("$PY" -c "import torch, sys; t=None
try:
    import triton; t=triton.__version__
except Exception: pass
print(f'python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {t}')")
echo "gpu_check: $GPU | $VERS | TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

plan
declare -A RC=()
# run_stage NAME LOG CMD...: CMD under the stage's budget, output to LOG (and the console); records
# the exit status (124/137: out of time) in RC[NAME]
run_stage() {
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  local rc
  if [ "$name" = install ]; then   # the build log is long: file only
    timeout --kill-after="$KILL_GRACE" "${BUDGET[$name]}" "$@" >"$log" 2>&1
    rc=$?
  else
    timeout --kill-after="$KILL_GRACE" "${BUDGET[$name]}" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  RC[$name]=$rc
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: stage $name ran out of its ${BUDGET[$name]} s budget" | tee -a "$log" >&2
  fi
  echo "gpu_check: stage $name: exit $rc after $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 0 ] || status=1
}

run_stage install "$LOGDIR/install.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
if [ "${RC[install]}" -ne 0 ]; then
  echo "gpu_check: install failed (tail of $LOGDIR/install.log):" >&2
  tail -n 40 "$LOGDIR/install.log" >&2
fi
run_stage self-check "$LOGDIR/self_check.txt" "$PY" -c "import sys; from sparsefast.backends.selfcheck import main; sys.exit(main())" \
  --dtype bf16 --time-budget "$SELF_CHECK_STOP" --json "$LOGDIR/self_check.json"
run_stage backends "$LOGDIR/backends.txt" "$PY" -c "import sparsefast.backends as b; print('backends available:', b.available()); print('cuda:', b.why_unavailable('cuda') or 'ok'); print('wgmma.sp:', getattr(b.get('cuda'), 'wgmma_status', None) if 'cuda' in b.available() else 'n/a')"
run_stage gpu-tests "$LOGDIR/gpu_tests.log" "$PY" -m pytest -m gpu tests -q -rfE -p no:cacheprovider \
  --junitxml="$LOGDIR/gpu_tests.xml"
rc_tests=${RC[gpu-tests]}
run_stage triton-tests "$LOGDIR/triton_tests.log" "$PY" -m pytest -m "triton and not gpu" tests -q -rfE \
  -p no:cacheprovider --junitxml="$LOGDIR/triton_tests.xml"

rc_bench="n/a"
if ls benchmarks/test_*.py benchmarks/*_test.py >/dev/null 2>&1 || ls benchmarks/bench_*.py >/dev/null 2>&1; then
  run_stage benchmarks "$LOGDIR/benchmarks.log" "$PY" -m pytest benchmarks -q -s -p no:cacheprovider
  rc_bench=${RC[benchmarks]}
fi

{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — GPU check on $GPU"
  echo
  echo "- versions: $VERS; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "- command: \`bash benchmarks/gpu_check.sh\` (stages: $(for s in "${STAGES[@]}"; do printf '%s=%s/%ss ' "$s" "${RC[$s]:-not run}" "${BUDGET[$s]}"; done))"
  echo "- self-check (bf16): $(grep -E '^self-check:' "$LOGDIR/self_check.txt" 2>/dev/null | tail -n 1) (exit ${RC[self-check]:-not run}); failed families: $(grep -E ' FAIL ' "$LOGDIR/self_check.txt" 2>/dev/null | cut -c1-59 | sed 's/ *$//' | paste -sd ';' -)"
  echo "- backends: $(tr '\n' ' ' < "$LOGDIR/backends.txt")"
  echo "- gpu tests: $(grep -E '(passed|failed|error)' "$LOGDIR/gpu_tests.log" | tail -n 1) (exit $rc_tests)"
  echo "- triton tests: $(grep -E '(passed|failed|error)' "$LOGDIR/triton_tests.log" | tail -n 1) (exit ${RC[triton-tests]})"
  if [ -f "$LOGDIR/benchmarks.log" ]; then
    echo "- benchmarks: exit $rc_bench"
    echo
    echo '```'
    # the suite's printed tables (lines with a '|' or the pytest-benchmark table rows), else its tail
    if grep -qE '^\s*\|' "$LOGDIR/benchmarks.log"; then grep -E '^\s*\|' "$LOGDIR/benchmarks.log"; else tail -n 60 "$LOGDIR/benchmarks.log"; fi
    echo '```'
  fi
} >>"$RESULTS"
echo "gpu_check: appended to $RESULTS; exit $status"
exit $status
