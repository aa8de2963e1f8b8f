"""First-use self-checks of kernel families (sparsefast.backends.selfcheck), without a GPU: a registered
test backend with an injectable defect (fast), the real Triton families through the interpreter on CPU,
the disk cache in a fresh process, a corrupt / unwritable cache, the env switch, and CUDA graph capture
simulated by monkeypatching ``torch.cuda.is_current_stream_capturing``."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sparsefast
from sparsefast import backends
from sparsefast.backends import Backend, OpQuery, selfcheck
from sparsefast.backends.reference import ReferenceBackend
from sparsefast.backends.selfcheck import Family, Problem, SelfCheckCaptureError, SelfCheckError
from sparsefast.masks import parse_pattern

REF = ReferenceBackend()


class _Flaky(Backend):
    """A CPU backend (reference arithmetic) whose forward can be made wrong; one self-check family."""

    name = "flaky"
    devices = ("cpu",)
    auto_priority = {"cpu": 1000}
    kept_native = True
    broken = False
    runs = 0

    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        type(self).runs += 1
        y = REF.kept_linear_fwd(x, values, mask, bias, pattern)
        return y + 1 if type(self).broken else y

    def kept_linear_dx(self, dy, values, mask, pattern):
        return REF.kept_linear_dx(dy, values, mask, pattern)

    def kept_linear_dw(self, dy, x, mask, pattern):
        return REF.kept_linear_dw(dy, x, mask, pattern)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv):
        return REF.kept_conv_fwd(x, values, mask, bias, pattern, conv)

    def kept_conv_dx(self, dy, values, mask, pattern, conv, input_shape):
        return REF.kept_conv_dx(dy, values, mask, pattern, conv, input_shape)

    def kept_conv_dw(self, dy, x, mask, pattern, conv):
        return REF.kept_conv_dw(dy, x, mask, pattern, conv)

    def self_check_families(self):
        return (Family("fwd", lambda q: q.op == "linear", (Problem("fwd", (8, 16), 4),), pattern="unstructured"),)


@pytest.fixture
def iso(monkeypatch, tmp_path):
    """A private cache dir, checks enabled, no verdict or warning remembered."""
    monkeypatch.setenv("SPARSEFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSEFAST_SELF_CHECK", raising=False)
    selfcheck._forget_for_tests()
    backends._warned.clear()
    backends.clear_route_cache()
    yield tmp_path / "cache" / "selfcheck.json"
    selfcheck._forget_for_tests()
    backends._warned.clear()
    backends.clear_route_cache()


@pytest.fixture
def flaky(iso, monkeypatch):
    monkeypatch.setattr(_Flaky, "broken", False)
    monkeypatch.setattr(_Flaky, "runs", 0)
    backends.register_backend("flaky", _Flaky)
    yield iso
    backends._REGISTRY.pop("flaky", None)
    backends._instances.pop("flaky", None)
    backends._errors.pop("flaky", None)
    backends.clear_route_cache()


def _layer():
    torch.manual_seed(0)
    return sparsefast.SparseLinear(16, 8, sparsity=0.5), torch.randn(3, 16)


def test_failed_family_is_disabled_warns_once_auto_falls_back_explicit_raises(flaky):
    _Flaky.broken = True
    layer, x = _layer()
    with pytest.warns(sparsefast.SparsefastWarning) as rec:
        y = layer(x)
    msgs = [str(w.message) for w in rec if "self-check" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "flaky fwd" in msgs[0] and "cpu" in msgs[0] and "float32" in msgs[0] and "max abs error" in msgs[0]
    assert layer.backend != "flaky"                                        # auto took the next backend
    ref = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, ref)
    text = backends.explain(layer, x)
    assert "flaky: self-check failed (" in text and "max abs error" in text, text
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # warned once only
        layer(x)
        layer(torch.randn(5, 16))                                           # another row count: same verdict
    runs = _Flaky.runs
    # an explicit request never returns results: it raises with the check's error
    with pytest.raises(SelfCheckError, match="flaky fwd.*max abs error"):
        sparsefast.ops.sparse_linear(x, layer.dense_weight(), layer.mask, backend="flaky", pattern="unstructured")
    bad = sparsefast.SparseLinear(16, 8, sparsity=0.5, backend="flaky")
    with pytest.raises(RuntimeError, match="self-check"):
        bad(x)
    assert "error:" in backends.explain(bad, x) and "max abs error" in backends.explain(bad, x)
    assert _Flaky.runs == runs                                             # the kernel was not run for them
    # failures are not cached on disk (a new process checks again)
    assert not flaky.exists() or not json.loads(flaky.read_text())["entries"]


def test_passing_family_is_used_and_cached(flaky):
    layer, x = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert layer.backend == "flaky"
    assert "flaky: chosen" in backends.explain(layer, x)
    entries = json.loads(flaky.read_text())["entries"]
    (key, ent), = entries.items()
    assert ent["ok"] is True and ent["family"] == "flaky fwd" and ent["dtype"] == "float32"
    assert ent["env"]["torch"] == torch.__version__ and ent["env"]["sparsefast"] == sparsefast.__version__
    # a new process (memory forgotten) reads the verdict from disk: the check does not run again
    selfcheck._forget_for_tests()
    backends.clear_route_cache()
    runs = _Flaky.runs
    res = backends.self_check("cpu", dtypes=(torch.float32,), families=["flaky"])
    assert res["flaky fwd"]["float32"]["source"] == "disk" and res["flaky fwd"]["float32"]["ok"] is True
    assert _Flaky.runs == runs
    res = backends.self_check("cpu", dtypes=(torch.float32,), families=["flaky fwd"])
    assert res["flaky fwd"]["float32"]["source"] == "memory"
    res = backends.self_check("cpu", dtypes=(torch.float32, torch.float64), families=["flaky"], force=True)
    assert res["flaky fwd"]["float32"]["source"] == "run" and _Flaky.runs == runs + 1
    assert res["flaky fwd"]["float64"]["ok"] is None                       # not a dtype the backend declares
    with pytest.raises(ValueError, match="no kernel family matches"):
        backends.self_check("cpu", families=["nope"])


def test_corrupt_or_unwritable_cache_is_ignored(flaky, monkeypatch, tmp_path):
    flaky.parent.mkdir(parents=True)
    flaky.write_text("{not json")
    layer, x = _layer()
    layer(x)
    assert layer.backend == "flaky"
    assert json.loads(flaky.read_text())["entries"]                         # rewritten whole
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("SPARSEFAST_CACHE_DIR", str(blocker))               # a directory that cannot exist
    selfcheck._forget_for_tests()
    backends.clear_route_cache()
    res = backends.self_check("cpu", dtypes=(torch.float32,), families=["flaky"])
    assert res["flaky fwd"]["float32"]["ok"] is True


def test_env_var_skips_checks(flaky, monkeypatch):
    monkeypatch.setenv("SPARSEFAST_SELF_CHECK", "0")
    _Flaky.broken = True
    layer, x = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    assert layer.backend == "flaky" and _Flaky.runs == 1                   # only the call itself ran
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias) + 1)


def test_capture_refuses_unchecked_family_then_eager_check_allows_it(flaky, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    layer, x = _layer()
    with pytest.raises(SelfCheckCaptureError, match="before capturing.*self_check"):
        layer(x)
    assert _Flaky.runs == 0                                                # nothing launched
    assert "error:" in backends.explain(layer, x)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert backends.self_check("cpu", dtypes=(torch.float32,), families=["flaky"])["flaky fwd"]["float32"]["ok"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    layer(x)                                                               # checked before capture: fine
    assert layer.backend == "flaky"


def _need_triton():
    if backends.why_unavailable("triton") is not None or "cpu" not in backends.get("triton").devices:
        pytest.skip(f"triton does not run on CPU tensors here: {backends.why_unavailable('triton')}")


def test_triton_families_real_checks_and_disk_cache_in_fresh_process(iso):
    """Real Triton kernels (interpreter): checks pass, are written to disk, and a fresh process reads them
    (``selfcheck.main``, as benchmarks/gpu_check.sh runs it) without running them."""
    _need_triton()
    fams = ["triton N:M fwd (M<=64)", "triton unstructured dW", "triton block fwd (M<=64)"]
    res = backends.self_check("cpu", dtypes=(torch.float32,), families=fams)
    assert set(res) == {"triton N:M fwd (M<=64) [2:4]", "triton unstructured dW", "triton block fwd (M<=64) [block:16]"}
    for row in res.values():
        assert row["float32"]["ok"] is True and row["float32"]["source"] == "run", res
    out = iso.parent / "verdicts.json"
    env = dict(os.environ, SPARSEFAST_CACHE_DIR=str(iso.parent), TRITON_INTERPRET="1")
    cmd = [sys.executable, "-c", "import sys; from sparsefast.backends.selfcheck import main; sys.exit(main())",
           "--device", "cpu", "--dtype", "fp32",
           "--json", str(out)] + [a for f in fams for a in ("--family", f)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "triton N:M fwd (M<=64) [2:4]" in p.stdout and "pass" in p.stdout
    got = json.loads(out.read_text())["results"]
    assert all(row["float32"]["source"] == "disk" for row in got.values()), got


def test_triton_injected_defect_disables_family(iso, monkeypatch):
    _need_triton()
    from sparsefast.backends.triton import nm

    real = nm.linear_fwd
    monkeypatch.setattr(nm, "linear_fwd", lambda x, p, bias: real(x, p, bias) * 1.5)
    torch.manual_seed(0)
    w, x = torch.randn(16, 32), torch.randn(4, 32)
    mask = sparsefast.masks.magnitude_mask(w, "2:4", None)
    with pytest.warns(sparsefast.SparsefastWarning, match=r"triton N:M fwd \(M<=64\) \[2:4\].*failed"):
        with pytest.raises(SelfCheckError, match=r"triton N:M fwd \(M<=64\) \[2:4\].*max abs error"):
            sparsefast.ops.sparse_linear(x, w, mask, backend="triton", pattern="2:4")
    q = OpQuery("linear", torch.device("cpu"), torch.float32, (16, 32), parse_pattern("2:4"), 4, 0.5)
    with pytest.raises(SelfCheckError):
        backends.resolve("triton", q)
    # another pattern is a separate verdict, checked on its own
    with pytest.warns(sparsefast.SparsefastWarning, match=r"\[1:4\]"):
        res = backends.self_check("cpu", dtypes=(torch.float32,), families=["triton N:M fwd (M<=64)"],
                                  patterns=["1:4"])
    assert res["triton N:M fwd (M<=64) [1:4]"]["float32"]["ok"] is False   # the defect is in every pattern
    monkeypatch.setattr(nm, "linear_fwd", real)
    res = backends.self_check("cpu", dtypes=(torch.float32,), families=["triton N:M fwd (M<=64)"], force=True)
    assert res["triton N:M fwd (M<=64) [2:4]"]["float32"]["ok"] is True    # re-run on request


def _q(op, pattern, dtype=torch.float16, m_rows=None, device="cuda"):
    shape = (64, 64) if op == "linear" else (16, 16, 3, 3)
    return OpQuery(op, torch.device(device), dtype, shape, parse_pattern(pattern), m_rows, 0.5)


def test_cuda_and_triton_family_declarations():
    """Without a GPU: the declared families cover the issue's list and each call selects the right ones."""
    from sparsefast.backends import cuda, triton

    cf = {f.name: f for f in cuda._families()}
    assert set(cf) == {"2:4 mma.sp small tile", "2:4 mma.sp mid tile", "2:4 mma.sp big tile", "2:4 wgmma.sp",
                       "2:4 mma.sp mid tile, K split", "2:4 fp32 split (bf16 hi/lo)", "2:4 conv", "CSR SpMM",
                       "CSR SDDMM"}
    sel = lambda fams, q: {n for n, f in fams.items() if f.selects(q)}  # noqa: E731
    assert sel(cf, _q("linear", "2:4", m_rows=16)) == {"2:4 mma.sp small tile", "2:4 fp32 split (bf16 hi/lo)"}
    assert sel(cf, _q("linear", "2:4", m_rows=48)) == {"2:4 mma.sp mid tile", "2:4 mma.sp big tile",
                                                       "2:4 mma.sp mid tile, K split", "2:4 fp32 split (bf16 hi/lo)"}
    assert "2:4 wgmma.sp" in sel(cf, _q("linear", "2:4", m_rows=65)) and "2:4 conv" in sel(cf, _q("conv", "2:4"))
    assert sel(cf, _q("linear", "unstructured")) == {"CSR SpMM", "CSR SDDMM"}
    assert cf["2:4 fp32 split (bf16 hi/lo)"].dtypes == (torch.float32,)
    assert torch.float32 not in cf["2:4 mma.sp small tile"].dtypes and not cf["2:4 wgmma.sp"].required
    tf = {f.name: f for f in triton._families()}
    for kind in ("N:M", "unstructured", "block"):
        for what in ("fwd (M<=64)", "fwd (M>64)", "dX (M<=64)", "dX (M>64)", "dW"):
            assert f"{kind} {what}" in tf
    assert {"N:M conv", "unstructured conv"} <= set(tf)
    assert sel(tf, _q("linear", "2:4", m_rows=8)) == {"N:M fwd (M<=64)", "N:M dX (M<=64)", "N:M dW"}
    assert sel(tf, _q("conv", "block:8")) == {"unstructured conv"}
    assert sel(tf, _q("linear", "block:8", m_rows=100)) == {"block fwd (M>64)", "block dX (M>64)", "block dW"}
    assert len(sel(tf, _q("linear", "unstructured"))) == 5                # unknown M: both size classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_family_problems_run_on_cpu_emulation(dtype):
    """Every CUDA family's check problems go through CudaBackend's real composition on CPU with the
    kernels emulated in torch (test_cuda's FakeC / CSR emulations): the problems fit the kernels' limits,
    pass against the reference, and each family runs the kernel path it names."""
    import test_cuda as tc

    from sparsefast.backends import cuda

    b = cuda.CudaBackend()
    b._C = tc.FakeC()
    b._spmm, b._sddmm = tc._emu_spmm, tc._emu_sddmm
    paths = []
    lin, conv = b._C.sf24_linear, b._C.sf24_conv2d
    b._C.sf24_linear = lambda *a: paths.append(("linear", a[-1])) or lin(*a)
    b._C.sf24_conv2d = lambda *a: paths.append(("conv", a[-1])) or conv(*a)
    cpu = torch.device("cpu")
    for fam in cuda._families():
        if fam.dtypes is not None and dtype not in fam.dtypes:
            continue
        paths.clear()
        pattern = parse_pattern(fam.pattern)
        with fam.context(b) if fam.context else __import__("contextlib").nullcontext():
            for prob in selfcheck._problems(fam, cpu, pattern):
                why = selfcheck.run_problem(b, prob, pattern, cpu, dtype, b.tolerances[dtype])
                assert why is None, (fam.name, why)
        if pattern.is_nm:
            want = 1 if "wgmma" in fam.name else 0
            assert paths and all(p == want for _, p in paths), (fam.name, paths)
        if fam.name == "2:4 conv":                                          # sparse dgrad on the transposable mask
            assert sum(op == "conv" for op, _ in paths) == 2, paths
    # the wgmma family's verdict switches that path per device and dtype
    b._wgmma_result(torch.device("cuda", 0), torch.bfloat16, True)
    b._wgmma_result(torch.device("cuda", 0), torch.float16, False)
    assert b._wgmma == {(0, torch.bfloat16): True, (0, torch.float16): False}
    assert "bfloat16: on" in b.wgmma_status[0] and "float16: off" in b.wgmma_status[0]


