"""Triton block-sparse kernels (sparsefast.backends.triton.block) against the float64 masked-dense
reference. Without a GPU they run under TRITON_INTERPRET=1 (set by conftest), so shapes are tiny."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefast.backends.base import ConvParams, OpQuery
from sparsefast.formats import kept
from sparsefast.masks import block_mask, parse_pattern

BK = pytest.importorskip("sparsefast.backends.triton.block")
from sparsefast.backends.triton import interpreting  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (8e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bmask(b, nbr, nbc, density, seed=0):
    """A block:b mask of ``nbr x nbc`` blocks; for 0 < density < 1 block-row 0 and block column 1 are
    dropped entirely and block-row 1 is kept entirely (empty rows / columns, a full row)."""
    g = torch.Generator().manual_seed(seed)
    blk = torch.rand(nbr, nbc, generator=g) < density
    if 0 < density < 1 and nbr > 2 and nbc > 2:
        blk[0] = False
        blk[:, 1] = False
        blk[1] = True
        blk[1, 1] = False
    m = blk.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return m.to(DEV)


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def impl():
    return BK.Impl()


# ------------------------------------------------------------------------------------------------
# block index
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [8, 16, 32])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_index_points_at_the_kept_values(b, density):
    """rowptr / col, the transposed block list (offset, leading dim) and the dW work list describe
    exactly where each kept block's values sit in canonical order."""
    nbr, nbc = 4, 11
    mask = _bmask(b, nbr, nbc, density, seed=b)
    idx = BK.build_index(mask, b)
    blk = mask[::b, ::b].cpu()
    assert idx.nblocks == int(blk.sum()) and idx.nnz == int(mask.sum())
    pos = kept.scatter(torch.arange(idx.nnz, device=DEV, dtype=torch.float64), mask).cpu()
    rowptr, col = idx.rowptr.cpu().long(), idx.col.cpu().long()
    assert torch.equal(rowptr, torch.cat([torch.zeros(1, dtype=torch.long), blk.sum(1).cumsum(0)]))
    for i in range(nbr):
        nb = int(rowptr[i + 1] - rowptr[i])
        for t in range(nb):
            j = int(col[rowptr[i] + t])
            want = rowptr[i] * b * b + torch.arange(b)[:, None] * nb * b + t * b + torch.arange(b)[None, :]
            assert torch.equal(pos[i * b:(i + 1) * b, j * b:(j + 1) * b].long(), want)
    tb = idx.tblocks.cpu().long()
    colptr = idx.colptr.cpu().long()
    for j in range(nbc):
        for e in range(int(colptr[j]), int(colptr[j + 1])):
            i, off, ld = tb[e].tolist()
            assert blk[i, j]
            want = off + torch.arange(b)[:, None] * ld + torch.arange(b)[None, :]
            assert torch.equal(pos[i * b:(i + 1) * b, j * b:(j + 1) * b].long(), want)
    covered = []
    step = BK.KSTEP // b
    for i, t0 in idx.items.cpu().tolist():
        nb = int(rowptr[i + 1] - rowptr[i])
        covered += [(i, t) for t in range(t0, min(t0 + step, nb))]
    assert sorted(covered) == [(i, t) for i in range(nbr) for t in range(int(rowptr[i + 1] - rowptr[i]))]


def test_index_rejects_partly_kept_blocks():
    mask = _bmask(8, 2, 2, 1.0)
    mask[3, 3] = False
    with pytest.raises(ValueError, match="partly kept"):
        BK.build_index(mask, 8)


