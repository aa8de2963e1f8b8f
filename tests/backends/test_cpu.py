"""The ``cpu`` backend (C++ kernels in csrc/cpu/): every primitive against the float64 masked-dense
reference, for every ISA path this CPU can run (AVX-512 / AVX2 / portable), float32 / bfloat16 /
float16, unstructured and N:M (compact and CSR formats), random odd shapes with empty rows, all-kept
rows and M=1; plus caching, autograd through ``sparsefast.ops``, bad input and ``auto`` routing."""
from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from sparsefast import backends
from sparsefast.backends.base import ConvParams, OpQuery
from sparsefast.masks import from_reduction_view, nm_mask, parse_pattern, reduction_view
from sparsefast.ops import sparse_conv2d, sparse_linear


_WHY = backends.why_unavailable("cpu")


def test_extension_available():
    """Where a C++ compiler exists the extension must build (CI builds it with pip install -e .)."""
    if _WHY is not None and (shutil.which("c++") or shutil.which("g++")) and platform.system() == "Linux":
        pytest.fail(f"cpu backend unavailable although a compiler is present: {_WHY}")


pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")


@pytest.fixture(scope="module")
def cb():
    return backends.get("cpu")


def _isas():
    if _WHY is not None:
        return ["none"]
    return list(backends.get("cpu").ext.describe()["isas"])


@pytest.fixture(params=_isas())
def isa(request, cb):
    cb.set_isa(request.param)
    yield request.param
    cb.set_isa("auto")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (pattern, density for unstructured); 3:4 has n not a power of two -> CSR path for N:M
PATTERNS = ["unstructured:0.1", "unstructured:0.5", "2:4", "1:4", "4:8", "2:8", "3:4", "8:16"]


def _mask(shape, pattern: str, g: torch.Generator) -> tuple[torch.Tensor, str]:
    scores = torch.rand(shape, generator=g)
    if pattern.startswith("unstructured"):
        d = float(pattern.split(":")[1])
        m = torch.rand(shape, generator=g) < d
        if shape[0] > 3:
            m[0] = False   # empty row
            m[2] = True    # all-kept row
        return m, "unstructured"
    p = parse_pattern(pattern)
    rv = reduction_view(scores)
    m = nm_mask(rv, p.n, p.m)
    if rv.shape[0] > 3:
        m[1] = False       # a row keeping fewer than n per group (padding slots)
    return from_reduction_view(m, shape), pattern


