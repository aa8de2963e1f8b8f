"""Triton kernels for block sparsity (``"block:B"``, B in 8/16/32): dense tensor-core tiles over the
kept ``B × B`` blocks, skipping the dropped ones entirely (the jit kernels: :mod:`._block_kernels`).

Linear only. The kernels read the layer's kept values in place -- in canonical order a block-row's
values are one row-major ``(B, nb_i·B)`` matrix (see :mod:`._block_kernels`) -- so an optimizer step
needs no re-pack; what is built (once per mask, cached while the mask is alive and unchanged) is a
small block index:

* ``rowptr`` (kept blocks before each block-row) and ``col`` (block column of each kept block, row-major
  order): the forward walks a block-row's kept blocks ``TK`` at a time (64 reduction columns per
  ``tl.dot``), and the masked dW uses the same pair;
* the transpose for dX: ``colptr`` and per kept block in column order (block-row, value offset of its
  element (0, 0), leading dimension ``nb_i·B``), so dX reads the same values transposed in place;
* the dW work list: ``(block-row, first kept block)`` per group of ``64 / B`` kept blocks of a row.

Per call: forward ``Y = X Wᵀ + b`` and dX ``= dY W`` as one program per (row block of M, block-row /
block column); the masked dW ``(dYᵀ X)`` at kept blocks only, written straight into the values' order
(``(nnz,)``, no dense-shaped gradient), its M reduction split over programs (fp32 partials) when the
work list is too short to fill the GPU. fp32 / fp16 / bf16 in, fp32 accumulation; fp32 uses TF32
tensor cores only when torch allows it (:func:`~sparsefast.backends.triton.tf32_enabled`). Empty
block-rows and block columns produce exact zeros (and the bias).

Conv2d with a block mask runs on the unstructured Triton kernels (:mod:`.unstructured`, the route
every non-N:M pattern took before this module): their tile-decode implicit GEMM handles any mask, and
its kept-values order is the same. Unlike the unstructured kernels, these skip dropped blocks, so a
NaN / Inf of x (dy) in a column only dropped blocks touch does not reach the output the way a
masked-dense product spreads it (``0 · Inf = NaN``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton

from ...formats import kept as _kept
from ...masks import Block, Pattern, reduction_view
from ..base import Backend, ConvParams, OpQuery
from . import interpreting, tf32_enabled, triton_version  # noqa: F401 - triton_version for AOT / tests
from ._common import DTYPE_NAMES as _TY, AotSpec, cuda_sms, device_guard, prec as _prec  # noqa: F401

__all__ = ["Impl", "BlockIndex", "build_index", "aot_compile_configs", "AotSpec"]

from ._block_kernels import _dw_kernel, _dx_kernel, _fwd_kernel  # noqa: E402 - re-exported for tests / AOT

INT32_MAX = 2**31 - 1
#: reduction columns per ``tl.dot`` step of every kernel (``TK = KSTEP // B`` kept blocks at a time)
KSTEP = 64
#: rows of x (dy) per program of the fwd / dx kernels; only these are launched (see :func:`_bm`)
M_BUCKETS = (16, 64, 128)


# ================================================================================================
# Launch configurations
# ================================================================================================
def _configs(kind: str) -> list[triton.Config]:
    """Autotune candidates (warps, stages); tile sizes come from the launcher (``BM``) and the block
    size (``BR``, ``KSTEP``). The interpreter gets one small config."""
    if interpreting():
        return [triton.Config({}, num_warps=1, num_stages=1)]
    if kind == "dw":
        return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (8, 3))]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (4, 4), (8, 3))]


def _fma_dot(dtype: torch.dtype) -> bool:
    """fp32 without TF32: ``tl.dot`` is an FMA loop on CUDA cores (smaller tiles)."""
    return dtype == torch.float32 and _prec(dtype) == "ieee"


def bm_cap(fp32_fma: bool, b: int, version: tuple[int, int] | None = None) -> int:
    """Largest row block of the fwd / dx kernels: 128, or for the fp32 FMA dot 64 — and 32 with ``B = 32``
    from Triton 3.7 on, where ptxas gives a 64x32 fp32 tile 32 registers a thread on sm_80 and it spills
    (fwd 4 warps: 32 B, dx 8 warps: 16 B under 3.8; the unstructured kernels' fp32 rule, see
    ``_FP32_WARP_TILE_MAX`` there)."""
    if not fp32_fma:
        return 128
    v = version if version is not None else triton_version()
    return 32 if (b >= 32 and v >= (3, 7)) else 64


def _bm(M: int, dtype: torch.dtype, b: int = 16) -> int:
    """Rows of x per fwd / dx program: the smallest of :data:`M_BUCKETS` holding M (else the largest),
    at most :func:`bm_cap`; 16 under the interpreter."""
    if interpreting():
        return 16
    return min(bm_cap(_fma_dot(dtype), b), next((bk for bk in M_BUCKETS if bk >= M), M_BUCKETS[-1]))


def _dw_bm(dtype: torch.dtype) -> int:
    """Rows of M per reduction step of the dW kernel."""
    if interpreting():
        return 16
    return 32 if _fma_dot(dtype) else 64


def _br(b: int) -> int:
    """Width of the ``B`` side of a tile: ``B``, padded to ``tl.dot``'s minimum of 16 for ``B = 8``."""
    return max(b, 16)


