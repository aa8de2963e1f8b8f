"""Property-based tests (hypothesis): layers against the masked-dense reference over random shapes,
patterns, dtypes, strides and input layouts on every CPU backend; and a state-dict fuzz asserting
"raises clearly and changes nothing, or loads correctly"."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefast
from sparsefast import SparseConv2d, SparseLinear, backends

CPU_BACKENDS = [b for b in ("reference", "cpu") if backends.why_unavailable(b) is None]
TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (6e-2, 5e-2), torch.float16: (1e-2, 1e-2)}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pattern(draw, k: int, rows: int):
    choices = [("unstructured", draw(st.sampled_from([0.0, 0.5, 0.9])))]
    if k % 4 == 0:
        choices.append(("2:4", None))
    if k % 8 == 0 and rows % 8 == 0:
        choices.append(("block:8", 0.5))
    return draw(st.sampled_from(choices))


@st.composite
def linear_case(draw):
    k = draw(st.sampled_from([4, 8, 12, 16, 24, 40]))
    n = draw(st.sampled_from([1, 3, 8, 16]))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    pattern, sparsity = _pattern(draw, k, n)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    return k, n, tuple(lead), pattern, sparsity, dtype, layout, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@SETTINGS
@given(case=linear_case())
def test_linear_property(backend, case):
    k, n, lead, pattern, sparsity, dtype, layout, bias, seed = case
    torch.manual_seed(seed)
    layer = SparseLinear(k, n, bias=bias, sparsity=sparsity, pattern=pattern, backend=backend, dtype=dtype)
    x = torch.randn(*lead, k, dtype=torch.float32)
    if layout == "transposed" and len(lead) >= 1:
        x = torch.randn(k, *lead).movedim(0, -1)         # last dim not contiguous
    elif layout == "strided":
        x = torch.randn(*lead, 2 * k)[..., ::2]
    x = x.to(dtype).requires_grad_(True)
    y = layer(x)
    w = layer.dense_weight().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    ref = F.linear(xd, w, None if layer.bias is None else layer.bias.detach().double())
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(ref.detach().abs().max()))
    torch.testing.assert_close(y.double(), ref, atol=atol * scale, rtol=rtol)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=atol * max(1.0, float(xd.grad.abs().max())), rtol=rtol)
    gk = sparsefast.formats.kept.gather(w.grad, layer.mask)
    assert layer.weight.grad.shape == gk.shape  # may be empty (a mask that keeps nothing)
    gscale = max(1.0, float(gk.abs().max())) if gk.numel() else 1.0
    torch.testing.assert_close(layer.weight.grad.double(), gk, atol=atol * gscale, rtol=rtol)


@st.composite
def conv_case(draw):
    c = draw(st.sampled_from([4, 8]))
    o = draw(st.sampled_from([4, 8]))
    groups = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([1, 3, (1, 3)]))
    stride = draw(st.sampled_from([1, 2, (2, 1)]))
    padding = draw(st.sampled_from([0, 1, (0, 2)]))
    dilation = draw(st.sampled_from([1, 2]))
    h, w = draw(st.integers(5, 9)), draw(st.integers(5, 9))
    cg = c // groups
    pattern, sparsity = ("2:4", None) if cg % 4 == 0 and draw(st.booleans()) else \
        ("unstructured", draw(st.sampled_from([0.3, 0.8])))
    channels_last = draw(st.booleans())
    return c, o, groups, k, stride, padding, dilation, h, w, pattern, sparsity, channels_last, draw(st.integers(0, 99))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@SETTINGS
@given(case=conv_case())
def test_conv_property(backend, case):
    c, o, groups, k, stride, padding, dilation, h, w, pattern, sparsity, cl, seed = case
    torch.manual_seed(seed)
    layer = SparseConv2d(c, o, k, stride, padding, dilation, groups, sparsity=sparsity, pattern=pattern,
                         backend=backend)
    x = torch.randn(2, c, h, w)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.detach().double(), layer.stride,
                   layer.padding, layer.dilation, groups)
    if ref.shape[-1] < 1 or ref.shape[-2] < 1:
        return
    x.requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y.double(), ref, atol=2e-4 * max(1.0, float(ref.abs().max())), rtol=2e-4)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape


# ---- state-dict fuzz -------------------------------------------------------------------------------
@st.composite
def state_dict_edit(draw):
    kind = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "mask-nm", "mask-dtype", "mask-shape",
                                 "plain", "ok"]))
    layer = draw(st.sampled_from(["0", "2"]))
    key = draw(st.sampled_from(["weight", "bias", "mask"]))
    return kind, layer, key, draw(st.booleans()), draw(st.integers(0, 999))


def _model():
    torch.manual_seed(0)
    return sparsefast.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), pattern="2:4")


@SETTINGS
@given(edit=state_dict_edit())
def test_state_dict_fuzz(edit):
    kind, layer, key, strict, seed = edit
    model = _model()
    g = torch.Generator().manual_seed(seed)
    src = sparsefast.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), pattern="2:4")
    for m in src:
        if isinstance(m, sparsefast.nn.SparseModule):
            m.set_dense_weight(torch.randn(m.weight_shape, generator=g))
    sd = dict(src.state_dict())
    k = f"{layer}.{key}"
    if kind == "drop":
        del sd[k]
    elif kind == "extra":
        sd[f"{layer}.bogus"] = torch.zeros(1)
    elif kind == "shape":
        sd[k] = torch.zeros(3)
    elif kind == "dtype":
        sd[k] = sd[k].to(torch.int64) if key != "mask" else sd[k].to(torch.float64) * 2
    elif kind == "mask-nm":
        sd[f"{layer}.mask"] = torch.ones_like(sd[f"{layer}.mask"])
    elif kind == "mask-dtype":
        sd[f"{layer}.mask"] = sd[f"{layer}.mask"].to(torch.complex64)
    elif kind == "mask-shape":
        sd[f"{layer}.mask"] = sd[f"{layer}.mask"][:, :4]
    elif kind == "plain":  # a plain nn.Linear entry: weight without mask
        del sd[f"{layer}.mask"]
    before = copy.deepcopy(model.state_dict())
    try:
        model.load_state_dict(sd, strict=strict)
    except (RuntimeError, ValueError, TypeError) as e:
        assert str(e)  # a message, never a bare failure
        for name, v in model.state_dict().items():
            assert torch.equal(v, before[name]), f"{kind}/{k}: {name} changed by a failed load"
        return
    # loaded: every sparse layer equals what was given (or kept its own where a key was absent)
    for name in ("0", "2"):
        lay = model[int(name)]
        assert sparsefast.masks.parse_pattern("2:4").mask_error(sparsefast.masks.reduction_view(lay.mask)) is None
        w = sd.get(f"{name}.weight")
        if w is not None and w.is_floating_point() and tuple(w.shape) == lay.weight_shape:
            torch.testing.assert_close(lay.dense_weight(), (w * lay.mask).to(lay.weight.dtype))
