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

__all__ = ["sparsify", "densify", "sparse_layers", "set_backend"]


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
    with torch.no_grad():
        if old_grad is not None and tuple(old_grad.shape) == shape:
            param.grad = _kept.gather(old_grad, layer.mask).clone()
        for opt in list(_layers._OPTIMIZERS):
            st = getattr(opt, "state", {}).get(param)
            if not st:
                continue
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and tuple(v.shape) == shape and v.dim() >= 2:
                    st[k] = _kept.gather(v, layer.mask.to(v.device)).clone()


def sparsify(model: nn.Module, *, sparsity: float | None = None, pattern: str = "unstructured",
             backend: str = "auto", filter_fn: Callable[[str, nn.Module], bool] | None = None,
             tied: str = "skip") -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (those ``filter_fn(name, module)`` accepts)
    for :class:`SparseLinear` / :class:`SparseConv2d`, in place, and return the model.

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
    eff_sparsity = sparsity if (sparsity is not None or pat.is_nm) else 0.0
    names: dict[int, list[str]] = {}   # id(module) -> every path it is reachable under
    order: list[nn.Module] = []
    for n, m in model.named_modules(remove_duplicate=False):
        if type(m) not in (nn.Linear, nn.Conv2d):
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
        cls = SparseLinear if isinstance(mod, nn.Linear) else SparseConv2d
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
    return new_root


def densify(model: nn.Module) -> nn.Module:
    """Swap every sparse layer back to a plain ``nn.Linear``/``nn.Conv2d`` holding the masked weights."""
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
