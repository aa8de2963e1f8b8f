"""Every backend, one parametrized test: forward, dX, masked dW and the frozen-weight backward of
Linear and Conv2d, for unstructured and N:M patterns, in float32/float16/bfloat16, against the
float64 masked-dense reference. Backends unavailable here are skipped (with the reason)."""
from __future__ import annotations

import pytest
import torch

import sparsefast
from sparsefast import backends
from sparsefast.ops import sparse_conv2d, sparse_linear

from _util import DTYPES, assert_close, random_mask, ref_conv, ref_linear

BACKENDS = backends.names()
REQUIRED_PATTERNS = ("2:4", "unstructured:0.1", "unstructured:0.6")  # every backend must run these
PATTERNS = [*REQUIRED_PATTERNS, "1:4", "4:8"]


def _backend_or_skip(name: str, device: str = "cpu"):
    why = backends.why_unavailable(name)
    if why is not None:
        pytest.skip(f"backend {name} unavailable: {why}")
    b = backends.get(name)
    if device not in b.devices:
        pytest.skip(f"backend {name} does not run on {device} here")
    return b


def _run_or_skip(fn, pattern, name):
    try:
        return fn()
    except RuntimeError as e:
        if "cannot run" in str(e) and pattern not in REQUIRED_PATTERNS:
            pytest.skip(f"{name} does not support {pattern}: {e}")
        raise


LINEAR_SHAPES = [(1, 16, 8), (7, 32, 24), (33, 64, 20)]  # (M, K, N): M not a multiple of any tile


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear(name, dtype, pattern, shape):
    b_ = _backend_or_skip(name)
    M, K, N = shape
    g = torch.Generator().manual_seed(hash((M, K, N, pattern)) % 2**31)
    mask, pat = random_mask((N, K), pattern)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(N, K, generator=g) * mask).to(dtype).requires_grad_(True)
    b = torch.randn(N, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g).to(dtype)
    y = _run_or_skip(lambda: sparse_linear(x, w, mask, b, backend=name, pattern=pat), pattern, name)
    y.backward(dy)
    ry, rdx, rdw, rdb = ref_linear(x, w, mask, b, dy)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, ry, dtype, f"{name} y")
    assert_close(x.grad, rdx, dtype, f"{name} dx")
    assert_close(w.grad, rdw, dtype, f"{name} dW")
    assert_close(b.grad, rdb, dtype, f"{name} db")
    assert (w.grad[~mask] == 0).all(), "weight gradient leaked to pruned positions"

    # frozen weight: only dx (and db); the weight-gradient primitive must not run at all
    calls = []
    orig = b_.kept_linear_dw
    b_.kept_linear_dw = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        x2 = x.detach().clone().requires_grad_(True)
        sparse_linear(x2, w.detach(), mask, b, backend=name, pattern=pat).backward(dy)
    finally:
        del b_.kept_linear_dw
    assert calls == []
    assert_close(x2.grad, rdx, dtype, f"{name} frozen dx")


