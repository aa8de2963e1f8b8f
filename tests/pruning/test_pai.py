"""SNIP, GraSP, SynFlow against plain-torch computations of their scores."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefast import masks as M
from sparsefast import pruning as P
from _util import mlp


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 3))


def batch(shape=(32, 12), classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


def weights(model):
    return [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]


def global_keep(scores, density):
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = int(round(density * flat.numel()))
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, off = [], 0
    for s in scores:
        out.append(kept[off:off + s.numel()].reshape(s.shape))
        off += s.numel()
    return out


@pytest.mark.parametrize("make,shape,classes", [(mlp, (32, 12), 4), (cnn, (8, 4, 6, 6), 3)])
def test_snip_scores_are_abs_grad_times_weight(make, shape, classes):
    model = make()
    ref = copy.deepcopy(model)
    x, y = batch(shape, classes)
    F.cross_entropy(ref(x), y).backward()
    scores = [(m.weight.grad * m.weight).abs().detach() for m in weights(ref)]
    expect = global_keep(scores, 0.3)
    pr = P.SNIP(model, sparsity=0.7)
    pr.prune(batch=(x, y))
    for (n, l), e in zip(pr.layers, expect):
        assert torch.equal(l.mask, e), n
    # .grad untouched, weights of survivors unchanged
    assert all(l.weight.grad is None for _, l in pr.layers)
    for (n, l), m in zip(pr.layers, weights(ref)):
        assert torch.equal(l.dense_weight()[l.mask], m.weight.detach()[l.mask])


def test_snip_loader_and_custom_loss_and_nm():
    model = mlp()
    ref = copy.deepcopy(model)
    b1, b2 = batch(seed=1), batch(seed=2)

    def loss_fn(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    for x, y in (b1, b2):
        loss_fn(ref(x), y).backward()
    scores = [(m.weight.grad * m.weight).abs().detach() for m in weights(ref)]
    pr = P.SNIP(model, pattern="2:4", batches=2)
    pr.prune(batch=[b1, b2, batch(seed=3)], loss_fn=loss_fn)  # only the first 2 are used
    for (n, l), s in zip(pr.layers, scores):
        assert torch.equal(l.mask, M.nm_mask(s, 2, 4)), n


def test_grasp_removes_highest_score_hessian_gradient_product():
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = batch()
    T = 200.0
    ws = [m.weight for m in weights(ref)]
    g = torch.autograd.grad(F.cross_entropy(ref(x) / T, y), ws)
    gr = torch.autograd.grad(F.cross_entropy(ref(x) / T, y), ws, create_graph=True)
    z = sum((a * b.detach()).sum() for a, b in zip(gr, g))
    hg = torch.autograd.grad(z, ws)
    S = [(-w * h).detach() for w, h in zip(ws, hg)]  # GraSP score
    # keep the lowest S = remove the highest
    expect = global_keep([-s for s in S], 0.4)
    pr = P.GraSP(model, sparsity=0.6)
    pr.prune(batch=(x, y))
    agree = sum(int((l.mask == e).sum()) for (_, l), e in zip(pr.layers, expect))
    total = sum(e.numel() for e in expect)
    assert agree / total > 0.995  # float noise of a second derivative may swap a near-tie
    kept_S = torch.cat([s[l.mask] for (_, l), s in zip(pr.layers, S)])
    dropped_S = torch.cat([s[~l.mask] for (_, l), s in zip(pr.layers, S)])
    assert float(kept_S.mean()) < float(dropped_S.mean())
    assert pr.sparsity() == pytest.approx(0.6, abs=1e-3)


def test_grasp_on_conv():
    model = cnn()
    pr = P.GraSP(model, sparsity=0.5, temperature=100)
    pr.prune(batch=batch((8, 4, 6, 6), 3))
    assert pr.sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("zero_bias", [True, False])
def test_synflow_is_data_free_and_matches_one_round(zero_bias):
    model = mlp()
    ref = copy.deepcopy(model)
    for n, p in ref.named_parameters():
        p.data.abs_()
        if zero_bias and n.endswith("bias"):
            p.data.zero_()
    ws = [m.weight for m in weights(ref)]
    R = ref(torch.ones(1, 12)).sum()
    g = torch.autograd.grad(R, ws)
    scores = [(a * w).abs().detach() for a, w in zip(g, ws)]
    expect = global_keep(scores, 0.5)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    pr = P.SynFlow(model, sparsity=0.5, iterations=1, input_shape=(12,), zero_bias=zero_bias)
    pr.prune()  # no data at all
    for (n, l), e in zip(pr.layers, expect):
        assert torch.equal(l.mask, e)
        # signed values restored for the survivors
        assert torch.equal(l.dense_weight()[l.mask], orig[f"{n}.weight"][l.mask])
    assert torch.equal(model[0].bias.detach(), orig["0.bias"])


def test_synflow_avoids_layer_collapse_where_magnitude_collapses():
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
        with torch.no_grad():
            m[2].weight.mul_(0.01)  # a wide layer of small weights
        return m

    s = 0.985
    mag = P.Magnitude(make(), sparsity=s)
    mag.prune()
    # global magnitude collapses the middle layer to the single weight every layer is guaranteed
    assert int(mag.layers[1][1].mask.sum()) == 1

    model = make()
    pr = P.SynFlow(model, sparsity=s, iterations=30, input_shape=(32,), progress=False)
    pr.prune()
    assert pr.sparsity() == pytest.approx(s, abs=1e-3)
    assert all(int(l.mask.sum()) > 1 for _, l in pr.layers)  # more than the guaranteed minimum
    # an input-to-output path exists: the linearised network has positive synaptic flow
    lin = copy.deepcopy(model)
    with torch.no_grad():
        for p in lin.parameters():
            p.abs_()
        for m in lin:
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.zero_()
        assert float(lin(torch.ones(1, 32)).sum()) > 0


def test_synflow_batch_gives_shape_and_nm():
    model = cnn()
    pr = P.SynFlow(model, pattern="2:4", iterations=100)
    pr.prune(batch=batch((2, 4, 6, 6), 3))
    for _, l in pr.layers:
        assert l.pattern == "2:4" and M.is_nm(M.reduction_view(l.mask), 2, 4)


def test_synflow_restores_mode_and_bad_args():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    rm = model[1].running_mean.clone()
    pr = P.SynFlow(model, sparsity=0.5, iterations=3, input_shape=(8,))
    pr.prune()
    assert model.training and torch.equal(model[1].running_mean, rm)
    with pytest.raises(ValueError):
        P.SynFlow(nn.Sequential(nn.Linear(8, 2)), sparsity=0.5, input_shape=(0,))
    with pytest.raises(ValueError):
        P.SynFlow(nn.Sequential(nn.Linear(8, 2)), sparsity=0.5, iterations=0)
