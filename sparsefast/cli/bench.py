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

__all__ = ["Case", "Result", "cases", "impls", "prepare", "check", "time_call", "run_case", "format_table",
           "markdown_table", "environment", "save_json", "save_plot", "main", "Skip", "DENSITIES"]

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


# ------------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument callable doing one op; calling it returns outputs
# ------------------------------------------------------------------------------------------------
def _bump(t: torch.Tensor) -> None:
    torch.autograd.graph.increment_version(t)


def _autograd_runner(c: Case, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w: torch.Tensor,
                     x: torch.Tensor, dy: torch.Tensor, wgrad_view: Callable | None = None) -> Callable[[], dict]:
    """fwd/dx/step runners around ``f(x, w) -> y`` (autograd through whatever ``f`` uses)."""
    if c.kind == "fwd":
        def fwd():
            with torch.no_grad():
                return {"y": f(x, w)}
        return fwd
    xr = x.detach().requires_grad_(True)
    if c.kind == "dx":
        wf = w.detach().requires_grad_(False)
        y = f(xr, wf)

        def dx():
            (gx,) = torch.autograd.grad(y, xr, dy, retain_graph=True)
            return {"dx": gx}
        return dx
    wr = w.detach().requires_grad_(True)

    def step():
        _bump(wr)  # as after an optimizer update: backends must re-pack
        y = f(xr, wr)
        gx, gw = torch.autograd.grad(y, (xr, wr), dy)
        return {"y": y, "dx": gx, "dw": wgrad_view(gw) if wgrad_view else gw}
    return step


def _sf_runner(c: Case, p: Problem, x, dy, backend: str) -> Callable[[], dict]:
    from sparsefast import backends, ops

    if backend != "auto" and backends.why_unavailable(backend):
        raise Skip(f"unavailable: {backends.why_unavailable(backend)}")
    if c.device == "cpu" and backend == "triton":
        raise Skip("Triton on CPU runs under the interpreter: correctness mode, never timed")
    pattern = c.pattern
    mask = p.mask
    if c.op == "linear":
        def f(xx, ww):
            return ops.sparse_linear(xx, ww, mask, None, backend=backend, pattern=pattern, density=c.density)
    else:
        def f(xx, ww):
            return ops.sparse_conv2d(xx, ww, mask, None, c.stride, c.padding, backend=backend, pattern=pattern,
                                     density=c.density)
    try:
        run = _autograd_runner(c, f, p.w, x, dy)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        raise Skip(f"{type(e).__name__}: {e}") from e
    return run


def _dense_runner(c: Case, p: Problem, x, dy) -> Callable[[], dict]:
    w = p.w
    if c.op == "linear":
        f = F.linear
    else:
        if c.device == "cuda":
            w = w.contiguous(memory_format=torch.channels_last)

        def f(xx, ww):
            return F.conv2d(xx, ww, None, c.stride, c.padding)
    mask = p.mask
    return _autograd_runner(c, f, w, x, dy, wgrad_view=lambda g: g * mask)


