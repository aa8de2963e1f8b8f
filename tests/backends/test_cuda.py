"""Tests of the ``cuda`` backend.

CPU (always run): the SF24 layout in C++ (``tests/csrc``, built with g++) against the Python mirror
(``sparsefast.formats.sm_meta``) bit for bit, an emulated ``mma.sp`` over the packed buffers, the conv
implicit-GEMM index arithmetic against ``F.conv2d``, the CSR structures, availability messages, routing,
and the backend's Python wiring run over a torch stand-in for ``sparsefast._C`` with the same signatures.

GPU (``-m gpu``; skipped without a CUDA device or when the extension cannot build): the real kernels
against the reference backend on random shapes, dtypes, patterns, the pack kernel bit-exact against the
mirror, float32 split tolerance and CUDA-graph capture.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsefast import masks
from sparsefast.backends.base import ConvParams, OpQuery
from sparsefast.backends.cuda import CudaBackend, build_csr, fits_24
from sparsefast.backends.reference import ReferenceBackend
from sparsefast.formats import sm_meta
from sparsefast.masks import parse_pattern

ROOT = Path(__file__).resolve().parents[2]
CSRC_TEST = ROOT / "tests" / "csrc" / "test_sf_layout.cpp"
INCLUDE = ROOT / "csrc" / "include"
GXX = shutil.which("g++") or shutil.which("c++")


def _rand_24(R: int, C: int, g: torch.Generator, invalid: bool = False) -> torch.Tensor:
    """Random mask with mostly 2 kept per group of 4; some groups keep 0/1 (and 3 if ``invalid``)."""
    scores = torch.rand(R, C, generator=g)
    m = masks.nm_mask(scores, 2, 4)
    drop = torch.rand(R, C, generator=g) < 0.1
    m &= ~drop
    if invalid:
        extra = torch.rand(R, C, generator=g) < 0.05
        m |= extra
    return m


def _first_two_kept(mask: torch.Tensor) -> torch.Tensor:
    """What SF24 stores for a possibly invalid mask: the first two kept entries of every group."""
    R, C = mask.shape
    g = mask.reshape(R, C // 4, 4).long()
    return (g.cumsum(-1) <= 2).logical_and(g.bool()).reshape(R, C)


# ================================================================================================
# C++ layout functions (g++ build)
# ================================================================================================
@pytest.fixture(scope="module")
def layout_lib(tmp_path_factory):
    if GXX is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    d = tmp_path_factory.mktemp("sf_layout")
    so = d / "libsf_layout.so"
    subprocess.run([GXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-DSF_NO_MAIN", f"-I{INCLUDE}", str(CSRC_TEST),
                    "-o", str(so)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    lib.sf_rows_padded.restype = ctypes.c_int64
    lib.sf_cols_padded.restype = ctypes.c_int64
    lib.sf_meta_words.restype = ctypes.c_int64
    for f in (lib.sf_rows_padded, lib.sf_cols_padded):
        f.argtypes = [ctypes.c_int64]
    lib.sf_meta_words.argtypes = [ctypes.c_int64, ctypes.c_int64]
    return lib


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _cpp_pack(lib, w: torch.Tensor, m: torch.Tensor):
    R, C = w.shape
    Rp, Cp = lib.sf_rows_padded(R), lib.sf_cols_padded(C)
    vals = torch.full((Rp, Cp // 2), -7.0)
    meta = torch.zeros(lib.sf_meta_words(R, C), dtype=torch.int32)
    w32, m8 = w.float().contiguous(), m.to(torch.uint8).contiguous()
    lib.sf_pack(_ptr(w32), _ptr(m8), ctypes.c_int64(R), ctypes.c_int64(C), _ptr(vals), _ptr(meta))
    return vals, meta


def test_cpp_layout_selfcheck(tmp_path):
    if GXX is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    exe = tmp_path / "test_sf_layout"
    subprocess.run([GXX, "-O1", "-std=c++17", "-Wall", "-Werror", f"-I{INCLUDE}", str(CSRC_TEST), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("0 failed"), r.stdout


@pytest.mark.parametrize("R,C", [(16, 32), (20, 36), (64, 128), (70, 100), (129, 260), (3, 4)])
def test_cpp_pack_matches_python_mirror(layout_lib, R, C):
    g = torch.Generator().manual_seed(R * 1000 + C)
    w = torch.randn(R, C, generator=g)
    m = _rand_24(R, C, g, invalid=True)
    v_cpp, meta_cpp = _cpp_pack(layout_lib, w, m)
    v_py, meta_py = sm_meta.pack(w, m)
    assert torch.equal(meta_cpp, meta_py)
    assert torch.equal(v_cpp, v_py)
    # decode (C++ element-wise addressing) == python unpack == the first two kept entries
    back = torch.empty(R, C)
    layout_lib.sf_unpack(_ptr(v_cpp), _ptr(meta_cpp), ctypes.c_int64(R), ctypes.c_int64(C), _ptr(back))
    want = w * _first_two_kept(m)
    assert torch.equal(back, want)
    assert torch.equal(sm_meta.unpack(v_py, meta_py, R, C), want)


@pytest.mark.parametrize("R,C", [(16, 32), (48, 96), (40, 200)])
def test_emulated_mma_sp_matches_dense(layout_lib, R, C):
    g = torch.Generator().manual_seed(7 + R + C)
    w = torch.randn(R, C, generator=g)
    m = _rand_24(R, C, g)
    vals, meta = sm_meta.pack(w, m)
    Cp = vals.shape[1] * 2
    n = 16
    B = torch.zeros(Cp, n)
    B[:C] = torch.randn(C, n, generator=g)
    ref = (w * m).double() @ B[:C].double()
    # python emulation (register by register) and the C++ one built on the header's fragment helpers
    assert torch.allclose(sm_meta.emulate_mma_sp_gemm(vals, meta, R, B), ref, atol=1e-9)
    D = torch.zeros(R, n, dtype=torch.float64)
    layout_lib.sf_emulate_gemm(_ptr(vals.contiguous()), _ptr(meta), ctypes.c_int64(R), ctypes.c_int64(C),
                               _ptr(B.contiguous()), ctypes.c_int64(n), _ptr(D))
    assert torch.allclose(D, ref, atol=1e-9)


@pytest.mark.parametrize("shape", [
    # N, H, W, C, O, KH, KW, SH, SW, PH, PW, DH, DW
    (2, 7, 6, 8, 4, 3, 2, 2, 1, 1, 0, 2, 1),
    (1, 5, 5, 16, 3, 3, 3, 1, 1, 1, 1, 1, 1),
    (2, 9, 4, 8, 5, 1, 1, 2, 2, 0, 0, 1, 1),
])
def test_conv_implicit_gemm_offsets_match_conv2d(layout_lib, shape):
    """The kernel's (k, p) -> NHWC offset map, used as an im2col gather against reduction_view(W),
    reproduces F.conv2d: the reduction order (kh, kw, c) matches masks.reduction_view."""
    N, H, W, C, O, KH, KW, SH, SW, PH, PW, DH, DW = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    wt = torch.randn(O, C, KH, KW, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, wt, stride=(SH, SW), padding=(PH, PW), dilation=(DH, DW))
    HO, WO = ref.shape[-2:]
    K, P = KH * KW * C, N * HO * WO
    off = torch.empty(K * P, dtype=torch.int64)
    arr = (ctypes.c_int * 14)(N, H, W, C, O, KH, KW, SH, SW, PH, PW, DH, DW, 0)
    layout_lib.sf_conv_offsets(arr, _ptr(off))
    off = off.reshape(K, P)
    x_nhwc = x.permute(0, 2, 3, 1).reshape(-1)
    B = torch.where(off >= 0, x_nhwc[off.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    y = masks.reduction_view(wt) @ B                       # (O, P), P = (n, oh, ow)
    assert torch.allclose(y.reshape(O, N, HO, WO).permute(1, 0, 2, 3), ref, atol=1e-10)


# ================================================================================================
# Python mirror
# ================================================================================================
@pytest.mark.parametrize("R,C", [(1, 4), (16, 64), (33, 68), (100, 36)])
def test_mirror_roundtrip_and_legal_codes(R, C):
    g = torch.Generator().manual_seed(R + C)
    w = torch.randn(R, C, generator=g).to(torch.bfloat16)
    m = _rand_24(R, C, g)
    vals, meta = sm_meta.pack(w, m)
    Rp, Cp = sm_meta.padded_shape(R, C)
    assert vals.shape == (Rp, Cp // 2) and vals.dtype == torch.bfloat16
    assert meta.numel() == Rp // 16 * (Cp // 32) * 16 and meta.dtype == torch.int32
    assert torch.equal(sm_meta.unpack(vals, meta, R, C), w * m)
    words = meta.long() & 0xFFFFFFFF
    nibs = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], 1)
    assert bool(((nibs & 3) < (nibs >> 2)).all()), "every nibble must hold idx0 < idx1"
    # a few entries through the documented addressing formulas
    for r, c in [(0, 0), (R - 1, C - 4), (R // 2, (C // 8) * 4)]:
        word = int(meta[sm_meta.meta_word(r, c, Cp)]) & 0xFFFFFFFF
        nib = (word >> sm_meta.meta_bit(r, c)) & 0xF
        got = torch.zeros(4, dtype=torch.bfloat16)
        for s in range(2):
            got[(nib >> (2 * s)) & 3] += vals[r, (c // 4) * 2 + s]
        assert torch.equal(got, (w * m)[r, c:c + 4])


def test_encode_group_table():
    legal = {0x4, 0x8, 0xC, 0x9, 0xD, 0xE}
    for k in range(16):
        nib, src = sm_meta.encode_group(k)
        assert nib in legal
        kept = [j for j in range(4) if (k >> j) & 1][:2]
        assert sorted(s for s in src if s >= 0) == kept


def test_build_csr_and_transposed_mapping():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g)
    m = torch.rand(37, 50, generator=g) < 0.2
    csr = build_csr(m)
    ref = (w * m).to_sparse_csr()
    assert torch.equal(csr.row_ptr.long(), ref.crow_indices())
    assert torch.equal(csr.col.long() & 0xFFFF, ref.col_indices())
    assert torch.equal(w.reshape(-1)[csr.flat], (w * m)[m])
    assert sorted(csr.row_order.tolist()) == list(range(37))
    counts = m.sum(1)[csr.row_order.long()]
    assert bool((counts[:-1] >= counts[1:]).all())
    # transposed structure: values of (W*M)^T in its CSR order, gathered from W's storage
    b = CudaBackend()
    ct = b._csr_t(m)
    reft = (w * m).t().contiguous().to_sparse_csr()
    assert torch.equal(ct.row_ptr.long(), reft.crow_indices())
    assert torch.equal(ct.col.long() & 0xFFFF, reft.col_indices())
    assert torch.equal(w.reshape(-1)[ct.flat], reft.values())


def test_u16_columns_above_32767():
    m = torch.zeros(2, 40000, dtype=torch.bool)
    m[0, 39999] = True
    m[1, 32768] = True
    csr = build_csr(m)
    assert (csr.col.long() & 0xFFFF).tolist() == [39999, 32768]


# ================================================================================================
# availability, build script, routing
# ================================================================================================
def test_unavailable_reason_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = CudaBackend().unavailable_reason()
    assert r and ("CPU-only" in r or "no CUDA device" in r)
    from sparsefast import backends
    backends._reset_for_tests()
    assert backends.why_unavailable("cuda") == r
    with pytest.raises(RuntimeError, match="cuda"):
        backends.get("cuda")


def test_build_script_standalone(tmp_path):
    """_build_cuda.py is exec'd standalone by setup.py: it must not import the sparsefast package."""
    import importlib.util
    src = ROOT / "sparsefast" / "_build_cuda.py"
    assert "from sparsefast" not in src.read_text() and "import sparsefast" not in src.read_text()
    spec = importlib.util.spec_from_file_location("_standalone_build_cuda", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert all(Path(s).exists() for s in mod.sources(ROOT))
    if torch.version.cuda is None:
        assert mod.extensions(ROOT) == []
        assert "CPU-only" in mod.why_not_buildable()
        with pytest.raises(ImportError, match="CPU-only"):
            mod._loaded = None
            mod.load()


def test_kernel_report_annotations_are_valid():
    """The ``// kernel-report:`` lines of csrc/ parse, use only known keys, and cover every kernel family
    with the claims CI checks on the built extension (.ci/compile_cuda.sh)."""
    from sparsefast import kernel_report as kr
    ann = kr.csrc_annotations(ROOT / "csrc")
    assert ann, "no kernel-report annotations in csrc/"
    for rx, exp, where in ann:
        _, errs = kr.validate_expect(exp)
        assert not errs, (where, errs)
    want = {
        "sf24_gemm_kernel<bf16,bf16,Cfg<128,128,64,2,4,1,3>,false>": dict(tensor_core="sparse", hot=True,
                                                                           vector_loads=True, dyn_smem=89088),
        "sf24_gemm_kernel<fp16,fp16,Cfg<16,32,256,1,1,4,4>,true>": dict(tensor_core="sparse", dyn_smem=87040),
        "sf24_gemm_kernel<bf16,fp32,Cfg<64,64,64,2,2,1,4>,true>": dict(hot=True, dyn_smem=59392),
        "sf24_gemm_sm90_kernel<bf16,bf16,false>": dict(archs=[90], tensor_core="sparse", wgmma=True, hot=True,
                                                        dyn_smem=139264),
        "csr_spmm_kernel<bf16,16>": dict(vector_loads=True, hot=True),
        "csr_sddmm_kernel<fp32,1>": dict(vector_loads=True, hot=True),
        "sf24_pack_kernel<bf16>": dict(hot=True),
    }
    for name, sub in want.items():
        exp, errs = kr.match_annotations(ann, name)
        assert not errs and {k: exp.get(k) for k in sub} == sub, (name, exp)
    assert kr.match_annotations(ann, "sf24_unpack_kernel<bf16>")[0] == {"packed_stores": True}
    # 16-bit GEMM epilogues store packed pairs (issue 15), checked on every instantiation
    for name in ("sf24_gemm_kernel<bf16,bf16,Cfg<128,128,64,2,4,1,3>,false>", "sf24_gemm_sm90_kernel<fp16,fp16,true>"):
        assert kr.match_annotations(ann, name)[0].get("packed_stores") is True, name


def _backend_with_cap(cap=(9, 0)) -> CudaBackend:
    b = CudaBackend()
    b._cap[0] = cap
    return b


def _q(op="linear", ws=(1024, 1024), pat="2:4", dtype=torch.bfloat16, m=4096, density=None, conv=None):
    return OpQuery(op, torch.device("cuda", 0), dtype, tuple(ws), parse_pattern(pat), m, density, conv)


def test_not_supported_reasons():
    b = _backend_with_cap()
    assert b.not_supported_reasons(_q()) == []
    assert b.not_supported_reasons(_q(pat="1:4")) == []
    assert any("4:8" in r for r in b.not_supported_reasons(_q(pat="4:8")))
    assert any("float64" in r for r in b.not_supported_reasons(_q(dtype=torch.float64)))
    assert any("cpu" in r for r in b.not_supported_reasons(
        OpQuery("linear", torch.device("cpu"), torch.float16, (64, 64), parse_pattern("2:4"))))
    assert any("groups" in r for r in b.not_supported_reasons(
        _q("conv", (64, 16, 3, 3), conv=ConvParams(groups=2))))
    assert any("% 8" in r for r in b.not_supported_reasons(_q("conv", (64, 12, 3, 3), conv=ConvParams())))
    assert b.not_supported_reasons(_q("conv", (64, 16, 3, 3), conv=ConvParams())) == []
    # unstructured conv2d: im2col + CSR SpMM, any groups/stride/padding/dilation; 16-bit column limit
    assert b.not_supported_reasons(_q("conv", (64, 16, 3, 3), pat="unstructured", conv=ConvParams())) == []
    assert b.not_supported_reasons(_q("conv", (64, 1, 3, 3), pat="unstructured", conv=ConvParams(groups=64))) == []
    assert any("16-bit" in r for r in b.not_supported_reasons(
        _q("conv", (64, 8192, 3, 3), pat="unstructured", conv=ConvParams())))
    assert any("16-bit" in r for r in b.not_supported_reasons(
        _q("conv", (64, 1024, 3, 3), pat="unstructured", conv=ConvParams(groups=8))))  # 8192*9 im2col rows
    assert any("grid limit" in r for r in b.not_supported_reasons(
        _q("conv", (64, 16, 3, 3), pat="unstructured", dtype=torch.float32, m=10**7, conv=ConvParams())))
    assert any("16-bit" in r for r in b.not_supported_reasons(_q(ws=(16, 70000), pat="unstructured")))
    assert any("sm_75" in r for r in _backend_with_cap((7, 5)).not_supported_reasons(_q()))
    assert fits_24(parse_pattern("1:2")) and not fits_24(parse_pattern("unstructured"))


def test_prefer_dense_reason(monkeypatch):
    monkeypatch.delenv("SPARSEFAST_CUDA_NEVER_DENSE", raising=False)
    b = _backend_with_cap()
    assert b.prefer_dense_reason(_q(ws=(4096, 4096))) is None
    assert "1M" in b.prefer_dense_reason(_q(ws=(256, 256)))
    assert b.prefer_dense_reason(_q(ws=(4096, 4096), pat="unstructured", density=0.05, m=16)) is None
    assert b.prefer_dense_reason(_q(ws=(4096, 4096), pat="unstructured", density=0.3, m=16))
    assert b.prefer_dense_reason(_q(ws=(4096, 4096), pat="unstructured", density=0.05, m=8192))
    assert b.prefer_dense_reason(_q(ws=(4096, 4096), pat="unstructured", density=None))
    # unstructured conv: im2col + CUDA-core SpMM loses to cuDNN except at <= 1% density with wide layers
    cq = lambda ws, d, groups=1: _q("conv", ws, pat="unstructured", density=d, m=8192,  # noqa: E731
                                    conv=ConvParams(groups=groups))
    assert "0.01" in b.prefer_dense_reason(cq((256, 256, 3, 3), 0.1))
    assert "cuDNN" in b.prefer_dense_reason(cq((1024, 1024, 3, 3), 0.05))
    assert "output channels" in b.prefer_dense_reason(cq((256, 256, 3, 3), 0.005))
    assert "output channels" in b.prefer_dense_reason(cq((1024, 64, 3, 3), 0.005, groups=16))
    assert b.prefer_dense_reason(cq((1024, 1024, 3, 3), None))
    assert b.prefer_dense_reason(cq((1024, 1024, 3, 3), 0.005)) is None
    monkeypatch.setenv("SPARSEFAST_CUDA_NEVER_DENSE", "1")
    assert b.prefer_dense_reason(_q(ws=(256, 256))) is None
    assert b.prefer_dense_reason(cq((256, 256, 3, 3), 0.5)) is None


# ================================================================================================
# the backend's Python wiring over a torch stand-in for sparsefast._C (same signatures/semantics)
# ================================================================================================
class FakeC:
    """Mirrors csrc/sf_bindings.cpp with plain torch (float64 math), to test cuda.py on CPU."""

    @staticmethod
    def sf24_pack(w, keep):
        return sm_meta.pack(w, keep.to(torch.bool))

    @staticmethod
    def sf24_unpack(vals, meta, R, C):
        return sm_meta.unpack(vals, meta, R, C)

    @staticmethod
    def _dense(vals, meta, R, K):
        return sm_meta.unpack(vals, meta, R, K).double()

    def sf24_linear(self, x, vals, vals_lo, meta, R, bias, path=0):
        K = x.shape[1]
        assert x.dtype == vals.dtype or (x.dtype == torch.float32 and vals_lo is not None)
        W = self._dense(vals, meta, R, K)
        if vals_lo is not None:
            W = W + self._dense(vals_lo, meta, R, K)
        y = x.double() @ W.t()
        if bias is not None:
            y = y + bias.double()
        return y.to(x.dtype)

    def sf24_conv2d(self, x, vals, vals_lo, meta, O, KH, KW, stride, padding, dilation, bias, path=0):
        C = x.shape[1]
        W = self._dense(vals, meta, O, KH * KW * C)
        if vals_lo is not None:
            W = W + self._dense(vals_lo, meta, O, KH * KW * C)
        w4 = masks.from_reduction_view(W, (O, C, KH, KW))
        y = F.conv2d(x.double(), w4, bias.double() if bias is not None else None, stride, padding, dilation)
        return y.to(x.dtype).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _csr_dense(row_ptr, col, vals, R, C):
        W = torch.zeros(R, C, dtype=torch.float64)
        rp = row_ptr.tolist()
        cols = (col.long() & 0xFFFF).clamp(max=C - 1)
        for r in range(R):
            W[r, cols[rp[r]:rp[r + 1]]] = vals[rp[r]:rp[r + 1]].double()
        return W

    def csr_spmm(self, row_ptr, col, vals, row_order, C, xT, M, bias):
        assert xT.is_contiguous() and xT.shape[0] == C and xT.shape[1] % 8 == 0 and xT.shape[1] >= M
        R = row_order.numel()
        W = self._csr_dense(row_ptr, col, vals, R, C)
        yT = torch.zeros(R, xT.shape[1], dtype=torch.float64)
        yT[:, :M] = W @ xT[:, :M].double()
        if bias is not None:
            yT[:, :M] += bias.double()[:, None]
        return yT.to(xT.dtype)

    def csr_sddmm(self, row_ptr, col, row_order, C, aT, bT, M):
        R = row_order.numel()
        full = aT[:, :M].double() @ bT[:, :M].double().t()
        ones = self._csr_dense(row_ptr, col, torch.ones(col.numel()), R, C) != 0
        return (full * ones).to(aT.dtype)


@pytest.fixture
def fake_backend():
    b = CudaBackend()
    b._C = FakeC()
    return b


def _close(a, b, rtol):
    a, b = a.double(), b.double()
    err = (a - b).norm() / b.norm().clamp(min=1e-12)
    assert err < rtol, f"relative error {err:.2e} >= {rtol}"


@pytest.mark.parametrize("pat", ["2:4", "1:4", "unstructured"])
@pytest.mark.parametrize("transposable", [False, True])
def test_linear_wiring_on_cpu(fake_backend, pat, transposable):
    g = torch.Generator().manual_seed(3)
    B, K, N = 9, 40, 24
    x, w, dy = torch.randn(B, K, generator=g), torch.randn(N, K, generator=g), torch.randn(B, N, generator=g)
    bias = torch.randn(N, generator=g)
    p = parse_pattern(pat)
    if pat == "unstructured":
        m = torch.rand(N, K, generator=g) < 0.3
    elif transposable:
        m = masks.transposable_nm_mask(w, 2, 4)
    else:
        m = masks.nm_mask(w, p.n, p.m)
    ref = ReferenceBackend()
    b = fake_backend
    _close(b.linear_fwd(x, w, m, bias, p), ref.linear_fwd(x, w, m, bias, p), 1e-5)
    _close(b.linear_dx(dy, w, m, p), ref.linear_dx(dy, w, m, p), 1e-5)
    dw = b.linear_dw(dy, x, m, p)
    _close(dw, ref.linear_dw(dy, x, m, p), 1e-6)
    assert bool((dw[~m] == 0).all())
    if pat != "unstructured":
        assert b._transposable(m) == (transposable or masks.is_transposable_nm(m, 2, 4))
    # in-place weight update invalidates the packed values (version counter)
    w.mul_(2)
    _close(b.linear_fwd(x, w, m, None, p), ref.linear_fwd(x, w, m, None, p), 1e-5)


def test_conv_wiring_on_cpu(fake_backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 7, 6, generator=g)
    w = torch.randn(8, 16, 3, 3, generator=g)
    bias = torch.randn(8, generator=g)
    m = masks.magnitude_mask(w, "2:4", None)
    p, cp = parse_pattern("2:4"), ConvParams((2, 1), (1, 1), (1, 1), 1)
    ref = ReferenceBackend()
    y = fake_backend.conv_fwd(x, w, m, bias, p, cp)
    _close(y, ref.conv_fwd(x, w, m, bias, p, cp), 1e-5)
    dy = torch.randn_like(y)
    _close(fake_backend.conv_dx(dy, w, m, p, cp, x.shape), ref.conv_dx(dy, w, m, p, cp, x.shape), 1e-6)
    _close(fake_backend.conv_dw(dy, x, m, p, cp, w.shape), ref.conv_dw(dy, x, m, p, cp, w.shape), 1e-6)


def _per_tap_transposable(w: torch.Tensor) -> torch.Tensor:
    """(O, C, KH, KW) mask, 2:4 along C and along O at every kernel position."""
    m = torch.zeros_like(w, dtype=torch.bool)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            m[:, :, i, j] = masks.transposable_nm_mask(w[:, :, i, j], 2, 4)
    return m


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (1, 2, 2), (1, 0, 1), (2, 1, 1)])
def test_conv_dx_transposable_path_on_cpu(fake_backend, stride, padding, dilation):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 16, 9, 8, generator=g)
    w = torch.randn(8, 16, 3, 3, generator=g)
    m = _per_tap_transposable(w)
    p, cp = parse_pattern("2:4"), ConvParams((stride, stride), (padding, padding), (dilation, dilation), 1)
    ref = ReferenceBackend()
    y = ref.conv_fwd(x, w, m, None, p, cp)
    dy = torch.randn(y.shape, generator=g)
    assert fake_backend._conv_dx_sparse_ok(dy, w, m, cp, x.shape) == (stride == 1)
    _close(fake_backend.conv_dx(dy, w, m, p, cp, x.shape), ref.conv_dx(dy, w, m, p, cp, x.shape), 1e-5)
    # a mask that is 2:4 along C only must take the general path
    m2 = masks.magnitude_mask(w, "2:4", None)
    if not masks.is_nm(m2.permute(2, 3, 1, 0).reshape(-1, 8), 2, 4):
        assert not fake_backend._conv_dx_sparse_ok(dy, w, m2, cp, x.shape)
    _close(fake_backend.conv_dx(dy, w, m2, p, cp, x.shape), ref.conv_dx(dy, w, m2, p, cp, x.shape), 1e-5)


