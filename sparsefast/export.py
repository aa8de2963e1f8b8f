"""Export sparse models: PyTorch 2:4 tensors, compressed checkpoints, ONNX for TensorRT.

* :func:`to_semi_structured` — every 2:4 ``SparseLinear`` becomes a plain ``nn.Linear`` whose weight is a
  ``torch.sparse.SparseSemiStructuredTensor`` (PyTorch's own cuSPARSELt/CUTLASS kernels; CUDA sm80+,
  inference).
* :func:`save` / :func:`load` — a compressed **safetensors** checkpoint of a whole model: each sparse
  layer's weight is stored as its kept values + a mask encoding, every other parameter/buffer as is.
  Round trips are bit-exact for the kept values, masks, biases and every other tensor (pruned
  positions are zeros and load as ``+0.0``).
* :func:`to_onnx` — ONNX with dense weights carrying the 2:4 pattern (TensorRT's
  ``--sparsity=enable`` picks sparse tactics for them), plus a per-layer eligibility report.
* :func:`project_24` — magnitude-project Linear/Conv2d weights onto 2:4 (used by ``--prune``).

Checkpoint layout (safetensors; ``P`` is a sparse layer's module path)::

    P.weight.values   kept values, 1-D, in the row-major order of the layer's state-dict weight
                      (``(out, in)`` / ``(O, C, kh, kw)``; ``(in, out)`` for a layer made from a
                      ``transformers`` ``Conv1D``, see below) (for conv this is not the layer's in-memory
                      kept-values order, which is ``(O, kh, kw, C)``: the file format does not depend on it)
    P.weight.bitmap   uint8, the mask packed 8 positions per byte (little bit order), ceil(numel/8) bytes
      or
    P.weight.indices  int32/int64 flat positions of kept values (used when density < 1/32: smaller)
    P.bias, and every other state-dict entry (non-sparse params and buffers) stored unchanged

``P.mask`` is not stored (the encoding is the mask). The header's ``__metadata__["sparsefast"]`` is JSON:
``{"format": "sparsefast-safetensors", "version": 1 or 2, "layers": {P: {"type", "pattern", "shape",
"dtype", "encoding", "nnz", "config"[, "layout", "conv1d_class"]}}, "keys": [state-dict keys in order],
"sha256": digest of all tensor bytes}``. 2:4 in bf16 costs 1 + 1/8 bytes per dense element (values + 1
mask bit): 0.5625× dense.

**Layout (GPT-2 ``Conv1D``).** The file stores what the model's ``state_dict()`` holds. A ``SparseLinear``
made from a Hugging Face ``Conv1D`` keeps Conv1D's ``(in, out)`` layout in its state dict, so its values
and mask are stored in that layout, ``"shape"`` is ``[in, out]``, and the layer's entry says so:
``"layout": "conv1d"`` (``"conv1d_class"``: the class's import path, to rebuild it without a model). An
entry without ``"layout"`` is ``(out, in)`` (``"linear"``). :func:`load` converts between the two when the
target layer's layout differs (a plain ``Conv1D``, a Conv1D-made or a plain ``SparseLinear``, a plain
``nn.Linear``), from the metadata, never from the shapes, so a square layer is never silently transposed.
A file with a ``"layout"`` entry is written as version 2 (an older reader refuses it rather than misread
it); other files stay version 1.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import masks as _masks
from .nn import SparseConv2d, SparseLinear
from .nn.layers import SparseModule, _is_conv1d
from .nn.swap import _tied_weights

__all__ = ["to_semi_structured", "save", "load", "Checkpoint", "CheckpointError", "to_onnx", "LayerReport",
           "ExportReport", "eligibility_report", "project_24"]

_FORMAT = "sparsefast-safetensors"
_VERSION = 2          # the newest version this module reads (2: per-layer "layout")
_VERSION_PLAIN = 1    # written when no layer needs a "layout" entry, so older readers still read the file


class CheckpointError(ValueError):
    """A file is not a readable sparsefast checkpoint (corrupted, truncated, or inconsistent)."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _current_umask() -> int:
    """The process umask (read without changing it where the OS allows: Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)  # elsewhere: the classic (briefly process-wide) read
    os.umask(old)
    return old


def _renamed_error(e: Exception, tmp: str, path: str) -> Exception:
    """``e`` re-phrased to name the user's ``path`` instead of the temporary file (same type if possible)."""
    if isinstance(e, OSError) and e.errno is not None:
        strerror = (e.strerror or str(e)).replace(tmp, path)
        try:
            return type(e)(e.errno, f"{strerror} (writing {path!r})", path)
        except Exception:  # noqa: BLE001 - an OSError subclass with another signature
            return OSError(e.errno, f"{strerror} (writing {path!r})", path)
    msg = f"writing {path!r} failed: {str(e).replace(tmp, path)}"
    try:
        new = type(e)(msg)
    except Exception:  # noqa: BLE001 - an exception type that does not take one message argument
        new = RuntimeError(msg)
    return new if str(new) == msg else RuntimeError(msg)


