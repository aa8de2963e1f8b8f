"""Triton N:M backend (sparsefast.backends.triton.nm) against the masked-dense reference.

On machines without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported when no CUDA device exists): tiny shapes, one fixed small config
(SPLIT_K=2, so the split-K path runs too). GPU-only checks are marked ``gpu``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import sparsefast.ops as sops  # noqa: E402
from sparsefast import backends as bk  # noqa: E402
from sparsefast.backends.base import ConvParams, OpQuery  # noqa: E402
from sparsefast.backends.reference import ReferenceBackend  # noqa: E402
from sparsefast.backends.triton import interpreting  # noqa: E402
from sparsefast.backends.triton import nm as tnm  # noqa: E402
from sparsefast.formats import nm as fmt  # noqa: E402
from sparsefast.masks import is_transposable_nm, magnitude_mask, parse_pattern, transposable_nm_mask  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_INTERPRETED = interpreting() and isinstance(tnm._fwd_kernel, triton.runtime.interpreter.InterpretedFunction)
if DEV == "cpu" and not _INTERPRETED:
    pytest.skip("no CUDA device and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

PATTERNS = ["2:4", "1:4", "2:8", "4:8", "1:16", "8:16"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF = ReferenceBackend()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` (kernel, dtype) vs ``ref`` (fp32 reference on the same rounded inputs)."""
    tol = TOL[dtype]
    scale = float(ref.abs().nan_to_num(posinf=0, neginf=0).max()) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * max(scale, 1.0), equal_nan=True)


def _mask(shape, pattern: str, gen: torch.Generator, drop: float = 0.15) -> torch.Tensor:
    """A valid N:M mask (reduction order) where a few groups keep fewer than n."""
    m = magnitude_mask(torch.randn(shape, generator=gen), pattern, None)
    return (m & (torch.rand(shape, generator=gen) > drop)).to(DEV)


