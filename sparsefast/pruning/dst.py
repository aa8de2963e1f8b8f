"""Dynamic sparse training: SET, RigL, DSR, SNFS (sparse from scratch, masks change during training).

Common behaviour: ``prune()`` draws the initial random masks at the layer densities of
``distribution`` (``"erk"`` by default) from the seed; ``step()`` (after every optimizer step) runs a
mask update at ``t = start_step + k·update_every`` while ``t < end_step``. An update drops active
weights with the smallest ``|W|`` and grows as many inactive positions (the new weights start at 0, and
so does their optimizer state, e.g. momentum, in every ``torch.optim`` optimizer: ``layer.set_mask`` moves
the kept values' state and starts grown positions at zero; ``optimizer=`` is accepted but not needed). The density of
every layer (SET, RigL) or of the model (DSR, SNFS) stays constant. ``last_update`` holds the dropped
and grown masks of the latest update (for inspection; a position dropped and regrown in the same update is
in both).

Positions dropped and regrown in the same update (``reinit_when_same``): by default they keep their value
and their optimizer state, as in the authors' code of RigL (google-research/rigl
``sparse_optimizers_base.py:276-343``, ``reinit_when_same=False``: only connections that were inactive
before the update are set to the grow value and get their momentum reset) and of SNFS
(TimDettmers/sparse_learning: the mask is applied to the weights only after the growth); the drop and the
regrowth then cancel. ``reinit_when_same=True`` restarts them at zero value and zero optimizer state like
any new connection (the behaviour of sparsefast before issue 18, and of the original SET code, which is why
``SET(drop_rule="signed")`` defaults to it). DSR never regrows a position dropped in the same update (as in
its authors' code), so the option does not apply to it.

Drop counts (SET, RigL): ``floor(fraction · active)`` computed in float32, as RigL's code does
(``n_prune = int(n_ones * drop_fraction)``); ``SET(drop_rule="signed")`` has its own counts (see SET).
Where each method departs from its authors' code, and why: ``docs/methods.md``.

N:M (SET, RigL): drops are chosen by ``|W|`` over the whole layer, and every m-group then regrows exactly
as many weights as it lost, inside the same group, so each group keeps exactly n. DSR and SNFS move
weights *between* layers, which a fixed per-group count forbids: they refuse N:M.

Block (``"block:B"``; SET, RigL): the unit is the b x b block of the reduction view. The drop count is
``round(fraction · active blocks)``; the blocks with the smallest summed ``|W|`` are dropped and as many
non-kept blocks (the dropped ones included) are grown: largest summed dense ``|G|`` (RigL) or uniformly
random (SET). Every layer keeps its number of blocks. DSR and SNFS refuse block patterns.

Dense gradients (RigL on update steps, SNFS on every step) come from
:class:`~sparsefast.pruning._grad.GradCapture`: it is armed only before the training steps whose update
needs it, and computes ``G = dYᵀX`` (conv: ``conv2d_weight``) from each layer's input and output gradient.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..formats import kept as _kept
from ..masks import top_k_flat
from .base import Pruner, _check_number, expand_units, group_counts, group_top, top_k_mask, unit_scores
from .schedules import ConstantSchedule, CosineDecay, UpdateEvery

__all__ = ["SET", "RigL", "DSR", "SNFS"]


def largest_remainder(total: int, shares: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` integers proportionally to ``shares`` (largest remainder), never above ``caps``;
    what a capped entry cannot take goes to the others. Deterministic."""
    n = len(shares)
    out = [0] * n
    left = int(total)
    active = [i for i in range(n) if caps[i] > 0]
    while left > 0 and active:
        ssum = sum(max(shares[i], 0.0) for i in active)
        if ssum <= 0:
            w = {i: 1.0 / len(active) for i in active}
        else:
            w = {i: max(shares[i], 0.0) / ssum for i in active}
        raw = {i: left * w[i] for i in active}
        give = {i: min(int(math.floor(raw[i])), caps[i] - out[i]) for i in active}
        rem = left - sum(give.values())
        order = sorted(active, key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
        for i in order:
            if rem <= 0:
                break
            if out[i] + give[i] < caps[i]:
                give[i] += 1
                rem -= 1
        for i in active:
            out[i] += give[i]
        left = total - sum(out)
        active = [i for i in active if out[i] < caps[i]]
        if sum(give.values()) == 0:
            break
    return out


def drop_count(fraction: float, active: int) -> int:
    """``floor(fraction · active)`` in float32: RigL's ``int(n_ones * drop_fraction)``
    (google-research/rigl ``sparse_optimizers_base.py:285-288``)."""
    return int(torch.tensor(float(active), dtype=torch.float32) * torch.tensor(float(fraction), dtype=torch.float32))


class _DST(Pruner):
    default_distribution = "erk"
    _default_drop = 0.3
    _default_reinit_when_same = False

    def __init__(self, model: nn.Module, *, update_every: int = 100, start_step: int = 0,
                 end_step: int | None = None, drop_fraction: float | None = None, optimizer: Any = None,
                 reinit_when_same: bool | None = None, **kw: Any) -> None:
        df = self._default_drop if drop_fraction is None else drop_fraction
        self.drop_fraction = _check_number("drop_fraction", df, 0.0, 1.0)
        if reinit_when_same is not None and not isinstance(reinit_when_same, bool):
            raise TypeError(f"reinit_when_same must be True, False or None, got {reinit_when_same!r}")
        self.reinit_when_same = self._default_reinit_when_same if reinit_when_same is None else reinit_when_same
        self.updates = UpdateEvery(update_every, start_step, end_step)
        self.drop_schedule = self._make_drop_schedule(self.drop_fraction, start_step, end_step)
        self.optimizer = optimizer
        self.last_update: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(model, **kw)

    def _make_drop_schedule(self, df: float, start: int, end: int | None):
        return ConstantSchedule(df)

    # ---- init ------------------------------------------------------------------------------------
    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        scores = {n: self._rand(l.weight_shape, "init", n) for n, l in self._layers}
        self._apply(self._maybe_flow_repair(self._allocate(scores), "init"))

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        if self.updates.is_update(t):
            self._update(t)

    def _update(self, t: int) -> None:
        raise NotImplementedError

    # ---- shared drop / grow ----------------------------------------------------------------------
    def _drop(self, layer, k: int) -> torch.Tensor:
        """The ``k`` active weights with the smallest |W| (ties: lower index); block patterns: the ``k``
        active blocks with the smallest summed |W|."""
        unit = self.unit
        if unit == (1, 1) and layer.mask.dim() == 2:
            # ranked among the kept values only (nnz entries, not the dense shape); a Linear's kept
            # values are in row-major order, so ties still go to the lower flat index
            sel = top_k_mask(-layer.weight.detach().abs().float(), k)
            return _kept.scatter(sel, layer.mask)  # one pass writing the dense mask (no nonzero of sel)
        w = layer.dense_weight().abs().float()
        s = (-w).masked_fill_(~layer.mask, -math.inf)
        return expand_units(top_k_mask(unit_scores(s, unit), k), unit, layer.weight_shape) & layer.mask

    def _grow(self, after: torch.Tensor, score: torch.Tensor, k: int, *, owned: bool = False,
              absval: bool = False) -> torch.Tensor:
        """``k`` positions outside ``after`` with the largest ``score`` (``absval``: largest ``|score|``;
        per-group patterns, N:M: refill every group to its ``kept_per_group``, n; block patterns: the ``k``
        blocks outside ``after`` with the largest summed ``score``)."""
        unit = self.unit
        per_group = self.pattern.kept_per_group
        if per_group is None and unit == (1, 1):
            # one fused selection: |score|, -inf at ``after`` and the top-k in two passes over the scores
            return top_k_flat(score.reshape(-1), k, exclude=after.reshape(-1), absval=absval).view(after.shape)
        # one pass; in place when the caller hands over a float32 score it does not keep (``owned``): a fresh
        # dense-sized tensor costs its page faults again at every update
        s = score.float()
        s = s if owned and s is score else s.clone()
        if absval:
            s.abs_()
        s = _kept.fill_where_(s, after, -math.inf)
        if per_group is not None:
            gs = tuple(self.pattern.group_shape)
            need = per_group - group_counts(after, gs)
            return group_top(s, need, gs) & ~after
        return expand_units(top_k_mask(unit_scores(s, unit), k), unit, tuple(after.shape)) & ~after

    def _commit(self, new: dict[str, torch.Tensor], grown: dict[str, torch.Tensor],
                dropped: dict[str, torch.Tensor]) -> None:
        # grown positions start at 0 with zero optimizer state (set_mask does that for newly kept ones). A
        # position dropped and regrown in the same update is kept in both masks, so set_mask keeps its value
        # and state (RigL's reinit_when_same=False); with reinit_when_same it restarts at zero (reset=)
        reset = None
        if self.reinit_when_same:
            reset = {n: grown[n] & l.mask.to(grown[n].device) for n, l in self._layers if n in new}
            reset = {n: r for n, r in reset.items() if bool(r.any())}
        self._apply(new, reset=reset)
        self.last_update = {n: {"dropped": dropped[n], "grown": grown[n]} for n in new}

    def _drop_grow_per_layer(self, t: int, frac: float,
                             grow: Callable[[str, Any, torch.Tensor, int], torch.Tensor]) -> None:
        """Drop and regrow in every layer; ``grow(name, layer, after, k)`` returns the positions grown
        outside ``after`` (the mask after the drop) for ``k`` dropped units."""
        new, grown, dropped = {}, {}, {}
        units = math.prod(self.unit)
        for n, l in self._layers:
            nnz = _kept.nnz(l.mask) // units  # active units (blocks for block:B); the cached index's length
            d = self._drop_set(l, frac, nnz)
            if d is None:
                continue
            d, k = d if isinstance(d, tuple) else (d, int(torch.count_nonzero(d)) // units)
            after = torch.logical_not(d).logical_and_(l.mask)  # one dense temporary (each costs its page faults)
            g = grow(n, l, after, k)
            new[n], grown[n], dropped[n] = after.logical_or_(g), g, d  # ``after`` is not needed past the grow
        self._commit(new, grown, dropped)

    def _drop_set(self, layer, frac: float, nnz: int) -> torch.Tensor | tuple[torch.Tensor, int] | None:
        """The positions an update drops in ``layer`` (``None``: nothing to drop), or ``(positions, units
        dropped)`` when the count is known without counting them."""
        k = drop_count(frac, nnz)
        if k <= 0:
            return None
        d = self._drop(layer, k)
        return (d, k) if self.unit == (1, 1) else d  # single weights: exactly k (a top-k over kept values)

    def _extra_state(self) -> dict:
        return {"updates": self.updates.state_dict(), "drop_schedule": self.drop_schedule.state_dict()}

    def _load_extra_state(self, d: dict) -> None:
        self.updates.load_state_dict(d["updates"])
        self.drop_schedule.load_state_dict(d["drop_schedule"])


def set_signed_drop(w: torch.Tensor, mask: torch.Tensor, zeta: float) -> torch.Tensor:
    """The positions the original SET code drops (dcmocanu/sparse-evolutionary-artificial-neural-networks,
    ``SET-MLP-Keras-Weights-Mask/set_mlp_keras_cifar10.py:148-173``, ``rewireMask``): over the sorted
    values of the whole masked weight (pruned positions are 0), the fraction ζ of the negative weights
    closest to zero and the fraction ζ of the positive weights closest to zero; a kept weight survives if
    it is ``< values[int((1-ζ)·firstZero)]`` or ``> values[int(min(n-1, lastZero + ζ·(n-lastZero)))]``
    (``firstZero``/``lastZero``: first index of, and one past the last index of, the value closest to 0).
    With distinct values that drops ``ceil(ζ·negatives)`` and ``floor(ζ·positives) + 1`` weights. Active
    weights that are exactly 0 are always dropped."""
    wv = torch.where(mask, w, torch.zeros_like(w)).reshape(-1)
    values = torch.sort(wv).values
    n = values.numel()
    a = values.abs()
    first_zero = int(torch.argmin(a))                  # np.abs(values - 0).argmin(): first minimum
    last_zero = n - int(torch.argmin(a.flip(0)))       # reversed argmin -> one past the last minimum
    largest_negative = values[int((1 - zeta) * first_zero)]
    smallest_positive = values[int(min(n - 1, last_zero + zeta * (n - last_zero)))]
    keep = (wv > smallest_positive) | (wv < largest_negative)
    return mask & ~keep.reshape(mask.shape)


class SET(_DST):
    """SET (Mocanu et al. 2018): every ``update_every`` steps each layer drops a fraction ``drop_fraction``
    (ζ = 0.3) of its active weights closest to zero and regrows as many at uniformly random inactive
    positions (seeded; new weights 0). Never needs a dense gradient.

    ``drop_rule``:

    * ``"magnitude"`` (default): the ``floor(ζ · active)`` active weights with the smallest ``|W|`` — SET as
      RigL's authors implement it (google-research/rigl ``SparseSETOptimizer``, the SET every later DST
      paper compares against). Default because it is the rule of the project's method summary, it drops
      exactly the share asked for whatever the sign balance of the layer, and it is defined for N:M and
      block patterns (ranking by a summed magnitude), which the signed rule is not.
    * ``"signed"``: the original code's rule (dcmocanu, ``set_mlp_keras_cifar10.py:148-173``, and the
      paper's "fraction ζ of the smallest positive weights and of the largest negative weights"): ζ of
      the negative and ζ of the positive weights are dropped separately (:func:`set_signed_drop`, counts
      exactly as that code computes them). Unstructured only. As in that code, a position dropped and
      regrown in the same update restarts at 0 (``reinit_when_same`` defaults to True with this rule).

    ``reinit_when_same``: see the module docstring (default False for ``"magnitude"``, as in RigL's SET).

    Regrowth draws: a uniform score per free position and the largest ``k`` (the draws the fidelity
    fixture feeds rigl's code) in layers up to :attr:`SAMPLED_GROWTH_ABOVE` weights and for N:M and block
    patterns; larger unstructured layers sample a uniformly random ``k``-subset of the free positions
    directly (same distribution, O(k) random numbers; see :meth:`_grow_uniform`).

    Patterns: unstructured, N:M (regrowth inside the groups that lost weights) and ``block:B`` (drops
    ``floor(ζ · active blocks)`` kept b x b blocks of smallest summed ``|W|``, regrows as many uniformly
    random non-kept blocks); ``drop_rule="signed"`` is unstructured only."""

    _DROP_RULES = ("magnitude", "signed")

    def __init__(self, model: nn.Module, *, drop_rule: str = "magnitude", reinit_when_same: bool | None = None,
                 **kw: Any) -> None:
        if drop_rule not in self._DROP_RULES:
            raise ValueError(f"SET drop_rule must be one of {self._DROP_RULES}, got {drop_rule!r}")
        self.drop_rule = drop_rule
        if reinit_when_same is None:
            reinit_when_same = drop_rule == "signed"
        super().__init__(model, reinit_when_same=reinit_when_same, **kw)

    def _check_hparams(self) -> None:
        if self.drop_rule == "signed" and self.pattern.group_shape != (1, 1):  # (N:M: (1, m), block: (b, b))
            raise ValueError(f"SET drop_rule='signed' (the original code's rule: ζ of the positive and ζ of the "
                             f"negative weights) is defined for single weights only; pattern {self.pattern} "
                             "needs drop_rule='magnitude'")

    def _drop_set(self, layer, frac: float, nnz: int) -> torch.Tensor | None:
        if self.drop_rule == "magnitude":
            return super()._drop_set(layer, frac, nnz)
        d = set_signed_drop(layer.dense_weight().detach(), layer.mask, frac)
        return d if bool(d.any()) else None

    #: layers above this many weights draw their uniform regrowth by sampling (see :meth:`_grow_uniform`)
    SAMPLED_GROWTH_ABOVE = 1 << 16

    def _grow_uniform(self, n: str, l, after: torch.Tensor, k: int, t: int) -> torch.Tensor:
        """``k`` uniformly random positions outside ``after`` (seeded by the pruner's seed, the step and
        the layer). Up to :attr:`SAMPLED_GROWTH_ABOVE` weights, and for N:M and block patterns: one
        uniform score per position, the largest ``k`` free ones (the draws the fidelity fixture feeds the
        authors' code). Larger unstructured layers sample instead — the same distribution (a uniformly
        random ``k``-subset of the free positions) in O(k) random numbers instead of one per weight (a
        4096 x 1024 layer: ~15 ms of ``torch.rand`` per update): uniform draws over the layer, those
        landing on free positions kept (repeats collapse), more drawn until there are ``k``, then ``k``
        of them by one random score each."""
        if after.numel() <= self.SAMPLED_GROWTH_ABOVE or self.unit != (1, 1) or self.pattern.kept_per_group is not None:
            return self._grow(after, self._rand(l.weight_shape, "grow", t, n, device=l.mask.device), k, owned=True)
        flat_after = after.reshape(-1)
        numel = flat_after.numel()
        free = numel - _kept.nnz(l.mask) + k  # kept before minus the k dropped
        k = min(k, free)
        if k <= 0:
            return torch.zeros_like(after)
        gen = self._gen("grow-sampled", t, n)
        free_pos = ~flat_after.cpu()
        cand = torch.zeros(numel, dtype=torch.bool)
        have = 0
        while have < k:
            want = int((k - have) * numel / max(free - have, 1) * 1.05) + 64
            d = torch.randint(0, numel, (want,), generator=gen)
            cand[d] = True
            cand &= free_pos
            have = int(cand.count_nonzero())
        pos = cand.nonzero().reshape(-1)
        pick = top_k_flat(torch.rand(pos.numel(), generator=gen), k)
        out = torch.zeros(numel, dtype=torch.bool)
        out[pos[pick]] = True
        return out.view(after.shape).to(after.device)

    def _update(self, t: int) -> None:
        self._drop_grow_per_layer(t, self.drop_schedule(t), lambda n, l, after, k: self._grow_uniform(n, l, after, k, t))


class RigL(_DST):
    """RigL (Evci et al. 2020): every ``update_every`` steps (ΔT = 100) until ``end_step`` (T_end, required;
    0.75 of training in the paper), each layer drops ``floor(α_t · active)``, ``α_t = α/2 (1 + cos(π t /
    T_end))`` (α = ``drop_fraction`` = 0.3), of its active weights with the smallest ``|W|`` and regrows as
    many at the positions not kept after the drop with the largest dense ``|G|`` (new weights 0, with zero
    optimizer state). The dense gradient is computed only for the training steps that precede an update.

    ``reinit_when_same`` (default False, as the authors' code): a position dropped and regrown in the same
    update keeps its value and its optimizer state (google-research/rigl
    ``sparse_optimizers_base.py:276-343``); ``True`` restarts it at zero value and state like any new
    connection (the behaviour before issue 18).

    Departures from the authors' code (``docs/methods.md``): their drop score gets ``N(0, 1e-5)`` noise
    as a random tie-break (here ties go to the lower index); on an update iteration their optimizer
    step is skipped, so they drop by the weights *before* the step, here ``step()`` runs after your
    ``optimizer.step()`` and drops by the weights after it (the grow gradient is the same: the one of that
    step's backward pass).

    Patterns: unstructured, N:M (drop by |W|, regrow in the same groups) and ``block:B`` (drops
    ``floor(α_t · active blocks)`` kept b x b blocks of smallest summed ``|W|``, regrows as many non-kept
    blocks of largest summed dense ``|G|``)."""

    def __init__(self, model: nn.Module, *, end_step: int | None = None, **kw: Any) -> None:
        if end_step is None:
            raise ValueError("RigL needs end_step (T_end: mask updates stop there and the drop fraction decays "
                             "to 0 along a cosine; the paper uses 0.75 of the training steps)")
        super().__init__(model, end_step=end_step, **kw)

    def _make_drop_schedule(self, df: float, start: int, end: int | None):
        return CosineDecay(df, end, start)

    def _wants_dense_grad(self, t: int) -> bool:
        return self.updates.is_update(t)

    def _update(self, t: int) -> None:
        grads = self._grads_or_warn("RigL mask update")
        if grads is None:
            return
        self._drop_grow_per_layer(t, self.drop_schedule(t), lambda n, l, after, k: self._grow(
            after, grads[n].to(l.mask.device), k, owned=True, absval=True))


class DSR(_DST):
    """Dynamic sparse reparameterisation (Mostafa & Wang 2019).

    Every ``update_every`` steps: prune every active weight with ``|W| < H`` (one global threshold;
    each layer keeps at least one weight), count them (K), adapt H towards pruning
    ``N_p = drop_fraction·nnz`` per update (``H ← 2H`` if ``K < (1−δ)N_p``, ``H ← H/2`` if
    ``K > (1+δ)N_p``, δ = ``tolerance`` = 0.1; initial ``threshold`` H = 1e-3), then regrow K weights at
    random positions that were inactive before the update (a weight pruned in this update is not regrown
    in it, as in the authors' code), split between layers in proportion to their surviving nonzeros
    (largest remainder, capped by free positions). Total density stays constant; layer densities move. No
    dense gradient. Unstructured only (N:M and ``block:B`` are refused: the threshold acts on single
    weights).

    Compared with the authors' code (IntelAI/dynamic-reparameterization, ``main.py:629-685`` with
    ``--rewire --threshold-prune --rewire-scaling``; ``parameterized_tensors.py:190-257``): the same
    threshold rule, adaptation and proportional regrowth; departures (``docs/methods.md``): the split
    rounds by largest remainder (theirs ``np.round`` plus the rounding discrepancy added to one random
    layer), a layer that would be emptied keeps its largest weight (theirs: the first in flat order), the
    fixed target ``N_p`` is given as a fraction of the (constant) total nonzeros, convolutions are pruned
    per weight (their default ``--sub-kernel-granularity 2`` prunes whole kh x kw kernels).
    """

    pattern_support = {
        "unstructured": True,
        "nm": "DSR moves weights between layers, which a fixed n per m-group forbids",
        "block": ("DSR prunes every weight below a per-weight magnitude threshold H adapted to a weight "
                  "count; a block-granularity variant is not defined"),
    }
    _default_drop = 0.1

    def __init__(self, model: nn.Module, *, threshold: float = 1e-3, tolerance: float = 0.1, **kw: Any) -> None:
        self.threshold = _check_number("threshold", threshold, 0.0, math.inf, lo_open=True)
        self.tolerance = _check_number("tolerance", tolerance, 0.0, 1.0)
        super().__init__(model, **kw)

    def _update(self, t: int) -> None:
        H = self.threshold
        total_nnz = sum(int(l.mask.count_nonzero()) for _, l in self._layers)
        target = self.drop_schedule(t) * total_nnz
        after, dropped = {}, {}
        for n, l in self._layers:
            w = l.dense_weight().abs()
            d = l.mask & (w < H)
            if int(torch.count_nonzero(d)) > 0 and int(torch.count_nonzero(d)) == int(torch.count_nonzero(l.mask)):
                # keep the largest weight of a layer that would be emptied
                keep = top_k_mask(torch.where(l.mask, w.float(), torch.full_like(w.float(), -math.inf)), 1)
                d = d & ~keep
            dropped[n], after[n] = d, l.mask & ~d
        K = sum(int(torch.count_nonzero(d)) for d in dropped.values())
        if K < (1 - self.tolerance) * target:
            self.threshold = H * 2
        elif K > (1 + self.tolerance) * target:
            self.threshold = H / 2
        surv = [float(torch.count_nonzero(after[n])) for n in self._names]
        # as in the authors' code (grow_random(pruned_indices=...): np.setdiff1d), a position pruned in this
        # update is not a candidate for regrowth in the same update
        caps = [int(torch.count_nonzero(~l.mask)) for _, l in self._layers]
        alloc = largest_remainder(K, surv, caps)
        new, grown = {}, {}
        for (n, l), r in zip(self._layers, alloc):
            s = self._rand(l.weight_shape, "grow", t, n, device=l.mask.device)
            g = self._grow(l.mask, s, r) if r > 0 else torch.zeros_like(l.mask)
            new[n], grown[n] = after[n] | g, g
        self._commit(new, grown, dropped)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "threshold": self.threshold}

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        self.threshold = float(d["threshold"])


class SNFS(_DST):
    """Sparse momentum (Dettmers & Zettlemoyer 2019).

    Every step the dense gradient feeds a momentum ``M ← β M + (1 − β) G`` (β = ``momentum`` = 0.9). Every
    ``update_every`` steps: each layer drops ``p`` (``drop_fraction`` = 0.5, cosine-decayed to 0 at
    ``end_step`` when given) of its active weights with the smallest ``|W|``; the K dropped weights are
    regrown across layers in proportion to each layer's mean ``|M|`` over its active weights (largest
    remainder, capped by free positions), inside each layer at the positions not kept after the drop with
    the largest ``|M|`` (new weights 0). A position dropped and regrown in the same update keeps its value
    and optimizer state (``reinit_when_same=False``, as in the authors' code, whose mask reaches the
    weights only after the growth). Needs the dense gradient on every step. Unstructured only (N:M and
    ``block:B`` are refused).

    Compared with the authors' code (TimDettmers/sparse_learning ``sparselearning/core.py:377-514``,
    ``funcs.py:56-114,177-249``) the drop and growth rules and the redistribution statistic (mean ``|M|``
    over the active weights, normalised) are the same; the counts are kept exact where theirs are not
    (``docs/methods.md`` lists each): per-layer drop ``round(p · active)`` (theirs ``ceil``), regrowth
    ``K`` split by largest remainder capped by the free positions (theirs ``ceil(share · K)`` per layer,
    which over-grows by up to one weight per layer, a cap of ``0.99 ·`` (free + removed), the excess
    spread equally over all layers, and an exponentially smoothed correction of the previous updates'
    shortfall), growth among the free positions only (their top-k of ``|M| · (1 − mask)`` counts active
    positions, score 0, when fewer free positions have non-zero momentum: they under-grow). ``M`` is this
    pruner's own EMA of the dense gradients (theirs: the optimizer's momentum buffer, the same direction
    for plain SGD-momentum — ``(1 − β)`` times it — but including weight decay, and ``m/√v`` for Adam);
    the decay of ``p`` is a cosine to 0 at ``end_step`` (theirs to 0.005), and their extra rule that
    lowers ``p`` for layers less than 20% sparse is not applied.
    """

    pattern_support = {
        "unstructured": True,
        "nm": "SNFS redistributes weights between layers, which a fixed n per m-group forbids",
        "block": ("SNFS redistributes individual weights between layers by their momentum; a "
                  "block-granularity variant is not implemented (use RigL or SET)"),
    }
    _default_drop = 0.5

    def __init__(self, model: nn.Module, *, momentum: float = 0.9, **kw: Any) -> None:
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
        super().__init__(model, **kw)
        self._mom: dict[str, torch.Tensor] = {}

    def _make_drop_schedule(self, df: float, start: int, end: int | None):
        return CosineDecay(df, end, start)

    def _wants_dense_grad(self, t: int) -> bool:
        return True

    def _on_step(self, t: int) -> None:
        self._require_pruned()
        grads = self._grads_or_warn("SNFS momentum update")
        if grads is not None:
            b = self.momentum
            for n, l in self._layers:
                g = grads[n].to(l.mask.device)
                m = self._mom.get(n)
                self._mom[n] = (1 - b) * g if m is None else m.mul_(b).add_(g, alpha=1 - b)
        if self.updates.is_update(t) and len(self._mom) == len(self._layers):
            self._update(t)

    def _update(self, t: int) -> None:
        p = self.drop_schedule(t)
        after, dropped, contrib = {}, {}, []
        for n, l in self._layers:
            k = int(round(p * int(l.mask.count_nonzero())))
            d = self._drop(l, k) if k > 0 else torch.zeros_like(l.mask)
            dropped[n], after[n] = d, l.mask & ~d
            mom = self._mom[n].abs()
            contrib.append(float(mom[l.mask].mean()) if bool(l.mask.any()) else 0.0)
        K = sum(int(torch.count_nonzero(d)) for d in dropped.values())
        caps = [int(torch.count_nonzero(~after[n])) for n in self._names]
        alloc = largest_remainder(K, contrib, caps)
        new, grown = {}, {}
        for (n, l), r in zip(self._layers, alloc):
            g = self._grow(after[n], self._mom[n].abs(), r) if r > 0 else torch.zeros_like(l.mask)
            new[n], grown[n] = after[n] | g, g
        self._commit(new, grown, dropped)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "momentum_buffers": {n: v.clone() for n, v in self._mom.items()}}

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        self._mom = {n: v.clone() for n, v in d["momentum_buffers"].items()}
