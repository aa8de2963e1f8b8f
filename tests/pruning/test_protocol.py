"""The protocol every pruning method shares: construction on plain layers, bad input, state_dict resume,
same masks on every available backend."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import pruning as P
from sparsefast.nn import SparseModule, sparse_layers
import _util
from _util import data

BACKENDS = [b for b in ("reference", "triton", "cpu") if b in sparsefast.backends.available()]

# method -> (constructor kwargs for an MLP, needs data in prune(), extra per-step action)
METHODS = {
    "Magnitude": dict(sparsity=0.8),
    "Random": dict(sparsity=0.8),
    "GradualMagnitude": dict(sparsity=0.8, start_step=0, end_step=6, update_every=2),
    "LotteryTicket": dict(sparsity=0.8, rewind_step=2),
    "LOBSTER": dict(sparsity=0.8, lmbda=1e-3, pwe=1),
    "SNIP": dict(sparsity=0.8),
    "GraSP": dict(sparsity=0.8),
    "SynFlow": dict(sparsity=0.8, iterations=3, input_shape=(12,)),
    "SET": dict(sparsity=0.8, update_every=2),
    "RigL": dict(sparsity=0.8, update_every=2, end_step=100),
    "DSR": dict(sparsity=0.8, update_every=2),
    "SNFS": dict(sparsity=0.8, update_every=2),
    "FreezeNet": dict(sparsity=0.8),
    "EdgePopup": dict(sparsity=0.8),
    "SRSTE": dict(lr=0.1, pattern="2:4"),
    "RobustTicket": dict(sparsity=0.8, method="imp", eps=0.1, alpha=0.05, pgd_steps=1, rate=0.5),
}
NEEDS_DATA = {"SNIP", "GraSP", "FreezeNet"}
NM_OK = {"Magnitude", "Random", "SNIP", "GraSP", "SynFlow", "SET", "RigL", "FreezeNet", "EdgePopup", "SRSTE"}


def mlp(seed: int = 0) -> nn.Module:
    return _util.mlp(seed, hidden=16)


def build(name: str, model: nn.Module, **over):
    kw = dict(METHODS[name])
    kw.update(over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsefast.SparsefastWarning)
        return getattr(P, name)(model, **kw)


def train(name: str, model: nn.Module, pruner, opt, batches, start: int = 0) -> None:
    for i, (x, y) in enumerate(batches):
        t = start + i
        if name == "RobustTicket":
            x = pruner.adversarial_batch(x, y)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        if name in ("LotteryTicket", "RobustTicket") and t % 4 == 3:
            pruner.prune()
        if name == "LOBSTER" and t % 4 == 2:
            pruner.prune(batches[0], force=True)


def first_prune(name: str, pruner, batch) -> None:
    """The initial prune() (IMP methods prune after training rounds instead)."""
    if name not in ("LotteryTicket", "RobustTicket"):
        pruner.prune(batch=batch)


def make_opt(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", list(METHODS))
def test_plain_layers_become_sparse_all_kept(name):
    model = mlp()
    w0 = model[0].weight.detach().clone()
    pr = build(name, model)
    assert all(isinstance(m, SparseModule) for m in (model[0], model[2], model[4]))
    assert [n for n, _ in pr.layers] == ["0", "2", "4"]
    if name not in ("FreezeNet", "EdgePopup"):  # those two re-initialise from the seed (documented)
        assert torch.equal(model[0].dense_weight(), w0)
        assert pr.sparsity() == 0.0
    assert set(pr.masks()) == {"0", "2", "4"}


@pytest.mark.parametrize("name", list(METHODS))
def test_prune_step_reaches_target_and_masks_only_via_layers(name):
    model = mlp()
    pr = build(name, model)
    batches = data(8)
    first_prune(name, pr, batches[0])
    opt = make_opt(model)
    train(name, model, pr, opt, batches)
    s = pr.sparsity()
    if name in ("LotteryTicket", "RobustTicket", "LOBSTER"):
        assert 0.0 < s <= 0.8 + 1e-6
    elif name == "SRSTE":
        assert s == pytest.approx(0.5)
    else:
        assert s == pytest.approx(0.8, abs=0.02)
    for _, l in sparse_layers(model):
        assert l.weight.shape == (int(l.mask.sum()),), "a sparse layer stores its kept values only"
        assert bool((l.dense_weight()[~l.mask] == 0).all()), "pruned weights must stay exactly zero"
        assert torch.equal(model.state_dict()[f"{_}.weight"], l.dense_weight())
        assert l.mask.dtype == torch.bool
    masks = pr.masks()
    for n, l in pr.layers:
        assert torch.equal(masks[n], l.mask) and masks[n] is not l.mask


@pytest.mark.parametrize("name", sorted(NM_OK))
def test_nm_pattern_supported(name):
    model = mlp()
    over = {"pattern": "2:4"}
    over.pop("sparsity", None)
    kw = {k: v for k, v in METHODS[name].items() if k != "sparsity"}
    kw.update(over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsefast.SparsefastWarning)
        pr = getattr(P, name)(model, **kw)
    batches = data(4)
    pr.prune(batch=batches[0])
    train(name, model, pr, make_opt(model), batches)
    for n, l in pr.layers:
        assert l.pattern == "2:4"
        assert sparsefast.masks.is_nm(sparsefast.masks.reduction_view(l.mask), 2, 4)
        assert int(sparsefast.masks.reduction_view(l.mask).reshape(-1, 4).sum(1).min()) == 2


@pytest.mark.parametrize("name", sorted(set(METHODS) - NM_OK - {"RobustTicket"}))
def test_nm_pattern_refused_clearly(name):
    model = mlp()
    kw = {k: v for k, v in METHODS[name].items() if k != "sparsity"}
    with pytest.raises(ValueError, match="N:M"):
        getattr(P, name)(model, pattern="2:4", **kw)
    assert type(model[0]) is nn.Linear  # untouched


def test_robust_ticket_nm_only_for_omp():
    with pytest.raises(ValueError, match="N:M"):
        P.RobustTicket(mlp(), method="imp", pattern="2:4")
    model = mlp()
    pr = P.RobustTicket(model, method="omp", pattern="2:4")
    pr.prune()
    assert all(l.pattern == "2:4" for _, l in pr.layers)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=1.5),
                                 dict(distribution="gaussian"), dict(sparsity=True)])
def test_bad_arguments_raise_before_touching(name, bad):
    if name == "SRSTE" and "sparsity" in bad:
        bad = dict(bad, pattern="unstructured")
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    kw = dict(METHODS[name])
    kw.update(bad)
    with pytest.raises((ValueError, TypeError)):
        getattr(P, name)(model, **kw)
    assert type(model[0]) is nn.Linear
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", list(METHODS))
def test_model_without_prunable_layers(name):
    with pytest.raises(ValueError, match="no prunable layers"):
        getattr(P, name)(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), **METHODS[name])
    with pytest.raises(TypeError):
        getattr(P, name)("not a model", **METHODS[name])


@pytest.mark.parametrize("name", sorted(NEEDS_DATA))
def test_missing_batch_raises_before_touching(name):
    model = mlp()
    pr = build(name, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch"):
        pr.prune()
    with pytest.raises(TypeError):
        pr.prune(batch=42)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_synflow_needs_shape_without_batch():
    pr = P.SynFlow(mlp(), sparsity=0.5, iterations=2)
    with pytest.raises(ValueError, match="input_shape"):
        pr.prune()
    pr.prune(batch=data(1)[0])  # only the shape is used
    assert pr.sparsity() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["SET", "RigL", "DSR", "SNFS", "EdgePopup", "SRSTE"])
def test_step_before_prune_is_an_error(name):
    pr = build(name, mlp())
    with pytest.raises(RuntimeError, match="prune"):
        pr.step()


def test_unstructured_needs_sparsity_and_nm_sparsity_must_match():
    with pytest.raises(ValueError, match="sparsity"):
        P.Magnitude(mlp())
    with pytest.raises(ValueError, match="implies sparsity"):
        P.Magnitude(mlp(), pattern="2:4", sparsity=0.8)
    P.Magnitude(mlp(), pattern="2:4", sparsity=0.5)


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_mid_schedule_gives_identical_masks(name):
    batches = data(10)
    # uninterrupted
    m1 = mlp()
    p1 = build(name, m1)
    first_prune(name, p1, batches[0])
    o1 = make_opt(m1)
    train(name, m1, p1, o1, batches)
    # interrupted after 5 steps, everything rebuilt from state dicts
    m2 = mlp()
    p2 = build(name, m2)
    first_prune(name, p2, batches[0])
    o2 = make_opt(m2)
    train(name, m2, p2, o2, batches[:5])
    sd_m, sd_p, sd_o = copy.deepcopy(m2.state_dict()), copy.deepcopy(p2.state_dict()), copy.deepcopy(o2.state_dict())
    m3 = mlp(seed=123)  # different init: everything must come from the checkpoint
    p3 = build(name, m3)
    m3.load_state_dict(sd_m)
    p3.load_state_dict(sd_p)
    o3 = make_opt(m3)
    o3.load_state_dict(sd_o)
    train(name, m3, p3, o3, batches[5:], start=5)
    assert p3.step_count == p1.step_count
    for (n, l1), (_, l3) in zip(p1.layers, p3.layers):
        assert torch.equal(l1.mask, l3.mask), f"{name}: masks of layer {n} differ after resume"
        torch.testing.assert_close(l1.weight, l3.weight, rtol=1e-5, atol=1e-6)


def test_load_state_dict_validates_every_layer_before_changing_anything():
    model = mlp()
    pr = P.Magnitude(model, sparsity=0.5)
    pr.prune()
    sd = pr.state_dict()
    other = P.Magnitude(mlp(1), sparsity=0.8)
    other.prune()
    bad = copy.deepcopy(other.state_dict())
    bad["step"] = 7
    bad["masks"]["4"] = torch.ones(3, 3, dtype=torch.bool)  # layer "0" valid, layer "4" not
    before = {n: (l.mask.clone(), l.dense_weight()) for n, l in pr.layers}
    with pytest.raises(ValueError, match="'4'"):
        pr.load_state_dict(bad)
    for n, l in pr.layers:  # nothing changed: not the valid first layer either
        assert torch.equal(l.mask, before[n][0]) and torch.equal(l.dense_weight(), before[n][1])
    assert pr.step_count == 0 and pr.state_dict()["step"] == sd["step"]
    bad["masks"]["4"] = other.state_dict()["masks"]["4"]
    bad["patterns"]["2"] = "2:3"  # 16 inputs: not divisible by 3
    with pytest.raises(ValueError):
        pr.load_state_dict(bad)
    assert all(torch.equal(l.mask, before[n][0]) for n, l in pr.layers)
    bad["patterns"]["2"] = "unstructured"
    pr.load_state_dict(bad)  # now valid: applied
    assert all(torch.equal(l.mask, other.masks()[n]) for n, l in pr.layers) and pr.step_count == 7


def test_load_state_dict_rejects_other_methods():
    a = P.Magnitude(mlp(), sparsity=0.5)
    b = P.Random(mlp(), sparsity=0.5)
    with pytest.raises(ValueError, match="Magnitude"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(TypeError):
        b.load_state_dict({"foo": 1})


@pytest.mark.skipif(len(BACKENDS) < 2, reason=f"only {BACKENDS} available")
@pytest.mark.parametrize("name", list(METHODS))
def test_same_masks_on_every_backend(name):
    batches = data(3)
    masks = {}
    for b in BACKENDS:
        model = mlp()
        pr = build(name, model, backend=b)
        first_prune(name, pr, batches[0])
        train(name, model, pr, make_opt(model), batches)
        masks[b] = pr.masks()
    ref = masks["reference"]
    for b, ms in masks.items():
        for n in ref:
            assert torch.equal(ms[n], ref[n]), f"{name}: masks differ between reference and {b} (layer {n})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_methods_run_on_backend(backend):
    """A conv net through a few representative methods on this backend."""
    batches = [(torch.randn(2, 4, 4, 4), torch.randint(0, 3, (2,))) for _ in range(2)]
    for name, kw in [("RigL", dict(sparsity=0.5, update_every=1, end_step=10)), ("SNIP", dict(sparsity=0.5)),
                     ("EdgePopup", dict(sparsity=0.5))]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 16, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sparsefast.SparsefastWarning)
            pr = getattr(P, name)(model, backend=backend, **kw)
        pr.prune(batch=batches[0])
        opt = make_opt(model)
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            pr.step()
            opt.zero_grad()
        assert pr.sparsity() == pytest.approx(0.5, abs=0.01)
        assert all(l.requested_backend == backend for _, l in pr.layers)


def test_filter_fn_and_existing_sparse_layers():
    model = mlp()
    pr = P.Magnitude(model, sparsity=0.5, filter_fn=lambda n, m: n != "4")
    assert type(model[4]) is nn.Linear and [n for n, _ in pr.layers] == ["0", "2"]
    pr.prune()
    # a model that already holds 2:4 layers: the pattern is inferred
    m2 = sparsefast.sparsify(mlp(), pattern="2:4")
    assert P.Magnitude(m2).pattern.is_nm


def test_nm_unfit_layer_left_alone_with_warning():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))  # 6 % 4 != 0
    with pytest.warns(sparsefast.SparsefastWarning, match="'0'"):
        pr = P.Magnitude(model, pattern="2:4")
    assert type(model[0]) is nn.Linear and [n for n, _ in pr.layers] == ["2"]
