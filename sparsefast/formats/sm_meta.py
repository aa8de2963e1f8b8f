"""Python mirror of the SF24 2:4 format used by the ``cuda`` backend (``csrc/include/sf_layout.h``).

Pure torch (any device), exact: the CPU tests compare it bit-for-bit with the C++ layout functions
(``tests/csrc``) and, on a GPU, with the CUDA pack kernel.

Format of a dense ``W`` (R x C), 2:4 along C (each group of 4 columns keeps at most 2):

* ``Rp = round_up(R, 64)``, ``Cp = round_up(C, 64)`` (zero padding);
* ``vals`` (Rp, Cp/2), W's dtype: ``vals[r, 2g+s]`` = the s-th kept entry (ascending column) of group g;
* ``meta`` int32 (Rp/16 * Cp/32 * 16,): per group a nibble ``idx0 | idx1 << 2`` (idx0 < idx1, the columns of
  the two stored values in the group; fillers for groups keeping fewer than 2 point at stored zeros), packed
  so that word ``(t*(Cp/32) + s)*16 + 2*(r%8) + p`` (row tile ``t = r//16``, k-step ``s = c//32``,
  ``p = (c%32)//16``) holds, at bit ``16*((r%16)//8) + 4*((c%16)//4)``, the nibble of column c's group --
  the metadata register of lane ``4*(r%8) + p`` for ``mma.sp.m16n8k32`` (sparsity selector 0).

A group keeping more than 2 entries (an invalid mask) stores its first two kept entries.
"""
from __future__ import annotations

import torch

ROW_PAD = 64
COL_PAD = 64

__all__ = ["ROW_PAD", "COL_PAD", "encode_group", "pack", "unpack", "meta_word", "meta_bit", "padded_shape",
           "emulate_mma_sp_gemm"]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_shape(R: int, C: int) -> tuple[int, int]:
    return _round_up(R, ROW_PAD), _round_up(C, COL_PAD)


def encode_group(keep4: int) -> tuple[int, tuple[int, int]]:
    """``keep4``: bit j set when column j of the group is kept. Returns (nibble, (src0, src1)) where
    ``src_s`` is the group column whose value goes to stored slot s, or -1 for a stored zero."""
    idx = [j for j in range(4) if (keep4 >> j) & 1]
    if len(idx) >= 2:
        a, b = idx[0], idx[1]
        return a | (b << 2), (a, b)
    if len(idx) == 1:
        a = idx[0]
        if a < 3:
            return a | (3 << 2), (a, -1)
        return 2 | (3 << 2), (-1, 3)
    return 0 | (1 << 2), (-1, -1)


_TABLE = [encode_group(k) for k in range(16)]


