"""The measured row of the kernel report and its checks: the GPU limits and the occupancy model
(:func:`occupancy`), the statuses, :class:`KernelResult` (one kernel compiled for one target) and
:func:`evaluate` (occupancy and problems from the measured fields and the ``expect`` dict)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .parsers import store_widths

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
    wgmma_serialized: list[str] = dataclasses.field(default_factory=list)  # ptxas notes (CUDA, -Xptxas -v log)
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
    for note in r.wgmma_serialized:  # always an error: ptxas put a wait after every wgmma (no MMA overlap)
        problems.append([ERROR, f"ptxas serialized the wgmma pipeline: {note}"])
    if e.get("packed_stores"):
        sw = store_widths(r.sass, r.ptx)
        if sw is not None and sw[1] == 0:
            problems.append([ERROR, f"no 32-bit-or-wider global stores ({sw[0]} 8/16-bit scalar stores only; "
                                    "expected packed pairs / vectors)"])
    if e.get("vector_loads") and not r.vector_loads:
        problems.append(["warn", "no 128-bit global loads (ld.global.v4 / 16-byte cp.async / TMA)"])
    mo = e.get("min_occupancy")
    occ = r.occupancy.get("occupancy")
    if mo and occ is not None and occ < mo:
        problems.append(["warn", f"occupancy {occ:.0%} < expected {mo:.0%} (limited by {r.occupancy['limiter']})"])
    r.problems = problems
    return r
