"""SR-STE: N:M sparse training from scratch (Zhou et al. 2021)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..backends import SparsefastWarning
from ..formats import kept as _kept
from ..nn import layers as _layers
from .base import Pruner, _check_int, _check_number

__all__ = ["SRSTE"]


class SRSTE(Pruner):
    """Sparse-refined straight-through estimator (Zhou et al. 2021), as the authors' code trains it
    (aojunzz/NM-sparsity ``devkit/sparse_ops/sparse_ops.py``: the forward uses the N:M-masked ``W``, the
    backward gives the *dense* ``W`` the gradient ``G + λ_W (1 − M) ⊙ W``; ``classification/train_imagenet.py``:
    one ``torch.optim.SGD(model.parameters(), lr, momentum, weight_decay)`` over the dense weights).

    Per step, with ``G = ∂L/∂(W ⊙ M)`` at every position, ``λ_W`` = ``decay`` (2e-4) and the SGD settings
    ``η, μ, wd`` (dampening and nesterov followed too)::

        d = G + λ_W (1 − M) ⊙ W + wd · W ;  buf = μ · buf + d ;  W = W − η · buf ;  M = top-n |W| per m-group

    with **one** momentum buffer over the dense ``W`` (a weight keeps its buffer when it changes side).
    The mask is recomputed every ``update_every`` (1) steps, so pruned weights keep evolving and come back.

    How this fits kept-values layers (the combined update is the one above): the *kept* weights live in
    the sparse layer and your optimizer updates them (``G`` at kept positions, its weight decay and its
    momentum buffer). The *pruned* part of ``W`` and of the momentum live in the pruner, and ``step()``
    (after ``optimizer.step()``) updates them with the same SGD rule, reading ``lr``, ``momentum``,
    ``dampening``, ``nesterov`` and ``weight_decay`` from the param group that holds the layer's weight
    (in ``optimizer=`` when given, else in whichever ``torch.optim`` optimizer steps that weight: found
    automatically, so LR schedules are followed), using the dense gradient recorded every step
    (``dYᵀX``). Then the new mask is set, every kept weight takes its value from ``W``
    (``layer.set_mask(mask, weight=W)``) and the optimizer's ``momentum_buffer`` of the layer is rewritten
    from the dense buffer, so a weight that changes side carries its momentum with it.

    Other optimizers (Adam, ...; no ``momentum_buffer`` state): the pruned part is updated by SGD with the
    group's ``lr`` (and its ``momentum`` / ``weight_decay`` if the group has such keys); the authors'
    update is defined for SGD only. ``lr=``, ``momentum=``, ``weight_decay=`` override what is read from
    the optimizer for the pruned part (all optional; without an optimizer stepping the weights and
    without ``lr=`` the pruned part is not updated, with one warning).

    ``pattern`` defaults to ``"2:4"``; unstructured is accepted too (top ``|W|`` at ``sparsity`` per
    ``distribution``, ``"uniform"`` by default). ``block:B`` is refused (SR-STE is an N:M method; use
    :class:`RigL`, :class:`SET` or :class:`GradualMagnitude` for block sparsity). N:M ties follow
    ``torch.sort`` (stable, lower index kept) where the authors use ``argsort``; ties of ``|W|`` inside a
    group practically never occur with float weights.
    """

    default_distribution = "uniform"
    supports_block = ("SR-STE is an N:M method (its straight-through refining of per-weight N:M masks has no "
                      "block form; use RigL, SET or GradualMagnitude for block sparsity)")

    def __init__(self, model: nn.Module, *, pattern: str | None = "2:4", decay: float = 2e-4,
                 lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                 optimizer: Any = None, update_every: int = 1, **kw: Any) -> None:
        self.decay = _check_number("decay", decay, 0.0, math.inf)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"SRSTE: optimizer= must be a torch.optim optimizer, got {type(optimizer).__name__}")
        self.lr = None if lr is None else _check_number("lr", lr, 0.0, math.inf)
        self.mom = None if momentum is None else _check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.weight_decay = None if weight_decay is None else _check_number("weight_decay", weight_decay, 0.0,
                                                                            math.inf)
        self.optimizer = optimizer
        self.update_every = _check_int("update_every", update_every, 1)
        super().__init__(model, pattern=pattern, **kw)
        self._dense: dict[str, torch.Tensor] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_started: dict[str, bool] = {}
        self._warned_no_lr = False

    def _find(self, p: torch.Tensor) -> tuple[Any, dict | None]:
        """``(optimizer, param group)`` holding ``p``: ``optimizer=`` if given, else a ``torch.optim``
        optimizer that has stepped (tracked by :mod:`sparsefast.nn.layers`); ``(None, None)`` if none."""
        opts = [self.optimizer] if self.optimizer is not None else list(_layers._OPTIMIZERS)
        for opt in opts:
            for g in opt.param_groups:
                if any(q is p for q in g["params"]):
                    return opt, g
        return None, None

    def _group_of(self, p: torch.Tensor) -> dict | None:
        return self._find(p)[1]

    def _wants_dense_grad(self, t: int) -> bool:
        return True

    def _new_masks(self) -> dict[str, torch.Tensor]:
        return self._allocate({n: self._dense[n].abs() for n in self._names})

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        self._dense = {n: l.dense_weight().float() for n, l in self._layers}
        self._buf = {n: torch.zeros_like(w) for n, w in self._dense.items()}
        self._buf_started = {n: False for n in self._names}
        self._apply(self._new_masks())

    @staticmethod
    def _momentum_state(opt: Any, p: torch.Tensor) -> dict | None:
        """The optimizer's per-parameter state holding a kept-sized ``momentum_buffer`` (SGD), else None."""
        st = getattr(opt, "state", {}).get(p) if opt is not None else None
        if st and isinstance(st.get("momentum_buffer"), torch.Tensor) and st["momentum_buffer"].shape == p.shape:
            return st
        return None

    def _hparams(self, g: dict | None) -> tuple[float, float, float, bool, float, bool]:
        """``(lr, momentum, dampening, nesterov, weight_decay, maximize)`` for the pruned part."""
        get = (lambda k, d: g.get(k, d)) if g is not None else (lambda k, d: d)
        lr = self.lr if self.lr is not None else float(get("lr", 0.0))
        mom = self.mom if self.mom is not None else float(get("momentum", 0.0))
        wd = self.weight_decay if self.weight_decay is not None else float(get("weight_decay", 0.0))
        return lr, mom, float(get("dampening", 0.0)), bool(get("nesterov", False)), wd, bool(get("maximize", False))

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        grads = self._grads_or_warn("SR-STE update of the pruned weights")
        no_lr = []
        with torch.no_grad():
            for n, l in self._layers:
                wd_, m, buf = self._dense[n], l.mask, self._buf[n]
                wd_.copy_(torch.where(m, l.dense_weight().float(), wd_))  # kept part: what your optimizer made of it
                opt, g = self._find(l.weight)
                st = self._momentum_state(opt, l.weight)
                if st is not None:  # kept part of the one dense momentum: your optimizer's buffer
                    buf.copy_(torch.where(m, _kept.scatter(st["momentum_buffer"].detach(), m).float(), buf))
                if grads is None:
                    continue
                if self.lr is None and g is None:
                    no_lr.append(n)
                    continue
                lr, mom, damp, nesterov, wdecay, maximize = self._hparams(g)
                # torch.optim.SGD's rule on the pruned positions, with SR-STE's refining decay in the gradient
                d = grads[n].to(wd_.device)
                if maximize:
                    d = -d
                d = d + self.decay * wd_
                if wdecay != 0.0:
                    d = d.add(wd_, alpha=wdecay)
                if mom != 0.0:
                    if self._buf_started.get(n, True):
                        nb = buf.mul(mom).add_(d, alpha=1.0 - damp)
                    else:
                        nb = d.clone()
                    buf.copy_(torch.where(m, buf, nb))
                    self._buf_started[n] = True
                    d = d.add(buf, alpha=mom) if nesterov else buf
                wd_.copy_(torch.where(m, wd_, wd_.add(d, alpha=-lr)))
        if no_lr and not self._warned_no_lr:
            self._warned_no_lr = True
            warnings.warn(f"SRSTE: no lr= was given and no optimizer holding the weight of layer(s) {no_lr} has "
                          "stepped: their pruned weights are not updated (pass lr= or optimizer=)",
                          SparsefastWarning, stacklevel=2)
        if t % self.update_every == 0:
            # every kept position (returning ones included) takes its value from the dense W
            self._apply(self._new_masks(), weights=self._dense)
            self._write_momentum()

    @torch.no_grad()
    def _write_momentum(self) -> None:
        """Give your optimizer's momentum buffer of every layer the dense buffer's values at the (new) kept
        positions: a weight coming back brings its momentum, one leaving hands it to the pruner."""
        for n, l in self._layers:
            st = self._momentum_state(self._find(l.weight)[0], l.weight)
            if st is not None:
                mb = st["momentum_buffer"]
                mb.copy_(_kept.gather(self._buf[n].to(mb.device), l.mask).to(mb.dtype))

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The dense ``W`` (kept values from the layers, pruned values from the pruner), float32 copies."""
        out = {}
        for n, l in self._layers:
            out[n] = torch.where(l.mask, l.dense_weight().float(), self._dense[n])
        return out

    def dense_momentum(self) -> dict[str, torch.Tensor]:
        """The one dense momentum buffer (kept part from your SGD optimizer's state when it has one, pruned
        part from the pruner), float32 copies."""
        out = {}
        for n, l in self._layers:
            b = self._buf[n].clone()
            st = self._momentum_state(self._find(l.weight)[0], l.weight)
            if st is not None:
                b = torch.where(l.mask, _kept.scatter(st["momentum_buffer"].detach(), l.mask).float(), b)
            out[n] = b
        return out

    def _extra_state(self) -> dict:
        return {"dense": {n: v.clone() for n, v in self._dense.items()},
                "buf": {n: v.clone() for n, v in self._buf.items()},
                "buf_started": dict(self._buf_started)}

    def _load_extra_state(self, d: dict) -> None:
        self._dense = {n: v.clone() for n, v in d["dense"].items()}
        self._buf = {n: v.clone() for n, v in d["buf"].items()}
        self._buf_started = dict(d.get("buf_started", {n: True for n in self._buf}))