@contextlib.contextmanager
def _atomic_path(path: "str | os.PathLike") -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path`` atomically, on
    error it is removed — so ``path`` is never left half-written. The file gets the permissions a plain
    ``open(path, "w")`` would (``0o666 & ~umask``, like ``torch.save``), not ``mkstemp``'s ``0o600``; an
    error names ``path``, not the temporary file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"directory {d!r} does not exist (writing {path!r})")
    try:  # replacing a file keeps its permissions, as open(path, "w") would
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    os.close(fd)
    try:
        yield tmp
        # set after writing: writers may (re)create the file themselves (safetensors writes 0o600)
        if os.name == "posix":
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise _renamed_error(e, tmp, path) from e
        raise


def _reduction_24(mask: torch.Tensor) -> tuple[bool, str]:
    """Is ``mask`` (layer-weight shaped bool) 2:4 along the kernel reduction order? (ok, why-not)."""
    rv = _masks.reduction_view(mask)
    if mask.dim() == 4 and mask.shape[1] % 4:
        return False, f"in_channels/groups={mask.shape[1]} is not divisible by 4 (2:4 groups run along input channels)"
    if rv.shape[1] % 4:
        return False, f"reduction dim {rv.shape[1]} is not divisible by 4"
    bad = int((rv.reshape(-1, 4).sum(1) > 2).sum())
    if bad:
        return False, f"not 2:4: {bad} of {rv.numel() // 4} groups of 4 keep more than 2 weights"
    return True, "2:4 along the reduction (input-channel) dim"


def _dense_of(mod: nn.Module) -> torch.Tensor:
    """A layer's dense weight (detached) in the kernels' orientation (``(out, in)`` / ``(O, C, kh, kw)``): a
    sparse layer's masked dense weight, a plain layer's weight (a ``transformers`` ``Conv1D``'s transposed)."""
    if isinstance(mod, SparseModule):
        return mod.dense_weight()
    return mod.weight.detach().t() if _is_conv1d(mod) else mod.weight.detach()


def _layer_mask(mod: nn.Module) -> torch.Tensor:
    """A layer's mask in the kernels' orientation (a plain layer's: its nonzeros)."""
    if isinstance(mod, SparseModule):
        return mod.mask
    return _dense_of(mod) != 0


def _weight_shape(mod: nn.Module) -> tuple[int, ...]:
    return tuple(mod.weight_shape) if isinstance(mod, SparseModule) else tuple(_dense_of(mod).shape)


def _is_linear_like(mod: nn.Module) -> bool:
    """A layer that computes ``x @ W.T + b``: a ``SparseLinear`` (also one made from a ``Conv1D``, which
    densifies back to ``Conv1D``), an exact ``nn.Linear`` or a ``transformers`` ``Conv1D``."""
    return isinstance(mod, SparseLinear) or type(mod) is nn.Linear or _is_conv1d(mod)


def _conv1d_layout(mod: nn.Module) -> bool:
    """Does ``mod``'s state dict hold its weight (and mask) in ``Conv1D``'s ``(in, out)`` layout?"""
    return _is_conv1d(mod) or (isinstance(mod, SparseLinear) and mod._conv1d is not None)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type | None:
    import importlib
    mod, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _candidates(model: nn.Module, types: tuple, filter_fn) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, types) and (filter_fn is None or filter_fn(n, m))]


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _from_dense(cls, mod: nn.Module, **kw) -> SparseModule:
    """``cls.from_dense(mod, **kw)`` keeping the bias dtype/device of ``mod`` (SparseConv2d.from_dense builds
    its bias in the default dtype)."""
    new = cls.from_dense(mod, **kw)
    if mod.bias is not None and (new.bias.dtype != mod.bias.dtype or new.bias.device != mod.bias.device):
        new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=mod.bias.requires_grad)
    return new


def _layer_config(mod: SparseModule) -> dict[str, Any]:
    if isinstance(mod, SparseLinear):
        return {"in_features": mod.in_features, "out_features": mod.out_features, "bias": mod.bias is not None}
    return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "kernel_size": list(mod.kernel_size),
            "stride": list(mod.stride), "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
            "dilation": list(mod.dilation), "groups": mod.groups, "bias": mod.bias is not None,
            "padding_mode": mod.padding_mode}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# to_semi_structured
