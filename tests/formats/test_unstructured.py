"""The unstructured format (sparsefast.formats.unstructured): pure-torch reference builder, layout
invariants, the conv input-gradient view, and the byte count the roofline uses."""
from __future__ import annotations

import pytest
import torch

from sparsefast.formats import unstructured as fu


def _mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    if shape[0] > 2:
        m[0] = False   # an empty row
        m[1] = True    # an all-kept row
    return m


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (7, 64), (6, 65), (9, 200), (4, 0), (0, 5)])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 1.0])
def test_pack_roundtrip_and_layout(shape, density):
    m = _mask(shape, density, seed=hash((shape, density)) % 1000)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p = fu.pack(w, m)
    idx = p.index
    R, K = shape
    C = -(-K // 64)
    assert idx.bitmap.dtype == torch.int32 and idx.bitmap.shape == (R, 2 * C)
    assert idx.chunkptr.dtype == torch.int32 and idx.chunkptr.shape == (R * C + 1,)
    assert idx.nnz == int(m.sum()) == p.values.numel()
    assert torch.equal(fu.index_mask(idx), m)
    assert torch.equal(fu.unpack(p), w * m)
    assert torch.equal(p.values, w[m])                       # CSR (row-major) order
    assert torch.equal(idx.row_nnz(), m.sum(1).to(torch.int32))
    # chunk pointers: kept count before (row, chunk) in row-major order
    if R and K:
        counts = torch.nn.functional.pad(m, (0, C * 64 - K)).reshape(R * C, 64).sum(1)
        assert torch.equal(idx.chunkptr[1:].long(), counts.cumsum(0))


def test_bit_positions():
    m = torch.zeros(2, 70, dtype=torch.bool)
    m[0, 0] = m[0, 31] = m[0, 32] = m[1, 69] = True
    idx = fu.build_index(m)
    assert idx.bitmap[0, 0].item() == (1 | -(2**31))   # bits 0 and 31 (sign bit) of word 0
    assert idx.bitmap[0, 1].item() == 1                 # column 32 = bit 0 of word 1
    assert idx.bitmap[1, 2].item() == 1 << 5            # column 69 = chunk 1, word 2, bit 5
    assert idx.chunkptr.tolist() == [0, 3, 3, 3, 4]


def test_noncontiguous_and_device_agnostic_inputs():
    w = torch.randn(40, 24).t()             # (24, 40) non-contiguous
    m = _mask((40, 24), 0.3).t()
    p = fu.pack(w, m)
    assert torch.equal(fu.unpack(p), w * m)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fu.build_index(torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        fu.build_index(torch.ones(2, 3))
    with pytest.raises(ValueError, match="differ"):
        fu.gather_values(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_dgrad_view(groups):
    O, Cg, KH, KW = 6, 2, 3, 2
    t = torch.randn(O, Cg, KH, KW)
    v = fu.dgrad_view(t, groups)
    Og = O // groups
    assert v.shape == (Cg * groups, KH * KW * Og)
    for g in range(groups):
        for c in range(Cg):
            for kh in range(KH):
                for kw in range(KW):
                    for o in range(Og):
                        assert v[g * Cg + c, (kh * KW + kw) * Og + o] == t[g * Og + o, c, kh, kw]
    assert torch.equal(fu.from_dgrad_view(v, t.shape, groups), t)


def test_roofline_bytes():
    rows = cols = 4096
    nnz = int(0.1 * rows * cols)
    b = fu.roofline_nbytes(rows, cols, nnz, 2)
    assert b == nnz * 2 + rows * cols // 8 + 4 * (rows + 1)
    assert b / (rows * cols * 2) <= 0.3
    # everything held in memory (incl. the chunk pointers the transposed traversal reads)
    m = torch.rand(256, 1024) < 0.1
    p = fu.pack(torch.randn(256, 1024, dtype=torch.bfloat16), m)
    assert p.nbytes() / (256 * 1024 * 2) <= 0.3
