"""Unstructured sparse format: a row-major bitmap + kept values in CSR order (pure-torch reference).

The format describes a 2-D matrix ``(R, K)`` — a weight in *reduction view*
(:func:`sparsefast.masks.reduction_view`: a conv weight ``(O, C/g, kh, kw)`` is the ``(O, kh*kw*C/g)``
matrix, reduction order ``(kh, kw, c)``), or the conv input-gradient view :func:`dgrad_view`.

Layout (``C = ceil(K / 64)`` chunks of 64 columns per row; every array is contiguous)::

    bitmap   int32 (R, 2*C)    word j of row r holds columns 32*j .. 32*j+31: bit i set <=> kept(r, 32*j+i)
                               (bits past K are 0; int32 because torch has no uint32 arithmetic —
                               bit 31 is the sign bit)
    chunkptr int32 (R*C + 1)   chunkptr[r*C + c] = number of kept entries before (row r, chunk c)
                               in row-major order; chunkptr[r*C] is the CSR row pointer of row r and
                               chunkptr[R*C] = nnz
    values   dtype (nnz,)      kept values in row-major (CSR) order: W[mask] of the (R, K) matrix

So the value of kept ``(r, k)`` (chunk ``c = k // 64``, lane ``l = k % 64``) is
``values[chunkptr[r*C + c] + popcount(bits of chunk c below lane l)]``.

Why this layout:

* The *index* (bitmap + chunkptr) depends on the mask only and is built once per mask change;
  ``values`` is the only part re-gathered after an optimizer step (one read of W, one write of the
  kept values).
* A kernel decodes any (rows × 64-column chunk) tile independently: the two bitmap words give the
  kept lanes, the popcount of the bits below a lane (an exclusive prefix count) gives its offset
  from ``chunkptr[r*C + c]``. Tiles therefore do not have to align with anything: the forward traverses a
  row block along K, the input-gradient kernel traverses the same tiles along R (the *transposed
  traversal*: no second copy of W is needed for ``dx = dy @ W``), and a conv's row blocks can start at
  any group boundary.
* Forward kernels walk a row left to right and keep a running offset (start + kept count of each
  chunk), so they read only the bitmap, the values and one chunk pointer per row: bf16 at 90 % sparsity
  is ``0.125 + 0.2 = 0.325`` B per dense element (``2 / 0.325 = 6.15×`` fewer bytes than dense).
  The transposed traversal also reads the chunk pointers (+``4/64 = 0.0625`` B per element).
  Memory held: ``0.3875`` B per element at 90 % (0.19× dense bf16).

Because ``values`` is in CSR order, a row-wise kernel can also walk it directly with the CSR row
pointers ``chunkptr[r*C]`` plus a per-entry column index (the Triton backend derives those, mask-only,
for its small-batch gather kernel).

The Triton backend (:mod:`sparsefast.backends.triton.unstructured`) builds bit-identical arrays with
its kernels; this module is the readable definition and the reference used by the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CHUNK", "UnstructuredIndex", "UnstructuredPacked", "build_index", "gather_values", "pack", "unpack",
           "index_mask", "dgrad_view", "from_dgrad_view", "roofline_nbytes", "INT32_MAX"]

#: columns per chunk (two 32-bit bitmap words)
CHUNK = 64
INT32_MAX = 2**31 - 1


def _chunks(cols: int) -> int:
    return -(-cols // CHUNK)


@dataclass(frozen=True)
class UnstructuredIndex:
    """The mask-only part of the format for an ``(rows, cols)`` matrix (layout: module docstring)."""

    rows: int
    cols: int
    bitmap: torch.Tensor    # int32 (rows, 2*chunks)
    chunkptr: torch.Tensor  # int32 (rows*chunks + 1)
    nnz: int

    @property
    def chunks(self) -> int:
        return _chunks(self.cols)

    @property
    def rowptr(self) -> torch.Tensor:
        """CSR row pointers ``(rows + 1,)`` int32 (a strided view of ``chunkptr``)."""
        if self.chunks == 0:
            return torch.zeros(self.rows + 1, dtype=torch.int32, device=self.bitmap.device)
        return self.chunkptr[:: self.chunks]

    def row_nnz(self) -> torch.Tensor:
        """Kept entries per row ``(rows,)`` int32."""
        rp = self.rowptr
        return rp[1:] - rp[:-1]

    def nbytes(self) -> int:
        return self.bitmap.numel() * 4 + self.chunkptr.numel() * 4


@dataclass(frozen=True)
class UnstructuredPacked:
    """A packed matrix: its :class:`UnstructuredIndex` and ``values`` (``(nnz,)``, weight dtype)."""

    index: UnstructuredIndex
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.rows, self.index.cols)

    def nbytes(self) -> int:
        return self.index.nbytes() + self.values.numel() * self.values.element_size()


def _check_2d(mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"unstructured format: expected a 2-D (rows, cols) matrix, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"unstructured format: mask must be bool, got {mask.dtype}")


def build_index(mask: torch.Tensor) -> UnstructuredIndex:
    """Index of a bool ``(R, K)`` mask (any strides, any device). Raises ``ValueError`` when the kept
    count does not fit the int32 chunk pointers."""
    _check_2d(mask)
    R, K = mask.shape
    C = _chunks(K)
    padded = torch.zeros(R, C * CHUNK, dtype=torch.bool, device=mask.device)
    padded[:, :K] = mask
    bits = padded.reshape(R, 2 * C, 32).to(torch.int64)
    words = (bits << torch.arange(32, device=mask.device)).sum(-1)          # in [0, 2**32)
    bitmap = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    counts = padded.reshape(R * C, CHUNK).sum(-1)
    ptr = torch.zeros(R * C + 1, dtype=torch.int64, device=mask.device)
    ptr[1:] = torch.cumsum(counts, 0)
    nnz = int(ptr[-1])
    if nnz > INT32_MAX:
        raise ValueError(f"unstructured format: {nnz} kept entries exceed the int32 offsets (max {INT32_MAX})")
    return UnstructuredIndex(R, K, bitmap, ptr.to(torch.int32), nnz)


def index_mask(index: UnstructuredIndex) -> torch.Tensor:
    """The bool ``(R, K)`` mask an index describes (inverse of :func:`build_index`)."""
    R, K, C = index.rows, index.cols, index.chunks
    sh = torch.arange(32, device=index.bitmap.device, dtype=torch.int32)
    bits = (index.bitmap.reshape(R, 2 * C, 1) >> sh) & 1
    return bits.reshape(R, C * CHUNK)[:, :K] != 0


def gather_values(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept values of ``weight`` (``(R, K)``) in the format's order (row-major = CSR order)."""
    if weight.shape != mask.shape:
        raise ValueError(f"unstructured format: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ")
    return weight[mask].contiguous()