def _csr_runner(c: Case, p: Problem, x, dy) -> Callable[[], dict]:
    if c.op != "linear":
        raise Skip("torch has no sparse convolution")
    ex = p.extra
    try:
        if "csr" not in ex:
            ex["csr"] = p.w.to_sparse_csr()
            ex["csrT"] = p.w.t().contiguous().to_sparse_csr()
        W, WT = ex["csr"], ex["csrT"]
        fwd = lambda: torch.sparse.mm(W, x.t()).t()  # noqa: E731
        dxf = lambda: torch.sparse.mm(WT, dy.t()).t()  # noqa: E731
        dwf = lambda: torch.sparse.sampled_addmm(W, dy.t(), x, beta=0.0)  # noqa: E731
        fwd()
        if c.kind != "fwd":
            dxf()
        if c.kind == "step":
            dwf()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise Skip(f"torch CSR: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from e
    if c.kind == "fwd":
        return lambda: {"y": fwd()}
    if c.kind == "dx":
        return lambda: {"dx": dxf()}
    return lambda: {"y": fwd(), "dx": dxf(), "dw": dwf()}


def _semi_runner(c: Case, p: Problem, x, dy) -> Callable[[], dict]:
    if c.device != "cuda" or c.op != "linear" or c.pattern != "2:4":
        raise Skip("torch 2:4 semi-structured: CUDA 2:4 Linear only")
    ex = p.extra
    try:
        from torch.sparse import to_sparse_semi_structured
        if "ss" not in ex:
            ex["ss"] = to_sparse_semi_structured(p.w.contiguous())
            ex["ssT"] = to_sparse_semi_structured(p.w.t().contiguous())
        W, WT, mask = ex["ss"], ex["ssT"], p.mask
        fwd = lambda: F.linear(x, W)  # noqa: E731
        dxf = lambda: F.linear(dy, WT)  # noqa: E731
        dwf = lambda: (dy.t() @ x) * mask  # noqa: E731
        fwd()
        if c.kind != "fwd":
            dxf()
    except Exception as e:  # noqa: BLE001 - torch raises several types for unsupported shapes/GPUs
        raise Skip(f"torch 2:4: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from e
    if c.kind == "fwd":
        return lambda: {"y": fwd()}
    if c.kind == "dx":
        return lambda: {"dx": dxf()}
    return lambda: {"y": fwd(), "dx": dxf(), "dw": dwf()}


def _sparseprop_runner(c: Case, p: Problem, x, dy) -> Callable[[], dict]:
    why = _sparseprop_ok()
    if why:
        raise Skip(why)
    if c.device != "cpu" or c.dtype != "float32":
        raise Skip("sparseprop: CPU float32 only")
    from sparseprop.modules import SparseConv2d as SPConv
    from sparseprop.modules import SparseLinear as SPLinear

    if "sp" not in p.extra:
        if c.op == "linear":
            lin = torch.nn.Linear(c.K, c.N, bias=False)
            with torch.no_grad():
                lin.weight.copy_(p.w)
            p.extra["sp"] = SPLinear.from_dense(lin)
            p.extra["sp_pos"] = p.w.reshape(-1).nonzero().reshape(-1)  # CSR order = row-major nonzeros
        else:
            if c.stride not in (1, 2):
                raise Skip("sparseprop conv: stride 1 or 2 only")
            conv = torch.nn.Conv2d(c.C, c.O, c.k, c.stride, c.padding, bias=False)
            with torch.no_grad():
                conv.weight.copy_(p.w)
            p.extra["sp"] = SPConv.from_dense(conv)
    mod = p.extra["sp"]
    pos = p.extra.get("sp_pos")
    vals = mod.W_val

    def f(xx, ww):
        return mod(xx)

    def wview(g):
        if pos is None:
            return None  # conv value order is sparseprop-internal: dW not compared
        out = torch.zeros(p.w.numel(), dtype=g.dtype)
        out[pos] = g
        return out.reshape(p.w.shape)

    if c.kind == "fwd":
        return _autograd_runner(c, f, vals, x, dy)
    xr = x.detach().requires_grad_(True)
    if c.kind == "dx":
        vals.requires_grad_(False)
        y = mod(xr)

        def dx():
            (gx,) = torch.autograd.grad(y, xr, dy, retain_graph=True)
            return {"dx": gx}
        return dx
    vals.requires_grad_(True)

    def step():
        y = mod(xr)
        gx, gw = torch.autograd.grad(y, (xr, vals), dy)
        return {"y": y, "dx": gx, "dw": wview(gw)}
    return step


def make_runner(c: Case, impl: str, p: Problem, inp: Inputs) -> Callable[[], dict]:
    """The callable timing ``impl`` on case ``c``; raises :class:`Skip` where it cannot run."""
    x, dy = inp.x, inp.dy
    if impl == "dense":
        return _dense_runner(c, p, x, dy)
    if impl == "torch-csr":
        return _csr_runner(c, p, x, dy)
    if impl == "torch-2:4":
        return _semi_runner(c, p, x, dy)
    if impl == "sparseprop":
        return _sparseprop_runner(c, p, x, dy)
    if impl.startswith("sf:"):
        return _sf_runner(c, p, x, dy, impl[3:])
    raise ValueError(f"unknown implementation {impl!r}")


def check(c: Case, impl: str, out: dict, inp: Inputs) -> dict[str, float]:
    """Compare ``out`` with the reference: relative max error per output (``max|got-ref| / max|ref|``).
    Raises ``AssertionError`` when one exceeds the dtype tolerance."""
    errs: dict[str, float] = {}
    for k, ref in inp.ref.items():
        got = out.get(k)
        if got is None:
            continue
        if got.is_sparse or got.layout != torch.strided:
            got = got.to_dense()
        got = got.to(ref.dtype)
        if tuple(got.shape) != tuple(ref.shape):
            raise AssertionError(f"{impl} {c.id}: {k} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        scale = float(ref.abs().max().clamp_min(1e-6))
        errs[k] = float((got - ref).abs().max()) / scale
        if not math.isfinite(errs[k]) or errs[k] > TOL[c.dtype]:
            raise AssertionError(f"{impl} {c.id}: {k} differs from the masked-dense reference: relative max error "
                                 f"{errs[k]:.3g} > {TOL[c.dtype]:g}")
    return errs


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
        p = prepare(c)
        inp = inputs(c, p)
        try:
            fn = make_runner(c, n, p, inp)
            out = fn()
        except Skip as e:
            results[n] = Result(c, n, "skip", reason=str(e))
            continue
        except (RuntimeError, NotImplementedError) as e:
            results[n] = Result(c, n, "skip", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
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


# ------------------------------------------------------------------------------------------------
# results
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


def run_case(c: Case, impl: str, *, timed: bool = True, budget_s: float = 0.25) -> Result:
    """Check ``impl`` on fresh inputs against the reference, then time it (``timed``)."""
    p = prepare(c)
    inp = inputs(c, p)
    try:
        fn = make_runner(c, impl, p, inp)
        out = fn()
    except Skip as e:
        return Result(c, impl, "skip", reason=str(e))
    except (RuntimeError, NotImplementedError) as e:
        return Result(c, impl, "skip", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
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
