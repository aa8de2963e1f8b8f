"""LOBSTER: loss-based sensitivity regularisation and pruning (Tartaglione et al. 2020)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..backends import SparsefastWarning
from ..formats import kept as _kept
from .base import Pruner, _check_batch, _check_int, _check_number, _iter_batches, batch_loss

__all__ = ["LOBSTER"]

_PLATEAU = ("authors", "improvement")
_SEARCH = ("authors", "rank")


class LOBSTER(Pruner):
    """LOBSTER (Tartaglione et al. 2020), with the defaults of the authors' code (EIDOSlab/LOBSTER:
    ``src/utilities/pruning/sensitivity/LOBSTER.py``, ``pruning/thresholding/plateau_scheduler.py`` and
    ``threshold_scheduler.py``).

    ``step()`` (after every optimizer step) shrinks the parameters the loss is insensitive to:
    ``p ← p − λ·p·max(0, 1 − |∂L/∂p|)`` (λ = ``lmbda`` = 1e-4, not scaled by the LR) for every weight and,
    with ``bias=True`` (default, as the authors), every bias of the managed layers; pruned biases are held
    at zero afterwards (the authors multiply every parameter by its zero mask after this step).

    ``prune(batch, loss_fn)`` is called with validation data (an ``(x, y)`` batch or an iterable, e.g. once
    per epoch). It evaluates the validation loss (mean over samples) and tracks a plateau:

    * ``plateau="authors"`` (default): an evaluation is *bad* only if ``loss ≥ (1 + plateau_tol)·best``
      (``plateau_tol`` = 1%); a good one resets the count and, if ``loss < best``, becomes the best (the
      model's parameters and buffers are snapshotted). After ``pwe`` bad evaluations in a row the best
      snapshot is restored (``restore_best=True``), the plateau state resets (best = ∞) and the model is
      pruned. A flat or slowly improving loss therefore never triggers pruning.
    * ``plateau="improvement"`` (the former rule): bad unless ``loss < (1 − plateau_tol)·best``; after
      pruning, the pruned model's loss is the new best. Pass ``restore_best=False`` with it for exactly the
      former behaviour (no restore).

    ``force=True`` prunes now (current weights, no restore). Pruning zeroes every ``|W| < T`` (one global
    threshold over the managed layers; with ``bias=True`` also every bias ``|b| < T``, which then stays 0).
    ``T`` comes from ``threshold_search``:

    * ``"authors"`` (default): the authors' bisection on the *value* of T: start from the mean over layers
      of each layer's mean non-zero ``|W|``; bracket ``[min |W|, mean]`` or ``[mean, max |W|]`` by whether
      pruning at the mean keeps ``L_val ≤ bound = (1 + twt)·L_val(W)``; halve until the losses at the two
      ends differ by less than ``0.05·bound`` and return the midpoint (whose loss may exceed the bound
      slightly; float32 arithmetic as theirs).
    * ``"rank"`` (the former search): bisection on the rank of ``|W|`` for the largest pruned count whose
      loss stays ``≤ bound`` (about log₂(nnz) evaluations; the bound always holds).

    Pruned weights never return. ``sparsity`` is optional: a cap the pruning never exceeds (the smallest
    ``|W|`` below ``T`` are pruned up to it). ``last_loss`` / ``best_loss`` report the plateau state.
    Unstructured only (N:M and ``block:B`` are refused: the shrinkage and the threshold act on single
    weights). ``restore_best`` keeps a copy of the model's parameters and buffers (kept values, not dense
    weights) taken at each new best evaluation, and saves it in ``state_dict()``.

    Departures from the authors' code: their layer list also holds ``BatchNorm2d``, whose scale and shift
    they regularise and threshold (and whose ``|γ|`` enter the threshold range); here only the managed
    Linear/Conv layers (and their biases) are. Their masks are ``p != 0`` taken at each epoch start, so a
    parameter that is exactly 0 (e.g. a zero-initialised bias) is frozen at 0 for good; here only what
    the threshold removed is held at 0.
    """

    default_distribution = "global"
    supports_nm = "LOBSTER prunes by a global magnitude threshold"
    supports_block = "LOBSTER shrinks and thresholds individual weights by their loss sensitivity and magnitude"
    requires_sparsity = False

    def __init__(self, model: nn.Module, *, lmbda: float = 1e-4, twt: float = 0.05, pwe: int = 5,
                 plateau_tol: float = 0.01, bias: bool = True, plateau: str = "authors",
                 restore_best: bool = True, threshold_search: str = "authors", **kw: Any) -> None:
        self.lmbda = _check_number("lmbda", lmbda, 0.0, math.inf)
        self.twt = _check_number("twt", twt, 0.0, math.inf)
        self.pwe = _check_int("pwe", pwe, 1)
        self.plateau_tol = _check_number("plateau_tol", plateau_tol, 0.0, 1.0)
        if plateau not in _PLATEAU:
            raise ValueError(f"LOBSTER: plateau must be one of {_PLATEAU}, got {plateau!r}")
        if threshold_search not in _SEARCH:
            raise ValueError(f"LOBSTER: threshold_search must be one of {_SEARCH}, got {threshold_search!r}")
        self.bias = bool(bias)
        self.plateau = plateau
        self.restore_best = bool(restore_best)
        self.threshold_search = threshold_search
        super().__init__(model, **kw)
        self.best_loss = math.inf
        self.last_loss = math.nan
        self._wait = 0
        self._best_state: dict[str, torch.Tensor] | None = None
        #: kept biases per layer (True = kept); only layers with a bias, only with bias=True
        self._bias_masks: dict[str, torch.Tensor] = {}
        if self.bias:
            self._bias_masks = {n: torch.ones_like(l.bias, dtype=torch.bool) for n, l in self._layers
                                if l.bias is not None}

    # ---- regularisation ---------------------------------------------------------------------------
    def _on_step(self, t: int) -> None:
        with torch.no_grad():
            for n, l in self._layers:
                g = l.weight.grad  # the kept values' gradient: elementwise with the kept values
                if g is not None:   # (pruned positions hold 0 and stay 0)
                    sens = (1.0 - g.abs()).clamp_(min=0.0)
                    l.weight.add_(l.weight.mul(sens), alpha=-self.lmbda)  # the authors' op order
                bm = self._bias_masks.get(n)
                if bm is None or l.bias is None:
                    continue
                if l.bias.grad is not None:
                    sens = (1.0 - l.bias.grad.abs()).clamp_(min=0.0)
                    l.bias.add_(l.bias.mul(sens), alpha=-self.lmbda)
                l.bias.mul_(bm.to(l.bias.device))

    # ---- validation / plateau -----------------------------------------------------------------------
    @torch.no_grad()
    def _val_loss(self, batch: Any, loss_fn: Callable | None) -> float:
        """Mean validation loss over samples (each batch's mean loss weighted by its size, as the authors'
        ``test_model``)."""
        tot, n = 0.0, 0
        for b in _iter_batches(batch):
            k = int(b[0].shape[0]) if b[0].dim() > 0 else 1
            tot += float(batch_loss(self.model, b, loss_fn)) * k
            n += k
        if n == 0:
            raise ValueError("LOBSTER.prune(): the validation batch iterable yielded no batch")
        return tot / n

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {**{f"p:{k}": v.detach().clone() for k, v in self.model.named_parameters()},
                **{f"b:{k}": v.detach().clone() for k, v in self.model.named_buffers()}}

    @torch.no_grad()
    def _restore(self, snap: dict[str, torch.Tensor]) -> bool:
        cur = {**{f"p:{k}": v for k, v in self.model.named_parameters()},
               **{f"b:{k}": v for k, v in self.model.named_buffers()}}
        ok = set(cur) == set(snap) and all(cur[k].shape == v.shape for k, v in snap.items()) and \
            all(torch.equal(snap[f"b:{n}.mask" if n else "b:mask"], l.mask) for n, l in self._layers)
        if not ok:
            warnings.warn("LOBSTER: the model changed shape or masks since its best evaluation; the best "
                          "checkpoint is not restored before pruning", SparsefastWarning, stacklevel=3)
            return False
        for k, v in snap.items():
            cur[k].copy_(v)
        return True

    def prune(self, batch: Any = None, loss_fn: Callable | None = None, *, force: bool = False) -> None:
        """Validation step: track the plateau and prune when it is reached (or ``force``)."""
        _check_batch("LOBSTER", batch)
        was = self.model.training
        self.model.eval()
        try:
            loss = self._val_loss(batch, loss_fn)
            self.last_loss = loss
            if self.plateau == "authors":
                good = loss < self.best_loss + self.best_loss * self.plateau_tol
            else:
                good = loss < self.best_loss * (1.0 - self.plateau_tol) or not math.isfinite(self.best_loss)
            if good:
                self._wait = 0
                if loss < self.best_loss:
                    self.best_loss = loss
                    if self.restore_best:
                        self._best_state = self._snapshot()
            else:
                self._wait += 1
            if force or self._wait >= self.pwe:
                base = loss
                if not force and self.restore_best and self._best_state is not None:
                    if self._restore(self._best_state):
                        base = self._val_loss(batch, loss_fn)
                self._best_state = None
                self._wait = 0
                self._threshold_prune(batch, loss_fn, base)
                if self.plateau == "authors":
                    self.best_loss = math.inf
                else:
                    self.best_loss = self._val_loss(batch, loss_fn)
        finally:
            self.model.train(was)
        self._pruned = True
        self._rearm()

    # ---- threshold ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _threshold_prune(self, batch: Any, loss_fn: Callable | None, base: float) -> None:
        layers = self._layers
        saved_v = [l.weight.detach().clone() for _, l in layers]  # kept values
        saved_m = [l.mask.clone() for _, l in layers]
        biased = [(n, l) for n, l in layers if n in self._bias_masks and l.bias is not None]
        saved_b = [l.bias.detach().clone() for _, l in biased]
        mags = torch.cat([torch.where(l.mask, l.dense_weight().abs().float(),
                                      torch.full(l.weight_shape, math.inf, dtype=torch.float32,
                                                 device=l.mask.device)).reshape(-1).cpu()
                          for _, l in layers])
        total = mags.numel()
        nnz = int(torch.isfinite(mags).sum())
        max_prune = nnz - len(layers)  # never empty the model
        if self.target_sparsity is not None:
            max_prune = min(max_prune, int(math.floor(nnz - (1.0 - self.target_sparsity) * total + 1e-9)))
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

        def masks_below(T) -> list[torch.Tensor]:
            return [m & ~(l.dense_weight().abs() < T) for (_, l), m in zip(layers, saved_m)]

        def set_trial(ms: list[torch.Tensor], T) -> None:
            # masked-dense semantics: evaluating W·[|W| ≥ T] = zeroing the trial-pruned kept values (the
            # masks, gradients and optimizer state stay untouched); biases |b| < T zeroed likewise
            for (_, l), m, m0, v in zip(layers, ms, saved_m, saved_v):
                l.weight.copy_(torch.where(_kept.gather(m, m0), v, torch.zeros_like(v)))
            if T is not None:
                for (_, l), b in zip(biased, saved_b):
                    l.bias.copy_(torch.where(b.abs() < T, torch.zeros_like(b), b))

        def restore() -> None:
            for (_, l), v in zip(layers, saved_v):
                l.weight.copy_(v)
            for (_, l), b in zip(biased, saved_b):
                l.bias.copy_(b)

        def trial(ms: list[torch.Tensor], T) -> float:
            set_trial(ms, T)
            try:
                return self._val_loss(batch, loss_fn)
            finally:
                restore()

        def bias_T_of_rank(k: int):
            # the threshold that prunes the k smallest |W|: the smallest |W| still kept
            return None if k >= nnz else mags[order[k]]

        if self.threshold_search == "authors":
            T = self._authors_threshold(lambda T: trial(masks_below(T), T), base)
            if T is None:
                return
            new = masks_below(T)
            k = sum(int(m0.sum()) - int(m.sum()) for m, m0 in zip(new, saved_m))
            if k > max(max_prune, 0):  # the sparsity cap: prune only the smallest of those below T
                k = max(max_prune, 0)
                if k == 0:
                    return
                new, T = masks_for(k), bias_T_of_rank(k)
        else:
            if max_prune <= 0:
                return
            limit = (1.0 + self.twt) * base
            lo, hi = 0, max_prune  # invariant: lo acceptable
            if trial(masks_for(hi), bias_T_of_rank(hi)) <= limit:
                lo = hi
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if trial(masks_for(mid), bias_T_of_rank(mid)) <= limit:
                        lo = mid
                    else:
                        hi = mid
            if lo <= 0:
                return
            new, T = masks_for(lo), bias_T_of_rank(lo)
        if T is not None:
            for (n, l), b in zip(biased, saved_b):
                keep = ~(b.abs() < T)
                self._bias_masks[n] &= keep.to(self._bias_masks[n].device)
                l.bias.mul_(self._bias_masks[n].to(l.bias.device))
        self._apply({n: m for (n, _), m in zip(layers, new)})

    @torch.no_grad()
    def _authors_threshold(self, loss_at: Callable[[Any], float], base: float):
        """``threshold_scheduler.py:127-178`` of EIDOSlab/LOBSTER (bisection on T's value); ``loss_at(T)``
        is the validation loss with every ``|p| < T`` zeroed. None when no weight is left to threshold."""
        absw = []
        for _, l in self._layers:
            a = l.dense_weight().abs()
            a = a[a != 0]
            if a.numel():
                absw.append(a)
        if not absw:
            return None
        mean_w = 0
        for a in absw:  # _find_mean_T: mean over layers of the layer's mean non-zero |W| (a tensor)
            mean_w = mean_w + a.mean()
        mean_T = mean_w / len(absw)
        min_T = min(float(a.min()) for a in absw)   # _find_min_T (a Python float)
        max_T = max(float(a.max()) for a in absw)   # _find_max_T
        bound = base + base * self.twt
        loss_T = loss_at(mean_T)
        if loss_T < bound:
            a, loss_a, b, loss_b = mean_T, loss_T, max_T, math.inf
        else:
            a, loss_a, b, loss_b = min_T, base, mean_T, loss_T
        previous_T, eps = math.inf, 1e-10
        while not abs(loss_a - loss_b) < bound * 0.05:
            center = (a + b) / 2
            if abs(previous_T - center) <= eps:
                return a
            previous_T = center
            loss_c = loss_at(center)
            if loss_c <= bound:
                a, loss_a = center, loss_c
            else:
                b, loss_b = center, loss_c
        return (a + b) / 2

    # ---- state ---------------------------------------------------------------------------------------
    def bias_masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool mask of kept biases}`` (copies; only with ``bias=True``, layers with a bias)."""
        return {n: m.clone() for n, m in self._bias_masks.items()}

    def _extra_state(self) -> dict:
        return {"best_loss": self.best_loss, "last_loss": self.last_loss, "wait": self._wait,
                "bias_masks": self.bias_masks(),
                "best_state": None if self._best_state is None else dict(self._best_state)}

    def _load_extra_state(self, d: dict) -> None:
        self.best_loss, self.last_loss, self._wait = float(d["best_loss"]), float(d["last_loss"]), int(d["wait"])
        if "bias_masks" in d:
            self._bias_masks = {n: m.clone().bool() for n, m in d["bias_masks"].items()}
        self._best_state = None if d.get("best_state") is None else dict(d["best_state"])
