"""Timing: interleaved rounds, median with min-max, the faster dense dtype as baseline."""
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

# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_plan(fn: Callable, budget_s: float = 0.25) -> tuple[int, int, int]:
    """(warmup_rounds, rounds, iterations) for CPU timing, after one timed warm-up call: about
    ``budget_s`` seconds of rounds (3..50), each round ``iterations`` calls so a round lasts >= ~1 ms."""
    t1 = time.perf_counter()
    fn()
    t = max(time.perf_counter() - t1, 1e-7)
    iters = max(1, int(math.ceil(1e-3 / t)))
    rounds = int(min(50, max(3, budget_s / (t * iters))))
    return 0, rounds, iters


def time_call(fn: Callable, device: str, budget_s: float = 0.25) -> float:
    """Median seconds per call: ``triton.testing.do_bench`` (CUDA events) on GPU, else a median of
    repeated timed rounds after warm-up."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=max(20, int(budget_s * 200)), return_mode="median") * 1e-3
    _, rounds, iters = cpu_plan(fn, budget_s)
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


MIN_ROUNDS = 5


# ------------------------------------------------------------------------------------------------
# results (the one record every timing and report function reads and writes)
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    case: Case
    impl: str
    status: str                 # "ok" (timed), "checked" (correct, not timed), "skip"
    median_s: float | None = None
    reason: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    min_s: float | None = None  # over the timed rounds (python -m sparsefast bench), else None
    max_s: float | None = None
    rounds: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["case"] = asdict(self.case) | {"id": self.case.id}
        return d


def _sampler(fn: Callable, device: str) -> Callable[[], float]:
    """One timing sample (seconds per call) of ``fn``, already warmed up: GPU ``do_bench`` median of a
    short burst (CUDA events, L2 flushed); CPU enough back-to-back calls for >= ~1 ms, averaged."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda: do_bench(fn, warmup=2, rep=25, return_mode="median") * 1e-3
    t1 = time.perf_counter()
    fn()
    iters = max(1, int(math.ceil(1e-3 / max(time.perf_counter() - t1, 1e-7))))

    def sample() -> float:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    return sample


def time_interleaved(fns: dict[str, Callable], device: str, rounds: int = 7,
                     budget_s: float | None = None) -> dict[str, list[float]]:
    """Per-call seconds of every callable over ``rounds`` (>= 5) interleaved rounds, each round running
    every callable once, after warm-up. ``budget_s`` (optional): more rounds (up to 50) while the rounds
    would take less than that many seconds per callable."""
    rounds = max(MIN_ROUNDS, rounds)
    for fn in fns.values():
        fn()
    _sync(device)
    samplers = {n: _sampler(fn, device) for n, fn in fns.items()}
    out: dict[str, list[float]] = {n: [] for n in fns}
    first = {n: s() for n, s in samplers.items()}  # warm-up sample, not kept
    if budget_s:
        rounds = max(rounds, min(50, int(budget_s / max(max(first.values()), 1e-9))))
    for _ in range(rounds):
        for n, s in samplers.items():
            out[n].append(s())
    return out


def _alt_dense_dtype(c: Case) -> str | None:
    return {"float32": "bfloat16", "bfloat16": "float32"}.get(c.dtype)


def first_call(c: Case, impl: str) -> "tuple[Callable, dict, Any] | Result":
    """``(runner, its first output, its inputs)`` of ``impl`` on fresh inputs of case ``c``, or the skip
    ``Result`` saying why it cannot run here."""
    p = prepare(c)
    inp = inputs(c, p)
    try:
        fn = make_runner(c, impl, p, inp)
        return fn, fn(), inp
    except Skip as e:
        return Result(c, impl, "skip", reason=str(e))
    except (RuntimeError, NotImplementedError) as e:
        return Result(c, impl, "skip", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def run_cases(c: Case, names: list[str], *, rounds: int = 7, budget_s: float | None = None,
              dense_dtypes: bool = True) -> list[Result]:
    """Check every implementation of case ``c`` on fresh inputs, then time them together, rounds
    interleaved. With ``dense_dtypes`` the dense path in the other of float32/bfloat16 is timed too
    (impl ``dense@<dtype>``) so the table's baseline is the faster dense dtype; when its first call is
    over 20x the case's dense call and over 0.2 s it gets that one call only (noted in its reason)."""
    from dataclasses import replace

    results: dict[str, Result] = {}
    fns: dict[str, Callable] = {}
    for n in names:
        first = first_call(c, n)
        if isinstance(first, Result):
            results[n] = first
            continue
        fn, out, inp = first
        try:
            errs = check(c, n, out, inp)
        except AssertionError as e:
            print(f"bench: WRONG RESULT: {e}", file=sys.stderr)
            results[n] = Result(c, n, "skip", reason=f"wrong result: {e}")
            continue
        del out
        results[n] = Result(c, n, "checked", errors=errs)
        fns[n] = fn
    alt = _alt_dense_dtype(c) if dense_dtypes and "dense" in fns else None
    if alt is not None:
        ca = replace(c, dtype=alt)
        pa = prepare(ca)
        fa = make_runner(ca, "dense", pa, inputs(ca, pa))
        fa()
        fns["dense"]()
        _sync(c.device)
        t = time.perf_counter(); fns["dense"](); _sync(c.device); t_main = time.perf_counter() - t  # noqa: E702
        t = time.perf_counter(); fa(); _sync(c.device); t_alt = time.perf_counter() - t  # noqa: E702
        key = f"dense@{alt}"
        if t_alt > 20 * t_main and t_alt > 0.2:
            results[key] = Result(c, key, "ok", t_alt, reason="1 call only (> 20x slower)", min_s=t_alt, max_s=t_alt,
                                  rounds=1)
        else:
            fns[key] = fa
            results[key] = Result(c, key, "checked")
    samples = time_interleaved(fns, c.device, rounds, budget_s) if fns else {}
    for n, s in samples.items():
        r = results[n]
        r.status, r.median_s, r.min_s, r.max_s, r.rounds = "ok", statistics.median(s), min(s), max(s), len(s)
    return list(results.values())


