"""The reference backend: masked-dense PyTorch ops. Defines the semantics every backend matches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..formats import kept as _kept
from .base import Backend, ConvParams, OpQuery, conv_dw_dense, conv_dx_dense, input_grad_follows, masked


class ReferenceBackend(Backend):
    """Masks the weight on every call and caches nothing across calls, so it stays exact even when a
    weight changes without a version bump (``w.data[...] = ...``, as ``gradcheck`` perturbs); the one
    hand-off is the dense weight a training forward built, to the dX of its own backward (the weight
    as it was at the forward, as autograd's saved tensors are). Kernel backends call its primitives
    where dense work is the faster (or the only exact) way."""

    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    kept_native = True

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        """Any floating dtype, any device, every registered pattern type: masked dense is always exact."""
        reasons = [] if q.dtype.is_floating_point else [f"reference needs a floating dtype, got {q.dtype}"]
        why = q.pattern.fits(tuple(q.weight_shape), q.op)
        return reasons + ([why] if why is not None else [])

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return F.linear(x, masked(weight, mask), bias)

    def linear_dx(self, dy, weight, mask, pattern):
        return dy @ masked(weight, mask)

    def linear_dw(self, dy, x, mask, pattern):
        return masked(dy.t() @ x, mask, inplace=True)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        return F.conv2d(x, masked(weight, mask), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        return conv_dx_dense(dy, masked(weight, mask), conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        return masked(conv_dw_dense(dy, x, conv, weight_shape), mask, inplace=True)

    # kept values: one scatter into a dense weight per forward (exact zeros at pruned positions), handed
    # to the dX call of the same backward when the one autograd path says one follows (a dense layer's
    # autograd holds its weight for dX just the same); the weight gradient is the dense GEMM gathered at
    # the kept positions (never stored dense-shaped). The hand-off is a stash in the backend's cache: one
    # entry per (values, mask), taken once; an entry whose backward never comes is replaced by the layer's
    # next forward or dropped with its values, so at most one dense weight per layer is held
    def _dense_fwd(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = _kept.scatter(values, mask)
        if input_grad_follows():
            self.stash("handoff", (values, mask), w)
        return w

    def _dense_dx(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.take("handoff", (values, mask))
        return _kept.scatter(values, mask) if w is None else w

    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        return F.linear(x, self._dense_fwd(values, mask), bias)

    def kept_linear_dx(self, dy, values, mask, pattern):
        return dy @ self._dense_dx(values, mask)

    def kept_linear_dw(self, dy, x, mask, pattern):
        return _kept.gather(dy.t() @ x, mask)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv: ConvParams):
        return F.conv2d(x, self._dense_fwd(values, mask), bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    def kept_conv_dx(self, dy, values, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        return conv_dx_dense(dy, self._dense_dx(values, mask), conv, input_shape)

    def kept_conv_dw(self, dy, x, mask, pattern, conv: ConvParams):
        return _kept.gather(conv_dw_dense(dy, x, conv, mask.shape), mask)
