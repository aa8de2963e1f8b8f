"""Pruning at initialisation: SNIP, GraSP, SynFlow (masks fixed after ``prune()``).

Gradients: the three scores multiply the gradient by ``W``, which is exactly zero at pruned positions,
so the gradient of the sparse layers' kept values (equal to the dense gradient at every kept position;
scattered to the dense shape with zeros at pruned positions) gives the exact scores; no dense-gradient
capture is needed. At initialisation every position is kept, so these are the full dense gradients. Already pruned weights score
``-inf`` and never return. ``.grad`` of the model is never touched (``torch.autograd.grad``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..formats import kept as _kept
from ..nn.layers import SparseLinear
from .base import (Pruner, _check_batch, _check_int, _check_number, _iter_batches, batch_loss, progress,
                   weight_shape)
from .schedules import ExponentialDensity

__all__ = ["SNIP", "GraSP", "SynFlow"]


class _Scoring:
    """Temporarily make the managed weights require grad (frozen layers included)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.weights = weights

    def __enter__(self):
        self.req = [w.requires_grad for w in self.weights]
        for w in self.weights:
            w.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for w, r in zip(self.weights, self.req):
            w.requires_grad_(r)


def _dense(layer: nn.Module, values: torch.Tensor | None) -> torch.Tensor:
    """Kept-values tensor ``values`` (a gradient) as the dense weight-shaped tensor, zeros at pruned
    positions (all zeros for ``None``)."""
    if values is None:
        return torch.zeros(layer.weight_shape, dtype=layer.weight.dtype, device=layer.mask.device)
    return _kept.scatter(values.detach(), layer.mask)