def _tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def _close(actual, expected, dtype, what):
    """|actual - expected| <= tol * max|expected| (the kernels accumulate in fp32 in another order)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    err = float((actual.detach().double() - expected.detach().double()).abs().max()) if expected.numel() else 0.0
    assert err <= _tol(dtype) * scale, f"{what}: max error {err:.3g} > {_tol(dtype) * scale:.3g}"


def _ref_linear(x, w, m, b, dy):
    x, w, dy = x.double(), w.double(), dy.double()
    wm = w * m
    y = x @ wm.t() + (b.double() if b is not None else 0)
    return y, dy @ wm, (dy.t() @ x) * m


# ------------------------------------------------------------------------------------------------
# primitives vs the float64 reference
# ------------------------------------------------------------------------------------------------
LINEAR_SHAPES = [(1, 64, 48), (3, 40, 17), (5, 128, 33), (16, 96, 64), (37, 72, 24), (130, 48, 80)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_primitives(cb, isa, dtype, pattern):
    for i, (M, K, N) in enumerate(LINEAR_SHAPES):
        g = torch.Generator().manual_seed(1000 * i + len(pattern))
        p = parse_pattern(pattern.split(":")[0] if pattern.startswith("unstructured") else pattern)
        if p.is_nm and K % p.m:
            continue
        mask, _ = _mask((N, K), pattern, g)
        w = torch.randn(N, K, generator=g).to(dtype)
        x = torch.randn(M, K, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if i % 2 == 0 else None
        dy = torch.randn(M, N, generator=g).to(dtype)
        ry, rdx, rdw = _ref_linear(x, w, mask, b, dy)
        what = f"{isa} {dtype} {pattern} {(M, K, N)}"
        y = cb.linear_fwd(x, w, mask, b, p)
        assert y.dtype == dtype
        _close(y, ry, dtype, f"fwd {what}")
        _close(cb.linear_dx(dy, w, mask, p), rdx, dtype, f"dx {what}")
        dw = cb.linear_dw(dy, x, mask, p)
        assert dw.dtype == dtype and bool((dw[~mask] == 0).all()), f"dw not zero off-mask {what}"
        _close(dw, rdw, dtype, f"dw {what}")


CONV_CASES = [
    # (B, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (2, 8, 9, 7, 16, 3, 3, 1, 1, 1, 1),
    (3, 16, 6, 6, 8, 3, 3, 2, 0, 1, 2),
    (1, 8, 5, 5, 4, 1, 1, 1, 0, 1, 1),
    (2, 8, 11, 10, 12, 3, 3, 1, 2, 2, 1),
    (1, 16, 4, 9, 24, 2, 3, (2, 1), (1, 0), 1, 1),
    (5, 8, 3, 3, 8, 3, 3, 1, 1, 1, 1),
    (2, 8, 6, 7, 8, 3, 3, 1, (0, 1), 1, 1),   # Wo == W but Ho != H (stride-1 fast path)
    (1, 8, 6, 6, 8, 5, 5, 1, 2, 1, 1),
    (1, 8, 2, 2, 8, 5, 5, 1, 2, 1, 1),         # kernel larger than the image
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["unstructured:0.2", "2:4", "3:4", "1:8"])
def test_conv_primitives(cb, isa, dtype, pattern):
    for i, (B, C, H, W, O, kh, kw, s, pd, d, gr) in enumerate(CONV_CASES):
        g = torch.Generator().manual_seed(77 + i)
        p = parse_pattern(pattern.split(":")[0] if pattern.startswith("unstructured") else pattern)
        if p.is_nm and (C // gr) % p.m:
            continue
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        cp = ConvParams(pair(s), pair(pd), pair(d), gr)
        w = torch.randn(O, C // gr, kh, kw, generator=g).to(dtype)
        mask, _ = _mask(tuple(w.shape), pattern, g)
        x = torch.randn(B, C, H, W, generator=g).to(dtype)
        b = torch.randn(O, generator=g).to(dtype) if i % 2 else None
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        ry = F.conv2d(xd, wd * mask, b.double() if b is not None else None, cp.stride, cp.padding, cp.dilation, gr)
        dy = torch.randn(ry.shape, generator=g).to(dtype)
        ry.backward(dy.double())
        what = f"{isa} {dtype} {pattern} case {i}"
        y = cb.conv_fwd(x, w, mask, b, p, cp)
        _close(y, ry.detach(), dtype, f"conv fwd {what}")
        _close(cb.conv_dx(dy, w, mask, p, cp, x.shape), xd.grad, dtype, f"conv dx {what}")
        dw = cb.conv_dw(dy, x, mask, p, cp, w.shape)
        assert bool((dw[~mask] == 0).all()), f"conv dw not zero off-mask {what}"
        _close(dw, wd.grad * mask, dtype, f"conv dw {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threaded_paths_match(cb, dtype):
    """2 threads with parallelism forced on (min_par_work 0) and small conv blocks, so conv runs the
    per-thread image-block path (own scratch, per-part dW partial sums) for several batch sizes, incl.
    block counts that do not split evenly, and Linear splits rows across threads."""
    d0 = cb.ext.describe()
    nt = torch.get_num_threads()
    p = parse_pattern("unstructured")
    try:
        torch.set_num_threads(2)
        cb.ext.set_tunable("min_par_work", 0)
        cb.ext.set_tunable("conv_lanes", 16)  # one image per block
        for B, gr, s in [(1, 1, 1), (2, 1, 1), (3, 2, 2), (4, 1, 1), (5, 1, 2), (8, 2, 1)]:
            g = torch.Generator().manual_seed(100 + B)
            C, O, H = 8, 12, 6
            cp = ConvParams((s, s), (1, 1), (1, 1), gr)
            w = torch.randn(O, C // gr, 3, 3, generator=g).to(dtype)
            mask = torch.rand(w.shape, generator=g) < 0.3
            x = torch.randn(B, C, H, H, generator=g).to(dtype)
            b = torch.randn(O, generator=g).to(dtype)
            xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
            ry = F.conv2d(xd, wd * mask, b.double(), cp.stride, cp.padding, cp.dilation, gr)
            dy = torch.randn(ry.shape, generator=g).to(dtype)
            ry.backward(dy.double())
            what = f"threads=2 B={B} groups={gr} stride={s} {dtype}"
            _close(cb.conv_fwd(x, w, mask, b, p, cp), ry.detach(), dtype, f"conv fwd {what}")
            _close(cb.conv_dx(dy, w, mask, p, cp, x.shape), xd.grad, dtype, f"conv dx {what}")
            dw = cb.conv_dw(dy, x, mask, p, cp, w.shape)
            assert bool((dw[~mask] == 0).all()), f"conv dw not zero off-mask {what}"
            _close(dw, wd.grad * mask, dtype, f"conv dw {what}")
        g = torch.Generator().manual_seed(7)
        w = torch.randn(50, 70, generator=g).to(dtype)
        mask = torch.rand(50, 70, generator=g) < 0.2
        for M in (1, 3, 40):
            x = torch.randn(M, 70, generator=g).to(dtype)
            dy = torch.randn(M, 50, generator=g).to(dtype)
            ry, rdx, rdw = _ref_linear(x, w, mask, None, dy)
            _close(cb.linear_fwd(x, w, mask, None, p), ry, dtype, f"linear fwd threads=2 M={M}")
            _close(cb.linear_dx(dy, w, mask, p), rdx, dtype, f"linear dx threads=2 M={M}")
            _close(cb.linear_dw(dy, x, mask, p), rdw, dtype, f"linear dw threads=2 M={M}")
    finally:
        torch.set_num_threads(nt)
        for k in ("min_par_work", "conv_lanes"):
            cb.ext.set_tunable(k, d0[k])


def test_batch_sizes_and_layouts(cb):
    """Every batch size around the gather/panel switch and panel boundaries; non-contiguous input."""
    g = torch.Generator().manual_seed(5)
    N, K = 40, 72
    w = torch.randn(N, K, generator=g)
    mask = torch.rand(N, K, generator=g) < 0.3
    p = parse_pattern("unstructured")
    for M in [0, 1, 2, 4, 5, 15, 16, 17, 63, 64, 65, 129]:
        x = torch.randn(K, M, generator=g).t()  # non-contiguous
        dy = torch.randn(M, N, generator=g)
        ry, rdx, rdw = _ref_linear(x, w, mask, None, dy)
        _close(cb.linear_fwd(x, w, mask, None, p), ry, torch.float32, f"fwd M={M}")
        _close(cb.linear_dx(dy, w, mask, p), rdx, torch.float32, f"dx M={M}")
        _close(cb.linear_dw(dy, x, mask, p), rdw, torch.float32, f"dw M={M}")


def test_degenerate_masks(cb):
    p = parse_pattern("unstructured")
    x = torch.randn(20, 33)
    w = torch.randn(9, 33)
    for mask in (torch.zeros(9, 33, dtype=torch.bool), torch.ones(9, 33, dtype=torch.bool)):
        b = torch.randn(9)
        ry, rdx, rdw = _ref_linear(x, w, mask, b, torch.ones(20, 9))
        _close(cb.linear_fwd(x, w, mask, b, p), ry, torch.float32, "fwd")
        _close(cb.linear_dx(torch.ones(20, 9), w, mask, p), rdx, torch.float32, "dx")
        _close(cb.linear_dw(torch.ones(20, 9), x, mask, p), rdw, torch.float32, "dw")


def test_tunables_do_not_change_results(cb):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 96, generator=g)
    mask = torch.rand(64, 96, generator=g) < 0.2
    x = torch.randn(100, 96, generator=g)
    dy = torch.randn(100, 64, generator=g)
    p = parse_pattern("unstructured")
    ry, rdx, rdw = _ref_linear(x, w, mask, None, dy)
    d0 = cb.ext.describe()
    try:
        for panel, small in [(16, 0), (32, 16), (48, 4), (64, 1)]:
            cb.ext.set_tunable("panel", panel)
            cb.ext.set_tunable("small_max", small)
            cb.ext.set_tunable("min_par_work", 0)
            _close(cb.linear_fwd(x, w, mask, None, p), ry, torch.float32, f"fwd panel={panel}")
            _close(cb.linear_dx(dy, w, mask, p), rdx, torch.float32, f"dx panel={panel}")
            _close(cb.linear_dw(dy, x, mask, p), rdw, torch.float32, f"dw panel={panel}")
    finally:
        for k in ("panel", "small_max", "min_par_work"):
            cb.ext.set_tunable(k, d0[k])


# ------------------------------------------------------------------------------------------------
# caching: pack once per weight version, re-index after a mask change
# ------------------------------------------------------------------------------------------------
def test_repack_on_weight_and_mask_change(cb):
    p = parse_pattern("unstructured")
    w = torch.randn(32, 48)
    mask = torch.rand(32, 48) < 0.3
    x = torch.randn(8, 48)
    y0 = cb.linear_fwd(x, w, mask, None, p)
    assert cb.packed(w, mask, p) is cb.packed(w, mask, p)  # cached
    with torch.no_grad():
        w.mul_(2.0)  # optimizer-style in-place update
    _close(cb.linear_fwd(x, w, mask, None, p), 2 * y0.double(), torch.float32, "after weight update")
    _close(cb.linear_dx(torch.ones(8, 32), w, mask, p), torch.ones(8, 32).double() @ (w * mask).double(),
           torch.float32, "dx after update")
    mask[:, :24] = False  # in-place mask change (set_mask-style)
    _close(cb.linear_fwd(x, w, mask, None, p), x.double() @ (w * mask).double().t(), torch.float32, "after mask change")


# ------------------------------------------------------------------------------------------------
# through the public ops (autograd, frozen weight, double backward)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ops_autograd(pattern):
    g = torch.Generator().manual_seed(3)
    p = parse_pattern(pattern)
    w0 = torch.randn(24, 32, generator=g)
    mask = nm_mask(w0, p.n, p.m) if p.is_nm else torch.rand(24, 32, generator=g) < 0.3
    x = torch.randn(6, 32, generator=g, requires_grad=True)
    w = w0.clone().requires_grad_(True)
    b = torch.randn(24, generator=g, requires_grad=True)
    y = sparse_linear(x, w, mask, b, backend="cpu", pattern=pattern)
    gx, gw = torch.autograd.grad((y ** 2).sum(), (x, w), create_graph=True)
    xr, wr, br = x.detach().double().requires_grad_(), w0.double().requires_grad_(), b.detach().double()
    yr = F.linear(xr, wr * mask, br)
    gxr, gwr = torch.autograd.grad((yr ** 2).sum(), (xr, wr), create_graph=True)
    _close(y, yr.detach(), torch.float32, "y")
    _close(gx, gxr.detach(), torch.float32, "dx")
    _close(gw, gwr.detach() * mask, torch.float32, "dw")
    # double backward runs on the same backend's primitives
    hx = torch.autograd.grad(gx.sum() + gw.sum(), x)[0]
    hxr = torch.autograd.grad(gxr.sum() + (gwr * mask).sum(), xr)[0]
    _close(hx, hxr, torch.float32, "double backward")
    # frozen weight: only dx (and the bias grad)
    wf = w0.clone()
    xf = x.detach().clone().requires_grad_(True)
    sparse_linear(xf, wf, mask, None, backend="cpu", pattern=pattern).sum().backward()
    _close(xf.grad, torch.ones(6, 24).double() @ (w0 * mask).double(), torch.float32, "frozen dx")


def test_ops_conv_autograd():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 7, 7, generator=g, requires_grad=True)
    w = torch.randn(12, 8, 3, 3, generator=g, requires_grad=True)
    mask = torch.rand(12, 8, 3, 3, generator=g) < 0.3
    y = sparse_conv2d(x, w, mask, None, stride=2, padding=1, backend="cpu")
    y.backward(torch.ones_like(y))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = F.conv2d(xr, wr * mask, None, 2, 1)
    yr.backward(torch.ones_like(yr))
    _close(y, yr.detach(), torch.float32, "y")
    _close(x.grad, xr.grad, torch.float32, "dx")
    _close(w.grad, wr.grad * mask, torch.float32, "dw")


# ------------------------------------------------------------------------------------------------
# bad input, auto routing, describe
# ------------------------------------------------------------------------------------------------
def _q(op="linear", dtype=torch.float32, shape=(256, 256), pattern="unstructured", m_rows=64, density=0.1,
       device="cpu", conv=None):
    return OpQuery(op, torch.device(device), dtype, shape, parse_pattern(pattern), m_rows, density, conv)


def test_not_supported_reasons(cb):
    assert cb.not_supported_reasons(_q()) == []
    assert cb.not_supported_reasons(_q(dtype=torch.bfloat16)) == []
    assert cb.not_supported_reasons(_q(dtype=torch.float16)) == []
    assert any("float64" in r for r in cb.not_supported_reasons(_q(dtype=torch.float64)))
    assert any("meta" in r for r in cb.not_supported_reasons(_q(device="meta")))
    assert any("16-bit" in r for r in cb.not_supported_reasons(_q(shape=(8, 70000))))
    assert cb.not_supported_reasons(_q("conv", shape=(64, 32, 3, 3), conv=ConvParams())) == []
    with pytest.raises(RuntimeError, match="float64"):
        sparse_linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64),
                      torch.ones(4, 8, dtype=torch.bool), backend="cpu")


def test_prefer_dense_and_describe(cb):
    assert cb.prefer_dense_reason(_q(shape=(8, 8))) is not None           # tiny layer
    assert cb.prefer_dense_reason(_q(density=0.9)) is not None            # too dense
    assert cb.prefer_dense_reason(_q(shape=(1024, 1024), density=0.05)) is None
    isa = cb.ext.describe()["isa"]
    r24 = cb.prefer_dense_reason(_q(shape=(1024, 1024), pattern="2:4", m_rows=8))
    if isa == "generic":  # the portable kernels only beat dense at high sparsity (crossover_density)
        assert r24 is not None and "generic" in r24
    else:
        assert r24 is None
    # bf16 N:M: dense bf16 is only fast with AVX512-BF16 (bf16 dot instructions)
    rbf = cb.prefer_dense_reason(_q(shape=(1024, 1024), pattern="2:4", m_rows=64, dtype=torch.bfloat16))
    fast_bf16 = isa == "avx512" and cb.ext.describe()["bf16_dot"]
    assert (rbf is not None) == fast_bf16, rbf
    assert isa in cb.describe() and isa in cb.prefer_dense_reason(_q(density=0.9))
    text = backends.explain(_q(shape=(1024, 1024), density=0.05))
    assert "cpu: chosen" in text


def test_generic_fallback_matches(cb):
    """The portable path (what runs on CPUs without AVX2) gives the same answers as the best path."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 64, generator=g)
    mask = torch.rand(40, 64, generator=g) < 0.25
    x = torch.randn(19, 64, generator=g)
    p = parse_pattern("unstructured")
    best = cb.linear_fwd(x, w, mask, None, p)
    cb.set_isa("generic")
    try:
        assert cb.ext.describe()["isa"] == "generic"
        torch.testing.assert_close(cb.linear_fwd(x, w, mask, None, p), best, atol=1e-5, rtol=1e-5)
    finally:
        cb.set_isa("auto")


