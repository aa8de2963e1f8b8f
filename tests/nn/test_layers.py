import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast
from sparsefast import SparseConv2d, SparseLinear, densify, sparsify
from sparsefast.masks import is_nm, reduction_view

REF = "reference"


def test_linear_matches_masked_dense_any_leading_dims():
    layer = SparseLinear(16, 12, sparsity=0.7, backend=REF)
    assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.weight_shape == (12, 16)
    assert layer.density == pytest.approx(0.3, abs=1 / 192)
    # kept-values storage: the Parameter holds the kept weights only, in row-major order
    assert layer.weight.shape == (int(layer.mask.sum()),)
    w = layer.dense_weight()
    assert (w[~layer.mask] == 0).all() and torch.equal(w[layer.mask], layer.weight.detach())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
    assert layer.backend == REF and layer.pattern == "unstructured"


def test_nm_sparsity_implied_and_required_for_unstructured():
    assert SparseLinear(8, 4, pattern="2:4").density == 0.5
    assert SparseLinear(8, 4, pattern="1:4").density == 0.25
    with pytest.raises(ValueError, match="sparsity"):
        SparseLinear(8, 4)
    with pytest.raises(ValueError, match="sparsity"):
        SparseLinear(8, 4, pattern="2:4", sparsity=0.3)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            SparseLinear(8, 4, sparsity=bad)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        SparseLinear(10, 4, pattern="2:4")
    with pytest.raises(ValueError, match="in_channels/groups=6"):
        SparseConv2d(6, 4, 3, pattern="2:4")
    with pytest.raises(ValueError, match="parse"):
        SparseLinear(8, 4, pattern="two:four")
    with pytest.raises(ValueError, match="unknown backend"):
        SparseLinear(8, 4, pattern="2:4", backend="nope")


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(groups=2, padding=(1, 0)),
                                dict(padding="same"), dict(padding=1, padding_mode="reflect"), dict(padding="valid")])
def test_conv_matches_nn_conv(kw):
    dense = nn.Conv2d(8, 8, 3, **kw)
    sp = SparseConv2d.from_dense(dense, sparsity=0.6, backend=REF)
    x = torch.randn(2, 8, 9, 7)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.weight.mul_(sp.mask)
    torch.testing.assert_close(sp(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sp(x[0]), ref(x[0]), atol=1e-5, rtol=1e-5)  # unbatched
    assert isinstance(sp.to_dense(), nn.Conv2d)
    torch.testing.assert_close(sp.to_dense()(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_from_dense_keeps_dtype(dtype):
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 4, 3).to(dtype), pattern="2:4")
    lin = SparseLinear.from_dense(nn.Linear(8, 4).to(dtype), pattern="2:4")
    for layer in (conv, lin):
        assert layer.weight.dtype == dtype and layer.bias.dtype == dtype


def test_from_dense_keeps_largest_and_copies():
    lin = nn.Linear(8, 4)
    sp = SparseLinear.from_dense(lin, pattern="2:4")
    assert is_nm(sp.mask, 2, 4)
    kept = lin.weight.detach().abs()[sp.mask].reshape(-1)
    assert torch.equal(sp.weight.detach().abs(), kept)
    assert (lin.weight != 0).all(), "from_dense must not modify the source module"
    g = lin.weight.detach().abs().reshape(-1, 4)
    assert (torch.sort(g, 1, descending=True).values[:, :2].reshape(-1).sort().values == kept.sort().values).all()
    m = torch.rand(4, 8) > 0.5
    assert torch.equal(SparseLinear.from_dense(lin, mask=m).mask, m)
    dense = sp.to_dense()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, sp.dense_weight())


def test_set_mask_validates_and_is_atomic():
    layer = SparseLinear(8, 4, pattern="2:4", backend=REF)
    w0, m0 = layer.dense_weight(), layer.mask.clone()
    bad = [torch.ones(4, 8, dtype=torch.bool),         # breaks 2:4
           torch.ones(4, 4, dtype=torch.bool),         # wrong shape
           torch.full((4, 8), 0.5),                    # not 0/1
           torch.ones(4, 8, dtype=torch.complex64)]    # wrong dtype
    for m in bad:
        with pytest.raises((ValueError, TypeError)):
            layer.set_mask(m)
        assert torch.equal(layer.mask, m0) and torch.equal(layer.dense_weight(), w0)
    new = sparsefast.masks.nm_mask(torch.randn(4, 8), 2, 4)
    layer.set_mask(new)
    w1 = layer.dense_weight()
    assert torch.equal(layer.mask, new) and (w1[~new] == 0).all()
    # positions kept before and after keep their values; newly kept ones start at zero
    both, grown = new & m0, new & ~m0
    assert torch.equal(w1[both], w0[both]) and (w1[grown] == 0).all()
    assert layer.density == 0.5


def test_state_dict_roundtrip_and_plain_dict():
    layer = SparseLinear(8, 6, sparsity=0.5)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "mask"} and (sd["weight"][~sd["mask"]] == 0).all()
    other = SparseLinear(8, 6, sparsity=0.9)
    other.load_state_dict(sd)
    assert torch.equal(other.mask, layer.mask) and torch.equal(other.weight, layer.weight)
    assert torch.equal(other.dense_weight(), sd["weight"])
    # a plain nn.Linear dict: the mask comes from the nonzeros
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.mask, lin.weight != 0)
    # a plain dict that does not fit the layer's 2:4 pattern fails and leaves the layer as it was
    nm = SparseLinear(8, 6, pattern="2:4")
    before = copy.deepcopy(nm.state_dict())
    with pytest.raises(RuntimeError, match="2:4"):
        nm.load_state_dict(nn.Linear(8, 6).state_dict())
    for k, v in nm.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(RuntimeError, match="shape"):
        nm.load_state_dict(nn.Linear(4, 6).state_dict())
    # conv
    conv = SparseConv2d(4, 4, 3, pattern="2:4")
    c2 = SparseConv2d(4, 4, 3, pattern="2:4")
    c2.load_state_dict(conv.state_dict())
    assert torch.equal(c2.mask, conv.mask)


