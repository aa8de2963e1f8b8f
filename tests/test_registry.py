import warnings

import pytest
import torch

import sparsefast
from sparsefast import backends
from sparsefast.backends import Backend, OpQuery


def test_available_and_why():
    av = backends.available()
    assert "reference" in av
    for name in backends.names():
        why = backends.why_unavailable(name)
        assert (why is None) == (name in av)
        if why is not None:
            assert isinstance(why, str) and why
    with pytest.raises(ValueError, match="unknown backend"):
        backends.why_unavailable("nope")


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "broken", "sparsefast.does_not_exist:Nope")
    backends._errors.pop("broken", None)
    assert "does_not_exist" in backends.why_unavailable("broken")
    with pytest.raises(RuntimeError, match="does_not_exist"):
        sparsefast.SparseLinear(8, 4, pattern="2:4", backend="broken")
    with pytest.raises(RuntimeError, match="unavailable"):
        backends.get("broken")


class _Picky(Backend):
    name = "picky"
    devices = ("cpu",)

    def not_supported_reasons(self, q):
        r = super().not_supported_reasons(q)
        if q.dtype != torch.float32:
            r.append("float32 only")
        return r

    def prefer_dense_reason(self, q):
        return "too dense" if (q.density or 0) > 0.5 else None

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return torch.nn.functional.linear(x, weight * mask, bias) + 0.0


@pytest.fixture
def picky(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "picky", "test_registry:_Picky")
    monkeypatch.setitem(backends.PRIORITY, "cpu", ["picky"])
    backends._instances.pop("picky", None)
    backends._errors.pop("picky", None)
    yield
    backends._instances.pop("picky", None)


def test_auto_priority_fallback_warns_once_and_explain(picky, fresh_warnings):
    layer = sparsefast.SparseLinear(8, 4, sparsity=0.75)
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert layer.backend == "picky"
    assert "picky: chosen" in backends.explain(layer, x)
    # unsupported dtype: auto falls back to reference, warning once
    l16 = sparsefast.SparseLinear(8, 4, sparsity=0.75, dtype=torch.float64)
    with pytest.warns(sparsefast.SparsefastWarning, match="float32 only"):
        l16(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l16(x.double())  # once only
    assert l16.backend == "reference"
    assert "picky: unsupported (" in backends.explain(l16, x.double()) and "float32 only" in backends.explain(l16, x.double())
    # dense is faster: routed to reference without a warning, explained
    dense = sparsefast.SparseLinear(8, 4, sparsity=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense(x)
    assert dense.backend == "reference"
    assert "dense-faster (too dense)" in backends.explain(dense, x)
    # explicit request for an unsupported call raises with the reason
    lp = sparsefast.SparseLinear(8, 4, sparsity=0.75, backend="picky", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 only"):
        lp(x.double())


def test_explain_rejects_other_objects():
    with pytest.raises(TypeError):
        backends.explain(torch.nn.Linear(2, 2))
    q = backends.make_query("linear", torch.randn(3, 8), torch.randn(4, 8), "2:4")
    assert isinstance(q, OpQuery) and q.m_rows == 3
    assert "reference" in backends.explain(q)


def test_conv_query_counts_output_pixels():
    x = torch.randn(2, 4, 16, 16)
    w = torch.randn(8, 4, 3, 3)
    q = backends.make_query("conv", x, w, "unstructured", backends.ConvParams((2, 2), (1, 1), (1, 1), 1))
    assert q.m_rows == 2 * 8 * 8
