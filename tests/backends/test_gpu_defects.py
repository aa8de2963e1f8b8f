"""Regression tests for GPU-code defects found by reading the code (issue 15). Each checks the host-side
logic -- workspace sizes, chosen configs, guards, refusals, the CUDA binding checks, the GPU check
script's plan -- so all of them run without a GPU (kernels, where any run, go through the Triton
interpreter that conftest enables)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import types
import warnings
from pathlib import Path

import pytest
import torch

from sparsefast.backends.base import ConvParams, OpQuery
from sparsefast.masks import magnitude_mask, parse_pattern

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
from sparsefast.backends import triton as tb  # noqa: E402
from sparsefast.backends.triton import _common, _nm_conv, interpreting  # noqa: E402
from sparsefast.backends.triton import nm as tnm  # noqa: E402
from sparsefast.backends.triton import unstructured as tun  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_interp = pytest.mark.skipif(DEV == "cpu" and not interpreting(),
                                  reason="no GPU and TRITON_INTERPRET is not set")


# ------------------------------------------------------------------------------------------------
# 1. split-K: SPLIT_K and the workspace are functions of the autotune key, not of the call's M
# ------------------------------------------------------------------------------------------------
def _classes(ms):
    out: dict[int, list[int]] = {}
    for m in ms:
        out.setdefault(tnm._m_class(m), []).append(m)
    return out


@pytest.mark.parametrize("kind,shape", [("dw", (1024, 1024)), ("fwd", (384, 2048)), ("dx", (4096, 1024)),
                                        ("fwd", (4096, 4096)), ("dw", (256, 256))])
@pytest.mark.parametrize("sms", [108, 132])
def test_split_k_depends_on_the_key_only(kind, shape, sms):
    """Every M of one autotune class gets the same SPLIT_K per config, and the workspace split
    (``_max_split`` of the key) covers every candidate -- whatever M the autotuner tuned at."""
    N, K = shape
    ms = [1, 7, 16, 17, 31, 33, 64, 65, 100, 128, 129, 300, 512, 513, 1000, 2053, 2690, 4096, 4097, 6000, 8192]
    for cls, members in _classes(ms).items():
        large = kind != "dw" and members[0] > tnm.SMALL_M
        configs = {"fwd": tnm._FWD, "dx": tnm._DX, "dw": tnm._DW}[kind][large][1]
        splits = {m: [c.kwargs["SPLIT_K"] for c in tnm._candidates(kind, configs, m, N, K, sms)] for m in members}
        assert len({tuple(v) for v in splits.values()}) == 1, (cls, splits)
        ws_split = tnm._max_split(kind, cls, N, K, sms)
        assert ws_split >= max(max(v) for v in splits.values())


class _FakeTuner:
    """Stands in for ``triton.autotune``: caches one config per key like Triton does (picking the
    candidate with the largest SPLIT_K, the worst case for the workspace) and, instead of launching,
    checks that the buffers fit what the cached config's kernel would write."""

    def __init__(self, real, out_arg):
        self.real, self.out_arg, self.cache, self.launches = real, out_arg, {}, []

    def __getitem__(self, grid):
        def run(**args):
            key = tuple(args[k] for k in self.real.keys)
            if key not in self.cache:  # as Autotuner.run: positional args -> named_args, keywords -> kwargs
                cands = self.real.early_config_prune(self.real.configs, {}, **args)
                self.cache[key] = max(cands, key=lambda c: c.kwargs["SPLIT_K"])
            cfg = self.cache[key]
            out = args[self.out_arg]
            split = cfg.kwargs["SPLIT_K"]
            tiles = grid(cfg.kwargs)[0]
            if split > 1:   # partials at pid_k * out.numel() + offset, counters at tile ids
                assert args["ws_ptr"].numel() >= split * out.numel(), (key, split, args["ws_ptr"].numel())
                assert args["lock_ptr"].numel() >= tiles
            self.launches.append((args.get("M", args.get("B")), split, args["ws_ptr"].numel()))
        return run


