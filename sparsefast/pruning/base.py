"""The protocol every pruning method follows, and the helpers they share.

.. code-block:: python

    pruner = Method(model, sparsity=0.9, pattern="unstructured", distribution="erk", seed=0, ...)
    pruner.prune(batch=None, loss_fn=None)   # masks now (at init / one-shot / one IMP round)
    ...  loss.backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()
    pruner.masks(); pruner.sparsity(); pruner.state_dict(); pruner.load_state_dict(d)

Rules every method keeps:

* It acts on :class:`~sparsefast.SparseLinear` / :class:`~sparsefast.SparseConv2d` layers only. Plain
  ``nn.Linear`` / ``nn.Conv2d`` layers and Hugging Face ``transformers`` ``Conv1D`` layers (GPT-2's
  ``c_attn``/``c_proj``/``c_fc``, weight stored ``(in, out)``: they become ``SparseLinear`` layers of the
  transposed weight that keep Conv1D's layout in their state dict) are first swapped by
  :func:`sparsefast.sparsify` with an all-kept unstructured mask (``sparsity=None``), so the model holds
  sparse layers from construction on (build the optimizer *after* the pruner: the swap creates new
  Parameters). A plain layer whose weight is tied to another module (e.g. GPT-2's ``lm_head`` and its
  token embedding) is left dense with one warning naming it, as :func:`sparsefast.sparsify` does.
* A sparse layer stores only its kept values (``layer.weight`` is 1-D); methods read the masked dense
  weight with ``layer.dense_weight()`` and the dense shape with ``layer.weight_shape``.
* Masks change only through ``layer.set_mask(mask, pattern=..., weight=...)`` (validated and atomic; it
  moves the kept values, their gradient and the optimizer state, newly kept positions starting at zero);
  weights only through ``layer.set_dense_weight`` or in-place ops on the kept values under
  ``torch.no_grad()``. No method knows which backend runs the layers.
* All randomness comes from CPU ``torch.Generator`` objects seeded from ``(seed, purpose, step, layer)``,
  never the global RNG, so the same seed gives the same masks on every backend and after a resume.
* Bad arguments raise ``ValueError`` / ``TypeError`` before any weight or module is touched.

Patterns are types (:class:`sparsefast.masks.Pattern`): this module and the methods ask the pattern
(``density`` / ``implied_sparsity``, ``kept_per_group``, ``unit``, ``group_shape``, ``fits``) instead of
branching on its kind, and a method declares the pattern families it accepts in
:attr:`Pruner.pattern_support` (a type added with :func:`sparsefast.masks.register_pattern` under a new
``kind`` is refused with a ``ValueError`` until a method lists it there).

N:M: with ``pattern="N:M"`` a layer keeps the top-n scores of each m-group (reduction order of
:func:`sparsefast.masks.reduction_view`; the pattern's per-group rule, ``kept_per_group``); ``sparsity``
is then implied (``1 − n/m``, ``implied_sparsity``) and ``distribution`` does not apply. Layers start
as all-kept *unstructured* layers and switch to the N:M pattern when the method first gives them an N:M
mask. Layers whose shape cannot hold the pattern are left alone with one
warning naming them. Methods for which N:M has no meaning refuse it with a ``ValueError`` (see each class).

Block (``pattern="block:B"``, B in 8/16/32, :class:`sparsefast.masks.Block`): the unit kept or dropped is
a b x b tile of the reduction view (:attr:`Pruner.unit`, the pattern's ``group_shape``). Every method's
per-weight scores are summed per tile (:func:`unit_scores`; for |W|, |G|, random and SNIP-like scores
that is the summed |score|) and the allocation runs over tiles exactly as the unstructured one runs over
weights: one global top-k of tiles (``"global"``) or, per layer, ``round(d_l · tiles_l)`` tiles (at least
one) for the densities of the distribution; ``sparsity`` is required and counts tiles. Layers whose shape
does not fit the block (both dims of the reduction view divisible by b) are left alone with one warning,
as for N:M. Flow repair is skipped (unstructured only). Methods for which blocks have no meaning refuse
them with a ``ValueError`` naming the patterns they accept (``pattern_support``).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks as _masks
from ..backends import SparsefastWarning
from ..nn.layers import SparseModule
from ..nn.swap import _tied_weights, sparsify
from . import distributions as _dist
from ._grad import GradCapture

__all__ = ["Pruner", "progress", "mix_seed", "weight_shape", "resolve_pattern", "supported_patterns",
           "unit_scores", "expand_units", "group_top_mask", "group_top", "group_counts"]


def mix_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and ``keys`` (platform independent)."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """Dense weight shape of a sparse layer (``weight_shape``) or a plain ``nn.Linear`` / ``nn.Conv2d`` /
    ``transformers`` ``Conv1D`` (``(out, in)``: the shape of the sparse layer it becomes)."""
    return _dist._weight_shape(layer)


#: the former per-kind capability flags of a method, and the pattern kind each one stands for
_LEGACY_FLAGS = {"supports_unstructured": "unstructured", "supports_nm": "nm", "supports_block": "block"}


def _legacy_entry(flag: str, v: Any) -> bool | str:
    """A ``pattern_support`` entry from a former ``supports_*`` flag (``True`` or the refusal reason)."""
    if v is True:
        return True
    if isinstance(v, str) and v:
        return v
    if flag == "supports_unstructured":
        return "it needs an N:M pattern such as '2:4'"
    return "the method does not support them"


def _legacy_support(supports_nm: bool | str, supports_unstructured: bool = True,
                    supports_block: bool | str = True) -> dict[str, bool | str]:
    vals = {"supports_unstructured": supports_unstructured, "supports_nm": supports_nm,
            "supports_block": supports_block}
    return {kind: _legacy_entry(flag, vals[flag]) for flag, kind in _LEGACY_FLAGS.items()}


def _support_table(support: "Mapping[str, bool | str] | bool | str", supports_unstructured: bool,
                   supports_block: bool | str) -> Mapping[str, bool | str]:
    # a ``pattern_support`` mapping, or the former positional (supports_nm, supports_unstructured, supports_block)
    if isinstance(support, Mapping):
        return support
    return _legacy_support(support, supports_unstructured, supports_block)


def supported_patterns(support: "Mapping[str, bool | str] | bool | str" = True, supports_unstructured: bool = True,
                       supports_block: bool | str = True) -> str:
    """Human-readable list of the patterns a method accepts (for error messages and docs): the
    ``syntax`` of every registered pattern type whose kind ``support`` (a ``pattern_support`` table, or the
    former ``supports_nm`` flag followed by ``supports_unstructured`` / ``supports_block``) maps to True."""
    table = _support_table(support, supports_unstructured, supports_block)
    kinds, out = set(), []
    for cls in _masks.PATTERN_TYPES:
        if cls.kind not in kinds:
            kinds.add(cls.kind)
            if table.get(cls.kind) is True:
                out.append(cls.syntax)
    return ", ".join(out) or "none"


def resolve_pattern(method: str, model: nn.Module, pattern: str | None,
                    support: "Mapping[str, bool | str] | bool | str" = True, supports_unstructured: bool = True,
                    filter_fn: Callable[[str, nn.Module], bool] | None = None, *,
                    supports_block: bool | str = True) -> _masks.Pattern:
    """The pattern a pruner will use (``None``: the pattern the model's sparse layers share, else
    unstructured); raises ``ValueError`` when the method refuses it. ``support``: the method's
    ``pattern_support`` table (``{kind: True | reason}``; a kind it does not list is refused), or the
    former ``supports_nm`` flag with ``supports_unstructured`` / ``supports_block``. Cheap and side-effect
    free, so methods call it before checking their own arguments."""
    if pattern is None:
        pats = set()
        if isinstance(model, nn.Module):
            for n, m in model.named_modules():
                if isinstance(m, SparseModule) and (filter_fn is None or filter_fn(n, m)):
                    pats.add(str(m.pattern))
        pattern = pats.pop() if len(pats) == 1 else "unstructured"
    pat = _masks.parse_pattern(pattern)
    table = _support_table(support, supports_unstructured, supports_block)
    ok = table.get(pat.kind)
    if ok is not True:
        if ok is None:
            why = (f"{method}.pattern_support does not list their kind {pat.kind!r}, and a method refuses the kinds "
                   f"it does not list (a type added with register_pattern until the method opts in to it)")
        else:
            why = ok if isinstance(ok, str) and ok else "the method does not support them"
        raise ValueError(f"{method} does not support {pat.label} patterns ({pattern}): {why}. "
                         f"{method} accepts: {supported_patterns(table)}")
    return pat


def progress(iterable: Iterable, *, total: int | None = None, desc: str | None = None,
             enable: bool = True) -> Iterable:
    """``tqdm`` progress bar around ``iterable`` when tqdm is installed and ``enable`` (tqdm hides itself
    when stderr is not a terminal); the plain iterable otherwise."""
    if not enable:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # optional dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None)


def _check_number(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    x = float(v)
    ok = not math.isnan(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v}")
    return x


def _check_int(name: str, v: Any, lo: int = 0, *, none_ok: bool = False) -> int | None:
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


# ------------------------------------------------------------------------------------------------
# score -> mask helpers (larger score = keep; -inf = never keep unless k forces it)
# ------------------------------------------------------------------------------------------------
def _check_finite_order(score: torch.Tensor, what: str) -> None:
    if torch.isnan(score).any():
        raise ValueError(f"{what}: scores contain NaN; cannot rank them to build a mask")


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the ``k`` largest *raw* scores (ties: lower flat index first)."""
    return _masks.top_k_flat(score.detach().reshape(-1).float(), k).reshape(score.shape)