CONV_CASES = [  # (B, C, H, W, O, k, stride, padding, dilation, groups)
    (2, 8, 6, 6, 4, 3, 1, 1, 1, 1),
    (1, 8, 7, 5, 8, 3, 2, 0, 1, 2),
    (2, 4, 7, 7, 6, (1, 3), 1, (0, 2), 2, 1),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.3"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_conv2d(name, dtype, pattern, case):
    b_ = _backend_or_skip(name)
    B, C, H, W, O, k, s, p, d, gr = case
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    mask, pat = random_mask((O, C // gr, kh, kw), pattern)
    x = torch.randn(B, C, H, W, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(O, C // gr, kh, kw, generator=gen) * mask).to(dtype).requires_grad_(True)
    b = torch.randn(O, generator=gen).to(dtype).requires_grad_(True)
    ry0 = torch.nn.functional.conv2d(x.detach().double(), (w * mask).detach().double(), None, s, p, d, gr)
    dy = torch.randn(ry0.shape, generator=gen).to(dtype)
    y = _run_or_skip(lambda: sparse_conv2d(x, w, mask, b, s, p, d, gr, backend=name, pattern=pat), pattern, name)
    y.backward(dy)
    ry, rdx, rdw, rdb = ref_conv(x, w, mask, b, dy, s, p, d, gr)
    assert y.dtype == dtype and y.shape == ry.shape
    assert_close(y, ry, dtype, f"{name} conv y")
    assert_close(x.grad, rdx, dtype, f"{name} conv dx")
    assert_close(w.grad, rdw, dtype, f"{name} conv dW")
    assert_close(b.grad, rdb, dtype, f"{name} conv db")
    assert (w.grad[~mask] == 0).all()

    calls = []
    orig = b_.kept_conv_dw
    b_.kept_conv_dw = lambda *a, **kw_: calls.append(1) or orig(*a, **kw_)
    try:
        x2 = x.detach().clone().requires_grad_(True)
        sparse_conv2d(x2, w.detach(), mask, None, s, p, d, gr, backend=name, pattern=pat).backward(dy)
    finally:
        del b_.kept_conv_dw
    assert calls == []
    assert_close(x2.grad, rdx, dtype, f"{name} frozen conv dx")


@pytest.mark.parametrize("name", BACKENDS)
def test_layers_train_identically_on_every_backend(name):
    """A small model trained for a few steps gives the same weights on every backend."""
    _backend_or_skip(name)

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            sparsefast.SparseConv2d(4, 8, 3, padding=1, pattern="2:4", backend=backend), torch.nn.ReLU(),
            torch.nn.Flatten(), sparsefast.SparseLinear(8 * 5 * 5, 10, sparsity=0.8, backend=backend))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 10, (6,))
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], model

    ref, _ = run("reference")
    got, model = run(name)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all(l.backend == name for l in model if isinstance(l, sparsefast.nn.SparseModule))


@pytest.mark.parametrize("name", BACKENDS)
def test_nan_inf_propagate_like_reference(name):
    _backend_or_skip(name)
    mask, _ = random_mask((8, 16), "2:4")
    w = torch.randn(8, 16) * mask
    x = torch.randn(3, 16)
    x[0, 0] = float("nan")
    x[1, 5] = float("inf")
    y = sparse_linear(x, w, mask, backend=name, pattern="2:4")
    ry = torch.nn.functional.linear(x, w * mask)
    assert torch.equal(torch.isnan(y), torch.isnan(ry))
    assert torch.equal(torch.isinf(y), torch.isinf(ry))


# ------------------------------------------------------------------------------------------------
# backends.base.masked and the pack cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kernel", ["cpu-ext", "int-bits"])
def test_masked_is_where_bit_for_bit(dtype, kernel, monkeypatch):
    """``masked`` equals ``torch.where(mask, t, 0)`` bit for bit (NaN/Inf/-0 at pruned positions become
    +0, kept ones keep their bits), in place too, on the C++ kernel and the integer-multiply path."""
    from sparsefast import _build_cpu
    from sparsefast.backends.base import masked

    if kernel == "cpu-ext":
        if _build_cpu.loaded_or_prebuilt() is None and backends.why_unavailable("cpu") is not None:
            pytest.skip("cpu extension unavailable")
        backends.get("cpu")
    else:
        monkeypatch.setattr(_build_cpu, "loaded_or_prebuilt", lambda: None)
    g = torch.Generator().manual_seed(3)
    for shape in [(1,), (7, 13), (64, 33), (3, 4, 5, 6)]:
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.view(-1)
        flat[:: 5] = float("nan")
        flat[1:: 7] = float("inf")
        flat[2:: 11] = -0.0
        mask = torch.rand(shape, generator=g) < 0.5
        want = torch.where(mask, t, torch.zeros((), dtype=dtype))
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        got = masked(t, mask)
        assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits)), shape
        assert got.data_ptr() != t.data_ptr()
        c = t.clone()
        v = c._version
        assert masked(c, mask, inplace=True) is c and torch.equal(c.view(bits), want.view(bits))
        assert c._version > v  # in-place writes invalidate packed copies and saved tensors
        if t.dim() == 2:  # non-contiguous operands take the generic path
            tt, mt = t.t(), mask.t()
            assert torch.equal(masked(tt, mt).view(bits), torch.where(mt, tt, torch.zeros((), dtype=dtype)).view(bits))


def test_masked_keeps_autograd():
    from sparsefast.backends.base import masked

    t = torch.randn(4, 5, requires_grad=True)
    mask = torch.rand(4, 5) < 0.5
    masked(t, mask).sum().backward()
    assert torch.equal(t.grad, mask.float())