def test_deepcopy_pickle_to():
    layer = SparseLinear(8, 4, pattern="2:4", backend=REF)
    x = torch.randn(3, 8)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    d = layer.to(torch.float64)
    assert d.weight.dtype == torch.float64 and d.mask.dtype == torch.bool
    torch.testing.assert_close(d(x.double()), y.double(), atol=1e-6, rtol=1e-6)
    h = copy.deepcopy(layer).to(dtype=torch.bfloat16)
    assert h(x.bfloat16()).dtype == torch.bfloat16


def test_freeze_gives_input_grad_only():
    layer = SparseLinear(8, 4, pattern="2:4", backend=REF).freeze()
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None
    layer.unfreeze()
    layer(x).sum().backward()
    assert layer.weight.grad is not None


def test_sparsify_densify_and_skip_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
                          nn.Linear(10, 6))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(sparsefast.SparsefastWarning) as rec:
        sparsify(model, pattern="2:4", backend=REF)
    msgs = [str(w.message) for w in rec if "skipping" in str(w.message)]
    assert len(msgs) == 2 and "'0'" in msgs[0] and "'5'" in msgs[1]  # 3 input channels; 10 in_features
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], SparseConv2d) and isinstance(model[4], SparseLinear)
    assert model[4].weight.dim() == 1 and model[4].weight_shape == (10, 128)
    y = model(x)
    densify(model)
    assert not any(isinstance(m, sparsefast.nn.SparseModule) for m in model.modules())
    torch.testing.assert_close(model(x), y)
    # filter_fn and a root-level layer
    m2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    sparsify(m2, sparsity=0.5, filter_fn=lambda n, m: n == "1")
    assert type(m2[0]) is nn.Linear and isinstance(m2[1], SparseLinear)
    assert isinstance(sparsify(nn.Linear(8, 4), sparsity=0.5), SparseLinear)
    # all-kept when no sparsity is given for unstructured
    m3 = sparsify(nn.Sequential(nn.Linear(8, 4)))
    assert m3[0].density == 1.0
    # MultiheadAttention's out_proj is used functionally: left alone
    mha = nn.MultiheadAttention(8, 2)
    sparsify(mha, sparsity=0.5)
    assert type(mha.out_proj) is not SparseLinear


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                        (torch.optim.Adam, dict(lr=1e-2))])
def test_optimizers_never_revive_pruned_weights(opt_cls, kw):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 16, sparsity=0.8, backend=REF), nn.ReLU(),
                          SparseConv2d(4, 4, 3, pattern="2:4", backend=REF) if False else nn.Identity(),
                          SparseLinear(16, 4, pattern="2:4", backend=REF))
    opt = opt_cls(model.parameters(), **kw)
    x = torch.randn(8, 16)
    for step in range(5):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 2:  # a mask change leaves momentum behind at newly pruned positions
            l0 = model[0]
            new = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) < 0.2
            l0.set_mask(new)
    for l in (model[0], model[3]):
        assert l.weight.shape == (int(l.mask.sum()),) and (l.dense_weight()[~l.mask] == 0).all()
        assert all(v.shape == l.weight.shape for v in opt.state[l.weight].values() if v.dim() == 1)


def test_conv_optimizer_zero_and_grad_mask():
    conv = SparseConv2d(8, 4, 3, padding=1, pattern="2:4", backend=REF)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        conv(torch.randn(2, 8, 5, 5)).sum().backward()
        assert conv.weight.grad.shape == conv.weight.shape and (conv.dense_grad()[~conv.mask] == 0).all()
        opt.step()
        opt.zero_grad()
    assert (conv.dense_weight()[~conv.mask] == 0).all()
    assert is_nm(reduction_view(conv.mask), 2, 4)


def test_use_context_sets_default(fresh_warnings):
    with sparsefast.backends.use("reference"):
        layer = SparseLinear(8, 4, pattern="2:4")
        assert sparsefast.backends.default() == "reference"
    assert layer.requested_backend == "reference"
    assert SparseLinear(8, 4, pattern="2:4").requested_backend == "auto"
    with pytest.raises(ValueError):
        with sparsefast.backends.use("bogus"):
            pass


def test_autocast_bf16_cpu():
    layer = SparseLinear(16, 8, pattern="2:4", backend=REF)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, layer.dense_weight(), layer.bias), atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.shape == layer.weight.shape


def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(4, 8, 3, padding=1, pattern="2:4"), nn.ReLU(), nn.Flatten(),
                          SparseLinear(8 * 5 * 5, 10, sparsity=0.9))
    x = torch.randn(3, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(x)
        cm = torch.compile(model, fullgraph=True)
        out = cm(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.sum().backward()
    g = model[3].weight.grad
    assert g is not None and g.shape == model[3].weight.shape
    assert (model[3].dense_grad()[~model[3].mask] == 0).all()
