"""Per-op speed: Linear and Conv2d, forward / frozen-weight backward (dX) / training step, every
pattern and shape set, dense vs torch sparse vs sparseprop vs every sparsefast backend.

Each test is one (case, implementation): it builds fresh random inputs (seeded per case), checks the
implementation's outputs against the masked-dense reference (a wrong result fails the test), then
times it — pytest-benchmark rounds on CPU (median), ``triton.testing.do_bench`` median on GPU.
An implementation that cannot run a case is skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

from sparsefast.cli import bench as H

from .conftest import DEVICE, RESULTS


def test_op(bench_case, impl, benchmark, budget):
    c = bench_case
    p = H.prepare(c)
    inp = H.inputs(c, p)
    try:
        fn = H.make_runner(c, impl, p, inp)
        out = fn()
    except H.Skip as e:
        RESULTS.append(H.Result(c, impl, "skip", reason=str(e)))
        pytest.skip(str(e))
    except (RuntimeError, NotImplementedError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        RESULTS.append(H.Result(c, impl, "skip", reason=reason))
        pytest.skip(reason)
    errs = H.check(c, impl, out, inp)  # AssertionError (test failure) on a wrong result
    del out
    benchmark.group = c.id
    benchmark.extra_info.update(case=c.id, impl=impl, max_rel_err=errs)
    if benchmark.disabled:  # --benchmark-disable: correctness only
        benchmark(fn)
        RESULTS.append(H.Result(c, impl, "checked", errors=errs))
        return
    if DEVICE == "cuda":
        median = H.time_call(fn, "cuda", budget)  # CUDA events, L2 flushed, median

        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=3, iterations=1)  # pytest-benchmark's record (host wall time)
        benchmark.extra_info["cuda_median_ms"] = median * 1e3
    else:
        _, rounds, iters = H.cpu_plan(fn, budget)
        benchmark.pedantic(fn, rounds=rounds, iterations=iters, warmup_rounds=0)  # fn already ran twice
        median = benchmark.stats.stats.median
    RESULTS.append(H.Result(c, impl, "ok", median, errors=errs))
