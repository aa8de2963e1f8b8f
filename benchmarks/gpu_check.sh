#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100/H200):
#   1. pip install --no-build-isolation --no-deps -e .   (builds sparsefast._C for this GPU's arch)
#   2. pytest -m gpu tests                                 (every GPU test against the reference)
#   3. pytest benchmarks                                   (if the suite exists; it prints the ratio table)
#   4. appends date / GPU / versions / command and the printed tables to benchmarks/RESULTS.md
# Logs go to $OUT (when set, e.g. on the device tool) or benchmarks/logs/. Exit status: non-zero when
# the install or any test/benchmark failed (the results are appended anyway).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOGDIR=${OUT:-$ROOT/benchmarks/logs}
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

t0=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGDIR/install.log" 2>&1; then
  echo "gpu_check: install failed (tail of $LOGDIR/install.log):" >&2
  tail -n 40 "$LOGDIR/install.log" >&2
  status=1
fi
echo "gpu_check: install took $(( $(date +%s) - t0 ))s"
"$PY" -c "import sparsefast.backends as b; print('backends available:', b.available()); print('cuda:', b.why_unavailable('cuda') or 'ok')" 2>&1 | tee "$LOGDIR/backends.txt"

"$PY" -m pytest -m gpu tests -q -rfE -p no:cacheprovider 2>&1 | tee "$LOGDIR/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}
[ "$rc_tests" -eq 0 ] || status=1

rc_bench="n/a"
if ls benchmarks/test_*.py benchmarks/*_test.py >/dev/null 2>&1 || ls benchmarks/bench_*.py >/dev/null 2>&1; then
  "$PY" -m pytest benchmarks -q -s -p no:cacheprovider 2>&1 | tee "$LOGDIR/benchmarks.log"
  rc_bench=${PIPESTATUS[0]}
  [ "$rc_bench" -eq 0 ] || status=1
fi

{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — GPU check on $GPU"
  echo
  echo "- versions: $VERS; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "- command: \`bash benchmarks/gpu_check.sh\` (pytest -m gpu tests; pytest benchmarks)"
  echo "- backends: $(tr '\n' ' ' < "$LOGDIR/backends.txt")"
  echo "- gpu tests: $(grep -E '(passed|failed|error)' "$LOGDIR/gpu_tests.log" | tail -n 1) (exit $rc_tests)"
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