def snip_grads(pruner: Pruner, batch: Any, loss_fn: Callable | None, batches: int) -> dict[str, torch.Tensor]:
    """Sum over up to ``batches`` batches of ``∂L/∂W`` (float32, weight-shaped; zero at pruned positions)
    for every managed layer."""
    weights = [l.weight for _, l in pruner._layers]
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    nb = 0
    with _Scoring(weights):
        for b in _iter_batches(batch, batches):
            loss = batch_loss(pruner.model, b, loss_fn)
            gs = torch.autograd.grad(loss, weights, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a.add_(g.float())
            nb += 1
    if nb == 0:
        raise ValueError(f"{type(pruner).__name__}.prune(): the batch iterable yielded no batch")
    return {n: _dense(l, a) for (n, l), a in zip(pruner._layers, acc)}


class SNIP(Pruner):
    """SNIP (Lee et al. 2019): score ``|G ⊙ W|`` at initialisation on ``batches`` batches (default 1) of
    ``batch`` (an ``(x, y)`` tuple or an iterable of them), keep the top ``round((1 − sparsity)·n)``
    (``"global"`` by default, as the official code). N:M: top-n score of each m-group. ``loss_fn(output,
    y)`` defaults to cross-entropy. Requires data: ``prune()`` without ``batch`` raises ``ValueError``.
    ``block:B``: the b x b blocks with the largest summed score are kept (global ranking of blocks by
    default). ``"global"`` keeps at least one weight per layer (identical to the plain top-k unless a
    layer would be emptied).

    ``bias`` — the official code (namhoonlee/snip-public ``snip/model.py:55-70,172-185``) puts every
    variable whose name holds ``'w'`` or ``'b'`` in the ranking: the biases' ``|g_b ⊙ b|`` join the
    weights' scores in one top-k of ``round((1 − sparsity)·(n_w + n_b))`` and pruned biases stay 0.
    With their zero-initialised biases every bias scores 0 and is removed: their networks train without
    biases. ``False`` (default): SNIP prunes connections (the paper's ``c_j``); biases are kept and
    trained, and ``sparsity`` counts weights. ``True``: the official ranking (unstructured, ``"global"``
    only); a pruned bias is set to 0 and its gradient masked (so SGD, weight decay, momentum and Adam keep
    it at 0); ``bias_masks()`` returns the kept biases.

    Also different in the official code: it scores one initialisation (``weights_bp``) and then trains a
    second, independently drawn one (``weights_ap``, ``model.py:52``) under the mask; here the scored
    weights are the ones trained (as the paper describes).
    """

    default_distribution = "global"

    def __init__(self, model: nn.Module, *, batches: int = 1, bias: bool = False, **kw: Any) -> None:
        self.batches = _check_int("batches", batches, 1)
        self.bias = bool(bias)
        super().__init__(model, **kw)
        self._bias_masks: dict[str, torch.Tensor] = {}
        self._bias_hooks: list[Any] = []

    def _check_hparams(self) -> None:
        if self.bias and (str(self.pattern) != "unstructured" or self.distribution != "global"):
            raise ValueError("SNIP(bias=True) ranks biases with the weights in one global top-k (the official "
                             f"code's rule): it needs pattern='unstructured' and distribution='global', got "
                             f"pattern={self.pattern}, distribution={self.distribution!r}")

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        _check_batch(type(self).__name__, batch)
        if self.bias:
            return self._prune_with_bias(batch, loss_fn)
        g = snip_grads(self, batch, loss_fn, self.batches)
        scores = {n: (g[n] * l.dense_weight().float()).abs() for n, l in self._layers}
        if self.pattern.kept_per_group is None:  # (a per-group rule, N:M, ranks every position of a group)
            scores = self._masked_scores(scores)
        self._apply(self._maybe_flow_repair(self._allocate(scores), "init"))

    def _prune_with_bias(self, batch: Any, loss_fn: Callable | None) -> None:
        layers = [l for _, l in self._layers]
        biased = [(n, l) for n, l in self._layers if l.bias is not None]
        params = [l.weight for l in layers] + [l.bias for _, l in biased]
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        nb = 0
        with _Scoring(params):
            for b in _iter_batches(batch, self.batches):
                gs = torch.autograd.grad(batch_loss(self.model, b, loss_fn), params, allow_unused=True)
                for a, g in zip(acc, gs):
                    if g is not None:
                        a.add_(g.float())
                nb += 1
        if nb == 0:
            raise ValueError("SNIP.prune(): the batch iterable yielded no batch")
        nl = len(layers)
        ws = self._masked_scores({n: (_dense(l, a) * l.dense_weight().float()).abs()
                                  for (n, l), a in zip(self._layers, acc[:nl])})
        bs = []
        for (n, l), a in zip(biased, acc[nl:]):
            s = (a * l.bias.detach().float()).abs()
            old = self._bias_masks.get(n)
            bs.append(s if old is None else torch.where(old.to(s.device), s, torch.full_like(s, -math.inf)))
        for n, s in list(ws.items()) + [(n, s) for (n, _), s in zip(biased, bs)]:
            if torch.isnan(s).any():
                raise ValueError(f"SNIP layer {n!r}: scores contain NaN; cannot rank them to build a mask")
        flat = torch.cat([ws[n].reshape(-1).cpu() for n in self._names] + [s.reshape(-1).cpu() for s in bs])
        sizes = [ws[n].numel() for n in self._names]
        keep = int(round((1.0 - self.target_sparsity) * flat.numel()))
        # one global top-k; every layer keeps at least its best weight (biases are not forced)
        order = torch.sort(flat, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        off = 0
        for k in sizes:
            if k > 0:
                kept[off + int(torch.argmin(rank[off:off + k]))] = True
            off += k
        rest = max(0, keep - int(kept.sum()))
        if rest:
            kept[order[~kept[order]][:rest]] = True
        new, off = {}, 0
        for n, l in self._layers:
            k = l.mask.numel()
            new[n] = kept[off:off + k].reshape(l.weight_shape).to(l.mask.device)
            off += k
        for (n, l) in biased:
            k = l.bias.numel()
            self._bias_masks[n] = kept[off:off + k].to(l.bias.device)
            off += k
        self._apply(self._maybe_flow_repair(new, "init"))
        self._hold_biases()

    def _hold_biases(self) -> None:
        """Zero the pruned biases and mask their gradient (hooks re-registered)."""
        for h in self._bias_hooks:
            h.remove()
        self._bias_hooks = []
        mods = dict(self._layers)
        with torch.no_grad():
            for n, m in self._bias_masks.items():
                b = mods[n].bias
                m = m.to(b.device)
                b.mul_(m)
                self._bias_hooks.append(b.register_hook(lambda g, m=m: g * m))

    def _on_step(self, t: int) -> None:
        if self._bias_masks:
            mods = dict(self._layers)
            with torch.no_grad():
                for n, m in self._bias_masks.items():
                    mods[n].bias.mul_(m.to(mods[n].bias.device))

    def bias_masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool mask of kept biases}`` (copies; only with ``bias=True`` after ``prune()``)."""
        return {n: m.clone() for n, m in self._bias_masks.items()}

    def _extra_state(self) -> dict:
        return {"bias_masks": self.bias_masks()} if self.bias else {}

    def _load_extra_state(self, d: dict) -> None:
        if self.bias and d.get("bias_masks"):
            self._bias_masks = {n: m.clone().bool() for n, m in d["bias_masks"].items()}
            self._hold_biases()


class GraSP(Pruner):
    """GraSP (Wang et al. 2020): ``S = −W ⊙ (H g)`` with ``g`` the gradient and ``H g`` a Hessian-vector
    product (double backward through the sparse layers), logits divided by ``temperature`` (200). As in
    the paper and its code, the weights with the *highest* ``S`` are removed and the rest kept (i.e. keep
    the largest ``W ⊙ Hg``). Data: ``batch`` (``(x, y)`` or an iterable; ~10 samples per class), using up
    to ``batches`` batches: ``g`` is the sum of the batches' gradients and ``Hg`` the sum of the batches'
    ``∂(gᵀ∇L_b)/∂W`` (the authors' code uses two half-batches this way). ``"global"`` by default; N:M
    keeps the n lowest ``S`` of each m-group; ``block:B`` keeps the b x b blocks with the lowest summed
    ``S`` (largest summed ``W ⊙ Hg``). Kept count: ``round((1 − sparsity)·n)`` (the authors remove
    ``int(sparsity·n)`` and keep ties at the threshold: ±1 weight).

    ``reinit`` — the authors' code (alecwangcq/GraSP ``pruner/GraSP.py:62-66``, ``reinit=True`` by default
    there) scores a *copy* of the network whose ``nn.Linear`` weights are re-drawn with Xavier normal;
    the masks are then applied to the original, untouched weights:

    * ``False`` (default here): score the model's own weights, as the paper's ``S(−θ ⊙ Hg)`` reads. The
      authors' re-draw compensates for their own initialisation of Linear layers (``N(0, 0.01)``,
      ``models/base/init_utils.py``), which with ``T = 200`` makes those layers' Hessian term vanish; with
      any other initialisation it scores weights that will never be trained.
    * ``True`` or ``"linear"``: every Linear layer of the model (sparse or plain) is scored with
      Xavier-normal weights drawn from the seeded generator; the weights are restored afterwards.
    * ``"last_linear"``: only the last Linear layer (``pruner/GraSP_ImageNet.py:37-43``, their ImageNet
      variant).
    """

    default_distribution = "global"

    def __init__(self, model: nn.Module, *, temperature: float = 200.0, batches: int = 1,
                 reinit: bool | str = False, **kw: Any) -> None:
        self.temperature = _check_number("temperature", temperature, 0.0, math.inf, lo_open=True)
        self.batches = _check_int("batches", batches, 1)
        if reinit is True:
            reinit = "linear"
        if reinit not in (False, None, "linear", "last_linear"):
            raise ValueError(f"GraSP: reinit must be False, True, 'linear' or 'last_linear', got {reinit!r}")
        self.reinit = reinit or False
        super().__init__(model, **kw)

    def _reinit_targets(self) -> list[tuple[str, nn.Module]]:
        """The Linear layers (sparse or plain, managed or not) re-drawn for scoring, in module order."""
        lin = [(n, m) for n, m in self.model.named_modules() if type(m) is nn.Linear or isinstance(m, SparseLinear)]
        if self.reinit == "last_linear":
            return lin[-1:]
        return lin if self.reinit == "linear" else []

    def _reinit_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        """Xavier-normal weight (dense shape) for ``module``, from the generator seeded by ``(seed, name)``."""
        w = torch.empty(weight_shape(module), dtype=torch.float32)
        nn.init.xavier_normal_(w, generator=self._gen("reinit", name))
        return w

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        _check_batch("GraSP", batch)
        saved = []
        try:
            with torch.no_grad():
                for n, m in self._reinit_targets():
                    w = self._reinit_weight(n, m)
                    if isinstance(m, SparseLinear):
                        saved.append((m, m.dense_weight()))
                        m.set_dense_weight(w.to(m.weight.device, m.weight.dtype))
                    else:
                        saved.append((m, m.weight.detach().clone()))
                        m.weight.copy_(w.to(m.weight.device, m.weight.dtype))
            scores = self._scores(batch, loss_fn)
        finally:
            with torch.no_grad():
                for m, w in saved:  # the model's own weights: the masks apply to them
                    if isinstance(m, SparseLinear):
                        m.set_dense_weight(w)
                    else:
                        m.weight.copy_(w)
        if self.pattern.kept_per_group is None:  # (a per-group rule, N:M, ranks every position of a group)
            scores = self._masked_scores(scores)
        self._apply(self._maybe_flow_repair(self._allocate(scores), "init"))

    def _scores(self, batch: Any, loss_fn: Callable | None) -> dict[str, torch.Tensor]:
        """``W ⊙ Hg`` per managed layer (keep the largest; ``S = −W ⊙ Hg``)."""
        weights = [l.weight for _, l in self._layers]
        T = self.temperature
        tf = (lambda out: out / T)
        data = list(_iter_batches(batch, self.batches))
        if not data:
            raise ValueError("GraSP.prune(): the batch iterable yielded no batch")
        with _Scoring(weights):
            g = [torch.zeros_like(w) for w in weights]
            for b in data:  # pass 1: the gradient g (no graph)
                gs = torch.autograd.grad(batch_loss(self.model, b, loss_fn, transform=tf), weights, allow_unused=True)
                for a, gi in zip(g, gs):
                    if gi is not None:
                        a.add_(gi.detach())
            hg = [torch.zeros_like(w) for w in weights]
            for b in data:  # pass 2: H g = ∂(gradᵀ g)/∂W
                gs = torch.autograd.grad(batch_loss(self.model, b, loss_fn, transform=tf), weights,
                                         create_graph=True, allow_unused=True)
                z = sum((gi * gc).sum() for gi, gc in zip(gs, g) if gi is not None)
                hs = torch.autograd.grad(z, weights, allow_unused=True)
                for a, h in zip(hg, hs):
                    if h is not None:
                        a.add_(h.detach())
        # keep = lowest S = -W*Hg  <=>  largest W*Hg
        return {n: (l.dense_weight() * _dense(l, h)).float() for (n, l), h in zip(self._layers, hg)}


class SynFlow(Pruner):
    """SynFlow (Tanaka et al. 2020): data-free iterative synaptic-flow pruning.

    Every parameter and buffer is replaced by its absolute value (biases and norm shifts / running
    means by 0 when ``zero_bias``, the default, so that all the flow goes through the weights, the
    conservation property behind SynFlow's avoidance of layer collapse; ``zero_bias=False`` keeps
    ``|b|`` as the authors' code does), the model (in eval mode) is fed an
    all-ones input of ``input_shape`` (per sample, e.g. ``(1, 28, 28)``; or the shape of ``batch``'s
    inputs, whose values are ignored), ``R = Σ output`` and the score is ``|∂R/∂W ⊙ W|``. Pruning is
    iterated over ``iterations`` rounds (100) with density ``D^(k/iterations)`` after round ``k``
    (:class:`~sparsefast.pruning.schedules.ExponentialDensity`); the original signed values are restored
    at the end. ``"global"`` by default (the paper's); other distributions move each layer to
    ``d_l^(k/iterations)``. N:M: one round (top-n score per m-group). ``block:B``: every round keeps the
    b x b blocks of largest summed score (densities in blocks). Progress bar over rounds.
    Runs in the model's dtype: very deep float16 models may overflow ``R``.
    """

    default_distribution = "global"

    def __init__(self, model: nn.Module, *, iterations: int = 100, input_shape: tuple[int, ...] | None = None,
                 zero_bias: bool = True, **kw: Any) -> None:
        self.iterations = _check_int("iterations", iterations, 1)
        self.zero_bias = bool(zero_bias)
        if input_shape is not None:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_shape):
                raise ValueError(f"input_shape must be positive ints (one sample, no batch dim), got {input_shape!r}")
            input_shape = tuple(input_shape)
        self.input_shape = input_shape
        super().__init__(model, **kw)

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        shape = self.input_shape
        if shape is None:
            if batch is None:
                raise ValueError("SynFlow is data-free but needs the input shape: pass input_shape=(C, H, W) "
                                 "(one sample) or an example batch (only its shape is used)")
            x0 = next(iter(_iter_batches(batch, 1)))[0]
            shape = tuple(x0.shape[1:])
        w0 = self._layers[0][1].weight
        model = self.model
        layers = [l for _, l in self._layers]
        # the managed layers' kept values shrink with the masks: saved (and restored) as dense weights
        skip = {id(l.mask) for l in layers} | {id(l.weight) for l in layers}
        state = [t for t in list(model.parameters()) + list(model.buffers())
                 if id(t) not in skip and t.is_floating_point()]
        saved = [t.detach().clone() for t in state]
        saved_dense = [l.dense_weight() for l in layers]
        was_training = model.training
        weights = [l.weight for l in layers]
        fixed = self.pattern.density is not None  # the pattern fixes the density (N:M): one round reaches it
        rounds = 1 if fixed else self.iterations
        sched = ExponentialDensity(1.0 - self.target_sparsity, rounds)
        final = None if self.distribution == "global" or fixed else self._densities(self.target_sparsity)
        try:
            model.eval()
            with torch.no_grad():
                for t in state + weights:
                    t.abs_()
                if self.zero_bias:
                    for mod in model.modules():
                        b = getattr(mod, "bias", None)
                        if isinstance(b, torch.Tensor) and b.is_floating_point():
                            b.zero_()
                        rm = getattr(mod, "running_mean", None)
                        if isinstance(rm, torch.Tensor):
                            rm.zero_()
            x = torch.ones((1, *shape), device=w0.device, dtype=w0.dtype)
            for k in progress(range(1, rounds + 1), total=rounds, desc="SynFlow rounds", enable=self.progress):
                with _Scoring(weights):
                    R = model(x).sum()
                    gs = torch.autograd.grad(R, weights, allow_unused=True)
                scores = {n: (_dense(l, g) * l.dense_weight()).abs().float()
                          for (n, l), g in zip(self._layers, gs)}
                del R, gs  # no graph may outlive a mask change that resizes the kept values
                if fixed:
                    new = self._allocate(scores)
                else:
                    scores = self._masked_scores(scores)
                    if final is None:
                        new = self._allocate(scores, 1.0 - sched(k))
                    else:
                        new = self._allocate(scores, densities={n: final[n] ** (k / rounds) for n in self._names})
                    new = {n: new[n] & l.mask for n, l in self._layers}
                self._apply(new)
            if self.flow_repair and not fixed:  # repaired edges get W(0) in the restore below
                self._apply(self._maybe_flow_repair(self.masks(), "init"))
        finally:
            with torch.no_grad():
                for t, s in zip(state, saved):
                    t.copy_(s)
                for l, w in zip(layers, saved_dense):
                    l.set_dense_weight(w)  # the signed values of the kept positions
            model.train(was_training)