def test_cuda_selfcheck_env_alias(monkeypatch):
    from sparsefast.backends.cuda import CudaBackend

    b = CudaBackend()
    monkeypatch.delenv("SPARSEFAST_SELF_CHECK", raising=False)
    monkeypatch.setenv("SPARSEFAST_CUDA_SELFCHECK", "0")
    assert selfcheck.skipped_reason(b) == "SPARSEFAST_CUDA_SELFCHECK=0"
    assert selfcheck.gate(b, _q("linear", "2:4", m_rows=16)) == []
    monkeypatch.delenv("SPARSEFAST_CUDA_SELFCHECK")
    monkeypatch.setenv("SPARSEFAST_SELF_CHECK", "0")
    assert selfcheck.skipped_reason(b) == "SPARSEFAST_SELF_CHECK=0"


def test_compiled_explicit_backend_with_failed_family_raises(flaky):
    """Under torch.compile an explicit backend name is resolved too (at trace time): a failed family is
    refused there, not run."""
    _Flaky.broken = True
    layer, x = _layer()
    f = torch.compile(lambda x, v, m: sparsefast.ops.sparse_linear_kept(x, v, m, backend="flaky",
                                                                        pattern="unstructured"),
                      fullgraph=True, backend="eager")
    runs = _Flaky.runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="self-check"):
            f(x, layer.weight.detach(), layer.mask)
    assert _Flaky.runs == runs + 1  # the check's own run; the kernel never ran for the call
