#!/usr/bin/env python
"""Append the last ``pytest benchmarks`` run (benchmarks/out/results.json) to benchmarks/RESULTS.md.

Usage: python benchmarks/append_results.py [--json PATH] [--results PATH] [--note TEXT]

RESULTS.md is written only by this script (never by hand): each run adds a section with the date,
machine (GPU or CPU model, cores, load), torch/triton versions, the exact command, the speedup table,
the end-to-end table and the skip reasons.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparsefast.cli import bench as H  # noqa: E402

HEADER = ("# Benchmark results\n\nAppended by `python benchmarks/append_results.py` after `pytest benchmarks` "
          "(see README.md); never edited by hand. Cells: speedup over dense (sparsefast backends: in "
          "parentheses, over the faster torch sparse path); `skip` = that implementation cannot run the case.\n")


def _e2e_md(rows: list[dict]) -> str:
    if not rows:
        return ""
    dense = {r["block"]: r for r in rows if r["variant"] == "dense"}
    out = ["| block | variant | backend | step ms | × dense | peak MB | peak vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get(r["block"])
        sp = f"{d['step_s'] / r['step_s']:.2f}×" if d and d.get("step_s") and r.get("step_s") else "—"
        mem = f"{r['peak_mb'] / d['peak_mb']:.2f}×" if d and d.get("peak_mb") and r.get("peak_mb") is not None else "—"
        ms = f"{r['step_s'] * 1e3:.2f}" if r.get("step_s") else "—"
        pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "—"
        out.append(f"| {r['block']} | {r['variant']} | {r.get('backend', '')} | {ms} | {sp} | {pk} | {mem} |")
    metric = rows[0].get("mem_metric", "")
    return "\n".join(out) + (f"\n\nPeak memory: {metric}." if metric else "")


def render(data: dict, results: list, note: str | None = None) -> str:
    env = data["environment"]
    machine = env.get("gpu") or f"{env.get('cpu')} ({env.get('cores')} cores, torch threads {env.get('torch_threads')})"
    lines = [f"## {env['date']} — {machine}", "",
             f"- torch {env['torch']}, triton {env['triton']}, python {env.get('python', '?')}"
             + (f", load average (1 min) at the end {env['load_avg_1m']}" if env.get("load_avg_1m") is not None else ""),
             f"- command: `{env['command']}`"]
    if note:
        lines.append(f"- note: {note}")
    train = data.get("train_step") or []
    if results or not train:
        timed = sum(r.status == "ok" for r in results)
        lines.append(f"- {len({r.case.id for r in results})} per-op cases, {timed} timed, "
                     f"{sum(r.status == 'checked' for r in results)} checked only, {sum(r.status == 'skip' for r in results)} skipped")
    if train:
        lines.append(f"- training-step suite: {len(train)} rows, {sum(r.get('status') == 'ok' for r in train)} timed, "
                     f"{sum(r.get('status') == 'checked' for r in train)} checked only, "
                     f"{sum(r.get('status') not in ('ok', 'checked') for r in train)} not run")
    if results:
        lines += ["", H.markdown_table(results, env.get("hardware_bound"))]
    elif not data.get("train_step") and not data.get("e2e"):
        lines += ["", "(no per-op results)"]
    e2e = _e2e_md(data.get("e2e", []))
    if e2e:
        lines += ["", "End-to-end training step (fwd + bwd + SGD step):", "", e2e]
    if train:
        from benchmarks.train_table import format_text
        lines += ["", format_text(train, markdown=True)]
    skipped = sorted({f"{r.impl}: {r.reason}" for r in results if r.status == "skip"})
    if skipped:
        lines += ["", "<details><summary>skip reasons</summary>", ""] + [f"- {s[:300]}" for s in skipped] + ["", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(HERE, "out", "results.json"))
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--note", default=None, help="one line added to the section (e.g. what changed)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.json):
        print(f"append_results: {a.json} not found; run `pytest benchmarks` first", file=sys.stderr)
        return 1
    data, results = H.load_json(a.json)
    section = render(data, results, a.note)
    new = not os.path.isfile(a.results) or os.path.getsize(a.results) == 0
    with open(a.results, "a") as f:
        if new:
            f.write(HEADER)
        f.write("\n" + section)
    print(f"appended {len(results)} per-op results and {len(data.get('train_step') or [])} training-step rows "
          f"to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
