"""Output of the kernel report: the fixed-width table, the summary counts, the JSON file and the exit
status."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from .model import LIMITS, NOT_RUN, OK, SKIPPED, KernelResult
from .tools import _find_tool, _run

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
               tools=dict(triton=tv, nvcc=ver(_find_tool("nvcc")), cuobjdump=ver(_find_tool("cuobjdump"))),
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
