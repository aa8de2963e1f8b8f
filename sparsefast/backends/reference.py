"""The reference backend: masked-dense PyTorch ops. Defines the semantics every backend matches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..formats import kept as _kept
from .base import Backend, ConvParams, OpQuery, masked


class ReferenceBackend(Backend):
    """Masks the weight on every call and caches nothing, so it stays exact even when a weight
    changes without a version bump (``w.data[...] = ...``, as ``gradcheck`` perturbs). Kernel
    backends call its primitives where dense work is the faster (or the only exact) way."""

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
        return torch.nn.grad.conv2d_input(list(input_shape), masked(weight, mask), dy, conv.stride, conv.padding,
                                          conv.dilation, conv.groups)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), dy, conv.stride, conv.padding,
                                         conv.dilation, conv.groups)
        return masked(gw, mask, inplace=True)

    # kept values: one scatter into a dense weight per call (exact zeros at pruned positions); the
    # weight gradient is the dense GEMM gathered at the kept positions (never stored dense-shaped)
    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        return F.linear(x, _kept.scatter(values, mask), bias)

    def kept_linear_dx(self, dy, values, mask, pattern):
        return dy @ _kept.scatter(values, mask)

    def kept_linear_dw(self, dy, x, mask, pattern):
        return _kept.gather(dy.t() @ x, mask)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv: ConvParams):
        return F.conv2d(x, _kept.scatter(values, mask), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def kept_conv_dx(self, dy, values, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        return torch.nn.grad.conv2d_input(list(input_shape), _kept.scatter(values, mask), dy, conv.stride,
                                          conv.padding, conv.dilation, conv.groups)

    def kept_conv_dw(self, dy, x, mask, pattern, conv: ConvParams):
        gw = torch.nn.grad.conv2d_weight(x, list(mask.shape), dy, conv.stride, conv.padding,
                                         conv.dilation, conv.groups)
        return _kept.gather(gw, mask)