# ------------------------------------------------------------------------------------------------
# Linear: forward, dX, masked dW (kept values in, kept values out)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [8, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.45, 1.0])
def test_linear_kept(impl, b, dtype, density):
    nbr, nbc = 3, 5
    N, K, M = nbr * b, nbc * b, 20                      # M not a multiple of the row block
    pat = parse_pattern(f"block:{b}")
    mask = _bmask(b, nbr, nbc, density, seed=b + 7)
    w = _rand(N, K, seed=1)
    v = kept.gather(w, mask).to(dtype)
    wm = kept.scatter(v.double(), mask)
    x = _rand(M, 2 * K, dtype=dtype, seed=2)[:, ::2] if b == 16 else _rand(M, K, dtype=dtype, seed=2)
    bias = _rand(N, dtype=dtype, seed=3)
    dy = _rand(M, N, dtype=dtype, seed=4)
    y = impl.kept_linear_fwd(x, v, mask, bias, pat)
    assert y.dtype == dtype and y.shape == (M, N)
    _close(y, F.linear(x.double(), wm, bias.double()), dtype, "y")
    y0 = impl.kept_linear_fwd(x, v, mask, None, pat)
    _close(y0, F.linear(x.double(), wm), dtype, "y (no bias)")
    dead_rows = ~mask.any(1)
    assert (y0[:, dead_rows] == 0).all()                # empty block-rows: exact zeros
    assert torch.equal(y[:, dead_rows], bias[dead_rows].expand(M, -1))
    dx = impl.kept_linear_dx(dy, v, mask, pat)
    _close(dx, dy.double() @ wm, dtype, "dx")
    assert (dx[:, ~mask.any(0)] == 0).all()              # empty block columns: exact zeros
    dv = impl.kept_linear_dw(dy, x, mask, pat)
    assert dv.dtype == dtype and dv.shape == v.shape
    _close(dv, kept.gather(dy.double().t() @ x.double(), mask), dtype, "dW (kept values)")


@pytest.mark.parametrize("b", [8, 32])
def test_dw_split_reduction(impl, monkeypatch, b):
    """Few work items and a long M: the dW reduction is split over programs (fp32 partials)."""
    monkeypatch.setattr(BK, "_split", lambda programs, steps, device, min_steps=4: min(3, steps))
    pat = parse_pattern(f"block:{b}")
    mask = _bmask(b, 2, 3, 0.6, seed=3)
    M = 70
    x, dy = _rand(M, 3 * b, seed=1), _rand(M, 2 * b, seed=2)
    _close(impl.kept_linear_dw(dy, x, mask, pat), kept.gather(dy.double().t() @ x.double(), mask),
           torch.float32, "dW split")


def test_dense_weight_primitives(impl):
    """linear_fwd / linear_dx / linear_dw with a dense-shaped weight (packed values cached per version)."""
    pat = parse_pattern("block:16")
    mask = _bmask(16, 2, 4, 0.5, seed=5)
    w = _rand(32, 64, seed=1)
    x, dy, bias = _rand(5, 64, seed=2), _rand(5, 32, seed=3), _rand(32, seed=4)
    wm = (w * mask).double()
    _close(impl.linear_fwd(x, w, mask, bias, pat), F.linear(x.double(), wm, bias.double()), torch.float32, "y")
    assert impl.packed(w, mask, pat) is impl.packed(w, mask, pat)
    w.add_(1.0)                                              # optimizer step: values re-gathered
    wm = (w * mask).double()
    _close(impl.linear_dx(dy, w, mask, pat), dy.double() @ wm, torch.float32, "dx")
    dw = impl.linear_dw(dy, x, mask, pat)
    assert dw.shape == w.shape and (dw[~mask] == 0).all()
    _close(dw, (dy.double().t() @ x.double()) * mask, torch.float32, "dW")


def test_mask_change_rebuilds_the_index(impl):
    pat = parse_pattern("block:8")
    mask = _bmask(8, 2, 3, 0.5, seed=1)
    idx = impl.index(mask, 8)
    assert impl.index(mask, 8) is idx
    mask[:8, 16:24] = ~mask[:8, 16:24]                       # flip one block in place (set_mask)
    idx2 = impl.index(mask, 8)
    assert idx2 is not idx and idx2.nnz == int(mask.sum())
    w = _rand(16, 24)
    v = kept.gather(w, mask)
    x = _rand(3, 24, seed=2)
    _close(impl.kept_linear_fwd(x, v, mask, None, pat), F.linear(x.double(), (w * mask).double()),
           torch.float32, "y after mask change")


