"""Compile-time evidence for the GPU kernels, on any machine (no GPU needed).

Every Triton kernel, in every configuration its autotuner may pick, is compiled ahead of time for
sm_80 (A100) and sm_90 (H100: Triton targets ``sm_90a``), and every csrc CUDA kernel with ``nvcc``
for ``sm_80`` and ``sm_90a`` (or read from an already built ``.so``). For each kernel and target the
report gives registers per thread, spills / local memory, shared memory, an estimated occupancy on
that GPU, and which instructions are in the code: tensor-core MMA (``mma.sync``/``HMMA``,
``wgmma``/``HGMMA``, their sparse ``.sp`` forms) and 128-bit global loads (``ld.global.v4``,
16-byte ``cp.async``, TMA; ``LDG.E.128``/``LDGSTS.*.128``/``UTMALDG`` in SASS).

Where the numbers come from
---------------------------
* Triton: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
  arch, 32), options=...)`` in a child process whose environment has no ``TRITON_INTERPRET`` (the
  interpreter replaces ``@triton.jit`` functions, so nothing could be compiled in a process that set
  it). Registers / local memory from ``cuobjdump --dump-resource-usage`` on the cubin, shared memory
  from the compiled metadata (what the launcher requests), instructions from the PTX and from
  ``cuobjdump -sass``.
* CUDA (``csrc/*.cu``): ``nvcc -cubin -Xptxas -v`` with the flags of :mod:`sparsefast._build_cuda`
  (PTX kept), then the same ``cuobjdump`` reads; spill bytes from the ``-Xptxas -v`` log. Or, with
  ``cuda_objects_report``, from a built ``.so``/``.o``/``.cubin`` (``cuobjdump`` only: local memory
  bytes and ``STL``/``LDL`` in SASS stand in for the spill counts).

Occupancy model
---------------
Resident blocks per SM = min over: registers (``ceil(regs*32, 256)`` per warp from 65536),
shared memory (``static + dynamic`` rounded to 128 B, plus the 1 KB the driver reserves per block,
from 164 KB on A100 / 228 KB on H100), threads (2048), blocks (32); occupancy = resident warps / 64.
A block whose shared memory exceeds the per-block opt-in limit (163 KB / 227 KB) cannot launch on that
GPU (Triton's autotuner skips such a config: reported as a warning).

Expectations: the ``expect`` dict
---------------------------------
Kernel authors state what a kernel must compile to; the report checks it. For Triton, an entry of
``aot_compile_configs()`` may carry ``expect`` (a dict key, a NamedTuple field or an attribute).
For CUDA, a comment anywhere in ``csrc/`` (``*.cu``, ``*.cuh``, ``*.h``)::

    // kernel-report: <regex> key[=value] key[=value] ...

applies to every kernel whose demangled name with all spaces removed matches ``<regex>``
(``re.search``; e.g. ``sf24_gemm_kernel`` or ``sf24_gemm_kernel<.*Cfg<128,128,64``); several matching
lines merge in file order, later ones winning. A bare ``key`` means ``True``. Keys (see
:data:`EXPECT_KEYS`):

``tensor_core``  ``True``: some tensor-core MMA must be in the code; ``"sparse"``: a sparse one
                 (``mma.sp``/``wgmma.sp``, SASS ``HMMA.SP``/``HGMMA...SP``). Missing = error.
``wgmma``        ``True``: on sm_90 the MMA must be the warpgroup ``wgmma`` (SASS ``HGMMA``), not
                 the A100-style ``mma.sync``. Ignored for sm_80. Missing = error.
``vector_loads`` ``True``: 128-bit global loads must be there. Missing = warning.
``hot``          ``True``: the kernel is on the per-step path; register spills / local memory are an
                 error (in any kernel they are a warning).
``min_occupancy`` float in (0, 1]: estimated occupancy below it = warning.
``threads``      int: threads per block, for the occupancy estimate (Triton: ``num_warps*32``; CUDA:
                 read from ``__launch_bounds__`` when present, else give it here).
``dyn_smem``     int: dynamic shared memory bytes per block (CUDA; Triton knows its own).
``archs``        list of ints, e.g. ``[90]``: Triton: the targets this entry is compiled for
                 (default: every target of the run); CUDA (``archs=90``): the targets the checks
                 apply to (an sm_90-only kernel's sm_80 stub is still listed, unchecked).

An unknown key or a value of the wrong type is itself an error, so typos cannot silence a check.
Without ``expect`` the instructions and resources are still reported, but only compile errors and
launch-limit problems are flagged.

Exit status (``python -m sparsefast kernels``): non-zero when any row has an error: a compile or
import failure, a spill in a ``hot`` kernel, a missing tensor-core instruction that ``expect`` asks
for, or a bad ``expect``. A missing tool (no Triton, no nvcc, no cuobjdump) is a per-row status, not an
error (``--require-compiled`` makes it one); nor is a compile left undone when the ``--timeout``
budget runs out (status ``not-run``, listed; ``--strict`` makes it one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# ------------------------------------------------------------------------------------------------
# GPU limits and the occupancy model
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one GPU (CUDA programming guide, compute-capability table)."""

    gpu: str
    regs: int = 65536                 # 32-bit registers per SM
    max_regs_thread: int = 255
    reg_alloc_unit: int = 256         # registers are allocated per warp in units of 256
    smem_per_sm: int = 0              # bytes (carveout maximum)
    smem_per_block: int = 0           # bytes (opt-in maximum per block)
    smem_reserved_block: int = 1024   # the driver's system use per block (sm_80+)
    smem_alloc_unit: int = 128
    threads: int = 2048
    warps: int = 64
    blocks: int = 32


