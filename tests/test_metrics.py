"""PSP-entropy against a direct computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsefast
from sparsefast.metrics import psp_entropy


def _h(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 0.9999)
    return -p * torch.log2(p) - (1 - p) * torch.log2(1 - p)


def test_psp_entropy_matches_definition_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    sparsefast.sparsify(model, sparsity=0.5)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(40, 2, 4, 4, generator=g)
    ys = torch.randint(0, 3, (40,), generator=g)
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 40, 16)]
    model.train()
    out = psp_entropy(model, loader)
    assert model.training and set(out) == {"0", "3"}
    with torch.no_grad():
        z0 = model[0](xs)
        z3 = model(xs)
    for name, z in (("0", z0), ("3", z3)):
        expect = sum(_h((z[ys == c] > 0).double().mean(0)) for c in range(3)).float()
        assert out[name].shape == z.shape[1:]
        torch.testing.assert_close(out[name], expect)
    m = psp_entropy(model, loader, reduction="mean", layers=["3"])
    assert set(m) == {"3"} and m["3"].dim() == 0
    torch.testing.assert_close(m["3"], out["3"].mean())


def test_psp_entropy_extremes_and_errors():
    lin = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [0.0]]))
    model = nn.Sequential(lin)
    # class 0: x < 0, class 1: x > 0 -> neuron 0 is perfectly class-specific; neuron 1 never fires
    x = torch.tensor([[-1.0], [-2.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    h = psp_entropy(model, [(x, y)])["0"]
    floor = 2 * float(_h(torch.tensor(1e-4)))
    assert float(h[0]) == pytest.approx(floor, rel=1e-4) and float(h[1]) == pytest.approx(floor, rel=1e-4)
    # a neuron firing half the time in every class has maximal entropy (1 bit per class)
    x2 = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])
    y2 = torch.tensor([0, 0, 1, 1])
    assert float(psp_entropy(model, [(x2, y2)])["0"][0]) == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match="no samples"):
        psp_entropy(model, [])
    with pytest.raises(ValueError, match="labels"):
        psp_entropy(model, [x])
    with pytest.raises(ValueError, match="no Linear"):
        psp_entropy(nn.Sequential(nn.ReLU()), [(x, y)])
    with pytest.raises(ValueError, match="no module"):
        psp_entropy(model, [(x, y)], layers=["nope"])
    with pytest.raises(TypeError):
        psp_entropy("m", [(x, y)])
    assert math.isfinite(float(psp_entropy(model, [(x, y)], reduction="mean")["0"]))


def test_psp_entropy_measures_transformers_conv1d_layers():
    """GPT-2's Linear-like ``Conv1D`` layers are measured, plain or after sparsify (the same values)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.ReLU(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(30, 4, generator=g)
    ys = torch.randint(0, 3, (30,), generator=g)
    loader = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 30, 8)]
    out = psp_entropy(model, loader)
    assert set(out) == {"0", "2"}
    with torch.no_grad():
        z0 = model[0](xs)
    expect = sum(_h((z0[ys == c] > 0).double().mean(0)) for c in range(3)).float()
    assert out["0"].shape == (6,)
    torch.testing.assert_close(out["0"], expect)
    sparsefast.sparsify(model, sparsity=None)
    assert isinstance(model[0], sparsefast.SparseLinear)
    again = psp_entropy(model, loader)
    for k in out:
        torch.testing.assert_close(again[k], out[k])
