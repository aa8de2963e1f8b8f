"""The packed N:M format (sparsefast.formats.nm): exact round trip, documented layout, errors."""
from __future__ import annotations

import math

import pytest
import torch

from sparsefast.formats import nm as fmt
from sparsefast.masks import magnitude_mask, nm_mask, transposable_nm_mask

PATTERNS = [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 8), (3, 8), (1, 16), (4, 16), (8, 16), (1, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_nm_mask(shape, n, m, gen, drop=0.25):
    """An N:M mask in reduction order where some groups keep fewer than n (padding slots)."""
    w = torch.randn(shape, generator=gen)
    mask = magnitude_mask(w, f"{n}:{m}", None)
    return mask & (torch.rand(shape, generator=gen) > drop)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_exact_2d(n, m, dtype):
    gen = torch.Generator().manual_seed(n * 100 + m)
    for rows, groups in ((1, 1), (5, 3), (17, 9)):
        w = torch.randn(rows, groups * m, generator=gen).to(dtype)
        mask = _random_nm_mask(w.shape, n, m, gen)
        p = fmt.pack(w, mask, n, m)
        assert p.values.dtype == dtype and p.meta.dtype == torch.uint8
        assert p.values.shape[0] == rows and p.values.shape[1] % 16 == 0 and p.meta.shape[1] % 16 == 0
        assert p.slots == groups * n and (p.rows, p.cols) == (rows, groups * m)
        assert torch.equal(fmt.unpack(p), w * mask)
        # padding past the used slots is zero
        assert not p.values[:, p.slots:].any()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_round_trip_conv_weight_reduction_order(n, m):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(6, 2 * m, 3, 2, generator=gen)
    mask = magnitude_mask(w, f"{n}:{m}", None)
    p = fmt.pack(w, mask, n, m)
    assert p.shape == tuple(w.shape) and (p.rows, p.cols) == (6, 2 * m * 6)
    assert torch.equal(fmt.unpack(p), w * mask)
    # row r holds the (kh, kw, c) reduction view, channel fastest
    rv = (w * mask).permute(0, 2, 3, 1).reshape(6, -1)
    idx = fmt.decode_indices(p).reshape(6, -1, n)
    vals = p.values[:, :p.slots].reshape(6, -1, n)
    assert torch.equal(rv.reshape(6, -1, m).gather(2, idx), vals)


def test_layout_documented_example():
    # one row, two 2:4 groups: keep columns {1, 3} and {0} (second group keeps fewer than n)
    w = torch.tensor([[10., 11., 12., 13., 20., 21., 22., 23.]])
    mask = torch.tensor([[False, True, False, True, True, False, False, False]])
    p = fmt.pack(w, mask, 2, 4)
    # slots: (g0: idx 1 -> 11, idx 3 -> 13), (g1: idx 0 -> 20, padding idx 1 -> 0)
    assert p.values[0, :4].tolist() == [11., 13., 20., 0.]
    # 2-bit indices, slot s at bits 2*(s % 4) of byte s // 4: 1 | 3<<2 | 0<<4 | 1<<6
    assert p.meta[0, 0].item() == 1 | (3 << 2) | (0 << 4) | (1 << 6)
    assert fmt.meta_bits(4) == 2 and fmt.meta_bits(8) == 4 and fmt.meta_bits(16) == 4 and fmt.meta_bits(2) == 1


def test_pruned_values_never_stored_and_specials_kept():
    w = torch.tensor([[float("nan"), 1.0, float("inf"), -0.0, 5.0, float("-inf"), 7.0, 8.0]])
    mask = torch.tensor([[False, True, True, True, True, True, False, False]])
    p = fmt.pack(w, mask, 3, 4)
    out = fmt.unpack(p)
    assert out[0, 0].item() == 0.0            # NaN at a pruned position is dropped
    assert out[0, 2].item() == float("inf") and out[0, 5].item() == float("-inf")
    assert torch.signbit(out[0, 3])           # -0.0 survives bit-exactly
    kept = torch.tensor([[float("nan"), 2.0, 3.0, 4.0]])
    p = fmt.pack(kept, torch.tensor([[True, False, False, True]]), 2, 4)
    assert torch.isnan(fmt.unpack(p)[0, 0])


def test_transposable_mask_packs_both_ways():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=gen)
    mask = transposable_nm_mask(w, 2, 4)
    for a, k in ((w, mask), (w.t(), mask.t())):
        assert torch.equal(fmt.unpack(fmt.pack(a, k, 2, 4)), a * k)


def test_storage_ratio_2_4_bf16():
    w = torch.randn(64, 4096).bfloat16()
    p = fmt.pack(w, nm_mask(w, 2, 4), 2, 4)
    assert p.nbytes / (w.numel() * 2) <= 0.57
    assert math.isclose(p.nbytes / (w.numel() * 2), 0.5625)


def test_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="more than 2"):
        fmt.pack(w, torch.ones(4, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        fmt.pack(torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="shape"):
        fmt.pack(w, torch.zeros(4, 4, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="n < m"):
        fmt.pack(w, torch.zeros(4, 8, dtype=torch.bool), 4, 4)


def test_empty_and_all_pruned():
    p = fmt.pack(torch.randn(0, 8), torch.zeros(0, 8, dtype=torch.bool), 2, 4)
    assert fmt.unpack(p).shape == (0, 8)
    w = torch.randn(3, 8)
    p = fmt.pack(w, torch.zeros(3, 8, dtype=torch.bool), 2, 4)
    assert torch.equal(fmt.unpack(p), torch.zeros(3, 8))