# ------------------------------------------------------------------------------------------------
# through the triton backend: routing, conv, layers
# ------------------------------------------------------------------------------------------------
def _triton():
    import sparsefast.backends as bk
    if "triton" not in bk.available():
        pytest.skip(f"triton backend unavailable: {bk.why_unavailable('triton')}")
    return bk.get("triton")


def test_routing():
    from sparsefast.backends.triton import TritonBackend
    from sparsefast.backends.triton import nm as NMmod
    from sparsefast.backends.triton import unstructured as U
    t = TritonBackend()
    assert isinstance(t._impl(parse_pattern("block:16")), BK.Impl)
    assert isinstance(t._impl(parse_pattern("unstructured")), U.Impl)
    assert isinstance(t._impl(parse_pattern("2:4")), NMmod.Impl)


def test_failed_load_names_the_block_kernels(monkeypatch):
    import importlib

    from sparsefast.backends.triton import TritonBackend
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.endswith(".block"):
            raise ImportError("simulated")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    t = TritonBackend()
    q = OpQuery("linear", torch.device(DEV), torch.float32, (32, 32), parse_pattern("block:16"), 4, 0.5)
    reasons = t.not_supported_reasons(q)
    assert len(reasons) == 1 and "triton block kernels failed to load" in reasons[0] and "simulated" in reasons[0]
    with pytest.raises(RuntimeError, match="triton block kernels failed to load"):
        t._get(parse_pattern("block:16"))
    assert not t.not_supported_reasons(OpQuery("linear", torch.device(DEV), torch.float32, (32, 32),
                                                parse_pattern("unstructured"), 4, 0.5))


def test_linear_and_conv_through_the_backend():
    """Linear (block kernels) and Conv2d (unstructured kernels) with a block mask, kept values in,
    autograd included, against float64 masked-dense."""
    from sparsefast.masks import magnitude_mask
    from sparsefast.ops import sparse_conv2d_kept, sparse_linear_kept
    _triton()
    mask = _bmask(16, 2, 3, 0.5, seed=2)
    w = _rand(32, 48, seed=1)
    v = kept.gather(w, mask).requires_grad_(True)
    x = _rand(6, 48, seed=2).requires_grad_(True)
    dy = _rand(6, 32, seed=3)
    sparse_linear_kept(x, v, mask, backend="triton", pattern="block:16").backward(dy)
    wd = kept.scatter(v.detach().double(), mask).requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    F.linear(xd, wd).backward(dy.double())
    _close(x.grad, xd.grad, torch.float32, "dx")
    _close(v.grad, kept.gather(wd.grad, mask), torch.float32, "dW")

    cw = _rand(16, 8, 3, 3, seed=4)
    cmask = magnitude_mask(torch.rand(16, 8, 3, 3), "block:8", 0.5).to(DEV)
    cv = kept.gather(cw, cmask).requires_grad_(True)
    cx = _rand(2, 8, 6, 5, seed=5)
    y = sparse_conv2d_kept(cx, cv, cmask, None, 1, 1, backend="triton", pattern="block:8")
    cwd = kept.scatter(cv.detach().double(), cmask).requires_grad_(True)
    ry = F.conv2d(cx.double(), cwd, None, 1, 1)
    _close(y, ry.detach(), torch.float32, "conv y")
    cdy = _rand(*y.shape, seed=6)
    y.backward(cdy)
    ry.backward(cdy.double())
    _close(cv.grad, kept.gather(cwd.grad, cmask), torch.float32, "conv dW")
    t = _triton()
    q = OpQuery("conv", torch.device(DEV), torch.float32, (16, 8, 3, 3), parse_pattern("block:8"), 60, 0.5,
                ConvParams((1, 1), (1, 1)))
    assert t.not_supported_reasons(q) == []