@pytest.fixture
def gpu_launch_planning(monkeypatch):
    """Run nm's host code as on a 132-SM GPU, without launching anything."""
    monkeypatch.setattr(tnm, "interpreting", lambda: False)
    monkeypatch.setattr(tnm, "_num_sms", lambda index: 132)
    monkeypatch.setattr(tnm, "_dev_index", lambda dev: 0)
    tnm._max_split.cache_clear()
    yield
    tnm._max_split.cache_clear()


def test_split_k_workspace_fits_a_config_reused_at_another_m(gpu_launch_planning, monkeypatch):
    """Issue 15's cases: linear_dw on a 1024x1024 weight at M=512 then M=300; forward N=384,
    K=2048 at M=2053 then M=2690 (132 SMs): the config cached at the first M fits the second's buffers."""
    dw = _FakeTuner(tnm._DW[False][0], "dw_ptr")
    monkeypatch.setitem(tnm._DW, False, (dw, tnm._DW[False][1]))
    N = K = 1024
    bm = torch.zeros(N, 128, dtype=torch.uint8)
    for M in (512, 300, 257, 511):
        tnm.linear_dw(torch.zeros(M, N, dtype=torch.float16), torch.zeros(M, K, dtype=torch.float16), bm)
    assert len(dw.cache) == 1 and len(dw.launches) == 4

    fwd = _FakeTuner(tnm._FWD[True][0], "y_ptr")
    monkeypatch.setitem(tnm._FWD, True, (fwd, tnm._FWD[True][1]))
    N, K = 384, 2048
    p = types.SimpleNamespace(values=torch.zeros(N, K // 2, dtype=torch.float16),
                              meta=torch.zeros(N, K // 8, dtype=torch.uint8), rows=N, n=2, m=4, bits=2)
    for M in (2053, 2690, 4096):
        tnm.linear_fwd(torch.zeros(M, K, dtype=torch.float16), p, None)
    assert len(fwd.cache) == 1 and {s for _, s, _ in fwd.launches} == {max(s for _, s, _ in fwd.launches)}
    assert all(ws >= s * M * N for M, s, ws in fwd.launches)


def test_conv_dw_workspace_fits_a_config_reused_at_another_batch(gpu_launch_planning, monkeypatch):
    monkeypatch.setattr(_nm_conv, "_num_sms", lambda index: 132)
    monkeypatch.setattr(_nm_conv, "_dev_index", lambda dev: 0)
    _nm_conv._max_dw_split.cache_clear()
    fake = _FakeTuner(_nm_conv._DW[0], "dw_ptr")
    monkeypatch.setattr(_nm_conv, "_DW", (fake, _nm_conv._DW[1]))
    w_shape = (64, 64, 3, 3)
    bm = torch.zeros(64, 48, dtype=torch.uint8)
    conv = ConvParams(padding=(1, 1))
    for B in (5, 3, 4):   # 3920, 2352, 3136 output pixels: one class
        x = torch.zeros(B, 64, 28, 28, dtype=torch.float16)
        _nm_conv.conv_dw(torch.zeros(B, 64, 28, 28, dtype=torch.float16), x, bm, conv, w_shape)
    _nm_conv._max_dw_split.cache_clear()
    assert len(fake.cache) == 1 and len(fake.launches) == 3


def test_conv_dw_split_depends_on_the_key_only():
    """Conv dW: the split over output pixels is the same for every pixel count of one class, and
    groups are part of the key (the split depends on them)."""
    assert "G" in _nm_conv._DW[0].keys and "M_CLASS" in _nm_conv._DW[0].keys
    for Og, Kred, G in ((64, 576, 1), (32, 288, 4), (256, 2304, 1)):
        for P in (1, 100, 3136, 50000, 802816):
            cls = tnm._m_class(P)
            members = [max(1, cls // 2 + 1), P, cls]
            splits = {tuple(c.kwargs["SPLIT_K"] for c in _nm_conv._dw_candidates(_nm_conv._CONV_DW_CONFIGS,
                                                                                 tnm._m_class(p), Og, Kred, G, 132))
                      for p in members}
            assert len(splits) == 1
            assert _nm_conv._max_dw_split(cls, Og, Kred, G, 132) == max(next(iter(splits)))


def test_workspace_refuses_int32_overflow():
    assert tnm._workspace_numel(1, 10) == 0
    assert tnm._workspace_numel(4, 10) == 40
    with pytest.raises(RuntimeError, match="int32"):
        tnm._workspace_numel(8, 2**29)


# ------------------------------------------------------------------------------------------------
# 2. fp32 matmul precision: one helper, never raising; part of the autotune keys
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_precision():
    m = torch.backends.cuda.matmul
    old = getattr(m, "fp32_precision", None)
    yield m
    if old is not None:
        m.fp32_precision = old
    else:
        m.allow_tf32 = False


def test_fp32_precision_helper_never_raises(restore_precision, monkeypatch):
    m = restore_precision
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    for value, tf32 in (("tf32", True), ("ieee", False)):
        m.fp32_precision = value   # after this, reading m.allow_tf32 raises RuntimeError (torch >= 2.9)
        assert tb.matmul_fp32_precision() == value
        assert tb.tf32_enabled() is tf32
        monkeypatch.setattr(_common, "interpreting", lambda: False)
        assert _common.prec(torch.float32) == ("tf32" if tf32 else "ieee")
        assert _common.prec(torch.bfloat16) == "ieee"
        monkeypatch.undo()
    m.fp32_precision = "none"
    assert tb.matmul_fp32_precision() in ("none", "ieee") and not tb.tf32_enabled()


def test_router_reads_precision_through_the_helper(restore_precision, fresh_warnings):
    """``backends.resolve`` keys its cache by the precision; with the new API set it must not raise."""
    m = restore_precision
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    import sparsefast.backends as sb
    m.fp32_precision = "tf32"
    q = OpQuery("linear", torch.device("cuda"), torch.float32, (64, 64), parse_pattern("2:4"), m_rows=8)
    try:
        with warnings.catch_warnings():  # a CPU-only machine falls back (and may warn)
            warnings.simplefilter("ignore")
            sb.resolve("auto", q)
    except RuntimeError as e:  # only "no backend can run this" is acceptable here, never the TF32 read
        assert "allow_tf32" not in str(e) and "TF32" not in str(e), e
    src = (ROOT / "sparsefast" / "backends" / "__init__.py").read_text()
    assert "matmul.allow_tf32" not in src.replace("``allow_tf32``", "")


def test_precision_in_autotune_keys():
    for tuner in (tnm._FWD[False][0], tnm._FWD[True][0], tnm._DX[False][0], tnm._DX[True][0], tnm._DW[False][0],
                  _nm_conv._FWD[0], _nm_conv._DX[0], _nm_conv._DW[0], tun._fwd, tun._dx, tun._dw):
        assert "PREC" in tuner.keys, tuner.keys
    for mod in ("_common.py", "unstructured.py", "nm.py", "_nm_conv.py"):
        assert "allow_tf32" not in (ROOT / "sparsefast/backends/triton" / mod).read_text(), mod


# ------------------------------------------------------------------------------------------------
# 3. device guards (Triton launches, CUDA bindings)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def guard_recorder(monkeypatch):
    """Every Triton launch must happen inside ``device_guard(<the tensors' device>)``."""
    from triton.runtime.interpreter import InterpretedFunction

    state = {"depth": 0, "devices": [], "launches": 0, "unguarded": []}

    @contextlib.contextmanager
    def guard(device):
        state["devices"].append(torch.device(device))
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    orig = InterpretedFunction.run

    def run(self, *a, **k):
        state["launches"] += 1
        if state["depth"] == 0:
            state["unguarded"].append(getattr(self.fn, "__name__", "?"))
        return orig(self, *a, **k)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    for mod in (tnm, tun):
        monkeypatch.setattr(mod, "device_guard", guard)
    return state


@needs_interp
@pytest.mark.triton
def test_nm_launches_are_device_guarded(guard_recorder):
    if DEV != "cpu":
        pytest.skip("the recorder patches the interpreter")
    w = torch.randn(16, 32)
    mask = magnitude_mask(w, "2:4", None)
    p = tnm.pack(w, mask, 2, 4)
    bm = tnm.bitmap(mask)
    x = torch.randn(3, 32)
    tnm.linear_fwd(x, p, torch.randn(16))
    tnm.linear_dw(torch.randn(3, 16), x, bm)
    assert guard_recorder["launches"] >= 4 and not guard_recorder["unguarded"], guard_recorder


@needs_interp
@pytest.mark.triton
def test_unstructured_launches_are_device_guarded(guard_recorder, monkeypatch):
    if DEV != "cpu":
        pytest.skip("the recorder patches the interpreter")
    impl = tun.Impl()
    pat = parse_pattern("unstructured")
    w = torch.randn(16, 64)
    mask = magnitude_mask(w, "unstructured", 0.7)
    x = torch.randn(3, 64)
    for path in ("gather", "decode"):
        monkeypatch.setattr(tun, "_path_override", path)
        impl.linear_fwd(x, w, mask, torch.randn(16), pat)
        impl.linear_dx(torch.randn(3, 16), w, mask, pat)
    impl.linear_dw(torch.randn(3, 16), x, mask, pat)
    assert guard_recorder["launches"] >= 6 and not guard_recorder["unguarded"], guard_recorder


def test_device_guard_helper():
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)
    g = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1


def _binding_functions(src: str) -> dict[str, str]:
    """name -> text of each top-level binding function in sf_bindings.cpp (signature + body)."""
    out = {}
    for m in re.finditer(r"^(?:at::Tensor|std::vector<at::Tensor>) (\w+)\((.*?)\) \{\n(.*?)^\}", src, re.S | re.M):
        out[m.group(1)] = m.group(0)
    return out


def test_cuda_bindings_check_every_tensor_is_on_the_reference_device():
    src = (ROOT / "csrc" / "sf_bindings.cpp").read_text()
    funcs = _binding_functions(src)
    assert {"sf24_pack", "sf24_unpack", "sf24_linear", "sf24_conv2d", "csr_spmm", "csr_sddmm"} <= set(funcs)
    for name, text in funcs.items():
        sig = text.split("{", 1)[0]
        tensors = re.findall(r"(?:at::Tensor|c10::optional<at::Tensor>)&\s*(\w+)", sig)
        checked = set(re.findall(r"check_same_device\((\w+),", text))
        ref = set(re.findall(r"check_cuda\((\w+),", text))
        assert len(ref) == 1, (name, ref)
        missing = set(tensors) - checked - ref
        assert not missing, f"{name}: no device check for {sorted(missing)}"
        # the check comes before anything reads the tensors (the guard is set after it)
        assert text.index("check_same_device") < text.index("CUDAGuard"), name


# ------------------------------------------------------------------------------------------------
# 4. int32 offsets, grid limits, bias layout, conv rows for the CUDA path choice
# ------------------------------------------------------------------------------------------------
def _q(op, shape, pattern, m_rows=None, conv=None):
    return OpQuery(op, torch.device(DEV), torch.bfloat16, shape, parse_pattern(pattern), m_rows=m_rows, conv=conv)


def test_nm_refuses_more_than_int32_elements():
    impl = tnm.Impl()
    assert not impl.not_supported_reasons(_q("linear", (4096, 4096), "2:4", m_rows=4096))
    assert any("32-bit" in r for r in impl.not_supported_reasons(_q("linear", (65536, 65536), "2:4")))
    assert any("32-bit" in r for r in impl.not_supported_reasons(_q("linear", (4096, 4096), "2:4", m_rows=2**20)))
    conv = ConvParams()
    assert any("32-bit" in r for r in impl.not_supported_reasons(
        _q("conv", (4096, 512, 3, 3), "2:4", m_rows=2**20, conv=conv)))
    with pytest.raises(RuntimeError, match="32-bit"):
        tnm._check_numel(torch.empty(2**31, dtype=torch.uint8, device="meta"))
    tnm._check_numel(torch.empty(2**31 - 1, dtype=torch.uint8, device="meta"), None)


def test_unstructured_forward_grid_fits_axis_limits():
    """Row counts ``not_supported_reasons`` accepts used to put > 65535 row blocks on grid axis 1."""
    R, K = 65535 * 64, 64
    assert not any("grid" in r for r in tun.Impl().not_supported_reasons(_q("linear", (R, K), "unstructured",
                                                                             m_rows=16)))
    for BN in (16, 32, 64, 128):
        g = tun._fwd_grid(16, 16, 1, R, BN, 1)
        assert g[1] == 1 and g[0] == triton.cdiv(R, BN) and g[2] == 1
        assert tun._fwd_grid(300, 128, 4, 1000, BN, 3) == (3 * 4 * triton.cdiv(1000, BN), 1, 3)
    with pytest.raises(RuntimeError, match="grid"):
        tun._fwd_grid(2**20, 16, 1, 2**20, 16, 1)


@needs_interp
@pytest.mark.triton
@pytest.mark.parametrize("path", ["gather", "decode"])
def test_unstructured_noncontiguous_bias(path, monkeypatch):
    monkeypatch.setattr(tun, "_path_override", path)
    torch.manual_seed(0)
    w = torch.randn(16, 64, device=DEV)
    mask = magnitude_mask(w, "unstructured", 0.6)
    x = torch.randn(3, 64, device=DEV)
    bias = torch.randn(16, 2, device=DEV)[:, 1]   # stride 2
    assert not bias.is_contiguous()
    y = tun.Impl().linear_fwd(x, w, mask, bias, parse_pattern("unstructured"))
    ref = torch.nn.functional.linear(x.double(), (w * mask).double(), bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,padding", [((2, 2), (1, 1)), ((1, 1), (0, 0)), ((3, 1), (0, 2))])
def test_cuda_conv_path_counts_output_pixels(stride, padding):
    """``CudaBackend._path`` picks wgmma by the GEMM's rows: for conv the OUTPUT pixels."""
    from sparsefast.backends.cuda import CudaBackend, conv_out_size
    b = CudaBackend.__new__(CudaBackend)
    seen = []
    b._path = lambda x, rows: seen.append(rows) or 0
    b.packed = lambda *a: types.SimpleNamespace(vals=None, vals_lo=None, meta=None)
    x = torch.randn(2, 8, 20, 12)
    conv = ConvParams(stride=stride, padding=padding)
    ho, wo = conv_out_size((20, 12), (3, 3), conv)
    b._C = types.SimpleNamespace(sf24_conv2d=lambda *a: torch.empty(2, 16, ho, wo))
    w = torch.randn(16, 8, 3, 3)
    b.conv_fwd(x, w, magnitude_mask(w, "2:4", None), None, parse_pattern("2:4"), conv)
    assert seen == [2 * ho * wo]


# ------------------------------------------------------------------------------------------------
# 5. benchmarks/gpu_check.sh --plan
# ------------------------------------------------------------------------------------------------
def test_gpu_check_plan():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEFAST_OUT", "OUT")}
    r = subprocess.run(["bash", str(script), "--plan"], capture_output=True, text=True, timeout=60, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^total: (\d+) s$", r.stdout, re.M)
    assert m and int(m.group(1)) <= 540, r.stdout
    stages = re.findall(r"^\s+(\S+)\s+(\d+) s", r.stdout, re.M)
    assert len(stages) >= 3 and sum(int(s) for _, s in stages) == int(m.group(1)), r.stdout
    assert {"install", "gpu-tests"} <= {n for n, _ in stages}
