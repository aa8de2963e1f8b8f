"""FreezeNet, EdgePopup, SR-STE and RobustTicket."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import masks as M
from sparsefast import pruning as P
from sparsefast.pruning.base import mix_seed
from sparsefast.pruning.freeze import init_weight
from _util import data, mlp


def regen(cls_name: str, seed: int, name: str, shape, mode: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, cls_name, "w0", name))
    return init_weight(tuple(shape), mode, g)


# ---- FreezeNet ----------------------------------------------------------------------------------------
def test_freezenet_weights_regenerable_from_seed():
    a = P.FreezeNet(mlp(0), sparsity=0.8, seed=3)
    b = P.FreezeNet(mlp(1), sparsity=0.8, seed=3)  # another init: replaced by the seeded one
    c = P.FreezeNet(mlp(0), sparsity=0.8, seed=4)
    for (n, la), (_, lb), (_, lc) in zip(a.layers, b.layers, c.layers):
        assert torch.equal(la.dense_weight(), lb.dense_weight())
        assert not torch.equal(la.dense_weight(), lc.dense_weight())
        assert torch.equal(la.dense_weight(), regen("FreezeNet", 3, n, la.weight_shape, "kaiming_uniform"))
    assert "frozen" not in str(a.state_dict().keys())


def test_freezenet_trains_snip_selected_weights_and_keeps_the_rest_frozen():
    model = mlp()
    pr = P.FreezeNet(model, sparsity=0.75, seed=0)
    w0 = {n: l.dense_weight().clone() for n, l in pr.layers}
    x, y = data(1)[0]
    # SNIP on the dense (re-initialised) network picks the trainable set
    ref = sparsefast.densify(copy.deepcopy(model))
    F.cross_entropy(ref(x), y).backward()
    scores = [(m.weight.grad * m.weight).abs() for m in ref if isinstance(m, nn.Linear)]
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = int(round(0.25 * flat.numel()))
    thr = torch.sort(flat, descending=True, stable=True).values[k - 1]
    pr.prune(batch=(x, y))
    for (n, l), s in zip(pr.layers, scores):
        assert bool((s[l.mask] >= thr).all())
    assert pr.sparsity() == pytest.approx(0.75, abs=1e-3)
    # forward = dense layer with trained W⊙M plus frozen W(0)⊙¬M
    with torch.no_grad():
        out = model(x)
        h = x
        for m in model:
            if isinstance(m, sparsefast.SparseLinear):
                h = F.linear(h, w0[[n for n, l in pr.layers if l is m][0]], m.bias)
            else:
                h = m(h)
        torch.testing.assert_close(out, h)
    # reference training: dense weights whose gradient is masked to the trainable set
    masks = pr.masks()
    dense = copy.deepcopy(ref)
    with torch.no_grad():
        for m, (n, _) in zip([m for m in dense if isinstance(m, nn.Linear)], pr.layers):
            m.weight.copy_(w0[n])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_ref = torch.optim.SGD(dense.parameters(), lr=0.1)
    for xb, yb in data(3, seed=2):
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        F.cross_entropy(dense(xb), yb).backward()
        for m, (n, _) in zip([m for m in dense if isinstance(m, nn.Linear)], pr.layers):
            m.weight.grad.mul_(masks[n])
        opt_ref.step()
        opt_ref.zero_grad()
    for m, (n, l) in zip([m for m in dense if isinstance(m, nn.Linear)], pr.layers):
        torch.testing.assert_close(pr.effective_weight(n), m.weight.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(pr.frozen_weight(n), w0[n] * ~l.mask)  # frozen part untouched
        assert not torch.equal(l.dense_weight()[l.mask], w0[n][l.mask])  # trainable part trained
    # reload into a fresh model: frozen weights regenerated from the seed
    m2 = mlp(5)
    p2 = P.FreezeNet(m2, sparsity=0.75, seed=0)
    m2.load_state_dict(model.state_dict())
    p2.load_state_dict(pr.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2(x), model(x))


def test_freezenet_nm_trainable_set_and_decay():
    model = mlp()
    pr = P.FreezeNet(model, pattern="2:4", frozen_decay=0.1)
    pr.prune(batch=data(1)[0])
    assert all(l.pattern == "2:4" for _, l in pr.layers)
    f0 = pr.frozen_weight("0").clone()
    pr.step()
    torch.testing.assert_close(pr.frozen_weight("0"), f0 * 0.9)
    pr.remove()
    x = data(1)[0][0]
    with torch.no_grad():
        assert torch.equal(model[0](x), F.linear(x, model[0].dense_weight(), model[0].bias))


# ---- EdgePopup ----------------------------------------------------------------------------------------
def test_edgepopup_topk_scores_frozen_weights_and_straight_through_gradient():
    model = mlp()
    pr = P.EdgePopup(model, sparsity=0.6, seed=0)
    for n, l in pr.layers:
        assert not l.weight.requires_grad and not l.bias.requires_grad
        assert l.popup_scores.requires_grad and l.popup_scores.shape == l.weight_shape
    assert len(pr.parameters()) == 3
    w0 = {n: regen("EdgePopup", 0, n, l.weight_shape, "signed_constant") for n, l in pr.layers}
    pr.prune()
    for n, l in pr.layers:
        assert torch.equal(l.mask, M.topk_mask(l.popup_scores.detach(), 0.4))
        assert torch.equal(l.dense_weight(), w0[n] * l.mask)
    x, y = data(1)[0]
    ref = sparsefast.densify(copy.deepcopy(model))
    for p in ref.parameters():
        p.requires_grad_(True)
    F.cross_entropy(ref(x), y).backward()
    G = [m.weight.grad for m in ref if isinstance(m, nn.Linear)]
    F.cross_entropy(model(x), y).backward()
    for (n, l), g in zip(pr.layers, G):
        expect = torch.sign(l.popup_scores.detach()) * g * w0[n]
        torch.testing.assert_close(l.popup_scores.grad, expect, rtol=1e-4, atol=1e-6)
        assert l.weight.grad is None
    opt = torch.optim.SGD(pr.parameters(), lr=5.0)
    opt.step()
    pr.step()
    for n, l in pr.layers:
        assert torch.equal(l.mask, M.topk_mask(l.popup_scores.detach(), 0.4))
        assert torch.equal(l.dense_weight(), w0[n] * l.mask)  # returning edges come back at W(0)
    assert "0.popup_scores" in model.state_dict()  # the scores are saved with the model


def test_edgepopup_learns_something_and_nm():
    model = mlp()
    pr = P.EdgePopup(model, sparsity=0.5)
    pr.prune()
    opt = torch.optim.SGD(pr.parameters(), lr=0.5, momentum=0.9)
    x, y = data(1)[0]
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    m2 = mlp()
    p2 = P.EdgePopup(m2, pattern="2:4", train_bias=True)
    p2.prune()
    assert m2[0].bias.requires_grad
    assert all(M.is_nm(M.reduction_view(l.mask), 2, 4) for _, l in p2.layers)


# ---- SR-STE -------------------------------------------------------------------------------------------
def test_srste_keeps_nm_and_refines_pruned_weights():
    model = mlp()
    lr, lam = 0.5, 0.01
    pr = P.SRSTE(model, lr=lr, decay=lam, momentum=0.0)
    dense = {n: l.dense_weight().clone() for n, l in pr.layers}
    pr.prune()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    changed = False
    for x, y in data(4):
        for n, l in pr.layers:
            assert l.pattern == "2:4" and torch.equal(l.mask, M.nm_mask(dense[n], 2, 4))
        ref = sparsefast.densify(copy.deepcopy(model))
        F.cross_entropy(ref(x), y).backward()
        G = {n: m.weight.grad for (n, _), m in zip(pr.layers, [m for m in ref if isinstance(m, nn.Linear)])}
        before = pr.masks()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        for n, l in pr.layers:
            m = before[n]
            # W ← W − η (G + λ (1 − M) ⊙ W): the kept part by your optimizer, the pruned part by SR-STE
            dense[n] = dense[n] - lr * (G[n] + lam * (~m) * dense[n])
            torch.testing.assert_close(pr.dense_weights()[n], dense[n], rtol=1e-4, atol=1e-5)
            assert torch.equal(l.mask, M.nm_mask(dense[n], 2, 4))
            torch.testing.assert_close(l.dense_weight(), dense[n] * l.mask, rtol=1e-4, atol=1e-5)
            changed |= not torch.equal(m, l.mask)
    assert changed, "with a large LR some pruned weights should come back"


def test_srste_constructs_with_defaults_and_finds_the_optimizer():
    # like every other pruner: no lr= / optimizer= needed
    for kw in ({}, {"pattern": "2:4"}):
        model = mlp()
        pr = P.SRSTE(model, **kw)
        assert pr.pattern.is_nm and "SRSTE(" in repr(pr)
    pr.prune()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.0)
    assert pr._group_of(model[0].weight) is None  # not stepped yet
    x, y = data(1)[0]
    dense = pr.dense_weights()
    G = dense_grads_of(model, pr, x, y)
    before = pr.masks()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    pr.step()
    assert pr._group_of(model[0].weight)["lr"] == 0.2  # the optimizer that steps the weight
    for n, l in pr.layers:  # the pruned part moved with that optimizer's lr
        m = before[n]
        expect = torch.where(m, dense[n] - 0.2 * G[n], dense[n] - 0.2 * (G[n] + 2e-4 * dense[n]))
        torch.testing.assert_close(pr.dense_weights()[n], expect, rtol=1e-4, atol=1e-6)
    # without any optimizer stepping the weights: one warning, the pruned part stays
    m3 = mlp()
    p3 = P.SRSTE(m3)
    p3.prune()
    F.cross_entropy(m3(x), y).backward()
    d3 = p3.dense_weights()
    with pytest.warns(sparsefast.SparsefastWarning, match="lr="):
        p3.step()
    for n, l in p3.layers:
        assert torch.equal(p3.dense_weights()[n][~l.mask], d3[n][~l.mask])


def test_srste_bad_args_leave_no_broken_object():
    with pytest.raises(ValueError):
        P.SRSTE(mlp(), pattern="3:3")
    with pytest.raises(ValueError):
        P.SRSTE(mlp(), decay=-1.0)
    with pytest.raises(TypeError):
        P.SRSTE(mlp(), optimizer="sgd")
    # a pruner whose construction failed part-way still has a repr (tracebacks, debuggers show it)
    half = P.SRSTE.__new__(P.SRSTE)
    half.decay = 2e-4
    assert "SRSTE" in repr(half)


def dense_grads_of(model, pr, x, y):
    ref = sparsefast.densify(copy.deepcopy(model))
    F.cross_entropy(ref(x), y).backward()
    return {n: m.weight.grad for (n, _), m in zip(pr.layers, [m for m in ref if isinstance(m, nn.Linear)])}


def test_srste_lr_from_optimizer_and_args():
    model = sparsefast.sparsify(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    pr = P.SRSTE(model, optimizer=opt)
    assert pr._group_of(model[0].weight)["lr"] == 0.3
    pr.prune()
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    pr.step()
    assert all(l.pattern == "2:4" for _, l in pr.layers)
    m2 = mlp()
    p2 = P.SRSTE(m2, lr=0.1, pattern="unstructured", sparsity=0.7)
    p2.prune()
    assert p2.sparsity() == pytest.approx(0.7, abs=0.01)


# ---- RobustTicket -------------------------------------------------------------------------------------
def test_pgd_adversarial_batch():
    model = mlp()
    pr = P.RobustTicket(model, sparsity=0.5, eps=0.1, alpha=0.05, pgd_steps=5, seed=0)
    x, y = data(1)[0]
    xa = pr.adversarial_batch(x, y)
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        assert float(F.cross_entropy(model(xa), y)) > float(F.cross_entropy(model(x), y))
    assert all(p.grad is None for p in model.parameters())
    pr2 = P.RobustTicket(mlp(), sparsity=0.5, eps=0.1, alpha=0.05, pgd_steps=5, seed=0)
    assert torch.equal(pr2.adversarial_batch(x, y), xa)  # seeded random start
    pr3 = P.RobustTicket(mlp(), sparsity=0.5, eps=0.1, alpha=0.05, pgd_steps=2, clamp=(0.0, 1.0))
    xc = pr3.adversarial_batch(x.clamp(0, 1), y)
    assert float(xc.min()) >= 0 and float(xc.max()) <= 1


def test_robust_omp_and_imp_and_finetune():
    model = mlp()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    pr = P.RobustTicket(model, sparsity=0.8, method="omp")
    assert pr.rounds == 1
    pr.prune()
    assert pr.sparsity() == pytest.approx(0.8, abs=2e-3) and pr.done
    a = torch.cat([v.abs().reshape(-1) for k, v in pre.items() if k.endswith("weight")])
    thr = torch.sort(a, descending=True).values[int(round(0.2 * a.numel())) - 1]
    for n, l in pr.layers:
        assert bool((pre[f"{n}.weight"].abs()[l.mask] >= thr).all())
        assert torch.equal(l.dense_weight()[l.mask], pre[f"{n}.weight"][l.mask])
    params = pr.finetune("linear")
    assert {id(p) for p in params} == {id(model[4].weight), id(model[4].bias)}
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert len(pr.finetune("full")) == len(list(model.parameters()))
    with pytest.raises(ValueError):
        pr.finetune("partial")

    model = mlp()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    pr = P.RobustTicket(model, sparsity=0.75, method="imp", rate=0.5, eps=0.05, alpha=0.02, pgd_steps=2)
    assert pr.rounds == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_fn(m, r):
        for x, y in data(2, seed=r):
            F.cross_entropy(m(pr.adversarial_batch(x, y)), y).backward()
            opt.step()
            pr.step()
            opt.zero_grad()

    pr.run(train_fn, final_train=False)
    assert pr.sparsity() == pytest.approx(0.75, abs=2e-3)
    for n, l in pr.layers:  # rewound to the pre-trained weights
        assert torch.equal(l.dense_weight()[l.mask], pre[f"{n}.weight"][l.mask])
    with pytest.raises(ValueError, match="method"):
        P.RobustTicket(mlp(), sparsity=0.5, method="lmp")


class _SRSTERef(torch.autograd.Function):
    """Dense reference of SR-STE's straight-through step (the authors' Sparse function, 2:4 along rows)."""

    @staticmethod
    def forward(ctx, w, decay):
        g = w.detach().abs().reshape(-1, 4)
        idx = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :2]
        m = torch.zeros_like(g).scatter_(1, idx, 1.0).reshape(w.shape)
        ctx.save_for_backward(w, m)
        ctx.decay = decay
        return w * m

    @staticmethod
    def backward(ctx, go):
        w, m = ctx.saved_tensors
        return go + ctx.decay * (1 - m) * w, None


@pytest.mark.parametrize("sgd", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                 dict(momentum=0.5, dampening=0.3, weight_decay=5e-4)])
def test_srste_follows_sgd_nesterov_and_dampening(sgd):
    """One dense momentum over W with torch.optim.SGD's rule (nesterov, dampening) on both sides."""
    ref = mlp()
    model = copy.deepcopy(ref)
    pr = P.SRSTE(model)
    pr.prune()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, **sgd)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.3, **sgd)
    lins = [m for m in ref if isinstance(m, nn.Linear)]
    for x, y in data(6):
        h = x
        for i, m in enumerate(lins):
            h = F.linear(h, _SRSTERef.apply(m.weight, 2e-4), m.bias)
            h = F.relu(h) if i < len(lins) - 1 else h
        F.cross_entropy(h, y).backward()
        ropt.step()
        ropt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        dense = pr.dense_weights()
        for (n, l), m in zip(pr.layers, lins):
            torch.testing.assert_close(dense[n], m.weight.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(l.mask, M.nm_mask(m.weight.detach(), 2, 4))


def test_srste_with_adam_updates_the_pruned_part_by_sgd():
    model = mlp()
    pr = P.SRSTE(model)
    pr.prune()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data(1)[0]
    d0 = pr.dense_weights()
    G = dense_grads_of(model, pr, x, y)
    before = pr.masks()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    pr.step()
    for n, l in pr.layers:
        m = before[n]
        torch.testing.assert_close(pr.dense_weights()[n][~m], (d0[n] - 0.01 * (G[n] + 2e-4 * d0[n]))[~m])
