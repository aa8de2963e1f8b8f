"""Roofline numbers (sparsefast.roofline) against the bounds docs/PERF.md states."""
from __future__ import annotations

import math

import pytest
import torch

from sparsefast import roofline as rl


def test_24_format_bytes_bf16():
    # 2:4 bf16 = kept values (1 B per dense element) + 2-bit index per kept value (0.125 B)
    assert rl.weight_nbytes(4096, 4096, torch.bfloat16, "2:4") == 4096 * 4096 * 1.125
    assert rl.weight_nbytes(4096, 4096, torch.bfloat16, None) == 4096 * 4096 * 2
    assert rl.weight_nbytes(4096, 4096, torch.bfloat16, "2:4") / rl.weight_nbytes(4096, 4096, torch.bfloat16, None) <= 0.57


def test_unstructured_format_bytes():
    b = rl.weight_nbytes(4096, 4096, torch.bfloat16, "unstructured", 0.1)
    if rl.UNSTRUCTURED_FORMAT == "bitmap+values":
        assert b == pytest.approx(4096 * 4096 * (0.2 + 0.125) + 4 * 4097, rel=1e-6)
    assert b / (4096 * 4096 * 2) <= 0.3  # docs/PERF.md: unstructured 90% <= 0.3x dense bytes
    with pytest.raises(ValueError):
        rl.weight_nbytes(8, 8, torch.float32, "unstructured")


def test_24_memory_bound_ceiling_178():
    for M in (1, 16, 64):
        p = rl.predict_linear("fwd", M, 4096, 4096, dtype=torch.bfloat16, pattern="2:4")
        assert p.dense_bound == "memory" and p.sparse_bound == "memory"
        assert 1.70 < p.ratio <= 2 / 1.125 + 1e-9
    assert rl.predict_linear("fwd", 1, 4096, 4096, pattern="2:4").ratio == pytest.approx(1.78, abs=0.01)


def test_24_compute_bound_ceiling_2x():
    for K, N in ((4096, 4096), (4096, 14336), (14336, 4096)):
        for kind in ("fwd", "dx", "dw", "step"):
            p = rl.predict_linear(kind, 8192, K, N, dtype=torch.bfloat16, pattern="2:4", hardware="H100")
            assert p.dense_bound == "compute"
            assert p.ratio == pytest.approx(2.0, rel=1e-6)


def test_unstructured_90_memory_bound_le_62():
    p = rl.predict_linear("fwd", 16, 4096, 4096, dtype=torch.bfloat16, pattern="unstructured", density=0.1)
    assert 5.5 < p.ratio <= 6.2
    p95 = rl.predict_linear("fwd", 16, 4096, 4096, dtype=torch.bfloat16, pattern="unstructured", density=0.05)
    assert p95.ratio > p.ratio


def test_step_is_sum_of_kernels_and_dense_dw_option():
    kw = dict(dtype=torch.bfloat16, pattern="unstructured", density=0.1)
    parts = [rl.predict_linear(k, 64, 4096, 4096, **kw) for k in ("fwd", "dx", "dw")]
    step = rl.predict_linear("step", 64, 4096, 4096, **kw)
    assert step.dense_s == pytest.approx(sum(p.dense_s for p in parts))
    assert step.sparse_s == pytest.approx(sum(p.sparse_s for p in parts))
    dense_dw = rl.predict_linear("dw", 64, 4096, 4096, dw_writes="dense", **kw)
    assert dense_dw.ratio < 1.0 < parts[2].ratio  # writing the whole gradient cannot beat dense


def test_conv_resnet_layer_and_hardware():
    p = rl.predict_conv("fwd", 256, 64, 56, 56, 64, (3, 3), padding=1, dtype=torch.bfloat16, pattern="2:4")
    assert p.dense_flops == 2.0 * 256 * 56 * 56 * 64 * 64 * 9
    assert 1.0 < p.ratio <= 2.0
    a = rl.predict_linear("fwd", 16, 4096, 4096, pattern="2:4", hardware="A100")
    assert a.hardware.startswith("A100") and a.ratio == pytest.approx(
        rl.predict_linear("fwd", 16, 4096, 4096, pattern="2:4", hardware="H100").ratio, rel=1e-9)
    with pytest.raises(ValueError):
        rl.predict_linear("fwd", 1, 8, 8, hardware="TPU")


