"""Roofline bounds: the best speedup over dense that a sparse kernel *design* can reach on a GPU.

For one benchmark case (Linear or Conv2d; forward, frozen-weight backward = dX, masked dW, or a
full training step = fwd + dX + dW) this module counts

* the bytes each kernel must move between HBM and the chip, from the real sizes of the packed formats
  (dense operands are read/written once; the weight is read in its packed form), and
* the FLOPs it must do (dense: ``2·M·K·N``; sparse: only the kept products, ``2·M·K·N·density``,
  which for 2:4 in fp16/bf16 is exactly the dense count at the 2× sparse tensor-core rate),

and bounds each kernel's time by ``max(bytes / HBM bandwidth, FLOPs / peak FLOP/s)``.
The predicted ratio is ``t_dense / t_sparse`` for the same case: an *upper bound* (no launch latency,
perfect reuse, perfect zero skipping). Measured ratios are printed beside it by ``pytest benchmarks``.

Packed formats (bytes per *dense* weight element of ``e`` bytes, density ``d``):

* **N:M** (``"2:4"``): kept values ``(n/m)·e`` + metadata ``ceil(log2 m)`` bits per kept value
  (the cuSPARSELt / CUTLASS 2:4 layout: 2-bit indices). 2:4 bf16: ``1 + 0.125 = 1.125`` B, so a
  memory-bound 2:4 kernel is at most ``2/1.125 = 1.78×`` dense.
* **unstructured**: the format defined in :mod:`sparsefast.formats.unstructured` when that module
  provides ``roofline_nbytes(rows, cols, nnz, elem_bytes) -> int`` (its own exact count); otherwise
  **bitmap + values**: 1 bit per dense element + ``d·e`` value bytes + one int32 offset per row
  (bf16 at 90 %: ``0.125 + 0.2 = 0.325`` B → at most ``2/0.325 = 6.15×``).

Masked dW (an SDDMM) reads ``dY`` and ``X`` and writes only the kept gradient values plus reads the
mask structure — i.e. it moves one packed-format's worth of weight bytes, like forward and dX
(``dw_writes="dense"`` models a kernel that writes the whole dense-shaped gradient instead).
dX of an N:M layer assumes the design reads a packed copy of ``(W⊙M)ᵀ`` (transposable mask or a
second packing), so it moves the same weight bytes as the forward.

A **training step** (``kind="train"``) is the layer's ``step`` plus the optimizer update of its weight,
an element-wise, memory-bound pass over the Parameter and its state: :data:`OPTIMIZER_PASSES` tensor
reads/writes per element (SGD with momentum: read w, g, buf, write w, buf = 5; AdamW: read w, g, m, v,
write w, m, v = 7). Dense layers update ``N·K`` elements; kept-values layers update only the ``nnz`` kept
ones (their Parameter *is* the kept values), which is what makes sparse training steps faster end to end.

Convolutions are implicit GEMMs: ``M = B·Ho·Wo``, ``N = out_channels``, ``K = in_channels/groups·kh·kw``;
activations are read/written once in their real (not im2col) size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .backends.base import conv_output_hw
from .masks import Pattern, parse_pattern

__all__ = ["Hardware", "HARDWARE", "Prediction", "weight_nbytes", "predict", "predict_linear", "predict_conv",
           "detect_hardware", "ceiling_table", "UNSTRUCTURED_FORMAT"]


@dataclass(frozen=True)
class Hardware:
    """Peak numbers of one GPU. FLOP/s in TFLOP/s (1e12), bandwidth in GB/s (1e9 B/s)."""

    name: str
    hbm_gbps: float
    #: dense tensor-core (fp16/bf16), TF32 tensor-core and plain FP32 (CUDA core) peaks
    dense_tflops: dict[str, float] = field(default_factory=dict)
    #: 2:4 sparse tensor-core peaks (fp16/bf16 and TF32)
    sparse_tflops: dict[str, float] = field(default_factory=dict)
    l2_mb: float = 0.0
    source: str = ""

    def peak(self, dtype: torch.dtype, sparse24: bool = False) -> float:
        """Peak FLOP/s (1/s) for ``dtype``: fp16/bf16 on tensor cores; fp32 on CUDA cores (PyTorch's
        default, TF32 off)."""
        key = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "fp32")
        table = self.sparse_tflops if sparse24 and key in self.sparse_tflops else self.dense_tflops
        return table[key] * 1e12


#: Ceilings (SXM parts, boost clocks) from NVIDIA's datasheets:
#: A100: "NVIDIA A100 Tensor Core GPU" datasheet (2021), 80 GB SXM column — HBM2e 2,039 GB/s,
#:   BF16/FP16 tensor 312 TFLOPS (624 with sparsity), TF32 156 (312), FP32 19.5; L2 40 MB.
#: H100: "NVIDIA H100 Tensor Core GPU" datasheet (2023), SXM column — HBM3 3.35 TB/s,
#:   BF16/FP16 tensor 1,979 TFLOPS *with sparsity* = 989.4 dense, TF32 989 (494.7 dense), FP32 67; L2 50 MB.
#: H200: "NVIDIA H200 Tensor Core GPU" datasheet (2024), SXM — HBM3e 4.8 TB/s, compute as H100 SXM.
HARDWARE: dict[str, Hardware] = {
    "A100": Hardware("A100-SXM4-80GB", 2039.0,
                     {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
                     {"fp16": 624.0, "bf16": 624.0, "tf32": 312.0}, 40.0,
                     "NVIDIA A100 datasheet (80GB SXM)"),
    "H100": Hardware("H100-SXM5-80GB", 3350.0,
                     {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
                     {"fp16": 1978.9, "bf16": 1978.9, "tf32": 989.4}, 50.0,
                     "NVIDIA H100 datasheet (SXM5)"),
    "H200": Hardware("H200-SXM-141GB", 4800.0,
                     {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
                     {"fp16": 1978.9, "bf16": 1978.9, "tf32": 989.4}, 50.0,
                     "NVIDIA H200 datasheet (SXM)"),
}


def _unstructured_hook():
    """``roofline_nbytes`` from the unstructured-format module, if that module defines one."""
    try:
        from .formats import unstructured as _u  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - module absent or broken: fall back to bitmap+values
        return None
    fn = getattr(_u, "roofline_nbytes", None)
    return fn if callable(fn) else None


#: Name of the unstructured format the bounds use ("bitmap+values" unless formats.unstructured
#: provides its own byte count).
UNSTRUCTURED_FORMAT = "sparsefast.formats.unstructured" if _unstructured_hook() else "bitmap+values"


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_nbytes(rows: int, cols: int, dtype: torch.dtype, pattern: "str | Pattern | None",
                  density: float | None = None) -> int:
    """Bytes of a ``rows × cols`` weight (reduction dim = ``cols``) in its packed format.

    ``pattern=None`` (or density 1 unstructured) means dense. Otherwise the pattern's kept values
    (:meth:`~sparsefast.masks.Pattern.kept_count`; a pattern fixing its density, N:M, ignores ``density``)
    plus the index bytes of its own packed format (:meth:`~sparsefast.masks.Pattern.index_bytes`; N:M:
    a ``ceil(log2 m)``-bit index per kept value); a pattern without one (unstructured, block) is counted
    in the unstructured format: see the module docstring (bitmap + values by default)."""
    e = _elem(dtype)
    numel = rows * cols
    if pattern is None:
        return numel * e
    pat = parse_pattern(pattern)
    if pat.density is None and density is None:
        raise ValueError(f"weight_nbytes: pattern {pat} needs density= (it does not fix its density)")
    nnz = pat.kept_count(numel, density)
    idx = pat.index_bytes(rows, cols, nnz)
    if idx is not None:
        return nnz * e + idx
    hook = _unstructured_hook()
    if hook is not None:
        return int(hook(rows, cols, nnz, e))
    return nnz * e + math.ceil(numel / 8) + 4 * (rows + 1)


@dataclass(frozen=True)
class Prediction:
    """Roofline of one case: seconds for dense and sparse, their ratio, and what bounds each."""

    dense_s: float
    sparse_s: float
    dense_bound: str   # "memory", "compute" or "mixed" (a step whose kernels differ)
    sparse_bound: str
    dense_bytes: int
    sparse_bytes: int
    dense_flops: float
    sparse_flops: float
    hardware: str

    @property
    def ratio(self) -> float:
        """Best achievable ``t_dense / t_sparse``."""
        return self.dense_s / self.sparse_s


Kind = Literal["fwd", "dx", "dw", "step", "train"]

#: element passes of one optimizer step over a weight (see the module docstring)
OPTIMIZER_PASSES = {"none": 0, "sgd": 5, "adamw": 7}


def _kernel(nbytes: float, flops: float, hw: Hardware, peak: float) -> tuple[float, str]:
    tm, tc = nbytes / (hw.hbm_gbps * 1e9), flops / peak
    return (tm, "memory") if tm >= tc else (tc, "compute")


def _gemm_prediction(kind: str, M: int, K: int, N: int, x_elems: int, y_elems: int, dtype: torch.dtype,
                     pattern: "str | Pattern", density: float | None, hw: Hardware,
                     dw_writes: str, optimizer: str = "adamw") -> Prediction:
    pat = parse_pattern(pattern)
    d = pat.density if pat.density is not None else density  # the pattern's own density (N:M) wins
    if d is None or not (0.0 < d <= 1.0):
        raise ValueError(f"roofline: {pat} cases need a density in (0, 1], got {density!r}")
    e = _elem(dtype)
    w_dense = N * K * e
    w_sparse = weight_nbytes(N, K, dtype, pat, d)
    flops = 2.0 * M * K * N
    peak = hw.peak(dtype)
    parts = ["fwd", "dx", "dw"] if kind in ("step", "train") else [kind]
    if kind not in ("fwd", "dx", "dw", "step", "train"):
        raise ValueError(f"roofline: kind must be fwd, dx, dw, step or train, got {kind!r}")
    if optimizer not in OPTIMIZER_PASSES:
        raise ValueError(f"roofline: optimizer must be one of {', '.join(OPTIMIZER_PASSES)}, got {optimizer!r}")
    td = ts = 0.0
    bd: set[str] = set()
    bs: set[str] = set()
    byd = bys = 0
    for p in parts:
        act = (x_elems + y_elems) * e  # fwd: read x, write y; dx: read dy, write dx; dw: read dy and x
        dense_b = act + w_dense
        if p == "dw" and dw_writes == "dense":
            sparse_b = act + w_dense + (w_sparse - int(d * N * K) * e)  # whole gradient + mask structure
        else:
            sparse_b = act + w_sparse
        t, b = _kernel(dense_b, flops, hw, peak)
        td += t
        bd.add(b)
        t, b = _kernel(sparse_b, flops * d, hw, peak)
        ts += t
        bs.add(b)
        byd += dense_b
        bys += sparse_b
    if kind == "train" and OPTIMIZER_PASSES[optimizer]:
        passes = OPTIMIZER_PASSES[optimizer]
        kept = int(round(d * N * K)) if d < 1.0 else N * K
        for nbytes, acc in ((passes * N * K * e, "d"), (passes * kept * e, "s")):
            t = nbytes / (hw.hbm_gbps * 1e9)
            if acc == "d":
                td, byd = td + t, byd + nbytes
                bd.add("memory")
            else:
                ts, bys = ts + t, bys + nbytes
                bs.add("memory")
    one = lambda s: s.pop() if len(s) == 1 else "mixed"  # noqa: E731
    return Prediction(td, ts, one(bd), one(bs), byd, bys, flops * len(parts), flops * d * len(parts), hw.name)


def _hw(hardware: "str | Hardware") -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    key = str(hardware).upper()
    for k, v in HARDWARE.items():
        if key.startswith(k):
            return v
    raise ValueError(f"roofline: unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")


def predict_linear(kind: Kind, M: int, K: int, N: int, *, dtype: torch.dtype = torch.bfloat16,
                   pattern: "str | Pattern" = "2:4", density: float | None = None,
                   hardware: "str | Hardware" = "H100", dw_writes: str = "kept",
                   optimizer: str = "adamw") -> Prediction:
    """Bound for a Linear with input ``(M, K)`` and weight ``(N, K)``. ``kind``: ``fwd``, ``dx``
    (frozen-weight backward), ``dw`` (masked weight gradient), ``step`` (fwd + dx + dw) or ``train``
    (``step`` + the ``optimizer`` update of the weight: ``"sgd"``, ``"adamw"``)."""
    return _gemm_prediction(kind, M, K, N, M * K, M * N, dtype, pattern, density, _hw(hardware), dw_writes,
                            optimizer)


def predict_conv(kind: Kind, batch: int, in_channels: int, height: int, width: int, out_channels: int,
                 kernel_size: tuple[int, int], *, stride: int = 1, padding: int = 0, dilation: int = 1,
                 groups: int = 1, dtype: torch.dtype = torch.bfloat16, pattern: "str | Pattern" = "2:4",
                 density: float | None = None, hardware: "str | Hardware" = "H100",
                 dw_writes: str = "kept", optimizer: str = "adamw") -> Prediction:
    """Bound for a Conv2d on an input ``(batch, in_channels, height, width)`` as an implicit GEMM."""
    kh, kw = kernel_size
    ho, wo = conv_output_hw(height, width, (kh, kw), stride, padding, dilation)
    M, N, K = batch * ho * wo, out_channels, in_channels // groups * kh * kw
    return _gemm_prediction(kind, M, K, N, batch * in_channels * height * width, batch * out_channels * ho * wo,
                            dtype, pattern, density, _hw(hardware), dw_writes, optimizer)


def predict(case: dict, hardware: "str | Hardware" = "H100") -> Prediction:
    """Bound for a benchmark case dict (the keys ``sparsefast.cli.bench`` uses: ``op`` "linear"/"conv",
    ``kind``, ``dtype`` (str), ``pattern``, ``density``, and ``M,K,N`` or the conv geometry)."""
    dtype = getattr(torch, str(case["dtype"]).replace("torch.", ""))
    common = dict(dtype=dtype, pattern=case["pattern"], density=case.get("density"), hardware=hardware,
                  optimizer=case.get("optimizer", "adamw"))
    if case["op"] == "linear":
        return predict_linear(case["kind"], case["M"], case["K"], case["N"], **common)
    return predict_conv(case["kind"], case["B"], case["C"], case["H"], case["W"], case["O"],
                        tuple(case["kernel"]), stride=case.get("stride", 1), padding=case.get("padding", 0),
                        groups=case.get("groups", 1), **common)


def detect_hardware() -> str | None:
    """``"A100"``/``"H100"``/``"H200"`` for the current CUDA device, ``None`` without one (or unknown)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for k in ("H200", "H100", "A100"):
        if k in name:
            return k
    return None


def ceiling_table() -> str:
    """The hardware table as markdown."""
    rows = ["| GPU | HBM GB/s | bf16/fp16 dense TFLOP/s | 2:4 sparse TFLOP/s | FP32 TFLOP/s | source |",
            "|---|---|---|---|---|---|"]
    for hw in HARDWARE.values():
        rows.append(f"| {hw.name} | {hw.hbm_gbps:g} | {hw.dense_tflops['bf16']:g} | {hw.sparse_tflops['bf16']:g} | "
                    f"{hw.dense_tflops['fp32']:g} | {hw.source} |")
    return "\n".join(rows)