def test_nan_inf_like_masked_dense(cb):
    """NaN/Inf inputs spread like masked-dense math (0 * Inf = NaN); dW stays zero off the mask."""
    p = parse_pattern("unstructured")
    w = torch.randn(8, 16)
    mask = torch.rand(8, 16) < 0.4
    x = torch.randn(3, 16)
    x[0, 0] = float("nan")
    x[1, 5] = float("inf")
    y, ry = cb.linear_fwd(x, w, mask, None, p), F.linear(x, w * mask)
    assert torch.equal(torch.isnan(y), torch.isnan(ry)) and torch.equal(torch.isinf(y), torch.isinf(ry))
    dy = torch.randn(3, 8)
    dy[2, 1] = float("inf")
    dx, rdx = cb.linear_dx(dy, w, mask, p), dy @ (w * mask)
    assert torch.equal(torch.isnan(dx), torch.isnan(rdx)) and torch.equal(torch.isinf(dx), torch.isinf(rdx))
    assert bool((cb.linear_dw(dy, x, mask, p)[~mask] == 0).all())
    xc = torch.randn(1, 2, 5, 5)
    xc[0, 1, 2, 2] = float("nan")
    wc = torch.randn(3, 2, 3, 3)
    mc = torch.rand(3, 2, 3, 3) < 0.5
    yc = cb.conv_fwd(xc, wc, mc, None, p, ConvParams((1, 1), (1, 1)))
    assert torch.equal(torch.isnan(yc), torch.isnan(F.conv2d(xc, wc * mc, None, 1, 1)))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:8"])
