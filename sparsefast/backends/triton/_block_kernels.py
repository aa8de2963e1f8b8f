"""Triton jit kernels of the block-sparse backend (host side, index, launch configs and dispatch:
:mod:`sparsefast.backends.triton.block`).

The weight is the reduction view ``W (N, K)`` of a ``block:B`` mask: ``B × B`` blocks kept or dropped
whole. The kernels read the layer's kept values in place (canonical order): block-row ``i`` (``B``
output rows) with ``nb_i`` kept blocks holds its values as one row-major ``(B, nb_i·B)`` matrix at
offset ``B·B·rowptr[i]``, so ``W[i·B + o, col[rowptr[i] + t]·B + c]`` sits at
``B·B·rowptr[i] + o·nb_i·B + t·B + c`` -- a dense tile with leading dimension ``nb_i·B``, and ``TK``
consecutive kept blocks of a block-row are ``TK·B`` contiguous columns of it.

* ``_fwd_kernel``  ``out[m, i·B + o] = Σ_t Σ_c x[m, col_t·B + c] · W_blk(i, t)[o, c]`` (+ bias): one
  program per (row block of x, block-row); each step multiplies a ``[BM, TK·B]`` tile of x, gathered
  block column by block column (runs of ``B`` contiguous elements), by the ``[TK·B, BR]`` transposed
  value tile on tensor cores. Empty block-rows store zeros (+ bias).
* ``_dx_kernel``   ``dx[m, j·B + c] = Σ_blocks dy[m, i·B + o] · W_blk[o, c]``: one program per (row
  block of dy, block column ``j``), walking the kept blocks of column ``j`` (the mask's CSC order,
  each block's value offset and leading dimension precomputed): ``[BM, TN·B]`` gathered dy tile times
  the ``[TN·B, BR]`` stacked value blocks. Empty block columns store zeros.
* ``_dw_kernel``   masked weight gradient straight into the values' layout: one program per work item
  ``(block-row i, first kept block t0)`` covering ``TB`` kept blocks of the row,
  ``acc[TB·B, BR] = Σ_m x[m, cols]ᵀ · dy[m, i·B + o]`` over a range of M (split ranges write fp32
  partials), stored at the values' offsets -- kept positions only, nothing dense-shaped.

``B = 8`` is below ``tl.dot``'s minimum of 16 per dimension: the reduction side always takes several
blocks per step (``TK·B = 64``), and the ``B``-wide side (``BR``, output columns of fwd / dx, rows of
the dW tile) is padded to 16 with masked loads and stores (half of those MMA columns idle).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._unstructured_kernels import _end, _mma  # jit helpers shared with the unstructured kernels


@triton.jit
def _block_cols(j, c, B: tl.constexpr):
    """Reduction columns ``j·B + c % B`` of kept blocks in block columns ``j`` (one entry per tile column
    ``c``), with the hint that they come in aligned runs of ``B`` contiguous columns."""
    return tl.max_contiguous(tl.multiple_of(j * B + c % B, B), B)


@triton.jit
def _fwd_kernel(x_ptr, rp_ptr, col_ptr, v_ptr, bias_ptr, out_ptr, M, NBR,
                s_xm, s_xk, s_om, s_on,
                M_BUCKET: tl.constexpr, BM: tl.constexpr, B: tl.constexpr, BR: tl.constexpr, TK: tl.constexpr,
                HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """``out[m, i·B + o] = Σ x[m, k] · W[i·B + o, k]`` over the kept blocks of block-row ``i`` (+ bias)
    for one ``[BM, BR]`` tile (grid: M blocks · NBR, the block-row fastest so programs sharing a row
    block of x run together)."""
    pid = tl.program_id(0)
    i = pid % NBR
    m = (pid // NBR) * BM + tl.arange(0, BM)
    m_ok = m < M
    lo = tl.load(rp_ptr + i)
    nb = tl.load(rp_ptr + i + 1) - lo
    ld = nb * B
    o = tl.arange(0, BR)
    o_ok = o < B
    c = tl.arange(0, TK * B)
    tb = c // B
    w_row = tl.multiple_of(lo * (B * B) + o * ld, B)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    # block columns of the next step, loaded one step ahead: an x address that comes from a load in the
    # same iteration keeps Triton's pipeliner from multi-buffering the x tile (one smem stage at any
    # num_stages, sm_80 and sm_90); loop-carried, it gets num_stages buffers like a dense GEMM
    j_next = tl.load(col_ptr + lo + tb, mask=tb < nb, other=0)
    for t0 in range(0, nb, TK):
        t = t0 + tb
        t_ok = t < nb
        k = _block_cols(j_next, c, B)
        j_next = tl.load(col_ptr + lo + t + TK, mask=t + TK < nb, other=0)
        a = tl.load(x_ptr + m[:, None] * s_xm + k[None, :] * s_xk, mask=m_ok[:, None] & t_ok[None, :], other=0.0)
        w = tl.load(v_ptr + w_row[:, None] + (t0 * B + c)[None, :], mask=o_ok[:, None] & t_ok[None, :], other=0.0)
        acc = _mma(a, tl.trans(w), acc, PREC)
    n = i * B + o
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * s_om + n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _dx_kernel(dy_ptr, cp_ptr, tb_ptr, v_ptr, out_ptr, M, NBC,
               s_dm, s_dn, s_om, s_ok,
               M_BUCKET: tl.constexpr, BM: tl.constexpr, B: tl.constexpr, BR: tl.constexpr, TN: tl.constexpr,
               PREC: tl.constexpr):
    """``dx[m, j·B + c] = Σ dy[m, n] · W[n, j·B + c]`` over the kept blocks of block column ``j`` for
    one ``[BM, BR]`` tile (grid: M blocks · NBC, block column fastest). ``tb`` holds, per kept block in
    column order, three int32s: its block-row, the value offset of its element (0, 0) and its leading
    dimension (``nb_i·B``)."""
    pid = tl.program_id(0)
    j = pid % NBC
    m = (pid // NBC) * BM + tl.arange(0, BM)
    m_ok = m < M
    lo = tl.load(cp_ptr + j)
    nb = tl.load(cp_ptr + j + 1) - lo
    r = tl.arange(0, TN * B)
    rb = r // B
    oo = r % B
    c = tl.arange(0, BR)
    c_ok = c < B
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    # the next step's block entries are loaded one step ahead (see _fwd_kernel: multi-buffered tiles)
    e = tb_ptr + (lo + rb) * 3
    i_n = tl.load(e, mask=rb < nb, other=0)
    off_n = tl.load(e + 1, mask=rb < nb, other=0)
    ld_n = tl.load(e + 2, mask=rb < nb, other=0)
    for t0 in range(0, nb, TN):
        t = t0 + rb
        t_ok = t < nb
        i = i_n
        off = off_n
        ld = ld_n
        e = tb_ptr + (lo + t + TN) * 3
        nxt = t + TN < nb
        i_n = tl.load(e, mask=nxt, other=0)
        off_n = tl.load(e + 1, mask=nxt, other=0)
        ld_n = tl.load(e + 2, mask=nxt, other=0)
        n = tl.max_contiguous(tl.multiple_of(i * B + oo, B), B)
        d = tl.load(dy_ptr + m[:, None] * s_dm + n[None, :] * s_dn, mask=m_ok[:, None] & t_ok[None, :], other=0.0)
        w_row = tl.multiple_of(off + oo * ld, B)
        w = tl.load(v_ptr + w_row[:, None] + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(d, w, acc, PREC)
    k = j * B + c
    tl.store(out_ptr + m[:, None] * s_om + k[None, :] * s_ok, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, rp_ptr, col_ptr, item_ptr, out_ptr, M, MPS,
               s_dm, s_dn, s_xm, s_xk, so_s,
               M_BUCKET: tl.constexpr, BM: tl.constexpr, B: tl.constexpr, BR: tl.constexpr, TB: tl.constexpr,
               PREC: tl.constexpr):
    """Masked weight gradient of ``TB`` kept blocks of one block-row (work item ``(i, t0)``) over the
    rows ``[pid_s·MPS, (pid_s+1)·MPS)`` of M: ``g[o, t·B + c] = Σ_m dy[m, i·B + o] · x[m, col_t·B + c]``,
    stored at the values' own offsets (``+ pid_s·so_s`` for split partials). Grid: items × SPLIT."""
    item = tl.program_id(0)
    pid_s = tl.program_id(1)
    i = tl.load(item_ptr + 2 * item)
    t0 = tl.load(item_ptr + 2 * item + 1)
    lo = tl.load(rp_ptr + i)
    nb = tl.load(rp_ptr + i + 1) - lo
    c = tl.arange(0, TB * B)
    t = t0 + c // B
    t_ok = t < nb
    k = _block_cols(tl.load(col_ptr + lo + t, mask=t_ok, other=0), c, B)
    o = tl.arange(0, BR)
    o_ok = o < B
    n = i * B + o
    acc = tl.zeros((TB * B, BR), dtype=tl.float32)
    m_lo = pid_s * MPS
    for m0 in range(m_lo, _end(m_lo, MPS, M), BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < M
        a = tl.load(x_ptr + m[:, None] * s_xm + k[None, :] * s_xk, mask=m_ok[:, None] & t_ok[None, :], other=0.0)
        d = tl.load(dy_ptr + m[:, None] * s_dm + n[None, :] * s_dn, mask=m_ok[:, None] & o_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), d, acc, PREC)
    dst = out_ptr + pid_s * so_s + lo * (B * B) + o[None, :] * (nb * B) + (t0 * B + c)[:, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & o_ok[None, :])