# ------------------------------------------------------------------------------------------------
def to_semi_structured(model: nn.Module, *, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Convert every ``SparseLinear`` (those ``filter_fn(name, module)`` accepts; with a ``filter_fn``
    plain ``nn.Linear`` and ``transformers`` ``Conv1D`` layers are candidates too) into an ``nn.Linear``
    whose weight is ``torch.sparse.to_sparse_semi_structured(weight * mask)`` as ``(out_features,
    in_features)`` (frozen; inference). A layer made from a GPT-2 ``Conv1D`` becomes such an ``nn.Linear``
    too (its 2:4 groups run along ``in_features`` already; the Linear computes what the Conv1D did). In
    place; returns the model (the new root if ``model`` itself is a layer).

    Needs a CUDA GPU with 2:4 sparse tensor cores (A100/H100-class, sm80+) and the model on it.
    Raises ``ValueError`` naming the layer if its weight is not 2:4 along ``in_features``, and
    ``RuntimeError`` on a CPU/older-GPU model; all layers are checked before anything changes.
    ``SparseConv2d`` layers are left as they are (PyTorch has no semi-structured convolution), with a
    warning naming them."""
    from torch.sparse import to_sparse_semi_structured

    if filter_fn is not None:  # plain layers too: exact nn.Linear and transformers Conv1D
        targets = [(n, m) for n, m in model.named_modules() if _is_linear_like(m) and filter_fn(n, m)]
    else:
        targets = _candidates(model, (SparseLinear,), None)
    convs = [n for n, m in _candidates(model, (SparseConv2d,), filter_fn)]
    if convs:
        warnings.warn(f"to_semi_structured: leaving SparseConv2d layers {convs} unchanged (PyTorch has no "
                      "semi-structured convolution)", stacklevel=2)
    for name, mod in targets:  # validate everything first: nothing changes on error
        ok, why = _reduction_24(_layer_mask(mod))
        if not ok:
            raise ValueError(f"to_semi_structured: layer {name or '<root>'!r} ({type(mod).__name__} weight "
                             f"{_weight_shape(mod)}) cannot become a 2:4 semi-structured tensor: {why}")
    for name, mod in targets:
        label = name or "<root>"
        dev = mod.weight.device
        if dev.type != "cuda":
            raise RuntimeError(
                f"to_semi_structured: layer {label!r} is on {dev}; torch.sparse.to_sparse_semi_structured needs an "
                "A100/H100-class CUDA GPU (compute capability >= 8.0) and the model on it "
                f"({'no CUDA device here' if not torch.cuda.is_available() else 'call model.cuda() first'})")
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 0):
            raise RuntimeError(f"to_semi_structured: layer {label!r}: {torch.cuda.get_device_name(dev)} (sm{cap[0]}{cap[1]}) "
                               "has no 2:4 sparse tensor cores; an A100/H100-class GPU (sm80+) is needed")
    new_root = model
    for name, mod in targets:
        lin = _semi_structured_linear(name, mod, to_sparse_semi_structured)
        if name:
            _set_child(model, name, lin)
        else:
            new_root = lin
    return new_root


def _semi_structured_linear(name: str, mod: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Linear:
    """The frozen ``nn.Linear`` that replaces ``mod`` in :func:`to_semi_structured`: weight
    ``convert(W)`` for ``W`` the masked dense weight as ``(out_features, in_features)`` (a layer made from,
    or being, a ``transformers`` ``Conv1D`` computes ``x @ W_conv + b`` with ``W_conv = W.T``: the same
    function). ``convert`` is ``torch.sparse.to_sparse_semi_structured`` there (tests pass another)."""
    w = _dense_of(mod)
    try:
        ss = convert(w.contiguous())
    except Exception as e:  # noqa: BLE001 - name the layer whatever torch objects to
        raise RuntimeError(f"to_semi_structured: layer {name or '<root>'!r} (weight {tuple(w.shape)}, {w.dtype}): "
                           f"torch refused it: {type(e).__name__}: {e}") from e
    lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(ss, requires_grad=False)
    if mod.bias is not None:
        lin.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    lin.train(mod.training)
    return lin


# ------------------------------------------------------------------------------------------------
# compressed checkpoints
# ------------------------------------------------------------------------------------------------
def _encode_mask(mask: torch.Tensor) -> tuple[str, torch.Tensor]:
    flat = mask.detach().reshape(-1).cpu()
    nnz = int(flat.sum())
    if nnz * 32 < flat.numel():  # int32 indices are smaller than a bitmap below density 1/32
        idx = flat.nonzero().reshape(-1)
        return "indices", idx.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
    bits = np.packbits(flat.numpy().astype(np.uint8), bitorder="little")
    return "bitmap", torch.from_numpy(bits)


def _decode_mask(encoding: str, data: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    if encoding == "bitmap":
        if data.dtype != torch.uint8 or data.numel() != (numel + 7) // 8:
            raise CheckpointError(f"{where}: bitmap has {data.numel()} bytes ({data.dtype}), expected {(numel + 7) // 8} uint8")
        return torch.from_numpy(np.unpackbits(data.numpy(), count=numel, bitorder="little").astype(bool))
    if encoding == "indices":
        if data.dtype not in (torch.int32, torch.int64) or data.dim() != 1:
            raise CheckpointError(f"{where}: indices must be a 1-D int32/int64 tensor, got {data.dtype} {tuple(data.shape)}")
        if data.numel() and (int(data.min()) < 0 or int(data.max()) >= numel):
            raise CheckpointError(f"{where}: indices out of range [0, {numel})")
        m = torch.zeros(numel, dtype=torch.bool)
        m[data.long()] = True
        if int(m.sum()) != data.numel():
            raise CheckpointError(f"{where}: repeated indices")
        return m
    raise CheckpointError(f"{where}: unknown mask encoding {encoding!r}")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save(model: nn.Module, path: "str | os.PathLike") -> dict[str, Any]:
    """Write ``model``'s whole state (``state_dict``) to ``path`` as a compressed safetensors file.

    Sparse layers (``SparseLinear``/``SparseConv2d``) store kept values + mask encoding (see the module
    docstring); every other entry is stored unchanged. Everything is stored in the ``state_dict()``
    layout: a layer made from a GPT-2 ``Conv1D`` stores ``(in, out)`` and its metadata entry says
    ``"layout": "conv1d"`` (module docstring). Tensors are copied to the CPU. The file is
    written to a temporary file in the same directory and renamed into place. Returns the metadata."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - safetensors is a dependency of the export extra
        raise ImportError("sparsefast.export.save needs safetensors (pip install safetensors)") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseModule)}
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, mod in sparse.items():
        p = f"{name}." if name else ""
        w, mask = mod.dense_weight().detach().cpu(), mod.mask.detach().cpu()
        conv1d = _conv1d_layout(mod)
        if conv1d:  # the state dict's layout: Conv1D's (in, out)
            w, mask = w.t().contiguous(), mask.t().contiguous()
        enc, data = _encode_mask(mask)
        tensors[p + "weight.values"] = w.reshape(-1)[mask.reshape(-1)].clone()
        tensors[p + f"weight.{enc}"] = data.contiguous()
        layers[name] = {"type": type(mod).__name__, "pattern": mod.pattern, "shape": list(w.shape),
                        "dtype": _dtype_name(w.dtype), "encoding": enc, "nnz": int(mask.sum()),
                        "config": _layer_config(mod)}
        if conv1d:
            layers[name].update(layout="conv1d", conv1d_class=_class_path(mod._conv1d))
        skip.update({p + "weight", p + "mask"})
    for k, v in sd.items():
        if k in skip:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save: state-dict entry {k!r} is a {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().cpu().contiguous().clone()
    version = _VERSION if any("layout" in info for info in layers.values()) else _VERSION_PLAIN
    meta = {"format": _FORMAT, "version": version, "layers": layers, "keys": list(sd.keys()),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "sha256": _digest(tensors)}
    with _atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"sparsefast": json.dumps(meta)})
    return meta