def test_sparse_peak_is_twice_dense():
    # the model uses "kept FLOPs at the dense peak"; for 2:4 fp16/bf16 that equals the 2x sparse tensor-core rate
    for hw in rl.HARDWARE.values():
        for k in ("fp16", "bf16"):
            assert hw.sparse_tflops[k] == pytest.approx(2 * hw.dense_tflops[k], rel=1e-3)


PERF_TARGETS = [  # (pattern, density, M, kind, target) from docs/PERF.md's H100 table
    ("2:4", None, 8192, "fwd", 1.6), ("2:4", None, 64, "fwd", 1.5), ("unstructured", 0.3, 64, "fwd", 2.0),
    ("unstructured", 0.1, 8192, "fwd", 1.35), ("unstructured", 0.1, 64, "fwd", 4.0),
    ("unstructured", 0.05, 8192, "fwd", 1.8), ("2:4", None, 8192, "step", 1.3), ("2:4", None, 64, "step", 1.4),
    ("unstructured", 0.3, 64, "step", 1.8), ("unstructured", 0.1, 64, "step", 3.5),
]


@pytest.mark.parametrize("pattern,density,M,kind,target", PERF_TARGETS)
def test_perf_targets_are_below_the_bound(pattern, density, M, kind, target):
    p = rl.predict_linear(kind, M, 4096, 4096, dtype=torch.bfloat16, pattern=pattern, density=density)
    assert target <= p.ratio + 1e-9, f"target {target} above the roofline bound {p.ratio:.2f}"


def test_predict_from_case_dict_and_table():
    c = {"op": "linear", "kind": "fwd", "M": 16, "K": 4096, "N": 4096, "dtype": "bfloat16", "pattern": "2:4"}
    assert rl.predict(c).ratio == rl.predict_linear("fwd", 16, 4096, 4096, pattern="2:4").ratio
    cc = {"op": "conv", "kind": "step", "B": 8, "C": 64, "H": 14, "W": 14, "O": 64, "kernel": [3, 3],
          "padding": 1, "dtype": "float16", "pattern": "unstructured", "density": 0.1}
    assert math.isfinite(rl.predict(cc).ratio)
    assert "H100" in rl.ceiling_table()


def test_training_step_counts_optimizer_bytes_on_kept_values():
    """kind="train" adds the optimizer's element passes: dense over N*K, kept-values layers over nnz only,
    so a memory-bound training step's ratio grows towards 1/density as the optimizer dominates."""
    from sparsefast.roofline import OPTIMIZER_PASSES, predict_linear
    step = predict_linear("step", 16, 4096, 4096, pattern="unstructured", density=0.1)
    for opt in ("sgd", "adamw"):
        tr = predict_linear("train", 16, 4096, 4096, pattern="unstructured", density=0.1, optimizer=opt)
        extra_dense = OPTIMIZER_PASSES[opt] * 4096 * 4096 * 2
        assert tr.dense_bytes - step.dense_bytes == extra_dense
        assert tr.sparse_bytes - step.sparse_bytes == OPTIMIZER_PASSES[opt] * round(0.1 * 4096 * 4096) * 2
        assert tr.ratio > step.ratio
    assert predict_linear("train", 16, 4096, 4096, optimizer="none").ratio == predict_linear(
        "step", 16, 4096, 4096).ratio


def test_bench_roofline_table_shows_training_step_with_optimizer():
    from sparsefast.cli import bench
    cs = [c for c in bench.cases("cuda") if c.kind == "step"][:3]
    text = bench.roofline_table(cs)
    assert "train+sgd" in text and "train+adamw" in text
