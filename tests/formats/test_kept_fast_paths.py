"""The compiled CPU fast paths of mask changes (index, remap merge, top-k) against their torch
definitions, with the extension used and with it hidden (both paths must agree bit for bit)."""
import pytest
import torch

import sparsefast
from sparsefast import masks
from sparsefast.formats import kept


@pytest.fixture(params=["ext", "torch"])
def path(request, monkeypatch):
    if request.param == "ext":
        if kept._cpu_fast(torch.zeros(1)) is None:
            pytest.skip("the compiled CPU extension is not available")
    else:
        monkeypatch.setattr(kept, "_cpu_fast", lambda t: None)
    return request.param


def _brute_remap(old: torch.Tensor, new: torch.Tensor):
    """Reference: position of each new kept entry among the old kept entries (canonical order)."""
    old_pos = {int(p): i for i, p in enumerate(kept._keys(old).tolist())}
    src, keep = [], []
    for p in kept._keys(new).tolist():
        src.append(old_pos.get(int(p), 0))
        keep.append(int(p) in old_pos)
    return torch.tensor(src, dtype=torch.long), torch.tensor(keep, dtype=torch.bool)


@pytest.mark.parametrize("shape", [(7, 13), (64, 48), (300, 257), (6, 4, 3, 3), (8, 2, 1, 5)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_index_and_remap(path, shape, density):
    g = torch.Generator().manual_seed(hash((shape, density)) % 1000)
    old = torch.rand(shape, generator=g) < density
    new = old.clone()
    flip = torch.rand(shape, generator=g) < 0.3
    new[flip] = ~new[flip]
    flat = kept.index(new.clone())
    if new.dim() == 2:
        assert torch.equal(flat.long(), new.reshape(-1).nonzero().reshape(-1))
    src, keep = kept.remap(old.clone(), new.clone())
    rs, rk = _brute_remap(old, new)
    assert torch.equal(keep, rk)
    assert torch.equal(src[keep].long(), rs[rk])
    vals = torch.randn(int(old.sum()), generator=g)
    moved = kept.remap_tensor(vals, src, keep)
    want = kept.gather(kept.scatter(vals, old) * new, new)
    assert torch.equal(moved, want)


@pytest.mark.parametrize("n", [20_000, 150_000])
def test_top_k_flat_paths_agree_with_stable_sort(path, n):
    g = torch.Generator().manual_seed(n)
    for kind in range(5):
        f = torch.randint(-3, 4, (n,), generator=g).float() if kind == 0 else torch.randn(n, generator=g)
        if kind == 2:
            f[torch.rand(n, generator=g) < 0.7] = float("-inf")
        if kind == 3:
            f[torch.rand(n, generator=g) < 0.5] = float("inf")
        if kind == 4:
            f = f.abs() * (torch.rand(n, generator=g) < 0.1)  # mostly exact zeros: a huge tie
        for k in (0, 1, n // 100, n // 3, n - 1, n):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(f, descending=True, stable=True).indices[:k]] = True
            assert torch.equal(masks.top_k_flat(f, k), ref), (kind, k)


def test_set_mask_computes_the_new_index_once(path):
    layer = sparsefast.nn.SparseLinear(64, 32, sparsity=0.8)
    new = masks.topk_mask(torch.randn(32, 64), 0.3)
    layer.set_mask(new)
    # the layer's mask reuses the index its remap computed: cached (same object), and correct
    first = kept.index(layer.mask)
    assert kept.index(layer.mask) is first
    assert torch.equal(first.long(), layer.mask.reshape(-1).nonzero().reshape(-1))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)
    # the caller's tensor is not copied, and keeps no cached index after the call (nnz int32s would live
    # as long as the caller's mask)
    assert kept.cached_index(new) is None and not kept._INDEX.holds("index", (new,))


def test_set_mask_with_the_layers_own_mask_or_a_view_of_it():
    """set_mask does not copy the caller's mask, except when it is (a view of) the layer's own: the remap
    needs the old mask intact while it reads the new one. The caller's tensor stays theirs: editing it
    afterwards changes nothing in the layer."""
    layer = sparsefast.nn.SparseLinear(16, 8, sparsity=0.5)
    w = layer.dense_weight().clone()
    m0 = layer.mask.clone()
    layer.set_mask(layer.mask)
    layer.set_mask(layer.mask[:, :])
    layer.set_mask(layer.mask.t().t())
    assert torch.equal(layer.dense_weight(), w) and torch.equal(layer.mask, m0)
    new = m0.clone()
    new[:, :8] = False
    layer.set_mask(new)
    new.fill_(True)
    assert torch.equal(layer.mask, m0 & ~torch.arange(16).lt(8))
    torch.testing.assert_close(layer.dense_weight(), w * layer.mask)
    # another layer's mask as the new mask: copied into this layer's own, and that layer keeps its cached index
    other = sparsefast.nn.SparseLinear(16, 8, sparsity=0.25)
    idx = kept.index(other.mask)
    layer.set_mask(other.mask)
    assert torch.equal(layer.mask, other.mask) and kept.cached_index(other.mask) is idx


def test_layer_on_cpu_kernels_lets_the_index_go():
    """A layer routed to the cpu kernels (own CSR formats) does not keep the nnz-sized flat index after
    a forward; everything that needs it (dense_weight, set_mask, a step) rebuilds it and stays right."""
    from sparsefast import backends
    if "cpu" not in backends.available():
        pytest.skip("cpu backend unavailable")
    layer = sparsefast.nn.SparseLinear(64, 48, sparsity=0.7, backend="cpu")
    ref = layer.dense_weight()
    x = torch.randn(40, 64)
    y = layer(x)
    assert layer.backend == "cpu"
    assert not kept._INDEX.holds("index", (layer.mask,))
    torch.testing.assert_close(y, x @ ref.t() + layer.bias)
    y.square().sum().backward()
    g = layer.dense_grad()
    torch.testing.assert_close(g, ((2 * y).t() @ x) * layer.mask, rtol=1e-4, atol=1e-4)
    new = masks.topk_mask(torch.randn(48, 64), 0.5)
    before = layer.dense_weight()
    layer.set_mask(new)
    torch.testing.assert_close(layer.dense_weight(), before * new)


@pytest.mark.parametrize("n", [0, 1, 17, 1000, 40_001])
def test_fill_where_and_remap_tensor(path, n):
    """fill_where_ is masked_fill_ (NaN/Inf kept where not filled, version bumped); remap_tensor zeroes the
    entries that were not kept before, for every element size, the same on both paths."""
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g)
    if n > 3:
        t[1], t[2] = float("nan"), float("inf")
    m = torch.rand(n, generator=g) < 0.4
    want = t.clone().masked_fill_(m, -float("inf"))
    v0 = t._version
    got = kept.fill_where_(t, m, -float("inf"))
    assert got is t and torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert n == 0 or t._version > v0
    src = torch.randint(0, max(n, 1), (n,), generator=g) if n else torch.zeros(0, dtype=torch.long)
    keep = torch.rand(n, generator=g) < 0.7
    for dt in (torch.float32, torch.bfloat16, torch.float64, torch.int64):
        x = (torch.randn(n, generator=g) * 100).to(dt)
        out = kept.remap_tensor(x, src, keep)
        exp = x[src].masked_fill(~keep, 0) if n else torch.zeros(0, dtype=dt)
        assert out.dtype == dt and torch.equal(out, exp)


@pytest.mark.parametrize("shape", [(7, 13), (64, 48), (6, 4, 3, 3), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64, torch.bool])
def test_scatter_gather(path, shape, density, dt):
    """scatter/gather (the dense-routed kept calls) on both paths: exact, +0 at pruned positions, and still
    differentiable where autograd records."""
    g = torch.Generator().manual_seed(len(shape) * 100 + int(density * 10))
    mask = torch.rand(shape, generator=g) < density
    w = torch.randn(shape, generator=g)
    w = w > 0 if dt == torch.bool else w.to(dt)  # bool: DST scatters its kept-space drop selection
    v = kept.gather(w, mask)
    assert v.dtype == dt and torch.equal(v, w[mask] if mask.dim() == 2 else w.permute(0, 2, 3, 1)[mask.permute(0, 2, 3, 1)])
    d = kept.scatter(v, mask)
    assert d.shape == mask.shape and torch.equal(d, torch.where(mask, w, torch.zeros((), dtype=dt)))
    if dt == torch.bool:
        return
    assert not torch.signbit(d[~mask]).any()
    vg = v.clone().requires_grad_(True)
    kept.scatter(vg, mask).sum().backward()
    assert torch.equal(vg.grad, torch.ones_like(v))
    with pytest.raises(ValueError, match="values for a mask"):
        kept.scatter(v[:-1] if v.numel() else torch.zeros(1, dtype=dt), mask)


def _isas():
    from sparsefast import backends
    try:
        return list(backends.get("cpu").ext.describe()["isas"])
    except Exception:  # no compiled extension: the torch path only
        return ["none"]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("n", [5_000, 20_000, 150_001])
def test_top_k_flat_exclude_and_absval(path, isa, n):
    """``exclude``/``absval`` (the fused DST grow selection) equal filling -inf at the excluded entries of
    |f| (or f), a stable descending sort, and clearing the excluded entries — on every compiled ISA, both
    thread counts, with ties, infinities and excluded shares from none to almost all."""
    if isa != "none" and path == "torch":
        pytest.skip("the ISA applies to the extension path")
    from sparsefast import backends
    cb = backends.get("cpu") if isa != "none" else None
    if cb is not None:
        cb.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        g = torch.Generator().manual_seed(n + 7)
        for kind in range(4):
            f = torch.randn(n, generator=g)
            if kind == 1:
                f = torch.randint(-3, 4, (n,), generator=g).float()  # big ties, of both signs
            if kind == 2:
                f[torch.rand(n, generator=g) < 0.2] = float("-inf")
            for share in (0.0, 0.5, 0.97):
                ex = torch.rand(n, generator=g) < share
                for absval in (False, True):
                    s = f.abs() if absval else f.clone()
                    s[ex] = float("-inf")
                    for k in (1, n // 50, n // 3, n - 1):
                        ref = torch.zeros(n, dtype=torch.bool)
                        ref[torch.sort(s, descending=True, stable=True).indices[:k]] = True
                        ref &= ~ex
                        for t in (1, 2):
                            torch.set_num_threads(t)
                            got = masks.top_k_flat(f, k, exclude=ex, absval=absval)
                            assert torch.equal(got, ref), (kind, share, absval, k, t)
    finally:
        torch.set_num_threads(threads)
        if cb is not None:
            cb.set_isa("auto")


def test_top_k_flat_exclude_checks_its_argument():
    with pytest.raises(ValueError, match="exclude must be a bool tensor of 10 entries"):
        masks.top_k_flat(torch.randn(10), 3, exclude=torch.zeros(9, dtype=torch.bool))


@pytest.mark.parametrize("isa", _isas())
def test_index_csr_and_merge_fast_paths_on_every_isa(isa):
    """The vectorised nonzero compaction (kept index), the CSR built from the kept index, and the
    branch-free key merge (int32 and int64 keys) against torch, on every compiled ISA, both thread counts,
    densities 0..1, shapes with ragged tails and empty rows."""
    if isa == "none":
        pytest.skip("the compiled CPU extension is not available")
    from sparsefast import backends
    cb = backends.get("cpu")
    ext = cb.ext
    cb.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        g = torch.Generator().manual_seed(3)
        for shape in [(1, 1), (3, 7), (33, 65), (130, 517), (257, 4099)]:
            for d in (0.0, 0.01, 0.1, 0.5, 0.97, 1.0):
                m = torch.rand(shape, generator=g) < d
                m[shape[0] // 2] = False  # an empty row
                for t in (1, 2):
                    torch.set_num_threads(t)
                    flat = ext.flat_nonzero(m)
                    assert flat.dtype == torch.int32
                    assert torch.equal(flat.long(), m.reshape(-1).nonzero().reshape(-1)), (shape, d, t)
                    rp, col = ext.csr_from_flat(flat, *shape)
                    rp2, col2 = ext.build_csr(m)
                    assert torch.equal(rp, rp2) and torch.equal(col, col2), (shape, d, t)
                    new = m ^ (torch.rand(shape, generator=g) < 0.2)
                    nf = ext.flat_nonzero(new)
                    src, found = ext.rank_in_mask(m, nf)  # rank among m's kept entries, no index of m
                    assert torch.equal(found, torch.isin(nf, flat)), (shape, d, t)
                    assert torch.equal(src[found], torch.searchsorted(flat.long(), nf[found].long()))
                    assert bool(((src >= 0) & (src < max(flat.numel(), 1))).all())
                    for a, b in ((flat, nf), (flat.long(), nf.long())):
                        if a.numel() == 0:
                            continue
                        src, found = ext.merge_keys(a, b)
                        want = torch.isin(b, a)
                        assert torch.equal(found, want), (shape, d, t)
                        assert bool(((src >= 0) & (src < a.numel())).all())
                        assert torch.equal(a[src[found]], b[found])
    finally:
        torch.set_num_threads(threads)
        cb.set_isa("auto")


def test_gather_keep_and_csr_from_flat_check_their_arguments():
    if kept._cpu_fast(torch.zeros(1)) is None:
        pytest.skip("the compiled CPU extension is not available")
    ext = kept._cpu_fast(torch.zeros(1))
    v = torch.randn(5)
    out = ext.gather_keep(v, torch.tensor([4, 0, 2]), torch.tensor([True, True, False]))
    assert torch.equal(out, torch.stack([v[4], v[0], torch.tensor(0.0)]))
    for bad, keep in ((5, True), (9, False), (-1, True)):  # every position must be valid, kept or not
        with pytest.raises(RuntimeError, match="position is out of range"):
            ext.gather_keep(v, torch.tensor([0, bad]), torch.tensor([True, keep]))
    with pytest.raises(RuntimeError, match="position out of range"):
        ext.csr_from_flat(torch.tensor([3, 12], dtype=torch.int32), 3, 4)
    m = torch.tensor([[True, False, True], [False, True, True]])
    src, found = ext.rank_in_mask(m, torch.tensor([4, 0, 1], dtype=torch.int32))  # any key order
    assert src.tolist()[:2] == [2, 0] and found.tolist() == [True, True, False]
    for bad in (6, -1):
        with pytest.raises(RuntimeError, match="key out of range"):
            ext.rank_in_mask(m, torch.tensor([0, bad], dtype=torch.int32))


def test_scatter_flat_single_pass_matches_torch_and_checks_order():
    """The ascending scatter (zero fill and values in one pass per thread chunk) equals torch's scatter for
    every element size, density and thread count, and refuses positions that are not strictly ascending."""
    ext = kept._cpu_fast(torch.zeros(1))
    if ext is None or not hasattr(ext, "scatter_flat"):
        pytest.skip("the compiled CPU extension is not available")
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(11)
    try:
        for numel in (1, 7, 5000, 300_001):
            for d in (0.0, 0.001, 0.5, 1.0):
                m = torch.rand(numel, generator=g) < d
                flat = m.nonzero().reshape(-1).to(torch.int32)
                for dt in (torch.bool, torch.float16, torch.float32, torch.float64):
                    v = torch.randn(flat.numel(), generator=g)
                    v = v > 0 if dt == torch.bool else v.to(dt)
                    want = torch.zeros(numel, dtype=dt)
                    want[flat.long()] = v
                    for t in (1, 2):
                        torch.set_num_threads(t)
                        got = ext.scatter_flat(v, flat, numel, True)
                        assert torch.equal(got, want), (numel, d, dt, t)
                        assert torch.equal(ext.scatter_flat(v, flat, numel, False), want)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="not strictly ascending"):
        ext.scatter_flat(torch.ones(3), torch.tensor([0, 5, 5], dtype=torch.int32), 8, True)
    with pytest.raises(RuntimeError, match="not strictly ascending"):
        ext.scatter_flat(torch.ones(3), torch.tensor([0, 5, 2], dtype=torch.int32), 8, True)
