"""Triton jit kernels of the unstructured backend (host side, launch configs and dispatch:
:mod:`sparsefast.backends.triton.unstructured`; format: :mod:`sparsefast.formats.unstructured`)."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice  # noqa: F401 - used inside kernels

from . import interpreting, triton_version

# ================================================================================================
# Triton kernels
# ================================================================================================
_INTERP: tl.constexpr = tl.constexpr(interpreting())
#: Which axis Triton's coalescing pass gives the threads of a warp when a load's / store's addresses
#: are provably contiguous along no axis (a tie): the first axis up to 3.6, the last axis from 3.7
#: on. The decoded weight tiles (``values + start[row] + rank``) and the conv im2col tiles (NCHW: only
#: the output pixels of a row are adjacent, which the compiler cannot prove) are such gathers. With
#: the threads along the first axis (rows / pixels) each thread keeps one row's bitmap words, kept
#: count and chunk pointer (one output pixel's coordinates) and walks its lanes; along the last axis
#: each thread holds one lane of many rows and all of their per-row state: under 3.8 that doubled
#: the registers of the tile-decode kernels and spilled 8-1768 B per thread in 21 bf16 configs on
#: sm_90 (conv forward, conv input gradient, conv dW; one Linear forward). :func:`_load_rows` /
#: :func:`_store_rows` put the threads on the first axis under both rules (``tl.trans`` is free: it
#: relabels the layout, no data moves), so every version compiles the 3.6 layout.
_TIE_LAST: tl.constexpr = tl.constexpr(triton_version() >= (3, 7))


@triton.jit
def _load_rows(ptrs, mask, other):
    """``tl.load(ptrs, mask, other)`` of a gathered 2-D tile, laid out with the threads of a warp
    along axis 0 whatever the Triton version (:data:`_TIE_LAST`). Same values either way; where the
    addresses are provably contiguous along an axis that axis still decides."""
    if _TIE_LAST:
        return tl.trans(tl.load(tl.trans(ptrs), mask=tl.trans(mask), other=other))
    return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _store_rows(ptrs, val, mask):
    """``tl.store(ptrs, val, mask)`` of a scattered 2-D tile with the threads along axis 0 (as
    :func:`_load_rows`)."""
    if _TIE_LAST:
        tl.store(tl.trans(ptrs), tl.trans(val), mask=tl.trans(mask))
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` on tensor cores. The interpreter's dot multiplies bfloat16 as raw integers, so
    there the operands go through float32 (exact: the products of 16-bit floats fit in fp32)."""
    if _INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _row_off(r, RD, RS0, RS1):
    """Address of row ``r`` of a 2-D view: ``(r // RD) * RS1 + (r % RD) * RS0``."""
    return (r // RD) * RS1 + (r % RD) * RS0


@triton.jit
def _col_off(k, CD, KW, CS0, CS1, CS2):
    """Address of column ``k`` of a 2-D view whose columns are ``(kh, kw, c)`` with ``c < CD`` fastest."""
    t = k // CD
    return (k % CD) * CS0 + (t % KW) * CS1 + (t // KW) * CS2


@triton.jit
def _popc(x):
    """Set bits of each int32: one ``POPC`` on the GPU; the SWAR formula in the interpreter (which
    has no libdevice)."""
    if _INTERP:
        x = x.to(tl.uint32, bitcast=True)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)
    return libdevice.popc(x)


@triton.jit
def _chunk(bm_ptr, rows, row_ok, c, WPR):
    """Chunk ``c`` of ``rows`` (bitmap row stride ``WPR`` words): the kept lanes ``[BN, 64]``, each
    lane's rank among its row's kept lanes (its value offset from the chunk pointer), and the kept
    count per row ``[BN]``."""
    w0 = tl.load(bm_ptr + rows * WPR + 2 * c, mask=row_ok, other=0)
    w1 = tl.load(bm_ptr + rows * WPR + 2 * c + 1, mask=row_ok, other=0)
    lane = tl.arange(0, 64)
    hi = lane[None, :] >= 32
    word = tl.where(hi, w1[:, None], w0[:, None])
    sh = (lane & 31)[None, :]
    n0 = _popc(w0)
    rank = _popc(word & ((1 << sh) - 1)) + tl.where(hi, n0[:, None], 0)
    return ((word >> sh) & 1) != 0, rank, n0 + _popc(w1)


@triton.jit
def _end(lo, step, n):
    """``min(lo + step, n)`` for scalars (a plain ``if``: works compiled and interpreted)."""
    hi = lo + step
    if hi > n:
        hi = n
    return hi


@triton.jit
def _pixels(m, OH, OW):
    """Output pixel ``m`` of an (B, OH, OW) grid -> (b, oh, ow)."""
    ow = m % OW
    t = m // OW
    return t // OH, t % OH, ow


@triton.jit
def _a_tile(a_ptr, a_row, m_ok, oh, ow, c, K, CA, KW, AH, AW, SH, SW, PH, PW, DH, DW, sa_c, sa_h, sa_w,
            IS_CONV: tl.constexpr, TRANSPOSED: tl.constexpr, CA_GE64: tl.constexpr):
    """``[BM, 64]`` tile of the GEMM's left operand at the reduction columns of chunk ``c``.

    Linear: ``A[m, k] = a[m, k]``. Conv (reduction order (kh, kw, c), c fastest): the input pixel read
    by output pixel (oh, ow) at kernel tap (kh, kw) is ``oh*SH - PH + kh*DH`` (forward) or, for the
    input gradient (TRANSPOSED), the dy pixel ``(oh + PH - kh*DH) / SH`` when that divides exactly.
    ``a_row`` holds the per-row part of the address (batch and group channel offset). With at least
    64 channels per group (``CA_GE64``) a chunk spans at most two kernel taps, so the column
    decomposition ``k -> (kh, kw, c)`` is two scalar divisions and a select instead of four vector ones."""
    k = c * 64 + tl.arange(0, 64)
    ok = m_ok[:, None] & (k < K)[None, :]
    if IS_CONV:
        if CA_GE64:
            t0 = (c * 64) // CA
            cc = (c * 64 - t0 * CA) + tl.arange(0, 64)
            wrap = cc >= CA
            cc = tl.where(wrap, cc - CA, cc)
            kw = tl.where(wrap, (t0 + 1) % KW, t0 % KW)
            kh = tl.where(wrap, (t0 + 1) // KW, t0 // KW)
        else:
            cc = k % CA
            kw = (k // CA) % KW
            kh = (k // CA) // KW
        if TRANSPOSED:
            hn = oh[:, None] + PH - kh[None, :] * DH
            wn = ow[:, None] + PW - kw[None, :] * DW
            hi = hn // SH
            wi = wn // SW
            ok = ok & (hn >= 0) & (wn >= 0) & (hn % SH == 0) & (wn % SW == 0) & (hi < AH) & (wi < AW)
        else:
            hi = oh[:, None] * SH - PH + kh[None, :] * DH
            wi = ow[:, None] * SW - PW + kw[None, :] * DW
            ok = ok & (hi >= 0) & (hi < AH) & (wi >= 0) & (wi < AW)
        ptrs = a_ptr + a_row[:, None] + cc[None, :] * sa_c + hi * sa_h + wi * sa_w
        return _load_rows(ptrs, ok, 0.0)
    else:
        ptrs = a_ptr + a_row[:, None] + k[None, :] * sa_c
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _index_kernel(mask_ptr, bm_ptr, cnt_ptr, R, K, C,
                  RD, RS0, RS1, CD, KW, CS0, CS1, CS2, BR: tl.constexpr):
    """Mask tile ``[BR, 64]`` -> two bitmap words and one kept count per row (grid: row blocks × chunks)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1)
    row_ok = rows < R
    lane = tl.arange(0, 64)
    k = c * 64 + lane
    ptrs = mask_ptr + _row_off(rows, RD, RS0, RS1)[:, None] + _col_off(k, CD, KW, CS0, CS1, CS2)[None, :]
    m = tl.load(ptrs, mask=row_ok[:, None] & (k < K)[None, :], other=0).to(tl.int32)
    sh = m << (lane & 31)[None, :]   # distinct bits: the sums below are bitwise ORs
    tl.store(bm_ptr + rows * (2 * C) + 2 * c, tl.sum(tl.where(lane[None, :] < 32, sh, 0), axis=1), mask=row_ok)
    tl.store(bm_ptr + rows * (2 * C) + 2 * c + 1, tl.sum(tl.where(lane[None, :] >= 32, sh, 0), axis=1), mask=row_ok)
    tl.store(cnt_ptr + rows * C + c, tl.sum(m, axis=1), mask=row_ok)


@triton.jit
def _pack_kernel(w_ptr, bm_ptr, cp_ptr, v_ptr, R, K, C,
                 RD, RS0, RS1, CD, KW, CS0, CS1, CS2, BR: tl.constexpr, CPP: tl.constexpr, COLS: tl.constexpr):
    """``values[...] = W[kept]`` (or, with ``COLS``, the kept column indices) for ``BR`` rows ×
    ``CPP`` chunks (grid: row blocks × chunk blocks)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    c0 = tl.program_id(1) * CPP
    start = tl.load(cp_ptr + rows * C + c0, mask=row_ok, other=0)
    row = _row_off(rows, RD, RS0, RS1)
    for c in range(c0, _end(c0, CPP, C)):
        keep, rank, cnt = _chunk(bm_ptr, rows, row_ok, c, 2 * C)
        k = c * 64 + tl.arange(0, 64)
        if COLS:
            w = (k[None, :] + rank * 0).to(v_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptr + row[:, None] + _col_off(k, CD, KW, CS0, CS1, CS2)[None, :], mask=keep)
        _store_rows(v_ptr + start[:, None] + rank, w, keep)
        start += cnt


@triton.jit
def _xt_kernel(x_ptr, xt_ptr, flags_ptr, M, K, s_xm, s_xk, BMX: tl.constexpr, BK: tl.constexpr):
    """``xT[k, m] = x[m, k]`` (zero for ``M <= m < BMX``) for a block of ``BK`` columns, and
    per row of x the number of NaN (``flags[m]``) and ±Inf (``flags[BMX + m]``) entries (atomics)."""
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    m = tl.arange(0, BMX)
    x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :] * s_xk, mask=(m < M)[:, None] & (k < K)[None, :],
                other=0.0)
    tl.store(xt_ptr + k[None, :] * BMX + m[:, None], x, mask=(k < K)[None, :])
    xf = x.to(tl.float32)
    nan = tl.sum((xf != xf).to(tl.int32), axis=1)
    inf = tl.sum((tl.abs(xf) == float("inf")).to(tl.int32), axis=1)
    tl.atomic_add(flags_ptr + m, nan, mask=nan > 0)
    tl.atomic_add(flags_ptr + BMX + m, inf, mask=inf > 0)


@triton.jit
def _gather_kernel(xt_ptr, flags_ptr, rp_ptr, RPS, col_ptr, v_ptr, perm_ptr, bias_ptr, out_ptr, R, M, so_m, so_n,
                   BMX: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row-wise SpMM on CUDA cores for few rows of x: ``out[m, r] = Σ_j v_j · xT[col_j, m]`` over the
    kept entries j of row r (``rowptr[r] = rp[r * RPS]``), for ``BR`` rows taken in ``perm`` order
    (sorted by kept count, heaviest first, so a program's rows have similar counts and long ones
    start first). Each kept entry gathers one contiguous ``BMX``-vector of ``xT`` (x transposed and
    zero-padded by ``_xt_kernel``); work is ``nnz × BMX`` fp32 FMAs.

    The reference multiplies pruned weights too, so a NaN in row m of x makes all of ``out[m, :]`` NaN
    and a ±Inf makes ``out[m, r]`` NaN unless row r keeps every infinite column: the epilogue
    reproduces both from the per-row counts (the Inf recount runs only when x holds an Inf)."""
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = i < R
    rows = tl.load(perm_ptr + i, mask=ok, other=0)
    lo = tl.load(rp_ptr + rows * RPS, mask=ok, other=0)
    cnt = tl.where(ok, tl.load(rp_ptr + (rows + 1) * RPS, mask=ok, other=0) - lo, 0)
    jmax = tl.max(cnt, axis=0)
    m = tl.arange(0, BMX)
    acc = tl.zeros((BR, BMX), dtype=tl.float32)
    for j in range(0, jmax):
        live = j < cnt
        v = tl.load(v_ptr + lo + j, mask=live, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + lo + j, mask=live, other=0).to(tl.int32)
        x = tl.load(xt_ptr + c[:, None] * BMX + m[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        acc += v[:, None] * x
    n_inf = tl.load(flags_ptr + BMX + m)
    if tl.max(n_inf, axis=0) > 0:
        kept_inf = tl.zeros((BR, BMX), dtype=tl.int32)
        for j in range(0, jmax):
            live = j < cnt
            c = tl.load(col_ptr + lo + j, mask=live, other=0).to(tl.int32)
            x = tl.load(xt_ptr + c[:, None] * BMX + m[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            kept_inf += (tl.abs(x) == float("inf")).to(tl.int32)
        acc = tl.where(kept_inf < n_inf[None, :], float("nan"), acc)
    acc = tl.where((tl.load(flags_ptr + m) > 0)[None, :], float("nan"), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + m[None, :] * so_m + rows[:, None] * so_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (m < M)[None, :])


@triton.jit
def _fwd_kernel(a_ptr, bm_ptr, cp_ptr, v_ptr, bias_ptr, out_ptr,
                M, NG, CA, K, C, CPS,
                AH, AW, OH, OW, KW, SH, SW, PH, PW, DH, DW,
                sa_b, sa_c, sa_h, sa_w, so_s, so_b, so_c, so_h, so_w,
                M_BUCKET: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IS_CONV: tl.constexpr,
                TRANSPOSED: tl.constexpr, CA_GE64: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """``out[m, g*NG + n] = Σ_k A[m, k] · P[g*NG + n, k]`` (+ bias) for one ``[BM, BN]`` tile and the
    chunk range ``[pid_s*CPS, (pid_s+1)*CPS)`` (grid: (M blocks · G·NB row blocks) × 1 × SPLIT; the
    M block varies fastest -- folded into axis 0 because G·NB alone can exceed axis 1's 65535 limit).

    ``P`` is the packed matrix (rows = output channels, grouped by ``NG``); a program walks its row
    block along K keeping a running value offset, so it reads one chunk pointer per row."""
    MB = tl.cdiv(M, BM)
    pid_m = tl.program_id(0) % MB
    pid_n = tl.program_id(0) // MB
    pid_s = tl.program_id(2)
    NB = tl.cdiv(NG, BN)
    g = pid_n // NB
    n = (pid_n % NB) * BN + tl.arange(0, BN)
    n_ok = n < NG
    rows = g * NG + n
    m = pid_m * BM + tl.arange(0, BM)
    m_ok = m < M
    if IS_CONV:
        b, oh, ow = _pixels(m, OH, OW)
        a_row = b * sa_b + g * CA * sa_c
        o_row = b * so_b + oh * so_h + ow * so_w
    else:
        oh = m
        ow = m
        a_row = m * sa_b
        o_row = m * so_b
    c_lo = pid_s * CPS
    start = tl.load(cp_ptr + rows * C + c_lo, mask=n_ok, other=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c in range(c_lo, _end(c_lo, CPS, C)):
        a = _a_tile(a_ptr, a_row, m_ok, oh, ow, c, K, CA, KW, AH, AW, SH, SW, PH, PW, DH, DW,
                    sa_c, sa_h, sa_w, IS_CONV, TRANSPOSED, CA_GE64)
        keep, rank, cnt = _chunk(bm_ptr, rows, n_ok, c, 2 * C)
        w = _load_rows(v_ptr + start[:, None] + rank, keep, 0.0)
        start += cnt
        acc = _mma(a, tl.trans(w), acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * so_s + o_row[:, None] + rows[None, :] * so_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dx_kernel(dy_ptr, bm_ptr, cp_ptr, v_ptr, out_ptr, M, N, K, C, RPS,
               s_dm, s_dn, so_s, so_m, so_k,
               M_BUCKET: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """``dx[m, k] = Σ_n dy[m, n] · P[n, k]`` for one ``[BM, 64]`` tile (chunk ``c``) over the rows
    ``[pid_s*RPS, (pid_s+1)*RPS)`` (grid: M blocks × chunks × SPLIT). Transposed traversal of the
    forward format: the decoded ``[BN, 64]`` tile is already the right operand."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_s = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    m_ok = m < M
    k = c * 64 + tl.arange(0, 64)
    acc = tl.zeros((BM, 64), dtype=tl.float32)
    n_lo = pid_s * RPS
    for n0 in range(n_lo, _end(n_lo, RPS, N), BN):
        rows = n0 + tl.arange(0, BN)
        ok = rows < N
        d = tl.load(dy_ptr + m[:, None] * s_dm + rows[None, :] * s_dn, mask=m_ok[:, None] & ok[None, :], other=0.0)
        keep, rank, _ = _chunk(bm_ptr, rows, ok, c, 2 * C)
        start = tl.load(cp_ptr + rows * C + c, mask=ok, other=0)
        w = _load_rows(v_ptr + start[:, None] + rank, keep, 0.0)
        acc = _mma(d, w, acc, PREC)
    out = out_ptr + pid_s * so_s + m[:, None] * so_m + k[None, :] * so_k
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (k < K)[None, :])


@triton.jit
def _dw_kernel(dy_ptr, a_ptr, bm_ptr, out_ptr,
               M, NG, CA, K, C, MPS,
               AH, AW, OH, OW, KW, SH, SW, PH, PW, DH, DW,
               sa_b, sa_c, sa_h, sa_w, sd_b, sd_c, sd_h, sd_w,
               so_s, RD, RS0, RS1, CD, CS0, CS1, CS2,
               M_BUCKET: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IS_CONV: tl.constexpr,
               CA_GE64: tl.constexpr, PREC: tl.constexpr):
    """Masked weight gradient (SDDMM) of one ``[BN, 64]`` tile over the rows ``[pid_s*MPS, ...)`` of
    M: ``dW[n, k] = Σ_m dy[m, n] · A[m, k]`` where kept, exact 0 elsewhere, stored through the
    weight's own strides (grid: G·NB row blocks × chunks × SPLIT)."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    pid_s = tl.program_id(2)
    NB = tl.cdiv(NG, BN)
    g = pid_n // NB
    n = (pid_n % NB) * BN + tl.arange(0, BN)
    n_ok = n < NG
    rows = g * NG + n
    k = c * 64 + tl.arange(0, 64)
    keep, _, cnt = _chunk(bm_ptr, rows, n_ok, c, 2 * C)
    acc = tl.zeros((BN, 64), dtype=tl.float32)
    m_lo = pid_s * MPS
    if tl.sum(cnt, axis=0) > 0:  # a tile with nothing kept does no work
        for m0 in range(m_lo, _end(m_lo, MPS, M), BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            if IS_CONV:
                b, oh, ow = _pixels(m, OH, OW)
                a_row = b * sa_b + g * CA * sa_c
                d_row = b * sd_b + oh * sd_h + ow * sd_w
            else:
                oh = m
                ow = m
                a_row = m * sa_b
                d_row = m * sd_b
            d = tl.load(dy_ptr + d_row[:, None] + rows[None, :] * sd_c, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            a = _a_tile(a_ptr, a_row, m_ok, oh, ow, c, K, CA, KW, AH, AW, SH, SW, PH, PW, DH, DW,
                        sa_c, sa_h, sa_w, IS_CONV, False, CA_GE64)
            acc = _mma(tl.trans(d), a, acc, PREC)
    acc = tl.where(keep, acc, 0.0)
    out = out_ptr + pid_s * so_s + _row_off(rows, RD, RS0, RS1)[:, None] + _col_off(k, CD, KW, CS0, CS1, CS2)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (k < K)[None, :])


