"""Speed table: dense vs torch sparse vs every available sparsefast backend on this machine.

Also the library behind ``pytest benchmarks`` (benchmarks/): case lists, the implementations compared,
the correctness check against the masked-dense reference, timing, tables, JSON and the plot.

Implementations compared per case (each skipped with a reason where it cannot run the case):

* ``dense``       ``F.linear`` / ``F.conv2d`` on the masked weight as a plain dense tensor (cuBLAS/cuDNN/MKL).
* ``torch-2:4``   GPU, 2:4 Linear: ``F.linear(x, to_sparse_semi_structured(W))``; dX uses a second
                  semi-structured copy of ``(W*M)ᵀ`` (2:4 benchmark masks are transposable so it exists);
                  dW is the dense product times the mask.
* ``torch-csr``   Linear: ``torch.sparse.mm(W_csr, xᵀ)ᵀ``; dX with a CSR copy of ``(W*M)ᵀ``; dW with
                  ``torch.sparse.sampled_addmm`` (a CSR SDDMM). Hand-composed: torch has no CSR backward.
* ``sparseprop``  CPU float32 peer (PyPI ``sparseprop``: its SparseLinear / SparseConv2d), if importable.
* ``sf:<name>``   ``sparsefast.ops.sparse_linear/sparse_conv2d(..., backend=name)`` for ``auto`` and every
                  backend in ``sparsefast.backends.available()`` (Triton under ``TRITON_INTERPRET`` is
                  never timed: it is a correctness mode).

Kinds: ``fwd`` (inference forward), ``dx`` (frozen-weight backward: weight.requires_grad False, only
dX), ``step`` (fwd + dX + masked dW; the weight's version counter is bumped before each step as an
optimizer update would, so backends re-pack once per step as in training).
Timing (``python -m sparsefast bench``): per case all implementations are checked, warmed up, then timed in
``--rounds`` (>= 5, default 7) interleaved rounds (round r runs every implementation once); a cell is the
median with its min–max over the rounds (one round: GPU ``triton.testing.do_bench`` median with CUDA events
and L2 flushed; CPU enough calls for >= ~1 ms, averaged). The baseline of a float32/bfloat16 case is the
faster of dense float32 and dense bfloat16 on that shape (named in the table: on CPUs without bf16 units
dense fp32 wins). Under ``pytest benchmarks`` the CPU numbers are pytest-benchmark's stats instead.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

# the library lives in sparsefast.benchmarking; re-exported here for existing imports (benchmarks/)
from ..benchmarking.cases import *  # noqa: F401,F403
from ..benchmarking.cases import DENSITIES, TOL, Case, Skip, cases, impls, prepare  # noqa: F401
from ..benchmarking.runners import *  # noqa: F401,F403
from ..benchmarking.timing import *  # noqa: F401,F403
from ..benchmarking.report import *  # noqa: F401,F403
from ..benchmarking import cases as _cases, report as _report, runners as _runners, timing as _timing
from ..benchmarking.report import _hw_name

__all__ = ["Case", "Result", "cases", "impls", "prepare", "check", "time_call", "run_case", "format_table",
           "markdown_table", "environment", "save_json", "save_plot", "main", "Skip", "DENSITIES"]


def __getattr__(name: str):  # private helpers of the library modules (tests and benchmarks use a few)
    for mod in (_cases, _runners, _timing, _report):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(name)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _csv(s: str | None) -> list[str] | None:
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


_DTYPES = ("float32", "bfloat16", "float16")
_OPS = ("linear", "conv")
_KINDS = ("fwd", "dx", "step")
_PLAIN_IMPLS = ("dense", "torch-2:4", "torch-csr", "sparseprop")


def _bad_filter(a) -> str | None:
    """The first command-line filter value that names nothing (one line), or None."""
    shapes = (*GPU_LINEAR, *GPU_CONV_FULL, "cpu-issue", "cpu-small", "cpu-medium")
    patterns = {"2:4", "unstructured", *(f"{round(100 * (1 - d))}%" for d in DENSITIES)}
    for opt, val, known in (("--dtypes", a.dtypes, _DTYPES), ("--shapes", a.shapes, shapes), ("--ops", a.ops, _OPS),
                            ("--kinds", a.kinds, _KINDS), ("--patterns", a.patterns, sorted(patterns))):
        if val is None:
            continue
        items = _csv(val)
        if not items:
            return f"argument {opt}: empty list (choose from {', '.join(known)})"
        unknown = [t for t in items if t not in known]
        if unknown:
            return (f"argument {opt}: invalid choice{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
    if a.impls is not None:
        from sparsefast import backends
        items = _csv(a.impls)
        if not items:
            return "argument --impls: empty list"
        for t in items:
            if t in _PLAIN_IMPLS:
                continue
            if t.startswith("sf:"):
                try:
                    backends.check_requested(t[3:])
                    continue
                except ValueError as e:
                    return f"argument --impls: {t!r}: {e}"
            return (f"argument --impls: invalid choice {t!r} (choose from {', '.join(_PLAIN_IMPLS)}, sf:auto, "
                    f"sf:<backend>)")
    if getattr(a, "rounds", MIN_ROUNDS) < MIN_ROUNDS:
        return f"argument --rounds: at least {MIN_ROUNDS}, got {a.rounds}"
    if a.budget is not None and not (a.budget > 0 and math.isfinite(a.budget)):
        return f"argument --budget: must be a positive number of seconds, got {a.budget}"
    return None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsefast bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all shape sets/dtypes (default: a fast subset)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", help="comma list: float32,bfloat16,float16")
    ap.add_argument("--shapes", help="comma list of shape sets: memory-bound,compute-bound,resnet50 (GPU); "
                                     "cpu-issue,cpu-small,cpu-medium (CPU)")
    ap.add_argument("--ops", help="linear,conv")
    ap.add_argument("--kinds", help="fwd,dx,step")
    ap.add_argument("--patterns", help="2:4,50%%,70%%,90%%,95%%")
    ap.add_argument("--impls", help="comma list of implementations (default: all here: "
                                    "dense,torch-2:4,torch-csr,sparseprop,sf:auto,sf:<backend>...)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per case, every implementation once per "
                                                             "round (interleaved), at least 5 (default 7)")
    ap.add_argument("--budget", type=float, default=None,
                    help="optional: more rounds (up to 50) while they take under this many seconds per implementation")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--roofline", action="store_true", help="print only the predicted roofline bounds of the GPU cases")
    a = ap.parse_args(argv)
    bad = _bad_filter(a)
    if bad:
        from . import usage_error
        return usage_error(ap.prog, bad)
    if a.roofline:
        print(roofline_table(cases("cuda", full=a.full, dtypes=_csv(a.dtypes), shapes=_csv(a.shapes), ops=_csv(a.ops),
                                   kinds=_csv(a.kinds), patterns=_csv(a.patterns)), _hw_name() or "H100"))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        from . import usage_error
        return usage_error(ap.prog, "argument --device: cuda requested but no CUDA device is available here")
    default_fast = not (a.full or a.shapes or a.kinds or a.patterns or a.ops)
    cs = cases(a.device, full=a.full, dtypes=_csv(a.dtypes), shapes=_csv(a.shapes), ops=_csv(a.ops),
               kinds=_csv(a.kinds), patterns=_csv(a.patterns))
    if default_fast:  # fast default: forward and training step, 2:4 and 90 %, first shape set
        first = cs[0].shapes if cs else None
        cs = [c for c in cs if c.kind in ("fwd", "step") and c.pattern_label in ("2:4", "90%")
              and (c.shapes == first or a.device == "cpu" and c.shapes == "cpu-small")]
        if a.device == "cpu":
            cs = [c for c in cs if c.shapes == "cpu-small" or (c.op == "linear" and c.M in (1, 64))]
    names = _csv(a.impls) or impls(a.device)
    results: list[Result] = []
    t0 = time.time()
    for c in cs:
        results.extend(run_cases(c, names, rounds=a.rounds, budget_s=a.budget))
    env = environment("python -m sparsefast bench " + " ".join(argv))
    hw = _hw_name()
    print(f"sparsefast bench — {env['gpu'] or env['cpu']} — torch {env['torch']}, triton {env['triton']} "
          f"— {len(cs)} cases in {time.time() - t0:.0f}s")
    print(format_table(results, hw))
    skipped = sorted({f"{r.impl}: {r.reason}" for r in results if r.status == "skip"})
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped[:20]) + (f"\n  ... {len(skipped) - 20} more" if len(skipped) > 20 else ""))
    if a.json:
        save_json(a.json, results, env)
        print(f"wrote {a.json}")
    return 0

