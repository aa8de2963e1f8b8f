"""Layer-wise density rules: the formulas numerically, the budget, bad input, flow repair, schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsefast
from sparsefast.pruning import layer_densities
from sparsefast.pruning.distributions import DISTRIBUTIONS, LayerInfo, compute_densities, flow_repair
from sparsefast.pruning.schedules import CosineDecay, CubicSparsity, ExponentialDensity, UpdateEvery


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def sizes(model):
    return {n: m.weight.numel() for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def budget(d, n):
    return sum(d[k] * n[k] for k in n) / sum(n.values())


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95])
def test_every_distribution_keeps_the_budget(dist, sparsity):
    model = cnn()
    n = sizes(model)
    d = layer_densities(model, sparsity, dist)
    assert set(d) == set(n)
    lo = 0.0 if dist == "global" else 1e-12  # a global threshold may empty a layer (layer collapse)
    assert all(lo <= v <= 1.0 for v in d.values())
    assert budget(d, n) == pytest.approx(1 - sparsity, abs=2e-3)


def test_erk_formula_numerically():
    model = cnn()
    d = layer_densities(model, 0.9, "erk")
    raw = {"0": (16 + 3 + 3 + 3) / (16 * 3 * 3 * 3), "2": (32 + 16 + 3 + 3) / (32 * 16 * 3 * 3),
           "5": (128 + 64) / (128 * 64), "7": (64 + 10) / (64 * 10)}
    n = sizes(model)
    dense = {k for k in raw if d[k] == 1.0}
    eps = (0.1 * sum(n.values()) - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in raw if k not in dense)
    for k in raw:
        expect = 1.0 if k in dense else eps * raw[k]
        assert d[k] == pytest.approx(expect, rel=1e-9)
    # where eps*raw would exceed 1, the layer is dense and eps re-solved
    assert all(eps * raw[k] >= 1.0 for k in dense)
    assert all(eps * raw[k] < 1.0 for k in raw if k not in dense)


def test_er_uses_channel_dims_only_for_conv():
    model = cnn()
    d = layer_densities(model, 0.95, "er")
    r0, r2 = (16 + 3) / (16 * 3), (32 + 16) / (32 * 16)
    assert d["0"] / d["2"] == pytest.approx(r0 / r2) or d["0"] == 1.0


def test_erk_plus_last_linear_dense_and_uniform_plus():
    model = cnn()
    n = sizes(model)
    d = layer_densities(model, 0.9, "erk+")
    assert d["7"] == 1.0 and budget(d, n) == pytest.approx(0.1, abs=1e-6)
    u = layer_densities(model, 0.9, "uniform+")  # D = 0.1 < 0.2: last FC 0.2, first conv dense
    assert u["0"] == 1.0 and u["7"] == pytest.approx(0.2)
    assert u["2"] == pytest.approx(u["5"]) and budget(u, n) == pytest.approx(0.1, abs=1e-6)
    u2 = layer_densities(model, 0.5, "uniform+")
    assert u2["7"] == pytest.approx(u2["2"])  # D >= 0.2: the last layer is not special


def test_uniform():
    d = layer_densities(cnn(), 0.7, "uniform")
    assert all(v == pytest.approx(0.3) for v in d.values())


def test_balanced_equal_nonzeros():
    infos = [LayerInfo("a", (100, 100), "linear"), LayerInfo("b", (50, 100), "linear"),
             LayerInfo("c", (20, 50), "linear")]
    d = compute_densities(infos, 0.9, "balanced")
    nnz = {i.name: d[i.name] * i.numel for i in infos}
    total = sum(i.numel for i in infos)
    assert sum(nnz.values()) == pytest.approx(0.1 * total)
    # paper formula x = D N / L when nothing saturates
    x = 0.1 * total / 3
    assert all(v == pytest.approx(x) for v in nnz.values())
    # with saturation (x >= n_l) the layer is dense and the others still share equally
    d2 = compute_densities(infos, 0.5, "balanced")
    assert d2["c"] == 1.0
    assert d2["a"] * 10000 == pytest.approx(d2["b"] * 5000)
    assert sum(d2[i.name] * i.numel for i in infos) == pytest.approx(0.5 * total)


def test_pyramidal_solves_the_budget():
    model = cnn()
    n = sizes(model)
    for s in (0.5, 0.9, 0.99):
        d = layer_densities(model, s, "pyramidal")
        names = list(n)
        p1 = d[names[0]]
        for l, k in enumerate(names):
            assert d[k] == pytest.approx(p1 ** (l + 1), rel=1e-9)
        assert sum(p1 ** (l + 1) * n[k] for l, k in enumerate(names)) == pytest.approx((1 - s) * sum(n.values()),
                                                                                        rel=1e-9)
        assert 0 < p1 < 1


def test_global_uses_magnitudes():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(0.01)
    d = layer_densities(model, 0.5, "global")
    # one threshold: the large weights win, except that every layer keeps at least one weight (its
    # largest; the budget stays exact)
    assert d == {"0": 0.99, "1": 0.01}
    with torch.no_grad():
        model[1].weight[3, 4] = 0.02
    d = layer_densities(model, 0.6, "global")
    assert d == {"0": 0.79, "1": 0.01}
    assert layer_densities(model, 0.3, "global") == {"0": 1.0, "1": 0.4}  # no layer empty: plain top-k
    assert layer_densities(model, 0.0, "global") == {"0": 1.0, "1": 1.0}


def test_layer_densities_on_sparse_layers_and_filter():
    model = sparsefast.sparsify(cnn(), sparsity=0.5)
    d = layer_densities(model, 0.8, "erk", filter_fn=lambda n, m: n != "7")
    assert set(d) == {"0", "2", "5"}


def test_bad_input():
    model = cnn()
    with pytest.raises(ValueError, match="unknown distribution"):
        layer_densities(model, 0.5, "gaussian")
    with pytest.raises(TypeError):
        layer_densities(model, 0.5, 3)
    for s in (1.0, -0.1, 2, float("nan")):
        with pytest.raises(ValueError):
            layer_densities(model, s, "erk")
    with pytest.raises(TypeError):
        layer_densities(model, "0.5", "erk")
    with pytest.raises(ValueError, match="no prunable layers"):
        layer_densities(nn.Sequential(nn.ReLU()), 0.5, "erk")
    with pytest.raises(TypeError):
        layer_densities("model", 0.5)
    for dist in ("uniform+", "erk+"):  # the dense / 0.2 layers alone exceed 3% of this model
        with pytest.raises(ValueError, match="cannot be met"):
            layer_densities(model, 0.97, dist)
    big_last = [LayerInfo("a", (4, 4), "linear"), LayerInfo("b", (100, 100), "linear")]
    with pytest.raises(ValueError, match="cannot be met"):
        compute_densities(big_last, 0.5, "erk+")


def test_flow_repair_reconnects_cut_neurons():
    g = torch.Generator().manual_seed(0)
    m1 = torch.zeros(6, 5, dtype=torch.bool)
    m1[0, 0] = True             # rows 1..5 have no incoming edge
    m2 = torch.zeros(3, 6, dtype=torch.bool)
    m2[:, 0] = True             # inputs 1..5 of layer 2 have no outgoing edge
    conv = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    out = flow_repair({"a": m1, "b": m2, "c": conv}, g)
    assert bool(out["a"].any(dim=1).all())
    assert bool(out["b"].any(dim=0).all()) and bool(out["b"].any(dim=1).all())
    assert bool(out["c"].reshape(4, -1).any(dim=1).all()) and bool(out["c"].any(dim=(0, 2, 3)).all())
    assert bool((out["a"] | ~m1).all()) and int(out["a"].sum()) == 1 + 5  # only additions, one per neuron
    again = flow_repair({"a": m1, "b": m2, "c": conv}, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_random_with_flow_repair_has_no_dead_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    pr = sparsefast.pruning.Random(model, sparsity=0.99, distribution="uniform", flow_repair=True)
    pr.prune()
    for n, l in pr.layers:
        assert bool(l.mask.any(dim=1).all())
    assert bool(model[2].mask.any(dim=0).all()) and bool(model[4].mask.any(dim=0).all())


def test_schedules():
    c = CubicSparsity(0.0, 0.9, 10, 110, 10)
    assert c(0) == 0.0 and c(10) == 0.0 and c(110) == 0.9 and c(500) == 0.9
    assert c(60) == pytest.approx(0.9 + (0 - 0.9) * 0.5 ** 3)
    assert c.is_update(10) and c.is_update(20) and not c.is_update(25) and c.is_update(110) and not c.is_update(120)
    u = UpdateEvery(100, 0, 750)
    assert [t for t in range(0, 1000) if u.is_update(t)] == [100, 200, 300, 400, 500, 600, 700]
    cd = CosineDecay(0.3, 1000)
    assert cd(0) == pytest.approx(0.3) and cd(500) == pytest.approx(0.15) and cd(1000) == pytest.approx(0.0)
    e = ExponentialDensity(0.01, 100)
    assert e(0) == 1.0 and e(100) == pytest.approx(0.01) and e(50) == pytest.approx(0.1)
    c2 = CubicSparsity(0.1, 0.5, 0, 10, 1)
    c2.load_state_dict(c.state_dict())
    assert c2 == c
    with pytest.raises(ValueError):
        CubicSparsity(0.0, 0.9, 10, 5, 1)
    with pytest.raises(ValueError):
        UpdateEvery(0)
    with pytest.raises(ValueError):
        CubicSparsity(0.5, 0.2, 0, 10, 1)
    with pytest.raises(ValueError):
        c.load_state_dict(u.state_dict())
    assert math.isclose(CosineDecay(0.3, None)(12345), 0.3)
