"""Hugging Face ``Conv1D`` layers (GPT-2: weight stored ``(in, out)``, ``y = x @ W + b``) in sparsify /
densify / SparseLinear: the transposed weight, N:M groups along the input dimension, Conv1D's layout in the
state dict, densify giving back a Conv1D, and the dense gradient/optimizer state carried over transposed.
The layer is recognised without importing transformers, so a stand-in class named ``Conv1D`` is used too."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsefast
from sparsefast.nn import SparseLinear
from sparsefast.nn.layers import _is_conv1d


class Conv1D(nn.Module):
    """Stand-in with transformers.pytorch_utils.Conv1D's attributes and forward."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def _conv1d_classes():
    out = [Conv1D]
    try:
        from transformers.pytorch_utils import Conv1D as HF
        out.append(HF)
    except ImportError:
        pass
    return out


def _make(cls, nf=24, nx=16, seed=0):
    torch.manual_seed(seed)
    c = cls(nf, nx)
    with torch.no_grad():
        c.weight.normal_()
        c.bias.normal_()
    return c


class Block(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.c_fc = _make(cls, 32, 16, 1)    # (in 16, out 32)
        self.c_proj = _make(cls, 16, 32, 2)  # (in 32, out 16)
        self.sq = _make(cls, 16, 16, 3)      # square: the layout cannot be told from the shape

    def forward(self, x):
        return self.sq(self.c_proj(torch.relu(self.c_fc(x))))


@pytest.mark.parametrize("cls", _conv1d_classes())
def test_from_conv1d_forward_pattern_axis_and_layout(cls):
    c = _make(cls)
    x = torch.randn(3, 5, 16)
    layer = SparseLinear.from_dense(c, pattern="2:4", backend="reference")
    assert layer.weight_shape == (24, 16) and (layer.in_features, layer.out_features) == (16, 24)
    # N:M groups run along the input dimension: along (out, in) rows, i.e. down the rows of Conv1D's weight
    assert bool((layer.mask.reshape(24, 4, 4).sum(-1) == 2).all())
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "mask"}
    assert sd["weight"].shape == (16, 24) and sd["mask"].shape == (16, 24) and sd["weight"].is_contiguous()
    assert bool((sd["mask"].reshape(4, 4, 24).sum(1) == 2).all())
    # the kept weights are the largest |w| of each group of 4 consecutive inputs (rows of c.weight)
    wg = c.weight.detach().abs().reshape(4, 4, 24)
    top2 = wg.topk(2, dim=1).indices
    assert torch.equal(torch.zeros_like(wg, dtype=torch.bool).scatter_(1, top2, True).reshape(16, 24), sd["mask"])
    torch.testing.assert_close(sd["weight"], c.weight.detach() * sd["mask"])
    dense = layer.to_dense()
    assert type(dense) is cls and dense.weight.shape == (16, 24) and dense.nf == 24 and dense.nx == 16
    torch.testing.assert_close(dense(x), layer(x))
    torch.testing.assert_close(dense.weight, sd["weight"])
    assert "layout=Conv1D" in repr(layer)
    # an unpruned one computes what the Conv1D did
    full = SparseLinear.from_dense(c, sparsity=0.0, backend="reference")
    torch.testing.assert_close(full(x), c(x))


@pytest.mark.parametrize("cls", _conv1d_classes())
def test_state_dict_round_trip_and_wrong_layout_refused(cls):
    c = _make(cls, 24, 16)
    layer = SparseLinear.from_dense(c, pattern="2:4", backend="reference")
    other = SparseLinear.from_dense(_make(cls, 24, 16, seed=5), pattern="2:4", backend="reference")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mask, layer.mask) and torch.equal(other.weight, layer.weight)
    # a plain Conv1D dict (zeros at pruned positions): the mask from its nonzeros
    plain = layer.to_dense().state_dict()
    assert set(plain) == {"weight", "bias"}
    third = SparseLinear.from_dense(_make(cls, 24, 16, seed=6), pattern="2:4", backend="reference")
    third.load_state_dict(plain)
    assert torch.equal(third.mask, layer.mask) and torch.equal(third.dense_weight(), layer.dense_weight())
    # nn.Linear's (out, in) layout is refused with a clear error, nothing changed
    before = {k: v.clone() for k, v in other.state_dict().items()}
    lin_sd = {"weight": layer.dense_weight(), "bias": layer.bias.detach(), "mask": layer.mask.clone()}
    with pytest.raises(RuntimeError, match=r"Conv1D's \(in_features, out_features\) layout.*nn.Linear's"):
        other.load_state_dict(lin_sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("cls", _conv1d_classes())
def test_sparsify_densify_model(cls):
    model = Block(cls)
    x = torch.randn(4, 16)
    dense_keys = {k: v.shape for k, v in model.state_dict().items()}
    sparsefast.sparsify(model, pattern="2:4", backend="reference")
    assert all(isinstance(getattr(model, n), SparseLinear) for n in ("c_fc", "c_proj", "sq"))
    y = model(x)
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items() if not k.endswith(".mask")} == dense_keys
    # strict load of its own dict; a fresh sparsified copy loads it too
    model.load_state_dict(sd)
    fresh = sparsefast.sparsify(Block(cls), pattern="2:4", backend="reference")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), y)
    # deepcopy / pickle keep the layout
    for cp in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)) if cls is not Conv1D else None):
        if cp is not None:
            assert cp.sq._conv1d is cls
            torch.testing.assert_close(cp(x), y)
            assert cp.state_dict()["sq.weight"].shape == (16, 16)
    dense = sparsefast.densify(model)
    assert all(type(getattr(dense, n)) is cls for n in ("c_fc", "c_proj", "sq"))
    torch.testing.assert_close(dense(x), y)
    assert {k: v.shape for k, v in dense.state_dict().items()} == dense_keys
    for n in ("c_fc", "c_proj", "sq"):
        torch.testing.assert_close(dense.state_dict()[f"{n}.weight"], sd[f"{n}.weight"])


def test_dense_grad_and_optimizer_state_carry_over_transposed():
    model = Block(Conv1D)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    opt.step()
    g = model.sq.weight.grad.clone()                   # (in, out), square
    m1 = opt.state[model.sq.weight]["exp_avg"].clone()
    sparsefast.sparsify(model, sparsity=0.5, backend="reference")
    layer = model.sq
    assert layer.weight is opt.param_groups[0]["params"][4]  # the adopted Parameter
    torch.testing.assert_close(layer.dense_grad(), g.t() * layer.mask)
    from sparsefast.formats import kept
    torch.testing.assert_close(opt.state[layer.weight]["exp_avg"], kept.gather(m1.t(), layer.mask))
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()  # keeps training the kept values


def test_lookalikes_are_left_alone():
    class NotConv1D(nn.Module):  # no nf attribute
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

    Fake = type("Conv1D", (NotConv1D,), {})
    assert not _is_conv1d(NotConv1D()) and not _is_conv1d(Fake()) and _is_conv1d(Conv1D(8, 4))
    model = nn.Sequential(Fake(), nn.Linear(8, 8))
    sparsefast.sparsify(model, sparsity=0.5, backend="reference")
    assert type(model[0]) is Fake and isinstance(model[1], SparseLinear)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(Fake())