def test_float32_split_is_exact_enough(fake_backend):
    """The hi/lo bf16 split of a float32 weight reconstructs it to ~2^-17 relative."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 64, generator=g)
    m = masks.nm_mask(w, 2, 4)
    pk = fake_backend._pack24(w, m)
    assert pk.vals.dtype == torch.bfloat16 and pk.vals_lo is not None
    rec = sm_meta.unpack(pk.vals, pk.meta, 32, 64).float() + sm_meta.unpack(pk.vals_lo, pk.meta, 32, 64).float()
    _close(rec, w * m, 2e-5)


# ================================================================================================
# unstructured conv2d: the Python composition (im2col -> SpMM, SpMM on the transpose -> col2im,
# SDDMM on the im2col matrix) over a torch emulation of the two CSR kernels' contracts
# ================================================================================================
def _csr_dense(csr, vals=None) -> torch.Tensor:
    """Decode an SFCSR structure (+ values) to a dense float64 (R, C) matrix, checking its invariants."""
    R, C = csr.R, csr.C
    assert csr.row_ptr.dtype == torch.int32 and csr.row_ptr.numel() == R + 1 and csr.col.dtype == torch.int16
    assert csr.row_order.dtype == torch.int32 and sorted(csr.row_order.tolist()) == list(range(R))
    cols = csr.col.long() & 0xFFFF
    assert bool((cols < C).all()), "column index out of range"
    rp = csr.row_ptr.long()
    rows = torch.repeat_interleave(torch.arange(R), rp[1:] - rp[:-1])
    W = torch.zeros(R, C, dtype=torch.float64)
    v = torch.ones(cols.numel(), dtype=torch.float64) if vals is None else vals.double()
    assert v.numel() == cols.numel()
    W.index_put_((rows, cols), v, accumulate=True)  # a duplicate entry would show up as a sum
    return W


def _emu_spmm(csr, vals, xT, M, bias):
    """csr_spmm's contract in float64: columns >= M of the result are NaN (the kernel leaves them
    unspecified), so a composition that reads them fails."""
    assert xT.is_contiguous() and xT.dim() == 2 and xT.shape[0] == csr.C, (tuple(xT.shape), csr.C)
    assert xT.shape[1] % 8 == 0 and xT.shape[1] >= M and vals.dtype == xT.dtype
    yT = torch.full((csr.R, xT.shape[1]), float("nan"), dtype=torch.float64)
    yT[:, :M] = _csr_dense(csr, vals) @ xT[:, :M].double()
    if bias is not None:
        assert bias.dtype == xT.dtype and bias.numel() == csr.R
        yT[:, :M] += bias.double()[:, None]
    return yT.to(xT.dtype)


def _emu_sddmm(csr, aT, bT, M):
    """csr_sddmm's contract in float64, summing whole 16-byte vectors past M as the kernel does (so
    padding that is not zero changes the result)."""
    assert aT.is_contiguous() and bT.is_contiguous() and aT.dtype == bT.dtype
    assert aT.shape == (csr.R, aT.shape[1]) and bT.shape == (csr.C, aT.shape[1]) and aT.shape[1] % 8 == 0
    V = 16 // aT.element_size()
    mv = min(-(-M // V) * V, aT.shape[1])
    full = aT[:, :mv].double() @ bT[:, :mv].double().t()
    keep = _csr_dense(csr) != 0
    return torch.where(keep, full, torch.zeros((), dtype=torch.float64)).to(aT.dtype)


@pytest.fixture
def emu_backend(monkeypatch):
    """A CudaBackend whose two CSR kernel calls are the torch emulation; ``_C`` stays None so any other
    kernel call fails loudly."""
    b = CudaBackend()
    monkeypatch.setattr(b, "_spmm", _emu_spmm)
    monkeypatch.setattr(b, "_sddmm", _emu_sddmm)
    return b


# N, C, H, W, O, KH, KW, stride, padding, dilation, groups
UCONV_CASES = [
    (2, 3, 7, 6, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 9, 11, 6, 3, 2, (2, 1), (0, 1), (1, 1), 1),
    (3, 6, 10, 9, 4, 3, 3, (2, 3), (2, 1), (2, 1), 2),
    (2, 8, 8, 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), 8),     # depthwise
    (2, 6, 5, 7, 12, 1, 1, (1, 1), (0, 0), (1, 1), 3),    # grouped pointwise
    (1, 5, 13, 4, 7, 5, 3, (3, 2), (2, 0), (1, 1), 1),    # stride leaves input rows unused
    (2, 4, 6, 6, 8, 2, 2, (2, 2), (0, 0), (1, 1), 4),
    (1, 2, 4, 4, 3, 4, 4, (1, 1), (0, 0), (1, 1), 1),     # 1x1 output
    (1, 16, 12, 10, 9, 3, 3, (1, 2), (3, 3), (3, 2), 1),  # dilation > 1, padding > kernel reach
]


def _uconv_mask(w, g, density, empty_rows=True):
    m = torch.rand(w.shape, generator=g) < density
    if empty_rows and w.shape[0] > 1:
        m[1] = False  # an output channel with nothing kept
    if empty_rows and w.shape[1] > 1:
        m[:, 0] = False  # an input channel no weight reads: empty rows in the transposed structure
    return m


def _check_uconv(b, case, dtype, density, channels_last=False, seed=0):
    N, C, H, W, O, KH, KW, st, pd, dl, G = case
    g = torch.Generator().manual_seed(seed + sum(map(hash, map(str, case))) % 1000)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(O, C // G, KH, KW, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(O, generator=g, dtype=torch.float64).to(dtype)
    m = _uconv_mask(w, g, density)
    cp = ConvParams(st, pd, dl, G)
    p = parse_pattern("unstructured")
    wm = torch.where(m, w, torch.zeros((), dtype=dtype))
    ref_y = F.conv2d(x.double(), wm.double(), bias.double(), st, pd, dl, G)
    y = b.conv_fwd(x, w, m, bias, p, cp)
    assert y.shape == ref_y.shape and y.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    _close(y, ref_y, rtol)
    dy = torch.randn(ref_y.shape, generator=g, dtype=torch.float64).to(dtype)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, wm.double(), dy.double(), st, pd, dl, G)
    dx = b.conv_dx(dy, w, m, p, cp, x.shape)
    assert dx.shape == x.shape and dx.dtype == dtype
    _close(dx, ref_dx, rtol)
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), st, pd, dl, G) * m
    dw = b.conv_dw(dy, x, m, p, cp, w.shape)
    assert dw.shape == w.shape and dw.dtype == dtype
    _close(dw, ref_dw, rtol)
    assert bool((dw[~m] == 0).all()), "pruned positions received gradient"
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    return y, dx, dw


@pytest.mark.parametrize("case", UCONV_CASES, ids=lambda c: "-".join(map(str, c[:7])) + f"-g{c[-1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unstructured_conv_composition(emu_backend, case, dtype):
    _check_uconv(emu_backend, case, dtype, density=0.4)


@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_unstructured_conv_composition_densities(emu_backend, density):
    _check_uconv(emu_backend, UCONV_CASES[2], torch.float64, density)


def test_unstructured_conv_channels_last_and_cache(emu_backend):
    b = emu_backend
    _check_uconv(b, UCONV_CASES[0], torch.float32, 0.5, channels_last=True)
    # the kept values are re-gathered after an in-place weight update (version counter), the structures
    # are cached per mask and per groups value
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g)
    w = torch.randn(8, 2, 3, 3, generator=g)
    m = torch.rand(w.shape, generator=g) < 0.5
    p = parse_pattern("unstructured")
    for groups in (2, 1, 2):
        cp = ConvParams((1, 1), (1, 1), (1, 1), groups)
        wg = w if groups == 2 else torch.cat([w, w], 1)
        mg = m if groups == 2 else torch.cat([m, m], 1)
        y = b.conv_fwd(x, wg, mg, None, p, cp)
        _close(y, F.conv2d(x, wg * mg, None, 1, 1, 1, groups), 1e-6)
    w.mul_(-3)
    _close(b.conv_fwd(x, w, m, None, p, ConvParams((1, 1), (1, 1), (1, 1), 2)),
           F.conv2d(x, w * m, None, 1, 1, 1, 2), 1e-6)


def test_conv_csr_structures():
    """The block-diagonal CSR decodes to the reduction-view matrix of every group, the transposed one to
    its transpose, and ``flat`` picks the kept weights in CSR order."""
    g = torch.Generator().manual_seed(4)
    G, O, Cg, KH, KW = 3, 6, 2, 2, 3
    w = torch.randn(O, Cg, KH, KW, generator=g, dtype=torch.float64)
    m = torch.rand(w.shape, generator=g) < 0.5
    from sparsefast.backends.cuda import build_conv_csr, build_conv_csr_t
    K = Cg * KH * KW
    bd = torch.zeros(O, G * K, dtype=torch.float64)
    rv = masks.reduction_view(w * m)
    for o in range(O):
        gi = o // (O // G)
        bd[o, gi * K:(gi + 1) * K] = rv[o]
    csr = build_conv_csr(m, G)
    assert (csr.R, csr.C) == (O, G * K)
    assert torch.equal(_csr_dense(csr, w.reshape(-1)[csr.flat]), bd)
    csr_t = build_conv_csr_t(m, G)
    assert (csr_t.R, csr_t.C) == (G * K, O)
    assert torch.equal(_csr_dense(csr_t, w.reshape(-1)[csr_t.flat]), bd.t())


def test_im2col_order_matches_reduction_view():
    """im2col_t's rows are in the weights' reduction order ((group, kh, kw, c), channel fastest): the
    reduction-view weight times it is the convolution."""
    from sparsefast.backends.cuda import im2col_t, nchw_t
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64)
    cp = ConvParams((2, 1), (1, 2), (1, 2), 3)
    w = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64)
    xT = im2col_t(x, 3, 2, cp, zero_pad=True)
    y = F.conv2d(x, w, None, cp.stride, cp.padding, cp.dilation, 3)
    M = y.shape[0] * y.shape[2] * y.shape[3]
    assert xT.shape == (6 * 3 * 2, (M + 7) // 8 * 8) and bool((xT[:, M:] == 0).all())
    rv = masks.reduction_view(w)  # (6, 12): per output channel its group's (kh, kw, c) columns
    for gi in range(3):
        yT = rv[2 * gi:2 * gi + 2] @ xT[12 * gi:12 * (gi + 1)]
        assert torch.allclose(yT, nchw_t(y[:, 2 * gi:2 * gi + 2], zero_pad=True), atol=1e-12)


def test_unstructured_conv_bad_input(emu_backend):
    b, p = emu_backend, parse_pattern("unstructured")
    w = torch.randn(6, 2, 3, 3)
    m = torch.rand(w.shape) < 0.5
    with pytest.raises(ValueError, match="does not fit"):
        b.conv_fwd(torch.randn(1, 5, 8, 8), w, m, None, p, ConvParams(groups=2))
    with pytest.raises(ValueError, match="does not fit"):
        b.conv_fwd(torch.randn(1, 8, 8, 8), w, m, None, p, ConvParams(groups=4))
    with pytest.raises(ValueError, match="smaller than"):
        b.conv_fwd(torch.randn(1, 4, 2, 8), w, m, None, p, ConvParams(groups=2))
    with pytest.raises(ValueError, match="dy has shape"):
        b.conv_dx(torch.randn(1, 6, 5, 5), w, m, p, ConvParams(groups=2), (1, 4, 8, 8))
    with pytest.raises(ValueError, match="dy has shape"):
        b.conv_dw(torch.randn(1, 6, 5, 5), torch.randn(1, 4, 8, 8), m, p, ConvParams(groups=2), w.shape)


def test_unstructured_conv_emulation_detects_errors(monkeypatch, emu_backend):
    """The composition tests can fail: a wrong reduction order or uninitialised SDDMM padding is caught."""
    import sparsefast.backends.cuda as cu
    case = UCONV_CASES[0]
    real = cu.im2col_t

    def swapped(x, kh, kw, conv, zero_pad):  # (c, kh, kw) order, as F.unfold gives it
        t = real(x, kh, kw, conv, zero_pad)
        G, C = conv.groups, x.shape[1]
        return t.view(G, kh * kw, C // G, -1).transpose(1, 2).reshape(t.shape).contiguous()
    monkeypatch.setattr(cu, "im2col_t", swapped)
    with pytest.raises(AssertionError):
        _check_uconv(emu_backend, case, torch.float64, 0.5)
    monkeypatch.setattr(cu, "im2col_t", lambda x, kh, kw, conv, zero_pad: _garbage_pad(real(x, kh, kw, conv, False),
                                                                                      x, kh, kw, conv))
    with pytest.raises(AssertionError, match="relative error"):  # M = 9: the SDDMM's last vector reads column 9
        _check_uconv(emu_backend, (1, 3, 4, 4, 4, 2, 2, (1, 1), (0, 0), (1, 1), 1), torch.float64, 0.5)
    monkeypatch.setattr(cu, "im2col_t", real)
    _check_uconv(emu_backend, (1, 3, 4, 4, 4, 2, 2, (1, 1), (0, 0), (1, 1), 1), torch.float64, 0.5)


def _garbage_pad(t, x, kh, kw, conv):
    """im2col without zeroed padding columns (what zero_pad=False gives), made visible with NaN."""
    B, _, H, W = x.shape
    from sparsefast.backends.cuda import conv_out_size
    ho, wo = conv_out_size((H, W), (kh, kw), conv)
    t[:, B * ho * wo:] = float("nan")
    return t


# ================================================================================================
# GPU: the real kernels
# ================================================================================================
def _gpu_backend() -> CudaBackend:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b = CudaBackend()
    r = b.unavailable_reason()
    if r is not None:
        pytest.skip(f"cuda backend unavailable: {r}")
    return b


TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _ref_close(out, ref_fn, *args, rtol):
    """Compare with the reference computed in float64 on the same (rounded) inputs."""
    ref = ref_fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert torch.isfinite(out).all()
    _close(out, ref, rtol)


@pytest.mark.gpu
def test_gpu_pack_bit_exact():
    b = _gpu_backend()
    g = torch.Generator().manual_seed(1)
    for R, C in [(16, 32), (70, 100), (129, 260), (1000, 4096)]:
        for dt in (torch.float16, torch.bfloat16):
            w = torch.randn(R, C, generator=g).to(dt)
            m = _rand_24(R, C, g, invalid=True)
            v, meta = b._C.sf24_pack(w.cuda(), m.cuda())
            v_py, meta_py = sm_meta.pack(w, m)
            assert torch.equal(meta.cpu(), meta_py)
            assert torch.equal(v.cpu(), v_py)
            assert torch.equal(b._C.sf24_unpack(v, meta, R, C).cpu(), sm_meta.unpack(v_py, meta_py, R, C))


# (M, K, N); csrc/sf24.cu splits K over blocks (sf24_split_k) for 100x1000x300, 300x512x1024, 64x4096x1024
# and 48x1024x64 on a 132-SM H100 (mid-size M, few output tiles, deep K)
LIN_SHAPES = [(1, 64, 64), (7, 96, 40), (16, 4096, 1024), (33, 256, 192), (100, 1000, 300), (300, 512, 1024),
              (1024, 2048, 512), (2048, 1024, 1024), (64, 4096, 1024), (48, 1024, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", LIN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pat,transposable", [("2:4", False), ("2:4", True), ("1:4", False)])
def test_gpu_linear_24(M, K, N, dtype, pat, transposable):
    b = _gpu_backend()
    ref = ReferenceBackend()
    g = torch.Generator().manual_seed(M * 7 + K + N)
    p = parse_pattern(pat)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    w = torch.randn(N, K, generator=g).to(dtype).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda()
    dy = torch.randn(M, N, generator=g).to(dtype).cuda()
    if transposable and N % 4 == 0:
        m = masks.transposable_nm_mask(w.float(), 2, 4)
    else:
        m = masks.nm_mask(w.float(), p.n, p.m)
    tol = TOL[dtype]
    _ref_close(b.linear_fwd(x, w, m, bias, p), ref.linear_fwd, x, w, m, bias, p, rtol=tol)
    _ref_close(b.linear_fwd(x, w, m, None, p), ref.linear_fwd, x, w, m, None, p, rtol=tol)
    _ref_close(b.linear_dx(dy, w, m, p), ref.linear_dx, dy, w, m, p, rtol=tol)
    dw = b.linear_dw(dy, x, m, p)
    _ref_close(dw, ref.linear_dw, dy, x, m, p, rtol=tol)
    assert bool((dw[~m] == 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (17, 512, 384), (256, 1024, 1000), (1000, 128, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3])
def test_gpu_linear_unstructured(M, K, N, dtype, density):
    b = _gpu_backend()
    ref = ReferenceBackend()
    g = torch.Generator().manual_seed(M + K + N)
    p = parse_pattern("unstructured")
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    w = torch.randn(N, K, generator=g).to(dtype).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda()
    dy = torch.randn(M, N, generator=g).to(dtype).cuda()
    m = (torch.rand(N, K, generator=g) < density).cuda()
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    _ref_close(b.linear_fwd(x, w, m, bias, p), ref.linear_fwd, x, w, m, bias, p, rtol=tol)
    _ref_close(b.linear_dx(dy, w, m, p), ref.linear_dx, dy, w, m, p, rtol=tol)
    dw = b.linear_dw(dy, x, m, p)
    _ref_close(dw, ref.linear_dw, dy, x, m, p, rtol=tol)
    assert bool((dw[~m] == 0).all())


CONV_CASES = [
    # N, C, H, W, O, KH, KW, stride, padding, dilation
    (2, 16, 9, 9, 32, 3, 3, 1, 1, 1),
    (3, 64, 14, 14, 128, 1, 1, 1, 0, 1),
    (2, 32, 15, 13, 64, 3, 3, 2, 1, 1),
    (1, 8, 10, 10, 24, 5, 3, 1, 2, 2),
    (8, 256, 14, 14, 256, 3, 3, 1, 1, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_conv_24(case, dtype):
    b = _gpu_backend()
    ref = ReferenceBackend()
    N, C, H, W, O, KH, KW, s, pd, dl = case
    g = torch.Generator().manual_seed(sum(case))
    p = parse_pattern("2:4")
    cp = ConvParams((s, s), (pd, pd), (dl, dl), 1)
    x = torch.randn(N, C, H, W, generator=g).to(dtype).cuda()
    w = torch.randn(O, C, KH, KW, generator=g).to(dtype).cuda()
    bias = torch.randn(O, generator=g).to(dtype).cuda()
    m = masks.magnitude_mask(w.float(), "2:4", None)
    if O % 4 == 0 and s == 1:  # exercise the sparse dgrad (mask 2:4 along O at every tap too)
        m = _per_tap_transposable(w.float().cpu()).cuda()
    tol = TOL[dtype]
    # cuDNN (general dgrad path, wgrad) runs float32 convs in TF32 unless disabled
    tol_cudnn = 5e-3 if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else tol
    y = b.conv_fwd(x, w, m, bias, p, cp)
    _ref_close(y, ref.conv_fwd, x, w, m, bias, p, cp, rtol=tol)
    dy = torch.randn_like(y)
    sparse_dx = b._conv_dx_sparse_ok(dy, w, m, cp, x.shape)
    _ref_close(b.conv_dx(dy, w, m, p, cp, x.shape), ref.conv_dx, dy, w, m, p, cp, x.shape,
               rtol=tol if sparse_dx else tol_cudnn)
    _ref_close(b.conv_dw(dy, x, m, p, cp, w.shape), ref.conv_dw, dy, x, m, p, cp, w.shape, rtol=tol_cudnn)


UCONV_GPU_CASES = [
    (4, 32, 15, 15, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 24, 17, 13, 48, 3, 3, (2, 1), (1, 2), (1, 2), 3),
    (3, 64, 9, 9, 64, 3, 3, (1, 1), (1, 1), (1, 1), 64),
    (2, 16, 8, 8, 40, 1, 1, (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", UCONV_GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_gpu_conv_unstructured(case, dtype, density):
    """The unstructured conv path (im2col + csr_spmm, csr_spmm on the transpose + fold, csr_sddmm) on
    the real kernels against the float64 reference."""
    b = _gpu_backend()
    ref = ReferenceBackend()
    N, C, H, W, O, KH, KW, st, pd, dl, G = case
    g = torch.Generator().manual_seed(N * C + O)
    p = parse_pattern("unstructured")
    cp = ConvParams(st, pd, dl, G)
    x = torch.randn(N, C, H, W, generator=g).to(dtype).cuda()
    w = torch.randn(O, C // G, KH, KW, generator=g).to(dtype).cuda()
    bias = torch.randn(O, generator=g).to(dtype).cuda()
    m = _uconv_mask(w.cpu(), g, density).cuda()
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    y = b.conv_fwd(x, w, m, bias, p, cp)
    _ref_close(y, ref.conv_fwd, x, w, m, bias, p, cp, rtol=tol)
    dy = torch.randn_like(y)
    _ref_close(b.conv_dx(dy, w, m, p, cp, x.shape), ref.conv_dx, dy, w, m, p, cp, x.shape, rtol=tol)
    dw = b.conv_dw(dy, x, m, p, cp, w.shape)
    _ref_close(dw, ref.conv_dw, dy, x, m, p, cp, w.shape, rtol=tol)
    assert bool((dw[~m] == 0).all())


@pytest.mark.gpu
def test_gpu_odd_shapes_and_strided_input():
    """K not a multiple of 8, non-contiguous x, M not a multiple of 8: no silent garbage."""
    b = _gpu_backend()
    ref = ReferenceBackend()
    p = parse_pattern("2:4")
    for M, K, N in [(5, 12, 20), (13, 36, 7), (3, 4, 1)]:
        xbig = torch.randn(M, K + 5, dtype=torch.float16, device="cuda")
        x = xbig[:, 1:K + 1]  # misaligned, strided
        w = torch.randn(N, K, dtype=torch.float16, device="cuda")
        m = masks.nm_mask(w.float(), 2, 4)
        _ref_close(b.linear_fwd(x, w, m, None, p), ref.linear_fwd, x, w, m, None, p, rtol=TOL[torch.float16])


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    b = _gpu_backend()
    p = parse_pattern("2:4")
    x = torch.randn(64, 1024, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(1024, 1024, dtype=torch.bfloat16, device="cuda")
    m = masks.nm_mask(w.float(), 2, 4)
    y0 = b.linear_fwd(x, w, m, None, p)  # warm-up: packs and caches
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = b.linear_fwd(x, w, m, None, p)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _close(y, ReferenceBackend().linear_fwd(x.double(), w.double(), m, None, p), TOL[torch.bfloat16])
    assert not torch.equal(y, y0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_wgmma_path_explicit(dtype):
    """The sm_90a wgmma.sp kernels (path=1) against the reference, called directly (not through the
    self-check), linear and conv, including partial tiles."""
    b = _gpu_backend()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma.sp needs an sm_90 GPU")
    ref = ReferenceBackend()
    g = torch.Generator().manual_seed(9)
    p = parse_pattern("2:4")
    for M, K, N in [(65, 64, 64), (300, 320, 200), (1000, 1056, 384), (2048, 4096, 1024)]:
        x = torch.randn(M, K, generator=g).to(dtype).cuda()
        w = torch.randn(N, K, generator=g).to(dtype).cuda()
        bias = torch.randn(N, generator=g).to(dtype).cuda()
        m = masks.nm_mask(w.float(), 2, 4)
        pk = b._pack24(w, m)
        y = b._C.sf24_linear(x, pk.vals, pk.vals_lo, pk.meta, N, bias, 1)
        _ref_close(y, ref.linear_fwd, x, w, m, bias, p, rtol=TOL[dtype])
    x = torch.randn(4, 32, 17, 15, generator=g).to(dtype).cuda()
    w = torch.randn(96, 32, 3, 3, generator=g).to(dtype).cuda()
    m = masks.magnitude_mask(w.float(), "2:4", None)
    pk = b._pack24(masks.reduction_view(w).contiguous(), masks.reduction_view(m).contiguous())
    y = b._C.sf24_conv2d(x, pk.vals, pk.vals_lo, pk.meta, 96, 3, 3, [2, 1], [1, 1], [1, 1], None, 1)
    _ref_close(y, ref.conv_fwd, x, w, m, None, p, ConvParams((2, 1), (1, 1), (1, 1), 1), rtol=TOL[dtype])
    assert b.wgmma_status, "the backend recorded no wgmma self-check status"


# ================================================================================================
# CPU emulation of csrc/sf24.cu's GEMM kernel, statement by statement: block/warp decomposition,
# cp.async tile loads (with their predicates), shared-memory layouts, ldmatrix addressing, the
# metadata word each lane passes, the k-split reduction and the epilogue. Formulas are copied from
# the kernel; the instruction semantics (ldmatrix, mma.sp) follow the PTX ISA.
# ================================================================================================
_CFGS = {  # name: (BM, BN, BK, WF, WP, WK)  -- must match CfgBig / CfgMid / CfgSmall in sf24.cu
    "big": (128, 128, 64, 2, 4, 1),
    "mid": (64, 64, 64, 2, 2, 1),
    "small": (16, 32, 256, 1, 1, 4),
}


def _conv_input_offset(s, k, p):
    """Python twin of sf::conv_input_offset (sf_layout.h)."""
    N, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, HO, WO = s
    ow = p % WO
    t = p // WO
    oh = t % HO
    n = t // HO
    c = k % C
    kp = k // C
    kw = kp % KW
    kh = kp // KW
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    if ih < 0 or ih >= H or iw < 0 or iw >= W:
        return -1
    return ((n * H + ih) * W + iw) * C + c


def _ldmatrix_x4(smem, row_addr_of_lane):
    """ldmatrix.x4: lane l gives the start (flat index) of row l%8 of matrix l//8; thread T receives
    elements (T//4, 2*(T%4) + {0,1}) of each matrix j in register j."""
    regs = [[None] * 4 for _ in range(32)]
    for j in range(4):
        for t in range(32):
            base = row_addr_of_lane[8 * j + t // 4]
            c = 2 * (t % 4)
            regs[t][j] = (smem[base + c], smem[base + c + 1])
    return regs


def _mma_sp(acc, af, bf, e):
    """mma.sp.m16n8k32 (selector 0) on per-lane fragments; acc[lane][i] += D."""
    for row in range(16):
        g, half = row % 8, row // 8
        for col in range(8):
            s = 0.0
            for ccol in range(16):
                a = af[4 * g + (ccol % 8) // 2][half + 2 * (ccol // 8)][ccol % 2]
                word = e[4 * g + ccol // 8]
                nib = (word >> (16 * half + 4 * ((ccol % 8) // 2))) & 0xF
                dense = 16 * (ccol // 8) + 4 * ((ccol % 8) // 2) + ((nib >> (2 * (ccol % 2))) & 3)
                b = bf[4 * col + (dense % 8) // 2][dense // 8][dense % 2]
                s += a * b
            # c[i] at (g + 8*(i>>1), 2q + (i&1))
            lane = 4 * (row % 8) + col // 2
            i = 2 * (row // 8) + col % 2
            acc[lane][i] += s


def _emulate_sf24_gemm(cfg, vals, meta, R, x_flat, M, K, ldx, bias, conv=None):
    BM, BN, BK, WF, WP, WK = _CFGS[cfg]
    NT = WF * WP * WK * 32
    WM, WN = BM // WF, BN // WP
    MI, NI, KS = WM // 16, WN // 8, BK // 32
    A_LD, B_LD = BK // 2 + 8, BK + 8
    Rp, Cp = vals.shape[0], vals.shape[1] * 2
    vflat = vals.reshape(-1).tolist()
    mwords = [int(v) & 0xFFFFFFFF for v in meta.tolist()]
    xs = x_flat.tolist()
    out = torch.full((M, R), float("nan"), dtype=torch.float64)
    KT = (Cp + BK - 1) // BK
    for by in range((R + BM - 1) // BM):
        for bx in range((M + BN - 1) // BN):
            f0, p0 = by * BM, bx * BN
            acc = {(w, mi, ni): [[0.0] * 4 for _ in range(32)]
                   for w in range(NT // 32) for mi in range(MI) for ni in range(NI)}
            for kt in range(KT):
                k0 = kt * BK
                sA = [0.0] * (BM * A_LD)
                for i in range(BM * (BK // 16)):
                    r, c = i // (BK // 16), i % (BK // 16)
                    gr, gk = f0 + r, k0 // 2 + c * 8
                    if gr < Rp and gk < Cp // 2:
                        for q in range(8):
                            sA[r * A_LD + c * 8 + q] = vflat[gr * (Cp // 2) + gk + q]
                sE = [0] * ((BM // 16) * KS * 16)
                for i in range((BM // 16) * KS * 4):
                    t, c = i // (KS * 4), i % (KS * 4)
                    gt, gs = f0 // 16 + t, k0 // 32 + c // 4
                    if gt < Rp // 16 and gs < Cp // 32:
                        for q in range(4):
                            sE[t * KS * 16 + c * 4 + q] = mwords[(gt * (Cp // 32) + gs) * 16 + (c % 4) * 4 + q]
                sB = [0.0] * (BN * B_LD)
                for i in range(BN * (BK // 8)):
                    r, c = i // (BK // 8), i % (BK // 8)
                    p, k = p0 + r, k0 + c * 8
                    if p < M and k < K:
                        off = p * ldx + k if conv is None else _conv_input_offset(conv, k, p)
                        if off >= 0:
                            for q in range(8):
                                sB[r * B_LD + c * 8 + q] = xs[off + q]
                for warp in range(NT // 32):
                    wk, wp, wf = warp % WK, (warp // WK) % WP, warp // (WK * WP)
                    for ks in range(wk, KS, WK):
                        if kt * BK + ks * 32 >= Cp:
                            break
                        af, e = [], []
                        for mi in range(MI):
                            trow = wf * WM + mi * 16
                            af.append(_ldmatrix_x4(sA, [(trow + (l % 16)) * A_LD + ks * 16 + (l // 16) * 8
                                                        for l in range(32)]))
                            e.append([sE[(trow // 16) * KS * 16 + ks * 16 + 2 * (l // 4) + (l % 2)] for l in range(32)])
                        for ni in range(NI):
                            bf = _ldmatrix_x4(sB, [(wp * WN + ni * 8 + (l % 8)) * B_LD + ks * 32 + (l // 8) * 8
                                                   for l in range(32)])
                            for mi in range(MI):
                                if f0 + wf * WM + mi * 16 < Rp:
                                    _mma_sp(acc[(warp, mi, ni)], af[mi], bf, e[mi])
            for warp in range(NT // 32):
                wk, wp, wf = warp % WK, (warp // WK) % WP, warp // (WK * WP)
                if wk > 0:
                    continue
                for mi in range(MI):
                    for ni in range(NI):
                        tot = [[sum(acc[(warp + w, mi, ni)][l][i] for w in range(WK)) for i in range(4)]
                               for l in range(32)]
                        for l in range(32):
                            for i in range(4):
                                rr, cc = l // 4 + 8 * (i >> 1), 2 * (l % 4) + (i & 1)
                                f = f0 + wf * WM + mi * 16 + rr
                                p = p0 + wp * WN + ni * 8 + cc
                                if f < R and p < M:
                                    out[p, f] = tot[l][i] + (float(bias[f]) if bias is not None else 0.0)
    return out


@pytest.mark.parametrize("cfg", ["small", "mid", "big"])
@pytest.mark.parametrize("M,K,R", [(5, 72, 20), (40, 200, 70)])
def test_kernel_emulation_linear(cfg, M, K, R):
    g = torch.Generator().manual_seed(M + K + R + len(cfg))
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(R, K, generator=g, dtype=torch.float64)
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    m = _rand_24(R, K, g)
    vals, meta = sm_meta.pack(w, m)
    y = _emulate_sf24_gemm(cfg, vals, meta, R, x.reshape(-1), M, K, K, bias)
    assert torch.isfinite(y).all(), "some outputs were never written"
    assert torch.allclose(y, x @ (w * m).t() + bias, atol=1e-9)


@pytest.mark.parametrize("cfg", ["small", "mid"])
def test_kernel_emulation_conv(cfg):
    g = torch.Generator().manual_seed(4)
    N, C, H, W, O, KH, KW, S, P, D = 1, 8, 5, 4, 12, 3, 2, 2, 1, 1
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C, KH, KW, generator=g, dtype=torch.float64)
    m = masks.magnitude_mask(w, "2:4", None)
    ref = F.conv2d(x, w * m, stride=S, padding=P, dilation=D)
    HO, WO = ref.shape[-2:]
    vals, meta = sm_meta.pack(masks.reduction_view(w), masks.reduction_view(m))
    shape = (N, H, W, C, KH, KW, S, S, P, P, D, D, HO, WO)
    Mp = N * HO * WO
    y = _emulate_sf24_gemm(cfg, vals, meta, O, x.permute(0, 2, 3, 1).reshape(-1), Mp, KH * KW * C, 0, None, conv=shape)
    assert torch.isfinite(y).all()
    assert torch.allclose(y.reshape(N, HO, WO, O).permute(0, 3, 1, 2), ref, atol=1e-9)


def _emulate_csr_spmm(row_ptr, col, vals, row_order, C, xT, M, bias, V=8):
    """csr_spmm_kernel (csr.cu) lane by lane: warps own rows in row_order, LC lanes cover LC*V columns,
    LG = 32/LC groups stride over the nonzeros and are reduced with xor-shuffles."""
    R = row_order.numel()
    ldm = xT.shape[1]
    LC = 1
    while LC < 32 and LC < -(-M // V):
        LC <<= 1
    LG = 32 // LC
    yT = torch.full((R, ldm), float("nan"), dtype=torch.float64)
    rp, cols, vv = row_ptr.tolist(), (col.long() & 0xFFFF).tolist(), vals.double().tolist()
    for by in range(-(-M // (LC * V))):
        for slot in range(R):
            row = int(row_order[slot])
            acc = [[0.0] * V for _ in range(32)]
            for lane in range(32):
                lc, lg = lane % LC, lane // LC
                m = by * LC * V + lc * V
                for j in range(rp[row] + lg, rp[row + 1], LG):
                    c = min(cols[j], C - 1)
                    if m < M:
                        for i in range(V):
                            acc[lane][i] += vv[j] * float(xT[c, m + i])
            off = LC
            while off < 32:
                acc = [[acc[l][i] + acc[l ^ off][i] for i in range(V)] for l in range(32)]
                off <<= 1
            for lane in range(LC):  # lg == 0
                m = by * LC * V + lane * V
                if m < M:
                    b = float(bias[row]) if bias is not None else 0.0
                    yT[row, m:m + V] = torch.tensor(acc[lane], dtype=torch.float64) + b
    return yT


@pytest.mark.parametrize("M", [1, 5, 16, 40, 300])
def test_csr_spmm_lane_emulation(M):
    g = torch.Generator().manual_seed(M)
    R, C = 13, 50
    w = torch.randn(R, C, generator=g, dtype=torch.float64)
    m = torch.rand(R, C, generator=g) < 0.3
    csr = build_csr(m)
    ldm = (M + 7) // 8 * 8
    x = torch.randn(M, C, generator=g, dtype=torch.float64)
    xT = torch.zeros(C, ldm, dtype=torch.float64)
    xT[:, :M] = x.t()
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    yT = _emulate_csr_spmm(csr.row_ptr, csr.col, w.reshape(-1)[csr.flat], csr.row_order, C, xT, M, bias)
    assert torch.allclose(yT[:, :M].t(), x @ (w * m).t() + bias, atol=1e-10)


def _emulate_store_c_frag(c, f_base, p_base, R, M, ldo, bias, pair_ok):
    """store_c_frag (csrc/include/sf_ptx.cuh) for a 16-bit output, lane by lane: c[lane][i] is the
    m16n8 accumulator fragment (row g + 8*(i>>1), col 2q + (i&1)); lanes L and L^4 swap one value per
    row half (__shfl_xor_sync(.., 4)) and store adjacent feature pairs. Returns the stores as
    [(element offset, values), ...] (two values: one 32-bit packed store)."""
    stores = []
    for h in range(2):
        send = []
        for lane in range(32):
            v0, v1 = c[lane][2 * h], c[lane][2 * h + 1]
            send.append(v0 if (lane // 4) & 1 else v1)
        for lane in range(32):
            g, q = lane // 4, lane % 4
            odd = g & 1
            v0, v1 = c[lane][2 * h], c[lane][2 * h + 1]
            recv = send[lane ^ 4]
            lo, hi = (recv, v1) if odd else (v0, recv)
            f = f_base + (g & ~1) + 8 * h
            p = p_base + 2 * q + odd
            if p < M and f < R:
                b = (lambda k: float(bias[k])) if bias is not None else (lambda k: 0.0)
                off = p * ldo + f
                if pair_ok and f + 1 < R:
                    assert off % 2 == 0, "a packed pair must start at an even element (4-byte aligned)"
                    stores.append((off, (lo + b(f), hi + b(f + 1))))
                else:
                    stores.append((off, (lo + b(f),)))
                    if f + 1 < R:
                        stores.append((off + 1, (hi + b(f + 1),)))
    return stores


@pytest.mark.parametrize("R,M,ldo,pair_ok", [(16, 8, 16, True), (13, 5, 14, True), (16, 8, 17, False),
                                              (7, 8, 9, False), (64, 8, 64, True)])
def test_epilogue_packed_pairs_emulation(R, M, ldo, pair_ok):
    """The packed-pair epilogue of the SF24 GEMMs (sf24.cu mma.sp and sf24_sm90.cu wgmma.sp) writes
    every in-range output exactly once with its accumulator (+ bias) and nothing else; with
    pair_ok all stores but the odd-R tail are 32-bit pairs."""
    g = torch.Generator().manual_seed(R * 100 + M)
    f_base = 0 if R <= 16 else 48  # the last 16-row fragment of a 64-row tile
    frag = torch.randn(16, 8, generator=g, dtype=torch.float64)  # [row, col] of the fragment
    c = [[float(frag[lane // 4 + 8 * (i >> 1), 2 * (lane % 4) + (i & 1)]) for i in range(4)] for lane in range(32)]
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    stores = _emulate_store_c_frag(c, f_base, 0, R, M, ldo, bias, pair_ok)
    written = {}
    for off, vals in stores:
        for k, v in enumerate(vals):
            assert off + k not in written, f"element {off + k} stored twice"
            written[off + k] = v
    want = {p * ldo + f: float(frag[f - f_base, p]) + float(bias[f])
            for p in range(min(M, 8)) for f in range(f_base, min(R, f_base + 16))}
    assert written == pytest.approx(want) and set(written) == set(want)
    pairs = sum(len(v) == 2 for _, v in stores)
    scalars = len(stores) - pairs
    assert 2 * pairs + scalars == len(want)
    if pair_ok:  # scalars only for an odd last feature, one per pixel
        rows = min(R, f_base + 16) - f_base
        assert scalars == (min(M, 8) if rows % 2 else 0)
    else:
        assert pairs == 0