_fwd = triton.autotune(_configs("fwd"), key=["M_BUCKET", "NBR", "B", "PREC"])(_fwd_kernel)
_dx = triton.autotune(_configs("dx"), key=["M_BUCKET", "NBC", "B", "PREC"])(_dx_kernel)
_dw = triton.autotune(_configs("dw"), key=["M_BUCKET", "MPS", "B", "PREC"])(_dw_kernel)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a small "GPU", so the split path gets exercised on tiny shapes


def _split(programs: int, steps: int, device: torch.device, min_steps: int = 4) -> int:
    """How many programs share one M reduction of dW so the grid fills ~2 waves while each keeps at
    least ``min_steps`` loop iterations (1 when the grid is already large)."""
    sms = _num_sms(device)
    if programs >= sms or steps < 2 * min_steps:
        return 1
    return max(1, min(-(-2 * sms // max(programs, 1)), steps // min_steps))


# ================================================================================================
# Block index (mask only)
# ================================================================================================
@dataclass(frozen=True)
class BlockIndex:
    """Block structure of a ``block:b`` mask's reduction view ``(nbr·b, nbc·b)`` (int32 tensors on the
    mask's device). ``tblocks`` is ``(nblocks, 3)``: per kept block in column-major order its block-row,
    the value offset of its element (0, 0) and its leading dimension; ``items`` is ``(n_items, 2)``:
    ``(block-row, first kept block)`` of each dW program (``64 / b`` kept blocks each)."""

    b: int
    nbr: int
    nbc: int
    nblocks: int
    rowptr: torch.Tensor    # (nbr + 1,)
    col: torch.Tensor       # (nblocks,)
    colptr: torch.Tensor    # (nbc + 1,)
    tblocks: torch.Tensor   # (nblocks, 3)
    items: torch.Tensor     # (n_items, 2)

    @property
    def nnz(self) -> int:
        return self.nblocks * self.b * self.b


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def build_index(mask: torch.Tensor, b: int) -> BlockIndex:
    """:class:`BlockIndex` of a 2-D bool mask made of whole ``b × b`` blocks (raises ``ValueError``
    when a block is partly kept). Torch ops on the mask's device; one device→host copy of the counts."""
    rv = reduction_view(mask)
    N, K = rv.shape
    if N % b or K % b:
        raise ValueError(f"triton block: mask {tuple(rv.shape)} is not made of whole {b}x{b} blocks")
    nbr, nbc = N // b, K // b
    cnt = rv.reshape(nbr, b, nbc, b).sum((1, 3), dtype=torch.int32)
    blk = cnt > 0
    per_row = blk.sum(1)
    mixed = int((blk & (cnt < b * b)).sum())
    if mixed:
        raise ValueError(f"triton block: mask does not satisfy the block:{b} pattern: {mixed} block(s) of "
                         f"{b}x{b} are partly kept")
    rowptr = _exclusive_cumsum(per_row)
    nblocks = int(rowptr[-1])
    if nblocks * b * b > INT32_MAX:
        raise RuntimeError(f"triton block: {nblocks * b * b} kept weights exceed the kernels' 32-bit offsets")
    col = blk.nonzero()[:, 1]                               # row-major: block-row, then block column
    colptr = _exclusive_cumsum(blk.sum(0))
    ji = blk.t().nonzero()                                  # column-major: block column, then block-row
    i_ = ji[:, 1]
    t_ = (blk.cumsum(1) - 1)[i_, ji[:, 0]]                  # position of the block in its block-row
    tblocks = torch.stack([i_, b * b * rowptr[i_] + t_ * b, per_row[i_] * b], 1)
    tb = KSTEP // b
    n_items = (per_row + tb - 1) // tb
    item_row = torch.repeat_interleave(torch.arange(nbr, device=mask.device), n_items)
    first = _exclusive_cumsum(n_items)[:-1]
    item_t0 = (torch.arange(item_row.numel(), device=mask.device) - first[item_row]) * tb
    items = torch.stack([item_row, item_t0], 1)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return BlockIndex(b, nbr, nbc, nblocks, i32(rowptr), i32(col), i32(colptr), i32(tblocks), i32(items))


# ================================================================================================
# Launchers
# ================================================================================================
def _run_fwd(x: torch.Tensor, values: torch.Tensor, idx: BlockIndex, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K) @ Wᵀ (+ bias)`` -> ``(M, N)`` contiguous."""
    M = x.shape[0]
    N = idx.nbr * idx.b
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if idx.nblocks == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
    if bias is not None:
        bias = bias.contiguous()
    BM = _bm(M, x.dtype, idx.b)
    grid = (triton.cdiv(M, BM) * idx.nbr,)
    with device_guard(x.device):
        _fwd[grid](x, idx.rowptr, idx.col, values, bias if bias is not None else values, out, M, idx.nbr,
                   *x.stride(), *out.stride(), M_BUCKET=BM, BM=BM, B=idx.b, BR=_br(idx.b), TK=KSTEP // idx.b,
                   HAS_BIAS=bias is not None, PREC=_prec(x.dtype))
    return out


def _run_dx(dy: torch.Tensor, values: torch.Tensor, idx: BlockIndex) -> torch.Tensor:
    """``dy (M, N) @ W`` -> ``(M, K)`` contiguous."""
    M = dy.shape[0]
    K = idx.nbc * idx.b
    out = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return out
    if idx.nblocks == 0:
        return out.zero_()
    BM = _bm(M, dy.dtype, idx.b)
    grid = (triton.cdiv(M, BM) * idx.nbc,)
    with device_guard(dy.device):
        _dx[grid](dy, idx.colptr, idx.tblocks, values, out, M, idx.nbc, *dy.stride(), *out.stride(),
                  M_BUCKET=BM, BM=BM, B=idx.b, BR=_br(idx.b), TN=KSTEP // idx.b, PREC=_prec(dy.dtype))
    return out


def _run_dw(dy: torch.Tensor, x: torch.Tensor, idx: BlockIndex) -> torch.Tensor:
    """Masked ``dyᵀ @ x`` at the kept blocks, in kept-values order -> ``(nnz,)`` of dy's dtype."""
    M = dy.shape[0]
    out = torch.empty((idx.nnz,), dtype=dy.dtype, device=dy.device)
    if idx.nblocks == 0:
        return out
    if M == 0:
        return out.zero_()
    BM = _dw_bm(dy.dtype)
    n_items = idx.items.shape[0]
    split = _split(n_items, triton.cdiv(M, BM), dy.device)
    mps = triton.cdiv(triton.cdiv(M, split), BM) * BM
    split = max(1, triton.cdiv(M, mps))
    dst = out if split == 1 else torch.empty((split, idx.nnz), dtype=torch.float32, device=dy.device)
    so_s = 0 if split == 1 else dst.stride(0)
    with device_guard(dy.device):
        _dw[(n_items, split)](dy, x, idx.rowptr, idx.col, idx.items, dst, M, mps, *dy.stride(), *x.stride(), so_s,
                              M_BUCKET=BM, BM=BM, B=idx.b, BR=_br(idx.b), TB=KSTEP // idx.b, PREC=_prec(dy.dtype))
    if split > 1:
        out.copy_(dst.sum(0))
    return out


def _check_numel(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.numel() > INT32_MAX:
            raise RuntimeError(f"triton block: a tensor of shape {tuple(t.shape)} has more than 2**31-1 elements "
                               "(the kernels use 32-bit offsets)")


# ================================================================================================
# The backend
# ================================================================================================
class Impl(Backend):
    """Block sparsity on Triton (see the module docstring). Routed to by
    :class:`sparsefast.backends.triton.TritonBackend` for :class:`~sparsefast.masks.Block` patterns.
    Linear runs the block kernels on the kept values in place; conv is delegated to the unstructured
    implementation (:mod:`.unstructured`)."""

    name = "triton"
    kept_native = True

    def __init__(self) -> None:
        super().__init__()
        self._conv_impl: Backend | None = None

    @property
    def devices(self):  # type: ignore[override]
        return ("cpu", "cuda") if interpreting() else ("cuda",)

    def _conv(self) -> Backend:
        """The unstructured implementation that runs block-masked convs."""
        if self._conv_impl is None:
            from .unstructured import Impl as Unstructured
            self._conv_impl = Unstructured()
        return self._conv_impl

    # ---- support and dense preference ---------------------------------------------------------
    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        if q.op == "conv":  # the unstructured tile-decode kernels run it (any mask)
            return [f"{r} (block-masked conv runs on the unstructured kernels)"
                    for r in self._conv().not_supported_reasons(q)]
        shape = tuple(q.weight_shape)
        if len(shape) != 2:
            return [f"triton block: linear needs a 2-D weight, got {shape}"]
        if not isinstance(q.pattern, Block):
            return [f"triton block: runs block:B patterns, not {q.pattern}"]
        reasons = []
        N, K = shape
        if N * K > INT32_MAX:
            reasons.append(f"triton block: weight {shape} has more than 2**31-1 elements (32-bit offsets)")
        if q.m_rows is not None and q.m_rows * max(N, K) > INT32_MAX:
            reasons.append(f"triton block: {q.m_rows} rows x {max(N, K)} exceeds 32-bit offsets")
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """Dense beats the block kernels when the cost model says so (ties go dense).

        Per call (seconds; e = element bytes, d = kept-block density, b = block size, bp = max(b, 16)):
        dense ``max(2·M·N·K / P, e·(M·K + N·K + M·N) / BW)``; block
        ``max(2·M·N·K·d·(bp/b) / (P·eff_b), e·d·M·N·K / b / L2, e·(M·K + M·N + d·N·K) / BW)`` -- the MMA
        work of the kept blocks (tiles only ``bp`` wide reach a fraction ``eff_b`` of the dense rate;
        B=8 pads its tiles to 16), the gathered x columns each block-row re-reads (from L2) and the
        HBM bytes. H100 figures, not yet measured: at 90 % sparsity and 4096³ bf16 the model gives
        ~3.7x dense for b=32, ~1.8x for b=16 and dense for b=8. Conv: the unstructured model."""
        if q.op == "conv":
            return self._conv().prefer_dense_reason(q)
        if q.m_rows is None or q.device.type != "cuda" or not isinstance(q.pattern, Block):
            return None
        c = _cost_terms(q)
        if c["t_sparse"] < c["t_dense"]:
            return None
        us = 1e6
        dt = str(q.dtype).replace("torch.", "")
        return (f"dense is faster for M={q.m_rows}, weight {tuple(q.weight_shape)}, block:{c['b']} at density "
                f"{c['density']:.3g} ({dt}): the block kernels model {c['t_sparse'] * us:.1f} us (MMA "
                f"{c['t_mma'] * us:.1f}, x re-reads {c['t_l2'] * us:.1f}, memory {c['t_mem'] * us:.1f}) vs dense "
                f"{c['t_dense'] * us:.1f} us, so auto runs masked-dense work instead (never slower than dense)")

    # ---- index and values ---------------------------------------------------------------------
    def index(self, mask: torch.Tensor, b: int) -> BlockIndex:
        """:class:`BlockIndex` of ``mask``, cached while the mask is alive and unmodified."""
        _check_numel(mask)
        return self.cached("block-index", (mask,), lambda: build_index(mask, b), b)

    def pack(self, weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> Any:
        """The kept values of ``weight`` (canonical order: the block kernels' own layout); conv weights
        get the unstructured format."""
        if weight.dim() == 4:
            return self._conv().pack(weight, mask, pattern)
        return _kept.gather(weight.detach(), mask).contiguous()

    @staticmethod
    def _values(values: torch.Tensor, idx: BlockIndex) -> torch.Tensor:
        v = values.detach().contiguous()
        if v.numel() != idx.nnz:
            raise ValueError(f"triton block: {v.numel()} values for a mask that keeps {idx.nnz}")
        return v

    # ---- Linear -------------------------------------------------------------------------------
    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        _check_numel(x)
        idx = self.index(mask, pattern.b)
        return _run_fwd(x, self._values(values, idx), idx, bias)

    def kept_linear_dx(self, dy, values, mask, pattern):
        _check_numel(dy)
        idx = self.index(mask, pattern.b)
        return _run_dx(dy, self._values(values, idx), idx)

    def kept_linear_dw(self, dy, x, mask, pattern):
        _check_numel(dy, x)
        return _run_dw(dy, x, self.index(mask, pattern.b))

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return self.kept_linear_fwd(x, self.packed(weight, mask, pattern), mask, bias, pattern)

    def linear_dx(self, dy, weight, mask, pattern):
        return self.kept_linear_dx(dy, self.packed(weight, mask, pattern), mask, pattern)

    # linear_dw: the base class scatters kept_linear_dw into the weight's shape

    # ---- Conv2d: the unstructured kernels -----------------------------------------------------
    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv: ConvParams):
        return self._conv().kept_conv_fwd(x, values, mask, bias, pattern, conv)

    def kept_conv_dx(self, dy, values, mask, pattern, conv: ConvParams, input_shape):
        return self._conv().kept_conv_dx(dy, values, mask, pattern, conv, input_shape)

    def kept_conv_dw(self, dy, x, mask, pattern, conv: ConvParams):
        return self._conv().kept_conv_dw(dy, x, mask, pattern, conv)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        return self._conv().conv_fwd(x, weight, mask, bias, pattern, conv)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape):
        return self._conv().conv_dx(dy, weight, mask, pattern, conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape):
        return self._conv().conv_dw(dy, x, mask, pattern, conv, weight_shape)


# ================================================================================================
# Cost model for prefer_dense_reason (H100 SXM figures, scaled by SM count on other GPUs)
# ================================================================================================
_H100 = dict(tc16=650e12, tf32=330e12, fp32=50e12, bw=3.0e12, l2=7.5e12, sms=132)
#: fraction of the dense MMA rate a kept-block tile ``max(b, 16)`` wide reaches (narrow N side: less
#: operand reuse per MMA); an estimate, to be replaced by measurements
_TILE_EFF = {8: 0.35, 16: 0.45, 32: 0.6}


def _cost_terms(q: OpQuery) -> dict[str, Any]:
    N, K = int(q.weight_shape[0]), int(math.prod(q.weight_shape[1:]))
    M = int(q.m_rows or 1)
    b = int(q.pattern.b)
    e = torch.empty((), dtype=q.dtype).element_size()
    d = 0.5 if q.density is None else float(q.density)
    sms = cuda_sms(q.device.index or 0) if q.device.type == "cuda" and torch.cuda.is_available() else _H100["sms"]
    scale = sms / _H100["sms"]
    if q.dtype == torch.float32:
        peak = _H100["tf32"] if tf32_enabled() else _H100["fp32"]
    else:
        peak = _H100["tc16"]
    peak, bw, l2 = peak * scale, _H100["bw"] * scale, _H100["l2"] * scale
    flops = 2.0 * M * N * K
    t_dense = max(flops / peak, e * (M * K + N * K + M * N) / bw)
    t_mma = flops * d * (_br(b) / b) / (peak * _TILE_EFF.get(b, 0.5))
    t_l2 = e * d * M * N * K / b / l2
    t_mem = e * (M * K + M * N + d * N * K) / bw
    return dict(b=b, density=d, t_dense=t_dense, t_mma=t_mma, t_l2=t_l2, t_mem=t_mem,
                t_sparse=max(t_mma, t_l2, t_mem))


def aot_compile_configs(*args, **kwargs):
    """Every block-kernel variant the launchers run on a GPU (:mod:`._block_aot`)."""
    from ._block_aot import aot_compile_configs as build
    return build(*args, **kwargs)
