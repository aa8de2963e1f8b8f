import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefast import masks


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 16)]),
       seed=st.integers(0, 10_000))
def test_nm_mask_keeps_top_n_per_group(rows, groups, nm, seed):
    n, m = nm
    s = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = masks.nm_mask(s, n, m)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert masks.is_nm(mask, n, m)
    g, gm = s.abs().reshape(-1, m), mask.reshape(-1, m)
    assert (gm.sum(1) == n).all()
    # every kept |score| >= every dropped |score| in its group
    kept_min = torch.where(gm, g, torch.full_like(g, float("inf"))).min(1).values
    drop_max = torch.where(~gm, g, torch.full_like(g, -1.0)).max(1).values
    assert (kept_min >= drop_max).all()


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 200), density=st.floats(0.001, 1.0), seed=st.integers(0, 1000))
def test_topk_mask_count_and_order(numel, density, seed):
    s = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    mask = masks.topk_mask(s, density)
    k = round(density * numel)
    assert int(mask.sum()) == k
    if 0 < k < numel:
        assert s.abs()[mask].min() >= s.abs()[~mask].max()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8)])
def test_transposable_nm_is_nm_both_ways(n, m):
    s = torch.randn(4 * m, 3 * m)
    mask = masks.transposable_nm_mask(s, n, m)
    assert masks.is_transposable_nm(mask, n, m)
    if masks._block_patterns(n, m) is not None:  # exact: exactly n per row and column
        assert int(mask.sum()) == n * s.numel() // m
    else:  # greedy: admissible, nearly full
        assert int(mask.sum()) >= 0.85 * n * s.numel() // m


def test_transposable_2_4_is_optimal_by_brute_force():
    torch.manual_seed(0)
    s = torch.randn(4, 4)
    mask = masks.transposable_nm_mask(s, 2, 4)
    best = -1.0
    rows = list(itertools.combinations(range(4), 2))
    for choice in itertools.product(rows, repeat=4):
        m = torch.zeros(4, 4, dtype=torch.bool)
        for r, cols in enumerate(choice):
            m[r, list(cols)] = True
        if (m.sum(0) == 2).all():
            best = max(best, float(s.abs()[m].sum()))
    assert float(s.abs()[mask].sum()) == pytest.approx(best)


def test_parse_pattern():
    assert masks.parse_pattern("2:4") == masks.Pattern(2, 4)
    assert not masks.parse_pattern("unstructured").is_nm
    for bad in ["2:2", "0:4", "5:4", "2-4", "abc", "2:4:8", "-1:4"]:
        with pytest.raises(ValueError):
            masks.parse_pattern(bad)
    with pytest.raises(TypeError):
        masks.parse_pattern(24)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        masks.nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        masks.nm_mask(torch.randn(3, 8), 4, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        masks.nm_mask(torch.randn(3, 8), 0, 4)
    with pytest.raises(ValueError, match="density"):
        masks.topk_mask(torch.randn(10), 0.0)
    with pytest.raises(ValueError, match="density"):
        masks.topk_mask(torch.randn(10), 1.5)
    nan = torch.randn(4, 8)
    nan[1, 2] = float("nan")
    for fn in (lambda: masks.nm_mask(nan, 2, 4), lambda: masks.topk_mask(nan, 0.5),
               lambda: masks.transposable_nm_mask(nan, 2, 4)):
        with pytest.raises(ValueError, match="NaN"):
            fn()
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape"):
        masks.validate_mask(torch.ones(4, 4, dtype=torch.bool), w, "unstructured")
    with pytest.raises(ValueError, match="2:4"):
        masks.validate_mask(torch.ones(4, 8, dtype=torch.bool), w, "2:4")
    with pytest.raises(TypeError):
        masks.validate_mask(torch.ones(4, 8, dtype=torch.complex64), w, "unstructured")


def test_density_and_conv_reduction_layout():
    w = torch.randn(6, 8, 3, 3)
    mask = masks.magnitude_mask(w, "2:4", None)
    # groups of 4 consecutive input channels at each kernel position
    assert (mask.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).sum(-1) == 2).all()
    assert masks.density(mask) == 0.5
    rv = masks.reduction_view(w)
    assert torch.equal(masks.from_reduction_view(rv, w.shape), w)
    assert masks.density(masks.magnitude_mask(w, "unstructured", 0.75)) == pytest.approx(0.25, abs=1 / w.numel())


