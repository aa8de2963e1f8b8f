"""The reference backend: masked-dense PyTorch ops. Defines the semantics every backend matches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Backend, ConvParams, OpQuery


def _masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` where kept, exactly 0 where pruned (unlike ``t * mask``, a NaN/Inf at a pruned position
    cannot leak through ``NaN * 0``)."""
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        return [] if q.dtype.is_floating_point else [f"reference needs a floating dtype, got {q.dtype}"]

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return F.linear(x, _masked(weight, mask), bias)

    def linear_dx(self, dy, weight, mask, pattern):
        return dy @ _masked(weight, mask)

    def linear_dw(self, dy, x, mask, pattern):
        return _masked(dy.t() @ x, mask)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        return F.conv2d(x, _masked(weight, mask), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        return torch.nn.grad.conv2d_input(list(input_shape), _masked(weight, mask), dy, conv.stride, conv.padding,
                                          conv.dilation, conv.groups)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), dy, conv.stride, conv.padding,
                                         conv.dilation, conv.groups)
        return _masked(gw, mask)
