#!/usr/bin/env bash
# CI step: compile every Triton kernel, in every autotune config, ahead of time for sm_80 and sm_90
# (no GPU needed) and check registers / spills / tensor-core instructions against each kernel's
# `expect` (format: sparsefast/kernel_report/__init__.py). Exits non-zero on a violation (a spill in a hot
# kernel, a missing tensor-core instruction, a compile error, a bad `expect`) or when nothing could be
# compiled (Triton or its ptxas missing). Prints the table; the JSON report is kept.
#
# Environment:
#   KERNELS_REPORT_SCOPE    "ci" (default): the bf16 entries (the benchmarked dtype; fp16 is the same
#                           code with another element type, fp32 the non-tensor-core path);
#                           "all": every entry of every aot_compile_configs() (~2x the time)
#   KERNELS_REPORT_ARCH     targets (default 80,90)
#   KERNELS_REPORT_TIMEOUT  time budget in seconds for the Triton compiles (default 270); compiles left
#                           when it runs out are listed as "not run" (not a failure)
#   KERNELS_REPORT_JOBS     compile processes (default: the number of cores, at most 4)
#   KERNELS_REPORT_JSON     JSON output (default ${TMPDIR:-/tmp}/sparsefast-kernels-report.json)
#   KERNELS_REPORT_CUDA=1   also compile csrc/*.cu with nvcc for sm_80 / sm_90a (~1-3 min on 2 cores)
# Triton caches compiled kernels (TRITON_CACHE_DIR, default ~/.triton/cache): a re-run with unchanged
# kernels takes seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
SCOPE=${KERNELS_REPORT_SCOPE:-ci}
ARCH=${KERNELS_REPORT_ARCH:-80,90}
TIMEOUT=${KERNELS_REPORT_TIMEOUT:-270}
JSON=${KERNELS_REPORT_JSON:-${TMPDIR:-/tmp}/sparsefast-kernels-report.json}
args=(--report --only triton --arch "$ARCH" --timeout "$TIMEOUT" --json "$JSON" --require-compiled)
[ -n "${KERNELS_REPORT_JOBS:-}" ] && args+=(-j "$KERNELS_REPORT_JOBS")
case "$SCOPE" in
  ci) args+=(--exclude '\b(fp32|fp16)\b') ;;
  all) ;;
  *) echo "kernels_report: KERNELS_REPORT_SCOPE must be ci or all, not $SCOPE" >&2; exit 2 ;;
esac
# the report compiles in child processes without TRITON_INTERPRET (the interpreter replaces the
# kernels); unset it here too so nothing in this process depends on it
unset TRITON_INTERPRET

t0=$(date +%s)
echo "[kernels_report] triton, sm ${ARCH}, scope ${SCOPE}, budget ${TIMEOUT}s"
rc=0
env PYTHONUNBUFFERED=1 "$PY" -m sparsefast kernels "${args[@]}" || rc=$?

if [ "${KERNELS_REPORT_CUDA:-0}" = 1 ]; then
  echo "[kernels_report] cuda (nvcc), sm ${ARCH}"
  "$PY" -m sparsefast kernels --report --only cuda --arch "$ARCH" --json "${JSON%.json}-cuda.json" || rc=$?
fi
echo "[kernels_report] done in $(( $(date +%s) - t0 )) s, exit $rc (JSON: $JSON)"
exit "$rc"
