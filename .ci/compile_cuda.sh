#!/usr/bin/env bash
# CI step: compile csrc/ (the sparsefast._C CUDA extension) for sm_80 and sm_90a with this machine's
# nvcc against a CUDA build of torch, check the binary holds both targets and the sparse
# tensor-core instructions, then run the kernel report on the built .so
# (`python -m sparsefast kernels --report --only cuda --cuda-objects <.so>`): every kernel's
# `// kernel-report:` expectations in csrc/ (sparse MMA, 128-bit loads, packed 16-bit stores, no local
# memory / spills in hot kernels) must hold, and ptxas must not have serialized any wgmma (its notes in
# the build log), else this step fails. It cannot run the kernels (no GPU):
# tests/backends/test_cuda.py does the CPU-side checks and the gpu-marked tests run on a GPU machine
# (benchmarks/gpu_check.sh).
#
# The system-wide torch is a CPU build, so this uses its own clean venv (no --system-site-packages),
# created once and reused while it holds a CUDA torch:
#   SPARSEFAST_CUDA_VENV  (default /tmp/sparsefast-cudavenv)
#   SPARSEFAST_CUDA_TORCH (default torch==2.14.1, a CUDA 13 build from the local package index)
#   CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 2)
#   PYTHON (default python3): the interpreter that runs the kernel report from the repo (needs only
#          the sparsefast sources and their imports; torch may be the CPU build)
#   SPARSEFAST_CUDA_REPORT_JSON: also write the kernel report there (JSON)
# Exits non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SPARSEFAST_CUDA_VENV:-/tmp/sparsefast-cudavenv}
TORCH_SPEC=${SPARSEFAST_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export MAX_JOBS=${MAX_JOBS:-2}
t0=$(date +%s)
say() { echo "[compile_cuda $(( $(date +%s) - t0 ))s] $*"; }

[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "compile_cuda: no nvcc at $CUDA_HOME/bin/nvcc" >&2; exit 1; }
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_SPEC" <<'PY' 2>/dev/null
import sys, torch
want = sys.argv[1].split("==")[-1]
sys.exit(0 if torch.version.cuda and torch.__version__.split("+")[0] == want else 1)
PY
}
if ! venv_ok; then
  say "creating $VENV with $TORCH_SPEC"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy ninja setuptools wheel
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# cuobjdump: the toolkit's if it has one, else the copy triton ships (this machine's toolkit has none)
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ ! -x "$CUOBJDUMP" ]; then
  CUOBJDUMP=$("$VENV/bin/python" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || true)
fi
[ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ] || { echo "compile_cuda: no cuobjdump (toolkit or triton)" >&2; exit 1; }
"$CUOBJDUMP" --version | tail -n 2