#: sm_80 = A100, sm_90 = H100/H200
LIMITS: dict[int, SMLimits] = {
    80: SMLimits("A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: SMLimits("H100", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}

DEFAULT_ARCHS = (80, 90)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def occupancy(arch: int, regs: int | None, smem: int | None, threads: int | None,
              reserve_included: bool = False) -> dict[str, Any]:
    """Estimated residency of a kernel on the GPU of ``arch`` (80: A100, 90: H100).

    ``regs`` per thread, ``smem`` = static + dynamic shared bytes per block, ``threads`` per block.
    ``reserve_included``: ``smem`` already counts the driver's 1 KB per block (sm_90 cubins list it as
    static shared memory: every sm_90a kernel, even one without shared memory, shows 1024 bytes).
    Returns ``blocks`` (resident blocks per SM), ``warps``, ``occupancy`` (warps / max warps, 0..1),
    ``limiter`` (which resource bounds it: regs/smem/threads/blocks), ``fits`` (False when one block
    alone exceeds a per-block limit) and ``why`` (text when it does not fit or inputs are missing).
    Unknown inputs give ``occupancy=None``."""
    lim = LIMITS.get(arch, LIMITS[90] if arch > 90 else LIMITS[80])
    out: dict[str, Any] = dict(gpu=lim.gpu, blocks=None, warps=None, occupancy=None, limiter=None,
                               fits=True, why="")
    if regs is None or threads is None or threads <= 0:
        out["why"] = "threads per block unknown" if regs is not None else "registers unknown"
        return out
    smem = smem or 0
    warps_per_block = -(-threads // 32)
    if threads > 1024:
        out.update(fits=False, why=f"{threads} threads per block > 1024")
        return out
    if regs > lim.max_regs_thread:
        out.update(fits=False, why=f"{regs} registers per thread > {lim.max_regs_thread}")
        return out
    if smem > lim.smem_per_block:
        out.update(fits=False, why=f"{smem / 1024:.1f} KB shared memory per block > "
                                   f"{lim.smem_per_block // 1024} KB on {lim.gpu}")
        return out
    regs_per_warp = _round_up(max(regs, 1) * 32, lim.reg_alloc_unit)
    by = {
        "regs": (lim.regs // regs_per_warp) // warps_per_block,
        "smem": lim.smem_per_sm // (_round_up(smem, lim.smem_alloc_unit)
                                    + (0 if reserve_included else lim.smem_reserved_block)),
        "threads": lim.warps // warps_per_block,
        "blocks": lim.blocks,
    }
    limiter = min(by, key=lambda k: (by[k], ["blocks", "threads", "regs", "smem"].index(k)))
    blocks = by[limiter]
    if blocks == 0:
        out.update(fits=False, why=f"not even one block fits ({limiter})", blocks=0, warps=0, occupancy=0.0,
                   limiter=limiter)
        return out
    warps = blocks * warps_per_block
    out.update(blocks=blocks, warps=warps, occupancy=warps / lim.warps, limiter=limiter)
    return out


# ------------------------------------------------------------------------------------------------
# expectations
# ------------------------------------------------------------------------------------------------
#: expect key -> (accepted python types, description)
EXPECT_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "tensor_core": ((bool, str), "True: some tensor-core MMA; 'sparse': mma.sp / wgmma.sp"),
    "wgmma": ((bool,), "True: on sm_90 the MMA is wgmma (HGMMA), not mma.sync"),
    "vector_loads": ((bool,), "True: 128-bit global loads present (warning if not)"),
    "hot": ((bool,), "True: spills / local memory are an error"),
    "min_occupancy": ((float, int), "warn below this estimated occupancy (0..1)"),
    "threads": ((int,), "threads per block (occupancy input)"),
    "dyn_smem": ((int,), "dynamic shared memory bytes per block (occupancy input)"),
    "archs": ((list, tuple), "targets to compile this entry for, e.g. [90] (Triton)"),
}


def validate_expect(expect: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Check an ``expect`` dict against :data:`EXPECT_KEYS`: returns (the valid part, error texts)."""
    if expect is None:
        return {}, []
    if not isinstance(expect, Mapping):
        return {}, [f"expect must be a dict, got {type(expect).__name__}"]
    good, errors = {}, []
    for k, v in expect.items():
        if k not in EXPECT_KEYS:
            errors.append(f"unknown expect key {k!r} (known: {', '.join(EXPECT_KEYS)})")
            continue
        types = EXPECT_KEYS[k][0]
        if isinstance(v, bool) and bool not in types:
            errors.append(f"expect[{k!r}] must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
            continue
        if not isinstance(v, types):
            errors.append(f"expect[{k!r}] must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
            continue
        if k == "tensor_core" and isinstance(v, str) and v != "sparse":
            errors.append(f"expect['tensor_core'] must be True/False or 'sparse', got {v!r}")
            continue
        if k == "min_occupancy" and not 0 < float(v) <= 1:
            errors.append(f"expect['min_occupancy'] must be in (0, 1], got {v!r}")
            continue
        if k == "archs" and not all(isinstance(a, int) for a in v):
            errors.append(f"expect['archs'] must be a list of ints like [80, 90], got {v!r}")
            continue
        good[k] = v
    return good, errors


_ANNOT_RE = re.compile(r"//\s*kernel-report:\s*(\S+)(.*)$")


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0"):
        return False
    if "," in v:
        return [_parse_value(x) for x in v.split(",") if x]
    try:
        return int(v, 0)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def parse_annotations(text: str, origin: str = "") -> list[tuple[str, dict[str, Any], str]]:
    """``// kernel-report: <regex> key[=value] ...`` lines of a CUDA source -> [(regex, expect, where)].
    ``archs=80,90`` style comma lists become lists; numbers become int/float; bare keys ``True``."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        m = _ANNOT_RE.search(line)
        if not m:
            continue
        exp: dict[str, Any] = {}
        for tok in m.group(2).split():
            k, eq, v = tok.partition("=")
            exp[k] = _parse_value(v) if eq else True
        if "archs" in exp and not isinstance(exp["archs"], list):
            exp["archs"] = [exp["archs"]]
        out.append((m.group(1), exp, f"{origin}:{i}"))
    return out


def match_annotations(annotations: Sequence[tuple[str, dict, str]], name: str) -> tuple[dict, list[str]]:
    """Merge the expect dicts of every annotation whose regex matches ``name`` (demangled, spaces
    removed). Returns (expect, error texts for invalid regexes)."""
    key = re.sub(r"\s+", "", name)
    merged: dict[str, Any] = {}
    errors = []
    for rx, exp, where in annotations:
        try:
            hit = re.search(rx, key) is not None
        except re.error as e:
            errors.append(f"{where}: bad kernel-report regex {rx!r}: {e}")
            continue
        if hit:
            merged.update(exp)
    return merged, errors


# ------------------------------------------------------------------------------------------------
# parsers: ptxas -v, cuobjdump --dump-resource-usage / -sass / -elf, PTX
# ------------------------------------------------------------------------------------------------
def parse_ptxas_verbose(text: str) -> dict[str, dict[str, Any]]:
    """``nvcc -Xptxas -v`` / ``ptxas -v`` log -> {mangled function: {arch, regs, stack,
    spill_stores, spill_loads, smem (static bytes), barriers}}."""
    out: dict[str, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            cur["arch"] = m.group(2)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            if b:
                cur["barriers"] = int(b.group(1))
    return out


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {REG, STACK, SHARED, LOCAL, ...}}.
    When the file holds several targets, keys are only from the ``-arch`` asked for; call once per
    target."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur is not None and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            cur = None
    return out


_SASS_FN_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def parse_sass(text: str) -> dict[str, Counter]:
    """``cuobjdump -sass`` / ``nvdisasm`` text -> {function: Counter(full opcode, e.g. 'HMMA.SP.16832.F32.BF16')}."""
    out: dict[str, Counter] = {}
    cur: Counter | None = None
    for line in text.splitlines():
        m = _SASS_FN_RE.match(line)
        if m:
            cur = out.setdefault(m.group(1), Counter())
            continue
        if cur is None:
            continue
        m = _SASS_INSN_RE.search(line)
        if m:
            cur[m.group(1)] += 1
    return out


def parse_elf_max_threads(text: str) -> dict[str, int]:
    """``cuobjdump -elf`` -> {function: max threads per block} from ``EIATTR_MAX_THREADS``
    (``__launch_bounds__``) or ``EIATTR_REQNTID`` (``.reqntid``)."""
    out: dict[str, int] = {}
    cur = None
    want = False
    for line in text.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur, want = m.group(1), False
            continue
        if cur is None:
            continue
        if re.search(r"Attribute:\s*EIATTR_(MAX_THREADS|REQNTID)\b", line):
            want = True
            continue
        if want and "Value:" in line:
            dims = [int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]+", line)]
            if dims:
                n = 1
                for d in dims:
                    n *= max(d, 1)
                out[cur] = n
            want = False
    return out


def ptx_functions(ptx: str) -> dict[str, str]:
    """Split PTX into {entry name: body text} (``.entry`` functions only)."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+([\w$]+)\s*\(", ptx)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        out[name] = ptx[pos:end]
    return out


_PTX_PATTERNS = {
    "mma": re.compile(r"(?<![\w.])mma\.sync\.aligned"),
    "mma.sp": re.compile(r"(?<![\w.])mma\.sp(?:::ordered_metadata)?\.sync"),
    "wgmma": re.compile(r"\bwgmma\.mma_async\.sync"),
    "wgmma.sp": re.compile(r"\bwgmma\.mma_async\.sp"),
    "ld.global.128": re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64|u64|s64))\b"),
    "cp.async.16": re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*(?:16|0x10)\b"),
    "tma": re.compile(r"\bcp\.async\.bulk"),
    "st.local": re.compile(r"\bst\.local\b"),
}


def ptx_features(body: str) -> dict[str, int]:
    """Counts of the instruction classes of interest in PTX text (one function or a whole module)."""
    return {k: len(rx.findall(body)) for k, rx in _PTX_PATTERNS.items()}


def sass_features(ops: Counter) -> dict[str, int]:
    """Counts of the instruction classes of interest from a SASS opcode Counter."""
    f = dict.fromkeys(("HMMA", "HMMA.SP", "HGMMA", "HGMMA.SP", "IMMA", "LDG.128", "LDGSTS.128", "TMA",
                       "LDG", "STL", "LDL"), 0)
    for op, n in ops.items():
        parts = op.split(".")
        head, sp = parts[0], "SP" in parts[1:]
        if head == "HMMA":
            f["HMMA.SP" if sp else "HMMA"] += n
        elif head == "HGMMA":
            f["HGMMA.SP" if sp else "HGMMA"] += n
        elif head in ("IMMA", "QGMMA", "IGMMA", "OMMA"):
            f["IMMA"] += n
        elif head == "LDG":
            f["LDG"] += n
            if "128" in parts:
                f["LDG.128"] += n
        elif head == "LDGSTS" and "128" in parts:
            f["LDGSTS.128"] += n
        elif head in ("UTMALDG", "UBLKCP"):
            f["TMA"] += n
        elif head == "STL":
            f["STL"] += n
        elif head == "LDL":
            f["LDL"] += n
    return f


def tensor_core_kind(sass: dict[str, int] | None, ptx: dict[str, int] | None) -> str | None:
    """The best tensor-core instruction seen: 'wgmma.sp' > 'wgmma' > 'mma.sp' > 'mma' (SASS preferred
    over PTX when both are known), or None."""
    if sass:
        for k, name in (("HGMMA.SP", "wgmma.sp"), ("HGMMA", "wgmma"), ("HMMA.SP", "mma.sp"), ("HMMA", "mma"),
                        ("IMMA", "mma")):
            if sass.get(k):
                return name
        return None
    if ptx:
        for k in ("wgmma.sp", "wgmma", "mma.sp", "mma"):
            if ptx.get(k):
                return k
    return None


def vector_load_count(sass: dict[str, int] | None, ptx: dict[str, int] | None) -> int | None:
    """Number of 128-bit global loads (incl. 16-byte cp.async and TMA), SASS preferred."""
    if sass:
        return sass["LDG.128"] + sass["LDGSTS.128"] + sass["TMA"]
    if ptx:
        return ptx["ld.global.128"] + ptx["cp.async.16"] + ptx["tma"]
    return None


# ------------------------------------------------------------------------------------------------
# the result row and the checks
# ------------------------------------------------------------------------------------------------
#: statuses: compiled; skipped (a tool is missing: not an error unless ``require_compiled``);
#: not-run (the time budget ran out first: not an error, listed); error.
OK, SKIPPED, NOT_RUN, ERROR = "ok", "skipped", "not-run", "error"


@dataclasses.dataclass
class KernelResult:
    """One kernel compiled for one target."""

    backend: str                      # "triton" | "cuda"
    arch: int                         # 80 | 90
    kernel: str                       # function name (CUDA: demangled, shortened)
    config: str = ""                  # Triton: the config label; CUDA: the source file
    source: str = ""                  # provider (module:function) or .cu path / .so
    status: str = OK                  # ok | skipped | not-run | error
    detail: str = ""                  # why skipped / the error
    regs: int | None = None
    spill_stores: int | None = None   # bytes (ptxas -v); None when only cuobjdump was available
    spill_loads: int | None = None
    local_bytes: int | None = None    # per-thread stack frame + local memory (spills, local arrays)
    static_smem: int | None = None
    dyn_smem: int | None = None
    threads: int | None = None
    occupancy: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_core: str | None = None    # wgmma.sp | wgmma | mma.sp | mma | None
    vector_loads: int | None = None   # count of 128-bit global loads
    sass: dict[str, int] | None = None
    ptx: dict[str, int] | None = None
    expect: dict[str, Any] = dataclasses.field(default_factory=dict)
    problems: list[list[str]] = dataclasses.field(default_factory=list)  # [severity, text]
    seconds: float | None = None      # compile time

    @property
    def smem(self) -> int | None:
        if self.static_smem is None and self.dyn_smem is None:
            return None
        return (self.static_smem or 0) + (self.dyn_smem or 0)

    @property
    def spilled(self) -> int | None:
        """Spill bytes (ptxas) or, when unknown, local-memory bytes (spills or a stack array)."""
        if self.spill_stores is not None:
            return self.spill_stores
        return self.local_bytes

    @property
    def verdict(self) -> str:
        sev = {p[0] for p in self.problems}
        if ERROR in sev or self.status == ERROR:
            return "FAIL"
        if self.status in (SKIPPED, NOT_RUN):
            return "skip"
        return "warn" if "warn" in sev else "ok"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(smem=self.smem, spilled=self.spilled, verdict=self.verdict)
        return d


def evaluate(r: KernelResult, expect_errors: Sequence[str] = ()) -> KernelResult:
    """Fill ``r.occupancy`` and ``r.problems`` from the measured fields and ``r.expect``."""
    problems: list[list[str]] = [[ERROR, e] for e in expect_errors]
    if r.status == ERROR:
        problems.append([ERROR, r.detail.strip().splitlines()[0] if r.detail.strip() else "failed"])
    if r.status != OK:
        r.problems = problems
        return r
    e = r.expect
    threads = e.get("threads") or r.threads
    if e.get("threads"):
        r.threads = e["threads"]
    if e.get("dyn_smem") is not None and r.dyn_smem is None:
        r.dyn_smem = e["dyn_smem"]
    r.occupancy = occupancy(r.arch, r.regs, r.smem, threads,
                            reserve_included=r.arch >= 90 and (r.static_smem or 0) >= 1024)
    if not r.occupancy["fits"]:
        problems.append(["warn", f"cannot launch on {r.occupancy['gpu']}: {r.occupancy['why']}"])
    spilled = r.spilled
    if spilled:
        what = (f"{r.spill_stores} B spill stores / {r.spill_loads} B loads" if r.spill_stores
                else f"{r.local_bytes} B local memory per thread")
        if r.sass is not None and r.spill_stores is None:
            what += f" ({r.sass.get('STL', 0)} STL, {r.sass.get('LDL', 0)} LDL)"
        problems.append([ERROR if e.get("hot") else "warn", f"register spills: {what}" + (" in a hot kernel" if e.get("hot") else "")])
    tc = e.get("tensor_core")
    if tc:
        if r.tensor_core is None:
            problems.append([ERROR, "no tensor-core instruction (expected " + ("sparse mma.sp/wgmma.sp" if tc == "sparse" else "mma/wgmma") + ")"])
        elif tc == "sparse" and not r.tensor_core.endswith(".sp"):
            problems.append([ERROR, f"dense {r.tensor_core} only; expected a sparse mma.sp/wgmma.sp"])
    if e.get("wgmma") and r.arch >= 90 and (r.tensor_core or "").split(".")[0] != "wgmma":
        problems.append([ERROR, f"sm_{r.arch}: expected wgmma (HGMMA), found {r.tensor_core or 'no MMA'}"])
    if e.get("vector_loads") and not r.vector_loads:
        problems.append(["warn", "no 128-bit global loads (ld.global.v4 / 16-byte cp.async / TMA)"])
    mo = e.get("min_occupancy")
    occ = r.occupancy.get("occupancy")
    if mo and occ is not None and occ < mo:
        problems.append(["warn", f"occupancy {occ:.0%} < expected {mo:.0%} (limited by {r.occupancy['limiter']})"])
    r.problems = problems
    return r


# ------------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------------
def _triton_bin(name: str) -> str | None:
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except Exception:  # noqa: BLE001
        return None
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() and os.access(p, os.X_OK) else None


def find_tool(name: str) -> str | None:
    """``name`` (nvcc, cuobjdump, nvdisasm, c++filt) from $CUDA_HOME/bin, /usr/local/cuda/bin, PATH,
    or the copy Triton ships."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            p = Path(home) / "bin" / name
            if p.exists() and os.access(p, os.X_OK):
                return str(p)
    w = shutil.which(name)
    if w:
        return w
    return _triton_bin(name)


def _run(cmd: Sequence[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def demangle(names: Iterable[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (``c++filt`` / ``cu++filt``), identity where unavailable."""
    names = list(dict.fromkeys(names))
    tool = find_tool("cu++filt") or find_tool("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        res = _run([tool], input="\n".join(names) + "\n", timeout=60)
        outs = res.stdout.splitlines()
        if res.returncode == 0 and len(outs) == len(names):
            return dict(zip(names, outs))
    except Exception:  # noqa: BLE001
        pass
    return {n: n for n in names}


_SHORT = [(r"\(anonymous namespace\)::", ""), (r"\bsf::", ""), (r"__nv_bfloat16", "bf16"), (r"__half\b", "fp16"),
          (r"\bfloat\b", "fp32"), (r"\s+", ""), (r",", ", ")]


def short_name(demangled: str) -> str:
    """Readable kernel name: no namespaces / parameter list, short dtype names."""
    s = demangled
    # drop the parameter list: the last top-level "(...)"
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        c = s[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                if i > 0 and not s[:i].endswith("anonymous namespace"):
                    s = s[:i]
                break
    if s.startswith("void "):
        s = s[5:]
    for rx, rep in _SHORT:
        s = re.sub(rx, rep, s)
    return s


def cuobjdump_reads(cuobjdump: str, path: str, arch_flag: str | None = None,
                    timeout: float = 300) -> tuple[dict, dict, dict, str]:
    """(resource usage, SASS opcode counters, max threads, error text) of a cubin / object / .so."""
    a = ["-arch", arch_flag] if arch_flag else []
    errs = []
    res = _run([cuobjdump, "--dump-resource-usage", *a, path], timeout=timeout)
    if res.returncode != 0:
        errs.append(f"cuobjdump --dump-resource-usage: {res.stderr.strip()[:300]}")
    usage = parse_resource_usage(res.stdout)
    sres = _run([cuobjdump, "-sass", *a, path], timeout=timeout)
    if sres.returncode != 0:
        errs.append(f"cuobjdump -sass: {sres.stderr.strip()[:300]}")
    sass = parse_sass(sres.stdout)
    eres = _run([cuobjdump, "-elf", *a, path], timeout=timeout)
    threads = parse_elf_max_threads(eres.stdout) if eres.returncode == 0 else {}
    return usage, sass, threads, "; ".join(errs)


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
#: modules scanned for ``aot_compile_configs()`` (non-underscore modules of this package)
TRITON_PACKAGE = "sparsefast.backends.triton"


def default_triton_providers() -> list[str]:
    """``module:aot_compile_configs`` for every public module file of :data:`TRITON_PACKAGE`
    (found on disk, not imported here)."""
    pkg = Path(__file__).resolve().parent / "backends" / "triton"
    out = []
    for f in sorted(pkg.glob("*.py")):
        if f.stem.startswith("_"):
            continue
        if re.search(r"^def aot_compile_configs\b", f.read_text(errors="replace"), re.M):
            out.append(f"{TRITON_PACKAGE}.{f.stem}:aot_compile_configs")
    return out


def _spec_fields(entry: Any) -> dict[str, Any]:
    """Normalize one ``aot_compile_configs()`` entry: a dict, a (Named)tuple
    ``(kernel, signature, constexprs[, options[, attrs[, name]]])`` or an object with those
    attributes; ``expect`` from a key / field / attribute."""
    keys = ("kernel", "signature", "constexprs", "options", "attrs", "name", "expect")
    if isinstance(entry, Mapping):
        d = {k: entry.get(k) for k in keys}
    elif isinstance(entry, tuple) and not hasattr(entry, "_fields"):
        d = dict(zip(keys, entry))
    else:
        d = {k: getattr(entry, k, None) for k in keys}
        if d["kernel"] is None and isinstance(entry, tuple):
            d.update(zip(keys, entry))
    if d["kernel"] is None or d["signature"] is None:
        raise ValueError(f"aot_compile_configs() entry without kernel/signature: {entry!r}"[:300])
    return d


def _kernel_name(kernel: Any) -> str:
    for a in ("__name__", "fn"):
        v = getattr(kernel, a, None)
        if isinstance(v, str):
            return v
        if v is not None and hasattr(v, "__name__"):
            return v.__name__
    return str(kernel)


def _config_label(d: dict[str, Any]) -> str:
    if d.get("name"):
        return str(d["name"])
    ce = d.get("constexprs") or {}
    opts = d.get("options") or {}
    parts = [f"{k}={v}" for k, v in ce.items()]
    parts += [f"w{opts['num_warps']}"] if "num_warps" in opts else []
    parts += [f"s{opts['num_stages']}"] if "num_stages" in opts else []
    return " ".join(parts)


def _compile_triton_one(d: dict[str, Any], arch: int, cuobjdump: str | None, keep_dir: str | None,
                        sass: bool = False) -> dict:
    """Compile one spec for one target in this (non-interpreting) process: the measured fields.
    ``sass``: also disassemble the cubin (``cuobjdump -sass``, ~0.3 s CPU per kernel) for SASS
    instruction counts (STL/LDL, LDG.E.128, HMMA/HGMMA); without it instructions come from the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=d["kernel"], signature=d["signature"], constexprs=d.get("constexprs") or {},
                    attrs=d.get("attrs") or {})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(d.get("options") or {}))
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    cubin = k.asm.get("cubin")
    out: dict[str, Any] = dict(threads=md.num_warps * 32, dyn_smem=int(md.shared), ptx=ptx_features(ptx))
    if keep_dir:
        base = Path(keep_dir) / f"{md.name}_sm{arch}_{md.hash[:10]}"
        base.with_suffix(".ptx").write_text(ptx)
        if cubin:
            base.with_suffix(".cubin").write_bytes(cubin)
    if cubin and cuobjdump:
        with tempfile.TemporaryDirectory() as td:
            p = os.path.join(td, "k.cubin")
            with open(p, "wb") as f:
                f.write(cubin)
            res = _run([cuobjdump, "--dump-resource-usage", p], timeout=120)
            usage = parse_resource_usage(res.stdout)
            ops = None
            if sass:
                sres = _run([cuobjdump, "-sass", p], timeout=300)
                by_fn = parse_sass(sres.stdout)
                ops = by_fn.get(md.name) or (next(iter(by_fn.values())) if len(by_fn) == 1 else None)
        u = usage.get(md.name) or (next(iter(usage.values())) if len(usage) == 1 else None)
        if u:
            out.update(regs=u.get("REG"), local_bytes=u.get("STACK", 0) + u.get("LOCAL", 0),
                       static_smem=u.get("SHARED", 0))
        else:
            out["note"] = f"cuobjdump read no resource usage: {res.stderr.strip()[:200]}"
        if ops is not None:
            out["sass"] = sass_features(ops)
    elif not cuobjdump:
        out["note"] = "no cuobjdump: registers unknown (PTX only)"
    return out


def _error_lines(text: str, limit: int = 4) -> str:
    """The informative lines of a compiler's output (no IR dumps)."""
    keep = []
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s.startswith(("%", "tt.", "^bb", "scf.", "arith.", "}", "{")):
            continue
        if re.search(r"\berror\b|LLVM ERROR|Assertion|failed|Illegal|out of resource", s, re.I):
            keep.append(s[:300])
    return " | ".join(list(dict.fromkeys(keep))[:limit])


class _Capture:
    """Redirect this process's fd 1 and 2 (Triton and its MLIR/LLVM passes print there) into a temp
    file for the duration of a compile; ``text`` is what was printed."""

    def __enter__(self) -> "_Capture":
        sys.stdout.flush()
        sys.stderr.flush()
        self._f = tempfile.TemporaryFile(mode="w+b")
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._f.fileno(), 1)
        os.dup2(self._f.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        os.close(self._saved[0])
        os.close(self._saved[1])
        self._f.seek(0)
        self.text = self._f.read().decode(errors="replace")
        self._f.close()


def _label(prov: str, d: dict[str, Any]) -> str:
    """The string ``--select`` / ``--exclude`` match: ``"<provider> <kernel> [<config label>]"``."""
    return f"{prov} {_kernel_name(d['kernel'])} [{_config_label(d)}]"


def _triton_tasks(providers: Sequence[str], archs: Sequence[int], select: str | None,
                  exclude: str | None) -> tuple[list[tuple], list[dict]]:
    """Import the providers: ([(prov, spec dict, expect, expect errors, arch)], [error rows])."""
    import importlib

    tasks, errors = [], []
    for prov in providers:
        mod_name, _, fn_name = prov.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name or "aot_compile_configs")
            entries = list(fn())
        except Exception as e:  # noqa: BLE001
            errors.append(dict(kernel=mod_name.rsplit(".", 1)[-1], source=prov, status=ERROR,
                               detail=f"{prov} failed: {type(e).__name__}: {e}"))
            continue
        for i, entry in enumerate(entries):
            try:
                d = _spec_fields(entry)
            except Exception as e:  # noqa: BLE001
                errors.append(dict(kernel="?", config=f"entry {i}", source=prov, status=ERROR, detail=str(e)))
                continue
            lab = _label(prov, d)
            if select and not re.search(select, lab):
                continue
            if exclude and re.search(exclude, lab):
                continue
            exp, errs = validate_expect(d.get("expect"))
            for arch in archs:
                if exp.get("archs") and arch not in exp["archs"]:
                    continue
                tasks.append((prov, d, exp, errs, arch))
    return tasks, errors


def _triton_worker(providers: Sequence[str], archs: Sequence[int], shard: int, nshards: int, out_path: str,
                   keep_dir: str | None, skip: set[int], select: str | None = None, exclude: str | None = None,
                   sass: bool = False) -> int:
    """Child process: enumerate the tasks (every provider entry x target), compile those with
    ``index % nshards == shard`` not in ``skip``; append JSON lines to ``out_path``:
    ``{"event": "tasks", "mine": [...]}`` first, then ``{"event": "start", "task": i}`` before and the
    row (with ``"task": i``) after each compile, so the parent can tell which compile crashed."""
    def emit(obj: dict) -> None:
        with open(out_path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        emit(dict(event="tasks", mine=[]))
        emit(dict(kernel="(all)", status=ERROR, detail="worker runs with TRITON_INTERPRET set"))
        return 1
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        emit(dict(event="tasks", mine=[]))
        if shard == 0:
            emit(dict(kernel="(all)", source=",".join(providers), status=SKIPPED,
                      detail=f"triton is not importable: {type(e).__name__}: {e}"))
        return 0
    cuobjdump = find_tool("cuobjdump")
    tasks, errors = _triton_tasks(providers, archs, select, exclude)
    mine = [i for i in range(len(tasks)) if i % nshards == shard and i not in skip]
    emit(dict(event="tasks", mine=mine, total=len(tasks)))
    if shard == 0 and not skip:
        for e in errors:
            emit(e)
    for t_i in mine:
        prov, d, exp, errs, arch = tasks[t_i]
        row = dict(task=t_i, kernel=_kernel_name(d["kernel"]), config=_config_label(d), source=prov, arch=arch,
                   expect=exp, expect_errors=errs, status=OK)
        emit(dict(event="start", task=t_i, kernel=row["kernel"], config=row["config"], arch=arch, source=prov))
        t0 = time.time()
        cap = _Capture()
        try:
            with cap:
                row.update(_compile_triton_one(d, arch, cuobjdump, keep_dir, sass=sass))
        except Exception as e:  # noqa: BLE001
            lines = _error_lines(cap.text)
            msg = f"{type(e).__name__}: {e}"
            missing = re.search(r"(ptxas|cuda\.h|libdevice).{0,80}(not found|cannot find|no such file)", msg, re.I | re.S)
            row.update(status=SKIPPED if missing else ERROR,
                       detail=(f"{'tool missing' if missing else 'compile failed'} for sm_{arch}: {msg}"
                               + (f" [{lines}]" if lines else ""))[:4000])
        row["seconds"] = round(time.time() - t0, 2)
        emit(row)
    return 0


_WORKER_BOOT = ("import sys, importlib.util as u\n"
                "s = u.spec_from_file_location('_sparsefast_kernel_report', sys.argv[1])\n"
                "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
                "sys.exit(m._worker_main(sys.argv[2:]))\n")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by a crash
    return out


def triton_report(archs: Sequence[int] = DEFAULT_ARCHS, providers: Sequence[str] | None = None,
                  jobs: int | None = None, timeout: float = 1800, keep_dir: str | None = None,
                  select: str | None = None, exclude: str | None = None, sass: bool = False,
                  max_restarts: int = 20) -> list[KernelResult]:
    """AOT-compile every entry of every provider (``"module:function"`` returning the
    ``aot_compile_configs()`` list; default :func:`default_triton_providers`) for each target in
    ``archs``, in ``jobs`` child processes without ``TRITON_INTERPRET``.

    ``select`` / ``exclude``: regexes (``re.search``) on ``"<provider> <kernel> [<config label>]"``
    (e.g. ``exclude=r"\b(fp32|fp16)\b"``). ``keep_dir`` keeps the PTX and cubins. ``sass`` adds SASS counts. A
    compile that kills its worker (an LLVM abort) becomes that row's error and the worker restarts
    after it; ``timeout`` bounds the whole run (unfinished compiles become error rows). Never raises
    for a kernel's failure: that is the row's status."""
    providers = list(providers if providers is not None else default_triton_providers())
    if not providers:
        return [evaluate(KernelResult("triton", 0, "(none)", status=SKIPPED,
                                      detail=f"no module of {TRITON_PACKAGE} defines aot_compile_configs()"))]
    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    rows: list[dict] = []
    deadline = time.time() + timeout
    with tempfile.TemporaryDirectory(prefix="sf-kreport-") as td:
        def launch(shard: int, attempt: int, skip: set[int]):
            out = os.path.join(td, f"shard{shard}.{attempt}.jsonl")
            skip_file = os.path.join(td, f"skip{shard}.{attempt}.json")
            Path(skip_file).write_text(json.dumps(sorted(skip)))
            # run this file by path (not ``-m sparsefast...``): the worker itself needs no package import
            cmd = [sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).resolve()), "--out", out,
                   "--archs", ",".join(map(str, archs)), "--shard", str(shard), "--nshards", str(jobs),
                   "--providers", ",".join(providers), "--skip-file", skip_file]
            cmd += ["--keep", keep_dir] if keep_dir else []
            cmd += ["--select", select] if select else []
            cmd += ["--exclude", exclude] if exclude else []
            cmd += ["--sass"] if sass else []
            log_path = os.path.join(td, f"shard{shard}.{attempt}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, cwd=td)
            return dict(proc=proc, out=out, log=log_path, shard=shard, attempt=attempt, skip=set(skip))

        running = [launch(s, 0, set()) for s in range(jobs)]
        while running:
            time.sleep(0.2)
            for w in list(running):
                rc = w["proc"].poll()
                timed_out = rc is None and time.time() > deadline
                if rc is None and not timed_out:
                    continue
                if timed_out:
                    w["proc"].kill()
                    w["proc"].wait()
                    rc = w["proc"].returncode
                running.remove(w)
                lines = _read_jsonl(w["out"])
                head = next((x for x in lines if x.get("event") == "tasks"), None)
                done = {x["task"] for x in lines if "task" in x and "event" not in x}
                started = [x for x in lines if x.get("event") == "start"]
                rows.extend(x for x in lines if "event" not in x)
                if rc == 0 and not timed_out:
                    continue
                log_tail = _error_lines(Path(w["log"]).read_text(errors="replace")) or \
                    Path(w["log"]).read_text(errors="replace")[-600:].strip()
                crashed = [x for x in started if x["task"] not in done]
                for x in crashed:
                    if timed_out:
                        rows.append(dict(task=x["task"], kernel=x["kernel"], config=x["config"], source=x["source"],
                                         arch=x["arch"], status=NOT_RUN,
                                         detail=f"not compiled: the {timeout:.0f} s budget ran out during it"))
                        continue
                    sig = ""
                    if rc is not None and rc < 0:
                        import signal
                        try:
                            sig = f", {signal.Signals(-rc).name}"
                        except ValueError:
                            pass
                    why = f"the compiler crashed (worker exit {rc}{sig})" + (f": {log_tail}" if log_tail else "")
                    rows.append(dict(task=x["task"], kernel=x["kernel"], config=x["config"], source=x["source"],
                                     arch=x["arch"], status=ERROR, detail=why[:4000]))
                mine = set(head["mine"]) if head else set()
                left = mine - done - {x["task"] for x in crashed}
                if timed_out:
                    if left or head is None:
                        rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=NOT_RUN,
                                         detail=(f"{len(left)} compiles not run: the {timeout:.0f} s budget ran out"
                                                 if head else "the time budget ran out before the kernels were listed")))
                    continue
                if head is None:
                    rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=ERROR,
                                     detail=f"compile worker failed before listing its kernels (exit {rc}): "
                                            f"{log_tail}"[:4000]))
                    continue
                if left and w["attempt"] < max_restarts:
                    running.append(launch(w["shard"], w["attempt"] + 1,
                                          w["skip"] | done | {x["task"] for x in crashed}))
                elif left:
                    rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=ERROR,
                                     detail=f"{len(left)} compiles not run: worker crashed {max_restarts + 1} times"))
    results = []
    for r in rows:
        kr = KernelResult("triton", int(r.get("arch", 0)), r.get("kernel", "?"), config=r.get("config", ""),
                          source=r.get("source", ""), status=r.get("status", ERROR), detail=r.get("detail", ""))
        for f in ("regs", "local_bytes", "static_smem", "dyn_smem", "threads", "sass", "ptx", "seconds"):
            if r.get(f) is not None:
                setattr(kr, f, r[f])
        kr.expect = r.get("expect") or {}
        if kr.ptx or kr.sass:
            kr.tensor_core = tensor_core_kind(kr.sass, kr.ptx)
            kr.vector_loads = vector_load_count(kr.sass, kr.ptx)
        if r.get("note"):
            kr.detail = (kr.detail + " " + r["note"]).strip()
        results.append(evaluate(kr, r.get("expect_errors") or ()))
    order = {a: i for i, a in enumerate(archs)}
    results.sort(key=lambda x: (x.source, order.get(x.arch, 99), x.kernel, x.config))
    return results


