"""Whole-model module swapping: :func:`sparsify` and :func:`densify`."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .. import backends as _bk
from .. import masks as _masks
from ..formats import kept as _kept
from . import layers as _layers
from .layers import SparseConv2d, SparseLinear, SparseModule

__all__ = ["sparsify", "densify", "sparse_layers", "set_backend", "guard_load_state_dict"]


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _tied_weights(model: nn.Module, targets: list[nn.Module]) -> dict[int, list[str]]:
    """``{id(target): [other module paths sharing its weight Parameter]}`` for the targets whose weight
    Parameter object is also registered under another module of ``model``."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    mods = dict(model.named_modules(remove_duplicate=False))
    for pname, prm in model.named_parameters(remove_duplicate=False):
        owner_name = pname.rpartition(".")[0]
        owners.setdefault(id(prm), []).append((owner_name, mods[owner_name]))
    out: dict[int, list[str]] = {}
    for mod in targets:
        others = [n or "<root>" for n, o in owners.get(id(mod.weight), []) if o is not mod]
        if others:
            out[id(mod)] = sorted(set(others))
    return out


def _move_dense_state(param: nn.Parameter, layer: SparseModule, old_grad: torch.Tensor | None) -> None:
    """After ``from_dense(_adopt=True)`` turned ``param`` into kept values: gather its old dense-shaped
    gradient and the dense-shaped optimizer state of optimizers that already stepped it (e.g. AdamW's
    moments after a dense warm-up) onto the kept positions, so the next ``step()`` still works."""
    shape = tuple(layer.weight_shape)
    conv1d = getattr(layer, "_conv1d", None) is not None  # the dense tensors are (in, out): transposed

    def own(v: torch.Tensor) -> torch.Tensor:
        return v.t() if conv1d and v.dim() == 2 else v
    with torch.no_grad():
        if old_grad is not None and tuple(own(old_grad).shape) == shape:
            param.grad = _kept.gather(own(old_grad), layer.mask).clone()
        for opt in list(_layers._OPTIMIZERS):
            st = getattr(opt, "state", {}).get(param)
            if not st:
                continue
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(own(v).shape) == shape:
                    st[k] = _kept.gather(own(v), layer.mask.to(v.device)).clone()


def sparsify(model: nn.Module, *, sparsity: float | None = None, pattern: str = "unstructured",
             backend: str = "auto", filter_fn: Callable[[str, nn.Module], bool] | None = None,
             tied: str = "skip") -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (those ``filter_fn(name, module)`` accepts)
    for :class:`SparseLinear` / :class:`SparseConv2d`, in place, and return the model.

    Hugging Face ``transformers`` ``Conv1D`` layers (GPT-2's ``c_attn``/``c_proj``/``c_fc``: weight stored
    ``(in, out)``, ``y = x @ W + b``; recognised by class name and attributes, transformers is not imported)
    become a :class:`SparseLinear` of the transposed weight: masks and N:M groups are on the ``(out, in)``
    weight, i.e. N:M groups run along the input dimension (rows of Conv1D's stored weight). Such a layer
    keeps Conv1D's ``(in, out)`` layout for ``weight`` and ``mask`` in ``state_dict()`` and
    ``load_state_dict`` (so the pruned model's dict has the dense model's keys and shapes, plus the
    masks), and :func:`densify` gives back a ``Conv1D``.

    Masks keep the largest-magnitude weights: the top-n of each m-group for N:M, or the top
    ``1 - sparsity`` per layer for unstructured (``sparsity=None`` with unstructured keeps every weight:
    an all-kept mask, e.g. for a pruner to start from). A layer whose shape does not fit the pattern is
    skipped with one warning naming it. Exact ``nn.Linear``/``nn.Conv2d`` types only (subclasses such as
    ``MultiheadAttention.out_proj`` are used by their owners' functional code and are left alone).
    If ``model`` itself is a Linear/Conv2d the new layer is returned.

    The new layers take over the dense layers' Parameter objects (their data becomes the kept values;
    a gradient or optimizer state already there is gathered onto the kept positions), so an optimizer
    built on the model *before* ``sparsify`` keeps training it. A module reachable under several names
    becomes one sparse layer at every name (``filter_fn`` is asked with its first name).

    Tied weights: a layer whose weight Parameter is shared with another module (e.g. ``lm_head.weight =
    embedding.weight``) is left dense with one warning naming such layers (``tied="skip"``, default);
    ``tied="untie"`` sparsifies a copy of it instead (the tie is broken; optimizers built before do not
    see the copy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    if tied not in ("skip", "untie"):
        raise ValueError(f"sparsify: tied must be 'skip' or 'untie', got {tied!r}")
    pat = _masks.parse_pattern(pattern)
    if sparsity is not None:
        _masks.check_sparsity(sparsity)
    _bk.check_requested(backend)
    eff_sparsity = sparsity if (sparsity is not None or pat.density is not None) else 0.0
    names: dict[int, list[str]] = {}   # id(module) -> every path it is reachable under
    order: list[nn.Module] = []
    for n, m in model.named_modules(remove_duplicate=False):
        if type(m) not in (nn.Linear, nn.Conv2d) and not _layers._is_conv1d(m):
            continue
        if id(m) not in names:
            names[id(m)] = []
            order.append(m)
        names[id(m)].append(n)
    targets = [m for m in order if filter_fn is None or filter_fn(names[id(m)][0], m)]
    tied_with = _tied_weights(model, targets)
    if tied_with and tied == "skip":
        desc = ", ".join(f"{names[id(m)][0] or '<root>'!r} (weight shared with {tied_with[id(m)]})"
                         for m in targets if id(m) in tied_with)
        warnings.warn(f"sparsify: leaving layers with tied weights dense: {desc}; pass tied='untie' to sparsify "
                      "a copy of them (breaking the tie)", _bk.SparsefastWarning, stacklevel=2)
        targets = [m for m in targets if id(m) not in tied_with]
    new_root = model
    for mod in targets:
        label = names[id(mod)][0] or "<root>"
        cls = SparseConv2d if isinstance(mod, nn.Conv2d) else SparseLinear
        adopt = id(mod) not in tied_with
        old_grad = mod.weight.grad
        try:
            new = cls.from_dense(mod, sparsity=eff_sparsity, pattern=str(pat), backend=backend, _adopt=adopt)
        except ValueError as e:
            warnings.warn(f"sparsify: skipping layer {label!r} ({type(mod).__name__} weight "
                          f"{tuple(mod.weight.shape)}): {e}", _bk.SparsefastWarning, stacklevel=2)
            continue
        if adopt:
            _move_dense_state(new.weight, new, old_grad)
        for name in names[id(mod)]:
            if name:
                _set_child(model, name, new)
            else:
                new_root = new
    guard_load_state_dict(new_root)
    return new_root


def _check_load(root: nn.Module, state_dict, prefix: str, strict: bool) -> list[str]:
    """Every problem loading ``state_dict`` (keys under ``prefix``) into ``root`` would hit, found
    before anything is changed: sparse layers' masks/patterns/shapes, plain parameters' shapes, and with
    ``strict`` the missing and unexpected keys (as ``nn.Module.load_state_dict`` reports them)."""
    errors: list[str] = []
    own = root.state_dict(prefix=prefix, keep_vars=True)
    optional = set()
    for name, mod in root.named_modules(prefix=prefix.rstrip(".")):
        p = f"{name}." if name else ""
        if isinstance(mod, SparseModule):
            err = mod._staged_load(state_dict, p + "weight", p + "bias", p + "mask")
            if isinstance(err, str):
                errors.append(err)
            if p + "weight" in state_dict:
                optional.add(p + "mask")  # a plain nn.Linear/nn.Conv2d dict: the mask comes from the nonzeros
            continue
        for key, t in list(mod.named_parameters(prefix=name, recurse=False)) + list(
                mod.named_buffers(prefix=name, recurse=False)):
            v = state_dict.get(key)
            if isinstance(v, torch.Tensor) and t is not None and tuple(v.shape) != tuple(t.shape):
                errors.append(f"size mismatch for {key}: copying a param with shape {tuple(v.shape)} from "
                              f"checkpoint, the shape in current model is {tuple(t.shape)}.")
    if strict:
        missing = [k for k in own if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k.startswith(prefix) and k not in own]
        if unexpected:
            errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
        if missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
    return errors


def _fail_load(model: nn.Module, errors: list[str]):
    raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__} (nothing was loaded):"
                       "\n\t" + "\n\t".join(errors))