def test_top_k_flat_equals_stable_sort_on_ties_and_infinities():
    """The O(n) top-k (sample bracket + kthvalue) keeps exactly the first k of a stable descending
    sort, on tie-heavy, +-inf and large (sampled-path) inputs."""
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        n = int(torch.randint(1, 300, (1,), generator=g)) if trial % 4 else int(torch.randint(70_000, 150_000, (1,), generator=g))
        kind = trial % 5
        f = torch.randint(-3, 4, (n,), generator=g).float() if kind == 0 else torch.randn(n, generator=g)
        if kind == 2:
            f[torch.rand(n, generator=g) < 0.7] = float("-inf")
        if kind == 3:
            f[torch.rand(n, generator=g) < 0.5] = float("inf")
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.sort(f, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(masks.top_k_flat(f, k), ref), (n, k, kind)


# ---- issue 17: what a pattern type answers (the pruning methods and the roofline ask these) ----------
def test_pattern_density_and_implied_sparsity():
    u, nm, blk = masks.parse_pattern("unstructured"), masks.parse_pattern("1:4"), masks.parse_pattern("block:16")
    assert u.density is None and u.implied_sparsity is None
    assert blk.density is None and blk.implied_sparsity is None
    assert nm.density == 0.25 and nm.implied_sparsity == 0.75
    assert masks.Pattern(2, 4).implied_sparsity == 1.0 - 2 / 4  # the float the pruners always used


def test_pattern_per_group_rule_unit_and_groups():
    u, nm, blk = masks.parse_pattern("unstructured"), masks.parse_pattern("2:8"), masks.parse_pattern("block:8")
    # N:M: a per-group rule (n of every (1, m) group), single weights are the unit
    assert (nm.kept_per_group, nm.group_shape, nm.unit) == (2, (1, 8), (1, 1))
    # block: allocated, whole tiles are the unit
    assert (blk.kept_per_group, blk.group_shape, blk.unit) == (None, (8, 8), (8, 8))
    assert (u.kept_per_group, u.group_shape, u.unit) == (None, (1, 1), (1, 1))


def test_pattern_kept_count_and_index_bytes():
    nm, u, blk = masks.parse_pattern("2:4"), masks.parse_pattern("unstructured"), masks.parse_pattern("block:8")
    assert nm.kept_count(4096) == 2048 and nm.kept_count(4096, 0.1) == 2048  # its own density wins
    assert masks.parse_pattern("1:3").kept_count(10) == 3  # numel·n // m, as the packed format holds
    assert u.kept_count(1000, 0.1) == 100 and blk.kept_count(64, 0.25) == 16
    with pytest.raises(ValueError, match="needs a density"):
        u.kept_count(10)
    assert nm.index_bytes(64, 64, 2048) == 2048 * 2 // 8  # 2-bit indices
    assert masks.parse_pattern("4:8").index_bytes(8, 8, 32) == 32 * 3 // 8
    assert masks.parse_pattern("1:2").index_bytes(8, 8, 32) == 32 // 8  # at least one bit
    assert u.index_bytes(8, 8, 10) is None and blk.index_bytes(16, 16, 64) is None  # stored unstructured


def test_pattern_labels_for_messages():
    assert [(t.kind, t.label) for t in (masks.Unstructured, masks.NM, masks.Block)] == \
        [("unstructured", "unstructured"), ("nm", "N:M"), ("block", "block")]
    assert masks.Block.syntax == f"'block:B' (B in {masks.BLOCK_SIZES})" and masks.NM.syntax == "'N:M'"


def test_register_pattern_needs_a_kind_and_names_a_new_family():
    from dataclasses import dataclass
    from typing import ClassVar

    class Nameless(masks.Unstructured):
        pass

    with pytest.raises(ValueError, match="needs a class attribute kind"):
        masks.register_pattern(type("Bare", (masks.Pattern,), {}))
    assert Nameless.kind == "unstructured"  # a subclass keeping its parent's kind is that family

    @dataclass(frozen=True)
    class Big(masks.Block):  # a new family built on Block's geometry: its own name in messages
        b: int = 8
        kind: ClassVar[str] = "bigblock"

        @classmethod
        def parse(cls, s):
            return cls(int(s[4:])) if s.startswith("big:") else None

        def __str__(self):
            return f"big:{self.b}"

    try:
        assert masks.register_pattern(Big) is Big
        assert (Big.label, Big.syntax) == ("bigblock", "'bigblock'")
        p = masks.parse_pattern("big:16")
        assert isinstance(p, Big) and (p.unit, p.kept_per_group, p.density) == ((16, 16), None, None)
        m = masks.magnitude_mask(torch.randn(32, 32), p, 0.5)
        assert masks.validate_mask(m, torch.zeros(32, 32), "big:16").sum() == 512
    finally:
        masks.PATTERN_TYPES.remove(Big)
        masks._PARSED.clear()
