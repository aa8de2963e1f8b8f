"""Packed N:M format: kept values + bit-packed in-group indices (pure-torch reference pack/unpack).

Layout (one row per output channel of the weight in *reduction view*, see
:func:`sparsefast.masks.reduction_view`; a conv weight ``(O, C/g, kh, kw)`` is packed as the
``(O, kh*kw*C/g)`` matrix, reduction order ``(kh, kw, c)``)::

    dense row r:  K columns = G groups of m consecutive columns (K % m == 0)
    slot s = g*n + j          the j-th *chosen* column of group g, j < n, chosen columns ascending
    values[r, s]              W[r, g*m + idx] (weight dtype); 0 for padding slots
    idx(r, s) in [0, m)       position inside the group, `bits` bits each (bits = 2 for m=4,
                              4 for m=8/16, in general the smallest of 1/2/4/8 with 2**bits >= m)
    meta[r, s // per_byte]    uint8; slot s sits at bit (s % per_byte) * bits, per_byte = 8 // bits

A group keeps *at most* n columns (``masks.is_nm``). When it keeps fewer, the remaining slots are
filled with the lowest *pruned* positions of the group and hold value 0, so every group has exactly n
distinct ascending indices and ``unpack`` is a plain scatter. Rows are padded with zeros to a stride
of a multiple of 16 elements (values) and 16 bytes (meta), so kernels can use 16-byte vector loads
for any K. Storage for 2:4 bf16: 2 values * 2 B + 2 * 2 bits = 4.5 B per 4 weights (0.5625x dense).

The Triton backend's pack kernel (:mod:`sparsefast.backends.triton.nm`) writes bit-identical output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import from_reduction_view, reduction_view

__all__ = ["NMPacked", "meta_bits", "row_strides", "pack", "unpack", "decode_indices"]

_ALIGN = 16


def meta_bits(m: int) -> int:
    """Bits per stored index for groups of ``m``: the smallest of 1, 2, 4, 8 with ``2**bits >= m``."""
    for b in (1, 2, 4, 8):
        if (1 << b) >= m:
            return b
    raise ValueError(f"N:M packing supports m <= 256, got m={m}")


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def row_strides(cols: int, n: int, m: int) -> tuple[int, int]:
    """``(values_row_stride, meta_row_stride)`` of the packed rows for a dense row of ``cols``."""
    slots = cols // m * n
    per_byte = 8 // meta_bits(m)
    return max(_round_up(slots, _ALIGN), _ALIGN), max(_round_up(-(-slots // per_byte), _ALIGN), _ALIGN)


@dataclass
class NMPacked:
    """A packed N:M weight. ``values``: ``(R, Sv)`` weight dtype; ``meta``: ``(R, Sm)`` uint8 (layout in
    the module docstring); ``shape``: the dense weight's shape (2-D or 4-D); ``rows, cols``: its
    reduction-view shape ``(R, K)``."""

    values: torch.Tensor
    meta: torch.Tensor
    n: int
    m: int
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())

    @property
    def bits(self) -> int:
        return meta_bits(self.m)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def slots(self) -> int:
        """Used slots per row (``K * n / m``); columns beyond are padding."""
        return self.cols // self.m * self.n

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's storage, so values move bit-exactly (NaN payloads, -0.0)."""
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _check(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(weight.shape) != tuple(mask.shape):
        raise ValueError(f"N:M pack: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if not (1 <= n < m):
        raise ValueError(f"N:M pack needs 1 <= n < m, got {n}:{m}")
    w2, k2 = reduction_view(weight), reduction_view(mask)
    if w2.shape[1] % m:
        raise ValueError(f"N:M pack: reduction dim {w2.shape[1]} of weight {tuple(weight.shape)} "
                         f"is not divisible by m={m}")
    return w2, k2.bool()


def pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> NMPacked:
    """Pack ``weight * mask`` (2-D ``(R, K)`` or 4-D conv weight) into :class:`NMPacked`.

    ``mask`` (bool, weight-shaped) must keep at most ``n`` of every ``m`` reduction-order columns
    (``ValueError`` otherwise). Pure torch, any device; the reference for the Triton pack kernel."""
    w2, k2 = _check(weight, mask, n, m)
    R, K = w2.shape
    G = K // m
    w3, k3 = _bits(w2.contiguous()).reshape(R, G, m), k2.reshape(R, G, m)
    if k3.numel() and int(k3.sum(-1).max()) > n:
        raise ValueError(f"N:M pack: mask keeps more than {n} of {m} in some group")
    pos = torch.arange(m, device=w2.device)
    # kept columns first, then the lowest pruned ones; take n; ascending
    key = (~k3).to(torch.int32) * m + pos
    idx = key.sort(dim=-1).values[..., :n] % m                               # (R, G, n) int
    idx = idx.sort(dim=-1).values
    vals = torch.where(k3.gather(2, idx), w3.gather(2, idx), torch.zeros((), dtype=w3.dtype, device=w2.device))
    sv, sm = row_strides(K, n, m)
    S = G * n
    values = torch.zeros(R, sv, dtype=w2.dtype, device=w2.device)
    _bits(values)[:, :S] = vals.reshape(R, S)
    bits = meta_bits(m)
    per = 8 // bits
    nb = -(-S // per)
    flat = torch.zeros(R, nb * per, dtype=torch.int32, device=w2.device)
    flat[:, :S] = idx.reshape(R, S).to(torch.int32)
    shifts = torch.arange(per, device=w2.device, dtype=torch.int32) * bits
    meta = torch.zeros(R, sm, dtype=torch.uint8, device=w2.device)
    meta[:, :nb] = (flat.reshape(R, nb, per) << shifts).sum(-1).to(torch.uint8)
    return NMPacked(values, meta, int(n), int(m), tuple(weight.shape))


def decode_indices(p: NMPacked) -> torch.Tensor:
    """In-group index of every used slot: ``(R, K*n/m)`` int64 in ``[0, m)``."""
    per, bits = p.per_byte, p.bits
    S = p.slots
    nb = -(-S // per)
    shifts = torch.arange(per, device=p.meta.device, dtype=torch.int32) * bits
    idx = (p.meta[:, :nb].to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return idx.reshape(p.rows, nb * per)[:, :S].long()


def unpack(p: NMPacked) -> torch.Tensor:
    """The dense masked weight ``W * M`` in the original shape (2-D or 4-D) and dtype."""
    R, K, n, m = p.rows, p.cols, p.n, p.m
    G = K // m
    idx = decode_indices(p).reshape(R, G, n)
    dense = torch.zeros(R, G, m, dtype=p.values.dtype, device=p.values.device)
    _bits(dense).scatter_(2, idx, _bits(p.values)[:, :G * n].reshape(R, G, n))
    return from_reduction_view(dense.reshape(R, K), p.shape)
