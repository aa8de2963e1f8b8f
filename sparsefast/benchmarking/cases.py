"""Benchmark cases, the implementations compared and their inputs (``sparsefast bench`` and ``pytest benchmarks``)."""
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


#: unstructured densities benchmarked (sparsity 50/70/90/95 %)
DENSITIES = (0.5, 0.3, 0.1, 0.05)
TOL = {"float32": 2e-4, "bfloat16": 3e-2, "float16": 5e-3}

class Skip(Exception):
    """This implementation cannot run this case (the reason is the message)."""


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One benchmark problem. Linear: x ``(M, K)``, weight ``(N, K)``. Conv: x ``(B, C, H, W)``, weight
    ``(O, C, k, k)`` (stride, padding); GEMM view M = B·Ho·Wo, K = C·k·k, N = O."""

    op: str                 # "linear" | "conv"
    kind: str               # "fwd" | "dx" | "step"
    dtype: str              # "float32" | "bfloat16" | "float16"
    pattern: str            # "2:4" | "unstructured"
    density: float
    shapes: str             # shape-set name ("memory-bound", "compute-bound", "cpu-issue", ...)
    device: str = "cpu"
    M: int = 0
    K: int = 0
    N: int = 0
    B: int = 0
    C: int = 0
    H: int = 0
    W: int = 0
    O: int = 0
    k: int = 0
    stride: int = 1
    padding: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def pattern_label(self) -> str:
        return "2:4" if self.pattern == "2:4" else f"{round(100 * self.sparsity)}%"

    @property
    def shape_label(self) -> str:
        if self.op == "linear":
            return f"{self.M}x{self.K}x{self.N}"
        return f"B{self.B} {self.C}->{self.O} {self.k}x{self.k} {self.H}x{self.W}" + (f" s{self.stride}" if self.stride != 1 else "")

    @property
    def id(self) -> str:
        dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[self.dtype]
        return f"{self.op}-{self.kind}-{self.shape_label.replace(' ', '_').replace('->', 'to')}-{dt}-{self.pattern_label}"

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def roofline_dict(self) -> dict[str, Any]:
        d = {"op": self.op, "kind": self.kind, "dtype": self.dtype, "pattern": self.pattern, "density": self.density}
        if self.op == "linear":
            d.update(M=self.M, K=self.K, N=self.N)
        else:
            d.update(B=self.B, C=self.C, H=self.H, W=self.W, O=self.O, kernel=[self.k, self.k], stride=self.stride,
                     padding=self.padding)
        return d


def _patterns(densities=DENSITIES, nm=True):
    out = [("2:4", 0.5)] if nm else []
    return out + [("unstructured", d) for d in densities]


#: GPU linear shape sets: (M, K, N)
GPU_LINEAR = {
    "memory-bound": [(M, K, N) for M in (16, 64) for K, N in ((4096, 4096), (4096, 14336), (14336, 4096))],
    "compute-bound": [(8192, K, N) for K, N in ((4096, 4096), (4096, 14336), (14336, 4096))],
}
#: ResNet-50 conv layers at batch 256 (B, C, H, W, O, k, stride, padding)
GPU_CONV = {"resnet50": [(256, 64, 56, 56, 64, 3, 1, 1), (256, 256, 14, 14, 256, 3, 1, 1),
                         (256, 256, 56, 56, 64, 1, 1, 0), (256, 1024, 14, 14, 256, 1, 1, 0)]}
GPU_CONV_FULL = {"resnet50": GPU_CONV["resnet50"] + [(256, 128, 28, 28, 128, 3, 1, 1), (256, 512, 7, 7, 512, 3, 1, 1),
                                                     (256, 64, 56, 56, 256, 1, 1, 0), (256, 512, 7, 7, 2048, 1, 1, 0)]}


def cases(device: str = "cpu", *, full: bool = False, dtypes: list[str] | None = None,
          shapes: list[str] | None = None, ops: list[str] | None = None, kinds: list[str] | None = None,
          patterns: list[str] | None = None) -> list[Case]:
    """The benchmark cases for ``device``. ``full`` adds larger/more shapes and dtypes. Filters: shape-set
    names, ops (linear/conv), kinds (fwd/dx/step), pattern labels ("2:4", "90%")."""
    kinds_all = ("fwd", "dx", "step")
    out: list[Case] = []

    def add(op, dts, pats, sset, dims_list, ks=kinds_all):
        # pattern outermost: consecutive cases share one weight/mask (prepare() caches the last two)
        for pat, dens in pats:
            for dims in dims_list:
                for dt in dts:
                    for kd in ks:
                        if op == "linear":
                            M, K, N = dims
                            out.append(Case(op, kd, dt, pat, dens, sset, device, M=M, K=K, N=N))
                        else:
                            B, C, H, W, O, k, s, p = dims
                            out.append(Case(op, kd, dt, pat, dens, sset, device, B=B, C=C, H=H, W=W, O=O, k=k,
                                            stride=s, padding=p))

    if device == "cuda":
        dts = ["bfloat16", "float16"] if full else ["bfloat16"]
        for sset, dims in GPU_LINEAR.items():
            add("linear", dts, _patterns(), sset, dims)
        for sset, dims in (GPU_CONV_FULL if full else GPU_CONV).items():
            add("conv", dts, _patterns((0.3, 0.1) if not full else DENSITIES), sset, dims)
    else:
        # the CPU issue's set: 90/95 %, float32, M in {1,16,64,256}, K=N=4096, and a ResNet-style 3x3 conv
        add("linear", ["float32"], _patterns((0.1, 0.05), nm=False), "cpu-issue",
            [(M, 4096, 4096) for M in (1, 16, 64, 256)])
        add("conv", ["float32"], _patterns((0.1, 0.05)), "cpu-issue", [(8, 64, 28, 28, 64, 3, 1, 1)])
        # small shapes: every pattern, float32 and bfloat16
        add("linear", ["float32", "bfloat16"], _patterns(), "cpu-small", [(64, 1024, 1024)])
        add("conv", ["bfloat16"], _patterns((0.1,)), "cpu-small", [(4, 64, 14, 14, 64, 3, 1, 1)])
        if full:
            add("linear", ["float32", "bfloat16"], _patterns(), "cpu-medium", [(256, 2048, 2048), (1, 4096, 4096)])
            add("linear", ["bfloat16"], _patterns((0.1, 0.05)), "cpu-issue", [(M, 4096, 4096) for M in (1, 16, 64, 256)])
            add("conv", ["float32", "bfloat16"], _patterns(), "cpu-medium",
                [(16, 128, 28, 28, 128, 3, 1, 1), (16, 256, 14, 14, 1024, 1, 1, 0)])
    sel = out
    if dtypes:
        sel = [c for c in sel if c.dtype in dtypes]
    if shapes:
        sel = [c for c in sel if c.shapes in shapes]
    if ops:
        sel = [c for c in sel if c.op in ops]
    if kinds:
        sel = [c for c in sel if c.kind in kinds]
    if patterns:
        sel = [c for c in sel if c.pattern_label in patterns or c.pattern in patterns]
    return sel


def _sparseprop_ok() -> str | None:
    try:
        import sparseprop.modules  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"sparseprop not importable ({type(e).__name__}: {e}); pip install sparseprop"
    return None


def impls(device: str = "cpu") -> list[str]:
    """Implementation names for ``device``, in table order."""
    from sparsefast import backends

    names = ["dense"]
    if device == "cuda":
        names += ["torch-2:4", "torch-csr"]
    else:
        names += ["torch-csr", "sparseprop"]
    names.append("sf:auto")
    for b in backends.available():
        if device == "cpu" and b in ("triton", "cuda"):
            continue  # GPU-only backends; Triton under the interpreter is a correctness mode, never timed
        if device == "cuda" and b == "cpu":
            continue
        names.append(f"sf:{b}")
    return names


# ------------------------------------------------------------------------------------------------
# problem data (cached: building 4096x14336 masks is not free) and reference results
# ------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    w: torch.Tensor       # masked dense weight (dtype of the case)
    mask: torch.Tensor    # bool
    extra: dict = field(default_factory=dict)  # per-impl packed formats (csr, semi-structured, sparseprop)


@dataclass
class Inputs:
    x: torch.Tensor
    dy: torch.Tensor
    ref: dict[str, torch.Tensor]


_PROBLEMS: dict[tuple, Problem] = {}
_INPUTS: dict[str, Inputs] = {}


def _seed(s: str) -> int:
    return zlib.crc32(s.encode())


def _wkey(c: Case) -> tuple:
    dims = (c.K, c.N) if c.op == "linear" else (c.C, c.O, c.k)
    return (c.op, dims, c.dtype, c.pattern, c.density, c.device)


def prepare(c: Case) -> Problem:
    """Masked weight + mask for the case (random normal weights scaled 1/sqrt(K), never zeros at kept
    positions). 2:4 Linear masks are transposable (``masks.transposable_nm_mask``) so both W and Wᵀ
    are 2:4; 2:4 conv masks group 4 input channels per kernel position; unstructured masks are
    Bernoulli(density)."""
    from sparsefast import masks

    key = _wkey(c)
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    if len(_PROBLEMS) >= 2:
        _PROBLEMS.clear()
    g = torch.Generator(device="cpu").manual_seed(_seed(repr(key)))
    shape = (c.N, c.K) if c.op == "linear" else (c.O, c.C, c.k, c.k)
    fan_in = c.K if c.op == "linear" else c.C * c.k * c.k
    w = (torch.randn(shape, generator=g) / math.sqrt(fan_in)).to(c.device)
    if c.pattern == "2:4":
        if c.op == "linear":
            mask = masks.transposable_nm_mask(w, 2, 4)
        else:
            mask = masks.magnitude_mask(w, "2:4", None)
    else:
        mask = (torch.rand(shape, generator=g) < c.density).to(c.device)
    w = torch.where(mask, w, torch.zeros((), device=c.device)).to(c.torch_dtype())
    p = Problem(w, mask)
    _PROBLEMS[key] = p
    return p


def _ref_outputs(c: Case, p: Problem, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked-dense reference computed in float32 from the case's inputs (upcast)."""
    acc = torch.float32
    w, xf, dyf = p.w.to(acc), x.to(acc), dy.to(acc)
    out: dict[str, torch.Tensor] = {}
    if c.op == "linear":
        out["y"] = F.linear(xf, w)
        if c.kind != "fwd":
            out["dx"] = dyf @ w
        if c.kind == "step":
            out["dw"] = (dyf.t() @ xf) * p.mask
    else:
        out["y"] = F.conv2d(xf, w, None, c.stride, c.padding)
        if c.kind != "fwd":
            out["dx"] = torch.nn.grad.conv2d_input(list(x.shape), w, dyf, c.stride, c.padding)
        if c.kind == "step":
            out["dw"] = torch.nn.grad.conv2d_weight(xf, list(w.shape), dyf, c.stride, c.padding) * p.mask
    return out


def inputs(c: Case, p: Problem) -> Inputs:
    """Fresh random inputs for the case (seeded by the case id) and the reference outputs on them."""
    hit = _INPUTS.get(c.id)
    if hit is not None:
        return hit
    _INPUTS.clear()
    g = torch.Generator(device="cpu").manual_seed(_seed(c.id))
    dt = c.torch_dtype()
    if c.op == "linear":
        x = torch.randn(c.M, c.K, generator=g)
        dy = torch.randn(c.M, c.N, generator=g)
    else:
        ho = (c.H + 2 * c.padding - c.k) // c.stride + 1
        wo = (c.W + 2 * c.padding - c.k) // c.stride + 1
        x = torch.randn(c.B, c.C, c.H, c.W, generator=g)
        dy = torch.randn(c.B, c.O, ho, wo, generator=g)
    x, dy = x.to(c.device, dt), dy.to(c.device, dt)
    if c.op == "conv" and c.device == "cuda":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    inp = Inputs(x, dy, _ref_outputs(c, p, x, dy))
    _INPUTS[c.id] = inp
    return inp


