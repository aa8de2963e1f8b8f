"""Triton kernels for N:M sparsity (2:4, 1:4, 2:8, 4:8, ...): pack, linear fwd / dx / masked dw.

Supported: ``m`` in {4, 8, 16}, ``n`` in {1, 2, 4, 8} with ``n < m``; float32/float16/bfloat16.
The weight lives in the packed format of :mod:`sparsefast.formats.nm` (kept values + 2- or 4-bit
in-group indices, rows in reduction order). Triton has no sparse tensor-core instruction, so the win
is bytes: every kernel reads only the packed weight and rebuilds dense ``(rows, BK)`` tiles of
``W*M`` in registers (:func:`_nm_tile`) right before ``tl.dot`` -- ~0.56x the bytes of a dense bf16
weight for 2:4. That pays on memory-bound shapes (few rows M); on compute-bound shapes it is the
dense FLOPs plus decode work, so :meth:`Impl.prefer_dense_reason` sends those to dense.

* forward    ``y = x (W*M)^T + b``, computed as ``y^T = (W*M) x^T`` so the decoded weight tile is
  the MMA's A operand straight from registers and the small M is the MMA's N (wgmma on sm_90 for
  any M); loop over K, bias fused, split-K for small outputs.
* dx         ``dx = dy (W*M)``: transposable masks (W^T also N:M, :func:`masks.is_transposable_nm`)
  pack W^T once and reuse the forward kernel (contiguous packed rows); any other mask runs
  :func:`_dx_kernel`, which decodes the same packed tiles but reduces over the weight rows.
* masked dw  ``dW = (dy^T x) * M``: a sampled dense-dense product (tensor-core tiles of dy^T x) whose
  store writes the kept positions and zeros elsewhere in one pass (the scatter to the dense-shaped
  gradient is fused into the store); kept positions come from a cached 1-bit-per-weight bitmap.
* conv2d     implicit GEMM in :mod:`._nm_conv` (same tile decoder).

Split-K: each split writes an fp32 partial tile; the last split to arrive (atomic counter per
tile) sums the partials in a fixed order and stores the result -- one launch, deterministic, and
the counters reset themselves. SPLIT_K is a function of the autotune key only (``M_CLASS``, N, K,
precision; :func:`_split_for` reads the class, not the call's M), so a config tuned at one M and
reused at another M of the class never splits more ways than the workspace ``_launch`` sized.

Under ``TRITON_INTERPRET=1`` kernels run with one small fixed config (no autotuning).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ...formats import nm as fmt
from ...masks import Pattern, is_transposable_nm, reduction_view
from ..base import Backend, ConvParams, OpQuery
from . import interpreting
from ._common import DTYPE_NAMES as _TY, AotSpec, device_guard, specialize
from ._common import cuda_sms as _num_sms
from ._common import prec as _prec

SUPPORTED_M = (4, 8, 16)
SUPPORTED_N = (1, 2, 4, 8)
#: largest GEMM M (rows of x) the N:M kernels take under ``auto``; above it dense wins
SMALL_M = 64
#: smallest weight (elements) worth a sparse launch under ``auto``
MIN_WEIGHT_NUMEL = 1 << 20
#: the kernels index with int32 offsets: no tensor (nor split-K workspace) may hold more elements
INT32_MAX = 2**31 - 1

_INTERPRET = tl.constexpr(interpreting())


# ------------------------------------------------------------------------------------------------
# device helpers (shared with _nm_conv)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _nm_tile(v_ptr, m_ptr, rows, row_ok, s0, s_lim, svr, smr,
             BR: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr,
             ALIGNED: tl.constexpr = True):
    """Dense ``(BR, BK)`` tile of ``W*M`` (values' dtype) decoded from packed rows ``rows``.

    Tile column ``t`` is dense column ``s0 // NK * MG + t``; it reads slots ``[s0, s0 + BK*NK/MG)``
    (``s0`` a multiple of NK; with ``ALIGNED`` also of ``8 // BITS``, i.e. the tile starts on a
    metadata byte); slots ``>= s_lim`` and rows with ``row_ok`` False read as zero.
    Slot ``s`` of row ``r``: value at ``v_ptr + r*svr + s``; index in byte ``m_ptr + r*smr + s // PER``
    at bit ``(s % PER) * BITS`` (formats/nm.py)."""
    BS: tl.constexpr = BK // MG * NK
    PER: tl.constexpr = 8 // BITS
    s = s0 + tl.arange(0, BS)
    v = tl.load(v_ptr + rows[:, None] * svr + s[None, :], mask=row_ok[:, None] & (s < s_lim)[None, :], other=0.0)
    if ALIGNED:
        tl.static_assert(BS % PER == 0, "an aligned tile must cover whole metadata bytes")
        # contiguous bytes, split in registers: byte -> PER fields of BITS bits, in slot order
        b = s0 // PER + tl.arange(0, BS // PER)
        idx = tl.load(m_ptr + rows[:, None] * smr + b[None, :], mask=row_ok[:, None] & (b * PER < s_lim)[None, :],
                      other=0).to(tl.int32)
        if BITS <= 4:
            idx = tl.reshape(tl.join(idx & 15, idx >> 4), (BR, BS // PER * 2))
        if BITS <= 2:
            idx = tl.reshape(tl.join(idx & 3, idx >> 2), (BR, BS // PER * 4))
        if BITS == 1:
            idx = tl.reshape(tl.join(idx & 1, idx >> 1), (BR, BS))
        idx = idx & (MG - 1)
    else:
        byte = tl.load(m_ptr + rows[:, None] * smr + (s // PER)[None, :], mask=row_ok[:, None] & (s < s_lim)[None, :],
                       other=0)
        idx = (byte.to(tl.int32) >> ((s % PER) * BITS)[None, :]) & (MG - 1)
    # w[r, g, c] = v[r, g*NK + j] for the (single) j whose index is c, else 0
    v4 = tl.reshape(v, (BR, BK // MG, NK, 1))
    i4 = tl.reshape(idx, (BR, BK // MG, NK, 1))
    c = tl.arange(0, MG)[None, None, None, :]
    return tl.reshape(_pick(v4, i4 == c, 2), (BR, BK))


@triton.jit
def _pick(x, sel, axis: tl.constexpr):
    """Along ``axis``, the one entry of ``x`` where ``sel`` holds (0 where none does), moved as bits
    (no float math: NaN/Inf/-0 survive exactly, and it works for bf16 in the interpreter)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = tl.where(sel, x.to(tl.int16, bitcast=True), 0)
        out = tl.sum(bits, axis=axis).to(tl.int16).to(x.dtype, bitcast=True)
    else:
        bits = tl.where(sel, x.to(tl.int32, bitcast=True), 0)
        out = tl.sum(bits, axis=axis).to(x.dtype, bitcast=True)
    return out


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` (fp32 acc). The interpreter cannot multiply bf16, so it upcasts there."""
    if _INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _store_tile(acc, y_ptrs, y_ok, ws_ptr, ws_offs, ws_split_stride, lock_ptr, tile_id, pid_k,
                SPLIT_K: tl.constexpr):
    """Store the fp32 tile ``acc`` at ``y_ptrs`` (cast to y's dtype). With ``SPLIT_K > 1`` this is
    one of SPLIT_K partial sums: park it at ``ws_ptr + pid_k*ws_split_stride + ws_offs``; the last
    split to finish (counter at ``lock_ptr + tile_id``) sums all partials in order, stores the
    result and resets the counter to 0 for the next launch."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=y_ok)
    else:
        tl.store(ws_ptr + pid_k * ws_split_stride + ws_offs, acc, mask=y_ok)
        tl.debug_barrier()  # every thread's partial is written before the counter is bumped
        arrived = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            # a loop, not tl.static_range: unrolled, Triton 3.8 / 3.9 issue all SPLIT_K tile loads
            # before the first add (SPLIT_K live fp32 tiles: dW BN64xBK128 split 4 spilled 32 B,
            # split 8 1224 B per thread on sm_90); looped, one partial is live whatever SPLIT_K
            for i in range(SPLIT_K):
                total += tl.load(ws_ptr + i * ws_split_stride + ws_offs, mask=y_ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=y_ok)
            tl.atomic_xchg(lock_ptr + tile_id, 0)


@triton.jit
def _bitmap_keep(bm_ptr, rows, cols, sbr):
    """Bool tile ``mask[rows, cols]`` from a bitmap: bit ``c % 8`` of byte ``bm_ptr + r*sbr + c // 8``."""
    byte = tl.load(bm_ptr + rows[:, None] * sbr + (cols // 8)[None, :])
    return ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pack_kernel(w_ptr, k_ptr, v_ptr, m_ptr, R, K, swr, swk, skr, skk, svr, smr, SV, SM,
                 NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    """Pack rows ``[pid0*BR, +BR)``, groups ``[pid1*BG, +BG)`` of W (R, K) / mask (uint8) into
    values (R, SV) / meta (R, SM) uint8 -- bit-identical to ``formats.nm.pack``; groups past K
    (row padding up to SV / SM) are written as zeros. Every step stays inside one thread's
    registers (a thread holds whole groups): no shuffles, no shared memory."""
    GB: tl.constexpr = NK * BITS                                          # bits of one group's code
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * BG + tl.arange(0, BG)
    col = tl.program_id(1) * (BG * MG) + tl.arange(0, BG * MG)
    r_ok = (r < R)[:, None, None]
    ok = (r < R)[:, None] & (col < K)[None, :]
    w = tl.reshape(tl.load(w_ptr + r[:, None] * swr + col[None, :] * swk, mask=ok, other=0.0), (BR, BG, MG))
    keep = tl.reshape(tl.load(k_ptr + r[:, None] * skr + col[None, :] * skk, mask=ok, other=0), (BR, BG, MG)) != 0
    # chosen = kept columns + the lowest pruned ones up to NK; slot = rank among chosen (ascending)
    kp = keep.to(tl.int32)
    pruned_before = tl.cumsum(1 - kp, axis=2) - (1 - kp)
    chosen = keep | (pruned_before < (NK - tl.sum(kp, axis=2))[:, :, None])
    ch = chosen.to(tl.int32)
    slot = tl.cumsum(ch, axis=2) - ch
    # values: each chosen column goes to its slot g*NK + slot (a chosen pruned column writes 0)
    s = g[None, :, None] * NK + slot
    tl.store(v_ptr + r[:, None, None] * svr + s, tl.where(keep, w, tl.zeros_like(w)), mask=chosen & r_ok & (s < SV))
    # metadata: the group's code holds its NK indices, slot j at bit j*BITS
    c = tl.arange(0, MG)[None, None, :]
    code = tl.sum(tl.where(chosen, c << (slot * BITS), 0), axis=2)         # (BR, BG)
    code = tl.where((g < K // MG)[None, :], code, 0)
    if GB < 8:      # 8 // GB groups per byte
        GPB: tl.constexpr = 8 // GB
        byte = tl.sum(tl.reshape(code, (BR, BG // GPB, GPB)) << (tl.arange(0, GPB) * GB)[None, None, :], axis=2)
        b = tl.program_id(1) * (BG // GPB) + tl.arange(0, BG // GPB)
        tl.store(m_ptr + r[:, None] * smr + b[None, :], byte.to(tl.uint8), mask=(r < R)[:, None] & (b < SM)[None, :])
    else:           # GB // 8 bytes per group: one little-endian word
        if GB == 8:
            wty: tl.constexpr = tl.uint8
        elif GB == 16:
            wty: tl.constexpr = tl.int16
        else:
            wty: tl.constexpr = tl.int32
        mw = m_ptr.to(tl.pointer_type(wty))
        tl.store(mw + r[:, None] * (smr // (GB // 8)) + g[None, :], code.to(wty),
                 mask=(r < R)[:, None] & (g * (GB // 8) < SM)[None, :])


@triton.jit
def _bitmap_kernel(k_ptr, bm_ptr, R, K, skr, skk, sbr, SB, BR: tl.constexpr, BB: tl.constexpr):
    """mask (R, K) uint8 -> bitmap (R, SB) uint8, bit ``c % 8`` of byte ``c // 8``."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    b = tl.program_id(1) * BB + tl.arange(0, BB)
    col = b[:, None] * 8 + tl.arange(0, 8)[None, :]
    ok = (r < R)[:, None, None] & (col < K)[None, :, :]
    keep = tl.load(k_ptr + r[:, None, None] * skr + col[None, :, :] * skk, mask=ok, other=0) != 0
    byte = tl.sum(keep.to(tl.int32) << tl.arange(0, 8)[None, None, :], axis=2)
    tl.store(bm_ptr + r[:, None] * sbr + b[None, :], byte.to(tl.uint8), mask=(r < R)[:, None] & (b < SB)[None, :])


@triton.jit
def _fwd_kernel(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, M_CLASS,
                sxm, sxk, svr, smr, sym, syn,
                HAS_BIAS: tl.constexpr, NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr,
                PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """y (M, N) = x (M, K) @ (W*M)^T (+ b); W packed (N rows). Grid (tiles of y, SPLIT_K).

    Computed transposed, y^T tile (BN, BM) = W tile (BN, BK) @ x^T (BK, BM): the decoded weight is
    the MMA's A operand straight from registers and the (small) M is the MMA's N dimension."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_n = tl.cdiv(N, BN)
    rm = (pid // grid_n) * BM + tl.arange(0, BM)
    rn = (pid % grid_n) * BN + tl.arange(0, BN)
    m_ok, n_ok = rm < M, rn < N
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum(k_tiles, (pid_k + 1) * per_split)):
        rk = t * BK + tl.arange(0, BK)
        xt = tl.load(x_ptr + rm[None, :] * sxm + rk[:, None] * sxk, mask=m_ok[None, :] & (rk < K)[:, None], other=0.0)
        w = _nm_tile(v_ptr, m_ptr, rn, n_ok, t * (BK // MG * NK), K // MG * NK, svr, smr, BN, BK, NK, MG, BITS)
        acc = _dot(w, xt, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[:, None]
    _store_tile(acc, y_ptr + rn[:, None] * syn + rm[None, :] * sym, n_ok[:, None] & m_ok[None, :],
                ws_ptr, rm[None, :] * N + rn[:, None], M * N, lock_ptr, pid, pid_k, SPLIT_K)


@triton.jit
def _dx_kernel(dy_ptr, v_ptr, m_ptr, dx_ptr, ws_ptr, lock_ptr, M, N, K, M_CLASS,
               sdm, sdn, svr, smr, sxm, sxk,
               NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """dx (M, K) = dy (M, N) @ (W*M), W packed (N rows): tiles of dx, the loop walks the packed
    rows in chunks of BN (split SPLIT_K ways) decoding the (BN, BK) column slab of each.
    Computed transposed like the forward: dx^T tile (BK, BM) = (W slab)^T @ dy^T."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_k = tl.cdiv(K, BK)
    rm = (pid // grid_k) * BM + tl.arange(0, BM)
    kt = pid % grid_k
    rk = kt * BK + tl.arange(0, BK)
    m_ok = rm < M
    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    acc = tl.zeros((BK, BM), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum(n_tiles, (pid_k + 1) * per_split)):
        rn = t * BN + tl.arange(0, BN)
        dyt = tl.load(dy_ptr + rm[None, :] * sdm + rn[:, None] * sdn, mask=m_ok[None, :] & (rn < N)[:, None], other=0.0)
        w = _nm_tile(v_ptr, m_ptr, rn, rn < N, kt * (BK // MG * NK), K // MG * NK, svr, smr, BN, BK, NK, MG, BITS)
        acc = _dot(tl.trans(w), dyt, acc, PREC)
    _store_tile(acc, dx_ptr + rk[:, None] * sxk + rm[None, :] * sxm, (rk < K)[:, None] & m_ok[None, :],
                ws_ptr, rm[None, :] * K + rk[:, None], M * K, lock_ptr, pid, pid_k, SPLIT_K)


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, bm_ptr, dw_ptr, ws_ptr, lock_ptr, M, N, K, M_CLASS,
               sdm, sdn, sxm, sxk, sbr, swn, swk,
               PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, SPLIT_K: tl.constexpr):
    """dW (N, K) = (dy^T x) * mask, zeros at pruned positions: tiles (BN, BK), loop over the M
    rows of dy / x in chunks of BB (split SPLIT_K ways); kept positions from the bitmap."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_k = tl.cdiv(K, BK)
    rn = (pid // grid_k) * BN + tl.arange(0, BN)
    rk = (pid % grid_k) * BK + tl.arange(0, BK)
    n_ok, k_ok = rn < N, rk < K
    b_tiles = tl.cdiv(M, BB)
    per_split = tl.cdiv(b_tiles, SPLIT_K)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum(b_tiles, (pid_k + 1) * per_split)):
        rb = t * BB + tl.arange(0, BB)
        b_ok = rb < M
        a = tl.load(dy_ptr + rb[None, :] * sdm + rn[:, None] * sdn, mask=n_ok[:, None] & b_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rb[:, None] * sxm + rk[None, :] * sxk, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, x, acc, PREC)
    ok = n_ok[:, None] & k_ok[None, :]
    keep = _bitmap_keep(bm_ptr, tl.where(n_ok, rn, 0), tl.where(k_ok, rk, 0), sbr)
    acc = tl.where(keep, acc, 0.0)
    _store_tile(acc, dw_ptr + rn[:, None] * swn + rk[None, :] * swk, ok,
                ws_ptr, rn[:, None] * K + rk[None, :], N * K, lock_ptr, pid, pid_k, SPLIT_K)


# ------------------------------------------------------------------------------------------------
# launch configuration: autotuned per shape class on GPUs, one small config under the interpreter
# ------------------------------------------------------------------------------------------------
def _m_class(m: int) -> int:
    """Shape class of the GEMM M used as autotune key: the power of two >= M (at least 16): 16, 32,
    64 (memory-bound), 128, ... Every M of a class shares one tuned config, so whatever the config
    depends on (SPLIT_K) is computed from the class (:func:`_class_rows`), never from M itself."""
    return max(16, triton.next_power_of_2(max(m, 1)))


def _class_rows(m_class: int) -> int:
    """The smallest M of class ``m_class`` (1 for the first class): split-K decisions use it, so the
    split fits every M of the class -- fewest reduction tiles, fewest output tiles."""
    return 1 if m_class <= 16 else m_class // 2 + 1


def _pick_split(tiles: int, red_tiles: int, sms: int, max_split: int = 8) -> int:
    """Smallest power-of-two split of the reduction giving >= 2 waves of programs (each split
    keeps >= 4 reduction tiles)."""
    split = 1
    while split < max_split and tiles * split < 2 * sms and red_tiles // (split * 2) >= 4:
        split *= 2
    return split


def _cfg(bm, bn, bk, warps, stages, **kw):
    return triton.Config(dict(BM=bm, BN=bn, BK=bk, SPLIT_K=1, **kw), num_warps=warps, num_stages=stages)


# (BM, BN, BK): for fwd BN tiles the weight rows, BK the reduction; for dx BN is the reduction
# (weight rows) and BK the output columns. Small M: BM = M class, weight slabs of 64-128 rows,
# split-K chosen per shape (_pick_split).
_SMALL_CONFIGS = [_cfg(bm, bn, bk, 8 if bm * bn >= 8192 or bn * bk >= 16384 else 4, s) for bm in (16, 32, 64)
                  for bn, bk in ((64, 128), (128, 64), (128, 128), (64, 64)) for s in (3, 4)]
_LARGE_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 4, 4)]
_DW_CONFIGS = [triton.Config(dict(BN=bn, BK=bk, BB=bb, SPLIT_K=1), num_warps=w, num_stages=s)
               for bn, bk, bb, w, s in ((64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 4),
                                        (64, 64, 64, 4, 3))]


def _split_for(kind: str, kw: dict, m_class: int, N: int, K: int, sms: int) -> int:
    """SPLIT_K for config ``kw`` of GEMM ``kind`` ("fwd": y(M,N) reduce K; "dx": dx(M,K) reduce N;
    "dw": dW(N,K) reduce M) -- a function of the autotune key (M class, N, K) only: the tuned config
    is reused for every M of the class, and the workspace is sized from the same key."""
    M = _class_rows(m_class)
    if kind == "fwd":
        tiles, red = triton.cdiv(M, kw["BM"]) * triton.cdiv(N, kw["BN"]), triton.cdiv(K, kw["BK"])
    elif kind == "dx":
        tiles, red = triton.cdiv(M, kw["BM"]) * triton.cdiv(K, kw["BK"]), triton.cdiv(N, kw["BN"])
    else:
        tiles, red = triton.cdiv(N, kw["BN"]) * triton.cdiv(K, kw["BK"]), triton.cdiv(M, kw["BB"])
    return _pick_split(tiles, red, sms)


def _candidates(kind: str, configs: list, M: int, N: int, K: int, sms: int) -> list:
    """The configs of this M class (small M: BM = M class), each with its SPLIT_K (from the class)."""
    out = []
    cls = _m_class(M)
    for c in configs:
        if kind != "dw" and M <= SMALL_M and c.kwargs["BM"] != min(cls, 64):
            continue
        kw = dict(c.kwargs, SPLIT_K=_split_for(kind, c.kwargs, cls, N, K, sms))
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out or [configs[0]]


#: autotune key of the linear kernels: SPLIT_K (and so the workspace) depends on nothing else;
#: PREC (fp32: "tf32" / "ieee", from torch's fp32 matmul precision) selects a different kernel
_GEMM_KEY = ["M_CLASS", "N", "K", "PREC"]


def _tuned(kernel, configs, kind):
    def prune(cfgs, named_args, **kwargs):
        # Triton passes the positional arguments as ``named_args`` and the keyword ones as kwargs;
        # _launch passes everything by keyword
        a = {**named_args, **kwargs}
        dev = a["ws_ptr"].device
        return _candidates(kind, cfgs, a["M"], a["N"], a["K"], _num_sms(dev.index))
    tuner = triton.autotune(configs=configs, key=_GEMM_KEY, prune_configs_by={"early_config_prune": prune})
    return tuner(kernel), configs


_FWD = {False: _tuned(_fwd_kernel, _SMALL_CONFIGS, "fwd"), True: _tuned(_fwd_kernel, _LARGE_CONFIGS, "fwd")}
_DX = {False: _tuned(_dx_kernel, _SMALL_CONFIGS, "dx"), True: _tuned(_dx_kernel, _LARGE_CONFIGS, "dx")}
_DW = {False: _tuned(_dw_kernel, _DW_CONFIGS, "dw")}
#: the single config used under TRITON_INTERPRET=1 (SPLIT_K=2 exercises the split-K path)
_INTERP = dict(BM=16, BN=16, BK=32, BB=16, SPLIT_K=2)
_PACK_CFG = dict(BR=16, BG=32)


class _Scratch:
    """Split-K scratch: self-resetting int32 tile counters, cached per device and stream (fresh
    zeros while a CUDA graph is being captured). Partials are allocated per call."""

    def __init__(self) -> None:
        self._locks: dict[tuple, torch.Tensor] = {}

    def locks(self, device: torch.device, n: int) -> torch.Tensor:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
        buf = self._locks.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            self._locks[key] = buf
        return buf


_SCRATCH = _Scratch()


def _workspace_numel(split: int, out_numel: int) -> int:
    """Elements of the fp32 split-K workspace (0 without a split); refuses what int32 offsets cannot
    address."""
    if split <= 1:
        return 0
    n = split * out_numel
    if n > INT32_MAX:
        raise RuntimeError(f"triton N:M: split-K workspace of {split} x {out_numel} elements exceeds the "
                           "kernels' int32 offsets")
    return n


def _launch(kernel, tuned: tuple, grid, args: dict, out: torch.Tensor, max_split, tiles: int) -> None:
    """Launch ``kernel`` writing ``out``: one small config under the interpreter, else the
    autotuner ``tuned = (autotuner, configs)``. ``grid(meta) -> tuple``; ``args`` are the
    non-config arguments without ``ws_ptr``/``lock_ptr``, which are added here: fp32 partials
    (SPLIT_K x out.numel()) and ``tiles`` counters when some candidate config splits, else dummies.
    ``max_split() -> int``: the largest SPLIT_K the autotuner may pick for any call of this
    autotune key (a function of the key, like the configs' SPLIT_K, so a config cached at another M
    of the same key fits the workspace). Runs under a device guard for ``out``'s device."""
    dev = out.device
    if interpreting():
        cfg = {k: v for k, v in _INTERP.items() if k in kernel.arg_names}
        split = cfg.get("SPLIT_K", 1)
    else:
        split = max_split()
    ws = _workspace_numel(split, out.numel())
    if ws:
        args["ws_ptr"] = torch.empty(ws, dtype=torch.float32, device=dev)
        args["lock_ptr"] = _SCRATCH.locks(dev, tiles)
    elif "ws_ptr" in kernel.arg_names:
        args["ws_ptr"], args["lock_ptr"] = out, out
    with device_guard(dev):
        if interpreting():
            kernel[grid(cfg)](**args, **cfg)
        else:
            tuned[0][grid](**args)


@functools.lru_cache(maxsize=4096)
def _max_split(kind: str, m_class: int, N: int, K: int, sms: int) -> int:
    """Largest SPLIT_K among the candidate configs of a linear GEMM of this autotune key -- the same
    for every M of the class (cached: no per-call loop)."""
    M = _class_rows(m_class)  # a representative M: the candidates depend on the class only
    cfgs = {"fwd": _FWD, "dx": _DX, "dw": _DW}[kind][kind != "dw" and M > SMALL_M][1]
    return max(c.kwargs["SPLIT_K"] for c in _candidates(kind, cfgs, M, N, K, sms))


def _gemm_split(kind: str, M: int, N: int, K: int, dev: torch.device):
    return lambda: _max_split(kind, _m_class(M), N, K, _num_sms(_dev_index(dev)))


def _dev_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _check_numel(*ts: torch.Tensor) -> None:
    """The kernels index with int32 offsets: refuse tensors of more than 2**31-1 elements."""
    for t in ts:
        if t is not None and t.numel() > INT32_MAX:
            raise RuntimeError(f"triton N:M: a tensor of shape {tuple(t.shape)} has more than 2**31-1 elements "
                               "(the kernels use 32-bit offsets)")


def _max_tiles(a: int, b: int) -> int:
    """Upper bound on output tiles of an (a, b) output over every config (smallest tile 16x16)."""
    return triton.cdiv(a, 16) * triton.cdiv(b, 16)


# ------------------------------------------------------------------------------------------------
# host functions
# ------------------------------------------------------------------------------------------------
def pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> fmt.NMPacked:
    """Triton pack of ``weight*mask`` (2-D, or 4-D conv weight in reduction view) -> NMPacked,
    bit-identical to :func:`sparsefast.formats.nm.pack` (mask must be N:M; not re-checked)."""
    w2, k2 = reduction_view(weight), reduction_view(mask)
    R, K = w2.shape
    sv, sm = fmt.row_strides(K, n, m)
    values = torch.empty(R, sv, dtype=weight.dtype, device=weight.device)
    meta = torch.empty(R, sm, dtype=torch.uint8, device=weight.device)
    k2 = k2.view(torch.uint8) if k2.dtype == torch.bool else k2
    bits = fmt.meta_bits(m)
    groups = max(triton.cdiv(sv, n), triton.cdiv(sm * (8 // bits), n))
    cfg = dict(BR=8, BG=16) if interpreting() else _PACK_CFG
    grid = (triton.cdiv(R, cfg["BR"]), triton.cdiv(groups, cfg["BG"]))
    _check_numel(w2, k2, values)
    with device_guard(weight.device):
        _pack_kernel[grid](w2, k2, values, meta, R, K, w2.stride(0), w2.stride(1), k2.stride(0), k2.stride(1),
                           values.stride(0), meta.stride(0), sv, sm, NK=n, MG=m, BITS=bits, **cfg)
    return fmt.NMPacked(values, meta, n, m, tuple(weight.shape))


def bitmap(mask: torch.Tensor) -> torch.Tensor:
    """1 bit per weight of a mask in reduction view: ``(R, ceil(K/8) rounded up to 16)`` uint8."""
    k2 = reduction_view(mask)
    k2 = k2.view(torch.uint8) if k2.dtype == torch.bool else k2
    R, K = k2.shape
    sb = max(fmt._round_up(triton.cdiv(K, 8), 16), 16)
    out = torch.empty(R, sb, dtype=torch.uint8, device=mask.device)
    BR, BB = (8, 16) if interpreting() else (16, 64)
    _check_numel(k2)
    with device_guard(mask.device):
        _bitmap_kernel[(triton.cdiv(R, BR), triton.cdiv(sb, BB))](k2, out, R, K, k2.stride(0), k2.stride(1),
                                                                   sb, sb, BR=BR, BB=BB)
    return out


def linear_fwd(x: torch.Tensor, p: fmt.NMPacked, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K) @ unpack(p)^T + bias`` -> (M, N) in x's dtype."""
    M, K = x.shape
    N = p.rows
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _check_numel(x, y, p.values)
    args = dict(x_ptr=x, v_ptr=p.values, m_ptr=p.meta, b_ptr=bias.contiguous() if bias is not None else y, y_ptr=y,
                M=M, N=N, K=K, M_CLASS=_m_class(M), sxm=x.stride(0), sxk=x.stride(1), svr=p.values.stride(0),
                smr=p.meta.stride(0), sym=y.stride(0), syn=y.stride(1), HAS_BIAS=bias is not None,
                NK=p.n, MG=p.m, BITS=p.bits, PREC=_prec(x.dtype))
    grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"]), c["SPLIT_K"])  # noqa: E731
    _launch(_fwd_kernel, _FWD[M > SMALL_M], grid, args, y, _gemm_split("fwd", M, N, K, y.device), _max_tiles(M, N))
    return y


def linear_dx_general(dy: torch.Tensor, p: fmt.NMPacked) -> torch.Tensor:
    """``dy (M, N) @ unpack(p)`` -> (M, K) for any N:M mask (no transposed copy)."""
    M, N = dy.shape
    K = p.cols
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    _check_numel(dy, dx, p.values)
    args = dict(dy_ptr=dy, v_ptr=p.values, m_ptr=p.meta, dx_ptr=dx, M=M, N=N, K=K, M_CLASS=_m_class(M),
                sdm=dy.stride(0), sdn=dy.stride(1), svr=p.values.stride(0), smr=p.meta.stride(0),
                sxm=dx.stride(0), sxk=dx.stride(1), NK=p.n, MG=p.m, BITS=p.bits, PREC=_prec(dy.dtype))
    grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(K, c["BK"]), c["SPLIT_K"])  # noqa: E731
    _launch(_dx_kernel, _DX[M > SMALL_M], grid, args, dx, _gemm_split("dx", M, N, K, dx.device), _max_tiles(M, K))
    return dx


def linear_dw(dy: torch.Tensor, x: torch.Tensor, bm: torch.Tensor) -> torch.Tensor:
    """``(dy^T x) * mask`` with the mask as a :func:`bitmap`: dy (M, N), x (M, K) -> (N, K)."""
    M, N = dy.shape
    K = x.shape[1]
    dw = torch.empty(N, K, dtype=dy.dtype, device=dy.device)
    if dw.numel() == 0:
        return dw
    _check_numel(dy, x, dw)
    args = dict(dy_ptr=dy, x_ptr=x, bm_ptr=bm, dw_ptr=dw, M=M, N=N, K=K, M_CLASS=_m_class(M),
                sdm=dy.stride(0), sdn=dy.stride(1), sxm=x.stride(0), sxk=x.stride(1),
                sbr=bm.stride(0), swn=dw.stride(0), swk=dw.stride(1), PREC=_prec(dy.dtype))
    grid = lambda c: (triton.cdiv(N, c["BN"]) * triton.cdiv(K, c["BK"]), c["SPLIT_K"])  # noqa: E731
    _launch(_dw_kernel, _DW[False], grid, args, dw, _gemm_split("dw", M, N, K, dw.device), _max_tiles(N, K))
    return dw


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
def _int32_reasons(q: OpQuery) -> list[str]:
    """The kernels' int32 offsets: the weight and the GEMM operands a query reveals (rows x the wider
    of in/out features; for conv, output pixels x output channels) must stay under 2**31 elements."""
    shape = tuple(q.weight_shape)
    out = []
    numel = math.prod(shape)
    if numel > INT32_MAX:
        out.append(f"triton N:M kernels use 32-bit offsets: weight {shape} has {numel} > 2**31-1 elements")
    if q.m_rows is not None and len(shape) >= 2:
        width = max(shape[0], math.prod(shape[1:])) if q.op == "linear" else shape[0]
        if q.m_rows * width > INT32_MAX:
            out.append(f"triton N:M kernels use 32-bit offsets: {q.m_rows} rows x {width} exceeds 2**31-1 elements")
    return out


class Impl(Backend):
    """N:M part of the ``"triton"`` backend (the dispatcher ``TritonBackend`` checks device and
    dtype -- float32/float16/bfloat16 -- before asking for the pattern- and shape-specific reasons)."""

    name = "triton"
    #: how ``linear_dx`` reads W^T: "auto" (transposed copy when the mask is transposable),
    #: "transposed" (same, required) or "general" (always the packed-row walking kernel)
    dx_path = "auto"

    # ---- support ------------------------------------------------------------------------------
    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        pat, reasons = q.pattern, []
        if not pat.is_nm:
            return [f"triton N:M kernels need an N:M pattern, got {pat}"]
        if pat.m not in SUPPORTED_M or pat.n not in SUPPORTED_N:
            reasons.append(f"triton N:M kernels support m in {SUPPORTED_M} and n in {SUPPORTED_N} "
                           f"(n < m), not {pat}")
        shape = tuple(q.weight_shape)
        if q.op == "linear":
            if len(shape) != 2 or shape[1] % pat.m:
                reasons.append(f"linear weight {shape}: in_features must be divisible by m={pat.m}")
        elif q.op == "conv":
            if len(shape) != 4 or shape[1] % pat.m:
                reasons.append(f"conv weight {shape}: in_channels/groups must be divisible by m={pat.m}")
        else:
            reasons.append(f"unknown op {q.op!r}")
        reasons.extend(_int32_reasons(q))
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        if q.m_rows is None:
            return "GEMM row count unknown; the N:M kernels only pay on memory-bound calls (M <= 64)"
        if q.m_rows > SMALL_M:
            return (f"compute-bound call (M={q.m_rows} > {SMALL_M}): Triton has no sparse tensor-core "
                    "instruction, so the N:M kernel does the dense FLOPs plus decoding and is not "
                    "competitive with cuBLAS/cuDNN here")
        numel = math.prod(q.weight_shape)
        if numel < MIN_WEIGHT_NUMEL:
            return (f"weight of {numel} elements is too small for the bytes saved to beat launch "
                    f"overhead (sparse pays from {MIN_WEIGHT_NUMEL})")
        return None

    # ---- formats ------------------------------------------------------------------------------
    def pack(self, weight, mask, pattern: Pattern) -> fmt.NMPacked:
        return pack(weight.detach(), mask, pattern.n, pattern.m)

    def _bitmap(self, mask) -> torch.Tensor:
        return self.cached("nm-bitmap", (mask,), lambda: bitmap(mask))

    def _transposed(self, weight, mask, pattern: Pattern) -> fmt.NMPacked | None:
        """Packed (W*M)^T when the dx fast path applies (else None)."""
        if self.dx_path == "general" or weight.dim() != 2:
            return None
        n, m = pattern.n, pattern.m
        ok = weight.shape[0] % m == 0 and self.cached(
            "nm-transposable", (mask,), lambda: is_transposable_nm(mask, n, m), str(pattern))
        if not ok:
            if self.dx_path == "transposed":
                raise RuntimeError(f"dx_path='transposed' needs a transposable {pattern} mask")
            return None
        return self.cached("nm-pack-t", (weight, mask),
                           lambda: pack(weight.detach().t(), mask.t(), n, m), str(pattern))

    # ---- linear -------------------------------------------------------------------------------
    def linear_fwd(self, x, weight, mask, bias, pattern):
        return linear_fwd(x, self.packed(weight, mask, pattern), bias)

    def linear_dx(self, dy, weight, mask, pattern):
        pt = self._transposed(weight, mask, pattern)
        if pt is not None:
            return linear_fwd(dy, pt, None)
        return linear_dx_general(dy, self.packed(weight, mask, pattern))

    def linear_dw(self, dy, x, mask, pattern):
        return linear_dw(dy, x, self._bitmap(mask))

    # ---- conv (implicit GEMM, see _nm_conv) ---------------------------------------------------
    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        from . import _nm_conv
        return _nm_conv.conv_fwd(x, self.packed(weight, mask, pattern), bias, conv)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        from . import _nm_conv
        return _nm_conv.conv_dx(dy, self.packed(weight, mask, pattern), conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        from . import _nm_conv
        return _nm_conv.conv_dw(dy, x, self._bitmap(mask), conv, weight_shape)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed)
# ------------------------------------------------------------------------------------------------
_PTR_TY = {"m_ptr": "*u8", "k_ptr": "*u8", "bm_ptr": "*u8", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
#: per kernel: int args the runtime sees as multiples of 16, and strides it sees as 1 (for
#: 4096-wide layers, contiguous row-major / channels-last tensors); pointers are 16-aligned
_AOT_HINTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_fwd_kernel": (("N", "K", "svr", "smr", "sxm", "sym"), ("sxk", "syn")),
    "_dx_kernel": (("N", "K", "svr", "smr", "sdm", "sxm"), ("sdn", "sxk")),
    "_dw_kernel": (("N", "K", "sdm", "sxm", "sbr", "swn"), ("sdn", "sxk", "swk")),
    "_pack_kernel": (("K", "swr", "skr", "svr", "smr", "SV", "SM"), ("swk", "skk")),
}


def _spec(kernel, dtype: torch.dtype, cfg: triton.Config, fixed: dict, name: str,
          expect: dict | None = None) -> AotSpec:
    """AotSpec for ``kernel`` with config ``cfg`` plus constexprs ``fixed``, hinted per _AOT_HINTS."""
    aligned, ones = _AOT_HINTS[kernel.__name__]
    t = _TY[dtype]
    ints = {a: 1 if a in ones else 16 if a in aligned else 3 for a in kernel.arg_names}
    sig, ce, attrs = specialize(kernel, lambda a: _PTR_TY.get(a, f"*{t}"), ints, {**cfg.kwargs, **fixed})
    label = " ".join(f"{k}{v}" for k, v in cfg.kwargs.items() if k != "SPLIT_K")
    return AotSpec(kernel, sig, ce, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), attrs,
                   f"{name} {label} w{cfg.num_warps} s{cfg.num_stages}", expect)


#: the memory-bound forward / dx kernels: tensor cores (wgmma on sm_90, A operand = decoded weight
#: from registers), 16-byte loads of the packed values, no spills
_EXPECT_MB = dict(tensor_core=True, wgmma=True, vector_loads=True, hot=True)
_EXPECT_MMA = dict(tensor_core=True, hot=True)


def aot_compile_configs(patterns: Sequence[str] = ("2:4",), dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
                        split_k: int = 4) -> list[AotSpec]:
    """Every autotune config of every N:M kernel (linear, pack, conv) for each pattern x dtype, as
    a list of :class:`AotSpec` -- NamedTuples ``(kernel, signature, constexprs, options, attrs, name, expect)``
    whose first three fields are what ``triton.compile(ASTSource(kernel, signature, constexprs,
    attrs), target=GPUTarget("cuda", 90, 32), options=options)`` needs. Argument hints mirror what
    the runtime specializes for 4096-wide contiguous layers (16-divisible sizes/strides, unit
    strides as constexpr 1); ``split_k`` is the SPLIT_K compiled for the split configs (the runtime
    picks it per shape)."""
    from ...masks import parse_pattern
    from . import _nm_conv

    specs: list[AotSpec] = []
    for ps in patterns:
        pat = parse_pattern(ps)
        nm = dict(NK=pat.n, MG=pat.m, BITS=fmt.meta_bits(pat.m))
        for dt in dtypes:
            tag = f"{pat} {_TY[dt]}"
            for cls, cfgs, split in (("small", _SMALL_CONFIGS, split_k), ("large", _LARGE_CONFIGS, 1)):
                for c in cfgs:
                    ex = _EXPECT_MB if cls == "small" else _EXPECT_MMA
                    specs.append(_spec(_fwd_kernel, dt, c, dict(nm, PREC="ieee", HAS_BIAS=True, SPLIT_K=split),
                                       f"fwd {cls} {tag} split{split}", ex))
                    specs.append(_spec(_dx_kernel, dt, c, dict(nm, PREC="ieee", SPLIT_K=split),
                                       f"dx {cls} {tag} split{split}", ex))
            for c in _DW_CONFIGS:
                specs.append(_spec(_dw_kernel, dt, c, dict(PREC="ieee", SPLIT_K=split_k), f"dw {tag} split{split_k}",
                                   _EXPECT_MMA))
            specs.append(_spec(_pack_kernel, dt, triton.Config(_PACK_CFG, num_warps=4, num_stages=1), nm,
                               f"pack {tag}", dict(hot=True)))
            specs.extend(_nm_conv.aot_specs(pat, dt, nm))
    return specs


def aot_report(arch: int = 90, specs: Sequence[AotSpec] | None = None) -> list[dict]:
    """Compile ``specs`` (default :func:`aot_compile_configs`) for ``sm_<arch>`` without a GPU and
    read registers / spills / shared memory from the cubin. Returns one dict per spec:
    ``name, regs, spill_bytes (local memory), shared, mma`` (tensor-core instruction seen in the PTX),
    or ``name, error`` when it does not compile."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("AOT compilation needs real (not interpreted) kernels: run it in a process "
                           "without TRITON_INTERPRET=1, e.g. `python -m sparsefast.backends.triton.nm --aot`")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for s in specs if specs is not None else aot_compile_configs():
        src = triton.compiler.ASTSource(fn=s.kernel, signature=s.signature, constexprs=s.constexprs, attrs=s.attrs)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=s.options)
        except Exception as e:  # noqa: BLE001 - a report lists failures instead of stopping
            rows.append(dict(name=s.name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        reg = re.search(r"REG:(\d+)", res)
        local = re.search(r"LOCAL:(\d+)", res)
        ptx = k.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
        rows.append(dict(name=s.name, regs=int(reg.group(1)) if reg else -1,
                         spill_bytes=int(local.group(1)) if local else -1, shared=k.metadata.shared, mma=mma))
    return rows


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m sparsefast.backends.triton.nm --aot [--arch 90] [--pattern 2:4] [--dtype bf16]
    [--filter TEXT]``: compile every autotune config for the target and print one JSON row each."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--aot", action="store_true", required=True)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--pattern", action="append")
    ap.add_argument("--dtype", action="append", choices=list(_TY.values()))
    ap.add_argument("--filter", default="")
    a = ap.parse_args(argv)
    dts = [d for d, t in _TY.items() if t in (a.dtype or ["bf16"])]
    specs = [s for s in aot_compile_configs(a.pattern or ["2:4"], dts) if a.filter in s.name]
    for row in aot_report(a.arch, specs):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    _main()