@dataclass
class Checkpoint:
    """What :func:`load` returns without a model.

    ``state_dict``: every entry of the saved model's ``state_dict`` (sparse layers' ``weight`` dense-shaped
    with zeros at pruned positions, plus their ``mask``, in the saved model's state-dict layout: ``(in, out)``
    for a layer made from a ``Conv1D``), loadable into the same architecture after ``sparsify``. ``layers``: the sparse layers rebuilt (``SparseLinear``/``SparseConv2d`` with weight,
    mask, bias, pattern and geometry), keyed by module path, ready to run. ``metadata``: the header."""

    state_dict: dict[str, torch.Tensor]
    layers: dict[str, SparseModule]
    metadata: dict[str, Any] = field(default_factory=dict)


def _read(path: "str | os.PathLike") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover
        raise ImportError("sparsefast.export.load needs safetensors (pip install safetensors)") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path!r}")
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get("sparsefast")
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointError(f"{path!r} is not a readable safetensors file (corrupted or truncated?): {e}") from e
    if raw is None:
        raise CheckpointError(f"{path!r} is a safetensors file but not a sparsefast checkpoint (no 'sparsefast' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path!r}: sparsefast metadata is not valid JSON: {e}") from e
    if meta.get("format") != _FORMAT or not isinstance(meta.get("layers"), dict):
        raise CheckpointError(f"{path!r}: unknown checkpoint format {meta.get('format')!r}")
    if int(meta.get("version", 0)) > _VERSION:
        raise CheckpointError(f"{path!r}: checkpoint version {meta.get('version')} is newer than this sparsefast "
                              f"reads ({_VERSION}); upgrade sparsefast")
    if "sha256" in meta and _digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path!r}: checksum mismatch — the file is corrupted")
    return meta, tensors


