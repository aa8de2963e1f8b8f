"""The implementations compared per case (dense, torch 2:4, torch CSR, sparseprop, sparsefast backends) and the check against the masked-dense reference."""
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
from .cases import _ref_outputs, _seed, _sparseprop_ok, _wkey  # noqa: F401

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


def _by_kind(c: Case, fwd: Callable, dxf: Callable, dwf: Callable) -> Callable[[], dict]:
    """The runner of a case from its three closures: forward only, input gradient only, or the whole step."""
    if c.kind == "fwd":
        return lambda: {"y": fwd()}
    if c.kind == "dx":
        return lambda: {"dx": dxf()}
    return lambda: {"y": fwd(), "dx": dxf(), "dw": dwf()}


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
    return _by_kind(c, fwd, dxf, dwf)


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
    return _by_kind(c, fwd, dxf, dwf)


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


