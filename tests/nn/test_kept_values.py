"""Kept-values storage: the Parameter an optimizer sees holds only the kept weights, and training with any
``torch.optim`` optimizer matches masked-dense training (a dense layer whose gradient is masked), including
across mask changes, on every backend available here."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import SparseConv2d, SparseLinear, backends
from sparsefast.formats import kept

OPTIMIZERS = [
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    ("sgd-nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    ("adamw-foreach", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adamw-fused", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True)),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.05)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5)),
]
BACKENDS = [b for b in ("reference", "cpu", "triton") if backends.why_unavailable(b) is None]


class _Ref(nn.Module):
    """Masked-dense reference: dense Parameters, gradient masked, weights and state re-masked on a mask change."""

    def __init__(self, sparse: nn.Sequential):
        super().__init__()
        self.layers = nn.ModuleList(l.to_dense() if isinstance(l, sparsefast.nn.SparseModule) else copy.deepcopy(l)
                                    for l in sparse)
        self.masks = [l.mask.clone() if isinstance(l, sparsefast.nn.SparseModule) else None for l in sparse]
        for layer, m in zip(self.layers, self.masks):
            if m is not None:
                layer.weight.register_hook(lambda g, m=m: g * m)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def set_mask(self, i, new, opt):
        with torch.no_grad():
            self.masks[i].copy_(new)
            w = self.layers[i].weight
            w.mul_(new)
            for v in opt.state.get(w, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    v.mul_(new)


def _models(kind: str, backend: str):
    torch.manual_seed(0)
    if kind == "linear":
        sp = nn.Sequential(SparseLinear(16, 24, sparsity=0.7, backend=backend), nn.Tanh(),
                           SparseLinear(24, 8, pattern="2:4", backend=backend))
        x = torch.randn(6, 16)
    else:
        sp = nn.Sequential(SparseConv2d(4, 8, 3, padding=1, sparsity=0.6, backend=backend), nn.Tanh(),
                           SparseConv2d(8, 4, 3, stride=2, pattern="2:4", backend=backend))
        x = torch.randn(2, 4, 6, 6)
    return sp, _Ref(sp), x


def _new_mask(layer, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layer.weight_shape, generator=g)
    return sparsefast.masks.magnitude_mask(scores, layer.pattern, None if ":" in layer.pattern else layer.sparsity)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name,make_opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_matches_masked_dense(kind, opt_name, make_opt, backend):
    if backend == "triton" and (kind == "conv" or opt_name not in ("adamw", "sgd-momentum")):
        pytest.skip("interpreted Triton: one Linear case per optimizer family keeps CI short")
    sp, ref, x = _models(kind, backend)
    o_sp, o_ref = make_opt(sp.parameters()), make_opt(ref.parameters())
    for step in range(6):
        for model, opt in ((sp, o_sp), (ref, o_ref)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        if step == 2:  # a mask change in the middle: kept-both keep value and state, new start at zero
            new = _new_mask(sp[0], 7)
            sp[0].set_mask(new)
            ref.set_mask(0, new, o_ref)
    for i in (0, 2):
        layer, dense = sp[i], ref.layers[i]
        assert layer.weight.shape == (int(layer.mask.sum()),)
        torch.testing.assert_close(layer.dense_weight(), dense.weight.detach(), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(layer.bias, dense.bias, atol=2e-5, rtol=1e-4)
        for k, v in o_sp.state[layer.weight].items():  # optimizer state is kept-sized
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.shape == layer.weight.shape, k
                torch.testing.assert_close(kept.scatter(v, layer.mask), o_ref.state[dense.weight][k] * layer.mask,
                                           atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sp(x), ref(x), atol=2e-5, rtol=1e-4)


def test_clip_grad_norm_scaler_and_accumulation():
    sp, ref, x = _models("linear", "reference")
    o_sp, o_ref = torch.optim.SGD(sp.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    n_sp = n_ref = None
    for model, opt in ((sp, o_sp), (ref, o_ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for half in (x[:3], x[3:]):  # gradient accumulation over two micro-batches
            scaler.scale(model(half).square().mean()).backward()
        scaler.unscale_(opt)
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        n_sp, n_ref = (n, n_ref) if model is sp else (n_sp, n)
    torch.testing.assert_close(n_sp, n_ref)  # same norm as masked dense (pruned grads are exactly zero there)
    torch.testing.assert_close(sp[0].dense_weight(), ref.layers[0].weight.detach())


def test_set_mask_moves_state_and_failure_changes_nothing():
    layer = SparseLinear(16, 8, sparsity=0.5, backend="reference")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()
    before = {k: kept.scatter(v, layer.mask) for k, v in opt.state[layer.weight].items() if v.dim() == 1}
    w0, m0, p0 = layer.dense_weight(), layer.mask.clone(), layer.weight
    for bad in (torch.ones(8, 15, dtype=torch.bool), torch.full((8, 16), 2.0)):
        with pytest.raises((ValueError, TypeError)):
            layer.set_mask(bad)
        assert torch.equal(layer.mask, m0) and torch.equal(layer.dense_weight(), w0)
        for k, v in before.items():
            assert torch.equal(kept.scatter(opt.state[layer.weight][k], layer.mask), v)
    new = torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) < 0.3   # nnz changes
    layer.set_mask(new)
    assert layer.weight is p0 and layer.weight.shape == (int(new.sum()),)
    both, grown = new & m0, new & ~m0
    w1 = layer.dense_weight()
    assert torch.equal(w1[both], w0[both]) and (w1[grown] == 0).all()
    for k, v in before.items():
        s = kept.scatter(opt.state[layer.weight][k], layer.mask)
        assert torch.equal(s[both], v[both]) and (s[grown] == 0).all(), k
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()  # the optimizer keeps working on the resized Parameter


def test_pattern_change_and_weight_argument():
    layer = SparseLinear(8, 4, sparsity=0.5, backend="reference")
    dense = torch.randn(4, 8)
    nm = sparsefast.masks.nm_mask(dense.abs(), 2, 4)
    layer.set_mask(nm, pattern="2:4", weight=dense)
    assert layer.pattern == "2:4" and torch.equal(layer.dense_weight(), dense * nm)
    with pytest.raises(ValueError, match="2:4"):
        layer.set_mask(torch.ones(4, 8, dtype=torch.bool))
    assert layer.pattern == "2:4" and torch.equal(layer.mask, nm)


def test_state_dict_is_dense_and_loads_plain_dicts():
    layer = SparseConv2d(4, 8, 3, sparsity=0.7)
    sd = layer.state_dict()
    assert sd["weight"].shape == (8, 4, 3, 3) and torch.equal(sd["weight"], layer.dense_weight())
    plain = nn.Conv2d(4, 8, 3)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "mask"})
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)
    other = SparseConv2d(4, 8, 3, sparsity=0.2)
    other.load_state_dict(plain.state_dict())   # mask from the nonzeros, nnz changes
    torch.testing.assert_close(other(x), layer(x), atol=1e-5, rtol=1e-5)


def test_mask_only_load_is_validated():
    layer = SparseLinear(16, 8, pattern="2:4")
    before = copy.deepcopy(layer.state_dict())
    for strict in (False, True):
        with pytest.raises(RuntimeError, match="2:4"):
            layer.load_state_dict({"mask": torch.ones(8, 16, dtype=torch.bool)}, strict=strict)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k])
    assert layer.density == 0.5


def test_param_groups_decays_kept_values():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), SparseLinear(8, 4, sparsity=0.5))
    decay, no_decay = sparsefast.nn.param_groups(model, 0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert {id(model[2].weight), id(model[0].weight)} == ids(decay)
    assert {id(model[2].bias), id(model[1].weight), id(model[1].bias), id(model[0].bias)} == ids(no_decay)
    names = [n for n, _ in model.named_parameters()]
    assert "2.weight" in names  # the name-based habit (`name.endswith("weight")`) keeps working


def test_meta_forward_is_shape_only():
    layer = SparseLinear(16, 8, pattern="2:4").to("meta")
    y = layer(torch.empty(3, 16, device="meta"))
    assert y.shape == (3, 8) and y.device.type == "meta"


def test_dense_shaped_data_write_is_refused_loudly():
    """Old habit: ``layer.weight.data.copy_(dense)``. The weight is kept values now, so a dense write
    cannot silently land somewhere: it raises (use ``set_dense_weight``)."""
    layer = SparseLinear(16, 8, sparsity=0.5, backend="cpu" if "cpu" in BACKENDS else "reference")
    with pytest.raises(RuntimeError):
        layer.weight.data.copy_(torch.randn(8, 16))
    x = torch.randn(3, 16)
    layer(x)
    new = torch.randn(8, 16)
    layer.set_dense_weight(new)
    torch.testing.assert_close(layer(x), F.linear(x, new * layer.mask, layer.bias), atol=1e-5, rtol=1e-5)
    # a kept-sized .data write (no version bump) is seen too: kernels read the values as they are
    layer.weight.data.copy_(torch.randn(layer.weight.shape))
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_fail_clearly_in_forward(backend):
    """Same errors as nn.Conv2d, in forward, on every backend; the layer is named in layer errors."""
    lin = SparseLinear(8, 4, sparsity=0.5, backend=backend)
    with pytest.raises(ValueError, match="SparseLinear.*dimension"):
        lin(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float64 does not match the layer's dtype torch.float32"):
        lin(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"SparseLinear.*shape \(2, 3, 7\) has 7 features.*in_features=8"):
        lin(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="SparseLinear.*floating point, got torch.int64"):
        lin(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="SparseLinear.*on meta but the layer is on cpu"):
        lin(torch.randn(2, 8, device="meta"))
    lin.bias = torch.nn.Parameter(torch.zeros(5))  # a user's wrong bias: an error, never an out-of-range read
    with pytest.raises(ValueError, match=r"SparseLinear.*bias of shape \(5,\).*\(4,\)"):
        lin(torch.randn(2, 8))
    conv = SparseConv2d(4, 4, 5, sparsity=0.5, backend=backend)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv(torch.randn(1, 4, 3, 3))
    for kw in (dict(dilation=0), dict(dilation=(1, 0)), dict(padding=-1), dict(stride=0)):
        with pytest.raises(ValueError, match="must be"):
            SparseConv2d(4, 4, 3, sparsity=0.5, backend=backend, **kw)
        with pytest.raises(ValueError, match="must be"):
            sparsefast.ops.sparse_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3),
                                         torch.ones(4, 4, 3, 3, dtype=torch.bool), backend=backend, **kw)


def test_mask_change_while_previous_graph_is_alive():
    """A training loop holds last step's ``loss`` while the next forward runs; a mask change that resizes
    the kept values in between must not break the next backward."""
    layer = SparseLinear(16, 8, sparsity=0.5, backend="reference")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(torch.randn(4, 16)).sum()
    loss.backward()
    opt.step()
    layer.set_mask(torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) < 0.2)  # nnz changes
    loss = layer(torch.randn(4, 16)).sum()   # the previous graph is still referenced until here
    loss.backward()
    assert layer.weight.grad.shape == layer.weight.shape
    opt.step()


def test_extra_parameters_of_a_layer_stay_in_its_state_dict():
    layer = SparseLinear(8, 4, sparsity=0.5)
    layer.register_parameter("scores", nn.Parameter(torch.randn(4, 8)))
    layer.register_buffer("counter", torch.tensor(3))
    sd = layer.state_dict()
    assert {"weight", "bias", "mask", "scores", "counter"} == set(sd)
    other = SparseLinear(8, 4, sparsity=0.5)
    other.register_parameter("scores", nn.Parameter(torch.zeros(4, 8)))
    other.register_buffer("counter", torch.tensor(0))
    other.load_state_dict(sd)
    assert torch.equal(other.scores, layer.scores) and int(other.counter) == 3
    assert torch.equal(other.dense_weight(), layer.dense_weight())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        SparseLinear(8, 4, sparsity=0.5).load_state_dict(sd)


def test_set_mask_reset_restarts_kept_positions():
    """``reset=``: positions kept before and after that restart at zero value and zero optimizer state
    (a weight dropped and regrown in the same DST update); the others keep both."""
    conv = SparseConv2d(4, 8, 3, sparsity=0.5, backend="reference")
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    m0, w0 = conv.mask.clone(), conv.dense_weight()
    buf0 = kept.scatter(opt.state[conv.weight]["momentum_buffer"], m0)
    reset = m0 & (torch.rand(m0.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    conv.set_mask(m0, reset=reset)
    w1, buf1 = conv.dense_weight(), kept.scatter(opt.state[conv.weight]["momentum_buffer"], conv.mask)
    assert (w1[reset] == 0).all() and (buf1[reset] == 0).all()
    assert torch.equal(w1[m0 & ~reset], w0[m0 & ~reset]) and torch.equal(buf1[m0 & ~reset], buf0[m0 & ~reset])
    with pytest.raises(ValueError, match="reset"):
        conv.set_mask(m0, reset=torch.ones(3, 3, dtype=torch.bool))


def test_reference_hands_the_forward_weight_to_dx(monkeypatch):
    """On the reference backend a training step scatters the kept values once per layer (the forward's
    dense weight goes to the dX of its backward), not twice; a layer whose input needs no gradient holds
    nothing after its forward; results equal the masked-dense twin; the hand-off is dropped with the values."""
    import gc
    import weakref
    from sparsefast import backends
    from sparsefast.formats import kept as K
    torch.manual_seed(0)
    ref = backends.get("reference")
    calls = []
    real = K.scatter
    monkeypatch.setattr(K, "scatter", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = sparsefast.nn.SparseLinear(16, 24, sparsity=0.5, backend="reference")
    b = sparsefast.nn.SparseConv2d(6, 4, 3, padding=1, sparsity=0.5, backend="reference")
    wa, wb = weakref.ref(a.weight), weakref.ref(b.weight)
    def handoffs():  # the dense weights the reference backend holds for a dX to come, for this test's layers
        mine = [t for t in (wa(), wb()) if t is not None]
        return sum(any(e[0]() is t for t in mine) for e in ref._tc.entries("handoff"))

    def watchers(values):  # finalizer registrations of hand-off entries on these values
        return [w for w in ref._tc.watched("handoff") if w[0]() is values]

    x = torch.randn(5, 16)
    y = a(x)
    assert handoffs() == 0  # x needs no gradient: no dX will come
    xr = torch.randn(2, 6, 5, 5, requires_grad=True)
    calls.clear()
    out = b(xr)
    assert len(calls) == 1 and handoffs() == 1
    out.square().sum().backward()
    assert len(calls) == 1 and handoffs() == 0  # dX took the forward's weight
    xd = xr.detach().clone().requires_grad_(True)
    w = b.dense_weight().clone().requires_grad_(True)
    torch.nn.functional.conv2d(xd, w, b.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(xr.grad, xd.grad)
    torch.testing.assert_close(b.dense_grad(), w.grad * b.mask)
    def finalizers(t):  # live weakref.finalize registrations on t (CPython keeps them in a registry)
        return sum(1 for f in list(weakref.finalize._registry) if f.peek() is not None and f.peek()[0] is t)

    n_fin = finalizers(b.weight)
    for _ in range(20):  # every step hands off again: still one entry and one finalizer per values tensor
        b(xr).sum().backward()
    assert handoffs() == 0 and len(watchers(b.weight)) == 1 and finalizers(b.weight) == n_fin
    # an entry whose backward never comes is dropped with its values
    x2 = torch.randn(5, 16, requires_grad=True)
    a(x2)
    assert handoffs() == 1
    del a, y  # (y's graph holds the values too)
    gc.collect()
    assert wa() is None and handoffs() == 0
    assert not any(e[0]() is None for e in ref._tc.entries("handoff"))  # a dead tensor's entry is gone
