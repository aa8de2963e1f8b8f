"""The ``cpu`` backend's block kernels (``block:B`` Linear: BSR forward, dX and dW that read the layer's
kept values in place; ``SpMat::bs`` in csrc/cpu/kernels.h) against the float64 masked-dense reference,
on every ISA path this CPU runs, float32 / bfloat16 / float16, block 8 / 16 / 32, densities 0..1, batch
rows that are not panel multiples, threads that split block rows; and the fallbacks (one row; a mask
whose blocks are not whole)."""
from __future__ import annotations

import pytest
import torch

from sparsefast import backends
from sparsefast.formats import kept
from sparsefast.masks import block_mask, parse_pattern

_WHY = backends.why_unavailable("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def cb():
    return backends.get("cpu")


def _isas():
    return ["none"] if _WHY is not None else list(backends.get("cpu").ext.describe()["isas"])


@pytest.fixture(params=_isas())
def isa(request, cb):
    cb.set_isa(request.param)
    yield request.param
    cb.set_isa("auto")


def _case(b, shape, dens, seed):
    g = torch.Generator().manual_seed(seed)
    if dens in (0.0, 1.0):
        mask = torch.full(shape, bool(dens))
    else:
        mask = block_mask(torch.rand(shape, generator=g), b, dens)
        if shape[0] >= 2 * b:  # an empty and an all-kept block row
            mask[:b] = False
            mask[b:2 * b] = True
    w = torch.randn(shape, generator=g) * mask
    return mask, w


def _close(got, want, dt, what):
    assert got.dtype == dt, what
    err = ((got.double() - want).abs().max() / (1 + want.abs().max())).item() if want.numel() else 0.0
    assert err <= TOL[dt], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("b", [8, 16, 32])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_block_kernels_match_reference(cb, isa, b, dt):
    pat = parse_pattern(f"block:{b}")
    for i, (shape, dens, m_rows) in enumerate([((3 * b, 5 * b), 0.4, 17), ((4 * b, 2 * b), 1.0, 2),
                                               ((2 * b, 3 * b), 0.0, 33), ((5 * b, 4 * b), 0.3, 70)]):
        mask, w = _case(b, shape, dens, i)
        vals = kept.gather(w, mask).to(dt)
        wd = kept.scatter(vals, mask).double()
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(m_rows, shape[1], generator=g).to(dt)
        dy = torch.randn(m_rows, shape[0], generator=g).to(dt)
        bias = torch.randn(shape[0], generator=g).to(dt)
        assert cb._bsr_for(mask, pat, m_rows) is not None
        _close(cb.kept_linear_fwd(x, vals, mask, bias, pat), x.double() @ wd.t() + bias.double(), dt, "forward")
        _close(cb.kept_linear_fwd(x, vals, mask, None, pat), x.double() @ wd.t(), dt, "forward, no bias")
        _close(cb.kept_linear_dx(dy, vals, mask, pat), dy.double() @ wd, dt, "dX")
        dw = cb.kept_linear_dw(dy, x, mask, pat)
        assert dw.shape == vals.shape
        _close(dw, kept.gather(dy.double().t() @ x.double(), mask), dt, "dW")


def test_threads_split_block_rows(cb):
    """Two threads with parallelism forced on: the forward's nnz-balanced row ranges cut block rows."""
    old_t, d0 = torch.get_num_threads(), cb.ext.describe()
    try:
        torch.set_num_threads(2)
        cb.ext.set_tunable("min_par_work", 0)
        pat = parse_pattern("block:16")
        mask, w = _case(16, (7 * 16, 3 * 16), 0.5, 7)
        mask[:16 * 5] = False  # nearly all kept values in the last two block rows: the split lands inside
        mask[16 * 5:16 * 6, :16] = True
        w = torch.randn(mask.shape) * mask
        vals = kept.gather(w, mask)
        x, dy = torch.randn(40, 48), torch.randn(40, 112)
        _close(cb.kept_linear_fwd(x, vals, mask, None, pat), x.double() @ w.double().t(), torch.float32, "fwd")
        _close(cb.kept_linear_dx(dy, vals, mask, pat), dy.double() @ w.double(), torch.float32, "dX")
        _close(cb.kept_linear_dw(dy, x, mask, pat), kept.gather(dy.double().t() @ x.double(), mask),
               torch.float32, "dW")
    finally:
        torch.set_num_threads(old_t)
        cb.ext.set_tunable("min_par_work", d0["min_par_work"])


def test_fallbacks(cb):
    pat = parse_pattern("block:8")
    mask, w = _case(8, (32, 24), 0.5, 3)
    assert cb._bsr_for(mask, pat, 1) is None  # one row: the gather kernel
    torn = mask.clone()
    torn[0, 0] = not bool(torn[0, 0])  # no longer whole blocks: the CSR kernels, same results
    assert cb._bsr(torn, pat) is None
    w = torch.randn(torn.shape) * torn
    vals = kept.gather(w, torn)
    x = torch.randn(5, 24)
    _close(cb.kept_linear_fwd(x, vals, torn, None, pat), x.double() @ w.double().t(), torch.float32, "fwd")
    with pytest.raises(RuntimeError, match="block entry"):  # the C++ side refuses an index outside the values
        fwd = cb._bsr(mask, pat)[0]
        cb.ext.spmm_bsr(x, 32, 24, *fwd, 8, False, kept.gather(w * mask, mask)[:-1], None)


def test_layer_trains_like_reference():
    from sparsefast.nn import SparseLinear
    torch.manual_seed(0)
    a = SparseLinear(64, 96, pattern="block:16", sparsity=0.6, backend="cpu")
    r = SparseLinear(64, 96, pattern="block:16", sparsity=0.6, backend="reference")
    r.load_state_dict(a.state_dict())
    oa, orf = torch.optim.AdamW(a.parameters(), 1e-2), torch.optim.AdamW(r.parameters(), 1e-2)
    for _ in range(4):
        x = torch.randn(24, 64)
        for layer, opt in ((a, oa), (r, orf)):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(a.dense_weight(), r.dense_weight(), atol=1e-5, rtol=1e-4)
