"""``pytest benchmarks``: options, result collection, the speedup table, JSON and plot.

Options (see README.md): ``--sf-full`` (all shape sets / dtypes), ``--sf-dtypes``, ``--sf-shapes``,
``--sf-ops``, ``--sf-kinds``, ``--sf-patterns``, ``--sf-impls``, ``--sf-budget`` (seconds of timing
per implementation and case), ``--sf-out`` (output dir, default benchmarks/out),
``--sf-benchmark-tables`` (also show pytest-benchmark's own per-group tables).
"""
from __future__ import annotations

import os

import pytest
import torch

from sparsefast.cli import bench as H

OUT_DIR = os.path.join(os.path.dirname(__file__), "out")
#: filled by the tests: list of bench.Result; plus end-to-end rows
RESULTS: list = []
E2E: list[dict] = []
#: filled by test_train_step.py: one dict per (block, optimizer, variant); see train_table.py
TRAIN: list[dict] = []


def pytest_addoption(parser):
    g = parser.getgroup("sparsefast benchmarks")
    g.addoption("--sf-full", action="store_true", help="all shape sets and dtypes (default: fast subset)")
    g.addoption("--sf-dtypes", default=None, help="comma list: float32,bfloat16,float16")
    g.addoption("--sf-shapes", default=None, help="comma list of shape sets (memory-bound,compute-bound,resnet50; "
                                                   "cpu-issue,cpu-small,cpu-medium)")
    g.addoption("--sf-ops", default=None, help="linear,conv")
    g.addoption("--sf-kinds", default=None, help="fwd,dx,step")
    g.addoption("--sf-patterns", default=None, help="2:4,50%,70%,90%,95%")
    g.addoption("--sf-impls", default=None, help="comma list of implementations to run")
    g.addoption("--sf-budget", type=float, default=0.1, help="seconds of timing per implementation and case")
    g.addoption("--sf-out", default=OUT_DIR, help="directory for results.json and speedup.png")
    g.addoption("--sf-train-rounds", type=int, default=7,
                help="test_train_step.py: timed rounds per cell (>= 5; every variant once per round)")
    g.addoption("--sf-benchmark-tables", action="store_true", help="also print pytest-benchmark's own tables")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "e2e: end-to-end block benchmarks")
    if not config.getoption("--sf-benchmark-tables", default=False) and hasattr(config.option, "benchmark_quiet"):
        config.option.benchmark_quiet = True  # our table replaces pytest-benchmark's one-table-per-case output


def _csv(s):
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def selected_cases(config) -> list:
    o = config.getoption
    return H.cases(DEVICE, full=o("--sf-full"), dtypes=_csv(o("--sf-dtypes")), shapes=_csv(o("--sf-shapes")),
                   ops=_csv(o("--sf-ops")), kinds=_csv(o("--sf-kinds")), patterns=_csv(o("--sf-patterns")))


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cs = selected_cases(metafunc.config)
        names = _csv(metafunc.config.getoption("--sf-impls")) or H.impls(DEVICE)
        params = [(c, n) for c in cs for n in names]
        metafunc.parametrize("bench_case,impl", params, ids=[f"{c.id}-{n}" for c, n in params])


@pytest.fixture
def budget(request) -> float:
    return request.config.getoption("--sf-budget")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS and not E2E and not TRAIN:
        return
    tr = terminalreporter
    hw = H._hw_name()
    out = config.getoption("--sf-out")
    env = H.environment("pytest " + " ".join(config.invocation_params.args))
    tr.section(f"sparsefast speedups — {env['gpu'] or env['cpu']} — torch {env['torch']}, triton {env['triton']}")
    if RESULTS:
        tr.write_line(H.format_table(RESULTS, hw))
        skipped = sorted({f"{r.impl}: {r.reason}" for r in RESULTS if r.status == "skip"})
        if skipped:
            tr.write_line("skipped (implementation: reason):")
            for s in skipped[:25]:
                tr.write_line("  " + s[:200])
            if len(skipped) > 25:
                tr.write_line(f"  ... {len(skipped) - 25} more (see results.json)")
    if E2E:
        tr.write_line("")
        tr.write_line(format_e2e(E2E))
    if TRAIN:
        from .train_table import format_text
        tr.write_line("")
        tr.write_line(format_text(TRAIN))
    if DEVICE != "cuda":
        gpu_cases = [c for c in H.cases("cuda") if c.kind in ("fwd", "dx", "step")]
        tr.write_line("")
        tr.write_line("no GPU here: roofline bounds predicted for the GPU cases (sparsefast.roofline, H100 bf16):")
        tr.write_line(H.roofline_table(gpu_cases, "H100"))
    try:
        path = os.path.join(out, "results.json")
        H.save_json(path, RESULTS, env, {"e2e": E2E, "train_step": TRAIN, "device": DEVICE})
        png = H.save_plot(os.path.join(out, "speedup.png"), RESULTS)
        tr.write_line(f"\nwrote {path}" + (f" and {png}" if png else " (no plot: matplotlib missing or nothing timed)")
                      + "; append to benchmarks/RESULTS.md with: python benchmarks/append_results.py")
    except OSError as e:  # never fail the run over the report files
        tr.write_line(f"could not write results: {e}")


def format_e2e(rows: list[dict]) -> str:
    head = ["block", "variant", "backend", "step ms", "× dense", "peak MB", "peak vs dense", "memory metric"]
    dense = {(r["block"]): r for r in rows if r["variant"] == "dense"}
    body = []
    for r in rows:
        d = dense.get(r["block"])
        sp = (f"{d['step_s'] / r['step_s']:.2f}×" if d and r.get("step_s") else "—")
        mem = (f"{r['peak_mb'] / d['peak_mb']:.2f}×" if d and r.get("peak_mb") and d.get("peak_mb") else "—")
        body.append([r["block"], r["variant"], r.get("backend", ""),
                     f"{r['step_s'] * 1e3:.2f}" if r.get("step_s") else "—", sp,
                     f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "—", mem, r.get("mem_metric", "")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join(["end-to-end training step (fwd + bwd + SGD step):", fmt(head),
                      "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])
