"""Magnitude, random and gradual magnitude pruning."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .base import Pruner, _check_number, resolve_pattern
from .schedules import CubicSparsity

__all__ = ["Magnitude", "Random", "GradualMagnitude"]


class Magnitude(Pruner):
    """One-shot magnitude pruning: keep the largest ``|W|``.

    ``prune()`` keeps the top-``|W|`` weights: one global threshold (``distribution="global"``, default)
    or per-layer densities of any distribution; N:M keeps the top-n ``|W|`` of each m-group. Already
    pruned weights never return. ``step()`` does nothing (fine-tune with the masks fixed). No data needed.

    Patterns: unstructured, N:M, and ``block:B`` (keeps the b x b blocks of the reduction view with the
    largest summed ``|W|``; the global threshold and the layer densities count blocks).

    Count rule: the model (``"global"``) or each layer keeps ``round(d · n)`` weights (at least one per
    layer). Reference: ganguli-lab/Synaptic-Flow ``Pruners/pruners.py:12-41,94-100`` (``Mag``), whose
    kthvalue threshold at ``k = int((1 − d) · n)`` keeps ``n − int((1 − d) · n)``: the same ranking, at
    most one weight apart per layer (local) or in total (global); ``docs/methods.md``.
    """

    default_distribution = "global"

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        scores = {n: l.dense_weight().abs() for n, l in self._layers}
        if self.pattern.kept_per_group is None:  # (a per-group rule, N:M, ranks every position of a group)
            scores = self._masked_scores(scores)
        self._apply(self._allocate(scores))


class Random(Pruner):
    """Random pruning (Liu et al. 2022; Gadhikar et al. 2023): ``M_l ~`` a uniformly random subset of
    ``round(d_l n_l)`` positions per layer (exactly the density, not Bernoulli noise), fixed after ``prune()``.

    Args:
        distribution: default ``"erk"`` (the rule those papers recommend). ``"global"`` = one uniform
            random ranking over all layers.
        scale_init: multiply the kept weights of layer l by ``1/√d_l`` (keeps the variance of the
            pre-activations of a dense init).
        flow_repair: see :func:`~sparsefast.pruning.distributions.flow_repair`.
    Patterns: unstructured, N:M (n random positions of each m-group) and ``block:B`` (a uniformly random
    subset of ``round(d_l · blocks_l)`` whole b x b blocks per layer; ``flow_repair`` is skipped, it
    would add single edges). Seeded: the same seed gives the same masks everywhere.
    """

    default_distribution = "erk"

    def __init__(self, model: nn.Module, *, scale_init: bool = False, **kw: Any) -> None:
        self.scale_init = bool(scale_init)
        super().__init__(model, **kw)

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        scores = {n: self._rand(l.weight_shape, "init", n) for n, l in self._layers}
        new = self._maybe_flow_repair(self._allocate(scores), "init")
        self._apply(new)
        if self.scale_init:
            with torch.no_grad():
                for n, l in self._layers:
                    d = float(new[n].float().mean())
                    if d > 0:
                        l.weight.mul_(1.0 / math.sqrt(d))  # the kept values


class GradualMagnitude(Pruner):
    """Gradual magnitude pruning (Zhu & Gupta 2017).

    Every ``update_every`` steps between ``start_step`` and ``end_step`` the smallest ``|W|`` are pruned so
    that the sparsity follows ``s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(end − t₀))³``
    (:class:`~sparsefast.pruning.schedules.CubicSparsity`); pruned weights never return. With a
    non-global distribution each layer follows the cubic curve towards its own final sparsity (uniform:
    all layers the same, as in the paper); ``"global"`` applies one threshold at ``s_t``.

    Args: ``sparsity`` (= ``s_f``), ``initial_sparsity`` (``s_i``, default 0), ``start_step``,
    ``end_step`` (required), ``update_every`` (default 100). ``prune()`` applies ``s_t`` at the current
    step (not required: ``step()`` prunes on schedule).

    Patterns: unstructured and ``block:B`` (every level drops the kept b x b blocks of smallest summed
    ``|W|``; the schedule's sparsities count blocks, each layer keeping at least one). N:M is refused:
    every intermediate mask must already satisfy the layer pattern, so a schedule between dense and N:M
    does not exist (use :class:`SRSTE` or :class:`Magnitude` with N:M).

    Reference: tensorflow/model-optimization ``prune_low_magnitude`` with ``PolynomialDecay`` (power 3):
    the same schedule, per-layer ``max(round(n (1 − s_t)), 1)`` smallest-``|W|`` masks and update steps
    (checked mask by mask in ``tests/pruning/test_fidelity_b.py``). Step convention: ``t`` counts
    completed optimizer steps from 0, tfmot's ``pruning_step`` counts the current batch from 1, so tfmot's
    ``begin_step``/``end_step`` are ``start_step + 1`` / ``end_step + 1`` here. Departures
    (``docs/methods.md``): a level is also applied at ``end_step`` when ``end_step − start_step`` is not a
    multiple of ``update_every`` (tfmot then never reaches the final sparsity through its schedule); pruned
    weights can never return (tfmot's kernel takes dense gradient updates between its masking ops, so at
    a mask update a pruned position holds ``−lr·momentum`` and could in principle re-enter); a
    ``"global"`` distribution is offered (tfmot is per layer only).
    """

    default_distribution = "uniform"
    pattern_support = {"unstructured": True, "block": True,
                       "nm": "gradual sparsity levels between dense and N:M are not N:M masks (use SRSTE or Magnitude)"}

    def __init__(self, model: nn.Module, *, sparsity: float | None = None, initial_sparsity: float = 0.0,
                 start_step: int = 0, end_step: int | None = None, update_every: int = 100, **kw: Any) -> None:
        # refuse an N:M pattern (it can never work) before asking for the schedule's arguments
        resolve_pattern(type(self).__name__, model, kw.get("pattern"), self._pattern_table(),
                        filter_fn=kw.get("filter_fn"))
        if end_step is None:
            raise ValueError("GradualMagnitude needs end_step (the step at which the final sparsity is reached)")
        if sparsity is not None:
            _check_number("sparsity", sparsity, 0.0, 1.0, hi_open=True)
            _check_number("initial_sparsity", initial_sparsity, 0.0, 1.0, hi_open=True)
            self.schedule = CubicSparsity(initial=float(initial_sparsity), final=float(sparsity),
                                          start_step=start_step, end_step=end_step, update_every=update_every)
        super().__init__(model, sparsity=sparsity, **kw)
        self._final_dens = None if self.distribution == "global" else self._densities(self.target_sparsity)

    def _level(self, t: int) -> dict[str, torch.Tensor]:
        s_t = self.schedule(t)
        scores = self._masked_scores({n: l.dense_weight().abs() for n, l in self._layers})
        if self.distribution == "global":
            return self._allocate(scores, s_t)
        si, sf = self.schedule.initial, self.schedule.final
        frac = 0.0 if sf == si else (s_t - si) / (sf - si)  # position on the cubic curve, 0..1
        dens = {}
        for n, l in self._layers:
            s_lf = 1.0 - self._final_dens[n]
            s_li = min(si, s_lf)
            dens[n] = 1.0 - (s_li + (s_lf - s_li) * frac)
        return self._allocate(scores, densities=dens)

    def _prune_to_schedule(self, t: int) -> None:
        new = self._level(t)
        # never regrow: intersect with the current masks
        new = {n: new[n] & l.mask for n, l in self._layers}
        self._apply(new)

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        self._prune_to_schedule(self._step)

    def _on_step(self, t: int) -> None:
        if self.schedule.is_update(t):
            self._prune_to_schedule(t)

    def _extra_state(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def _load_extra_state(self, d: dict) -> None:
        self.schedule.load_state_dict(d["schedule"])
