"""Layer-wise density rules (``distribution=``) and flow repair.

Notation: layer ``l`` has ``n_l`` weights, ``D = 1 - sparsity`` is the global density, ``N = Σ n_l``.
Every rule returns per-layer densities ``d_l ∈ (0, 1]`` with ``Σ d_l n_l = D N`` (up to rounding each
layer to a whole number of weights; a layer always keeps at least one weight):

``"global"``    one threshold over all layers' scores. Without scores (``layer_densities``) the scores are
                the current ``|W|``, i.e. the densities a global magnitude threshold gives now.
``"uniform"``   ``d_l = D``.
``"uniform+"``  (Gale et al. 2019) the first layer stays dense if it is a convolution; when ``D < 0.2`` the
                last Linear gets ``0.2``; the other layers share the remaining budget uniformly.
``"er"``        (Mocanu et al. 2018) ``d_l = ε (n_in + n_out) / (n_in n_out)`` (conv: channel dims only).
``"erk"``       (Evci et al. 2020) ``d_l = ε (c_out + c_in + k_h + k_w) / (c_out c_in k_h k_w)`` (Linear: as ER).
                ``ε`` solves the budget; a layer with ``ε·raw_l > 1`` is made dense and ``ε`` re-solved.
``"erk+"``      ERK with the last Linear dense, budget kept.
``"balanced"``  (Gadhikar et al. 2023) every layer the same number of nonzeros ``x = D N / L``,
                ``d_l = min(1, x / n_l)``. Where a layer saturates (``x ≥ n_l``) the paper's rule would fall
                short of the budget; here ``x`` is raised (water-filling) so the budget is kept and all
                non-saturated layers still hold exactly the same number of nonzeros.
``"pyramidal"`` (Gadhikar et al. 2023) ``d_l = p₁^l`` (``l = 1..L`` in module order), ``p₁ ∈ (0, 1)`` the root of
                ``Σ p₁^l n_l = D N`` (monotone in ``p₁``; solved by bisection in float64).

Conv sizes use the weight shape ``(c_out, c_in/groups, k_h, k_w)``; a ``transformers`` ``Conv1D`` (GPT-2) counts
as a Linear of shape ``(out, in)`` (its stored ``(in, out)`` weight transposed). Biases and normalisation layers are
never pruned (they are not in the layer list).

References (``tests/pruning/test_fidelity_b.py``): ``"erk"``, ``"er"`` and ``"uniform"`` give
VITA-Group/Random_Pruning's densities (``CIFAR/sparselearning/core.py:81-262``) to float precision
(making every over-full layer dense at once ends where their one-layer-at-a-time loop ends: ε only grows
as layers become dense); google-research/rigl ``sparse_utils.py:90-256`` solves ε for the integer
budgets ``Σ (n_l − floor(s · n_l))`` and keeps ``n − floor(s_l · n)`` per layer, a few weights more than
``round(d_l · n)`` here. Their masks are Bernoulli draws (Random_Pruning) or exact counts (rigl); here
exact counts.

:func:`flow_repair` (Gadhikar et al. 2023, appendix A.1): every neuron left with no incoming edge, and
every hidden neuron left with no outgoing edge, gets one random edge (seeded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["DISTRIBUTIONS", "LayerInfo", "layer_densities", "compute_densities", "check_distribution",
           "flow_repair", "layer_infos", "global_top_k"]

DISTRIBUTIONS = ("global", "uniform", "uniform+", "er", "erk", "erk+", "balanced", "pyramidal")


@dataclass(frozen=True)
class LayerInfo:
    """Name, weight shape and kind (``"linear"`` or ``"conv"``) of one prunable layer."""

    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


def check_distribution(distribution: str) -> str:
    """Validate a distribution name (case-insensitive); return it lower-cased."""
    if not isinstance(distribution, str):
        raise TypeError(f"distribution must be a string, one of {', '.join(DISTRIBUTIONS)}; "
                        f"got {type(distribution).__name__}")
    d = distribution.strip().lower()
    if d not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    return d


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if math.isnan(s) or not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


def _is_prunable(m: nn.Module) -> bool:
    """A layer the pruners manage: a sparse layer, an exact ``nn.Linear`` / ``nn.Conv2d``, or a Hugging Face
    ``transformers`` ``Conv1D`` (GPT-2; recognised by :func:`sparsefast.nn.layers._is_conv1d`)."""
    from ..nn.layers import SparseModule, _is_conv1d
    return isinstance(m, SparseModule) or type(m) in (nn.Linear, nn.Conv2d) or _is_conv1d(m)


def _dense_weight(m: nn.Module) -> torch.Tensor:
    """A prunable layer's dense weight, detached, in the sparse layers' orientation: a sparse layer's masked
    dense weight, ``(out, in)`` for a Linear (a ``Conv1D``'s ``(in, out)`` weight transposed)."""
    from ..nn.layers import _is_conv1d
    dense = getattr(m, "dense_weight", None)
    if callable(dense):
        return dense()
    return m.weight.detach().t() if _is_conv1d(m) else m.weight.detach()


def _weight_shape(m: nn.Module) -> tuple[int, ...]:
    """A prunable layer's dense weight shape as its sparse layer has it (``Conv1D``: ``(out, in)``)."""
    from ..nn.layers import _is_conv1d
    ws = getattr(m, "weight_shape", None)
    if ws is not None:
        return tuple(ws)
    shape = tuple(m.weight.shape)
    return shape[::-1] if _is_conv1d(m) else shape


def layer_infos(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[LayerInfo]:
    """Prunable layers (``nn.Linear``, ``nn.Conv2d``, ``transformers`` ``Conv1D``, sparse layers) of ``model``
    in module order (a ``Conv1D``'s shape as ``(out, in)``, the sparse layer it becomes)."""
    out = []
    for name, m in model.named_modules():
        if _is_prunable(m) and (filter_fn is None or filter_fn(name, m)):
            shape = _weight_shape(m)
            out.append(LayerInfo(name, shape, "linear" if len(shape) == 2 else "conv"))
    return out


def _er_raw(info: LayerInfo, kernel: bool) -> float:
    s = info.shape
    if len(s) == 2:
        n_out, n_in = s
        return (n_in + n_out) / (n_in * n_out)
    c_out, c_in, kh, kw = s
    if kernel:
        return (c_out + c_in + kh + kw) / (c_out * c_in * kh * kw)
    return (c_in + c_out) / (c_in * c_out)


def _solve_eps(infos: list[LayerInfo], D: float, raw: list[float], dense: set[int]) -> list[float]:
    """ERK-style: d_l = ε raw_l for free layers, 1 for ``dense``; layers hitting 1 join ``dense``."""
    N = sum(i.numel for i in infos)
    dense = set(dense)
    while True:
        budget = D * N - sum(infos[j].numel for j in dense)
        free = [j for j in range(len(infos)) if j not in dense]
        if budget < -1e-9 * N or (budget <= 0 and free):
            names = ", ".join(infos[j].name or "<root>" for j in sorted(dense))
            raise ValueError(f"density {D:g} cannot be met with layer(s) {names} kept dense")
        if not free:
            return [1.0] * len(infos)
        denom = sum(raw[j] * infos[j].numel for j in free)
        eps = budget / denom
        over = [j for j in free if eps * raw[j] > 1.0]
        if not over:
            return [1.0 if j in dense else max(eps * raw[j], 0.0) for j in range(len(infos))]
        dense.update(over)


def _last_linear(infos: list[LayerInfo]) -> int:
    for j in range(len(infos) - 1, -1, -1):
        if infos[j].kind == "linear":
            return j
    return len(infos) - 1


def compute_densities(infos: list[LayerInfo], sparsity: float, distribution: str,
                      scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per-layer densities for layers ``infos`` (see module docstring). ``scores`` (layer name -> tensor,
    larger = keep) are needed for ``"global"`` only."""
    s = _check_sparsity(sparsity)
    dist = check_distribution(distribution)
    if not infos:
        raise ValueError("no prunable layers (nn.Linear / nn.Conv2d / sparse layers) to distribute sparsity over")
    D = 1.0 - s
    L = len(infos)
    N = sum(i.numel for i in infos)
    if D >= 1.0:
        return {i.name: 1.0 for i in infos}

    if dist == "uniform":
        d = [D] * L
    elif dist == "uniform+":
        fixed: dict[int, float] = {}
        if infos[0].kind == "conv":
            fixed[0] = 1.0
        if D < 0.2:
            j = _last_linear(infos)
            if j not in fixed:
                fixed[j] = 0.2
        rest = [j for j in range(L) if j not in fixed]
        budget = D * N - sum(fixed[j] * infos[j].numel for j in fixed)
        nrest = sum(infos[j].numel for j in rest)
        if not rest:
            d = [fixed[j] for j in range(L)]
        else:
            if budget <= 0:
                raise ValueError(f"uniform+: density {D:g} cannot be met once the first conv is dense and the "
                                 f"last Linear keeps 0.2")
            dr = min(1.0, budget / nrest)
            d = [fixed.get(j, dr) for j in range(L)]
    elif dist in ("er", "erk", "erk+"):
        raw = [_er_raw(i, kernel=(dist != "er")) for i in infos]
        dense = {_last_linear(infos)} if dist == "erk+" else set()
        d = _solve_eps(infos, D, raw, dense)
    elif dist == "balanced":
        sizes = sorted(i.numel for i in infos)
        target = D * N
        # water-filling: the smallest layers saturate first
        acc, x = 0.0, target / L
        for k, n in enumerate(sizes):
            x = (target - acc) / (L - k)
            if x <= n:
                break
            acc += n
        d = [min(1.0, x / i.numel) for i in infos]
    elif dist == "pyramidal":
        def f(p: float) -> float:
            return sum((p ** (l + 1)) * infos[l].numel for l in range(L)) - D * N
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if f(mid) < 0:
                lo = mid
            else:
                hi = mid
        p1 = 0.5 * (lo + hi)
        d = [p1 ** (l + 1) for l in range(L)]
    elif dist == "global":
        if scores is None:
            raise ValueError("the 'global' distribution needs scores (e.g. |W|) to place its single threshold")
        keep = int(round(D * N))
        flat = torch.cat([scores[i.name].detach().reshape(-1).float().cpu() for i in infos])
        kept = global_top_k(flat, [i.numel for i in infos], keep)
        d, off = [], 0
        for i in infos:
            d.append(float(kept[off:off + i.numel].sum()) / i.numel)
            off += i.numel
    else:  # pragma: no cover - check_distribution guards
        raise AssertionError(dist)
    return {i.name: float(min(1.0, max(0.0, v))) for i, v in zip(infos, d)}


def global_top_k(flat: torch.Tensor, sizes: list[int], keep: int) -> torch.Tensor:
    """One global top-``keep`` over the concatenated layer scores ``flat`` (layer ``l`` owns the next
    ``sizes[l]`` entries; ties: lower index first) in which every layer keeps at least one entry (its
    best): the budget is ``max(keep, number of layers)``. Identical to the plain top-k whenever that
    leaves no layer empty."""
    flat = flat.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    forced = torch.zeros_like(out)
    off = 0
    for k in sizes:
        if k > 0:
            forced[off + int(torch.argmin(rank[off:off + k]))] = True
        off += k
    out |= forced
    rest = max(0, int(keep) - int(forced.sum()))
    if rest:
        out[order[~forced[order]][:rest]] = True
    return out


def layer_densities(model: nn.Module, sparsity: float, distribution: str = "erk", *,
                    filter_fn: Callable[[str, nn.Module], bool] | None = None) -> dict[str, float]:
    """Per-layer densities ``{layer name: d_l}`` for the prunable layers of ``model`` (``nn.Linear``,
    ``nn.Conv2d``, ``transformers`` ``Conv1D`` and sparse layers, those ``filter_fn(name, module)`` accepts), reaching global
    ``sparsity`` under ``distribution`` (see the module docstring). ``"global"`` uses the current ``|W|``.

    Raises ``ValueError`` for a sparsity outside ``[0, 1)``, an unknown distribution, or a model with no
    prunable layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_densities expects an nn.Module, got {type(model).__name__}")
    _check_sparsity(sparsity)
    check_distribution(distribution)
    infos = layer_infos(model, filter_fn)
    if not infos:
        raise ValueError(f"{type(model).__name__} has no prunable layers (nn.Linear / nn.Conv2d / sparse layers)")
    scores = None
    if distribution.strip().lower() == "global":
        mods = dict(model.named_modules())
        scores = {}
        for i in infos:
            scores[i.name] = _dense_weight(mods[i.name]).abs()
    return compute_densities(infos, sparsity, distribution, scores)


def flow_repair(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Return masks where no neuron is cut off: in every layer (ordered as ``masks``) each output neuron
    (row / output channel) without a kept weight gets one random incoming edge, and in every layer but
    the first each input neuron (column / input channel) without a kept weight gets one random outgoing
    edge. Random choices come from ``generator`` (CPU). Masks are weight-shaped bool tensors."""
    out = {}
    for idx, (name, m) in enumerate(masks.items()):
        m = m.clone()
        dev = m.device
        o, c = m.shape[0], m.shape[1]
        k = int(math.prod(m.shape[2:])) if m.dim() > 2 else 1
        v = m.reshape(o, c, k)
        rows = (~v.reshape(o, -1).any(dim=1)).nonzero().flatten().tolist()
        for r in rows:
            pos = int(torch.randint(c * k, (1,), generator=generator))
            v[r, pos // k, pos % k] = True
        if idx > 0:
            cols = (~v.any(dim=2).any(dim=0)).nonzero().flatten().tolist()
            for cc in cols:
                pos = int(torch.randint(o * k, (1,), generator=generator))
                v[pos // k, cc, pos % k] = True
        out[name] = v.reshape(m.shape).to(dev)
    return out
