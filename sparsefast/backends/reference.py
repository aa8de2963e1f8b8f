"""The reference backend: masked-dense PyTorch ops. Defines the semantics every backend matches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Backend, ConvParams, OpQuery, masked


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        return [] if q.dtype.is_floating_point else [f"reference needs a floating dtype, got {q.dtype}"]

    @staticmethod
    def _w(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked weight, rebuilt on every call: no cache, so the reference stays exact even when a
        weight changes without a version bump (``w.data[...] = ...``, as ``gradcheck`` perturbs)."""
        return masked(weight, mask)

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return F.linear(x, self._w(weight, mask), bias)

    def linear_dx(self, dy, weight, mask, pattern):
        return dy @ self._w(weight, mask)

    def linear_dw(self, dy, x, mask, pattern):
        return masked(dy.t() @ x, mask, inplace=True)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        return F.conv2d(x, self._w(weight, mask), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        return torch.nn.grad.conv2d_input(list(input_shape), self._w(weight, mask), dy, conv.stride, conv.padding,
                                          conv.dilation, conv.groups)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), dy, conv.stride, conv.padding,
                                         conv.dilation, conv.groups)
        return masked(gw, mask, inplace=True)