def pack(weight: torch.Tensor, mask: torch.Tensor) -> UnstructuredPacked:
    """Reference packing of a 2-D ``weight`` under bool ``mask`` (same shape)."""
    _check_2d(mask)
    return UnstructuredPacked(build_index(mask), gather_values(weight, mask))


def unpack(packed: UnstructuredPacked) -> torch.Tensor:
    """Dense ``(R, K)`` matrix (zeros at pruned positions) of a packed one."""
    m = index_mask(packed.index)
    out = torch.zeros(m.shape, dtype=packed.values.dtype, device=packed.values.device)
    out[m] = packed.values
    return out


def dgrad_view(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``(C, kh*kw*O/g)`` matrix a conv's input gradient reduces over (a copy).

    For a conv weight ``(O, C/g, kh, kw)``: row ``g*C/g + c`` (an input channel), column
    ``(kh*KW + kw)*O/g + o`` (reduction order ``(kh, kw, o)``, output channel fastest) holds
    ``t[g*O/g + o, c, kh, kw]``. The conv input gradient is then an implicit GEMM of ``dy`` with this
    matrix, exactly like the forward with :func:`~sparsefast.masks.reduction_view`."""
    O, Cg, KH, KW = t.shape
    G = int(groups)
    return (t.reshape(G, O // G, Cg, KH, KW).permute(0, 2, 3, 4, 1).reshape(G * Cg, KH * KW * (O // G)))


def from_dgrad_view(m: torch.Tensor, shape: tuple[int, ...], groups: int) -> torch.Tensor:
    """Inverse of :func:`dgrad_view`."""
    O, Cg, KH, KW = shape
    G = int(groups)
    return m.reshape(G, Cg, KH, KW, O // G).permute(0, 4, 1, 2, 3).reshape(O, Cg, KH, KW).contiguous()


def roofline_nbytes(rows: int, cols: int, nnz: int, elem_bytes: int) -> int:
    """Bytes a forward kernel reads for a packed ``rows × cols`` matrix with ``nnz`` kept values:
    values + bitmap (padded to 64 columns) + one int32 pointer per row (see the module docstring;
    the transposed traversal reads ``4 * rows * ceil(cols/64)`` more)."""
    return nnz * elem_bytes + rows * 2 * _chunks(cols) * 4 + 4 * (rows + 1)
