"""Triton unstructured backend (sparsefast.backends.triton.unstructured) against the float64 masked-dense
reference. On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so
shapes are tiny; GPU-only tests are marked ``gpu``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsefast.backends.base import ConvParams, OpQuery
from sparsefast.formats import unstructured as fu
from sparsefast.masks import parse_pattern, reduction_view

U = pytest.importorskip("sparsefast.backends.triton.unstructured")
from sparsefast.backends.triton import interpreting  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

PAT = parse_pattern("unstructured")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (8e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(shape, density, seed=0, skew=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    if skew and shape[0] > 2 and 0 < density < 1:
        m[0] = False   # an empty row
        m[1] = True    # an all-kept row
    return m.to(DEV)


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(want[torch.isfinite(want)].abs().max())) if torch.isfinite(want).any() else 1.0
    torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture
def impl():
    return U.Impl()


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setattr(U, "_path_override", request.param)
    return request.param


# ------------------------------------------------------------------------------------------------
# format built by the Triton kernels == the reference format
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (17, 64), (33, 130)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_index_and_pack_match_reference(impl, shape, density):
    m = _mask(shape, density, seed=shape[1])
    w = _rand(*shape, seed=1)
    p = impl.pack(w, m, PAT)
    ref = fu.pack(w.cpu(), m.cpu())
    assert torch.equal(p.index.bitmap.cpu(), ref.index.bitmap)
    assert torch.equal(p.index.chunkptr.cpu(), ref.index.chunkptr)
    assert p.index.nnz == ref.index.nnz
    assert torch.equal(p.values.cpu(), ref.values)
    rl = impl._row_lists(m, "fwd")
    assert torch.equal(rl.cols.long().cpu(), m.cpu().nonzero()[:, 1])
    counts = m.sum(1)[rl.perm.long()]
    assert (counts[:-1] >= counts[1:]).all() and sorted(rl.perm.tolist()) == list(range(shape[0]))


def test_transposed_and_conv_views_match_reference(impl):
    m = _mask((9, 70), 0.3)
    w = _rand(9, 70).t().contiguous().t()   # column-major weight
    pt = impl._packed_view(w, m, "t")
    ref = fu.pack(w.t().cpu(), m.t().cpu())
    assert torch.equal(pt.index.bitmap.cpu(), ref.index.bitmap) and torch.equal(pt.values.cpu(), ref.values)
    for groups in (1, 3):
        wc = _rand(6, 4, 3, 2, seed=2)
        mc = _mask(wc.shape, 0.4, seed=3)
        p = impl.pack(wc, mc, PAT)
        assert torch.equal(fu.unpack(p).cpu(), reduction_view(wc * mc).cpu())
        pd = impl._packed_view(wc, mc, "dgrad", groups)
        assert torch.equal(fu.unpack(pd).cpu(), fu.dgrad_view(wc * mc, groups).cpu())


# ------------------------------------------------------------------------------------------------
# Linear: forward, dx, masked dW on both kernel paths
# ------------------------------------------------------------------------------------------------
LINEAR = [  # (M, K, N, density, x non-contiguous)
    (1, 40, 24, 0.1, False),
    (5, 70, 40, 0.3, True),      # K not a multiple of 64, x a strided view
    (20, 64, 33, 0.0, False),    # all pruned, M not a multiple of the tile
    (17, 40, 18, 1.0, True),     # all kept
]


@pytest.mark.parametrize("path", ["gather", "decode"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR, ids=lambda c: "x".join(map(str, c[:3])) + f"-d{c[3]}")
def test_linear(impl, path, dtype, case):
    M, K, N, d, strided = case
    mask = _mask((N, K), d, seed=M)
    w = (_rand(N, K, seed=1) * mask).to(dtype)
    x = _rand(M, 2 * K, dtype=dtype, seed=2)[:, ::2] if strided else _rand(M, K, dtype=dtype, seed=2)
    b = _rand(N, dtype=dtype, seed=3)
    dy = _rand(M, N, dtype=dtype, seed=4)
    wm = (w * mask).double()
    _close(impl.linear_fwd(x, w, mask, b, PAT), F.linear(x.double(), wm, b.double()), dtype, "y")
    _close(impl.linear_fwd(x, w, mask, None, PAT), F.linear(x.double(), wm), dtype, "y (no bias)")
    _close(impl.linear_dx(dy, w, mask, PAT), dy.double() @ wm, dtype, "dx")
    dw = impl.linear_dw(dy, x, mask, PAT)
    _close(dw, (dy.double().t() @ x.double()) * mask, dtype, "dW")
    assert dw.dtype == dtype and dw.shape == (N, K) and (dw[~mask] == 0).all()


@pytest.mark.parametrize("split", [1, 3], ids=["one-program-per-tile", "split-reduction"])
def test_linear_split_paths(impl, monkeypatch, split):
    """Small grids split the reduction (K for fwd, N for dx, M for dW) into fp32 partials."""
    monkeypatch.setattr(U, "_path_override", "decode")
    monkeypatch.setattr(U, "_split", lambda programs, steps, device, min_steps=4: min(split, steps))
    M, K, N = 40, 200, 40
    mask = _mask((N, K), 0.2)
    w, x, dy, b = _rand(N, K, seed=1) * mask, _rand(M, K, seed=2), _rand(M, N, seed=3), _rand(N, seed=4)
    wm = (w * mask).double()
    _close(impl.linear_fwd(x, w, mask, b, PAT), F.linear(x.double(), wm, b.double()), torch.float32, "y")
    _close(impl.linear_dx(dy, w, mask, PAT), dy.double() @ wm, torch.float32, "dx")
    _close(impl.linear_dw(dy, x, mask, PAT), (dy.double().t() @ x.double()) * mask, torch.float32, "dW")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("path", ["gather", "decode"], indirect=True)
def test_nan_inf_like_reference(impl, path):
    N, K = 12, 40
    mask = _mask((N, K), 0.3)
    mask[:, 5] = False
    mask[:3, 9] = True
    w = _rand(N, K) * mask
    x = _rand(4, K)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")                             # pruned in every row -> row 1 all NaN
    x[2, 9] = float("inf")                             # kept by rows 0..2 -> +-Inf there, NaN elsewhere
    x[3, 9], x[3, 10] = float("inf"), -float("inf")    # two infinities in one row
    y = impl.linear_fwd(x, w, mask, None, PAT)
    ry = F.linear(x.double(), (w * mask).double())
    assert torch.equal(torch.isnan(y), torch.isnan(ry))
    assert torch.equal(torch.isinf(y), torch.isinf(ry)) and torch.equal(y[torch.isinf(y)], ry[torch.isinf(ry)].float())
    fin = torch.isfinite(ry)
    _close(y[fin], ry[fin], torch.float32, "finite part")


# ------------------------------------------------------------------------------------------------
# Conv2d (implicit GEMM): forward, input gradient (dgrad view), masked dW
# ------------------------------------------------------------------------------------------------
CONV = [  # (B, C, H, W, O, (kh, kw), stride, padding, dilation, groups, dtype, channels_last)
    (2, 8, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, False),
    (1, 8, 7, 5, 8, (3, 3), (2, 2), (0, 0), (1, 1), 2, torch.bfloat16, True),
    (2, 4, 7, 7, 6, (1, 3), (1, 1), (0, 2), (2, 2), 1, torch.float16, False),
    (1, 6, 9, 8, 6, (3, 2), (2, 3), (1, 0), (1, 2), 3, torch.float32, True),
    (1, 96, 3, 4, 64, (1, 2), (1, 2), (0, 1), (1, 1), 1, torch.bfloat16, False),  # >= 64 channels per group
]


@pytest.mark.parametrize("case,split", [(c, None) for c in CONV] + [(CONV[0], 3)],
                         ids=[f"k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}-{str(c[10])[6:]}" for c in CONV] + ["split3"])
def test_conv2d(impl, monkeypatch, case, split):
    if split is not None:  # force the split-reduction paths (fp32 partials)
        monkeypatch.setattr(U, "_split", lambda programs, steps, device, min_steps=4: min(split, steps))
    B, C, H, W, O, (kh, kw), s, p, dil, g, dtype, cl = case
    conv = ConvParams(s, p, dil, g)
    mask = _mask((O, C // g, kh, kw), 0.3, seed=O)
    w = (_rand(O, C // g, kh, kw, seed=1) * mask).to(dtype)
    x = _rand(B, C, H, W, dtype=dtype, seed=2)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    b = _rand(O, dtype=dtype, seed=3)
    wm = (w * mask).double()
    ry = F.conv2d(x.double(), wm, b.double(), s, p, dil, g)
    y = impl.conv_fwd(x, w, mask, b, PAT, conv)
    assert y.shape == ry.shape and y.dtype == dtype
    _close(y, ry, dtype, "conv y")
    dy = _rand(*ry.shape, dtype=dtype, seed=4)
    rdx = torch.nn.grad.conv2d_input(list(x.shape), wm, dy.double(), s, p, dil, g)
    _close(impl.conv_dx(dy, w, mask, PAT, conv, x.shape), rdx, dtype, "conv dx")
    rdw = torch.nn.grad.conv2d_weight(x.double(), list(w.shape), dy.double(), s, p, dil, g) * mask
    dw = impl.conv_dw(dy, x, mask, PAT, conv, w.shape)
    _close(dw, rdw, dtype, "conv dW")
    assert (dw[~mask] == 0).all()


@pytest.mark.parametrize("tie_last", [False, True], ids=["tie-first-axis", "tie-last-axis"])
def test_row_layout_helpers_either_triton_rule(impl, monkeypatch, tie_last):
    """``_load_rows`` / ``_store_rows`` (gathered tiles laid out along their rows on every Triton
    version) give the same values through either branch: the one compiled for Triton <= 3.6
    (plain load / store) and the one for >= 3.7 (transposed). The interpreter runs both here."""
    if not interpreting():
        pytest.skip("the interpreter reads the module constant per call; compiled kernels cache it")
    import triton.language as tl

    from sparsefast.backends.triton import _unstructured_kernels as K
    monkeypatch.setattr(K, "_TIE_LAST", tl.constexpr(tie_last))
    monkeypatch.setattr(U, "_path_override", "decode")
    M, K_, N = 5, 70, 24
    mask = _mask((N, K_), 0.4)
    w, x, dy = _rand(N, K_, seed=1) * mask, _rand(M, K_, seed=2), _rand(M, N, seed=3)
    wm = (w * mask).double()
    _close(impl.linear_fwd(x, w, mask, None, PAT), F.linear(x.double(), wm), torch.float32, "y")
    _close(impl.linear_dx(dy, w, mask, PAT), dy.double() @ wm, torch.float32, "dx")
    B, C, H, W, O, (kh, kw), s, p, dil, g, dtype, _ = CONV[0]
    conv = ConvParams(s, p, dil, g)
    cmask = _mask((O, C // g, kh, kw), 0.3, seed=O)
    cw, cx = _rand(O, C // g, kh, kw, seed=1) * cmask, _rand(B, C, H, W, seed=2)
    cwm = (cw * cmask).double()
    ry = F.conv2d(cx.double(), cwm, None, s, p, dil, g)
    _close(impl.conv_fwd(cx, cw, cmask, None, PAT, conv), ry, dtype, "conv y")
    cdy = _rand(*ry.shape, seed=4)
    rdw = torch.nn.grad.conv2d_weight(cx.double(), list(cw.shape), cdy.double(), s, p, dil, g) * cmask
    _close(impl.conv_dw(cdy, cx, cmask, PAT, conv, cw.shape), rdw, dtype, "conv dW")


# ------------------------------------------------------------------------------------------------
# caching, re-packing, failures
# ------------------------------------------------------------------------------------------------
def test_cache_repack_and_failed_repack(impl, monkeypatch):
    monkeypatch.setattr(U, "_path_override", "decode")
    N, K = 10, 70
    mask = _mask((N, K), 0.3)
    w = _rand(N, K) * mask
    x = _rand(3, K)
    p1 = impl.packed(w, mask, PAT)
    assert impl.packed(w, mask, PAT) is p1                           # no re-pack when nothing changed
    w.add_(1.0)                                                     # optimizer step: values re-gathered
    p2 = impl.packed(w, mask, PAT)
    assert p2 is not p1 and p2.index is p1.index                    # ... the mask-only index is reused
    _close(impl.linear_fwd(x, w, mask, None, PAT), F.linear(x.double(), (w * mask).double()), torch.float32, "y")

    old_dense = fu.unpack(p2).clone()
    mask[2, :7] = ~mask[2, :7]                                      # in-place mask change (set_mask)

    def boom(*a, **k):
        raise RuntimeError("simulated failure while building the index")
    monkeypatch.setattr(U, "build_index", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        impl.linear_fwd(x, w, mask, None, PAT)
    assert torch.equal(fu.unpack(p2), old_dense)                    # the old packing is untouched
    monkeypatch.undo()
    monkeypatch.setattr(U, "_path_override", "decode")
    p3 = impl.packed(w, mask, PAT)
    assert p3.index is not p1.index and p3.index.nnz == int(mask.sum())
    _close(impl.linear_fwd(x, w, mask, None, PAT), F.linear(x.double(), (w * mask).double()), torch.float32, "y")


def test_through_registry_and_autograd():
    import sparsefast.backends as bk
    from sparsefast.ops import sparse_linear
    if "triton" not in bk.available():
        pytest.skip(f"triton backend unavailable: {bk.why_unavailable('triton')}")
    mask = _mask((12, 40), 0.2)
    w = (_rand(12, 40) * mask).requires_grad_(True)
    x = _rand(3, 40).requires_grad_(True)
    sparse_linear(x, w, mask, backend="triton").sum().backward()
    wd, xd = w.detach().double().requires_grad_(True), x.detach().double().requires_grad_(True)
    F.linear(xd, wd * mask).sum().backward()
    _close(x.grad, xd.grad, torch.float32, "dx")
    _close(w.grad, wd.grad * mask, torch.float32, "dW")


# ------------------------------------------------------------------------------------------------
# support, dense preference, ahead-of-time compilation
# ------------------------------------------------------------------------------------------------
def _q(op, shape, m_rows, density=0.1, dtype=torch.bfloat16, device="cuda"):
    return OpQuery(op, torch.device(device), dtype, shape, PAT, m_rows, density,
                   ConvParams() if op == "conv" else None)


def test_prefer_dense_follows_the_cost_model(impl):
    assert impl.prefer_dense_reason(_q("linear", (4096, 4096), 16)) is None          # memory-bound: sparse
    assert impl.prefer_dense_reason(_q("linear", (14336, 4096), 64, 0.3)) is None
    for m in (4096, 8192):                                                             # compute-bound: dense
        r = impl.prefer_dense_reason(_q("linear", (4096, 4096), m))
        assert r is not None and "dense" in r and f"M={m}" in r
    assert impl.prefer_dense_reason(_q("conv", (256, 256, 3, 3), 256 * 56 * 56)) is not None
    assert impl.prefer_dense_reason(_q("linear", (4096, 4096), 16, 0.95)) is not None  # nearly dense
    assert impl.prefer_dense_reason(_q("linear", (4096, 4096), 16, device="cpu")) is None
    t_dense, t_sparse = U._cost_model(_q("linear", (4096, 4096), 16, 0.1))
    assert t_sparse < t_dense


def test_explain_compute_bound_90_percent_says_why_dense():
    """explain() on a compute-bound 90 %-sparse Linear names the bound and the reason dense wins."""
    from sparsefast import backends
    text = backends.explain(_q("linear", (4096, 4096), 8192, 0.1))
    line = next(l for l in text.splitlines() if "triton:" in l)
    assert "dense-faster" in line and "compute-bound" in line and "M=8192" in line
    assert "skip no multiply-adds" in line and "roofline ceiling" in line and "masked-dense" in line
    assert "-> reference: chosen" in text
    mem = U.Impl().prefer_dense_reason(_q("linear", (4096, 4096), 16, 0.95))
    assert "bound by memory traffic" in mem and "compute-bound" not in mem


def test_not_supported_reasons(impl):
    assert impl.not_supported_reasons(_q("linear", (64, 64), 8)) == []
    assert "2-D" in impl.not_supported_reasons(_q("linear", (4, 4, 4), 8))[0]
    assert any("2**31" in r for r in impl.not_supported_reasons(_q("linear", (65536, 65536), 8)))
    assert any("exceeds" in r for r in impl.not_supported_reasons(_q("linear", (4096, 4096), 2**20)))


def test_aot_specs_are_complete():
    specs = U.aot_compile_configs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    kernels = {s.kernel for s in specs}
    assert {U._fwd_kernel, U._dx_kernel, U._dw_kernel, U._gather_kernel, U._xt_kernel, U._index_kernel,
            U._pack_kernel} <= kernels
    for s in specs:
        assert list(s.signature) == list(s.kernel.arg_names)
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)
        assert set(s.options) == {"num_warps", "num_stages"}


def test_aot_specs_cover_what_the_launchers_run(monkeypatch):
    """The kernel report compiles exactly the variants the launchers pick on a GPU (row block BM from
    M, configs kept by the spill-free pruning), and each carries a valid, truthful ``expect``."""
    from sparsefast.kernel_report import validate_expect
    monkeypatch.setattr(U, "interpreting", lambda: False)  # GPU-side config choice
    specs = {s.name: s for s in U.aot_compile_configs()}
    tag = lambda c: f"BN{c.kwargs['BN']}-w{c.num_warps}s{c.num_stages}"  # noqa: E731
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        t, fp32 = U._TY[dt], U._fma_dot(dt)
        for M in (1, 16, 17, 40, 64, 65, 300, 8192):
            bm = U._bm(M, U._mm_cap(dt))
            for kind, names in (("fwd", ("fwd-linear", "fwd-conv", "fwd-dgrad")), ("dx", ("dx",))):
                kept = [c for c in U._gemm_configs(kind) if U._keep_config(bm, c, fp32, kind)]
                assert kept
                for c in kept:
                    for n in names:
                        assert f"{n}-{t}-BM{bm}-{tag(c)}" in specs
            b = U._bm(M, U._dw_cap(dt))
            kept = [c for c in U._gemm_configs("dw") if U._keep_config(b, c, fp32, "dw")]
            assert kept
            for c in kept:
                for n in ("dw-linear", "dw-conv"):
                    assert f"{n}-{t}-BM{b}-{tag(c)}" in specs
            if M <= 64:
                bmx = U._gather_rows(M)
                assert f"xt-{t}-BMX{bmx}" in specs
                for c in U._gemm_configs("gather"):
                    assert f"gather-{t}-BMX{bmx}-BR{c.kwargs['BR']}-w{c.num_warps}s{c.num_stages}" in specs
    for name, s in specs.items():
        exp, errs = validate_expect(s.expect)
        assert exp and not errs, (name, errs)
        if name.startswith(("fwd", "dx", "dw")):
            assert exp["hot"] and exp["tensor_core"] == ("fp32" not in name), name
        if name.startswith(("gather", "xt")):
            assert exp["tensor_core"] is False and exp["hot"], name


_AOT_SCRIPT = textwrap.dedent("""
    import re, triton
    from triton.backends.compiler import GPUTarget
    from sparsefast.backends.triton import unstructured as U
    want = {"fwd-linear-bf16-BM16-BN64-w4s3", "fwd-conv-bf16-BM128-BN128-w8s4", "gather-bf16-BMX16-BR64-w4s2",
            "dw-linear-bf16-BM64-BN128-w8s3"}
    for s in U.aot_compile_configs():
        if s.name not in want:
            continue
        for cc in (90, 80):
            ck = triton.compile(triton.compiler.ASTSource(fn=s.kernel, signature=s.signature,
                                                          constexprs=s.constexprs, attrs=s.attrs),
                                target=GPUTarget("cuda", cc, 32), options=s.options)
            ptx = ck.asm["ptx"]
            tc = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
            print(s.name, cc, tc, "local" if re.search(r"\\.local", ptx) else "nolocal")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA toolchain ships for Linux")