def meta_word(r: int, c: int, Cp: int) -> int:
    return ((r // 16) * (Cp // 32) + c // 32) * 16 + 2 * (r % 8) + (c % 32) // 16


def meta_bit(r: int, c: int) -> int:
    return 16 * ((r % 16) // 8) + 4 * ((c % 16) // 4)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``w`` (R, C) and bool ``mask`` (R, C), C % 4 == 0 -> ``(vals, meta)`` as described above."""
    if w.dim() != 2 or mask.shape != w.shape:
        raise ValueError(f"pack: need 2-D weight and same-shape mask, got {tuple(w.shape)} / {tuple(mask.shape)}")
    R, C = w.shape
    if C % 4:
        raise ValueError(f"pack: columns ({C}) must be a multiple of 4")
    Rp, Cp = padded_shape(R, C)
    dev = w.device
    wp = torch.zeros(Rp, Cp, dtype=w.dtype, device=dev)
    kp = torch.zeros(Rp, Cp, dtype=torch.bool, device=dev)
    wp[:R, :C] = w
    kp[:R, :C] = mask.to(torch.bool)
    g = kp.reshape(Rp, Cp // 4, 4).long()
    keep4 = (g * torch.tensor([1, 2, 4, 8], device=dev)).sum(-1)                      # (Rp, Cp/4)
    nib_t = torch.tensor([t[0] for t in _TABLE], device=dev)
    src_t = torch.tensor([t[1] for t in _TABLE], device=dev)                         # (16, 2)
    nib = nib_t[keep4]
    src = src_t[keep4]                                                              # (Rp, Cp/4, 2)
    wg = wp.reshape(Rp, Cp // 4, 4)
    gathered = torch.gather(wg, 2, src.clamp(min=0))
    vals = torch.where(src >= 0, gathered, torch.zeros((), dtype=w.dtype, device=dev)).reshape(Rp, Cp // 2)
    # nibble grid (Rp, Cp/4) -> (t, half, g, s, p, gq) -> word (t, s, g, p)
    arr = nib.reshape(Rp // 16, 2, 8, Cp // 32, 2, 4)
    shifts = (16 * torch.arange(2, device=dev).view(1, 2, 1, 1, 1, 1)
              + 4 * torch.arange(4, device=dev).view(1, 1, 1, 1, 1, 4))
    words = (arr << shifts).sum(dim=(1, 5))                                        # (t, g, s, p)
    meta = _to_int32(words.permute(0, 2, 1, 3).reshape(-1))
    return vals.contiguous(), meta.contiguous()


def unpack(vals: torch.Tensor, meta: torch.Tensor, R: int, C: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the dense (R, C) matrix (zeros at pruned positions)."""
    Rp, Cp = padded_shape(R, C)
    if tuple(vals.shape) != (Rp, Cp // 2) or meta.numel() != Rp // 16 * (Cp // 32) * 16:
        raise ValueError(f"unpack: buffers {tuple(vals.shape)}/{meta.numel()} do not match R={R}, C={C}")
    dev = vals.device
    words = meta.long() & 0xFFFFFFFF
    arr = words.reshape(Rp // 16, Cp // 32, 8, 2).permute(0, 2, 1, 3)              # (t, g, s, p)
    shifts = (16 * torch.arange(2, device=dev).view(1, 2, 1, 1, 1, 1)
              + 4 * torch.arange(4, device=dev).view(1, 1, 1, 1, 1, 4))
    nib = (arr.unsqueeze(1).unsqueeze(-1) >> shifts) & 0xF                          # (t, half, g, s, p, gq)
    nib = nib.reshape(Rp, Cp // 4)
    idx = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)                              # (Rp, Cp/4, 2)
    v = vals.reshape(Rp, Cp // 4, 2).float()
    out = torch.zeros(Rp, Cp // 4, 4, dtype=torch.float32, device=dev)
    out.scatter_add_(2, idx, v)
    return out.reshape(Rp, Cp)[:R, :C].to(vals.dtype)


def emulate_mma_sp_gemm(vals: torch.Tensor, meta: torch.Tensor, R: int, B: torch.Tensor) -> torch.Tensor:
    """Reference semantics of the kernel's inner loop, register by register: ``A (R x Cp, SF24) @ B (Cp x n)``
    computed as the PTX ISA defines ``mma.sp.m16n8k32`` (selector 0) with each lane's fragments loaded from
    the SF24 buffers the way ``csrc/sf24.cu`` loads them. Slow (Python loops); for small shapes in tests."""
    Rp, Cp2 = vals.shape
    Cp = Cp2 * 2
    n = B.shape[1]
    Bp = torch.zeros(Cp, _round_up(n, 8), dtype=torch.float64)
    Bp[: B.shape[0], :n] = B.double()
    words = [int(v) & 0xFFFFFFFF for v in meta.tolist()]
    A = vals.double()
    D = torch.zeros(Rp, Bp.shape[1], dtype=torch.float64)
    for t in range(Rp // 16):
        for ks in range(Cp // 32):
            # metadata registers of the 32 lanes (lanes 4g+2, 4g+3 load the same words, ignored by the hw)
            e = [words[(t * (Cp // 32) + ks) * 16 + 2 * (lane // 4) + (lane % 2)] for lane in range(32)]
            for row in range(16):
                g = row % 8
                half = row // 8
                for ccol in range(16):
                    p = ccol // 8                      # lane pair holding this half of the k-step
                    word = e[4 * g + p]
                    grp = (ccol % 8) // 2
                    nibble = (word >> (16 * half + 4 * grp)) & 0xF
                    dense = 16 * p + 4 * grp + ((nibble >> (2 * (ccol % 2))) & 3)
                    a = A[16 * t + row, ks * 16 + ccol]
                    D[16 * t + row] += a * Bp[ks * 32 + dense]
    return D[:R, :n]
