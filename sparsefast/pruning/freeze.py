"""Freezing and learned masks: FreezeNet and EdgePopup.

Both keep frozen weights *regenerable from the seed*: at construction every managed layer's weight is
re-initialised from a seeded CPU generator (per layer, keyed by its name) and only the seed is stored
in ``state_dict()``; the frozen values are regenerated on load (an in-memory copy is cached).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .. import masks as _masks
from .base import Pruner, _check_batch, _check_int, _check_number
from ._grad import dense_forward, dense_weight_grad
from .pai import snip_grads

__all__ = ["FreezeNet", "EdgePopup", "init_weight"]

_INITS = ("kaiming_uniform", "kaiming_normal", "signed_constant")


def init_weight(shape: tuple[int, ...], mode: str, generator: torch.Generator) -> torch.Tensor:
    """A float32 CPU weight of ``shape`` (``(out, in, *k)``) drawn from ``generator``:
    ``"kaiming_uniform"`` = PyTorch's Linear/Conv default ``U(±1/√fan_in)``; ``"kaiming_normal"`` =
    ``N(0, 2/fan_in)``; ``"signed_constant"`` = ``±√(2/fan_in)`` with random signs (Ramanujan et al.)."""
    fan_in = int(math.prod(shape[1:]))
    if mode == "kaiming_uniform":
        b = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * b
    if mode == "kaiming_normal":
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
    if mode == "signed_constant":
        sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
        return sign * math.sqrt(2.0 / fan_in)
    raise ValueError(f"unknown init {mode!r}; choose one of {', '.join(_INITS)}")


class _SeededInit:
    """Mixin: regenerate W(0) of each managed layer from the seed."""

    init: str

    def _w0(self, n: str, layer: nn.Module) -> torch.Tensor:
        c = self._w0_cache.get(n)
        if c is None:
            c = init_weight(tuple(layer.weight_shape), self.init, self._gen("w0", n)).to(
                device=layer.weight.device, dtype=layer.weight.dtype)
            self._w0_cache[n] = c
        return c

    def _reset_to_w0(self) -> None:
        """All-kept masks (in the layers' current pattern class) and W ← W(0)."""
        for n, l in self._layers:
            # a layer whose pattern fixes its density (N:M) cannot be all-kept: the method sets its mask in prune()
            if not bool(l.mask.all()) and _masks.parse_pattern(l.pattern).density is None:
                l.set_mask(torch.ones_like(l.mask), weight=self._w0(n, l))
            else:
                l.set_dense_weight(self._w0(n, l))


class FreezeNet(_SeededInit, Pruner):
    """FreezeNet (Wimmer et al. 2020): SNIP picks the *trainable* weights; the others stay frozen at their
    initial values (not zero) — regenerated from the seed, never stored.

    ``sparsity`` is the frozen fraction (``1 − sparsity`` of the weights train; ``"global"`` SNIP ranking by
    default; N:M: the trainable set is N:M; ``block:B``: it is the b x b blocks of largest summed SNIP
    score). At construction the weights are re-initialised from the seed
    (``init``, default PyTorch's ``"kaiming_uniform"``). After ``prune(batch, loss_fn)`` each layer's mask is its
    trainable set: the sparse layer computes ``x (W⊙M)ᵀ`` with the sparse kernels (dX and the gradient of
    the trainable positions only), and a forward hook adds the frozen part ``x (W(0)⊙¬M)ᵀ`` with a plain
    dense torch op (no weight gradient). ``frozen_decay``: optional multiplicative decay of the frozen
    weights per ``step()`` (``(1 − frozen_decay)^t``, a scalar — still regenerable), default 0.
    :meth:`remove` detaches the hooks (the model then computes only the trainable part).

    Reference: no code of the authors is public; the paper's pseudo-code (arXiv 2011.14087 §3, restated
    in the authors' survey, seed 003 eq. (7)-(8), (16)) — saliency ``|∂L/∂θ ⊙ θ0|`` at the init, one
    global threshold, ``Θ = m·ϑ + (1 − m)·θ0``, gradients to the trainable part only, biases trained —
    gives the same mask and weights (``tests/pruning/test_fidelity_b.py``).
    """

    default_distribution = "global"

    def __init__(self, model: nn.Module, *, init: str = "kaiming_uniform", frozen_decay: float = 0.0,
                 batches: int = 1, **kw: Any) -> None:
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(_INITS)}")
        self.init = init
        self.frozen_decay = _check_number("frozen_decay", frozen_decay, 0.0, 1.0, hi_open=True)
        self.batches = _check_int("batches", batches, 1)
        super().__init__(model, **kw)
        self._w0_cache: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._scale = 1.0
        self._reset_to_w0()

    def frozen_weight(self, name: str) -> torch.Tensor:
        """The frozen weights of layer ``name`` (``W(0) ⊙ ¬M`` times the decay), dense-shaped."""
        return self._frozen[name] * self._scale

    def effective_weight(self, name: str) -> torch.Tensor:
        """What the layer computes with: trained ``W⊙M`` plus frozen ``W(0)⊙¬M``."""
        l = dict(self._layers)[name]
        return l.dense_weight() + (self.frozen_weight(name) if name in self._frozen else 0)

    def _install(self) -> None:
        self.remove()
        for n, l in self._layers:
            self._frozen[n] = self._w0(n, l) * ~l.mask
            self._hooks.append(l.register_forward_hook(self._make_hook(n)))

    def _make_hook(self, n: str):
        def hook(layer: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + dense_forward(layer, inputs[0], self._frozen[n] * self._scale)
        return hook

    def remove(self) -> None:
        """Remove the frozen-weight forward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        _check_batch("FreezeNet", batch)
        self.remove()
        g = snip_grads(self, batch, loss_fn, self.batches)
        scores = {n: (g[n] * l.dense_weight().float()).abs() for n, l in self._layers}
        self._apply(self._allocate(scores))
        self._install()

    def _on_step(self, t: int) -> None:
        if self.frozen_decay:
            self._scale *= (1.0 - self.frozen_decay)

    def _extra_state(self) -> dict:
        return {"init": self.init, "scale": self._scale}

    def _load_extra_state(self, d: dict) -> None:
        self.init = d["init"]
        self._scale = float(d["scale"])
        self._w0_cache = {}
        if self._pruned:
            self._install()


class _PopupSTE(torch.autograd.Function):
    """Identity on the layer output that routes the straight-through score gradient
    ``∂L/∂s = sign(s) ⊙ G ⊙ W(0)`` (G the dense weight gradient ``dYᵀX``) to the scores."""

    @staticmethod
    def forward(ctx, out, scores, x, layer, w0):  # noqa: D401
        ctx.layer, ctx.w0 = layer, w0
        ctx.save_for_backward(scores, x)
        return out.clone()  # a fresh tensor: later in-place ops (ReLU(inplace)) stay legal

    @staticmethod
    def backward(ctx, dy):
        scores, x = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[1]:
            G = dense_weight_grad(ctx.layer, x, dy)
            gs = (torch.sign(scores) * G * ctx.w0).to(scores.dtype)
        return dy, gs, None, None, None


class EdgePopup(_SeededInit, Pruner):
    """Edge-popup (Ramanujan et al. 2020): find a subnetwork of a frozen random network.

    At construction every managed weight is re-initialised from the seed (``init``, default
    ``"signed_constant"``, the paper's best) and frozen (``layer.freeze()``; biases too unless
    ``train_bias``), and each layer gets a Parameter ``popup_scores`` (weight-shaped, Kaiming-uniform
    from the seed) — build the optimizer after the pruner, or use :meth:`parameters`. The forward uses
    the top-k ``|s|`` of each layer (``"uniform"`` by default; N:M: top-n ``|s|`` per m-group; ``block:B``:
    the b x b blocks of largest summed ``|s|``), set through
    ``set_mask`` in ``prune()`` and then every ``update_every`` (1) ``step()``; kept weights hold W(0).
    Straight-through gradient: ``∂L/∂s = sign(s) ⊙ G ⊙ W(0)`` with G the dense weight gradient ``dYᵀX``
    of the layer (every position), i.e. ``G ⊙ W(0)`` with respect to ``|s|`` as in the authors' code,
    routed by a forward hook (an identity autograd function; it costs one copy of each layer output).

    Reference: allenai/hidden-networks (``simple_mnist_example.py:16-80``, ``utils/conv_type.py:14-56``):
    the same masks, score gradients and scores step by step. Count rule: each layer keeps ``round(k·n)``
    (k = 1 − sparsity); theirs ``n − int((1 − k)·n)``, at most one weight apart (``docs/methods.md``).
    """

    default_distribution = "uniform"

    def __init__(self, model: nn.Module, *, init: str = "signed_constant", train_bias: bool = False,
                 update_every: int = 1, **kw: Any) -> None:
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(_INITS)}")
        self.init = init
        self.train_bias = bool(train_bias)
        self.update_every = _check_int("update_every", update_every, 1)
        super().__init__(model, **kw)
        self._w0_cache: dict[str, torch.Tensor] = {}
        self._reset_to_w0()
        self._hooks = []
        for n, l in self._layers:
            l.freeze()
            if l.bias is not None and not self.train_bias:
                l.bias.requires_grad_(False)
            s = init_weight(tuple(l.weight_shape), "kaiming_uniform", self._gen("scores", n))
            if "popup_scores" in l._parameters:
                with torch.no_grad():
                    l.popup_scores.copy_(s)
            else:
                l.register_parameter("popup_scores", nn.Parameter(
                    s.to(device=l.weight.device, dtype=l.weight.dtype)))
            self._hooks.append(l.register_forward_hook(self._make_hook(n)))

    def parameters(self) -> list[nn.Parameter]:
        """The score Parameters (what the optimizer trains)."""
        return [l.popup_scores for _, l in self._layers]

    def _make_hook(self, n: str):
        def hook(layer: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() or not layer.popup_scores.requires_grad:
                return out
            return _PopupSTE.apply(out, layer.popup_scores, inputs[0].detach(), layer, self._w0(n, layer))
        return hook

    def remove(self) -> None:
        """Remove the score-gradient hooks (the masks and weights stay)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _update_masks(self) -> None:
        scores = {n: l.popup_scores.detach().abs().float() for n, l in self._layers}
        # every kept position (returning edges included) holds W(0)
        self._apply(self._allocate(scores), weights={n: self._w0(n, l) for n, l in self._layers})

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        self._update_masks()

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        if t % self.update_every == 0:
            self._update_masks()

    def _extra_state(self) -> dict:
        return {"init": self.init}

    def _load_extra_state(self, d: dict) -> None:
        self.init = d["init"]
        self._w0_cache = {}
        for n, l in self._layers:
            l.set_dense_weight(self._w0(n, l))
