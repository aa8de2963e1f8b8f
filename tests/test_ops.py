import pytest
import torch

from sparsefast import masks
from sparsefast.formats import kept
from sparsefast.ops import sparse_conv2d, sparse_linear

D = torch.float64


def _lin_inputs(M=4, K=8, N=6, pattern="2:4"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, dtype=D, generator=g)
    m = masks.nm_mask(w, 2, 4) if pattern == "2:4" else torch.rand(N, K, generator=g) > 0.5
    x = torch.randn(M, K, dtype=D, generator=g, requires_grad=True)
    b = torch.randn(N, dtype=D, generator=g, requires_grad=True)
    return x, (w * m).requires_grad_(True), m, b


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_gradcheck_and_double_backward_linear(pattern):
    x, w, m, b = _lin_inputs(pattern=pattern)
    f = lambda x, w, b: sparse_linear(x, w, m, b, backend="reference", pattern=pattern)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_gradcheck_and_double_backward_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=D, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=D, generator=g)
    m = torch.rand(6, 2, 3, 3, generator=g) > 0.4
    w = (w * m).requires_grad_(True)
    b = torch.randn(6, dtype=D, generator=g, requires_grad=True)
    f = lambda x, w, b: sparse_conv2d(x, w, m, b, stride=2, padding=1, dilation=1, groups=2, backend="reference")
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_masks_hessian_terms():
    """d/dW of a gradient-norm penalty (GraSP-style HVP) stays zero at pruned positions."""
    x, w, m, b = _lin_inputs(pattern="unstructured")
    y = sparse_linear(x, w, m, b, backend="reference")
    (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    (hw,) = torch.autograd.grad(gw.square().sum(), w)
    assert (hw[~m] == 0).all() and (hw[m] != 0).any()


def test_custom_ops_opcheck():
    x, w, m, b = _lin_inputs()
    # the ops take kept values (1-D, canonical order) and return kept-sized weight gradients
    v = kept.gather(w.detach(), m).requires_grad_()
    torch.library.opcheck(torch.ops.sparsefast.linear.default, (x, v, m, b, "reference", "2:4"))
    torch.library.opcheck(torch.ops.sparsefast.linear_dx.default, (x.detach()[:, :6].contiguous(), v, m, "reference", "2:4"))
    torch.library.opcheck(torch.ops.sparsefast.linear_dw.default,
                          (x.detach()[:, :6].contiguous(), x.detach(), m, v.numel(), "reference", "2:4"))
    xc = torch.randn(2, 4, 5, 5, dtype=D, requires_grad=True)
    wc = torch.randn(6, 4, 3, 3, dtype=D)
    mc = torch.rand(6, 4, 3, 3) > 0.5
    vc = kept.gather(wc, mc).requires_grad_()
    torch.library.opcheck(torch.ops.sparsefast.conv2d.default,
                          (xc, vc, mc, None, [1, 1], [1, 1], [1, 1], 1, "reference", "unstructured"))


def test_functional_bad_input():
    x, w, m, b = _lin_inputs()
    with pytest.raises(ValueError, match="in_features"):
        sparse_linear(torch.randn(3, 5, dtype=D), w, m)
    with pytest.raises(ValueError, match="mask shape"):
        sparse_linear(x, w, m[:, :4])
    with pytest.raises(TypeError, match="bool"):
        sparse_linear(x, w, m.float())
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse_linear(x.float(), w, m)
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_linear(x, w, m, backend="nope")
    with pytest.raises(ValueError, match="channels"):
        sparse_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), torch.ones(4, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding"):
        sparse_conv2d(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), torch.ones(4, 2, 3, 3, dtype=torch.bool),
                      padding="full")


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(5, 8)
        w = torch.empty(7)
        m = torch.empty(3, 8, dtype=torch.bool)
        assert torch.ops.sparsefast.linear(x, w, m, None, "reference", "unstructured").shape == (5, 3)
        assert torch.ops.sparsefast.linear_dw(torch.empty(5, 3), x, m, 7, "reference", "unstructured").shape == (7,)
        xc, wc, mc = torch.empty(2, 4, 9, 9), torch.empty(11), torch.empty(6, 4, 3, 3, dtype=torch.bool)
        out = torch.ops.sparsefast.conv2d(xc, wc, mc, None, [2, 2], [1, 1], [1, 1], 1, "reference", "unstructured")
        assert out.shape == (2, 6, 5, 5)


def test_pruned_nan_never_leaks():
    """NaN/Inf stored at a pruned weight position, or NaN inputs, never reach outputs or pruned grads."""
    w = torch.randn(4, 8, dtype=D)
    m = masks.nm_mask(w, 2, 4)
    w = w.masked_fill(~m, float("nan")).requires_grad_(True)
    x = torch.randn(3, 8, dtype=D)
    x[0, 1] = float("nan")
    y = sparse_linear(x, w, m, backend="reference", pattern="2:4")
    assert not torch.isnan(y[1:]).any()
    y[1:].sum().backward()
    assert (w.grad[~m] == 0).all()


def test_eager_calls_skip_custom_op_dispatch_and_cache_routes(monkeypatch):
    """Eager calls: no autograd machinery without grad, ``autograd.Function`` twins (same formulas as
    the custom ops) with grad; the backend choice is remembered per call signature."""
    from sparsefast import backends as bk
    from sparsefast import ops as O

    x, w = torch.randn(5, 8), torch.randn(6, 8)
    m = torch.rand(6, 8) < 0.5
    assert O._calls(x, w, None) is O._PLAIN
    with torch.no_grad():
        assert O._calls(x, w.requires_grad_(), None) is O._PLAIN
    assert O._calls(x, w, None) is O._EAGER
    calls = []
    real = bk._resolve
    monkeypatch.setattr(bk, "_resolve", lambda *a: calls.append(a) or real(*a))
    bk.clear_route_cache()
    for _ in range(3):
        y = O.sparse_linear(x, w, m, backend="auto")
    assert len(calls) == 1
    O.sparse_linear(torch.randn(7, 8), w, m, backend="auto")  # another row count: asked again
    assert len(calls) == 2
    y.sum().backward()
    torch.testing.assert_close(w.grad, (torch.ones(5, 6).t() @ x) * m)