def _guard_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Runs before ``module`` (and so any of its children) is loaded, also when a parent loads it. torch
    passes strict=True here whatever the caller asked, so the key-set check is :class:`_GuardedLoad`'s."""
    errors = _check_load(module, state_dict, prefix, False)
    if errors:
        _fail_load(module, errors)


class _GuardedLoad:
    """``model.load_state_dict`` that checks the strict key sets before loading (picklable)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            errors = _check_load(self.model, state_dict, "", True)
            if errors:
                _fail_load(self.model, errors)
        return type(self.model).load_state_dict(self.model, state_dict, strict=strict, assign=assign)


def guard_load_state_dict(model: nn.Module) -> nn.Module:
    """Make ``model.load_state_dict`` all-or-nothing for its sparse layers: before any module is touched,
    every sparse layer's entries (mask, pattern, shapes), every plain parameter's shape and, with
    ``strict=True``, the missing/unexpected keys are checked; a problem raises the usual
    ``RuntimeError`` with every message and leaves the model unchanged. :func:`sparsify` (and so every
    pruner) installs it on the model it returns; call it yourself on a model whose sparse layers you
    built by hand. Idempotent."""
    if getattr(model, "_sparsefast_load_guard", False):
        return model

    model._register_load_state_dict_pre_hook(_guard_pre_hook, with_module=True)
    model.load_state_dict = _GuardedLoad(model)  # an instance attribute: checks strict key sets first
    model._sparsefast_load_guard = True
    return model


def densify(model: nn.Module) -> nn.Module:
    """Swap every sparse layer back to a plain ``nn.Linear``/``nn.Conv2d`` holding the masked weights (a
    ``transformers`` ``Conv1D`` for a layer :func:`sparsify` made from one, in Conv1D's layout)."""
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SparseModule)]
    made: dict[int, nn.Module] = {}  # a layer reachable under several names becomes one dense layer
    new_root = model
    for name, mod in targets:
        new = made.get(id(mod))
        if new is None:
            new = made[id(mod)] = mod.to_dense()
        if name:
            _set_child(model, name, new)
        else:
            new_root = new
    return new_root


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseModule]]:
    """``(name, layer)`` for every sparse layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseModule)]


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every sparse layer of ``model`` use ``backend`` (``"auto"`` or a name; validated first)."""
    _bk.check_requested(backend)
    for _, layer in sparse_layers(model):
        layer.requested_backend = backend
        layer._used_backend = None
    return model