OUT=$(mktemp -d /tmp/sparsefast-cuda-build.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
say "building sparsefast._C for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
cd "$ROOT"
# The build log is kept and searched for ptxas's "wgmma.mma_async instructions are serialized" notes
# (C7520 & co: a wgmma on a divergent path, ...; the kernel report on the .so cannot see them, it has
# no compile log). nvcc appends NVCC_APPEND_FLAGS to every compile: -Xptxas -v also logs registers
# and spills per kernel.
BUILD_LOG="$OUT/build.log"
set +e
NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas=-v" "$VENV/bin/python" - "$ROOT" "$OUT" \
  >"$BUILD_LOG" 2>&1 <<'PY'
import importlib.util, sys
from pathlib import Path
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
root, out = Path(sys.argv[1]), sys.argv[2]
spec = importlib.util.spec_from_file_location("_sf_build_cuda", root / "sparsefast" / "_build_cuda.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
exts = mod.extensions(root)
if not exts:
    sys.exit("compile_cuda: extensions() returned nothing: " + str(mod.why_not_buildable()))
setup(name="sparsefast-cuda-check", ext_modules=exts,
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
      script_args=["-q", "build_ext", "--build-lib", out + "/lib", "--build-temp", out + "/tmp"])
PY
rc=$?
set -e
grep -vE "ptxas info +: (Compiling entry|Function properties|Used [0-9]+ registers|Compile time|[0-9]+ bytes gmem)|bytes stack frame" \
  "$BUILD_LOG" | tail -n 40 || true
[ "$rc" -eq 0 ] || { echo "compile_cuda: the build failed (log above)" >&2; exit 1; }
say "build done"
if grep -E "wgmma[^ ]* instructions are serialized" "$BUILD_LOG" >&2; then
  echo "compile_cuda: ptxas serialized wgmma instructions (notes above): the Hopper kernel would run with no MMA overlap" >&2
  exit 1
fi
SO=$(find "$OUT/lib" -name '_C*.so' | head -n 1)
[ -n "$SO" ] || { echo "compile_cuda: no _C*.so produced" >&2; exit 1; }
say "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

ELF=$("$CUOBJDUMP" --list-elf "$SO")
echo "$ELF"
fail=0
for arch in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
  sm="sm_$(echo "${arch%%+PTX}" | tr -d '.')"
  if ! echo "$ELF" | grep -q "\.${sm}\.cubin"; then echo "compile_cuda: no $sm cubin in $SO" >&2; fail=1; continue; fi
  # mma.sp assembles to HMMA.<shape>.SP (the F32.BF16 / F32 forms): count them per target
  n=$("$CUOBJDUMP" -sass -arch "$sm" "$SO" | grep -cE 'HMMA\.[0-9A-Z.]*SP' || true)
  say "$sm: $n sparse HMMA instructions"
  [ "$n" -gt 0 ] || { echo "compile_cuda: no sparse tensor-core (HMMA...SP) instruction in the $sm SASS" >&2; fail=1; }
  if [ "$sm" = "sm_90a" ]; then  # wgmma.mma_async.sp assembles to HGMMA.SP.64xNx32
    n=$("$CUOBJDUMP" -sass -arch "$sm" "$SO" | grep -cE 'HGMMA\.SP\.' || true)
    say "$sm: $n sparse warpgroup HGMMA.SP instructions"
    [ "$n" -gt 0 ] || { echo "compile_cuda: no HGMMA.SP (wgmma.sp) instruction in the sm_90a SASS" >&2; fail=1; }
  fi
done
[ "$fail" -eq 0 ] || exit 1

say "kernel report (cuobjdump on the built .so; expectations from the // kernel-report: lines in csrc/)"
ARCHS=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed -e 's/+PTX//' -e 's/[^0-9]//g' | grep -v '^$' | paste -sd, -)
report=(--report --only cuda --cuda-objects "$SO" --arch "$ARCHS" --require-compiled)
[ -n "${SPARSEFAST_CUDA_REPORT_JSON:-}" ] && report+=(--json "$SPARSEFAST_CUDA_REPORT_JSON")
# cuobjdump: the same one as above (kernel_report looks in $CUDA_HOME/bin, then PATH)
if ! (cd "$ROOT" && PATH="$(dirname "$CUOBJDUMP"):$PATH" "${PYTHON:-python3}" -m sparsefast kernels "${report[@]}"); then
  echo "compile_cuda: the kernel report failed (see the problems above)" >&2
  exit 1
fi

say "import check"
cd "$OUT"  # not the repo root: its sparsefast/ package would shadow the built one
PYTHONPATH="$OUT/lib" "$VENV/bin/python" - <<'PY'
import importlib, torch
m = importlib.import_module("sparsefast._C")
need = {"sf24_pack", "sf24_unpack", "sf24_linear", "sf24_conv2d", "csr_spmm", "csr_sddmm"}
missing = need - set(dir(m))
assert not missing, f"missing bindings: {missing}"
print("sparsefast._C imports:", sorted(need))
PY
say "ok"