def test_cache_entry_freed_with_its_tensor():
    """A cached pack lives only as long as its tensors: freeing the weight drops the entry at once
    (packed copies of a deleted model are not kept until the cache fills)."""
    b = backends.get("reference")
    w = torch.randn(8, 8)
    mask = torch.rand(8, 8) < 0.5
    before = len(b._tc)
    assert b.cached("test-pack", (w, mask), lambda: torch.zeros(3)) is b.cached("test-pack", (w, mask), lambda: 1)
    assert len(b._tc) == before + 1
    w.add_(1)  # a new version replaces the entry; it does not add one
    b.cached("test-pack", (w, mask), lambda: torch.ones(3))
    assert len(b._tc) == before + 1
    del w  # no gc.collect(): the finalizer runs when the last reference goes
    assert len(b._tc) == before


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.1", "unstructured:0.6"])
@pytest.mark.parametrize("m_rows", [1, 5, 40])
def test_kept_primitives_match_dense_primitives(name, pattern, m_rows):
    """The kept-values primitives (what layers call: values in canonical order in, kept-sized dW out)
    equal the reference's dense-weight primitives, for Linear and a grouped, strided conv."""
    b_ = _backend_or_skip(name)
    from sparsefast.backends.base import ConvParams
    from sparsefast.formats import kept
    from sparsefast.masks import parse_pattern
    ref = backends.get("reference")
    g = torch.Generator().manual_seed(hash((name, pattern, m_rows)) % 2**31)
    mask, pat = random_mask((24, 32), pattern)
    p = parse_pattern(pat)
    w = torch.randn(24, 32, generator=g) * mask
    v = kept.gather(w, mask)
    x, dy = torch.randn(m_rows, 32, generator=g), torch.randn(m_rows, 24, generator=g)
    assert_close(b_.kept_linear_fwd(x, v, mask, None, p), ref.linear_fwd(x, w, mask, None, p), torch.float32, "y")
    assert_close(b_.kept_linear_dx(dy, v, mask, p), ref.linear_dx(dy, w, mask, p), torch.float32, "dx")
    dv = b_.kept_linear_dw(dy, x, mask, p)
    assert dv.shape == v.shape
    assert_close(dv, kept.gather(ref.linear_dw(dy, x, mask, p), mask), torch.float32, "dW")
    cmask, _ = random_mask((8, 8, 3, 3), pattern)
    cw = torch.randn(8, 8, 3, 3, generator=g) * cmask
    cv = kept.gather(cw, cmask)
    cp = ConvParams((2, 1), (1, 0), (1, 1), 1)
    xc = torch.randn(2, 8, 7, 6, generator=g)
    yc = ref.conv_fwd(xc, cw, cmask, None, p, cp)
    dyc = torch.randn(yc.shape, generator=g)
    assert_close(b_.kept_conv_fwd(xc, cv, cmask, None, p, cp), yc, torch.float32, "conv y")
    assert_close(b_.kept_conv_dx(dyc, cv, cmask, p, cp, xc.shape), ref.conv_dx(dyc, cw, cmask, p, cp, xc.shape),
                 torch.float32, "conv dx")
    assert_close(b_.kept_conv_dw(dyc, xc, cmask, p, cp), kept.gather(ref.conv_dw(dyc, xc, cmask, p, cp, cw.shape),
                                                                      cmask), torch.float32, "conv dW")


def _pattern_cases():
    from sparsefast.masks import PATTERN_TYPES
    return [(t, s, d) for t in PATTERN_TYPES for s, d in t.examples()]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", _pattern_cases(), ids=lambda c: f"{c[1]}@{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_registered_pattern_on_every_backend(name, case, dtype):
    """Backend x registered pattern type: Linear and conv forward, dX and kept dW against the float64
    reference, with the backend's declared tolerance; a backend refuses (with its reason) exactly the
    pattern types it does not declare."""
    from sparsefast.formats import kept
    from sparsefast.masks import magnitude_mask, parse_pattern
    from sparsefast.ops import sparse_conv2d_kept, sparse_linear_kept
    b_ = _backend_or_skip(name)
    ptype, pstr, density = case
    pat = parse_pattern(pstr)
    q = backends.make_query("linear", None, torch.empty(32, 64, device="meta"), pat, dtype=dtype)
    q = __import__("dataclasses").replace(q, device=torch.device("cpu"))
    reasons = b_.not_supported_reasons(q)
    if not isinstance(pat, b_.patterns):
        assert reasons and any(ptype.kind in r for r in reasons), reasons
        pytest.skip(f"{name} does not declare {ptype.kind} patterns")
    assert not reasons, reasons
    atol, rtol = b_.tolerances[dtype]
    sparsity = None if density is None else 1 - density
    g = torch.Generator().manual_seed(hash((name, pstr, str(dtype))) % 2**31)
    for shape in ((32, 64), (16, 16, 3, 3)):
        w = torch.randn(shape, generator=g)
        mask = magnitude_mask(torch.rand(shape, generator=g), pat, sparsity)
        v = kept.gather(w, mask).to(dtype).requires_grad_(True)
        wd = kept.scatter(v.detach().double(), mask).requires_grad_(True)
        if len(shape) == 2:
            x = torch.randn(5, 64, generator=g)
            y = sparse_linear_kept(x.to(dtype).requires_grad_(True), v, mask, backend=name, pattern=pstr)
            ry = torch.nn.functional.linear(x.double().requires_grad_(True), wd)
        else:
            x = torch.randn(2, 16, 6, 5, generator=g)
            y = sparse_conv2d_kept(x.to(dtype), v, mask, None, 1, 1, backend=name, pattern=pstr)
            ry = torch.nn.functional.conv2d(x.double(), wd, None, 1, 1)
        dy = torch.randn(y.shape, generator=g)
        y.backward(dy.to(dtype))
        ry.backward(dy.double())
        scale = max(1.0, float(ry.abs().max()))
        torch.testing.assert_close(y.double(), ry.detach(), atol=atol * scale, rtol=rtol)
        rdv = kept.gather(wd.grad, mask)
        torch.testing.assert_close(v.grad.double(), rdv, atol=atol * max(1.0, float(rdv.abs().max())), rtol=rtol)
