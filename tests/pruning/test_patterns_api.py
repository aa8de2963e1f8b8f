"""Issue 17, "a pattern is a type": a pattern type added with ``register_pattern`` runs through the
pruning methods that opt in to its kind, with no change to the pruning code.

Two toy types from ``tests/_toy_patterns.py``, written the way a user would: :class:`Vec` (``"vec:C"``,
allocated like block) and :class:`TileNM` (``"N@RxC"``, a per-group rule like N:M on 2-D groups).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefast import masks as M
from sparsefast import pruning as P
from sparsefast.pruning import base as B
from _toy_patterns import TileNM, Vec, registered
from _util import data, mlp


@pytest.fixture(autouse=True)
def toy_patterns():
    with registered(Vec, TileNM):
        yield


# the opt-in: a subclass declaring the new kinds; the method's code is untouched
class ToyMagnitude(P.Magnitude):
    pattern_support = {**P.Magnitude.pattern_support, "vec": True, "tilenm": True}


class ToyRandom(P.Random):
    pattern_support = {**P.Random.pattern_support, "vec": True, "tilenm": True}


class ToyRigL(P.RigL):
    pattern_support = {**P.RigL.pattern_support, "vec": True, "tilenm": True}


def test_toy_types_answer_the_pattern_api():
    v, t = M.parse_pattern("vec:4"), M.parse_pattern("2@2x2")
    assert isinstance(v, Vec) and isinstance(t, TileNM)
    assert (v.density, v.implied_sparsity, v.kept_per_group, v.unit, v.group_shape) == (None, None, None, (1, 4), (1, 4))
    assert (t.density, t.implied_sparsity, t.kept_per_group, t.unit, t.group_shape) == (0.5, 0.5, 2, (1, 1), (2, 2))
    assert v.label == "vec" and v.syntax == "'vec'" and t.label == "tile N:M"
    assert v.index_bytes(8, 8, 32) is None and t.kept_count(64, 0.9) == 32


def test_a_new_kind_is_refused_until_a_method_opts_in():
    model = mlp()
    with pytest.raises(ValueError, match=r"Magnitude does not support vec patterns \(vec:4\): "
                                         r"Magnitude.pattern_support does not list their kind 'vec'.*"
                                         r"accepts: 'unstructured', 'N:M', 'block:B'"):
        P.Magnitude(model, sparsity=0.5, pattern="vec:4")
    assert type(model[0]) is nn.Linear  # untouched
    assert "'vec'" in B.supported_patterns(ToyMagnitude.pattern_support)
    assert "'vec'" not in B.supported_patterns(P.Magnitude.pattern_support)


def _runs(mask, c):
    return M.reduction_view(mask).reshape(mask.shape[0], -1, c).sum(-1)


@pytest.mark.parametrize("distribution", ["global", "uniform"])
def test_magnitude_runs_a_registered_allocated_pattern(distribution):
    model = mlp()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pr = ToyMagnitude(model, sparsity=0.5, pattern="vec:4", distribution=distribution)
    pr.prune()
    runs = {n: _runs(l.mask, 4) for n, l in pr.layers}
    for n, l in pr.layers:
        assert l.pattern == "vec:4"
        assert bool(((runs[n] == 0) | (runs[n] == 4)).all())  # whole runs kept or dropped
    # the expected allocation, computed independently: runs ranked by summed |W|
    score = {n: dense[n].abs().reshape(dense[n].shape[0], -1, 4).sum(-1) for n in dense}
    if distribution == "global":
        flat = torch.cat([score[n].reshape(-1) for n in dense])
        k = round(0.5 * flat.numel())
        thr = torch.sort(flat, descending=True).values[k - 1]
        for n in dense:
            assert torch.equal(runs[n] == 4, score[n] >= thr)
        assert sum(int((runs[n] == 4).sum()) for n in runs) == k
    else:
        for n in dense:
            assert int((runs[n] == 4).sum()) == max(1, round(0.5 * score[n].numel()))
    # the layers run (the reference backend takes any registered type) and train
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()


def test_random_runs_a_registered_pattern():
    pr = ToyRandom(mlp(), sparsity=0.75, pattern="vec:4", seed=3)
    pr.prune()
    for n, l in pr.layers:
        r = _runs(l.mask, 4)
        assert bool(((r == 0) | (r == 4)).all()) and int((r == 4).sum()) >= 1


def test_a_registered_per_group_pattern_follows_its_rule():
    model = mlp()
    pr = ToyMagnitude(model, pattern="2@2x2")  # the pattern fixes the density: no sparsity= needed
    assert pr.target_sparsity == 0.5
    pr.prune()
    for n, l in pr.layers:
        t = TileNM(2, 2, 2)
        w = M.reduction_view(l.dense_weight()).abs()
        assert torch.equal(M.reduction_view(l.mask), t.top_mask(w, None))  # top-2 |W| of every 2x2 tile
        assert bool((t._tiles(M.reduction_view(l.mask)).sum(1) == 2).all())
    # a (1, m) tile is N:M: the same masks as the built-in "2:4", bit for bit
    a, b = ToyMagnitude(mlp(), pattern="2@1x4"), P.Magnitude(mlp(), pattern="2:4")
    a.prune()
    b.prune()
    assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in b.masks())


@pytest.mark.parametrize("pattern", ["vec:4", "2@2x2"])
def test_rigl_runs_registered_patterns(pattern):
    model = mlp()
    kw = {} if TileNM.parse(pattern) else {"sparsity": 0.5}
    pr = ToyRigL(model, pattern=pattern, update_every=1, end_step=100, drop_fraction=0.5, **kw)
    pr.prune()
    pat = M.parse_pattern(pattern)
    kept = {n: int(l.mask.sum()) for n, l in pr.layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    changed = False
    for x, y in data(3):
        before = pr.masks()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pr.step()
        opt.zero_grad()
        for n, l in pr.layers:
            assert pat.mask_error(M.reduction_view(l.mask)) is None
            assert int(l.mask.sum()) == kept[n]  # the layer keeps its count of units
            if isinstance(pat, TileNM):
                assert bool((pat._tiles(M.reduction_view(l.mask)).sum(1) == 2).all())  # every tile refilled
            changed |= not torch.equal(before[n], l.mask)
    assert changed


def test_legacy_flags_still_declare_support():
    class Old(P.Magnitude):  # a method written against the former supports_* attributes
        supports_nm = "no N:M here"
        supports_block = "no blocks either"

    assert Old.pattern_support == {"unstructured": True, "nm": "no N:M here", "block": "no blocks either"}
    with pytest.raises(ValueError, match=r"Old does not support N:M patterns \(2:4\): no N:M here\. Old accepts: "
                                         r"'unstructured'$"):
        Old(mlp(), pattern="2:4")
    with pytest.raises(ValueError, match=r"does not support block patterns \(block:8\): no blocks either"):
        Old(mlp(), sparsity=0.5, pattern="block:8")

    class New(P.Magnitude):  # the table; the flags follow it
        pattern_support = {"unstructured": True, "nm": "why not"}

    assert New.supports_nm == "why not" and New.supports_unstructured is True
    assert isinstance(New.supports_block, str)
    with pytest.raises(ValueError, match=r"block patterns .*New.pattern_support does not list their kind 'block'"):
        New(mlp(), sparsity=0.5, pattern="block:8")
    # the former positional form of resolve_pattern
    assert str(B.resolve_pattern("X", mlp(), "2:4", True)) == "2:4"
    with pytest.raises(ValueError, match="X does not support N:M patterns"):
        B.resolve_pattern("X", mlp(), "2:4", "nope")
    with pytest.raises(ValueError, match="X does not support unstructured patterns .*needs an N:M pattern"):
        B.resolve_pattern("X", mlp(), "unstructured", True, False)


def test_group_helpers_generalise_the_nm_ones():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 6, 2, 2, generator=g)  # conv weight: reduction view (8, 24), channel fastest
    nm = M.parse_pattern("2:6")
    assert torch.equal(B.group_top_mask(s, nm), B.nm_top_mask(s, 2, 6))
    need = torch.randint(0, 7, (8 * 24 // 6,), generator=g)
    assert torch.equal(B.group_top(s, need, (1, 6)), B.nm_group_top(s, need, 6))
    mask = torch.rand(8, 6, 2, 2, generator=g) < 0.5
    assert torch.equal(B.group_counts(mask, (1, 6)), B.nm_group_counts(mask, 6))
    # 2-D groups: tiles of the reduction view, in row-major tile order
    w = torch.randn(4, 8, generator=g)
    tiles = w.reshape(2, 2, 2, 4).permute(0, 2, 1, 3).reshape(-1, 8)
    got = B.group_top(w, torch.tensor([1, 2, 3, 0]), (2, 4))
    got_tiles = got.reshape(2, 2, 2, 4).permute(0, 2, 1, 3).reshape(-1, 8)
    assert got_tiles.sum(1).tolist() == [1, 2, 3, 0]
    for t in range(4):
        k = int(got_tiles[t].sum())
        assert torch.equal(got_tiles[t], torch.zeros(8, dtype=torch.bool).index_fill_(
            0, torch.sort(tiles[t], descending=True, stable=True).indices[:k], True))
    assert B.group_counts(got, (2, 4)).tolist() == [1, 2, 3, 0]
