"""SR-STE: N:M sparse training from scratch (Zhou et al. 2021)."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..backends import SparsefastWarning
from .base import Pruner, _check_int, _check_number

__all__ = ["SRSTE"]

#: torch.optim optimizers that have stepped since an SRSTE without lr=/optimizer= was built (their
#: param groups give the learning rate of the pruned weights); the hook is registered on first need.
_STEPPED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_HOOK: list = []


def _track_stepped_optimizers() -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: _STEPPED.add(opt)))


class SRSTE(Pruner):
    """Sparse-refined straight-through estimator (Zhou et al. 2021).

    Dense weights ``W`` are kept; the forward uses the N:M-masked ``W`` (the sparse layer), and
    ``W ← W − η (G + λ_W (1 − M) ⊙ W)`` with ``G`` the gradient w.r.t. the masked weights applied to every
    position (straight-through), ``λ_W`` = ``decay`` = 2e-4. The masks are recomputed from ``|W|`` every
    ``update_every`` (1) steps, so pruned weights keep evolving and can come back.

    How it is split with your optimizer: the *kept* weights live in the sparse layer and are updated by
    your optimizer (with ``G`` at kept positions). The *pruned* part of ``W`` lives in the pruner
    (a dense copy) and ``step()`` updates it with SGD (+ ``momentum``) using the dense gradient
    (recorded every step: ``dYᵀX``) plus the refining decay; the learning rate is ``lr`` or else the
    current ``lr`` (and ``momentum``) of the param group holding the layer's weight — in ``optimizer=``
    when given, otherwise in the ``torch.optim`` optimizer that steps that weight (found automatically),
    so LR schedules are followed. Then the new mask (top-n ``|W|`` of each m-group) is set and every kept
    weight takes its value from ``W`` (``layer.set_mask(mask, weight=W)``).

    ``pattern`` defaults to ``"2:4"``; unstructured is accepted too (top ``|W|`` at ``sparsity`` per
    ``distribution``, ``"uniform"`` by default). ``block:B`` is refused (SR-STE is an N:M method; use
    :class:`RigL`, :class:`SET` or :class:`GradualMagnitude` for block sparsity).
    """

    default_distribution = "uniform"
    supports_block = ("SR-STE is an N:M method (its straight-through refining of per-weight N:M masks has no "
                      "block form; use RigL, SET or GradualMagnitude for block sparsity)")

    def __init__(self, model: nn.Module, *, pattern: str | None = "2:4", decay: float = 2e-4,
                 lr: float | None = None, momentum: float | None = None, optimizer: Any = None,
                 update_every: int = 1, **kw: Any) -> None:
        self.decay = _check_number("decay", decay, 0.0, math.inf)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"SRSTE: optimizer= must be a torch.optim optimizer, got {type(optimizer).__name__}")
        self.lr = None if lr is None else _check_number("lr", lr, 0.0, math.inf)
        self.mom = None if momentum is None else _check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.optimizer = optimizer
        self.update_every = _check_int("update_every", update_every, 1)
        super().__init__(model, pattern=pattern, **kw)
        self._dense: dict[str, torch.Tensor] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._warned_no_lr = False
        if self.lr is None and self.optimizer is None:
            _track_stepped_optimizers()

    def _group_of(self, p: torch.Tensor) -> dict | None:
        """The param group (of ``optimizer=``, else of a stepped torch.optim optimizer) holding ``p``."""
        opts = [self.optimizer] if self.optimizer is not None else list(_STEPPED)
        for opt in opts:
            for g in opt.param_groups:
                if any(q is p for q in g["params"]):
                    return g
        return None

    def _wants_dense_grad(self, t: int) -> bool:
        return True

    def _new_masks(self) -> dict[str, torch.Tensor]:
        return self._allocate({n: self._dense[n].abs() for n in self._names})

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        self._dense = {n: l.dense_weight().float() for n, l in self._layers}
        self._buf = {n: torch.zeros_like(w) for n, w in self._dense.items()}
        self._apply(self._new_masks())

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        grads = self._grads_or_warn("SR-STE update of the pruned weights")
        with torch.no_grad():
            no_lr = []
            for n, l in self._layers:
                wd, m = self._dense[n], l.mask
                wd.copy_(torch.where(m, l.dense_weight().float(), wd))  # kept part: what your optimizer made of it
                if grads is None:
                    continue
                g = self._group_of(l.weight)
                if self.lr is None and g is None:
                    no_lr.append(n)
                lr = self.lr if self.lr is not None else float(g["lr"]) if g is not None else 0.0
                mom = self.mom if self.mom is not None else float(g.get("momentum", 0.0)) if g is not None else 0.0
                upd = grads[n].to(wd.device) + self.decay * wd
                buf = self._buf[n]
                buf.mul_(mom).add_(upd)
                buf[m] = 0.0
                wd.sub_(lr * buf * ~m)
        if no_lr and not self._warned_no_lr:
            self._warned_no_lr = True
            warnings.warn(f"SRSTE: no lr= was given and no optimizer holding the weight of layer(s) {no_lr} has "
                          "stepped: their pruned weights are not updated (pass lr= or optimizer=)",
                          SparsefastWarning, stacklevel=2)
        if t % self.update_every == 0:
            # every kept position (returning ones included) takes its value from the dense W
            self._apply(self._new_masks(), weights=self._dense)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The dense ``W`` (kept values from the layers, pruned values from the pruner), float32 copies."""
        out = {}
        for n, l in self._layers:
            out[n] = torch.where(l.mask, l.dense_weight().float(), self._dense[n])
        return out

    def _extra_state(self) -> dict:
        return {"dense": {n: v.clone() for n, v in self._dense.items()},
                "buf": {n: v.clone() for n, v in self._buf.items()}}

    def _load_extra_state(self, d: dict) -> None:
        self._dense = {n: v.clone() for n, v in d["dense"].items()}
        self._buf = {n: v.clone() for n, v in d["buf"].items()}
