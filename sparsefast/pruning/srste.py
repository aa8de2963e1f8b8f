"""SR-STE: N:M sparse training from scratch (Zhou et al. 2021)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .base import Pruner, _check_int, _check_number

__all__ = ["SRSTE"]


class SRSTE(Pruner):
    """Sparse-refined straight-through estimator (Zhou et al. 2021).

    Dense weights ``W`` are kept; the forward uses the N:M-masked ``W`` (the sparse layer), and
    ``W ← W − η (G + λ_W (1 − M) ⊙ W)`` with ``G`` the gradient w.r.t. the masked weights applied to every
    position (straight-through), ``λ_W`` = ``decay`` = 2e-4. The masks are recomputed from ``|W|`` every
    ``update_every`` (1) steps, so pruned weights keep evolving and can come back.

    How it is split with your optimizer: the *kept* weights live in the sparse layer and are updated by
    your optimizer (with ``G`` at kept positions). The *pruned* part of ``W`` lives in the pruner
    (a dense copy) and ``step()`` updates it with SGD (+ ``momentum``) using the dense gradient
    (recorded every step: ``dYᵀX``) plus the refining decay; the learning rate is ``lr`` or, when
    ``optimizer=`` is given, the current ``lr`` (and ``momentum``) of the group holding the layer's weight
    (so LR schedules are followed). Then the new mask (top-n ``|W|`` of each m-group) is set and the kept
    weights take their values from ``W``.

    ``pattern`` defaults to ``"2:4"``; unstructured is accepted too (top ``|W|`` at ``sparsity`` per
    ``distribution``, ``"uniform"`` by default).
    """

    default_distribution = "uniform"

    def __init__(self, model: nn.Module, *, pattern: str | None = "2:4", decay: float = 2e-4,
                 lr: float | None = None, momentum: float | None = None, optimizer: Any = None,
                 update_every: int = 1, **kw: Any) -> None:
        self.decay = _check_number("decay", decay, 0.0, math.inf)
        if lr is None and optimizer is None:
            raise ValueError("SRSTE updates the pruned part of the dense weights itself: pass lr= or optimizer=")
        self.lr = None if lr is None else _check_number("lr", lr, 0.0, math.inf)
        self.mom = None if momentum is None else _check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.optimizer = optimizer
        self.update_every = _check_int("update_every", update_every, 1)
        super().__init__(model, pattern=pattern, **kw)
        self._dense: dict[str, torch.Tensor] = {}
        self._buf: dict[str, torch.Tensor] = {}

    def _group_of(self, p: torch.Tensor) -> dict | None:
        if self.optimizer is None:
            return None
        for g in self.optimizer.param_groups:
            if any(q is p for q in g["params"]):
                return g
        return None

    def _wants_dense_grad(self, t: int) -> bool:
        return True

    def _new_masks(self) -> dict[str, torch.Tensor]:
        return self._allocate({n: self._dense[n].abs() for n in self._names})

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        self._dense = {n: l.weight.detach().float().clone() for n, l in self._layers}
        self._buf = {n: torch.zeros_like(w) for n, w in self._dense.items()}
        self._apply(self._new_masks())

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        grads = self._grads_or_warn("SR-STE update of the pruned weights")
        with torch.no_grad():
            for n, l in self._layers:
                wd, m = self._dense[n], l.mask
                wd[m] = l.weight.detach()[m].float()  # kept part: what your optimizer made of it
                if grads is None:
                    continue
                g = self._group_of(l.weight)
                lr = self.lr if self.lr is not None else float(g["lr"]) if g is not None else 0.0
                mom = self.mom if self.mom is not None else float(g.get("momentum", 0.0)) if g is not None else 0.0
                upd = grads[n].to(wd.device) + self.decay * wd
                buf = self._buf[n]
                buf.mul_(mom).add_(upd)
                buf[m] = 0.0
                wd.sub_(lr * buf * ~m)
        if t % self.update_every == 0:
            new = self._new_masks()
            self._apply(new)
            with torch.no_grad():
                for n, l in self._layers:
                    l.weight.copy_((self._dense[n] * l.mask).to(l.weight.dtype))

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The dense ``W`` (kept values from the layers, pruned values from the pruner), float32 copies."""
        out = {}
        for n, l in self._layers:
            w = self._dense[n].clone()
            w[l.mask] = l.weight.detach()[l.mask].float()
            out[n] = w
        return out

    def _extra_state(self) -> dict:
        return {"dense": {n: v.clone() for n, v in self._dense.items()},
                "buf": {n: v.clone() for n, v in self._buf.items()}}

    def _load_extra_state(self, d: dict) -> None:
        self._dense = {n: v.clone() for n, v in d["dense"].items()}
        self._buf = {n: v.clone() for n, v in d["buf"].items()}
