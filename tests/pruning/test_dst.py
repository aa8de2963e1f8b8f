"""Dynamic sparse training: SET, RigL, DSR, SNFS, and the dense-gradient capture they rely on."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import masks as M
from sparsefast.formats import kept
from sparsefast import pruning as P
from sparsefast.pruning._grad import GradCapture, dense_weight_grad
from _util import data, mlp


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def dense_grads(model, x, y):
    ref = sparsefast.densify(copy.deepcopy(model))
    F.cross_entropy(ref(x), y).backward()
    return [m.weight.grad.detach().clone() for m in ref.modules() if isinstance(m, nn.Linear)]


# ---- the gradient capture -----------------------------------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_capture_gives_the_dense_gradient(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(inplace=inplace),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(inplace=inplace),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 5), nn.ReLU(inplace=inplace))
    ref = copy.deepcopy(model)
    sparsefast.sparsify(model, sparsity=0.6)
    with torch.no_grad():
        for a, b in zip([m for m in model if hasattr(m, "mask")], [m for m in ref if hasattr(m, "weight")]):
            b.weight.copy_(a.dense_weight())
    layers = sparsefast.nn.sparse_layers(model)
    cap = GradCapture(layers)
    cap.arm()
    x = torch.randn(2, 3, 6, 6)
    (model(x) ** 2).sum().backward()
    (ref(x) ** 2).sum().backward()
    g = cap.pop()
    for (n, l), r in zip(layers, [m for m in ref if hasattr(m, "weight")]):
        torch.testing.assert_close(g[n], r.weight.grad, rtol=1e-4, atol=1e-5)
        assert bool((g[n][~l.mask] != 0).any())  # dense: the masked .grad would be 0 there
        assert l.weight.grad.shape == (int(l.mask.sum()),)  # the kept values' gradient only
        assert bool((l.dense_grad()[~l.mask] == 0).all())
    cap.disarm()
    model(x).sum().backward()
    assert cap.pop() == {}


def test_capture_linear_3d_input():
    lin = sparsefast.SparseLinear(6, 4, sparsity=0.5)
    x = torch.randn(2, 3, 6)
    cap = GradCapture([("l", lin)])
    cap.arm()
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(cap.pop()["l"], dense_weight_grad(lin, x, dy))
    torch.testing.assert_close(dense_weight_grad(lin, x, dy), dy.reshape(-1, 4).t() @ x.reshape(-1, 6))


# ---- RigL ---------------------------------------------------------------------------------------------
def test_rigl_drops_smallest_weights_and_grows_largest_gradients():
    model = mlp()
    pr = P.RigL(model, sparsity=0.8, distribution="uniform", update_every=2, end_step=100, drop_fraction=0.3)
    pr.prune()
    opt = sgd(model)
    batches = data(5)
    nnz0 = {n: int(l.mask.sum()) for n, l in pr.layers}
    for t, (x, y) in enumerate(batches, start=1):
        assert pr._capture.armed == (t % 2 == 0), "dense gradient only before update steps"
        G = dense_grads(model, x, y) if t % 2 == 0 else None
        F.cross_entropy(model(x), y).backward()
        opt.step()
        masks_before = pr.masks()
        w_after = {n: l.dense_weight().clone() for n, l in pr.layers}
        pr.step()
        opt.zero_grad()
        if t % 2:
            assert all(torch.equal(masks_before[n], l.mask) for n, l in pr.layers)
            continue
        alpha = 0.3 / 2 * (1 + math.cos(math.pi * t / 100))
        for (n, l), g in zip(pr.layers, G):
            m = masks_before[n]
            k = int(torch.tensor(float(m.sum())) * torch.tensor(alpha, dtype=torch.float32))  # rigl: floor, float32
            assert k > 0
            score = torch.where(m, -w_after[n].abs(), torch.full_like(g, -math.inf)).reshape(-1)
            drop = torch.zeros_like(score, dtype=torch.bool)
            drop[torch.sort(score, descending=True, stable=True).indices[:k]] = True
            after = m & ~drop.reshape(m.shape)
            gs = torch.where(after, torch.full_like(g, -math.inf), g.abs()).reshape(-1)
            grow = torch.zeros_like(gs, dtype=torch.bool)
            grow[torch.sort(gs, descending=True, stable=True).indices[:k]] = True
            expect = after | grow.reshape(m.shape)
            assert torch.equal(l.mask, expect), f"step {t} layer {n}"
            assert int(l.mask.sum()) == nnz0[n]  # constant density
            grown = grow.reshape(m.shape)
            assert bool((l.dense_weight()[grown & ~m] == 0).all())  # new weights start at 0
            # dropped and regrown in the same update: the old value stays (rigl reinit_when_same=False)
            assert torch.equal(l.dense_weight()[grown & m], w_after[n][grown & m])
            assert torch.equal(pr.last_update[n]["grown"], grown)


def test_rigl_stops_at_end_step_and_warns_without_gradient():
    model = mlp()
    pr = P.RigL(model, sparsity=0.5, update_every=1, end_step=3)
    pr.prune()
    opt = sgd(model)
    history = []
    for x, y in data(5):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        history.append(pr.masks())
    assert not pr._capture.armed  # past end_step nothing is captured
    assert all(torch.equal(history[2][n], history[4][n]) for n in history[2])
    # an update step without a backward pass: warning, masks unchanged
    pr2 = P.RigL(mlp(), sparsity=0.5, update_every=1, end_step=10)
    pr2.prune()
    before = pr2.masks()
    with pytest.warns(sparsefast.SparsefastWarning, match="no dense gradient"):
        pr2.step()
    assert all(torch.equal(before[n], l.mask) for n, l in pr2.layers)
    with pytest.raises(ValueError, match="end_step"):
        P.RigL(mlp(), sparsity=0.5)


@pytest.mark.parametrize("tell_pruner", [False, True])
@pytest.mark.parametrize("reinit_when_same", [False, True])
def test_rigl_resets_optimizer_state_of_grown_weights(tell_pruner, reinit_when_same):
    model = mlp()
    pr = P.RigL(model, sparsity=0.5, update_every=1, end_step=10, reinit_when_same=reinit_when_same)
    pr.prune()
    opt = sgd(model)
    if tell_pruner:
        pr.optimizer = opt  # accepted, no longer needed: set_mask moves every stepped optimizer's state
    for x, y in data(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = {n: kept.scatter(opt.state[l.weight]["momentum_buffer"], l.mask) for n, l in pr.layers}
        mask_before = pr.masks()
        w_before = {n: l.dense_weight().clone() for n, l in pr.layers}
        pr.step()
        opt.zero_grad()
    same_seen = False
    for n, l in pr.layers:
        buf = opt.state[l.weight]["momentum_buffer"]
        assert buf.shape == l.weight.shape
        dense = kept.scatter(buf, l.mask)
        grown = pr.last_update[n]["grown"]
        assert bool(grown.any())
        new = grown & ~mask_before[n]
        same = grown & mask_before[n]  # dropped and regrown in this update
        same_seen |= bool(same.any())
        assert bool((dense[new] == 0).all()) and bool((l.dense_weight()[new] == 0).all())
        if reinit_when_same:
            assert bool((dense[same] == 0).all()) and bool((l.dense_weight()[same] == 0).all())
        else:  # google-research/rigl reinit_when_same=False: value and momentum stay
            assert torch.equal(dense[same], before[n][same])
            assert torch.equal(l.dense_weight()[same], w_before[n][same])
        stay = l.mask & ~grown  # kept before and after: the momentum is untouched
        assert torch.equal(dense[stay], before[n][stay])
    assert same_seen, "the test needs a position dropped and regrown in the same update"


@pytest.mark.parametrize("cls", ["RigL", "SET"])
def test_dst_nm_regrows_inside_groups(cls):
    model = mlp()
    kw = dict(end_step=100) if cls == "RigL" else {}
    pr = getattr(P, cls)(model, pattern="2:4", update_every=1, drop_fraction=0.5, **kw)
    pr.prune()
    opt = sgd(model)
    changed = False
    for x, y in data(4):
        before = pr.masks()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        for n, l in pr.layers:
            rv = M.reduction_view(l.mask).reshape(-1, 4)
            assert bool((rv.sum(1) == 2).all())
            changed |= not torch.equal(before[n], l.mask)
    assert changed


# ---- SET ----------------------------------------------------------------------------------------------
def test_set_drops_smallest_and_grows_randomly_at_constant_density():
    def run(seed):
        model = mlp()
        pr = P.SET(model, sparsity=0.8, update_every=1, seed=seed)
        pr.prune()
        opt = sgd(model)
        x, y = data(1)[0]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = pr.masks()
        w = {n: l.dense_weight().clone() for n, l in pr.layers}
        nnz = {n: int(l.mask.sum()) for n, l in pr.layers}
        pr.step()
        for n, l in pr.layers:
            d, g = pr.last_update[n]["dropped"], pr.last_update[n]["grown"]
            assert int(l.mask.sum()) == nnz[n]
            assert int(d.sum()) == int(g.sum()) == int(torch.tensor(float(nnz[n])) * torch.tensor(0.3))
            kept = w[n][before[n] & ~d].abs()
            assert float(w[n][d].abs().max()) <= float(kept.min())
            assert bool((g <= ~(before[n] & ~d)).all())
            assert bool((l.dense_weight()[g & ~before[n]] == 0).all())
            assert torch.equal(l.dense_weight()[g & before[n]], w[n][g & before[n]])  # kept its value
        return {n: pr.last_update[n]["grown"] for n in pr.last_update}, pr

    g1, pr = run(0)
    g1b, _ = run(0)
    g2, _ = run(1)
    assert all(torch.equal(g1[n], g1b[n]) for n in g1)
    assert any(not torch.equal(g1[n], g2[n]) for n in g1)
    assert not pr._capture.armed  # SET never needs a dense gradient


# ---- DSR ----------------------------------------------------------------------------------------------
def test_dsr_global_threshold_and_proportional_regrowth():
    model = mlp()
    pr = P.DSR(model, sparsity=0.8, update_every=1, threshold=1e-6, drop_fraction=0.1)
    pr.prune()
    total = sum(int(l.mask.sum()) for _, l in pr.layers)
    opt = sgd(model)
    thresholds = []
    for x, y in data(6):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = pr.masks()
        w = {n: l.dense_weight().abs().clone() for n, l in pr.layers}
        H = pr.threshold
        pr.step()
        opt.zero_grad()
        thresholds.append(pr.threshold)
        assert sum(int(l.mask.sum()) for _, l in pr.layers) == total  # global density constant
        for n, l in pr.layers:
            d = pr.last_update[n]["dropped"]
            assert torch.equal(d, before[n] & (w[n] < H))
    # a tiny initial threshold prunes too little, so it doubles
    assert thresholds[0] == pytest.approx(2e-6) and thresholds[1] == pytest.approx(4e-6)


def test_largest_remainder():
    from sparsefast.pruning.dst import largest_remainder
    assert largest_remainder(10, [1, 1, 2], [100, 100, 100]) == [3, 2, 5] or \
        sum(largest_remainder(10, [1, 1, 2], [100, 100, 100])) == 10
    assert largest_remainder(10, [1, 1, 2], [100, 100, 1]) == [5, 4, 1] or \
        largest_remainder(10, [1, 1, 2], [100, 100, 1])[2] == 1
    assert sum(largest_remainder(7, [0.2, 0.3, 0.5], [3, 3, 3])) == 7
    assert largest_remainder(5, [1.0], [2]) == [2]


# ---- SNFS ---------------------------------------------------------------------------------------------
def test_snfs_momentum_and_redistribution():
    model = mlp()
    pr = P.SNFS(model, sparsity=0.8, update_every=3, momentum=0.9, drop_fraction=0.5)
    pr.prune()
    total = sum(int(l.mask.sum()) for _, l in pr.layers)
    opt = sgd(model)
    mom = None
    for t, (x, y) in enumerate(data(3), start=1):
        assert pr._capture.armed  # every step
        G = dense_grads(model, x, y)
        prev = mom
        mom = [(1 - 0.9) * g for g in G] if mom is None else [0.9 * m + 0.1 * g for m, g in zip(mom, G)]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if t == 3:
            before = pr.masks()
            for (n, l), m in zip(pr.layers, prev):  # the EMA of the dense gradients so far
                torch.testing.assert_close(pr._mom[n], m, rtol=1e-4, atol=1e-6)
            contrib = [float(m.abs()[before[n]].mean()) for (n, _), m in zip(pr.layers, mom)]
        pr.step()
        opt.zero_grad()
    assert sum(int(l.mask.sum()) for _, l in pr.layers) == total
    grown = [int(pr.last_update[n]["grown"].sum()) for n, _ in pr.layers]
    K = sum(int(pr.last_update[n]["dropped"].sum()) for n, _ in pr.layers)
    assert sum(grown) == K > 0
    # regrowth follows the mean momentum share (largest remainder, within capacity)
    from sparsefast.pruning.dst import largest_remainder
    caps = [int((~(before[n] & ~pr.last_update[n]["dropped"])).sum()) for n, _ in pr.layers]
    assert grown == largest_remainder(K, contrib, caps)
    share = [c / sum(contrib) for c in contrib]
    assert all(g >= math.floor(K * s) or g == c for g, s, c in zip(grown, share, caps))  # capped: rest moves on
    # inside a layer: grown where |momentum| is largest among the free positions
    for (n, l), m in zip(pr.layers, mom):
        g = pr.last_update[n]["grown"]
        if int(g.sum()) == 0:
            continue
        free = ~(before[n] & ~pr.last_update[n]["dropped"])
        not_grown = free & ~g
        if bool(not_grown.any()):
            assert float(pr._mom[n].abs()[g].min()) >= float(pr._mom[n].abs()[not_grown].max()) - 1e-7


# ---- SET's sampled uniform regrowth (layers above SAMPLED_GROWTH_ABOVE weights) -------------------------
def test_set_sampled_growth_is_a_uniform_seeded_subset_of_the_free_positions(monkeypatch):
    """Above the size threshold SET samples its regrowth: exactly as many grown as dropped, never at a
    position kept after the drop, reproducible from the seed, a new draw per step, and uniform over the
    free positions (per-row counts over many draws against the free share of each row, chi-square)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 256))  # 24576 weights each
    monkeypatch.setattr(P.SET, "SAMPLED_GROWTH_ABOVE", 10_000)
    pr = P.SET(model, sparsity=0.9, distribution="uniform", update_every=1, seed=5)
    pr.prune()
    n, l = pr.layers[0]
    # a skewed mask: rows 0..47 almost full, rows 48..95 almost empty, so uniformity is visible per row
    skew = torch.zeros(96, 256, dtype=torch.bool)
    skew[:48, :200] = True
    skew[48:, :12] = True
    l.set_mask(skew)
    after = l.mask.clone()
    after[:48, :60] = False  # a "drop" of 2880
    k = int((l.mask & ~after).sum())
    g1 = pr._grow_uniform(n, l, after, k, t=3)
    assert int(g1.sum()) == k and not bool((g1 & after).any())
    assert torch.equal(g1, pr._grow_uniform(n, l, after, k, t=3))  # seeded
    assert not torch.equal(g1, pr._grow_uniform(n, l, after, k, t=4))  # a new draw per step
    counts = torch.zeros(96)
    draws = 60
    for t in range(draws):
        counts += pr._grow_uniform(n, l, after, k, t=100 + t).sum(1).float()
    free_rows = (~after).sum(1).float()
    expected = free_rows / free_rows.sum() * k * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 96 + 6 * math.sqrt(2 * 96), chi2  # 95 degrees of freedom: mean 95, sd ~13.8

    # through a real update: densities kept, grown positions start at zero
    pr2 = P.SET(nn.Sequential(nn.Linear(256, 96)), sparsity=0.8, distribution="uniform", update_every=1, seed=1)
    pr2.prune()
    before = pr2.masks()
    pr2.step()
    (n2, l2), = pr2.layers
    u = pr2.last_update[n2]
    assert int(u["grown"].sum()) == int(u["dropped"].sum()) > 0
    assert int(l2.mask.sum()) == int(before[n2].sum())
    assert bool((l2.dense_weight()[u["grown"] & ~before[n2]] == 0).all())
