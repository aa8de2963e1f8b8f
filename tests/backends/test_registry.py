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
    monkeypatch.setattr(_Picky, "auto_priority", {"cpu": 100})  # ahead of every built-in backend
    backends.register_backend("picky", "test_registry:_Picky")
    yield
    backends._REGISTRY.pop("picky", None)
    backends._instances.pop("picky", None)
    backends._errors.pop("picky", None)
    backends.clear_route_cache()


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


def test_register_backend_specialist_wins_only_where_it_ranks(fresh_warnings):
    """A backend from outside the package: declared pattern types and a per-query priority decide where
    auto picks it; the base class refuses the rest with a reason; no code keys on its name."""
    from sparsefast.masks import Block

    class BlockOnly(Backend):
        name, devices, patterns = "blockonly", ("cpu",), (Block,)
        calls = 0

        def priority(self, q):
            return 1000 if isinstance(q.pattern, Block) else None

        def kept_linear_fwd(self, x, values, mask, bias, pattern):
            BlockOnly.calls += 1
            return backends.get("reference").kept_linear_fwd(x, values, mask, bias, pattern)

    with pytest.raises(TypeError):
        backends.register_backend("bad", object())
    backends.register_backend("blockonly", BlockOnly)
    try:
        with pytest.raises(ValueError, match="already registered"):
            backends.register_backend("blockonly", BlockOnly)
        x = torch.randn(3, 32)
        blk = sparsefast.SparseLinear(32, 32, sparsity=0.5, pattern="block:8")
        uns = sparsefast.SparseLinear(32, 32, sparsity=0.5)
        torch.testing.assert_close(blk(x), torch.nn.functional.linear(x, blk.dense_weight(), blk.bias))
        assert blk.backend == "blockonly" and BlockOnly.calls == 1
        uns(x)
        assert uns.backend != "blockonly"
        with pytest.raises(RuntimeError, match="does not run unstructured patterns"):
            sparsefast.SparseLinear(32, 32, sparsity=0.5, backend="blockonly")(x)
        assert "blockonly" in backends.explain(uns, x)
    finally:
        backends._REGISTRY.pop("blockonly", None)
        backends._instances.pop("blockonly", None)
        backends.clear_route_cache()
