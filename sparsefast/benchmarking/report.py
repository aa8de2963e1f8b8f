"""Results: tables (text / markdown / roofline), environment, JSON and the plot."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .cases import *  # noqa: F401,F403
from .runners import *  # noqa: F401,F403
from .timing import *  # noqa: F401,F403

def run_case(c: Case, impl: str, *, timed: bool = True, budget_s: float = 0.25) -> Result:
    """Check ``impl`` on fresh inputs against the reference, then time it (``timed``)."""
    first = first_call(c, impl)
    if isinstance(first, Result):
        return first
    fn, out, inp = first
    errs = check(c, impl, out, inp)
    del out
    if not timed:
        return Result(c, impl, "checked", errors=errs)
    s = time_interleaved({impl: fn}, c.device, MIN_ROUNDS, budget_s)[impl]
    return Result(c, impl, "ok", statistics.median(s), errors=errs, min_s=min(s), max_s=max(s), rounds=len(s))


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


_DT_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _baseline(c: Case, rs: dict[str, "Result"]) -> tuple[str | None, "Result | None"]:
    """(label, result) of the fastest timed dense path of a case: ``dense`` (the case's dtype) or
    ``dense@<dtype>`` (the other dense dtype, timed by ``run_cases``)."""
    cands = [(n, r) for n, r in rs.items() if (n == "dense" or n.startswith("dense@")) and r.status == "ok"
             and r.median_s]
    if not cands:
        return None, None
    n, r = min(cands, key=lambda nr: nr[1].median_s)
    dt = c.dtype if n == "dense" else n.split("@", 1)[1]
    return f"dense {_DT_SHORT.get(dt, dt)}", r


def _ms_range(r: "Result") -> str:
    s = f"{r.median_s * 1e3:.3f}"
    if r.min_s is not None and r.max_s is not None and r.rounds and r.rounds > 1:
        s += f" ({r.min_s * 1e3:.3f}–{r.max_s * 1e3:.3f})"
    return s


def _table_rows(results: list[Result], hardware: str | None):
    """Per case: baseline (faster dense dtype) ms, ratio vs it per impl (sf: also vs torch sparse),
    roofline bound."""
    from sparsefast import roofline

    by_case: dict[str, dict[str, Result]] = {}
    order: list[Case] = []
    for r in results:
        if r.case.id not in by_case:
            by_case[r.case.id] = {}
            order.append(r.case)
        by_case[r.case.id][r.impl] = r
    two_dense = any(r.impl.startswith("dense@") for r in results)
    impl_order: list[str] = []
    for r in results:
        if (r.impl != "dense" or two_dense) and not r.impl.startswith("dense@") and r.impl not in impl_order:
            impl_order.append(r.impl)
    on_gpu = any(c.device == "cuda" for c in order)
    rows = []
    for c in order:
        rs = by_case[c.id]
        label, base = _baseline(c, rs)
        dense_t = base.median_s if base else None
        tsp = [rs[n].median_s for n in ("torch-2:4", "torch-csr") if n in rs and rs[n].status == "ok"]
        best_torch = min(tsp) if tsp else None
        cells = []
        for n in impl_order:
            r = rs.get(n)
            if r is None:
                cells.append("")
            elif r.status == "skip":
                cells.append("skip")
            elif r.status == "checked" or r.median_s is None or dense_t is None:
                cells.append("ok")
            else:
                s = _fmt_ratio(dense_t / r.median_s)
                if r.min_s and r.max_s and r.rounds > 1:
                    s += f" [{_fmt_ratio(dense_t / r.max_s)}–{_fmt_ratio(dense_t / r.min_s)}]"
                if n.startswith("sf:") and best_torch:
                    s += f" ({_fmt_ratio(best_torch / r.median_s)})"
                cells.append(s)
        bound = ""
        if c.device == "cuda":
            try:
                bound = _fmt_ratio(roofline.predict(c.roofline_dict(), hardware or "H100").ratio)
            except ValueError:
                bound = "?"
        alt = [r for n, r in rs.items() if n.startswith("dense@") and r is not base and r.reason]
        base_s = f"{label} {_ms_range(base)}" if base else "—"
        if alt:
            base_s += f"; {alt[0].impl.split('@')[1]}: {alt[0].median_s * 1e3:.1f} ms, {alt[0].reason}"
        rows.append((c, base_s, cells, bound))
    return impl_order, rows, on_gpu


def format_table(results: list[Result], hardware: str | None = None, markdown: bool = False) -> str:
    """The speedup table: per case the baseline — the faster dense dtype, named, median ms (min–max) — and
    each implementation's speedup over it, [range over the rounds: baseline median / impl max–min]; for
    sparsefast backends the speedup over the faster torch sparse path in parentheses; on GPU the roofline
    bound (``sparsefast.roofline``) of the case."""
    if not results:
        return "(no benchmark results)"
    impl_order, rows, on_gpu = _table_rows(results, hardware)
    head = ["op", "kind", "shape", "dtype", "sparsity", "baseline ms (min–max)", *impl_order]
    if on_gpu:
        head.append(f"bound ({hardware or 'H100'})")
    body = [[c.op, c.kind, c.shape_label, _DT_SHORT.get(c.dtype, c.dtype), c.pattern_label, dms,
             *cells, *([b] if on_gpu else [])] for c, dms, cells, b in rows]
    rounds = sorted({r.rounds for r in results if r.status == "ok" and r.rounds > 1})
    note = ("cells: speedup over the baseline = the faster dense dtype (named), median of "
            + (f"{'/'.join(map(str, rounds))} interleaved rounds [min–max]" if rounds else "the timed rounds")
            + " (sf: in parentheses, over the faster torch sparse path); skip = cannot run that case; "
            "ok = checked, not timed")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ["", note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append(note)
    return "\n".join(lines)


def markdown_table(results: list[Result], hardware: str | None = None) -> str:
    return format_table(results, hardware, markdown=True)


def roofline_table(cs: list[Case], hardware: str = "H100") -> str:
    """Predicted roofline bounds alone (no GPU needed): one row per GPU shape/dtype/pattern, one column
    per kind, each ``ratio (dense bound/sparse bound)`` with m = memory-bound, c = compute-bound."""
    from sparsefast import roofline

    rows: dict[tuple, dict[str, str]] = {}
    kinds: list[str] = []
    for c in cs:
        p = roofline.predict(c.roofline_dict(), hardware)
        key = (c.op, c.shape_label, c.dtype, c.pattern_label)
        b = lambda s: {"memory": "m", "compute": "c"}.get(s, "~")  # noqa: E731
        rows.setdefault(key, {})[c.kind] = f"{_fmt_ratio(p.ratio)} ({b(p.dense_bound)}/{b(p.sparse_bound)})"
        if c.kind not in kinds:
            kinds.append(c.kind)
        if c.kind == "step":  # + the optimizer update of the weight: dense N*K vs kept nnz elements
            for opt in ("sgd", "adamw"):
                q = roofline.predict({**c.roofline_dict(), "kind": "train", "optimizer": opt}, hardware)
                kd = f"train+{opt}"
                rows[key][kd] = f"{_fmt_ratio(q.ratio)} ({b(q.dense_bound)}/{b(q.sparse_bound)})"
                if kd not in kinds:
                    kinds.append(kd)
    head = ["op", "shape", "dtype", "sparsity", *kinds]
    body = [[*k, *[v.get(kd, "") for kd in kinds]] for k, v in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
                     + [f"best speedup over dense on {hardware} (sparsefast.roofline); (m|c dense / m|c sparse): "
                        "memory- or compute-bound"])


def environment(command: str | None = None) -> dict[str, Any]:
    """Date, machine (CPU model / GPU), versions and the command line, for RESULTS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not importable"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "command": command or " ".join(sys.argv), "hardware_bound": _hw_name(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _hw_name() -> str | None:
    from sparsefast import roofline
    return roofline.detect_hardware()


def save_json(path: str, results: list[Result], env: dict[str, Any], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"environment": env, "results": [r.to_json() for r in results], **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_json(path: str) -> tuple[dict, list[Result]]:
    with open(path) as f:
        data = json.load(f)
    res = []
    for r in data["results"]:
        cd = {k: v for k, v in r["case"].items() if k != "id"}
        res.append(Result(Case(**cd), r["impl"], r["status"], r["median_s"], r.get("reason", ""), r.get("errors", {}),
                          r.get("min_s"), r.get("max_s"), r.get("rounds", 0)))
    return data, res


def save_plot(path: str, results: list[Result]) -> str | None:
    """Speedup over dense vs sparsity (geometric mean over the shapes of a shape set), one panel per
    (op, kind, shape set), one line per implementation. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    dense = {r.case.id: r.median_s for r in results if r.impl == "dense" and r.status == "ok"}
    groups: dict[tuple, dict[str, dict[float, list[float]]]] = {}
    for r in results:
        if r.impl == "dense" or r.status != "ok" or not dense.get(r.case.id):
            continue
        c = r.case
        key = (c.op, c.kind, c.shapes, c.dtype)
        x = 100 * c.sparsity + (0.8 if c.pattern == "2:4" else 0.0)  # 2:4 drawn just right of 50 %
        groups.setdefault(key, {}).setdefault(r.impl, {}).setdefault(x, []).append(dense[c.id] / r.median_s)
    if not groups:
        return None
    keys = sorted(groups)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for impl, pts in groups[key].items():
            xs = sorted(pts)
            ys = [math.exp(statistics.fmean(math.log(v) for v in pts[x])) for x in xs]
            ax.plot(xs, ys, marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(" / ".join(key), fontsize=9)
        ax.set_xlabel("sparsity % (2:4 at 50.8)")
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