def test_sparse_linear_trains_like_reference():
    """Two optimizer steps of SparseLinear(pattern="block:16") on triton == on the reference backend."""
    import sparsefast
    _triton()

    def run(backend):
        torch.manual_seed(0)
        layer = sparsefast.SparseLinear(48, 32, sparsity=0.5, pattern="block:16", backend=backend).to(DEV)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        x = _rand(7, 48, seed=1)
        for _ in range(2):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
        return layer(x).detach(), layer.dense_weight().detach(), layer.mask.clone()

    y, w, m = run("triton")
    ry, rw, rm = run("reference")
    assert torch.equal(m, rm)
    torch.testing.assert_close(w, rw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# support, dense preference, ahead-of-time specs
# ------------------------------------------------------------------------------------------------
def _q(shape, m_rows, density=0.1, b=32, dtype=torch.bfloat16, device="cuda", op="linear"):
    return OpQuery(op, torch.device(device), dtype, shape, parse_pattern(f"block:{b}"), m_rows, density,
                   ConvParams() if op == "conv" else None)


def test_prefer_dense_follows_the_cost_model(impl):
    assert impl.prefer_dense_reason(_q((4096, 4096), 8192)) is None              # compute-bound, b=32 90 %
    assert impl.prefer_dense_reason(_q((4096, 4096), 16)) is None                # memory-bound
    assert impl.prefer_dense_reason(_q((4096, 4096), 8192, b=16)) is None
    r = impl.prefer_dense_reason(_q((4096, 4096), 8192, b=8))
    assert r is not None and "block:8" in r and "dense" in r
    assert impl.prefer_dense_reason(_q((4096, 4096), 8192, 0.9)) is not None     # nearly dense
    assert impl.prefer_dense_reason(_q((4096, 4096), 16, device="cpu")) is None


def test_not_supported_reasons(impl):
    assert impl.not_supported_reasons(_q((64, 64), 8)) == []
    assert any("2**31" in r for r in impl.not_supported_reasons(_q((65536, 65536), 8)))
    assert any("32-bit" in r for r in impl.not_supported_reasons(_q((4096, 4096), 2**20)))


def test_aot_specs(monkeypatch):
    from sparsefast.kernel_report import validate_expect
    monkeypatch.setattr(BK, "interpreting", lambda: False)  # the GPU-side autotune configs
    specs = BK.aot_compile_configs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert {s.kernel for s in specs} == {BK._fwd_kernel, BK._dx_kernel, BK._dw_kernel}
    for s in specs:
        assert list(s.signature) == list(s.kernel.arg_names)
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)
        exp, errs = validate_expect(s.expect)
        assert exp and not errs, (s.name, errs)
    for t in ("bf16", "fp16", "fp32"):
        for b in (16, 32):
            for c in BK._configs("fwd"):
                for bm in sorted({min(bk, BK.bm_cap(t == "fp32", b)) for bk in BK.M_BUCKETS}):
                    for k in ("fwd", "dx"):
                        assert f"block-{k}-{t}-B{b}-BM{bm}-w{c.num_warps}s{c.num_stages}" in names
            for c in BK._configs("dw"):
                assert f"block-dw-{t}-B{b}-BM{32 if t == 'fp32' else 64}-w{c.num_warps}s{c.num_stages}" in names


def test_fp32_row_block_cap_per_triton_version():
    """fp32 FMA-dot row blocks: 64, and 32 with B=32 from Triton 3.7 on (ptxas spills the 64x32 tile there)."""
    assert BK.bm_cap(False, 32, (3, 8)) == 128
    assert BK.bm_cap(True, 16, (3, 8)) == 64 and BK.bm_cap(True, 32, (3, 6)) == 64
    assert BK.bm_cap(True, 32, (3, 7)) == 32 and BK.bm_cap(True, 32, (3, 9)) == 32
