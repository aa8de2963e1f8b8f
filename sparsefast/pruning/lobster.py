"""LOBSTER: loss-based sensitivity regularisation and pruning (Tartaglione et al. 2020)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..formats import kept as _kept
from .base import Pruner, _check_batch, _check_int, _check_number, _iter_batches, batch_loss, top_k_mask

__all__ = ["LOBSTER"]


class LOBSTER(Pruner):
    """LOBSTER (Tartaglione et al. 2020).

    ``step()`` (after every optimizer step) shrinks weights the loss is insensitive to:
    ``W ← W − λ·W·max(0, 1 − |G|)`` with ``G = weight.grad`` (λ = ``lmbda`` = 1e-4, not scaled by the LR).

    ``prune(batch, loss_fn)`` is called with validation data (an ``(x, y)`` batch or an iterable, e.g. once
    per epoch). It evaluates the validation loss; when it has not improved by more than ``plateau_tol``
    (1%, relative) for ``pwe`` calls (or with ``force=True``) it prunes: every ``|W| < T`` (one global
    threshold over the managed layers), ``T`` the largest threshold with
    ``L_val(W·[|W| ≥ T]) ≤ (1 + twt)·L_val(W)`` (``twt`` = 0.05), found by bisection on the rank of ``|W|``
    (about log₂(nnz) evaluations). Pruned weights never return. ``sparsity`` is optional: a cap the
    pruning never exceeds. ``last_loss`` / ``best_loss`` report the plateau state. Unstructured only
    (N:M and ``block:B`` are refused: the shrinkage and the threshold act on single weights).
    """

    default_distribution = "global"
    supports_nm = "LOBSTER prunes by a global magnitude threshold"
    supports_block = "LOBSTER shrinks and thresholds individual weights by their loss sensitivity and magnitude"
    requires_sparsity = False

    def __init__(self, model: nn.Module, *, lmbda: float = 1e-4, twt: float = 0.05, pwe: int = 5,
                 plateau_tol: float = 0.01, **kw: Any) -> None:
        self.lmbda = _check_number("lmbda", lmbda, 0.0, math.inf)
        self.twt = _check_number("twt", twt, 0.0, math.inf)
        self.pwe = _check_int("pwe", pwe, 1)
        self.plateau_tol = _check_number("plateau_tol", plateau_tol, 0.0, 1.0)
        super().__init__(model, **kw)
        self.best_loss = math.inf
        self.last_loss = math.nan
        self._wait = 0

    def _on_step(self, t: int) -> None:
        with torch.no_grad():
            for _, l in self._layers:
                g = l.weight.grad  # the kept values' gradient: elementwise with the kept values
                if g is None:       # (pruned positions hold 0 and stay 0)
                    continue
                sens = (1.0 - g.abs()).clamp_(min=0.0)
                l.weight.sub_(self.lmbda * l.weight * sens)

    @torch.no_grad()
    def _val_loss(self, batch: Any, loss_fn: Callable | None) -> float:
        tot, n = 0.0, 0
        for b in _iter_batches(batch):
            tot += float(batch_loss(self.model, b, loss_fn))
            n += 1
        if n == 0:
            raise ValueError("LOBSTER.prune(): the validation batch iterable yielded no batch")
        return tot / n

    def prune(self, batch: Any = None, loss_fn: Callable | None = None, *, force: bool = False) -> None:
        """Validation step: track the plateau and prune when it is reached (or ``force``)."""
        _check_batch("LOBSTER", batch)
        was = self.model.training
        self.model.eval()
        try:
            loss = self._val_loss(batch, loss_fn)
            self.last_loss = loss
            if loss < self.best_loss * (1.0 - self.plateau_tol) or not math.isfinite(self.best_loss):
                self.best_loss, self._wait = loss, 0
            else:
                self._wait += 1
            if force or self._wait >= self.pwe:
                self._threshold_prune(batch, loss_fn, loss)
                self._wait = 0
                self.best_loss = self._val_loss(batch, loss_fn)
        finally:
            self.model.train(was)
        self._pruned = True
        self._rearm()

    @torch.no_grad()
    def _threshold_prune(self, batch: Any, loss_fn: Callable | None, base: float) -> None:
        layers = self._layers
        saved_v = [l.weight.detach().clone() for _, l in layers]  # kept values
        saved_m = [l.mask.clone() for _, l in layers]
        mags = torch.cat([torch.where(l.mask, l.dense_weight().abs().float(),
                                      torch.full(l.weight_shape, math.inf, dtype=torch.float32,
                                                 device=l.mask.device)).reshape(-1).cpu()
                          for _, l in layers])
        total = mags.numel()
        nnz = int(torch.isfinite(mags).sum())
        max_prune = nnz - len(layers)  # never empty the model
        if self.target_sparsity is not None:
            max_prune = min(max_prune, int(math.floor(nnz - (1.0 - self.target_sparsity) * total + 1e-9)))
        if max_prune <= 0:
            return
        order = torch.sort(mags, stable=True).indices  # ascending |W| of active weights first

        def masks_for(k: int) -> list[torch.Tensor]:
            drop = torch.zeros(total, dtype=torch.bool)
            drop[order[:k]] = True
            out, off = [], 0
            for (_, l), m in zip(layers, saved_m):
                c = l.mask.numel()
                out.append(m & ~drop[off:off + c].reshape(m.shape).to(m.device))
                off += c
            return out

        def trial(k: int) -> float:
            # masked-dense semantics: evaluating W·[|W| ≥ T] = zeroing the trial-pruned kept values (the
            # masks, gradients and optimizer state stay untouched)
            for (_, l), m, m0, v in zip(layers, masks_for(k), saved_m, saved_v):
                l.weight.copy_(torch.where(_kept.gather(m, m0), v, torch.zeros_like(v)))
            try:
                return self._val_loss(batch, loss_fn)
            finally:
                for (_, l), v in zip(layers, saved_v):
                    l.weight.copy_(v)

        limit = (1.0 + self.twt) * base
        lo, hi = 0, max_prune  # invariant: lo acceptable
        if trial(hi) <= limit:
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if trial(mid) <= limit:
                    lo = mid
                else:
                    hi = mid
        if lo > 0:
            self._apply({n: m for (n, _), m in zip(layers, masks_for(lo))})

    def _extra_state(self) -> dict:
        return {"best_loss": self.best_loss, "last_loss": self.last_loss, "wait": self._wait}

    def _load_extra_state(self, d: dict) -> None:
        self.best_loss, self.last_loss, self._wait = float(d["best_loss"]), float(d["last_loss"]), int(d["wait"])