def test_nm_compact_kernels_direct(cb, isa, pattern):
    """The compact N:M format on both kernel families (gather <= 4 rows, the lane-panel kernel beyond,
    several weight rows at a time with row-count tails), called directly on the extension."""
    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(21)
    N, K = 40, 96
    w = torch.randn(N, K, generator=g)
    mask = nm_mask(torch.rand(N, K, generator=g), p.n, p.m)
    mask[3] = False  # padding slots
    meta, valid = cb.ext.build_nm(mask, p.n, p.m)
    vals = cb.ext.gather_nm(w, meta, p.n, p.m, valid)
    for M in (1, 3, 4, 5, 16, 37):
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g)
        y = cb.ext.spmm(x, N, K, None, None, meta, vals, p.n, p.m, b, None, False, None)
        _close(y, x.double() @ (w * mask).double().t() + b.double(), torch.float32, f"{pattern} M={M}")


def test_nm_blocked_panel_path(cb):
    """The optional K-blocked walk of the compact N:M panel kernel (tunable block_bytes)."""
    p = parse_pattern("2:4")
    g = torch.Generator().manual_seed(8)
    N, K, M = 24, 512, 40
    w = torch.randn(N, K, generator=g)
    mask = nm_mask(w, 2, 4)
    meta, valid = cb.ext.build_nm(mask, 2, 4)
    vals = cb.ext.gather_nm(w, meta, 2, 4, valid)
    x = torch.randn(M, K, generator=g)
    ref = x.double() @ (w * mask).double().t()
    old = cb.ext.describe()["block_bytes"]
    try:
        for bb in (-1, 0, 4096, 16384):
            cb.ext.set_tunable("block_bytes", bb)
            _close(cb.ext.spmm(x, N, K, None, None, meta, vals, 2, 4, None, None, False, None), ref, torch.float32, f"bb={bb}")
    finally:
        cb.ext.set_tunable("block_bytes", old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.5", "unstructured:0.1"])
def test_dw_sddmm_and_dense_routes_agree(cb, dtype, pattern, monkeypatch):
    """Above ``sddmm_crossover`` (float32 2:4 / 50 %) the masked weight gradient is the dense GEMM plus
    the mask; below it the SDDMM. Both routes, forced, match the float64 reference (exact zeros off
    the mask), for Linear and Conv2d; and the default route follows the crossover."""
    from sparsefast.backends import cpu as cpu_mod

    g = torch.Generator().manual_seed(17)
    M, K, N = 37, 64, 40
    mask, _ = _mask((N, K), pattern, g)
    x, dy = torch.randn(M, K, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    wc = torch.randn(16, 8, 3, 3, generator=g)
    mc, _ = _mask(wc.shape, pattern, g)
    xc, dyc = torch.randn(2, 8, 9, 7, generator=g).to(dtype), torch.randn(2, 16, 9, 7, generator=g).to(dtype)
    cp = ConvParams((1, 1), (1, 1))
    p = parse_pattern(pattern.split(":")[0] if pattern.startswith("unstructured") else pattern)
    rdw = (dy.double().t() @ x.double()) * mask
    rdwc = torch.nn.grad.conv2d_weight(xc.double(), list(wc.shape), dyc.double(), 1, 1) * mc
    hw = cb._hw()
    want_dense = cb._density(mask) > cpu_mod.sddmm_crossover("linear", M, dtype, mask.numel(), **hw)
    assert cb._dense_dw("linear", mask, M, dtype) == want_dense
    if dtype == torch.float32 and hw["isa"] != "generic":
        assert want_dense == (pattern != "unstructured:0.1")
    for route, limit in (("sddmm", 1.0), ("dense", 0.0)):
        monkeypatch.setattr(cpu_mod, "sddmm_crossover", lambda *a, _l=limit, **k: _l)
        dw = cb.linear_dw(dy, x, mask, p)
        assert dw.dtype == dtype and bool((dw[~mask] == 0).all()), route
        _close(dw, rdw, dtype, f"linear dw via {route}")
        dwc = cb.conv_dw(dyc, xc, mc, p, cp, wc.shape)
        assert tuple(dwc.shape) == tuple(wc.shape) and bool((dwc[~mc] == 0).all()), route
        _close(dwc, rdwc, dtype, f"conv dw via {route}")


def test_small_cache_resident_linear_goes_dense_at_many_rows(cb):
    """float32 Linear weights <= 512K elements with >= 128 rows: dense GEMMs win from 20-30 % density
    (2:4 too); large weights or few rows keep the sparse kernels."""
    if cb.ext.describe()["isa"] == "generic":
        pytest.skip("the portable kernels have their own thresholds")
    assert cb.prefer_dense_reason(_q(shape=(1024, 256), pattern="2:4", m_rows=256, density=None)) is not None
    assert cb.prefer_dense_reason(_q(shape=(1024, 256), density=0.3, m_rows=256)) is not None
    assert cb.prefer_dense_reason(_q(shape=(1024, 256), pattern="2:4", m_rows=16, density=None)) is None
    assert cb.prefer_dense_reason(_q(shape=(3072, 768), pattern="2:4", m_rows=256, density=None)) is None
    assert cb.prefer_dense_reason(_q(shape=(1024, 256), density=0.1, m_rows=256)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 70), (64, 600), (17, 1000)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_kept_dx_scatter_kernel_and_dw_routes(cb, dtype, shape, density):
    """Kept-values dX through the scatter-style transposed kernel (rows <= SPMM_T_MAX: several column
    blocks, empty rows/columns, bf16), through the transpose read via its value permutation in the
    kernel (<= DX_PERM_MAX rows; also called directly with 1 and 5 rows, below the gather kernels'
    limit) and through the permuted copy above; kept dW through the SDDMM and through the dense GEMM +
    gather — all equal to masked dense."""
    from sparsefast.formats import kept
    from sparsefast.masks import parse_pattern
    g = torch.Generator().manual_seed(int(density * 100) + shape[0])
    n, k = shape
    m = torch.rand(n, k, generator=g) < density
    m[: n // 7] = False           # empty rows
    m[:, : k // 9] = False        # empty columns
    w = torch.randn(n, k, generator=g) * m
    v = kept.gather(w, m).to(dtype)
    p = parse_pattern("unstructured")
    for rows in (2, 17, cb.SPMM_T_MAX, cb.SPMM_T_MAX + 1, cb.DX_PERM_MAX, cb.DX_PERM_MAX + 1):
        dy = torch.randn(rows, n, generator=g).to(dtype)
        x = torch.randn(rows, k, generator=g).to(dtype)
        ref = dy.double() @ w.to(dtype).double()
        _close(cb.kept_linear_dx(dy, v, m, p), ref, dtype, f"dx rows={rows}")
        rdw = kept.gather(dy.double().t() @ x.double(), m)
        _close(cb.kept_linear_dw(dy, x, m, p), rdw, dtype, f"dW rows={rows}")
    t_rowptr, t_col, t_vals, t_bp, csr_b, vperm = cb._kept_dx_fmt(cb._vc(v), m, 1, 100, in_kernel=True)
    assert vperm is not None and t_vals.dtype == dtype
    for rows in (1, 5):
        dy = torch.randn(rows, n, generator=g).to(dtype)
        got = cb.ext.spmm(dy, k, n, t_rowptr, t_col, None, t_vals, 0, 0, None, t_bp, csr_b, vperm)
        _close(got, dy.double() @ w.to(dtype).double(), dtype, f"dx via the permutation, rows={rows}")
    with pytest.raises(RuntimeError, match="one entry per value"):
        cb.ext.spmm(dy, k, n, t_rowptr, t_col, None, torch.cat([t_vals, t_vals.new_zeros(1)]),
                    0, 0, None, t_bp, csr_b, vperm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,chunk", [((300, 70), 700), ((64, 600), 1), ((129, 33), 33 * 16)])
def test_kept_dense_dw_in_row_blocks(cb, monkeypatch, dtype, shape, chunk):
    """The dense-GEMM weight gradient gathered a block of output rows at a time (DW_CHUNK entries: several
    blocks, a short last block, the 16-row minimum) equals masked dense dW, at 2:4 and dense masks."""
    from sparsefast.formats import kept
    monkeypatch.setattr(type(cb), "DW_CHUNK", chunk)
    monkeypatch.setattr(type(cb), "_dense_dw", lambda self, *a, **k: True)
    g = torch.Generator().manual_seed(shape[0])
    n, k = shape
    for m in (nm_mask(torch.randn(n, k - k % 4 or 4, generator=g), 2, 4), torch.rand(n, k, generator=g) < 0.6):
        p = parse_pattern("unstructured")
        dy = torch.randn(40, m.shape[0], generator=g).to(dtype)
        x = torch.randn(40, m.shape[1], generator=g).to(dtype)
        got = cb.kept_linear_dw(dy, x, m, p)
        want = kept.gather(dy.double().t() @ x.double(), m)
        _close(got, want, dtype, f"chunked dW {tuple(m.shape)}")