def test_aot_compile_sm90_sm80():
    """Kernels compile ahead of time for Hopper and Ampere without a GPU; tensor-core kernels use
    wgmma (sm_90, 128-row tiles) / mma.sync, with no local-memory spills."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(((l.split()[0], int(l.split()[1])), l.split()[2:]) for l in r.stdout.splitlines())
    assert len(lines) == 8
    assert lines[("fwd-conv-bf16-BM128-BN128-w8s4", 90)][0] == "wgmma"
    assert lines[("dw-linear-bf16-BM64-BN128-w8s3", 90)][0] == "wgmma"
    assert lines[("fwd-linear-bf16-BM16-BN64-w4s3", 80)][0] == "mma"
    assert lines[("gather-bf16-BMX16-BR64-w4s2", 90)][0] == "none"
    assert all(v[1] == "nolocal" for v in lines.values())


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 300])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_gpu_linear_large(impl, M, density):
    N, K = 1024, 2048
    mask = _mask((N, K), density)
    w = (_rand(N, K) * mask).to(torch.bfloat16)
    x, dy = _rand(M, K, dtype=torch.bfloat16, seed=2), _rand(M, N, dtype=torch.bfloat16, seed=3)
    wm = (w * mask).double()
    _close(impl.linear_fwd(x, w, mask, None, PAT), x.double() @ wm.t(), torch.bfloat16, "y")
    _close(impl.linear_dx(dy, w, mask, PAT), dy.double() @ wm, torch.bfloat16, "dx")
    _close(impl.linear_dw(dy, x, mask, PAT), (dy.double().t() @ x.double()) * mask, torch.bfloat16, "dW")


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(impl):
    """After the first call has built the packing, a forward is capturable (no host sync)."""
    mask = _mask((512, 512), 0.1)
    w = (_rand(512, 512) * mask).half()
    x = _rand(16, 512, dtype=torch.float16)
    impl.linear_fwd(x, w, mask, None, PAT)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = impl.linear_fwd(x, w, mask, None, PAT)
    x.copy_(_rand(16, 512, dtype=torch.float16, seed=9))
    g.replay()
    _close(y, x.double() @ (w * mask).double().t(), torch.float16, "graph replay")


def test_fp32_configs_that_spill_on_the_running_triton_are_never_candidates(monkeypatch):
    """Triton 3.9 spills 8 B/thread in four small fp32 configs (``U._FP32_SPILLS``): no launcher pruning and no
    AOT spec keeps them there, and every kind keeps other candidates at that row block; older versions
    keep them (they compile cleanly there)."""
    from sparsefast.backends.triton import triton_version
    monkeypatch.setattr(U, "interpreting", lambda: False)  # GPU-side config lists
    assert (len(U._FP32_SPILLS) == 4) == (triton_version() >= (3, 9))
    names = {s.name for s in U.aot_compile_configs()}
    for kind, bm, bn, w, st in U._FP32_SPILLS:
        cfgs = [c for c in U._gemm_configs(kind) if c.kwargs.get("BN") == bn and c.num_warps == w and c.num_stages == st]
        assert cfgs, (kind, bn, w, st)
        assert not any(U._keep_config(bm, c, True, kind) for c in cfgs)
        assert any(U._keep_config(bm, c, True, kind) for c in U._gemm_configs(kind))
        assert not any(f"-fp32-BM{bm}-BN{bn}-w{w}s{st}" in n and n.startswith(kind) for n in names)

