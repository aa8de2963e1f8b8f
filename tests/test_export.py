"""sparsefast.export: compressed checkpoints, semi-structured conversion, ONNX, and the export CLI."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import sparsefast
from sparsefast import export as ex
from sparsefast import masks
from sparsefast.nn import SparseConv2d, SparseLinear

from _util import LMLogits

pytest.importorskip("safetensors", reason="sparsefast.export needs safetensors (pip install safetensors)")


class Net(nn.Module):
    """Conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear (head)."""

    def __init__(self, c=8, hid=32, out=8):
        super().__init__()
        self.conv = nn.Conv2d(c, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, hid)
        self.fc2 = nn.Linear(hid, out)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _model(dtype=torch.float32, pattern="2:4", sparsity=None, seed=0):
    torch.manual_seed(seed)
    m = Net()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    sparsefast.sparsify(m, pattern=pattern, sparsity=sparsity, backend="reference")
    return m.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _assert_state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        if k.endswith("weight") and (k[:-6] + "mask") in sa:  # kept values bit-exact, pruned are zeros
            m = sa[k[:-6] + "mask"]
            assert torch.equal(_bits(sa[k][m]), _bits(sb[k][m])), k
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("1:4", None), ("4:8", None),
                                              ("unstructured", 0.7), ("unstructured", 0.99)])
def test_roundtrip_bit_exact(tmp_path, dtype, pattern, sparsity):
    m = _model(dtype, pattern, sparsity)
    path = tmp_path / "m.safetensors"
    meta = ex.save(m, path)
    assert set(meta["layers"]) == {"conv", "fc1", "fc2"}
    # into a fresh model of the same architecture with different weights / masks
    m2 = _model(dtype, pattern, sparsity, seed=1)
    assert ex.load(path, m2) is m2
    _assert_state_equal(m, m2)
    # into the plain architecture: layers are swapped for sparse ones
    plain = Net().to(dtype)
    ex.load(path, plain)
    assert isinstance(plain.fc1, SparseLinear) and isinstance(plain.conv, SparseConv2d)
    assert plain.fc1.pattern == m.fc1.pattern
    _assert_state_equal(m, plain)
    # without a model: the full state dict + rebuilt sparse layers
    ck = ex.load(path)
    assert list(ck.state_dict) == list(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(ck.state_dict[k], v), k
    x = torch.randn(3, 32, dtype=dtype)
    assert torch.equal(ck.layers["fc2"](x), m.fc2(x))
    xc = torch.randn(2, 8, 5, 5, dtype=dtype)
    assert torch.equal(ck.layers["conv"](xc), m.conv(xc))
    assert ck.layers["conv"].padding == m.conv.padding


def test_encodings_and_size(tmp_path):
    torch.manual_seed(0)
    lin = SparseLinear.from_dense(nn.Linear(512, 256).to(torch.bfloat16), pattern="2:4")
    model = nn.Sequential(lin)
    p = tmp_path / "a.safetensors"
    meta = ex.save(model, p)
    assert meta["layers"]["0"]["encoding"] == "bitmap"
    dense_bytes = (512 * 256 + 256) * 2
    assert os.path.getsize(p) <= 0.6 * dense_bytes, os.path.getsize(p) / dense_bytes
    lin2 = SparseLinear.from_dense(nn.Linear(512, 256), pattern="unstructured", sparsity=0.99)
    meta = ex.save(nn.Sequential(lin2), p)
    assert meta["layers"]["0"]["encoding"] == "indices"
    assert os.path.getsize(p) < 0.1 * (512 * 256 * 4)
    assert torch.equal(ex.load(p).layers["0"].mask, lin2.mask)


def test_root_layer_and_kept_zero(tmp_path):
    lin = SparseLinear(16, 4, pattern="2:4")
    idx = lin.mask.nonzero()[0]  # a kept weight that is exactly zero must stay kept
    d = lin.dense_weight()
    d[idx[0], idx[1]] = 0.0
    lin.set_dense_weight(d)
    assert lin.mask[idx[0], idx[1]] and lin.dense_weight()[idx[0], idx[1]] == 0
    p = tmp_path / "l.safetensors"
    ex.save(lin, p)
    lin2 = SparseLinear(16, 4, pattern="2:4")
    ex.load(p, lin2)
    assert torch.equal(lin2.mask, lin.mask) and torch.equal(lin2.weight, lin.weight)
    assert ex.load(p).layers[""].mask.sum() == lin.mask.sum()


def test_load_errors_name_the_problem(tmp_path):
    m = _model()
    p = tmp_path / "m.safetensors"
    ex.save(m, p)
    data = p.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 40])
    with pytest.raises(ex.CheckpointError, match="corrupted or truncated"):
        ex.load(trunc)
    flip = tmp_path / "flip.safetensors"
    b = bytearray(data)
    b[-10] ^= 0xFF
    flip.write_bytes(bytes(b))
    with pytest.raises(ex.CheckpointError, match="checksum"):
        ex.load(flip)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ex.CheckpointError):
        ex.load(junk)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(ex.CheckpointError, match="not a sparsefast checkpoint"):
        ex.load(other)
    with pytest.raises(FileNotFoundError):
        ex.load(tmp_path / "missing.safetensors")
    # wrong architecture: error names the layer, model untouched
    wrong = nn.Sequential(nn.Linear(3, 3))
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match="conv"):
        ex.load(p, wrong)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
    # pattern mismatch: a 2:4 layer cannot take an unstructured 70% mask
    p2 = tmp_path / "u.safetensors"
    ex.save(_model(pattern="unstructured", sparsity=0.3), p2)
    target = _model()
    w0 = target.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="fc1|conv|fc2"):
        ex.load(p2, target)
    assert torch.equal(target.fc1.weight, w0)


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    ex.save(_model(), p)
    good = p.read_bytes()
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.save(_model(seed=3), p)
    assert p.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_honours_umask_like_torch_save(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "m.safetensors"
        ex.save(_model(), p)
        ref = tmp_path / "ref.pt"
        torch.save({"a": torch.zeros(1)}, ref)
        assert os.stat(p).st_mode & 0o777 == 0o644 == os.stat(ref).st_mode & 0o777
        os.umask(0o077)
        q = tmp_path / "private.safetensors"
        ex.save(_model(), q)
        assert os.stat(q).st_mode & 0o777 == 0o600
        os.chmod(p, 0o640)  # replacing a file keeps its permissions, as open(path, "w") would
        ex.save(_model(seed=2), p)
        assert os.stat(p).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_failed_save_names_the_users_path_not_the_temp_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(st, "save_file", broken)
    p = tmp_path / "m.safetensors"
    with pytest.raises(OSError) as ei:
        ex.save(_model(), p)
    msg = str(ei.value)
    assert str(p) in msg and ".tmp-" not in msg, msg
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(p)
    assert os.listdir(tmp_path) == []

    def broken2(tensors, filename, metadata=None):
        raise RuntimeError(f"cannot write {filename}: I/O error")

    monkeypatch.setattr(st, "save_file", broken2)
    with pytest.raises(RuntimeError) as ei:
        ex.save(_model(), p)
    assert str(p) in str(ei.value) and ".tmp-" not in str(ei.value) and "I/O error" in str(ei.value)
    assert os.listdir(tmp_path) == []


def test_semi_structured_errors_on_cpu_and_non_24():
    m = _model()
    with pytest.raises(RuntimeError, match="A100/H100"):
        ex.to_semi_structured(m)
    assert isinstance(m.fc1, SparseLinear)  # untouched
    u = _model(pattern="unstructured", sparsity=0.3)
    with pytest.raises(ValueError, match="'fc1'"):
        ex.to_semi_structured(u)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs an sm80+ CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_masked_dense_gpu(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).to("cuda", dtype)
    sparsefast.sparsify(model, pattern="2:4")
    ref = sparsefast.densify(copy.deepcopy(model))
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = ref(x)
        ex.to_semi_structured(model)
        assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_project_24_and_report():
    torch.manual_seed(0)
    m = Net()
    with pytest.raises(ValueError, match="'conv'.*not 2:4.*--prune"):
        ex.project_24(copy.deepcopy(m), prune=False)
    with pytest.warns(UserWarning):  # nothing to skip here; add a 3-channel conv that cannot be 2:4
        m2 = nn.Sequential(nn.Conv2d(3, 8, 3), Net())
        m2, rep = ex.project_24(m2)
    acts = {r["name"]: r["action"] for r in rep}
    assert acts["0"] == "skipped" and acts["1.fc1"] == "projected"
    assert isinstance(m2[1].fc1, SparseLinear) and m2[1].fc1.pattern == "2:4"
    assert masks.is_nm(m2[1].fc1.mask, 2, 4)
    r = next(r for r in rep if r["name"] == "1.fc1")
    assert r["density_after"] == pytest.approx(0.5) and 0.5 < r["magnitude_kept"] < 1.0
    report = ex.eligibility_report(m2)
    assert report.eligible == ["1.conv", "1.fc1", "1.fc2"]
    assert "0 " not in report.eligible and "not divisible by 4" in str(report)


def test_to_onnx_runs_in_onnxruntime(tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install onnx onnxruntime)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install onnxruntime)")
    from onnx import numpy_helper

    m = _model().eval()
    m.fc2 = nn.Linear(32, 8)  # a dense head: reported as not 2:4
    x = torch.randn(4, 8, 6, 6)
    path = tmp_path / "m.onnx"
    rep = ex.to_onnx(m, (x,), path)
    assert "fc1" in capsys.readouterr().out
    assert {r.name: r.eligible for r in rep} == {"conv": True, "fc1": True, "fc2": False}
    assert isinstance(m.fc1, SparseLinear)  # original untouched
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (4, 2):
        xb = torch.randn(batch, 8, 6, 6)
        (got,) = sess.run(None, {"input0": xb.numpy()})
        with torch.no_grad():
            want = m(xb)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}
    w = next(v for v in inits.values() if v.dim() == 2 and tuple(v.shape) in ((32, 16), (16, 32)))
    w = w if w.shape == (32, 16) else w.t()
    assert masks.is_nm(w != 0, 2, 4)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_to_onnx_honours_umask(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install onnx)")
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.onnx"
        ex.to_onnx(_model().eval(), (torch.randn(2, 8, 5, 5),), path, verbose=False)
        assert os.stat(path).st_mode & 0o777 == 0o644
        assert os.listdir(tmp_path) == ["m.onnx"]
    finally:
        os.umask(old)


def test_cli_export(tmp_path, capsys, monkeypatch):
    from sparsefast.cli import export as cli

    m = _model()
    src = tmp_path / "model.pt"
    torch.save(m, src)
    assert cli.main([str(src), "--format", "safetensors"]) == 0
    out = tmp_path / "model.sparse.safetensors"
    m2 = _model(seed=5)
    ex.load(out, m2)
    _assert_state_equal(m, m2)
    assert cli.main([str(src), "--format", "semi-structured", "-o", str(tmp_path / "s.pt")]) == (
        0 if torch.cuda.is_available() else 1)
    if not torch.cuda.is_available():
        assert "A100/H100" in capsys.readouterr().err
    dense = tmp_path / "dense.pt"
    torch.save(Net(), dense)
    assert cli.main([str(dense), "--format", "onnx"]) == 1
    assert "'conv'" in capsys.readouterr().err  # names the first non-2:4 layer
    try:
        import onnx  # noqa: F401 - the exporter needs it
        have_onnx = True
    except ImportError:
        have_onnx = False
    if have_onnx:
        assert cli.main([str(dense), "--format", "onnx", "--prune", "--input-shape", "2,8,5,5"]) == 0
        o = capsys.readouterr().out
        assert "pruned fc1" in o and (tmp_path / "dense.onnx").exists()
    sd = tmp_path / "sd.pt"
    torch.save(m.state_dict(), sd)
    pkg = tmp_path / "sf_export_arch.py"  # an importable architecture factory for --model
    pkg.write_text("import sys\nNet = sys.modules['%s'].Net\n" % __name__)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main([str(sd), "--format", "safetensors", "--model", "sf_export_arch:Net",
                     "-o", str(tmp_path / "sd.safetensors")]) == 0
    _assert_state_equal(m, ex.load(tmp_path / "sd.safetensors", Net()))


# ------------------------------------------------------------------------------------------------
# GPT-2 (transformers Conv1D layers, weight stored (in, out)) — issue 19
# ------------------------------------------------------------------------------------------------
def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _gpt2_ids(n=2, t=12, seed=5):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _gpt2_24(method: str):
    """A tiny GPT-2 pruned 2:4 by ``method`` (the Conv1D layers; lm_head tied to the embedding stays dense)."""
    import warnings
    from sparsefast import pruning as P
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsefast.SparsefastWarning)
        if method == "Magnitude":
            P.Magnitude(model, pattern="2:4", backend="reference").prune()
        else:
            calib = [{"input_ids": _gpt2_ids(4, 16, seed=s)} for s in (1, 2)]
            P.Wanda(model, pattern="2:4", backend="reference", progress=False).prune(batch=calib)
    return model


def _conv_names(model):
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"
                  or (isinstance(m, SparseLinear) and m._conv1d is not None))


@pytest.mark.parametrize("method", ["Magnitude", "Wanda"])
def test_gpt2_24_save_load_into_fresh_and_sparsified_models(tmp_path, method):
    from transformers.pytorch_utils import Conv1D
    model = _gpt2_24(method)
    names = _conv_names(model)
    assert len(names) == 8 and all(model.get_submodule(n).pattern == "2:4" for n in names)
    ids = _gpt2_ids()
    with torch.no_grad():
        want = model(ids).logits
    meta = ex.save(model, tmp_path / "g.safetensors")
    assert meta["version"] == 2
    for n in names:  # the state-dict layout, and the metadata says so
        info, layer = meta["layers"][n], model.get_submodule(n)
        assert info["layout"] == "conv1d" and info["conv1d_class"] == "transformers.pytorch_utils.Conv1D"
        assert tuple(info["shape"]) == (layer.in_features, layer.out_features)

    # a fresh GPT2LMHeadModel: its Conv1D layers become Conv1D-made SparseLinear layers, logits identical
    fresh = _gpt2(seed=1)
    assert isinstance(fresh.transformer.h[0].attn.c_proj, Conv1D)
    out = ex.load(tmp_path / "g.safetensors", fresh)
    assert out is fresh
    sparsefast.nn.set_backend(fresh, "reference")  # the pruned model's backend: bit-identical logits
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    for n in names:
        a, b = model.get_submodule(n), fresh.get_submodule(n)
        assert isinstance(b, SparseLinear) and b._conv1d is Conv1D and b.pattern == "2:4", n
        assert torch.equal(a.mask, b.mask) and torch.equal(a.dense_weight(), b.dense_weight()), n
    _assert_state_equal(model, fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # the tie survives

    # an already sparsified model (other 2:4 masks) with square (attn.c_proj 32x32) and non-square layers
    other = _gpt2(seed=2)
    sparsefast.sparsify(other, pattern="2:4", backend="reference", filter_fn=lambda n, m: n in names)
    ex.load(tmp_path / "g.safetensors", other)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)
    _assert_state_equal(model, other)

    # without a model: the layers rebuilt as Conv1D-made layers, the state dict in the saved layout
    ck = ex.load(tmp_path / "g.safetensors")
    for n in names:
        layer = ck.layers[n]
        layer.requested_backend = "reference"
        assert layer._conv1d is Conv1D and torch.equal(layer.mask, model.get_submodule(n).mask)
        assert torch.equal(ck.state_dict[n + ".mask"], model.state_dict()[n + ".mask"])
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            assert torch.equal(layer(x), model.get_submodule(n)(x))
    # and the Checkpoint's state dict loads straight into a sparsified copy
    third = _gpt2(seed=3)
    sparsefast.sparsify(third, pattern="2:4", backend="reference", filter_fn=lambda n, m: n in names)
    third.load_state_dict(ck.state_dict)
    with torch.no_grad():
        assert torch.equal(third(ids).logits, want)


def test_gpt2_file_in_out_in_layout_is_converted_by_its_metadata(tmp_path, monkeypatch):
    """A file whose Conv1D-made layers were stored (out, in) without a "layout" entry (how save wrote them
    before issue 19) loads correctly from its metadata, square layers included, never guessed from shapes."""
    model = _gpt2_24("Magnitude")
    ids = _gpt2_ids()
    with torch.no_grad():
        want = model(ids).logits
    with monkeypatch.context() as mp:
        mp.setattr(ex, "_conv1d_layout", lambda m: False)
        meta = ex.save(model, tmp_path / "old.safetensors")
    assert meta["version"] == 1 and all("layout" not in i for i in meta["layers"].values())
    sq = "transformer.h.0.attn.c_proj"
    assert tuple(meta["layers"][sq]["shape"]) == (32, 32)
    for target in (_gpt2(seed=1), sparsefast.sparsify(_gpt2(seed=2), pattern="2:4", backend="reference",
                                                      filter_fn=lambda n, m: n in _conv_names(model))):
        ex.load(tmp_path / "old.safetensors", target)
        sparsefast.nn.set_backend(target, "reference")
        assert torch.equal(target.get_submodule(sq).mask, model.get_submodule(sq).mask)
        with torch.no_grad():
            assert torch.equal(target(ids).logits, want)
    # a mismatching model is refused naming the layer, before anything changes
    bad = _gpt2(seed=1)
    bad.transformer.h[0].mlp.c_fc = nn.Linear(32, 128)  # an nn.Linear where the file has a Conv1D layer: fine
    ex.load(tmp_path / "old.safetensors", bad)
    sparsefast.nn.set_backend(bad, "reference")
    assert isinstance(bad.transformer.h[0].mlp.c_fc, SparseLinear) and bad.transformer.h[0].mlp.c_fc._conv1d is None
    with torch.no_grad():
        assert torch.equal(bad(ids).logits, want)
    from transformers.pytorch_utils import Conv1D
    wrong = _gpt2(seed=1)
    wrong.transformer.h[0].mlp.c_fc = Conv1D(64, 32)
    with pytest.raises(ValueError, match="transformer.h.0.mlp.c_fc"):
        ex.load(tmp_path / "old.safetensors", wrong)
    assert isinstance(wrong.transformer.h[0].attn.c_attn, Conv1D)  # untouched


def test_gpt2_to_onnx_runs(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install onnx onnxruntime)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install onnxruntime)")
    model = _gpt2_24("Wanda")

    wrapped = LMLogits(model).eval()
    ids = _gpt2_ids(2, 8, seed=3)
    rep = ex.to_onnx(wrapped, (ids,), tmp_path / "gpt2.onnx", verbose=False, dynamic_batch=False)
    rows = {r.name: r for r in rep}
    for n in _conv_names(model):
        r = rows["lm." + n]
        assert r.eligible and r.type == "SparseLinear" and r.shape == model.get_submodule(n).weight_shape
    assert not rows["lm.lm_head"].eligible
    assert isinstance(model.transformer.h[0].attn.c_attn, SparseLinear)  # the model itself is not changed
    sess = ort.InferenceSession(str(tmp_path / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input0": ids.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), wrapped(ids), rtol=1e-3, atol=1e-4)


def test_project_24_on_conv1d_layers():
    from transformers.pytorch_utils import Conv1D
    not_head = lambda n, m: n != "lm_head"  # noqa: E731 - lm_head is tied to the embedding
    # Conv1D-made unstructured layers (densify to Conv1D): projected onto 2:4 as SparseLinear, not conv
    model = _gpt2()
    ref = copy.deepcopy(model)
    sparsefast.sparsify(model, sparsity=None, backend="reference", filter_fn=not_head)
    names = _conv_names(model)
    model, rep = ex.project_24(model, filter_fn=not_head)
    assert {r["action"] for r in rep} == {"projected"} and len(rep) == 8
    for n in names:
        layer, dense = model.get_submodule(n), ref.get_submodule(n).weight.detach().t()
        assert isinstance(layer, SparseLinear) and layer._conv1d is Conv1D and layer.pattern == "2:4", n
        assert torch.equal(layer.mask, masks.nm_mask(dense, 2, 4)), n  # 2:4 along in_features
        assert model.state_dict()[n + ".weight"].shape == ref.get_submodule(n).weight.shape
    ids = _gpt2_ids()
    with torch.no_grad():
        want = model(ids).logits
    # plain Conv1D layers give the same layers
    plain, rep2 = ex.project_24(copy.deepcopy(ref), filter_fn=not_head)
    sparsefast.nn.set_backend(plain, "reference")
    for n in names:
        assert plain.get_submodule(n)._conv1d is Conv1D
        assert torch.equal(plain.get_submodule(n).mask, model.get_submodule(n).mask)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, want)
    # already 2:4: kept; the report lists the Conv1D layers as (out, in) and eligible
    again, rep3 = ex.project_24(model, filter_fn=not_head)
    assert {r["action"] for r in rep3} == {"kept"}
    assert set(ex.eligibility_report(model).eligible) == set(names)
    assert set(ex.eligibility_report(ref).eligible) == set()  # dense Conv1D weights are not 2:4


def test_gpt2_to_semi_structured_refuses_on_cpu_and_builds_out_in_linears():
    model = _gpt2_24("Magnitude")
    names = _conv_names(model)
    before = copy.deepcopy(model.state_dict())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="A100/H100"):
            ex.to_semi_structured(model)
        assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)  # nothing changed
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    # what it would build, with an identity in place of to_sparse_semi_structured: an (out, in) nn.Linear
    # computing what the Conv1D-made layer computes (the 2:4 groups along in_features)
    for n in names:
        layer = model.get_submodule(n)
        lin = ex._semi_structured_linear(n, layer, lambda w: w)
        assert type(lin) is nn.Linear and tuple(lin.weight.shape) == (layer.out_features, layer.in_features)
        assert masks.is_nm(lin.weight != 0, 2, 4) and not lin.weight.requires_grad
        xi = torch.randn(5, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(lin(xi), layer(xi))
    # a plain Conv1D is a candidate with a filter_fn, seen as (out, in): a dense one is refused as not 2:4
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' \(Conv1D weight \(96, 32\)\)"):
        ex.to_semi_structured(_gpt2(), filter_fn=lambda n, m: n == "transformer.h.0.attn.c_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs an sm80+ CUDA GPU")
def test_gpt2_semi_structured_matches_gpu():
    model = _gpt2_24("Magnitude").to("cuda", torch.float16)
    ref = sparsefast.densify(copy.deepcopy(model))
    ids = _gpt2_ids(4, 32).cuda()
    with torch.no_grad():
        want = ref(ids).logits
        ex.to_semi_structured(model)
        assert isinstance(model.transformer.h[0].attn.c_attn.weight, torch.sparse.SparseSemiStructuredTensor)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_project_24_leaves_tied_layers_with_a_warning():
    """GPT-2's lm_head shares wte's weight: replacing it would silently untie them; it is skipped."""
    model = _gpt2()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="lm_head.*tied"):
        model, rep = ex.project_24(model)
    by = {r["name"]: r["action"] for r in rep}
    assert by["lm_head"] == "skipped" and {a for n, a in by.items() if n != "lm_head"} == {"projected"}
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert isinstance(model.lm_head, torch.nn.Linear) and torch.equal(model.lm_head.weight, ref.lm_head.weight)
