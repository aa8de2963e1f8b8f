"""Whole-model module swapping: :func:`sparsify` and :func:`densify`."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .. import backends as _bk
from .. import masks as _masks
from .layers import SparseConv2d, SparseLinear, SparseModule

__all__ = ["sparsify", "densify", "sparse_layers", "set_backend"]


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def sparsify(model: nn.Module, *, sparsity: float | None = None, pattern: str = "unstructured",
             backend: str = "auto", filter_fn: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (those ``filter_fn(name, module)`` accepts)
    for :class:`SparseLinear` / :class:`SparseConv2d`, in place, and return the model.

    Masks keep the largest-magnitude weights: the top-n of each m-group for N:M, or the top
    ``1 - sparsity`` per layer for unstructured (``sparsity=None`` with unstructured keeps every weight:
    an all-kept mask, e.g. for a pruner to start from). A layer whose shape does not fit the pattern is
    skipped with one warning naming it. Exact ``nn.Linear``/``nn.Conv2d`` types only (subclasses such as
    ``MultiheadAttention.out_proj`` are used by their owners' functional code and are left alone).
    If ``model`` itself is a Linear/Conv2d the new layer is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    pat = _masks.parse_pattern(pattern)
    if sparsity is not None:
        _masks.check_sparsity(sparsity)
    _bk.check_requested(backend)
    eff_sparsity = sparsity if (sparsity is not None or pat.is_nm) else 0.0
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Conv2d) and (filter_fn is None or filter_fn(n, m))]
    new_root = model
    for name, mod in targets:
        cls = SparseLinear if isinstance(mod, nn.Linear) else SparseConv2d
        try:
            new = cls.from_dense(mod, sparsity=eff_sparsity, pattern=str(pat), backend=backend)
        except ValueError as e:
            warnings.warn(f"sparsify: skipping layer {name or '<root>'!r} ({type(mod).__name__} weight "
                          f"{tuple(mod.weight.shape)}): {e}", _bk.SparsefastWarning, stacklevel=2)
            continue
        if name:
            _set_child(model, name, new)
        else:
            new_root = new
    return new_root


def densify(model: nn.Module) -> nn.Module:
    """Swap every sparse layer back to a plain ``nn.Linear``/``nn.Conv2d`` holding the masked weights."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseModule)]
    new_root = model
    for name, mod in targets:
        new = mod.to_dense()
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