def _groups(rv: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """``(groups, rows·cols)``: the ``group_shape`` groups of a reduction view, one per row (groups in
    row-major order; an N:M ``(1, m)`` group is ``m`` consecutive entries)."""
    r, c = group_shape
    if r == 1:
        return rv.reshape(-1, c)
    R, K = rv.shape
    return rv.reshape(R // r, r, K // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)


def _ungroup(g: torch.Tensor, group_shape: tuple[int, int], rv_shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_groups`."""
    r, c = group_shape
    if r == 1:
        return g.reshape(rv_shape)
    R, K = rv_shape
    return g.reshape(R // r, K // c, r, c).permute(0, 2, 1, 3).reshape(R, K)


def _group_top_n(score: torch.Tensor, n: int, group_shape: tuple[int, int]) -> torch.Tensor:
    rv = _masks.reduction_view(score.detach().float())
    g = _groups(rv, group_shape)
    idx = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :n]
    out = torch.zeros_like(g, dtype=torch.bool)
    out.scatter_(1, idx, True)
    return _masks.from_reduction_view(_ungroup(out, group_shape, tuple(rv.shape)), score.shape)


def group_top_mask(score: torch.Tensor, pattern: _masks.Pattern) -> torch.Tensor:
    """Bool mask keeping, in every ``pattern.group_shape`` group of the reduction view, the
    ``pattern.kept_per_group`` largest raw scores (the per-group rule; N:M: top-n of each m-group).
    Ties go to the lower index."""
    return _group_top_n(score, int(pattern.kept_per_group), tuple(pattern.group_shape))


def group_top(score: torch.Tensor, need: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """Bool mask choosing, in each ``group_shape`` group of the reduction view, the ``need[g]`` largest raw
    scores (``need``: one count per group, in :func:`group_counts` order)."""
    rv = _masks.reduction_view(score.detach().float())
    g = _groups(rv, group_shape)
    size = g.shape[1]
    order = torch.sort(g, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(size, device=g.device).expand_as(order).contiguous())
    sel = ranks < need.reshape(-1, 1).to(g.device)
    return _masks.from_reduction_view(_ungroup(sel, group_shape, tuple(rv.shape)), score.shape)


def group_counts(mask: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """Kept count of every ``group_shape`` group of the reduction view, flat."""
    return _groups(_masks.reduction_view(mask), group_shape).sum(dim=1)


def nm_top_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest raw scores of each m-group in reduction order."""
    return _group_top_n(score, n, (1, m))


def nm_group_top(score: torch.Tensor, need: torch.Tensor, m: int) -> torch.Tensor:
    """Bool mask choosing, in each m-group (reduction order), the ``need[g]`` largest raw scores."""
    return group_top(score, need, (1, m))


def nm_group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept count of every m-group (reduction order), flat."""
    return group_counts(mask, (1, m))


def unit_scores(score: torch.Tensor, unit: tuple[int, int]) -> torch.Tensor:
    """Score of every ``unit = (rows, cols)`` tile of the reduction view (the unit a pattern such as
    ``block:B`` keeps or drops whole): the sum of the raw per-weight scores in the tile, as a 2-D float32
    ``(R/rows, K/cols)`` tensor (a tile holding a ``-inf`` score scores ``-inf``). ``(1, 1)``: the scores
    themselves, unchanged (natural layout)."""
    if tuple(unit) == (1, 1):
        return score.detach().float()
    r, c = unit
    rv = _masks.reduction_view(score.detach().float())
    R, K = rv.shape
    return rv.reshape(R // r, r, K // c, c).sum((1, 3))


def expand_units(keep: torch.Tensor, unit: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`unit_scores` for masks: a per-tile bool ``keep`` as the weight-shaped mask."""
    if tuple(unit) == (1, 1):
        return keep.reshape(shape)
    r, c = unit
    rv = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return _masks.from_reduction_view(rv, shape)


def _iter_batches(batch: Any, limit: int | None = None) -> Iterator[tuple]:
    """A single ``(x, y)`` / ``(x,)`` / tensor batch, or an iterable of them (e.g. a DataLoader)."""
    if isinstance(batch, torch.Tensor):
        yield (batch,)
        return
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        yield tuple(batch)
        return
    n = 0
    for b in batch:
        if isinstance(b, torch.Tensor):
            b = (b,)
        yield tuple(b)
        n += 1
        if limit is not None and n >= limit:
            return


def _check_batch(method: str, batch: Any) -> None:
    if batch is None:
        raise ValueError(f"{method}.prune() needs data: pass batch=(x, y) (or an iterable of batches) and "
                         "optionally loss_fn (default: cross-entropy)")
    if isinstance(batch, (str, bytes)) or not (isinstance(batch, torch.Tensor) or hasattr(batch, "__iter__")):
        raise TypeError(f"{method}.prune(): batch must be an (x, y) tuple of tensors or an iterable of such "
                        f"batches, got {type(batch).__name__}")
    if isinstance(batch, (tuple, list)) and len(batch) == 0:
        raise ValueError(f"{method}.prune(): batch is empty")


def batch_loss(model: nn.Module, b: tuple, loss_fn: Callable | None, *, transform: Callable | None = None) -> torch.Tensor:
    """``loss_fn(model(x), y)`` for a batch ``(x, y)``; ``loss_fn(model(x))`` for ``(x,)``. Default loss:
    cross-entropy (needs ``y``). ``transform`` is applied to the output first (GraSP's temperature)."""
    x = b[0]
    y = b[1] if len(b) > 1 else None
    out = model(x)
    if transform is not None:
        out = transform(out)
    if loss_fn is None:
        if y is None:
            raise ValueError("a batch without targets needs an explicit loss_fn(output)")
        return F.cross_entropy(out, y)
    return loss_fn(out, y) if y is not None else loss_fn(out)


# ------------------------------------------------------------------------------------------------
class Pruner:
    """Base class of every pruning method (the shared protocol; see the module docstring).

    Args (shared by all methods):
        model: the model (modified in place: plain Linear/Conv2d/Conv1D layers become sparse layers).
        sparsity: target fraction of pruned weights over the managed layers, in ``[0, 1)``. Optional with
            an N:M pattern (implied ``1 − n/m``).
        pattern: ``"unstructured"``, ``"N:M"`` or ``"block:B"``. ``None``: the pattern the model's sparse
            layers already share, else unstructured.
        distribution: layer-wise sparsity rule (:mod:`sparsefast.pruning.distributions`); ``None`` = the
            method's default (the one its paper uses).
        seed: seed of every random choice.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the layers to prune (default: all
            Linear/Conv2d, transformers Conv1D and sparse layers).
        backend: backend of the sparse layers created from plain ones (``"auto"``).
        flow_repair: after an at-init mask, give cut-off neurons one random edge (unstructured only; skipped
            for N:M and block patterns).
        progress: show tqdm progress bars on long loops (if tqdm is installed).
    """

    #: The pattern families (:attr:`sparsefast.masks.Pattern.kind`) the method accepts: ``{kind: True}``,
    #: or ``{kind: "why it is refused"}``. A kind not listed (a type added with
    #: :func:`~sparsefast.masks.register_pattern`) is refused until the method opts in, e.g. in a
    #: subclass: ``pattern_support = {**Magnitude.pattern_support, "row": True}``. The method's code asks
    #: the pattern for everything pattern-specific, so opting in needs no other change.
    pattern_support: dict[str, bool | str] = {"unstructured": True, "nm": True, "block": True}
    #: Shorthands of ``pattern_support["nm"]`` / ``["unstructured"]`` / ``["block"]``: ``True``, or the
    #: reason (``supports_unstructured``: ``False``) — a subclass setting one sets that entry (the
    #: attributes are kept in step with the table).
    supports_nm: bool | str = True
    supports_unstructured: bool = True
    supports_block: bool | str = True
    default_distribution: str = "global"
    #: unstructured needs ``sparsity=``; False for methods with their own stopping rule (LOBSTER)
    requires_sparsity: bool = True

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        table = dict(cls.pattern_support)  # the class's own table, or its parent's
        for flag, kind in _LEGACY_FLAGS.items():
            if flag in cls.__dict__:
                table[kind] = _legacy_entry(flag, cls.__dict__[flag])
        cls.pattern_support = table
        cls._sync_flags(cls, table)

    @staticmethod
    def _sync_flags(obj: Any, table: Mapping[str, bool | str]) -> None:
        for flag, kind in _LEGACY_FLAGS.items():
            v = table.get(kind, f"{kind} patterns are not in pattern_support")
            setattr(obj, flag, v is True if flag == "supports_unstructured" else v)

    def _pattern_table(self) -> dict[str, bool | str]:
        """This method's ``pattern_support``, with any ``supports_*`` flag set on the instance applied."""
        table = dict(self.pattern_support)
        for flag, kind in _LEGACY_FLAGS.items():
            if flag in self.__dict__:
                table[kind] = _legacy_entry(flag, self.__dict__[flag])
        return table

    def __init__(self, model: nn.Module, *, sparsity: float | None = None, pattern: str | None = None,
                 distribution: str | None = None, seed: int = 0,
                 filter_fn: Callable[[str, nn.Module], bool] | None = None, backend: str = "auto",
                 flow_repair: bool = False, progress: bool = True) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} expects an nn.Module as its first argument, got {type(model).__name__}")
        if _dist._is_prunable(model) and not isinstance(model, SparseModule):
            raise ValueError(f"{name}: the model is itself a plain {type(model).__name__}, which cannot be "
                             "swapped in place; wrap it (e.g. nn.Sequential(layer)) or pass a SparseLinear/SparseConv2d")
        self.seed = _check_int("seed", seed, 0)
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"filter_fn must be callable(name, module) -> bool, got {type(filter_fn).__name__}")
        from .. import backends as _bk
        _bk.check_requested(backend)

        cands = [(n, m) for n, m in model.named_modules()
                 if _dist._is_prunable(m) and (filter_fn is None or filter_fn(n, m))]
        if not cands:
            raise ValueError(f"{name}: {type(model).__name__} has no prunable layers (nn.Linear / nn.Conv2d / "
                             "transformers Conv1D / SparseLinear / SparseConv2d"
                             + (" accepted by filter_fn" if filter_fn else "") + ")")
        # plain layers whose weight is tied to another module stay dense (sparsify leaves them: tied="skip")
        tied = _tied_weights(model, [m for _, m in cands if not isinstance(m, SparseModule)])
        if tied:
            desc = ", ".join(f"{n or '<root>'!r} (weight shared with {tied[id(m)]})" for n, m in cands if id(m) in tied)
            cands = [(n, m) for n, m in cands if id(m) not in tied]
            if not cands:
                raise ValueError(f"{name}: every prunable layer of {type(model).__name__} has a weight tied to another "
                                 f"module: {desc}")
            warnings.warn(f"{name}: leaving layers with tied weights dense: {desc} (untie them first, e.g. "
                          "sparsefast.sparsify(model, tied='untie'), to prune them)", SparsefastWarning, stacklevel=3)

        # pattern
        cand_ids = {id(m) for _, m in cands}
        pat = resolve_pattern(name, model, pattern, self._pattern_table(), filter_fn=lambda n, m: id(m) in cand_ids)
        self.pattern = pat

        # sparsity
        implied = pat.implied_sparsity  # the pattern fixes the density itself (N:M: 1 - n/m)
        if implied is not None:
            if sparsity is not None:
                s = _check_number("sparsity", sparsity, 0.0, 1.0, hi_open=True)
                if abs(s - implied) > 1e-9:
                    raise ValueError(f"{name}: pattern {pat} implies sparsity {implied:g}, got sparsity={sparsity}")
            self.target_sparsity: float | None = implied
        else:
            if sparsity is None:
                if self.requires_sparsity:
                    raise ValueError(f"{name} with pattern {pat} needs sparsity= (a fraction in [0, 1))")
                self.target_sparsity = None
            else:
                self.target_sparsity = _check_number("sparsity", sparsity, 0.0, 1.0, hi_open=True)

        # distribution
        if distribution is None:
            distribution = self.default_distribution
        self.distribution = _dist.check_distribution(distribution)

        # structured patterns (N:M, block): layers that cannot hold the pattern are left alone (one warning each)
        if pat.group_shape != (1, 1):
            keep = []
            for n, m in cands:
                ws = weight_shape(m)
                why = pat.fits(ws) if len(ws) in (2, 4) else f"weight {ws} is neither 2-D nor 4-D"
                if why is None:
                    keep.append((n, m))
                else:
                    warnings.warn(f"{name}: leaving layer {n or '<root>'!r} (weight {ws}) unpruned: its shape "
                                  f"does not fit pattern {pat}: {why}", SparsefastWarning, stacklevel=3)
            if not keep:
                raise ValueError(f"{name}: no layer of the model fits pattern {pat}")
            cands = keep
        self._check_hparams()

        # --- from here on the model is modified --------------------------------------------------
        plain = {n for n, m in cands if not isinstance(m, SparseModule)}
        if plain:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SparsefastWarning)
                sparsify(model, sparsity=None, pattern="unstructured", backend=backend,
                         filter_fn=lambda n, m: n in plain)
        mods = dict(model.named_modules())
        self.model = model
        self._layers: list[tuple[str, SparseModule]] = [(n, mods[n]) for n, _ in cands]
        self._names = [n for n, _ in self._layers]
        self._infos = [_dist.LayerInfo(n, l.weight_shape, "linear" if len(l.weight_shape) == 2 else "conv")
                       for n, l in self._layers]
        self.flow_repair = bool(flow_repair)
        self.progress = bool(progress)
        self._step = 0
        self._pruned = False
        self._capture = GradCapture(self._layers)

    # ---- hooks for subclasses ------------------------------------------------------------------
    def _check_hparams(self) -> None:
        """Validate method-specific arguments (called before the model is touched)."""

    def _wants_dense_grad(self, t: int) -> bool:
        """Whether the update run by ``step()`` when the counter reaches ``t`` needs the dense gradient of
        that training step (the capture is armed just before it)."""
        return False

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, d: dict) -> None:
        pass

    # ---- protocol ------------------------------------------------------------------------------
    def prune(self, batch: Any = None, loss_fn: Callable | None = None) -> None:
        """Compute masks now. Subclasses implement :meth:`_prune`."""
        self._prune(batch, loss_fn)
        self._pruned = True
        self._rearm()

    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """Call once after every ``optimizer.step()``; scheduled methods update masks here."""
        self._step += 1
        self._on_step(self._step)
        self._rearm()

    def _on_step(self, t: int) -> None:
        pass

    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool mask}`` (copies) of every managed layer."""
        return {n: l.mask.detach().clone() for n, l in self._layers}

    def sparsity(self) -> float:
        """Fraction of pruned weights over the managed layers."""
        tot = sum(l.mask.numel() for _, l in self._layers)
        kept = sum(int(l.mask.count_nonzero()) for _, l in self._layers)
        return 1.0 - kept / max(tot, 1)

    @property
    def layers(self) -> list[tuple[str, SparseModule]]:
        """``(name, sparse layer)`` of every managed layer, in module order."""
        return list(self._layers)

    @property
    def step_count(self) -> int:
        return self._step

    def state_dict(self) -> dict:
        """Everything needed to resume: step counter, masks and layer patterns, method state."""
        return {"method": type(self).__name__, "step": self._step, "pruned": self._pruned, "seed": self.seed,
                "masks": {n: l.mask.detach().clone() for n, l in self._layers},
                "patterns": {n: l.pattern for n, l in self._layers}, **self._extra_state()}

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict` (masks are set through ``set_mask``). Every layer's mask and
        pattern is validated first: on error nothing (no layer, no counter) is changed."""
        if not isinstance(d, dict) or "step" not in d:
            raise TypeError("load_state_dict expects a dict produced by state_dict()")
        if d.get("method") != type(self).__name__:
            raise ValueError(f"state dict is for {d.get('method')!r}, not {type(self).__name__}")
        masks, patterns = d.get("masks"), d.get("patterns")
        if not isinstance(masks, dict) or not isinstance(patterns, dict):
            raise TypeError("load_state_dict: the state dict lacks its 'masks' / 'patterns' dicts")
        missing = set(self._names) - set(masks)
        if missing:
            raise ValueError(f"state dict lacks masks for layer(s) {sorted(missing)}")
        missing = set(self._names) - set(patterns)
        if missing:
            raise ValueError(f"state dict lacks patterns for layer(s) {sorted(missing)}")
        staged = []
        for n, l in self._layers:  # validate everything before the first change
            where = f"{type(self).__name__}.load_state_dict, layer {n!r}"
            try:
                pat = _masks.parse_pattern(patterns[n])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            m = masks[n]
            if isinstance(m, torch.Tensor):
                m = m.to(l.mask.device)
            m = _masks.validate_mask(m, l.mask, pat, where=where)  # (pat.fits: the weight shape first)
            staged.append((l, m, pat))
        step, pruned, seed = int(d["step"]), bool(d["pruned"]), int(d["seed"])
        for l, m, pat in staged:
            self._set_layer_mask(l, m, pat)
        self._step = step
        self._pruned = pruned
        self.seed = seed
        self._load_extra_state(d)
        self._capture.clear()
        self._rearm()

    def __repr__(self) -> str:
        if "_layers" not in self.__dict__ or "_step" not in self.__dict__:  # construction failed part-way
            return f"{type(self).__name__}(<not constructed>)"
        return (f"{type(self).__name__}(layers={len(self._layers)}, pattern={self.pattern}, "
                f"target_sparsity={self.target_sparsity}, distribution={self.distribution}, step={self._step}, "
                f"sparsity={self.sparsity():.4f})")

    # ---- helpers -------------------------------------------------------------------------------
    def _gen(self, *keys: Any) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, type(self).__name__, *keys))

    def _rand(self, shape, *keys: Any, device=None) -> torch.Tensor:
        """Uniform [0, 1) float32 from a seeded CPU generator, moved to ``device``."""
        return torch.rand(tuple(shape), generator=self._gen(*keys)).to(device)

    def _rearm(self) -> None:
        if self._pruned and self._wants_dense_grad(self._step + 1):
            self._capture.arm()
        else:
            self._capture.disarm()

    def _require_pruned(self) -> None:
        if not self._pruned:
            raise RuntimeError(f"{type(self).__name__}: call prune() once (it sets the initial sparse masks) "
                               "before step()")

    @staticmethod
    def _set_layer_mask(layer: SparseModule, mask: torch.Tensor, pattern: _masks.Pattern,
                        weight: torch.Tensor | None = None, reset: torch.Tensor | None = None) -> None:
        """``layer.set_mask(mask)``, switching the layer's pattern with it when it differs (an all-kept
        unstructured layer becoming N:M). ``weight``: dense values for every kept position; ``reset``:
        positions restarting at zero value and state."""
        pat = None if layer.pattern == str(pattern) else str(pattern)
        layer.set_mask(mask, pat, weight=weight, reset=reset)

    def _apply(self, new: dict[str, torch.Tensor], *,
               weights: dict[str, torch.Tensor] | None = None,
               reset: dict[str, torch.Tensor] | None = None) -> None:
        """Set every layer's mask (target pattern). Newly kept positions start at 0 (value and optimizer
        state) unless ``weights`` gives a layer's dense weight: then every kept position takes its value
        from it."""
        for n, l in self._layers:
            if n not in new:
                continue
            m = new[n].to(l.mask.device)
            w = None if weights is None else weights.get(n)
            if w is not None:
                w = w.to(l.mask.device)
            r = None if reset is None or n not in reset else reset[n].to(l.mask.device)
            self._set_layer_mask(l, m, self.pattern, w, r)

    def _densities(self, sparsity: float, scores: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        return _dist.compute_densities(self._infos, sparsity, self.distribution, scores)

    @property
    def unit(self) -> tuple[int, int]:
        """``(rows, cols)`` of the tile of the reduction view the pattern keeps or drops whole, in which
        masks are allocated and drop / grow counts are counted: ``(b, b)`` for ``block:B``, ``(1, 1)`` for
        unstructured and for N:M (whose m-groups are not kept whole: they follow their n-per-group rule);
        the pattern's :attr:`~sparsefast.masks.Pattern.unit`."""
        return tuple(self.pattern.unit)

    def _allocate(self, scores: dict[str, torch.Tensor], sparsity: float | None = None, *,
                  distribution: str | None = None, densities: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Masks keeping the largest raw ``scores`` (``-inf``: never kept unless the budget forces it).

        Per-group patterns (``kept_per_group``; N:M): the top ``kept_per_group`` scores of every group,
        per layer (``sparsity`` / ``densities`` do not apply). Unstructured: one global top-k
        (``"global"``) or the per-layer densities of the distribution (each layer keeps at least one weight). Block (any
        pattern whose :attr:`unit` is a tile): the same over tiles, each scored by the sum of its
        weights' scores (:func:`unit_scores`); a layer of density ``d`` keeps ``round(d · tiles)`` tiles,
        at least one."""
        for n, s in scores.items():
            _check_finite_order(s, f"{type(self).__name__} layer {n!r}")
        if self.pattern.kept_per_group is not None:
            return {n: group_top_mask(scores[n], self.pattern) for n in self._names}
        unit = self.unit
        us = {n: unit_scores(scores[n], unit) for n in self._names}
        sp = self.target_sparsity if sparsity is None else sparsity
        dist = distribution or self.distribution
        if densities is None and dist == "global":
            sizes = [us[n].numel() for n in self._names]
            keep = int(round((1.0 - sp) * sum(sizes)))
            flat = torch.cat([us[n].reshape(-1).cpu() for n in self._names])
            kept = _dist.global_top_k(flat, sizes, keep)
            out, off = {}, 0
            for (n, l), k in zip(self._layers, sizes):
                out[n] = expand_units(kept[off:off + k].reshape(us[n].shape), unit, l.weight_shape).to(l.mask.device)
                off += k
            return out
        if densities is None:
            densities = _dist.compute_densities(self._infos, sp, dist)
        out = {}
        for n, l in self._layers:
            k = max(1, int(round(densities[n] * us[n].numel())))
            out[n] = expand_units(top_k_mask(us[n], k), unit, l.weight_shape).to(l.mask.device)
        return out

    def _maybe_flow_repair(self, new: dict[str, torch.Tensor], *keys: Any) -> dict[str, torch.Tensor]:
        # unstructured only: a single repaired edge would break an N:M group or a block
        if self.flow_repair and self.pattern.group_shape == (1, 1):
            return _dist.flow_repair({n: new[n] for n in self._names}, self._gen("flow_repair", *keys))
        return new

    def _grads_or_warn(self, what: str) -> dict[str, torch.Tensor] | None:
        g = self._capture.pop()
        missing = [n for n in self._names if n not in g]
        if missing:
            warnings.warn(f"{type(self).__name__}: no dense gradient was recorded for layer(s) {missing} on step "
                          f"{self._step} ({what} skipped). Call pruner.step() after loss.backward() and "
                          "optimizer.step(), with the forward pass under autograd.", SparsefastWarning, stacklevel=3)
            return None
        return g

    def _masked_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores with currently pruned positions at -inf (pruned weights never return)."""
        out = {}
        for n, l in self._layers:
            s = scores[n].float()
            out[n] = torch.where(l.mask, s, torch.full_like(s, -math.inf))
        return out
