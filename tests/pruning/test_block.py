"""Pruning methods at block granularity (``pattern="block:B"``): masks made of whole b x b blocks of the
reduction view, block counts per layer, DST drop/grow in blocks, same masks on every backend, and clear
refusals for the methods that have no block form."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import masks as M
from sparsefast import pruning as P
from sparsefast.pruning import distributions as D

B = 16
PAT = f"block:{B}"
BLOCK = M.parse_pattern(PAT)
BACKENDS = [b for b in ("reference", "cpu") if b in sparsefast.backends.available()]
NCLS = 16

# the methods that must support blocks, with kwargs; "steps" = training steps run after prune()
CORE = {
    "Magnitude": dict(sparsity=0.75),
    "Random": dict(sparsity=0.75),
    "GradualMagnitude": dict(sparsity=0.75, start_step=0, end_step=4, update_every=2),
    "SET": dict(sparsity=0.5, update_every=2, distribution="uniform"),
    "RigL": dict(sparsity=0.5, update_every=2, end_step=100, distribution="uniform"),
}
# further methods for which block scoring is generic (tile score = sum of the method's weight scores)
EXTRA = {
    "SNIP": dict(sparsity=0.75),
    "GraSP": dict(sparsity=0.75),
    "SynFlow": dict(sparsity=0.75, iterations=3),
    "LotteryTicket": dict(sparsity=0.75, rewind_step=0, rate=0.5),
    "RobustTicket": dict(sparsity=0.75, method="omp", eps=0.1, alpha=0.05, pgd_steps=1),
    "FreezeNet": dict(sparsity=0.75),
    "EdgePopup": dict(sparsity=0.75),
}
REFUSED = {
    "DSR": dict(sparsity=0.5),
    "SNFS": dict(sparsity=0.5),
    "LOBSTER": dict(sparsity=0.5),
    "SRSTE": dict(lr=0.1),
}
NEEDS_DATA = {"SNIP", "GraSP", "FreezeNet"}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NCLS))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NCLS))


MODELS = {"mlp": (mlp, (32,)), "conv": (convnet, (16, 5, 5))}


def data(kind: str, n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[kind][1]
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, NCLS, (8,), generator=g)) for _ in range(n)]


def build(name: str, model: nn.Module, kind: str, **over):
    kw = dict({**CORE, **EXTRA}[name])
    if name == "SynFlow":
        kw["input_shape"] = MODELS[kind][1]
    kw.update(over)
    return getattr(P, name)(model, pattern=PAT, **kw)


def run(name: str, kind: str, *, backend: str = "auto", steps: int = 4, seed: int = 0):
    """Build, prune, train ``steps`` steps; return (pruner, model, losses, kept-block counts per step)."""
    model = MODELS[kind][0](seed)
    batches = data(kind, steps)
    pr = build(name, model, kind, backend=backend)
    pr.prune(batch=batches[0]) if name in NEEDS_DATA else pr.prune()
    params = pr.parameters() if name == "EdgePopup" else model.parameters()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses, counts = [], [blocks_kept(pr)]
    for i, (x, y) in enumerate(batches):
        if name == "RobustTicket":
            x = pr.adversarial_batch(x, y)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        pr.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        counts.append(blocks_kept(pr))
        if name == "LotteryTicket" and i == 1:
            pr.prune()
    return pr, model, losses, counts


def blocks_kept(pr) -> dict[str, int]:
    return {n: int(l.mask.count_nonzero()) // (B * B) for n, l in pr.layers}


def nblocks(shape) -> int:
    return math.prod(shape) // (B * B)


def assert_block_masks(pr):
    for n, l in pr.layers:
        assert l.pattern == PAT, n
        err = BLOCK.mask_error(M.reduction_view(l.mask))
        assert err is None, f"layer {n}: {err}"
        assert int(l.mask.count_nonzero()) % (B * B) == 0
        assert int(l.mask.count_nonzero()) > 0  # at least one block per layer


def expected_blocks(pr, sparsity: float) -> dict[str, int] | int:
    """Per-layer kept blocks of a per-layer distribution, or the global total."""
    if pr.distribution == "global":
        return max(len(pr.layers), int(round((1 - sparsity) * sum(nblocks(l.weight_shape) for _, l in pr.layers))))
    dens = D.compute_densities(pr._infos, sparsity, pr.distribution)
    return {n: max(1, int(round(dens[n] * nblocks(l.weight_shape)))) for n, l in pr.layers}


# ---- the supported methods ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", list(CORE))
def test_core_methods_block_masks_sparsity_and_training(name, kind):
    pr, model, losses, counts = run(name, kind)
    assert_block_masks(pr)
    assert all(math.isfinite(v) for v in losses), losses
    s = CORE[name]["sparsity"]
    exp = expected_blocks(pr, s)
    got = blocks_kept(pr)
    if isinstance(exp, int):
        assert sum(got.values()) == exp
    else:
        assert got == exp
    assert pr.sparsity() == pytest.approx(1 - sum(got.values()) / sum(nblocks(l.weight_shape) for _, l in pr.layers))
    if name == "GradualMagnitude":
        # the cubic schedule: fewer blocks on every update, never regrown
        tot = [sum(c.values()) for c in counts]
        assert tot[0] > tot[-1] and all(a >= b for a, b in zip(tot, tot[1:]))
    if name in ("SET", "RigL"):
        assert all(c == counts[0] for c in counts), "DST keeps every layer's kept block count constant"


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", list(EXTRA))
def test_other_methods_give_block_masks(name, kind):
    pr, model, losses, _ = run(name, kind, steps=3)
    assert_block_masks(pr)
    assert all(math.isfinite(v) for v in losses), losses
    if name != "LotteryTicket":  # IMP rounds move towards the target; the others are there after prune()
        exp = expected_blocks(pr, EXTRA[name]["sparsity"])
        got = blocks_kept(pr)
        assert (sum(got.values()) == exp) if isinstance(exp, int) else (got == exp)


def test_magnitude_keeps_blocks_of_largest_summed_magnitude():
    model = convnet()
    pr = P.Magnitude(model, sparsity=0.5, pattern=PAT, distribution="uniform")
    dense = {n: l.dense_weight().clone() for n, l in pr.layers}
    pr.prune()
    for n, l in pr.layers:
        assert torch.equal(l.mask, M.magnitude_mask(dense[n], PAT, 0.5)), n
    model = convnet()
    pr = P.Magnitude(model, sparsity=0.7, pattern=PAT)  # global: one ranking of blocks over all layers
    dense = {n: l.dense_weight().clone() for n, l in pr.layers}
    pr.prune()
    sums = {n: M.reduction_view(w.abs()).reshape(w.shape[0] // B, B, -1, B).sum((1, 3)) for n, w in dense.items()}
    keep = {n: M.reduction_view(l.mask)[::B, ::B] for n, l in pr.layers}
    # every layer keeps at least its best block; apart from those, one threshold over all blocks
    forced = [n for n in keep if int(keep[n].sum()) == 1]
    for n in forced:
        assert float(sums[n][keep[n]]) == float(sums[n].max())
    kept = torch.cat([sums[n][keep[n]] for n in keep if n not in forced])
    dropped = torch.cat([sums[n][~keep[n]] for n in keep])
    assert float(kept.min()) >= float(dropped.max())
    assert sum(int(k.sum()) for k in keep.values()) == max(3, round(0.3 * sum(v.numel() for v in sums.values())))


def test_rigl_drops_smallest_blocks_and_grows_largest_gradient_blocks():
    model = mlp()
    pr = P.RigL(model, sparsity=0.5, pattern=PAT, distribution="uniform", update_every=2, end_step=100,
                drop_fraction=0.5)
    pr.prune()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t, (x, y) in enumerate(data("mlp", 4), start=1):
        if t % 2 == 0:  # the dense gradient the update sees
            ref = sparsefast.densify(copy.deepcopy(model))
            F.cross_entropy(ref(x), y).backward()
            lins = [m for m in ref.modules() if isinstance(m, nn.Linear)]
            G = {n: m.weight.grad.detach().clone() for (n, _), m in zip(pr.layers, lins)}
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = pr.masks()
        w = {n: l.dense_weight().clone() for n, l in pr.layers}
        pr.step()
        opt.zero_grad()
        if t % 2:
            continue
        alpha = 0.5 / 2 * (1 + math.cos(math.pi * t / 100))
        for n, l in pr.layers:
            m = before[n][::B, ::B]
            k = int(torch.tensor(float(m.sum())) * torch.tensor(alpha, dtype=torch.float32))  # rigl: floor
            if k == 0:  # floor(alpha * active blocks) = 0: nothing moves in this layer
                assert torch.equal(l.mask, before[n])
                continue
            wsum = w[n].abs().reshape(m.shape[0], B, m.shape[1], B).sum((1, 3))
            gsum = G[n].abs().reshape(m.shape[0], B, m.shape[1], B).sum((1, 3))
            drop = P.base.top_k_mask(torch.where(m, -wsum, torch.full_like(wsum, -math.inf)), k)
            after = m & ~drop
            grow = P.base.top_k_mask(torch.where(after, torch.full_like(gsum, -math.inf), gsum), k)
            exp = (after | grow).repeat_interleave(B, 0).repeat_interleave(B, 1)
            assert torch.equal(l.mask, exp), f"step {t} layer {n}"
            assert int(l.mask.sum()) == int(before[n].sum())
            g = pr.last_update[n]["grown"]
            assert BLOCK.mask_error(g) is None and BLOCK.mask_error(pr.last_update[n]["dropped"]) is None
            assert int(g.sum()) == int(pr.last_update[n]["dropped"].sum())
            assert bool((l.dense_weight()[g & ~before[n]] == 0).all())  # new blocks start at 0
            # a block dropped and regrown in the same update keeps its values (rigl reinit_when_same=False)
            assert torch.equal(l.dense_weight()[g & before[n]], w[n][g & before[n]])


def test_set_moves_blocks():
    pr, model, _, counts = run("SET", "conv", steps=4)
    assert any(bool(u["grown"].any()) for u in pr.last_update.values()), "SET updated no layer"
    for n, u in pr.last_update.items():
        assert int(u["grown"].sum()) == int(u["dropped"].sum())
        assert BLOCK.mask_error(M.reduction_view(u["grown"])) is None


@pytest.mark.parametrize("name", list(CORE))
def test_same_seed_same_masks(name):
    a = run(name, "mlp", seed=0)[0].masks()
    b = run(name, "mlp", seed=0)[0].masks()
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.skipif(len(BACKENDS) < 2, reason=f"only {BACKENDS} available")
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", list(CORE))
def test_same_masks_on_reference_and_cpu(name, kind):
    masks = {b: run(name, kind, backend=b)[0].masks() for b in BACKENDS}
    ref = masks["reference"]
    for b, ms in masks.items():
        for n in ref:
            assert torch.equal(ms[n], ref[n]), f"{name}/{kind}: masks differ between reference and {b} (layer {n})"


def test_layers_that_do_not_fit_the_block_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16))  # first: K=12 not divisible by 16
    with pytest.warns(sparsefast.SparsefastWarning, match="leaving layer '0'"):
        pr = P.Magnitude(model, sparsity=0.5, pattern=PAT)
    assert [n for n, _ in pr.layers] == ["2"]
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="no layer of the model fits pattern block:16"), \
            pytest.warns(sparsefast.SparsefastWarning, match="leaving layer '0'"):
        P.Magnitude(nn.Sequential(nn.Linear(12, 8)), sparsity=0.5, pattern=PAT)


def test_block_needs_sparsity_and_flow_repair_is_skipped():
    with pytest.raises(ValueError, match="sparsity"):
        P.Magnitude(mlp(), pattern=PAT)
    pr = P.Random(mlp(), sparsity=0.9, pattern=PAT, flow_repair=True)
    pr.prune()
    assert_block_masks(pr)


def test_pattern_taken_from_block_layers():
    model = nn.Sequential(sparsefast.SparseLinear(32, 64, sparsity=0.5, pattern=PAT), nn.ReLU(),
                          sparsefast.SparseLinear(64, 16, sparsity=0.5, pattern=PAT))
    pr = P.RigL(model, sparsity=0.75, end_step=10, update_every=2)
    assert str(pr.pattern) == PAT
    pr.prune()
    assert_block_masks(pr)


def test_state_dict_roundtrip_block():
    pr, model, _, _ = run("RigL", "mlp", steps=2)
    sd = pr.state_dict()
    model2 = mlp(1)
    pr2 = build("RigL", model2, "mlp")
    pr2.load_state_dict(sd)
    assert all(torch.equal(pr2.masks()[n], sd["masks"][n]) for n in sd["masks"])
    assert all(l.pattern == PAT for _, l in pr2.layers)


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REFUSED))
def test_block_refused_clearly(name):
    model = mlp()
    msg = rf"{name} does not support block patterns \(block:16\).*accepts: 'unstructured'"
    with pytest.raises(ValueError, match=msg):
        getattr(P, name)(model, pattern=PAT, **REFUSED[name])
    assert type(model[0]) is nn.Linear  # untouched


def test_every_method_documents_its_block_support():
    for name in list(CORE) + list(EXTRA) + list(REFUSED):
        doc = getattr(P, name).__doc__ or ""
        assert "block" in doc.lower(), f"{name}'s docstring does not say whether it supports block patterns"