# ------------------------------------------------------------------------------------------------
# CUDA (csrc)
# ------------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _gencode(arch: int) -> tuple[str, str]:
    """(nvcc -gencode value, cuobjdump -arch name): sm_90 -> sm_90a (wgmma / setmaxnreg need it)."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    comp = f"compute_{arch}a" if arch >= 90 else f"compute_{arch}"
    return f"arch={comp},code={sm}", sm


def csrc_annotations(csrc: Path) -> list[tuple[str, dict, str]]:
    """Every ``// kernel-report:`` line under ``csrc`` (``*.cu``, ``*.cuh``, ``*.h``; not ``cpu/``)."""
    out = []
    for f in sorted(csrc.rglob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".hpp") and "cpu" not in f.relative_to(csrc).parts[:-1]:
            out += parse_annotations(f.read_text(errors="replace"), str(f.relative_to(csrc.parent)))
    return out


def _build_settings(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """(.cu sources, include dirs, nvcc flags) as :mod:`sparsefast._build_cuda` builds them."""
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_sf_build_cuda_report", root / "sparsefast" / "_build_cuda.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        srcs = [Path(s) for s in mod.sources(root) if s.endswith(".cu")]
        return srcs, list(mod.include_dirs(root)), [f for f in mod.NVCC_FLAGS if f != "-lineinfo"]
    except Exception:  # noqa: BLE001
        return (sorted((root / "csrc").glob("*.cu")), [str(root / "csrc" / "include")],
                ["-O3", "-std=c++17", "--expt-relaxed-constexpr"])


def _needs_torch(src: Path) -> bool:
    return re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", src.read_text(errors="replace")) is not None


def _rows_from_binary(backend_src: str, config: str, arch: int, usage: dict, sass: dict, threads: dict,
                      ptx_by_fn: dict[str, dict], ptxas: dict, annotations, note: str = "") -> list[KernelResult]:
    names = sorted(set(usage) | set(sass))
    dem = demangle(names)
    rows = []
    for n in names:
        u = usage.get(n, {})
        full = dem.get(n, n)
        exp, rx_errs = match_annotations(annotations, short_name(full))
        if exp == {} and full != n:
            exp, rx_errs = match_annotations(annotations, full)
        exp, errs = validate_expect(exp)
        if exp.get("archs") and arch not in exp["archs"]:
            # e.g. an sm_90-only kernel whose sm_80 build is an empty stub: report it, check nothing
            exp = {k: v for k, v in exp.items() if k in ("threads", "dyn_smem")}
        kr = KernelResult("cuda", arch, short_name(full), config=config, source=backend_src)
        kr.regs = u.get("REG")
        kr.local_bytes = u.get("STACK", 0) + u.get("LOCAL", 0) if u else None
        kr.static_smem = u.get("SHARED")
        kr.threads = threads.get(n)
        pv = ptxas.get(n)
        if pv:
            kr.spill_stores, kr.spill_loads = pv.get("spill_stores"), pv.get("spill_loads")
            if kr.regs is None:
                kr.regs = pv.get("regs")
        if n in sass:
            kr.sass = sass_features(sass[n])
        if n in ptx_by_fn:
            kr.ptx = ptx_by_fn[n]
        kr.tensor_core = tensor_core_kind(kr.sass, kr.ptx)
        kr.vector_loads = vector_load_count(kr.sass, kr.ptx)
        kr.expect = exp
        kr.detail = note
        rows.append(evaluate(kr, rx_errs + errs))
    return rows


def cuda_report(archs: Sequence[int] = DEFAULT_ARCHS, root: Path | None = None, jobs: int | None = None,
                nvcc: str | None = None, keep_dir: str | None = None, timeout: float = 900) -> list[KernelResult]:
    """Compile each csrc ``.cu`` with ``nvcc -cubin -Xptxas -v`` per target (``sm_80``, ``sm_90a``) and
    report every kernel in it. One row per (file, target) with status ``skipped`` when nvcc or
    cuobjdump is missing, ``error`` when the compile fails."""
    root = Path(root) if root is not None else _repo_root()
    csrc = root / "csrc"
    srcs, incs, flags = _build_settings(root)
    srcs = [s for s in srcs if s.exists()]
    if not srcs:
        return [evaluate(KernelResult("cuda", 0, "(none)", source=str(csrc), status=SKIPPED,
                                      detail="no csrc/*.cu sources"))]
    nvcc = nvcc or find_tool("nvcc")
    cuobjdump = find_tool("cuobjdump")
    annotations = csrc_annotations(csrc) if csrc.exists() else []
    rel = lambda s: os.path.relpath(s, root)  # noqa: E731
    if nvcc is None or cuobjdump is None:
        why = "nvcc not found (set CUDA_HOME)" if nvcc is None else "cuobjdump not found (CUDA toolkit or triton)"
        return [evaluate(KernelResult("cuda", a, "(all kernels)", config=s.name, source=rel(s), status=SKIPPED,
                                      detail=why)) for s in srcs for a in archs]
    extra_inc: list[str] = []
    if any(_needs_torch(s) for s in srcs):
        try:
            from torch.utils.cpp_extension import include_paths
            extra_inc = list(include_paths())
        except Exception:  # noqa: BLE001
            extra_inc = []

    def one(src: Path, arch: int) -> list[KernelResult]:
        gen, sm = _gencode(arch)
        with tempfile.TemporaryDirectory(prefix="sf-nvcc-") as td:
            cubin = os.path.join(td, f"{src.stem}.{sm}.cubin")
            cmd = [nvcc, "-cubin", f"-gencode={gen}", *flags, *[f"-I{i}" for i in incs + extra_inc],
                   "-Xptxas", "-v", "--keep", "--keep-dir", td, "-o", cubin, str(src)]
            try:
                res = _run(cmd, timeout=timeout, cwd=td)
            except subprocess.TimeoutExpired:
                return [evaluate(KernelResult("cuda", arch, "(all kernels)", config=src.name, source=rel(src),
                                              status=ERROR, detail=f"nvcc timed out after {timeout:.0f} s"))]
            if res.returncode != 0:
                err = res.stderr.strip()
                if _needs_torch(src) and re.search(r"(ATen|c10)/cuda|cuda_runtime_api|torch/.*No such file", err):
                    return [evaluate(KernelResult(
                        "cuda", arch, "(all kernels)", config=src.name, source=rel(src), status=SKIPPED,
                        detail="includes torch CUDA headers that this torch (CPU build) lacks; report the built "
                               "extension instead: --cuda-objects <dir or .so>"))]
                errs = [ln for ln in err.splitlines() if "error" in ln.lower()] or err.splitlines()[-5:]
                return [evaluate(KernelResult("cuda", arch, "(all kernels)", config=src.name, source=rel(src),
                                              status=ERROR, detail="nvcc failed: " + " | ".join(errs[:5])[:2000]))]
            ptxas = parse_ptxas_verbose(res.stderr + res.stdout)
            ptx_by_fn: dict[str, dict] = {}
            for p in Path(td).glob("*.ptx"):
                for name, body in ptx_functions(p.read_text(errors="replace")).items():
                    ptx_by_fn[name] = ptx_features(body)
            if keep_dir:
                Path(keep_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(cubin, Path(keep_dir) / Path(cubin).name)
                for p in Path(td).glob("*.ptx"):
                    shutil.copy(p, Path(keep_dir) / f"{src.stem}.{sm}.ptx")
            usage, sass, threads, err = cuobjdump_reads(cuobjdump, cubin)
            return _rows_from_binary(rel(src), src.name, arch, usage, sass, threads, ptx_by_fn, ptxas,
                                     annotations, err)

    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as ex:
        futs = [ex.submit(one, s, a) for s in srcs for a in archs]
        out = [r for f in futs for r in f.result()]
    return out


def cuda_objects_report(path: str | os.PathLike, archs: Sequence[int] = DEFAULT_ARCHS,
                        root: Path | None = None) -> list[KernelResult]:
    """Report the kernels of already built CUDA binaries: ``path`` is a ``.so``/``.o``/``.fatbin``/
    ``.cubin``, or a directory searched for them (its ``.so`` files when it has any, else its ``.o``,
    ``.fatbin``, ``.cubin`` files). Uses ``cuobjdump`` only (no spill byte counts: local memory and
    ``STL``/``LDL`` stand in). A library or object without code for a requested target is an error; a
    cubin is reported for its own target only. Expectations from the ``// kernel-report:`` lines of
    ``root/csrc``."""
    root = Path(root) if root is not None else _repo_root()
    p = Path(path)
    if p.is_dir():
        found = [f for f in sorted(p.rglob("*")) if f.is_file()]
        files = [f for f in found if f.suffix == ".so"] or \
            [f for f in found if f.suffix in (".o", ".fatbin", ".cubin")]
    else:
        files = [p] if p.exists() else []
    if not files:
        return [evaluate(KernelResult("cuda", 0, "(none)", source=str(p), status=ERROR,
                                      detail=f"no .so/.o/.fatbin/.cubin found at {p}"))]
    annotations = csrc_annotations(root / "csrc") if (root / "csrc").exists() else []
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        return [evaluate(KernelResult("cuda", a, "(all kernels)", config=f.name, source=str(f), status=SKIPPED,
                                      detail="cuobjdump not found (CUDA toolkit or triton)"))
                for f in files for a in archs]
    out: list[KernelResult] = []
    for f in files:
        listing = _run([cuobjdump, "--list-elf", str(f)], timeout=120)
        # nvcc 13 lists an sm_90a cubin inside a fatbinary as "<name>.N.sm_90.cubin", a bare cubin as "sm_90a"
        present = {int(x) for x in re.findall(r"\.sm_(\d+)a?\.cubin", listing.stdout)}
        bare = f.suffix == ".cubin"
        for arch in archs:
            if arch not in present:
                if not bare:
                    why = (f"cuobjdump cannot read {f.name}: {listing.stderr.strip()[:200]}" if listing.returncode
                           else f"no sm_{arch} code in {f.name} (has: "
                                f"{', '.join(f'sm_{a}' for a in sorted(present)) or 'none'})")
                    out.append(evaluate(KernelResult("cuda", arch, "(all kernels)", config=f.name, source=str(f),
                                                     status=ERROR, detail=why)))
                continue
            rows: list[KernelResult] = []
            err = ""
            for flag in ((None,) if bare else (f"sm_{arch}a", f"sm_{arch}") if arch >= 90 else (f"sm_{arch}",)):
                usage, sass, threads, err = cuobjdump_reads(cuobjdump, str(f), flag)
                rows = _rows_from_binary(str(f), f.name, arch, usage, sass, threads, {}, {}, annotations, err)
                if rows:
                    break
            out.extend(rows or [evaluate(KernelResult("cuda", arch, "(all kernels)", config=f.name, source=str(f),
                                                      status=ERROR, detail=f"no kernels read for sm_{arch}. {err}"))])
        if bare and not present & set(archs):
            out.append(evaluate(KernelResult("cuda", 0, "(all kernels)", config=f.name, source=str(f), status=SKIPPED,
                                              detail=f"{f.name} is for {', '.join(f'sm_{a}' for a in sorted(present)) or 'an unknown target'}, "
                                                     f"not a requested one")))
    return out


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _sm(r: KernelResult) -> str:
    return f"sm_{r.arch}" if r.arch else "-"


def _fmt_occ(r: KernelResult) -> str:
    o = r.occupancy or {}
    if o.get("occupancy") is None:
        return "-" if o.get("fits", True) else "no fit"
    return f"{o['occupancy']:.0%} {o['blocks']}b/{o['limiter']}"


def format_table(results: Sequence[KernelResult], width: int = 60) -> str:
    """A fixed-width table, one line per kernel and target, then the problems in full."""
    hdr = ["backend", "sm", "kernel / config", "regs", "spill", "smem KB", "thr", "occupancy", "MMA", "v128",
           "expect", "verdict"]
    lines = []
    for r in results:
        name = r.kernel if not r.config or r.backend == "cuda" else f"{r.kernel} [{r.config}]"
        if len(name) > width:
            name = name[: width - 1] + "~"
        exp = ",".join(k if v is True else f"{k}={v}" for k, v in r.expect.items()
                       if k not in ("threads", "dyn_smem", "archs")) or "-"
        if r.status != OK:
            lines.append([r.backend, str(r.arch or "-"), name, "", "", "", "", "", "", "", exp,
                          f"{r.verdict}: {r.detail.strip().splitlines()[0][:70] if r.detail.strip() else r.status}"])
            continue
        spill = "-" if r.spilled is None else str(r.spilled)
        smem = "-" if r.smem is None else f"{r.smem / 1024:.1f}"
        lines.append([r.backend, str(r.arch), name, "-" if r.regs is None else str(r.regs), spill, smem,
                      "-" if r.threads is None else str(r.threads), _fmt_occ(r), r.tensor_core or "none",
                      "-" if r.vector_loads is None else str(r.vector_loads), exp, r.verdict])
    w = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    w[-1] = len(hdr[-1])
    fmt = lambda cols: "  ".join(c.ljust(w[i]) if i < len(cols) - 1 else c for i, c in enumerate(cols))  # noqa: E731
    out = [fmt(hdr), fmt(["-" * x for x in w])] + [fmt(l) for l in lines]
    probs = [(r, p) for r in results for p in r.problems]
    if probs:
        out.append("")
        out.append("problems:")
        for r, (sev, text) in probs:
            label = r.kernel + (f" [{r.config}]" if r.config else "")
            out.append(f"  {sev.upper():5s} {r.backend} {_sm(r)} {label}: {text}")
    skipped = [r for r in results if r.status == SKIPPED]
    if skipped:
        out.append("")
        out.append("skipped (tool missing, not an error):")
        for r in skipped:
            out.append(f"  {r.backend} {_sm(r)} {r.kernel} {r.config}: {r.detail}")
    not_run = [r for r in results if r.status == NOT_RUN]
    if not_run:
        out.append("")
        out.append("not run (time budget spent, not an error; raise --timeout or -j):")
        for r in not_run:
            out.append(f"  {r.backend} {_sm(r)} {r.kernel} {r.config}: {r.detail}")
    return "\n".join(out)


def summary(results: Sequence[KernelResult]) -> dict[str, int]:
    c = Counter(r.verdict for r in results)
    return dict(rows=len(results), ok=c["ok"], warn=c["warn"], fail=c["FAIL"], skip=c["skip"],
                compiled=sum(r.status == OK for r in results),
                missing_tool=sum(r.status == SKIPPED for r in results),
                not_run=sum(r.status == NOT_RUN for r in results))


def to_json(results: Sequence[KernelResult], archs: Sequence[int], path: str | os.PathLike) -> None:
    """Write the report (all rows, their measured fields and problems, tool versions) to ``path``."""
    def ver(tool: str | None, args=("--version",)) -> str | None:
        if not tool:
            return None
        try:
            lines = _run([tool, *args], timeout=30).stdout.strip().splitlines()
            return lines[-1] if lines else None
        except Exception:  # noqa: BLE001
            return None
    try:
        import importlib.metadata as im
        tv = im.version("triton")
    except Exception:  # noqa: BLE001
        tv = None
    doc = dict(schema=1, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), archs=list(archs),
               limits={a: dataclasses.asdict(l) for a, l in LIMITS.items()},
               tools=dict(triton=tv, nvcc=ver(find_tool("nvcc")), cuobjdump=ver(find_tool("cuobjdump"))),
               summary=summary(results), results=[r.to_json() for r in results])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def exit_code(results: Sequence[KernelResult], require_compiled: bool = False, strict: bool = False) -> int:
    """1 when any row FAILs (or, with ``require_compiled``, a tool was missing or nothing compiled;
    with ``strict``, a row has a warning or was not run for lack of time), else 0."""
    s = summary(results)
    if s["fail"]:
        return 1
    if require_compiled and (s["missing_tool"] or not s["compiled"]):
        return 1
    if strict and s["not_run"]:
        return 1
    if strict and s["warn"]:
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# child-process entry point
# ------------------------------------------------------------------------------------------------
def _worker_main(argv: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="sparsefast.kernel_report worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", required=True)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--nshards", type=int, default=1)
    ap.add_argument("--providers", required=True)
    ap.add_argument("--skip-file", default=None)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--select", default=None)
    ap.add_argument("--exclude", default=None)
    ap.add_argument("--sass", action="store_true")
    a = ap.parse_args(argv)
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
    skip = set(json.loads(Path(a.skip_file).read_text())) if a.skip_file else set()
    return _triton_worker([p for p in a.providers.split(",") if p], [int(x) for x in a.archs.split(",")],
                          a.shard, a.nshards, a.out, a.keep, skip, a.select, a.exclude, a.sass)


if __name__ == "__main__":
    from sparsefast.cli.kernels import main as _main
    sys.exit(_main(sys.argv[1:]))
