"""sparsefast.nn.swap: sparsify / densify — optimizer continuity, shared modules, tied weights."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast.backends import SparsefastWarning
from sparsefast.nn import SparseConv2d, SparseLinear, densify, sparse_layers, sparsify


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _loss(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 8, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    return F.cross_entropy(m(x), y)


def test_optimizer_built_before_sparsify_keeps_training():
    m = _mlp()
    params_before = list(m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sparsify(m, sparsity=0.5)
    assert isinstance(m[0], SparseLinear) and isinstance(m[2], SparseLinear)
    assert {id(p) for p in m.parameters()} == {id(p) for p in params_before}  # the same Parameter objects
    assert m[0].weight.shape == (int(m[0].mask.sum()),)
    w0 = [l.dense_weight() for _, l in sparse_layers(m)]
    b0 = m[0].bias.detach().clone()
    _loss(m).backward()
    opt.step()
    for (_, l), w in zip(sparse_layers(m), w0):
        w1 = l.dense_weight()
        assert not torch.equal(w1, w)  # trained
        assert bool((w1[~l.mask] == 0).all())  # pruned positions stay zero
    assert not torch.equal(m[0].bias, b0)


def test_adamw_state_and_grad_from_dense_training_carry_over():
    m = _mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    _loss(m).backward()
    opt.step()  # dense-shaped exp_avg / exp_avg_sq now exist
    _loss(m, seed=2).backward()  # and a dense-shaped grad
    dense_grad = m[0].weight.grad.clone()
    exp_avg = opt.state[m[0].weight]["exp_avg"].clone()
    sparsify(m, sparsity=0.75)
    lay = m[0]
    nnz = int(lay.mask.sum())
    assert lay.weight.grad.shape == (nnz,)
    assert torch.equal(lay.dense_grad(), dense_grad * lay.mask)
    assert opt.state[lay.weight]["exp_avg"].shape == (nnz,)
    assert torch.equal(lay.weight.grad, dense_grad[lay.mask]) and torch.equal(
        opt.state[lay.weight]["exp_avg"], exp_avg[lay.mask])  # linear canonical order: row-major
    w0 = lay.dense_weight()
    opt.step()
    opt.zero_grad()
    _loss(m).backward()
    opt.step()
    w1 = lay.dense_weight()
    assert not torch.equal(w1, w0) and bool((w1[~lay.mask] == 0).all())


def test_conv_adopts_parameters():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    p = m[0].weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sparsify(m, pattern="2:4")
    assert isinstance(m[0], SparseConv2d) and m[0].weight is p and m[0].weight_shape == (8, 4, 3, 3)
    w0 = m[0].dense_weight()
    m(torch.randn(2, 4, 5, 5)).square().sum().backward()
    opt.step()
    assert not torch.equal(m[0].dense_weight(), w0)


def test_module_used_twice_becomes_one_sparse_layer():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 8)
    sparsify(m, sparsity=0.5)
    assert isinstance(m[0], SparseLinear) and m[0] is m[2]
    assert len(sparse_layers(m)) == 1
    ref = F.linear(F.relu(F.linear(x, m[0].dense_weight(), m[0].bias)), m[0].dense_weight(), m[0].bias)
    torch.testing.assert_close(m(x), ref)
    d = densify(m)
    assert type(d[0]) is nn.Linear and d[0] is d[2]


def test_tied_weights_left_dense_with_one_warning():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, idx):
            return self.lm_head(torch.relu(self.body(self.emb(idx))))

    lm = LM()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sparsify(lm, sparsity=0.5)
    msgs = [str(w.message) for w in rec if issubclass(w.category, SparsefastWarning)]
    assert len(msgs) == 1 and "'lm_head'" in msgs[0] and "emb" in msgs[0], msgs
    assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight is lm.emb.weight
    assert lm.emb.weight.shape == (10, 8)  # the shared Parameter was not turned into kept values
    assert isinstance(lm.body, SparseLinear)
    assert lm(torch.tensor([[1, 2, 3]])).shape == (1, 3, 10)

    # opting in: the tied layer is sparsified from a copy, the embedding is left alone
    lm2 = LM()
    emb_w = lm2.emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsefastWarning)
        sparsify(lm2, sparsity=0.5, tied="untie")
    assert isinstance(lm2.lm_head, SparseLinear) and lm2.lm_head.weight is not lm2.emb.weight
    assert torch.equal(lm2.emb.weight, emb_w)
    with pytest.raises(ValueError, match="tied"):
        sparsify(LM(), sparsity=0.5, tied="bogus")


def test_weight_shared_between_two_linears_is_tied():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    m = nn.Sequential(a, nn.ReLU(), b)
    with pytest.warns(SparsefastWarning, match="'0'.*'2'|'2'.*'0'"):
        sparsify(m, sparsity=0.5)
    assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear and m[0].weight.shape == (8, 8)


def test_root_layer_and_filter():
    lin = nn.Linear(8, 4)
    p = lin.weight
    new = sparsify(lin, sparsity=0.5)
    assert isinstance(new, SparseLinear) and new.weight is p
    m = _mlp()
    sparsify(m, sparsity=0.5, filter_fn=lambda n, mod: n == "2")
    assert type(m[0]) is nn.Linear and isinstance(m[2], SparseLinear)


def test_model_load_is_all_or_nothing():
    """A later layer's bad mask, a wrong shape or (strict) missing/extra keys: a clear error and the model
    unchanged — earlier layers are not overwritten."""
    import copy as _copy
    torch.manual_seed(0)
    model = sparsefast.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4)),
                                pattern="2:4")
    before = _copy.deepcopy(model.state_dict())
    other = sparsefast.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4)),
                                pattern="2:4")
    good = other.state_dict()
    bad_mask = dict(good, **{"3.mask": torch.ones(4, 8, dtype=torch.bool)})
    bad_shape = dict(good, **{"2.bias": torch.zeros(5)})
    missing = {k: v for k, v in good.items() if k != "3.bias"}
    extra = dict(good, **{"9.weight": torch.zeros(1)})
    for sd, strict, match in ((bad_mask, True, "2:4"), (bad_mask, False, "2:4"), (bad_shape, True, "shape"),
                              (missing, True, "Missing"), (extra, True, "Unexpected")):
        with pytest.raises(RuntimeError, match=match):
            model.load_state_dict(sd, strict=strict)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (k, match)
    model.load_state_dict(missing, strict=False)   # non-strict with a missing key: loads the rest
    assert torch.equal(model[0].dense_weight(), other[0].dense_weight())
