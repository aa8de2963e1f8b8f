"""Iterative magnitude pruning with rewinding (lottery tickets) and its adversarial variant."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import kept as _kept
from ..nn.layers import SparseModule
from .base import Pruner, _check_int, _check_number, progress

__all__ = ["LotteryTicket", "RobustTicket"]

_REWIND = ("weights", "lr", None)


class LotteryTicket(Pruner):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; late rewinding Frankle et al.
    2020; LR rewinding Renda et al. 2020).

    A round = train (your loop, calling ``pruner.step()`` after each optimizer step), then ``prune()``:
    removes ``ceil(rate · remaining)`` (``rate`` default 0.2) of the *remaining* weights by magnitude
    (``"global"`` by default: one ranking over all managed layers; with another distribution each layer
    removes ``ceil(rate · its remaining)`` and stops at its own final density), never going below the
    target ``sparsity``'s kept count, then rewinds:

    * ``rewind="weights"`` (default): every parameter and buffer of the model (not the masks) goes back
      to its value at step ``rewind_step`` of the first round (``0`` = the weights at construction), the
      survivors of the sparse layers included. ``optimizer`` (if given): its learning rates go back to
      those of step ``rewind_step`` and its state (momentum, Adam moments) restarts empty, as every
      level of open_lth trains with a new optimizer (``optimizer_state="reset"``, default);
      ``optimizer_state="snapshot"`` restores the state saved at ``rewind_step`` instead (the behaviour
      before issue 18; the same thing when ``rewind_step=0``). ``scheduler`` (if given) goes back to step
      ``rewind_step``, as open_lth fast-forwards a new schedule to the rewind step.
    * ``rewind="lr"``: the weights stay; only the ``scheduler`` (and the optimizer's learning rates) go
      back to step ``rewind_step`` — retrain with the LR schedule restarted.
    * ``rewind=None``: nothing is restored (fine-tuning).

    Reference: facebookresearch/open_lth (Frankle et al.'s code; ``pruning/sparse_global.py:33-61``,
    ``lottery/runner.py:95-133``). Same global magnitude criterion over the prunable layers' remaining
    weights, the same per-round count ``ceil(rate · remaining)``, the same rewinding of every parameter
    and buffer to the rewind step. Departures (``docs/methods.md``): open_lth's threshold is the
    ``(n+1)``-th smallest remaining magnitude and only weights strictly above it stay, so it removes one
    weight more per round (``n + 1``; here exactly ``n``), and ties at its threshold all go; open_lth has
    no final target (levels run until you stop), here the last round stops at ``sparsity``.

    ``rounds`` tells how many ``prune()`` calls reach the target; ``done`` whether it is reached.
    :meth:`run` drives the rounds with a callback and a progress bar. N:M is refused (a rate of the
    remaining weights per round is inherently unstructured; use :class:`Magnitude` with N:M for one shot).
    ``block:B`` is supported: each round removes ``rate`` of the remaining b x b blocks, those of smallest
    summed ``|W|``.
    """

    default_distribution = "global"
    _one_shot = False
    pattern_support = {"unstructured": True, "block": True,
                       "nm": "IMP prunes a fraction of the remaining weights per round, which N:M cannot express"}

    def __init__(self, model: nn.Module, *, sparsity: float | None = None, rate: float = 0.2,
                 rewind: str | None = "weights", rewind_step: int = 0, optimizer: Any = None,
                 scheduler: Any = None, optimizer_state: str = "reset", **kw: Any) -> None:
        self.rate = _check_number("rate", rate, 0.0, 1.0, lo_open=True, hi_open=True)
        if rewind not in _REWIND:
            raise ValueError(f"rewind must be one of 'weights', 'lr', None; got {rewind!r}")
        if optimizer_state not in ("reset", "snapshot"):
            raise ValueError(f"optimizer_state must be 'reset' or 'snapshot', got {optimizer_state!r}")
        self.optimizer_state = optimizer_state
        if rewind == "lr" and scheduler is None and optimizer is None:
            raise ValueError("rewind='lr' restores the learning-rate schedule: pass scheduler= (and/or optimizer=)")
        self.rewind = rewind
        self.rewind_step = _check_int("rewind_step", rewind_step, 0)
        self.optimizer, self.scheduler = optimizer, scheduler
        super().__init__(model, sparsity=sparsity, **kw)
        self.round = 0
        self._round_step = 0
        self._snapshot: dict | None = None
        self._final_dens = None if self.distribution == "global" else self._densities(self.target_sparsity)
        if self.rewind_step == 0 and self.rewind is not None:
            self._take_snapshot()

    # ---- snapshot / rewind -------------------------------------------------------------------------
    def _mask_ids(self) -> set[int]:
        return {id(l.mask) for _, l in self._layers}

    def _sparse_params(self) -> dict[str, SparseModule]:
        """``{parameter name: sparse layer}`` for the kept-values weight of every sparse layer of the model."""
        return {(f"{mn}." if mn else "") + "weight": m for mn, m in self.model.named_modules()
                if isinstance(m, SparseModule)}

    def _take_snapshot(self) -> None:
        mids = self._mask_ids()
        sparse = self._sparse_params()
        # sparse layers' weights are saved dense (their kept values shrink with the masks), with the masks
        # they had (to move the optimizer state saved with them onto later masks)
        snap = {"params": {n: p.detach().clone() for n, p in self.model.named_parameters() if n not in sparse},
                "dense": {n: l.dense_weight() for n, l in sparse.items()},
                "masks": {n: l.mask.detach().clone() for n, l in sparse.items()},
                "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers() if id(b) not in mids}}
        if self.optimizer is not None:
            snap["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        if self.scheduler is not None:
            snap["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        self._snapshot = snap

    def _check_snapshot(self) -> dict:
        snap = self._snapshot
        if snap is None:
            raise RuntimeError(f"LotteryTicket: no weights saved at rewind_step={self.rewind_step} (the first "
                               f"round ran only {self._step} steps); call pruner.step() after every optimizer step")
        return snap

    def _restore(self) -> None:
        """Rewind everything but the managed layers' weights (:meth:`_prune` sets those with the masks)."""
        if self.rewind is None:
            return
        snap = self._check_snapshot()
        if self.rewind == "weights":
            managed = {id(l) for _, l in self._layers}
            sparse = self._sparse_params()
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in sparse:
                        if id(sparse[n]) not in managed and n in snap["dense"]:
                            sparse[n].set_dense_weight(snap["dense"][n])
                    elif n in snap["params"]:
                        p.copy_(snap["params"][n])
                mids = self._mask_ids()
                for n, b in self.model.named_buffers():
                    if id(b) not in mids and n in snap["buffers"]:
                        b.copy_(snap["buffers"][n])
            if self.optimizer is not None and "optimizer" in snap:
                if self.optimizer_state == "snapshot":
                    self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
                    self._remap_optimizer_state(snap, sparse)
                else:  # open_lth: each level trains with a new optimizer (hyperparameters of the rewind step)
                    for g, gs in zip(self.optimizer.param_groups, snap["optimizer"]["param_groups"]):
                        g.update({k: copy.deepcopy(v) for k, v in gs.items() if k != "params"})
                    self.optimizer.state.clear()
        if self.rewind in ("weights", "lr") and self.scheduler is not None and "scheduler" in snap:
            self.scheduler.load_state_dict(copy.deepcopy(snap["scheduler"]))
            if self.optimizer is not None:
                lrs = self.scheduler.get_last_lr() if hasattr(self.scheduler, "get_last_lr") else None
                if lrs is not None:
                    for g, lr in zip(self.optimizer.param_groups, lrs):
                        g["lr"] = lr
        elif self.rewind == "lr" and self.optimizer is not None and "optimizer" in snap:
            for g, gs in zip(self.optimizer.param_groups, snap["optimizer"]["param_groups"]):
                g["lr"] = gs["lr"]

    def _remap_optimizer_state(self, snap: dict, sparse: dict[str, SparseModule]) -> None:
        """The rewound optimizer state of a sparse layer's weight is laid out for the mask at snapshot time:
        move it onto the current mask (positions kept in both keep their state; others start at 0)."""
        with torch.no_grad():
            for n, l in sparse.items():
                old = snap.get("masks", {}).get(n)
                st = self.optimizer.state.get(l.weight)
                if old is None or not st:
                    continue
                old = old.to(l.mask.device)
                old_nnz = int(old.count_nonzero())
                src, keep = _kept.remap(old, l.mask)
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == old_nnz:
                        st[k] = _kept.remap_tensor(v, src, keep)

    # ---- rounds ------------------------------------------------------------------------------------
    # ---- per-round counts ----------------------------------------------------------------------------
    def _units(self) -> dict[str, tuple[int, int]]:
        """``{layer: (kept units, total units)}`` (units: weights, or b x b blocks for ``block:B``)."""
        u = math.prod(self.unit)
        return {n: (int(l.mask.count_nonzero()) // u, l.mask.numel() // u) for n, l in self._layers}

    def _final_kept(self, units: dict[str, tuple[int, int]]) -> dict[str, int] | int:
        """Kept units at the target: one global count, or per layer for the other distributions (as
        :meth:`~sparsefast.pruning.base.Pruner._allocate` rounds them)."""
        if self.distribution == "global":
            return int(round((1.0 - self.target_sparsity) * sum(t for _, t in units.values())))
        return {n: max(1, int(round(self._final_dens[n] * t))) for n, (_, t) in units.items()}

    def _next_kept(self, kept: dict[str, int] | int, final: dict[str, int] | int) -> dict[str, int] | int:
        """One round: ``ceil(rate · remaining)`` fewer (open_lth ``sparse_global.py:38-40``, the same float64
        product), not below the target (globally, or per layer)."""
        step = lambda k, f: max(f, k - math.ceil(self.rate * k)) if k > f else k  # noqa: E731
        if isinstance(kept, int):
            return step(kept, final)
        return {n: step(kept[n], final[n]) for n in kept}

    @property
    def rounds(self) -> int:
        """Total number of ``prune()`` calls that reach the target sparsity (from the initial masks)."""
        s = self.target_sparsity
        if s <= 0:
            return 0
        if self.pattern.density is not None:  # the pattern fixes the density (N:M): one round reaches it
            return 1
        units = {n: (t, t) for n, (_, t) in self._units().items()}  # the rounds count from all-kept
        final = self._final_kept(units)
        kept = sum(t for t, _ in units.values()) if isinstance(final, int) else {n: t for n, (t, _) in units.items()}
        r = 0
        while kept != final and r < 10_000:
            kept, r = self._next_kept(kept, final), r + 1
        return max(1, r)

    @property
    def done(self) -> bool:
        return self.round >= self.rounds

    def _round_kept(self) -> dict[str, int] | int:
        units = self._units()
        final = self._final_kept(units)
        if self._one_shot:
            return final
        kept = sum(k for k, _ in units.values()) if isinstance(final, int) else {n: k for n, (k, _) in units.items()}
        return self._next_kept(kept, final)

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        if self.done:
            return
        if self.rewind is not None:
            self._check_snapshot()  # raises the explanation before any mask changes
        scores = self._masked_scores({n: l.dense_weight().abs() for n, l in self._layers})
        fixed = self.pattern.density is not None  # N:M: straight to the pattern's density, from every weight
        if fixed:
            new = self._allocate({n: l.dense_weight().abs() for n, l in self._layers})
        else:
            kept, total = self._round_kept(), self._units()
            if isinstance(kept, int):  # one global ranking keeping exactly `kept` units
                n_all = sum(t for _, t in total.values())
                new = self._allocate(scores, 1.0 - kept / n_all)
            else:  # each layer towards its own final density
                new = self._allocate(scores, densities={n: kept[n] / total[n][1] for n in kept})
        if not fixed:
            new = {n: new[n] & l.mask for n, l in self._layers}
        if self.rewind == "weights":  # the survivors go back to their values at the rewind point
            names = {id(l): n for n, l in self._sparse_params().items()}
            self._apply(new, weights={n: self._snapshot["dense"][names[id(l)]] for n, l in self._layers})
        else:
            self._apply(new)
        self.round += 1
        self._round_step = 0
        self._restore()

    def _on_step(self, t: int) -> None:
        self._round_step += 1
        if (self.rewind is not None and self._snapshot is None and self.round == 0
                and self._round_step == self.rewind_step):
            self._take_snapshot()

    def run(self, train_fn: Callable[[nn.Module, int], Any], *, final_train: bool = True) -> nn.Module:
        """Drive the remaining rounds: ``train_fn(model, round)`` trains (calling ``pruner.step()`` after
        each optimizer step), then ``prune()``; with ``final_train`` the ticket is trained once more at
        the end. Shows a progress bar over rounds. Returns the model."""
        if not callable(train_fn):
            raise TypeError("run() needs a callable train_fn(model, round)")
        left = max(self.rounds - self.round, 0)
        for _ in progress(range(left), total=left, desc=f"{type(self).__name__} rounds", enable=self.progress):
            train_fn(self.model, self.round)
            self.prune()
        if final_train:
            train_fn(self.model, self.round)
        return self.model

    def _extra_state(self) -> dict:
        return {"round": self.round, "round_step": self._round_step, "snapshot": self._snapshot}

    def _load_extra_state(self, d: dict) -> None:
        self.round = int(d["round"])
        self._round_step = int(d["round_step"])
        self._snapshot = d["snapshot"]


class RobustTicket(LotteryTicket):
    """Robust tickets (Fu et al. 2023): draw the ticket from an adversarially trained model.

    ``method="omp"`` (one-shot magnitude pruning): ``prune()`` removes the smallest weights to the target
    sparsity in one round — call it on the adversarially pre-trained model. ``method="imp"`` (A-IMP):
    rounds as :class:`LotteryTicket` (``rate`` of the remaining weights per round, rewinding to the
    weights at ``rewind_step``, 0 = the pre-trained weights handed in), where your inner training is the
    PGD min-max ``min_W max_{‖δ‖∞≤ε} L(f(M⊙W, x+δ), y)``: use :meth:`adversarial_batch` to get ``x+δ``.

    Args: ``eps`` (8/255), ``alpha`` (PGD step, 2/255), ``pgd_steps`` (7), ``clamp`` (``(lo, hi)`` valid
    input range or ``None``). :meth:`finetune` prepares downstream fine-tuning: ``"full"`` or
    ``"linear"`` (linear probe: everything frozen except the head). OMP supports N:M (top-n ``|W|`` per
    m-group); A-IMP refuses N:M. Both support ``block:B`` (blocks of largest summed ``|W|``).

    Reference: the paper (Fu et al. 2023, seed 004 §II) has no public code; it builds on the practice
    it cites, which matches here (``tests/pruning/test_fidelity_b.py``): global L1 OMP / IMP as
    VITA-Group/CV_LTH_Pre-training (``pruning_utils.py:15-34``; that code skips ``conv1`` and the linear
    head: pass ``filter_fn`` to do the same), PGD as MadryLab/robustness ``LinfStep``. A-IMP rounds remove
    ``ceil(rate · remaining)`` (open_lth's rule, :class:`LotteryTicket`); torch.nn.utils.prune, used by
    CV_LTH_Pre-training, removes ``round(rate · remaining)`` — one weight apart at most.
    """

    pattern_support = {"unstructured": True, "block": True,
                       "nm": "A-IMP prunes a fraction of the remaining weights per round (method='omp' supports N:M)"}

    def __init__(self, model: nn.Module, *, method: str = "omp", eps: float = 8 / 255, alpha: float = 2 / 255,
                 pgd_steps: int = 7, clamp: tuple[float, float] | None = None, rate: float = 0.2,
                 rewind: str | None = "weights", **kw: Any) -> None:
        if method not in ("omp", "imp"):
            raise ValueError(f"RobustTicket method must be 'omp' or 'imp', got {method!r}")
        self.method = method
        self.eps = _check_number("eps", eps, 0.0, math.inf)
        self.alpha = _check_number("alpha", alpha, 0.0, math.inf)
        self.pgd_steps = _check_int("pgd_steps", pgd_steps, 0)
        if clamp is not None and (len(clamp) != 2 or clamp[0] >= clamp[1]):
            raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")
        self.clamp = clamp
        self._pgd_calls = 0
        if method == "omp":  # instance attribute: one shot to N:M is well defined
            self.pattern_support = {**self.pattern_support, "nm": True}
            self._one_shot = True
        super().__init__(model, rate=rate, rewind=rewind, **kw)

    @property
    def rounds(self) -> int:
        if self.method == "omp":
            return 1 if (self.target_sparsity or 0) > 0 else 0
        return super().rounds

    def adversarial_batch(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable | None = None) -> torch.Tensor:
        """PGD (L∞, Madry et al. 2018) adversarial examples against the current (masked) model, the iterate
        form of MadryLab/robustness ``attack_steps.py:81-105`` (``LinfStep``) and ``attacker.py``'s loop
        with ``random_start=True, use_best=False``: random start ``x' = x + 2(u − 0.5)ε`` (u uniform, seeded),
        then ``pgd_steps`` times ``x' ← x' + alpha·sign(∂L/∂x')`` projected onto the ε-ball around ``x``;
        with ``clamp=(lo, hi)`` every iterate (the random start too) is also clipped to that box, as their
        projection clips to [0, 1]. Weight gradients are not touched. Returns a detached tensor shaped
        like ``x``."""
        loss_fn = loss_fn or F.cross_entropy
        self._pgd_calls += 1
        g = self._gen("pgd", self._step, self._pgd_calls)
        x = x.detach()
        u = torch.rand(x.shape, generator=g).to(device=x.device, dtype=x.dtype)
        xa = x + 2 * (u - 0.5) * self.eps
        if self.clamp is not None:
            xa = xa.clamp(*self.clamp)
        for _ in range(self.pgd_steps):
            xa = xa.clone().detach().requires_grad_(True)
            loss = loss_fn(self.model(xa), y)
            (gd,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = xa + gd.sign() * self.alpha
                xa = (xa - x).clamp(-self.eps, self.eps) + x
                if self.clamp is not None:
                    xa = xa.clamp(*self.clamp)
        return xa.detach()

    def finetune(self, mode: str = "full", head: str | nn.Module | None = None) -> list[nn.Parameter]:
        """Prepare downstream fine-tuning and return the parameters to optimise. ``"full"``: every
        parameter trains (masks stay). ``"linear"``: linear probe — every parameter is frozen except
        those of ``head`` (a module or its name; default the last managed layer)."""
        if mode not in ("full", "linear"):
            raise ValueError(f"finetune mode must be 'full' or 'linear', got {mode!r}")
        if mode == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return [p for p in self.model.parameters()]
        if head is None:
            head_mod = self._layers[-1][1]
        elif isinstance(head, str):
            head_mod = self.model.get_submodule(head)
        else:
            head_mod = head
        head_ids = {id(p) for p in head_mod.parameters()}
        if not head_ids:
            raise ValueError("finetune('linear'): the head has no parameters")
        for p in self.model.parameters():
            p.requires_grad_(id(p) in head_ids)
        return [p for p in self.model.parameters() if id(p) in head_ids]

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "pgd_calls": self._pgd_calls}

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        self._pgd_calls = int(d.get("pgd_calls", 0))