def _decode(path, meta, tensors) -> dict[str, torch.Tensor]:
    """Rebuild the full state dict (dense-shaped sparse weights + masks) in the saved key order."""
    out: dict[str, torch.Tensor] = {}
    for name, info in meta["layers"].items():
        p = f"{name}." if name else ""
        where = f"{path!r} layer {name or '<root>'!r}"
        try:
            shape, enc, nnz = tuple(info["shape"]), info["encoding"], int(info["nnz"])
            dtype = getattr(torch, info["dtype"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{where}: incomplete layer metadata ({e})") from e
        vals, data = tensors.get(p + "weight.values"), tensors.get(f"{p}weight.{enc}")
        if vals is None or data is None:
            raise CheckpointError(f"{where}: missing tensor {p}weight.values or {p}weight.{enc}")
        numel = math.prod(shape)
        mask = _decode_mask(enc, data, numel, where)
        if int(mask.sum()) != nnz or vals.numel() != nnz or vals.dtype != dtype:
            raise CheckpointError(f"{where}: {vals.numel()} stored values ({vals.dtype}) but the mask keeps "
                                  f"{int(mask.sum())} (metadata: {nnz}, {dtype})")
        w = torch.zeros(numel, dtype=dtype)
        w[mask] = vals
        out[p + "weight"], out[p + "mask"] = w.reshape(shape), mask.reshape(shape)
    for k, v in tensors.items():
        if not any(k == f"{n}.weight.{s}" if n else k == f"weight.{s}"
                   for n in meta["layers"] for s in ("values", "bitmap", "indices")):
            out[k] = v
    keys = meta.get("keys")
    if isinstance(keys, list):
        missing = [k for k in keys if k not in out]
        if missing:
            raise CheckpointError(f"{path!r}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        out = {k: out[k] for k in keys}
    return out


def _file_layout(info: dict[str, Any], where: str) -> str:
    """A layer entry's stored layout: ``"linear"`` (``(out, in)``, also for conv and entries without
    ``"layout"``) or ``"conv1d"`` (``(in, out)``)."""
    layout = info.get("layout", "linear")
    if layout not in ("linear", "conv1d") or (layout == "conv1d" and info.get("type") != "SparseLinear"):
        raise CheckpointError(f"{where}: unknown layout {layout!r} for a {info.get('type')!r} layer")
    return layout


def _build_layer(info: dict[str, Any], sd: dict[str, torch.Tensor], prefix: str) -> SparseModule:
    cfg, pattern = info["config"], info["pattern"]
    w, mask = sd[prefix + "weight"], sd[prefix + "mask"]
    conv1d = _file_layout(info, prefix.rstrip(".") or "<root>") == "conv1d"
    if conv1d:  # stored (in, out): the layer holds (out, in)
        w, mask = w.t(), mask.t()
    if info["type"] == "SparseLinear":
        layer = SparseLinear(cfg["in_features"], cfg["out_features"], cfg["bias"], pattern=pattern,
                             device=w.device, dtype=w.dtype, _mask=mask.contiguous())
        layer.set_dense_weight(w)
        if conv1d:
            cls = _import_class(str(info.get("conv1d_class", "transformers.pytorch_utils.Conv1D")))
            if cls is None:
                warnings.warn(f"layer {prefix.rstrip('.') or '<root>'!r} was made from {info.get('conv1d_class')}, "
                              "which cannot be imported here: rebuilt as a plain SparseLinear (same function; its "
                              "state dict is then in (out, in) layout and to_dense() gives an nn.Linear)",
                              stacklevel=3)
            else:
                layer._conv1d = cls
    elif info["type"] == "SparseConv2d":
        pad = cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"])
        layer = SparseConv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                             pad, tuple(cfg["dilation"]), cfg["groups"], cfg["bias"], cfg["padding_mode"],
                             pattern=pattern, _mask=mask, _weight=w.clone())
    else:
        raise CheckpointError(f"unknown sparse layer type {info['type']!r}")
    if cfg["bias"]:
        with torch.no_grad():
            layer.bias = nn.Parameter(sd[prefix + "bias"].clone())
    return layer


def load(path: "str | os.PathLike", model: nn.Module | None = None, *, device: "str | torch.device | None" = None):
    """Read a checkpoint written by :func:`save`.

    With ``model``: loads every tensor into it (strict: same keys and shapes) and returns ``model``.
    A plain ``nn.Linear``/``nn.Conv2d`` (or ``transformers`` ``Conv1D``, e.g. a fresh ``GPT2LMHeadModel``)
    where the checkpoint has a sparse layer is swapped for the sparse layer first (a ``Conv1D`` as
    :func:`sparsefast.sparsify` swaps it: a ``SparseLinear`` keeping Conv1D's state-dict layout). Weights
    and masks are converted from the file's layout (its metadata) to the target layer's. Everything is validated before the model is touched. Without ``model``: returns a
    :class:`Checkpoint` (full state dict + the sparse layers rebuilt). Raises :class:`CheckpointError`
    (a ``ValueError``) naming the problem for corrupted, truncated or inconsistent files."""
    meta, tensors = _read(path)
    sd = _decode(path, meta, tensors)
    if device is not None:
        sd = {k: v.to(device) for k, v in sd.items()}
    if model is None:
        layers = {}
        for name, info in meta["layers"].items():
            try:
                layers[name] = _build_layer(info, sd, f"{name}." if name else "")
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path!r} layer {name!r}: cannot rebuild it: {e}") from e
        return Checkpoint(sd, layers, meta)
    return _load_into(model, sd, meta["layers"], where=repr(os.fspath(path)))


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], layers: dict[str, Any], where: str) -> nn.Module:
    """Validate, swap plain layers for sparse ones where ``layers`` says so, then load strictly. ``sd`` is in
    the file's layouts (``layers[name]["layout"]``); each sparse layer's weight and mask are put in the
    target layer's state-dict layout first."""
    mods = dict(model.named_modules())
    swaps: list[tuple[str, SparseModule]] = []
    sd = dict(sd)
    for name, info in layers.items():
        p = f"{name}." if name else ""
        mod = mods.get(name)
        if mod is None:
            raise ValueError(f"load {where}: the model has no module {name!r} (a {info['type']} in the checkpoint)")
        linear_like = _is_linear_like(mod)
        if not (isinstance(mod, SparseModule) or type(mod) in (nn.Linear, nn.Conv2d) or linear_like):
            raise ValueError(f"load {where}: layer {name!r} is a {type(mod).__name__}, expected {info['type']}")
        want = SparseLinear if linear_like else SparseConv2d
        stored = tuple(info["shape"])
        file_conv1d = _file_layout(info, f"load {where}: layer {name!r}") == "conv1d"
        kernel_shape = stored[::-1] if file_conv1d else stored          # the file's (out, in) / conv shape
        if want.__name__ != info["type"] or _weight_shape(mod) != kernel_shape:
            raise ValueError(f"load {where}: layer {name!r} is {type(mod).__name__} (weight {_weight_shape(mod)} as "
                             f"(out, in)) but the checkpoint has {info['type']} {kernel_shape}")
        if file_conv1d != _conv1d_layout(mod):  # e.g. a Conv1D-made layer from an (out, in) file: convert
            sd[p + "weight"], sd[p + "mask"] = sd[p + "weight"].t().contiguous(), sd[p + "mask"].t().contiguous()
        mask = sd[p + "mask"].t() if _conv1d_layout(mod) else sd[p + "mask"]   # (out, in) / conv shape
        if isinstance(mod, SparseModule):
            _masks.validate_mask(mask.to(mod.mask.device), mod.mask, _masks.parse_pattern(mod.pattern),
                                 where=f"load {where}: layer {name!r}")
        else:
            new = _from_dense(want, mod, pattern=info["pattern"], mask=mask.contiguous().to(mod.weight.device))
            swaps.append((name, new))
    if swaps and any(n == "" for n, _ in swaps):
        raise ValueError(f"load {where}: cannot swap the root module in place; pass a sparse layer or a container")
    model_sd = model.state_dict()
    expect = set(model_sd) | {f"{n}.mask" for n, _ in swaps}
    missing, unexpected = sorted(expect - set(sd)), sorted(set(sd) - expect)
    if missing or unexpected:
        raise ValueError(f"load {where}: state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in sd.items():
        if k in model_sd and tuple(model_sd[k].shape) != tuple(v.shape):
            raise ValueError(f"load {where}: {k!r} has shape {tuple(v.shape)} in the checkpoint, "
                             f"{tuple(model_sd[k].shape)} in the model")
    for name, new in swaps:
        _set_child(model, name, new)
    model.load_state_dict(sd, strict=True)
    return model


# ------------------------------------------------------------------------------------------------
# eligibility report, 2:4 projection, ONNX
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One Linear/Conv2d layer: is its weight 2:4 along the reduction dim (TensorRT-sparse eligible)?"""

    name: str
    type: str
    shape: tuple[int, ...]
    density: float
    eligible: bool
    reason: str
    note: str = ""


class ExportReport(list):
    """A list of :class:`LayerReport`; ``str()`` is a table."""

    def __str__(self) -> str:
        if not self:
            return "(no Linear/Conv2d layers)"
        w = max(len(r.name) for r in self) + 2
        lines = [f"{'layer':{w}s}{'type':14s}{'weight shape':22s}{'density':>8s}  2:4   reason"]
        for r in self:
            lines.append(f"{r.name:{w}s}{r.type:14s}{str(r.shape):22s}{r.density:8.3f}  "
                         f"{'yes' if r.eligible else 'no ':5s} {r.reason}" + (f" ({r.note})" if r.note else ""))
        n = sum(r.eligible for r in self)
        lines.append(f"{n} of {len(self)} layers carry the 2:4 pattern (TensorRT: build with --sparsity=enable "
                     "and fp16/int8 to use sparse tensor-core tactics)")
        return "\n".join(lines)

    @property
    def eligible(self) -> list[str]:
        return [r.name for r in self if r.eligible]


def _export_layers(model: nn.Module, filter_fn) -> list[tuple[str, nn.Module]]:
    """Sparse layers, exact ``nn.Linear``/``nn.Conv2d`` and ``transformers`` ``Conv1D`` layers (subclasses such
    as ``MultiheadAttention.out_proj`` are exported by their owners), those ``filter_fn`` accepts."""
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, SparseModule) or type(m) in (nn.Linear, nn.Conv2d) or _is_conv1d(m))
            and (filter_fn is None or filter_fn(n, m))]


def eligibility_report(model: nn.Module) -> ExportReport:
    """Per Linear/Conv2d/``Conv1D`` layer (sparse or plain): is its (masked) weight 2:4 along the reduction
    dim? Shapes are ``(out, in)`` for every Linear-like layer (a ``Conv1D``'s stored weight transposed)."""
    rep = ExportReport()
    for name, mod in _export_layers(model, None):
        mask = _layer_mask(mod)
        ok, why = _reduction_24(mask)
        note = ""
        if ok and mask.dim() == 4 and (mask.shape[0] % 32 or mask.shape[1] % 32):
            note = "TensorRT usually needs channels in multiples of 32 for sparse conv tactics"
        rep.append(LayerReport(name or "<root>", type(mod).__name__, _weight_shape(mod),
                               _masks.density(mask), ok, why, note))
    return rep


def project_24(model: nn.Module, *, filter_fn: Callable[[str, nn.Module], bool] | None = None,
               prune: bool = True) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Make every Linear/Conv2d (those ``filter_fn`` accepts; a GPT-2 ``Conv1D`` too, as a ``SparseLinear``
    keeping Conv1D's state-dict layout) a 2:4 sparse layer, in place.

    A layer already 2:4 (by its mask, or a plain layer by its nonzeros) becomes/stays a 2:4
    ``SparseLinear``/``SparseConv2d``. Otherwise, with ``prune=True`` it is magnitude-projected (keep the
    2 largest |w| of each group of 4 among the kept weights) and reported; with ``prune=False`` a
    ``ValueError`` names the first such layer. Layers whose reduction dim cannot be 2:4 (not divisible
    by 4) are skipped with a warning. Returns ``(model, report)`` with one dict per layer:
    ``name, shape, action ("kept"|"converted"|"projected"|"skipped"), density_before, density_after,
    magnitude_kept`` (fraction of sum |w| that survives)."""
    todo, report = [], []
    layers = list(_export_layers(model, filter_fn))
    # a plain layer whose weight Parameter is shared (GPT-2's lm_head and wte) would stop sharing it once
    # replaced: left as it is, with a warning, as the pruners and sparsify(tied="skip") do
    tied = _tied_weights(model, [m for _, m in layers if not isinstance(m, SparseModule)])
    for name, mod in layers:
        mask = _layer_mask(mod).detach()
        rv = _masks.reduction_view(mask)
        label = name or "<root>"
        skip = None
        if id(mod) in tied:
            skip = (f": its weight is tied to {', '.join(tied[id(mod)])} (untie it first, e.g. "
                    "sparsefast.sparsify(model, tied='untie'), to make it 2:4)")
        elif rv.shape[1] % 4 or (mask.dim() == 4 and mask.shape[1] % 4):
            skip = f" (weight {tuple(mask.shape)}): reduction dim cannot hold 2:4 groups"
        if skip is not None:
            warnings.warn(f"project_24: skipping layer {label!r}{skip}", stacklevel=2)
            d = _masks.density(mask)
            report.append({"name": label, "shape": tuple(mask.shape), "action": "skipped",
                           "density_before": d, "density_after": d, "magnitude_kept": 1.0})
            continue
        ok, why = _reduction_24(mask)
        if not ok and not prune:
            raise ValueError(f"layer {label!r} ({type(mod).__name__} weight {tuple(mask.shape)}) is not 2:4: {why}; "
                             "pass --prune (prune=True) to magnitude-project it onto 2:4")
        todo.append((name, mod, mask, ok))
    new_root = model
    for name, mod, mask, ok in todo:
        label = name or "<root>"
        w = _dense_of(mod)
        new_mask = mask if ok else (mask & _masks.from_reduction_view(
            _masks.nm_mask(_masks.reduction_view(w), 2, 4), mask.shape))
        before = float(w.abs().float().sum())
        after = float((w * new_mask).abs().float().sum())
        if isinstance(mod, SparseModule) and mod.pattern == "2:4" and ok:
            action = "kept"
        else:
            dense = mod.to_dense() if isinstance(mod, SparseModule) else mod  # nn.Linear / Conv1D / nn.Conv2d
            cls = SparseLinear if _is_linear_like(mod) else SparseConv2d
            backend = mod.requested_backend if isinstance(mod, SparseModule) else "auto"
            new = _from_dense(cls, dense, pattern="2:4", mask=new_mask, backend=backend)
            if name:
                _set_child(model, name, new)
            else:
                new_root = new
            action = "converted" if ok else "projected"
        report.append({"name": label, "shape": tuple(mask.shape), "action": action,
                       "density_before": _masks.density(mask), "density_after": _masks.density(new_mask),
                       "magnitude_kept": after / before if before else 1.0})
    return new_root, report


def _onnx_export(model: nn.Module, args: tuple, path: str, **kw) -> None:
    kw.setdefault("opset_version", 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated
        try:
            torch.onnx.export(model, args, path, dynamo=False, **kw)
            return
        except TypeError as e:  # very old torch: no `dynamo` keyword
            if "dynamo" not in str(e):
                raise
        torch.onnx.export(model, args, path, **kw)


def to_onnx(model: nn.Module, example_inputs, path: "str | os.PathLike", *, verbose: bool = True,
            dynamic_batch: bool = True, **export_kwargs) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` with dense weights that carry the 2:4 pattern (sparse layers
    are densified on a copy: ``weight * mask``; the model itself is not changed), ready for TensorRT's
    sparse mode (``trtexec --sparsity=enable --fp16``).

    ``example_inputs``: a tensor or tuple of tensors. Inputs are named ``input0..``, outputs ``output0..``;
    with ``dynamic_batch`` dim 0 of every input/output is dynamic. Returns the per-layer eligibility
    report (printed when ``verbose``). Written via a temporary file, so ``path`` is never half-written."""
    from .nn import densify

    report = eligibility_report(model)
    if verbose:
        print(report)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    dense = densify(copy.deepcopy(model)).eval()
    with torch.no_grad():
        outs = dense(*args)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    names_in = [f"input{i}" for i in range(len(args))]
    names_out = [f"output{i}" for i in range(n_out)]
    kw = dict(input_names=names_in, output_names=names_out)
    if dynamic_batch:
        kw["dynamic_axes"] = {n: {0: "batch"} for n in names_in + names_out}
    kw.update(export_kwargs)
    with _atomic_path(path) as tmp:
        _onnx_export(dense, args, tmp, **kw)
    return report


def _is_sparsefast_safetensors(path: str) -> bool:
    """Cheap sniff: a safetensors header (8-byte little-endian length, then JSON) mentioning sparsefast."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            head = f.read(min(n, 1 << 20))
    except OSError:
        return False
    return head[:1] == b"{" and re.search(rb'"sparsefast"', head) is not None
