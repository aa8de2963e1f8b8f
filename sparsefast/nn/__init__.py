"""Sparse layers and whole-model swapping."""
from .layers import SparseConv2d, SparseLinear, SparseModule
from .swap import densify, set_backend, sparse_layers, sparsify

__all__ = ["SparseLinear", "SparseConv2d", "SparseModule", "sparsify", "densify", "sparse_layers", "set_backend"]
