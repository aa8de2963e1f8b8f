"""sparsefast: real sparse kernels (N:M and unstructured) and pruning methods for PyTorch.

Public names (see API.md): :class:`SparseLinear`, :class:`SparseConv2d`, :func:`sparsify`,
:func:`densify`, and the submodules ``masks``, ``ops``, ``backends``, ``pruning``, ``metrics``,
``export``.
"""
from __future__ import annotations

import importlib

from . import backends, masks, ops
from .backends import SparsefastWarning
from .nn import SparseConv2d, SparseLinear, densify, sparsify

__version__ = "0.1.0"
__all__ = ["SparseLinear", "SparseConv2d", "sparsify", "densify", "masks", "ops", "backends", "pruning",
           "metrics", "export", "SparsefastWarning", "__version__"]

_LAZY = ("pruning", "metrics", "export")


def __getattr__(name: str):
    if name in _LAZY:  # imported on first use: keeps `import sparsefast` light
        mod = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'sparsefast' has no attribute {name!r}")
