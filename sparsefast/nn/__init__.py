"""Sparse layers (kept-values storage), whole-model swapping, optimizer parameter groups."""
from .layers import SparseConv2d, SparseLinear, SparseModule, param_groups
from .swap import densify, guard_load_state_dict, set_backend, sparse_layers, sparsify

__all__ = ["SparseLinear", "SparseConv2d", "SparseModule", "sparsify", "densify", "sparse_layers", "set_backend",
           "param_groups", "guard_load_state_dict"]
