"""Formatting of the end-to-end training-step suite (``test_train_step.py``) for the pytest summary and for
``append_results.py`` (RESULTS.md). Pure functions of the recorded rows (dicts), no torch import.

A row: ``block, opt, variant, backend, status`` ("ok" timed, "checked" correctness only, "skip"),
``samples_s`` (per-round seconds per step), ``peak_mb``/``state_mb`` (AdamW cases), ``reason``; one row
per (block, opt) has ``baseline=True`` (the faster dense dtype).
"""
from __future__ import annotations

import statistics

MEM_NOTE = ("peak MB (measured in a fresh process per variant): CPU peak RSS (VmHWM, reset after the model and optimizer are built) during two training "
            "steps above the RSS before the model was built (glibc mmap threshold 64 KiB, so freed memory is "
            "returned); GPU: max_memory_allocated above the memory in use before the build. state MB: bytes of "
            "parameters + gradients + optimizer state + module buffers (masks, indices) after a step — exact, not "
            "sampled; it excludes activations and any backend caches that are not buffers.")


def cell(samples: list[float] | None) -> str:
    if not samples:
        return "—"
    ms = [s * 1e3 for s in samples]
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}–{max(ms):.2f})"


def median(samples: list[float] | None) -> float | None:
    return statistics.median(samples) if samples else None


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["block", "opt", "variant", "backend", "step ms median (min–max)", "× baseline", "× sparseprop",
            "peak MB", "peak × base", "state MB", "state × base"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["block"], r["opt"]), []).append(r)
    body = []
    for (block, opt), rs in groups.items():
        base = next((r for r in rs if r.get("baseline")), None)
        sp = next((r for r in rs if r["variant"].startswith("sparseprop") and r["status"] == "ok"), None)
        bt, st = median(base.get("samples_s")) if base else None, median(sp.get("samples_s")) if sp else None
        for r in rs:
            t = median(r.get("samples_s"))
            if r["status"] == "skip":
                timing, vb, vs = "skip", "—", "—"
            elif r["status"] == "checked" or t is None:
                timing, vb, vs = "ok (not timed)", "—", "—"
            else:
                timing = cell(r["samples_s"]) + (f" [{r['note']}]" if r.get("note") else "")
                vb = "baseline" if r is base else _ratio(bt, t)
                vs = _ratio(st, t) if sp is not None and r is not sp and not r["variant"].startswith("dense") else "—"
            pk, sm = r.get("peak_mb"), r.get("state_mb")
            body.append([block, opt, r["variant"], r.get("backend", ""), timing, vb, vs,
                         f"{pk:.1f}" if pk is not None else "—",
                         _ratio(pk, base.get("peak_mb")) if base and r is not base else ("1.00×" if pk is not None else "—"),
                         f"{sm:.1f}" if sm is not None else "—",
                         _ratio(sm, base.get("state_mb")) if base and r is not base else ("1.00×" if sm is not None else "—")])
    return head, body


def format_text(rows: list[dict], markdown: bool = False) -> str:
    if not rows:
        return ""
    head, body = table_rows(rows)
    rounds = sorted({len(r["samples_s"]) for r in rows if r.get("samples_s")})
    title = ("end-to-end training step (forward + backward + optimizer.step() + zero_grad()), all variants in one "
             f"process, rounds interleaved ({'/'.join(map(str, rounds)) or 'no'} timed rounds after warm-up); "
             "baseline = the faster dense dtype of that block/optimizer (named in the row marked baseline); "
             "× = baseline time / variant time (> 1 is faster)")
    skips = sorted({f"{r['variant']}: {r['reason']}" for r in rows if r["status"] == "skip" and r.get("reason")})
    fresh = any(r.get("mem_method") == "fresh-process" for r in rows)
    mem = MEM_NOTE if fresh else MEM_NOTE.replace(
        "peak MB (measured in a fresh process per variant)",
        "peak MB (measured IN the benchmark process after the timing rounds — inflated by the allocator reusing "
        "heap chunks, superseded by the fresh-process method)")
    notes = [mem] + [f"skipped {s}" for s in skips]
    if markdown:
        lines = [title + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines + [""] + [f"- {n}" for n in notes])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([title + ":", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body] + notes)