def _randn(*shape, gen, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_kernel_bit_identical_to_reference(pattern, dtype):
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(hash(pattern) % 1000)
    rows, K = 11, p.m * 9                                # rows and groups not multiples of the tile
    wt = _randn(K, rows, gen=gen, dtype=dtype)
    w = wt.t()                                           # non-contiguous weight
    w[0, 0], w[1, 1] = float("nan"), float("inf")        # specials travel as bits
    mask = _mask((rows, K), pattern, gen)
    got = tnm.pack(w, mask, p.n, p.m)
    want = fmt.pack(w.cpu(), mask.cpu(), p.n, p.m)
    assert torch.equal(got.meta.cpu(), want.meta)
    assert torch.equal(got.values.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.values.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(fmt.unpack(got).cpu().nan_to_num(), (w * mask).cpu().nan_to_num())


def test_pack_conv_weight_and_bitmap():
    gen = torch.Generator().manual_seed(1)
    w = _randn(5, 8, 3, 3, gen=gen, dtype=torch.float16)
    mask = _mask(w.shape, "2:4", gen)
    got = tnm.pack(w, mask, 2, 4)
    want = fmt.pack(w.cpu(), mask.cpu(), 2, 4)
    assert torch.equal(got.meta.cpu(), want.meta) and torch.equal(got.values.cpu(), want.values)
    bm = tnm.bitmap(mask).cpu()
    rv = mask.cpu().permute(0, 2, 3, 1).reshape(5, -1)
    bits = (bm[:, :, None].int() >> torch.arange(8)) & 1
    assert torch.equal(bits.reshape(5, -1)[:, :rv.shape[1]].bool(), rv)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_primitives_match_reference(pattern, dtype):
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(len(pattern) * 7 + DTYPES.index(dtype))
    impl = tnm.Impl()
    M = int(torch.randint(1, 40, (1,), generator=gen))
    N = int(torch.randint(1, 40, (1,), generator=gen))
    K = p.m * int(torch.randint(1, 80 // p.m + 2, (1,), generator=gen))
    w = _randn(N, K, gen=gen, dtype=dtype)
    mask = _mask((N, K), pattern, gen)
    x, dy = _randn(M, K, gen=gen, dtype=dtype), _randn(M, N, gen=gen, dtype=dtype)
    b = _randn(N, gen=gen, dtype=dtype) if M % 2 else None
    f = lambda t: None if t is None else t.float()  # noqa: E731
    _close(impl.linear_fwd(x, w, mask, b, p), REF.linear_fwd(f(x), f(w), mask, f(b), p), dtype)
    _close(impl.linear_dx(dy, w, mask, p), REF.linear_dx(f(dy), f(w), mask, p), dtype)
    dw = impl.linear_dw(dy, x, mask, p)
    assert dw.shape == w.shape and dw.dtype == dtype
    assert not dw[~mask].any()                          # exactly zero where pruned
    _close(dw, REF.linear_dw(f(dy), f(x), mask, p), dtype)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_linear_dx_transposable_fast_path_and_general_path(pattern):
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(5)
    N, K, M = 2 * p.m * 2, p.m * 6, 21
    w = _randn(N, K, gen=gen, dtype=torch.bfloat16)
    mask = transposable_nm_mask(torch.randn(N, K, generator=gen), p.n, p.m).to(DEV)
    dy = _randn(M, N, gen=gen, dtype=torch.bfloat16)
    ref = REF.linear_dx(dy.float(), w.float(), mask, p)
    fast = tnm.Impl()
    out = fast.linear_dx(dy, w, mask, p)
    assert "nm-pack-t" in fast._tc.tags(), "transposable mask should use the W^T copy"
    _close(out, ref, torch.bfloat16)
    general = tnm.Impl()
    general.dx_path = "general"
    _close(general.linear_dx(dy, w, mask, p), ref, torch.bfloat16)
    assert "nm-pack-t" not in general._tc.tags()
    # a mask that is not transposable falls back to the general kernel
    nt = tnm.Impl()
    mask2 = _mask((N, K), pattern, gen, drop=0.0)
    _close(nt.linear_dx(dy, w, mask2, p), REF.linear_dx(dy.float(), w.float(), mask2, p), torch.bfloat16)
    assert not is_transposable_nm(mask2, p.n, p.m)
    forced = tnm.Impl()
    forced.dx_path = "transposed"
    with pytest.raises(RuntimeError, match="transposable"):
        forced.linear_dx(dy, w, mask2, p)


def test_linear_noncontiguous_inputs_and_cache():
    p = parse_pattern("2:4")
    gen = torch.Generator().manual_seed(9)
    impl = tnm.Impl()
    M, N, K = 19, 24, 40
    x = _randn(M, 2 * K, gen=gen, dtype=torch.float16)[:, ::2]       # stride(1) == 2
    dy = _randn(N, M, gen=gen, dtype=torch.float16).t()               # column-major
    w = _randn(K, N, gen=gen, dtype=torch.float16).t()                # column-major weight
    mask = _mask((N, K), "2:4", gen)
    _close(impl.linear_fwd(x, w, mask, None, p), REF.linear_fwd(x.float(), w.float(), mask, None, p), torch.float16)
    _close(impl.linear_dx(dy, w, mask, p), REF.linear_dx(dy.float(), w.float(), mask, p), torch.float16)
    _close(impl.linear_dw(dy, x, mask, p), REF.linear_dw(dy.float(), x.float(), mask, p), torch.float16)
    # the packed weight is cached until the weight changes in place
    p1 = impl.packed(w, mask, p)
    assert impl.packed(w, mask, p) is p1
    with torch.no_grad():
        w.mul_(2)
    assert impl.packed(w, mask, p) is not p1
    _close(impl.linear_fwd(x, w, mask, None, p), REF.linear_fwd(x.float(), w.float(), mask, None, p), torch.float16)
    # split-K counters reset themselves
    for buf in tnm._SCRATCH._locks.values():
        assert not buf.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_linear_nan_inf_propagate_like_reference():
    p = parse_pattern("2:4")
    gen = torch.Generator().manual_seed(11)
    impl = tnm.Impl()
    M, N, K = 6, 8, 16
    w = _randn(N, K, gen=gen, dtype=torch.float32)
    mask = _mask((N, K), "2:4", gen, drop=0.0)
    kept = mask.nonzero()
    w[tuple(kept[0])] = float("nan")                       # a kept NaN weight
    w[tuple(kept[5])] = float("inf")
    x = _randn(M, K, gen=gen, dtype=torch.float32)
    x[1, 3], x[2, 0], x[4, 7] = float("nan"), float("inf"), float("-inf")
    y, yr = impl.linear_fwd(x, w, mask, None, p), REF.linear_fwd(x, w, mask, None, p)
    assert torch.equal(torch.isnan(y), torch.isnan(yr)) and torch.equal(torch.isinf(y), torch.isinf(yr))
    _close(y, yr, torch.float32)
    dy = _randn(M, N, gen=gen, dtype=torch.float32)
    dy[0, 2] = float("nan")
    _close(impl.linear_dx(dy, w, mask, p), REF.linear_dx(dy, w, mask, p), torch.float32)
    dw, dwr = impl.linear_dw(dy, x, mask, p), REF.linear_dw(dy, x, mask, p)
    # kept positions match the reference (NaN where it is NaN); pruned ones are exactly 0
    # (the reference's (dy^T x) * M turns NaN * 0 into NaN there)
    torch.testing.assert_close(dw[mask], dwr[mask], equal_nan=True)
    assert torch.equal(dw[~mask], torch.zeros_like(dw[~mask]))


# ---------------------------------------------------------------------------------------------
# conv
# ---------------------------------------------------------------------------------------------
CONV_CASES = [
    # pattern, dtype, x shape, (O, C/g, kh, kw), stride, padding, dilation, groups, channels_last, bias
    ("2:4", torch.float32, (2, 8, 6, 5), (6, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, False, True),
    ("2:4", torch.bfloat16, (1, 8, 7, 6), (4, 4, 3, 2), (2, 1), (1, 0), (1, 2), 2, True, True),
    ("1:4", torch.float16, (2, 8, 5, 5), (6, 4, 3, 3), (2, 2), (2, 1), (1, 1), 2, False, False),
    ("2:8", torch.float32, (1, 16, 5, 6), (5, 16, 1, 1), (2, 2), (0, 0), (1, 1), 1, True, True),
    ("4:8", torch.bfloat16, (1, 16, 5, 5), (4, 8, 3, 3), (1, 2), (2, 1), (2, 1), 2, False, False),
    ("1:16", torch.float16, (1, 16, 4, 4), (3, 16, 2, 2), (1, 1), (1, 1), (1, 1), 1, True, True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-g{c[7]}" for c in CONV_CASES])
def test_conv_primitives_match_reference(case):
    pattern, dtype, xs, ws, stride, padding, dilation, groups, cl, has_bias = case
    p = parse_pattern(pattern)
    cp = ConvParams(stride, padding, dilation, groups)
    gen = torch.Generator().manual_seed(sum(xs) + sum(ws))
    impl = tnm.Impl()
    w = _randn(*ws, gen=gen, dtype=dtype)
    mask = _mask(ws, pattern, gen)
    x = _randn(*xs, gen=gen, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    b = _randn(ws[0], gen=gen, dtype=dtype) if has_bias else None
    yr = REF.conv_fwd(x.float(), w.float(), mask, None if b is None else b.float(), p, cp)
    y = impl.conv_fwd(x, w, mask, b, p, cp)
    assert y.shape == yr.shape and y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    _close(y, yr, dtype)
    dy = _randn(*yr.shape, gen=gen, dtype=dtype)
    _close(impl.conv_dx(dy, w, mask, p, cp, x.shape), REF.conv_dx(dy.float(), w.float(), mask, p, cp, x.shape), dtype)
    dw = impl.conv_dw(dy, x, mask, p, cp, w.shape)
    assert not dw[~mask].any()
    _close(dw, REF.conv_dw(dy.float(), x.float(), mask, p, cp, w.shape), dtype)


# ---------------------------------------------------------------------------------------------
# through the registry and the custom ops (autograd, frozen weight, errors)
# ---------------------------------------------------------------------------------------------
def test_ops_linear_autograd_and_frozen_weight(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w0 = _randn(16, 32, gen=gen, dtype=torch.float32)
    mask = _mask((16, 32), "2:4", gen, drop=0.0)
    x0, b0 = _randn(3, 5, 32, gen=gen, dtype=torch.float32), _randn(16, gen=gen, dtype=torch.float32)
    grads = {}
    for name in ("triton", "reference"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = sops.sparse_linear(x, w, mask, b, backend=name, pattern="2:4")
        (y * y).sum().backward()
        grads[name] = (y.detach(), x.grad, w.grad, b.grad)
    for a, r in zip(grads["triton"], grads["reference"]):
        _close(a, r, torch.float32)
    # frozen weight: only dx (and db); the dw primitive is never called
    impl = bk.get("triton")._impl(parse_pattern("2:4"))
    monkeypatch.setattr(impl, "linear_dw", lambda *a: (_ for _ in ()).throw(AssertionError("dw called")))
    x = x0.clone().requires_grad_()
    y = sops.sparse_linear(x, w0, mask, b0, backend="triton", pattern="2:4")
    y.sum().backward()
    xr = x0.clone().requires_grad_()
    sops.sparse_linear(xr, w0, mask, b0, backend="reference", pattern="2:4").sum().backward()
    _close(x.grad, xr.grad, torch.float32)


def test_ops_conv_autograd():
    gen = torch.Generator().manual_seed(4)
    w0 = _randn(4, 8, 3, 3, gen=gen, dtype=torch.float32)
    mask = _mask(w0.shape, "2:4", gen, drop=0.0)
    x0 = _randn(1, 8, 5, 5, gen=gen, dtype=torch.float32)
    out = {}
    for name in ("triton", "reference"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = sops.sparse_conv2d(x, w, mask, None, stride=1, padding=1, backend=name, pattern="2:4")
        y.square().sum().backward()
        out[name] = (y.detach(), x.grad, w.grad)
    for a, r in zip(out["triton"], out["reference"]):
        _close(a, r, torch.float32)


def _q(op="linear", dtype=torch.bfloat16, shape=(4096, 4096), pattern="2:4", m_rows=16):
    return OpQuery(op, torch.device(DEV), dtype, shape, parse_pattern(pattern), m_rows)


def test_support_and_routing_reasons():
    impl = tnm.Impl()
    assert impl.not_supported_reasons(_q()) == []
    assert impl.not_supported_reasons(_q(op="conv", shape=(64, 64, 3, 3))) == []
    assert any("3:4" in r for r in impl.not_supported_reasons(_q(pattern="3:4")))
    assert any("1:32" in r for r in impl.not_supported_reasons(_q(pattern="1:32")))
    assert any("float64" in r for r in bk.get("triton").not_supported_reasons(_q(dtype=torch.float64)))
    assert any("divisible" in r for r in impl.not_supported_reasons(_q(shape=(64, 66), pattern="1:4")))
    assert any("divisible" in r for r in impl.not_supported_reasons(_q(op="conv", shape=(8, 12, 3, 3), pattern="2:8")))
    assert impl.prefer_dense_reason(_q(m_rows=64)) is None
    assert impl.prefer_dense_reason(_q(shape=(4096, 14336), m_rows=1)) is None
    assert "compute-bound" in impl.prefer_dense_reason(_q(m_rows=4096))
    assert "small" in impl.prefer_dense_reason(_q(shape=(256, 256)))
    assert impl.prefer_dense_reason(_q(m_rows=None)) is not None
    # explicit request for something unsupported -> RuntimeError naming the reason
    x = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    w = torch.randn(4, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="float64"):
        sops.sparse_linear(x, w, magnitude_mask(w, "2:4", None), backend="triton", pattern="2:4")


def test_gpu_launch_planning_shape_classes():
    """The autotuner's candidate configs and split-K choice (pure Python; runs without a GPU)."""
    sms = 132
    small = tnm._candidates("fwd", tnm._SMALL_CONFIGS, 16, 4096, 4096, sms)
    assert small and all(c.kwargs["BM"] == 16 for c in small)
    for c in small:                     # memory-bound: enough programs for >= 2 waves (or max split)
        tiles = triton.cdiv(4096, c.kwargs["BN"])
        assert tiles * c.kwargs["SPLIT_K"] >= 2 * sms or c.kwargs["SPLIT_K"] == 8
        assert triton.cdiv(4096, c.kwargs["BK"]) // c.kwargs["SPLIT_K"] >= 4
    assert all(c.kwargs["BM"] == 64 for c in tnm._candidates("dx", tnm._SMALL_CONFIGS, 50, 4096, 14336, sms))
    large = tnm._candidates("fwd", tnm._LARGE_CONFIGS, 8192, 4096, 4096, sms)
    assert len(large) == len(tnm._LARGE_CONFIGS) and all(c.kwargs["SPLIT_K"] == 1 for c in large)
    assert all(c.kwargs["SPLIT_K"] == 1 for c in tnm._candidates("dw", tnm._DW_CONFIGS, 16, 4096, 4096, sms))
    assert max(c.kwargs["SPLIT_K"] for c in tnm._candidates("dw", tnm._DW_CONFIGS, 8192, 256, 256, sms)) > 1
    from sparsefast.backends.triton import _nm_conv
    assert max(c.kwargs["SPLIT_K"] for c in _nm_conv._dw_candidates(_nm_conv._CONV_DW_CONFIGS,
                                                                    tnm._m_class(256 * 56 * 56), 64, 576, 1, sms)) > 1


def test_autotune_keys_are_kernel_arguments():
    """Every autotuned Triton kernel is keyed on its own arguments only: Triton <= 3.8 silently
    dropped a key name that is not an argument (conv dx was keyed on ``Kred``, which it does not
    take), 3.9 refuses to launch."""
    from sparsefast.backends.triton import _nm_conv
    from sparsefast.backends.triton import unstructured as tu

    tuners = [t for t, _ in (*tnm._FWD.values(), *tnm._DX.values(), *tnm._DW.values(),
                             _nm_conv._FWD, _nm_conv._DX, _nm_conv._DW)]
    tuners += [tu._fwd, tu._dx, tu._dw, tu._gather]
    for t in tuners:
        assert t.keys and set(t.keys) <= set(t.arg_names), (t.fn, sorted(set(t.keys) - set(t.arg_names)))


def test_interpreter_masks_are_bool(monkeypatch):
    """Under the interpreter a mask built as ``tensor & (scalar == 0)`` holds int32 data; Triton
    3.9's masked load / store reject that, so ``_common.fix_interpreter_masks`` casts it to bool."""
    if not _INTERPRETED:
        pytest.skip("interpreter only")
    import triton.language as tl
    from triton.runtime import interpreter as it

    @triton.jit
    def k(x_ptr, y_ptr, N):
        r = tl.arange(0, 16)
        ok = (r < N) & (tl.program_id(0) == 0)
        tl.store(y_ptr + r, tl.load(x_ptr + r, mask=ok, other=-1.0), mask=ok | (r == 15))

    seen = []
    orig = it.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, *a, **kw):
        seen.append(mask.data.dtype)
        return orig(self, ptrs, mask, *a, **kw)

    for name in ("create_masked_store", "create_atomic_rmw"):  # restored after the test
        monkeypatch.setattr(it.InterpreterBuilder, name, getattr(it.InterpreterBuilder, name))
    monkeypatch.setattr(it.InterpreterBuilder, "create_masked_load", spy)
    from sparsefast.backends.triton._common import fix_interpreter_masks
    fix_interpreter_masks()  # wraps the spy: the spy sees what the native load gets
    x, y = torch.arange(16.0), torch.zeros(16)
    k[(1,)](x, y, 10)
    assert [str(d) for d in seen] == ["bool"]
    assert y[:10].tolist() == list(range(10)) and y[10:15].eq(0).all() and y[15] == -1


def test_aot_compile_configs_cover_every_autotune_config():
    specs = tnm.aot_compile_configs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    n_linear = 2 * (len(tnm._SMALL_CONFIGS) + len(tnm._LARGE_CONFIGS)) + len(tnm._DW_CONFIGS) + 1
    assert sum(not s.name.startswith("conv") for s in specs) == n_linear
    for kernel, signature, constexprs, *_ in specs:
        assert list(signature) == kernel.arg_names
        assert all(signature[k] == "constexpr" for k in constexprs)
    # compile the smallest forward config for sm_90 without a GPU (in a process with real kernels)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sparsefast.backends.triton.nm", "--aot", "--arch", "90",
           "--filter", "fwd small 2:4 bf16 split4 BM16 BN64 BK64 w4 s3"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert "error" not in row, row
    assert row["spill_bytes"] == 0 and row["regs"] <= 255 and row["mma"] == "wgmma"


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("M", [1, 16, 64, 200])
def test_gpu_linear_autotuned(pattern, M):
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(M)
    impl = tnm.Impl()
    N, K = 1024, 2048
    w = _randn(N, K, gen=gen, dtype=torch.bfloat16)
    mask = magnitude_mask(w, pattern, None)
    x, dy = _randn(M, K, gen=gen, dtype=torch.bfloat16), _randn(M, N, gen=gen, dtype=torch.bfloat16)
    b = _randn(N, gen=gen, dtype=torch.bfloat16)
    _close(impl.linear_fwd(x, w, mask, b, p), REF.linear_fwd(x.float(), w.float(), mask, b.float(), p), torch.bfloat16)
    _close(impl.linear_dx(dy, w, mask, p), REF.linear_dx(dy.float(), w.float(), mask, p), torch.bfloat16)
    _close(impl.linear_dw(dy, x, mask, p), REF.linear_dw(dy.float(), x.float(), mask, p), torch.bfloat16)
    assert torch.equal(tnm.pack(w, mask, p.n, p.m).meta.cpu(), fmt.pack(w.cpu(), mask.cpu(), p.n, p.m).meta)


@pytest.mark.gpu
@gpu
def test_gpu_conv_autotuned():
    p, cp = parse_pattern("2:4"), ConvParams((1, 1), (1, 1), (1, 1), 1)
    gen = torch.Generator().manual_seed(0)
    impl = tnm.Impl()
    w = _randn(64, 64, 3, 3, gen=gen, dtype=torch.bfloat16)
    mask = magnitude_mask(w, "2:4", None)
    x = _randn(4, 64, 14, 14, gen=gen, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    yr = REF.conv_fwd(x.float(), w.float(), mask, None, p, cp)
    _close(impl.conv_fwd(x, w, mask, None, p, cp), yr, torch.bfloat16)
    dy = torch.randn_like(yr).bfloat16()
    f = torch.Tensor.float
    _close(impl.conv_dx(dy, w, mask, p, cp, x.shape), REF.conv_dx(f(dy), f(w), mask, p, cp, x.shape), torch.bfloat16)
    _close(impl.conv_dw(dy, x, mask, p, cp, w.shape), REF.conv_dw(f(dy), f(x), mask, p, cp, w.shape), torch.bfloat16)
