"""Dense weight gradients of sparse layers, computed only when a method asks for them.

A sparse layer's ``weight.grad`` holds the gradient of its kept values only (pruned positions are not
stored; ``layer.dense_grad()`` scatters it, zeros at pruned positions). Methods that must rank pruned positions by their
gradient (RigL growth, SNFS momentum, SR-STE, EdgePopup scores) need the *dense* gradient
``G = ∂L/∂(W⊙M)`` at every position. It is recovered from what the layer sees:

* Linear: ``G = dYᵀ X`` with ``X`` the layer input ``(*, in)`` and ``dY`` the output gradient
  ``(*, out)``, both flattened over the leading dims.
* Conv2d: ``G = conv2d_weight(X, W.shape, dY, stride, padding, dilation, groups)``
  (the weight half of the convolution backward), with the layer's padding mode / ``"same"`` padding replayed.

:class:`GradCapture` registers a forward hook on each layer only while *armed* (the pruner arms it just
before the training step whose gradient it needs, and disarms it afterwards). On an armed forward with
autograd recording, the hook keeps a reference to the input and registers a hook for the output gradient;
that hook (a pre-hook on the output's autograd node, robust to later in-place ops) fires during
``backward()`` with ``dY`` and adds ``G`` (float32) into a per-layer buffer. Several
forward/backward passes before a ``pop()`` (gradient accumulation) add up. On every other step nothing
is registered and no extra work is done.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.base import ConvParams, conv_dw_dense

__all__ = ["dense_weight_grad", "conv_input_and_padding", "dense_forward", "GradCapture"]


def conv_input_and_padding(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replay a conv layer's padding on ``x`` (NCHW): returns ``(x_padded, integer padding)`` such that
    ``conv2d(x_padded, W, padding=padding)`` equals the layer's convolution."""
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        ph, pw = padding
        return F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode), (0, 0)
    if padding == "valid":
        return x, (0, 0)
    if padding == "same":
        kh, kw = layer.kernel_size
        dh, dw = layer.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)  # torch pads the extra element on the right/bottom
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)
    return x, tuple(padding)


def dense_weight_grad(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dense ``∂L/∂W`` (weight-shaped, float32) of a Linear/Conv2d-like layer from its input ``x`` and
    output gradient ``dy`` — every position, pruned or not."""
    shape = tuple(getattr(layer, "weight_shape", None) or layer.weight.shape)  # sparse layers store kept values
    x, dy = x.detach().float(), dy.detach().float()
    if len(shape) == 2:
        return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    xp, pad = conv_input_and_padding(layer, x)
    return conv_dw_dense(dy, xp, ConvParams(tuple(layer.stride), tuple(pad), tuple(layer.dilation), int(layer.groups)),
                         shape)


def dense_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` through the layer's geometry with an arbitrary dense ``weight`` and no bias (plain torch);
    used for FreezeNet's frozen (non-trainable, non-zero) weights."""
    weight = weight.to(x.dtype)
    if weight.dim() == 2:
        return F.linear(x, weight)
    xp, pad = conv_input_and_padding(layer, x)
    return F.conv2d(xp, weight, None, layer.stride, pad, layer.dilation, layer.groups)


class GradCapture:
    """Accumulates the dense weight gradient of a set of layers while armed (see module docstring)."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self._layers = list(layers)
        self._handles: list[Any] = []
        self.grads: dict[str, torch.Tensor] = {}

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self._handles:
            return
        for name, layer in self._layers:
            self._handles.append(layer.register_forward_hook(self._make_hook(name)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop(self) -> dict[str, torch.Tensor]:
        """The accumulated gradients (layer name -> float32 tensor), cleared."""
        g, self.grads = self.grads, {}
        return g

    def clear(self) -> None:
        self.grads = {}

    def _make_hook(self, name: str):
        def fwd_hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach()
            # Hook the autograd node that produced the op's result, not a tensor hook on ``output``:
            # tensor hooks are lost when the output is modified in place afterwards (ReLU(inplace=True)),
            # and the layer's output may be a view of the op's result (a reshape over leading dims).
            base = output._base if output._base is not None else output
            node, nr = base.grad_fn, base.output_nr
            if node is None:
                return
            view = base is not output
            shape, stride = output.shape, output.stride()
            offset = output.storage_offset() - base.storage_offset()
            base_contig = base.is_contiguous()

            def grad_hook(grad_outputs):
                dy = grad_outputs[nr]
                if dy is None:
                    return
                if view:  # the same view of the base's gradient
                    dy = (dy.contiguous() if base_contig else dy).as_strided(shape, stride, offset)
                g = dense_weight_grad(layer, x, dy)
                prev = self.grads.get(name)
                self.grads[name] = g if prev is None else prev + g

            node.register_prehook(grad_hook)

        return fwd_hook
