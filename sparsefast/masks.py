"""Sparsity patterns and mask construction / validation.

A *pattern* is ``"unstructured"``, ``"N:M"`` (N kept out of every M consecutive weights along the
reduction dimension), ``"block:B"`` or a type added with :func:`register_pattern`; each is a
:class:`Pattern` subclass that answers everything pattern-specific (see its docstring).

Reduction layout (the one every kernel backend uses):

* ``Linear`` weight ``(out, in)``: groups of M consecutive entries along ``in`` (the last dim).
* ``Conv2d`` weight ``(out, in/groups, kh, kw)``: the reduction index is ``(kh, kw, c)`` with the input
  channel fastest, i.e. the channels-last (NHWC) implicit-GEMM order. N:M groups are M consecutive
  *input channels* at a fixed kernel position, so ``in_channels/groups`` must be divisible by M.
  :func:`reduction_view` returns the ``(out, kh*kw*in/groups)`` view in that order.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

__all__ = [
    "Pattern", "Unstructured", "NM", "Block", "BLOCK_SIZES", "register_pattern", "block_mask", "parse_pattern", "nm_mask", "topk_mask", "transposable_nm_mask", "is_nm",
    "is_transposable_nm", "density", "reduction_view", "from_reduction_view", "validate_mask",
    "magnitude_mask", "check_sparsity",
]


class Pattern:
    """A parsed sparsity pattern: a *type* (:class:`Unstructured`, :class:`NM`, :class:`Block`, or one added
    with :func:`register_pattern`) that owns everything pattern-specific — parsing, implied density,
    whether it fits a weight shape, the top-score mask, mask validation and its group geometry — so code
    elsewhere asks the pattern instead of branching on its kind. Backends declare the pattern types they
    run (``Backend.patterns``).

    Every method works on the weight's *reduction view* ``(rows, K)`` (:func:`reduction_view`).
    ``n``/``m`` are ``None`` except for N:M (kept for code that reads them).

    What a pattern type answers (override these to add a type; the defaults suit a pattern whose
    units are allocated freely, like unstructured):

    * :attr:`kind` — the family's name. Backends (``Backend.patterns``) and pruning methods
      (``Pruner.pattern_support``) accept or refuse a pattern by it, so a new type with a new ``kind`` is
      refused everywhere until a backend or method opts in; :attr:`label` / :attr:`syntax` name it in
      error messages.
    * :attr:`density` / :attr:`implied_sparsity` — the density the pattern fixes by itself (N:M: ``n/m``),
      ``None`` where a sparsity must be given. A pattern that fixes its density needs no sparsity schedule
      (one round reaches it) and cannot hold an all-kept mask.
    * :attr:`group_shape` — ``(rows, cols)`` of the group the pattern constrains (N:M ``(1, m)``, block
      ``(b, b)``, unstructured ``(1, 1)``).
    * :attr:`kept_per_group` — the *per-group rule*: how many weights each group keeps (N:M: ``n``), or
      ``None`` where kept units are *allocated* across a layer or the model (global top-k or per-layer
      densities). Methods keep the top-``kept_per_group`` scores of every group, refill a group to it
      after drops, and rank all positions again (not only the kept ones) for a per-group pattern.
    * :attr:`unit` — ``(rows, cols)`` of the tile kept or dropped whole, in which allocations and drop /
      grow counts are counted: ``group_shape`` for an allocated pattern (block ``(b, b)``), a single
      weight for a per-group one.
    * :meth:`kept_count` / :meth:`index_bytes` — the kept values of a weight and the bytes of the index
      structure its packed format stores besides them (roofline bounds).
    * :meth:`parse`, :meth:`examples`, :meth:`fits`, :meth:`top_mask`, :meth:`mask_error` — parsing,
      backend conformance cases, shape checks, the top-score mask and mask validation.
    """

    #: the pattern family's name, e.g. "unstructured", "nm", "block" (what backends and methods accept)
    kind: ClassVar[str] = "?"
    #: the family as error messages name it ("N:M", "block"): "... does not support N:M patterns"
    label: ClassVar[str] = "?"
    #: how the family's strings are written, for lists of accepted patterns ("'N:M'")
    syntax: ClassVar[str] = "?"

    def __new__(cls, *args, **kwargs):
        # ``Pattern()`` / ``Pattern(n, m)`` (the former constructor) still give unstructured / N:M
        if cls is Pattern:
            return Unstructured() if not args and not kwargs else NM(*args, **kwargs)
        return super().__new__(cls)
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        """Whether this is the built-in N:M type (for kernels written for N:M formats). Code that only
        needs a pattern's behaviour asks :attr:`density`, :attr:`kept_per_group`, :attr:`unit` instead."""
        return False

    @property
    def density(self) -> float | None:
        """Density implied by the pattern (``n/m`` for N:M), ``None`` where a sparsity must be given."""
        return None

    @property
    def implied_sparsity(self) -> float | None:
        """``1 − density`` where the pattern fixes its density (N:M: ``1 − n/m``), else ``None``."""
        d = self.density
        return None if d is None else 1.0 - d

    @property
    def group_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the group the pattern constrains, in the reduction view."""
        return (1, 1)

    @property
    def kept_per_group(self) -> int | None:
        """Weights every :attr:`group_shape` group keeps (the per-group rule; N:M: ``n``), or ``None``
        where kept units are allocated across the layer / model instead."""
        return None

    @property
    def unit(self) -> tuple[int, int]:
        """``(rows, cols)`` of the tile of the reduction view kept or dropped whole: :attr:`group_shape`
        for an allocated pattern, ``(1, 1)`` for a per-group one (its groups are not kept whole)."""
        return (1, 1) if self.kept_per_group is not None else tuple(self.group_shape)

    def kept_count(self, numel: int, density: float | None = None) -> int:
        """Kept values of a weight of ``numel`` entries: ``round(density · numel)``, the pattern's own
        :attr:`density` where it fixes one (``density`` is then ignored)."""
        d = self.density if self.density is not None else density
        if d is None:
            raise ValueError(f"pattern {self} needs a density to count its kept values")
        return int(round(d * numel))

    def index_bytes(self, rows: int, cols: int, kept: int) -> int | None:
        """Bytes of the index structure a packed ``rows x cols`` weight of this pattern stores besides its
        ``kept`` values; ``None`` where the pattern has no packed format of its own and is stored as an
        unstructured weight (the roofline then counts the unstructured format)."""
        return None

    @classmethod
    def parse(cls, s: str) -> "Pattern | None":
        """The pattern for the lower-cased string ``s``, or ``None`` if ``s`` is not of this type."""
        return None

    @classmethod
    def examples(cls) -> list[tuple[str, float | None]]:
        """``(pattern string, density)`` cases the backend conformance tests run for this type (a
        registered pattern is tested on every backend that declares it by being listed here)."""
        return []

    def fits(self, shape: tuple[int, ...], op: str = "linear") -> str | None:
        """Why a weight of ``shape`` (2-D Linear or 4-D conv) cannot take this pattern (``None``: it can)."""
        return None

    def top_mask(self, scores_rv: torch.Tensor, density: float | None) -> torch.Tensor:
        """The mask (reduction view) keeping the largest |scores| under this pattern."""
        raise NotImplementedError

    def mask_error(self, mask_rv: torch.Tensor) -> str | None:
        """Why a bool reduction-view mask breaks this pattern (``None``: it fits)."""
        return None


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any subset of weights (``sparsity=`` gives how many are kept)."""

    kind: ClassVar[str] = "unstructured"
    label: ClassVar[str] = "unstructured"
    syntax: ClassVar[str] = "'unstructured'"

    @classmethod
    def parse(cls, s: str) -> "Pattern | None":
        return cls() if s in ("unstructured", "dense") else None

    @classmethod
    def examples(cls) -> list[tuple[str, float | None]]:
        return [("unstructured", 0.1), ("unstructured", 0.6)]

    def top_mask(self, scores_rv: torch.Tensor, density: float | None) -> torch.Tensor:
        if density is None:
            raise ValueError("an unstructured pattern needs a sparsity (or an explicit mask)")
        return topk_mask(scores_rv, density) if density < 1.0 else torch.ones_like(scores_rv, dtype=torch.bool)

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` kept out of every ``m`` consecutive weights along the reduction dim."""

    n: int = 2
    m: int = 4
    kind: ClassVar[str] = "nm"
    label: ClassVar[str] = "N:M"
    syntax: ClassVar[str] = "'N:M'"

    def __post_init__(self) -> None:
        _check_nm(self.n, self.m)

    @property
    def is_nm(self) -> bool:
        return True

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def group_shape(self) -> tuple[int, int]:
        return (1, self.m)

    @property
    def kept_per_group(self) -> int:
        return self.n

    def kept_count(self, numel: int, density: float | None = None) -> int:
        return numel * self.n // self.m

    def index_bytes(self, rows: int, cols: int, kept: int) -> int:
        """``ceil(log2 m)`` bits per kept value (the cuSPARSELt / CUTLASS 2:4 metadata: 2-bit indices)."""
        bits = max(1, math.ceil(math.log2(self.m)))
        return math.ceil(kept * bits / 8)

    @classmethod
    def parse(cls, s: str) -> "Pattern | None":
        parts = s.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return cls(int(parts[0]), int(parts[1]))
        return None

    @classmethod
    def examples(cls) -> list[tuple[str, float | None]]:
        return [("2:4", None), ("1:4", None), ("4:8", None)]

    def fits(self, shape: tuple[int, ...], op: str = "linear") -> str | None:
        k = int(math.prod(shape[1:]))
        if len(shape) == 4 and shape[1] % self.m:
            return (f"pattern {self} groups {self.m} consecutive input channels per kernel position, but "
                    f"in_channels/groups={shape[1]} is not divisible by {self.m}")
        if k % self.m:
            return f"reduction dim {k} is not divisible by m={self.m} (pattern {self}, weight {tuple(shape)})"
        return None

    def top_mask(self, scores_rv: torch.Tensor, density: float | None) -> torch.Tensor:
        if density is not None and abs(float(density) - self.density) > 1e-9:
            raise ValueError(f"pattern {self} implies sparsity {1 - self.density:g}, got sparsity={1 - density:g}")
        return nm_mask(scores_rv, self.n, self.m)

    def mask_error(self, mask_rv: torch.Tensor) -> str | None:
        if mask_rv.shape[-1] % self.m:
            return f"reduction dim {mask_rv.shape[-1]} is not divisible by m={self.m}"
        if not is_nm(mask_rv, self.n, self.m):
            bad = int((mask_rv.reshape(-1, self.m).sum(1) > self.n).sum())
            return f"mask does not satisfy the {self} pattern: {bad} group(s) of {self.m} keep more than {self.n}"
        return None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


#: block sizes the ``"block:B"`` pattern accepts
BLOCK_SIZES = (8, 16, 32)


@dataclass(frozen=True)
class Block(Pattern):
    """Square ``b x b`` blocks of the reduction view ``(out, K)`` kept or dropped whole (``"block:B"``,
    ``B`` in :data:`BLOCK_SIZES`); for conv the reduction dim is ``(kh, kw, C/groups)``, channel fastest.
    ``sparsity=`` gives the fraction of blocks dropped."""

    b: int = 16
    kind: ClassVar[str] = "block"
    label: ClassVar[str] = "block"
    syntax: ClassVar[str] = f"'block:B' (B in {BLOCK_SIZES})"

    def __post_init__(self) -> None:
        if self.b not in BLOCK_SIZES:
            raise ValueError(f"block pattern needs a block size in {BLOCK_SIZES}, got {self.b}")

    @property
    def group_shape(self) -> tuple[int, int]:
        return (self.b, self.b)

    @classmethod
    def parse(cls, s: str) -> "Pattern | None":
        if s.startswith("block:"):
            v = s[len("block:"):].strip()
            if not v.isdigit():
                raise ValueError(f"cannot parse block pattern {s!r}: expected 'block:B' with B in {BLOCK_SIZES}")
            return cls(int(v))
        return None

    @classmethod
    def examples(cls) -> list[tuple[str, float | None]]:
        return [("block:8", 0.5), ("block:16", 0.25)]

    def fits(self, shape: tuple[int, ...], op: str = "linear") -> str | None:
        rows, k = int(shape[0]), int(math.prod(shape[1:]))
        if rows % self.b or k % self.b:
            return (f"pattern {self} needs out_features/out_channels ({rows}) and the reduction dim ({k}) "
                    f"divisible by {self.b} (weight {tuple(shape)})")
        return None

    def top_mask(self, scores_rv: torch.Tensor, density: float | None) -> torch.Tensor:
        if density is None:
            raise ValueError(f"pattern {self} needs a sparsity (or an explicit mask)")
        return block_mask(scores_rv, self.b, density)

    def mask_error(self, mask_rv: torch.Tensor) -> str | None:
        r, k = mask_rv.shape
        if r % self.b or k % self.b:
            return f"mask {tuple(mask_rv.shape)} is not made of whole {self.b}x{self.b} blocks"
        blk = mask_rv.reshape(r // self.b, self.b, k // self.b, self.b).sum((1, 3))
        mixed = int(((blk != 0) & (blk != self.b * self.b)).sum())
        if mixed:
            return f"mask does not satisfy the {self} pattern: {mixed} block(s) of {self.b}x{self.b} are partly kept"
        return None

    def __str__(self) -> str:
        return f"block:{self.b}"


#: pattern types :func:`parse_pattern` tries, in order (see :func:`register_pattern`)
PATTERN_TYPES: list[type[Pattern]] = [Unstructured, NM, Block]


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Add a :class:`Pattern` subclass (its ``parse`` classmethod recognises its strings); usable as a
    class decorator. Backends run it where they list it in ``Backend.patterns``; pruning methods where
    their ``pattern_support`` accepts its :attr:`~Pattern.kind` (a subclass keeping its parent's kind is
    accepted wherever the parent is; a new kind is refused until a method opts in). ``label`` and
    ``syntax`` default to the kind."""
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise TypeError(f"register_pattern expects a Pattern subclass, got {cls!r}")
    if not isinstance(cls.kind, str) or cls.kind in ("", "?"):
        raise ValueError(f"register_pattern: {cls.__name__} needs a class attribute kind (the family's name, "
                         "e.g. kind = 'row') by which backends and pruning methods accept it")
    own_kind = "kind" in cls.__dict__  # a new family: it does not inherit its parent's name in messages
    if cls.label == "?" or (own_kind and "label" not in cls.__dict__):
        cls.label = cls.kind
    if cls.syntax == "?" or (own_kind and "syntax" not in cls.__dict__):
        cls.syntax = repr(cls.kind)
    if cls not in PATTERN_TYPES:
        PATTERN_TYPES.append(cls)
        _PARSED.clear()
    return cls


_PARSED: dict[str, Pattern] = {}


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """Parse ``"unstructured"``, ``"N:M"`` (1 <= N < M) or ``"block:B"``. Raises ``ValueError`` otherwise."""
    if isinstance(pattern, Pattern):
        return pattern
    hit = _PARSED.get(pattern) if isinstance(pattern, str) else None
    if hit is not None:  # every op call parses its pattern string: keep it a dict lookup
        return hit
    p = _parse_pattern(pattern)
    if len(_PARSED) < 1024:
        _PARSED[pattern] = p
    return p


def _parse_pattern(pattern) -> Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string like 'unstructured' or '2:4', got {type(pattern).__name__}")
    s = pattern.strip().lower()
    for cls in PATTERN_TYPES:
        p = cls.parse(s)
        if p is not None:
            return p
    extra = [c.syntax for c in PATTERN_TYPES if c not in (Unstructured, NM, Block)]
    raise ValueError(f"cannot parse sparsity pattern {pattern!r}: expected 'unstructured', 'N:M' such as '2:4', "
                     f"or 'block:B' with B in {BLOCK_SIZES}" + (f" (registered: {', '.join(extra)})" if extra else ""))


def _check_nm(n: int, m: int) -> None:
    if m < 2:
        raise ValueError(f"N:M pattern needs m >= 2, got m={m}")
    if n < 1 or n >= m:
        raise ValueError(f"N:M pattern needs 1 <= n < m, got n={n}, m={m}")


def _check_scores(scores: torch.Tensor, what: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_complex():
        raise TypeError(f"{what} must be real, got {scores.dtype}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError(f"{what} contain NaN ({int(torch.isnan(scores).sum())} of {scores.numel()} entries); "
                         "cannot rank them to build a mask")


def check_sparsity(sparsity: float, *, what: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1) and return it as float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{what} must be in [0, 1), got {sparsity}")
    return s


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top-``n`` |score| of each group of ``m`` consecutive entries along the last dim.

    ``scores``: any shape ``(..., K)`` with ``K % m == 0``. Returns a bool tensor of the same shape.
    Ties are broken towards the lower index (deterministic).
    """
    _check_nm(int(n), int(m))
    _check_scores(scores)
    if scores.dim() == 0 or scores.shape[-1] % m != 0:
        raise ValueError(f"N:M mask {n}:{m}: the reduction (last) dim {tuple(scores.shape)[-1:] or '()'} "
                         f"is not divisible by m={m} (scores shape {tuple(scores.shape)})")
    a = scores.detach().abs().float().reshape(-1, m)
    # stable top-n: sort descending by value, ascending by index on ties
    idx = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :n]
    out = torch.zeros_like(a, dtype=torch.bool)
    out.scatter_(1, idx, True)
    return out.reshape(scores.shape)


def _kth_largest(f: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of 1-D ``f`` (exact). Large inputs: a random sample brackets it, one
    pass counts what lies above the bracket and selects the candidates inside it, and ``kthvalue`` runs
    on those only (a few passes over ``f`` instead of a full select: 4M entries ~10 ms vs 65-450 ms)."""
    n = f.numel()
    if n > (1 << 16):
        # a pseudo-random sample (fixed seed: the result is exact either way; a strided one is biased on
        # matrices whose columns differ, e.g. per-feature gradient magnitudes, and misses the bracket)
        g = torch.Generator(device=f.device).manual_seed(n)
        pick = torch.randint(0, n, (1 << 15,), generator=g, device=f.device)
        smp = torch.sort(f[pick], descending=True).values
        ns = smp.numel()
        q = k / n
        spread = 4.0 * math.sqrt(ns * q * (1.0 - q)) + 8
        hi = smp[max(0, int(q * ns - spread))]            # ~fewer than k entries above it
        lo = smp[min(ns - 1, int(q * ns + spread))]       # ~more than k entries at or above it
        above = int(torch.count_nonzero(f > hi))  # (bool.sum() promotes to int64: ~2x slower)
        if above < k:
            cand = f[(f <= hi) & (f >= lo)]
            r = k - above                                  # the r-th largest candidate
            if 1 <= r <= cand.numel():
                return torch.kthvalue(cand, cand.numel() - r + 1).values
    return torch.kthvalue(f, n - k + 1).values


def top_k_flat(flat: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
               absval: bool = False) -> torch.Tensor:
    """Bool mask (same shape as 1-D ``flat``) of its ``k`` largest scores, ties going to the lower
    index: the same set as the first ``k`` of a stable descending sort, found with one ``kthvalue``
    (O(n)) instead of a full sort (a 4M-entry sort took ~0.45 s here and dominated DST mask updates).

    The score of an entry is its value (``absval``: its magnitude), ``-inf`` where the bool ``exclude``
    is set, and excluded entries are never in the result: the same as filling ``-inf`` at ``exclude``,
    selecting, and clearing ``exclude`` (the DST grow step), without the ``abs``/``-inf`` copies (on CPU
    the compiled extension does it in two passes over the scores)."""
    flat = flat.reshape(-1)
    n = flat.numel()
    k = max(0, min(int(k), n))
    if exclude is not None:
        exclude = exclude.reshape(-1)
        if exclude.dtype != torch.bool or exclude.numel() != n:
            raise ValueError(f"top_k_flat: exclude must be a bool tensor of {n} entries, got "
                             f"{exclude.dtype} with {exclude.numel()}")
    f = flat.float()
    if f.device.type == "cpu" and n > (1 << 14) and 0 < k < n:
        from .formats.kept import _cpu_fast

        ext = _cpu_fast(f)
        if ext is not None:  # the same selection in two fused passes (4M entries: ~2.3 ms vs ~27 ms)
            got = ext.topk_flat(f.contiguous(), k, None if exclude is None else exclude.contiguous(), bool(absval))
            if got.numel() == n:  # (empty: NaN in the scores, the generic path below decides)
                return got
    if absval:
        f = f.abs()  # a copy we own: the fill below can go in place
    if exclude is not None:
        f = f.masked_fill_(exclude, -math.inf) if absval else f.masked_fill(exclude, -math.inf)
    out = _top_k_plain(f, k)
    return out & ~exclude if exclude is not None else out


def _top_k_plain(f: torch.Tensor, k: int) -> torch.Tensor:
    n = f.numel()
    out = torch.zeros(n, dtype=torch.bool, device=f.device)
    if k == 0:
        return out
    if k == n:
        return out.fill_(True)
    v = _kth_largest(f, k)
    out = f > v
    need = k - int(torch.count_nonzero(out))
    if need > 0:
        out[(f == v).nonzero().reshape(-1)[:need]] = True
    return out


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` entries with the largest |score| (bool, same shape)."""
    _check_scores(scores)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    k = int(round(float(density) * scores.numel()))
    return top_k_flat(scores.detach().abs().float().reshape(-1), k).reshape(scores.shape)


def block_mask(scores: torch.Tensor, block: int, density: float) -> torch.Tensor:
    """Keep the ``round(density * nblocks)`` ``block x block`` blocks of largest summed |score| (bool,
    same shape). ``scores`` is 2-D ``(R, C)`` — a weight's reduction view — with both dims divisible by
    ``block``; ties go to the lower block index."""
    _check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"block_mask needs a 2-D score matrix (a reduction view), got shape {tuple(scores.shape)}")
    R, C = scores.shape
    if not isinstance(block, int) or block < 1 or R % block or C % block:
        raise ValueError(f"block_mask: shape {(R, C)} is not divisible into {block}x{block} blocks")
    blocks = scores.detach().abs().float().reshape(R // block, block, C // block, block).sum((1, 3))
    keep = topk_mask(blocks, density) if density < 1.0 else torch.ones_like(blocks, dtype=torch.bool)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


@lru_cache(maxsize=None)
def _block_patterns(n: int, m: int) -> torch.Tensor | None:
    """All m x m 0/1 matrices with exactly n ones in every row and column, as (P, m*m) float;
    ``None`` when there are too many to enumerate."""
    rows = list(itertools.combinations(range(m), n))
    if len(rows) ** m > 2_000_000:
        return None
    pats = []

    def rec(r: int, colcount: list[int], chosen: list[tuple[int, ...]]):
        if r == m:
            pats.append(chosen.copy())
            return
        for comb in rows:
            if all(colcount[c] < n for c in comb):
                for c in comb:
                    colcount[c] += 1
                chosen.append(comb)
                rec(r + 1, colcount, chosen)
                chosen.pop()
                for c in comb:
                    colcount[c] -= 1

    rec(0, [0] * m, [])
    t = torch.zeros(len(pats), m, m)
    for p, rows_ in enumerate(pats):
        for r, comb in enumerate(rows_):
            t[p, r, list(comb)] = 1.0
    return t.reshape(len(pats), m * m)


def transposable_nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask where every row and every column of each ``m x m`` block keeps at most ``n`` weights, so
    both W and Wᵀ are N:M. ``scores`` is 2-D ``(R, C)`` with ``R % m == C % m == 0``.

    Exact (maximum kept |score| per block, by enumeration) where the number of admissible block
    patterns is small (2:4 has 90, 1:4 and 3:4 have 24); otherwise (e.g. 2:8, 4:8) a greedy choice
    (largest |score| first, taken while its row and column still have budget) which is admissible —
    at most ``n`` per row and column — but may keep fewer than ``n`` in a few rows and is not always
    optimal.
    """
    _check_nm(int(n), int(m))
    _check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"transposable_nm_mask needs a 2-D score matrix, got shape {tuple(scores.shape)}")
    R, C = scores.shape
    if R % m or C % m:
        raise ValueError(f"transposable {n}:{m} mask needs both dims divisible by m={m}, got shape {(R, C)}")
    a = scores.detach().abs().float()
    blocks = a.reshape(R // m, m, C // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)
    pats = _block_patterns(n, m)
    if pats is not None:
        pats = pats.to(blocks.device)
        best = (blocks @ pats.t()).argmax(dim=1)
        chosen = pats[best] > 0.5
    else:
        chosen = _greedy_transposable(blocks, n, m)
    return chosen.reshape(R // m, C // m, m, m).permute(0, 2, 1, 3).reshape(R, C).contiguous()


def _greedy_transposable(blocks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    B = blocks.shape[0]
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices
    chosen = torch.zeros(B, m * m, dtype=torch.bool, device=blocks.device)
    rowc = torch.zeros(B, m, dtype=torch.long, device=blocks.device)
    colc = torch.zeros_like(rowc)
    ar = torch.arange(B, device=blocks.device)
    for j in range(m * m):
        pos = order[:, j]
        r, c = pos // m, pos % m
        ok = (rowc[ar, r] < n) & (colc[ar, c] < n)
        chosen[ar[ok], pos[ok]] = True
        rowc[ar[ok], r[ok]] += 1
        colc[ar[ok], c[ok]] += 1
    return chosen


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the last dim holds at most ``n`` kept entries."""
    _check_nm(int(n), int(m))
    if mask.dim() == 0 or mask.shape[-1] % m:
        return False
    return bool((mask.reshape(-1, m).sum(dim=1) <= n).all())


def is_transposable_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when a 2-D ``mask`` and its transpose are both N:M."""
    return mask.dim() == 2 and is_nm(mask, n, m) and is_nm(mask.t(), n, m)


def density(mask: torch.Tensor) -> float:
    """Fraction of kept entries."""
    return float(mask.count_nonzero()) / max(mask.numel(), 1)


def reduction_view(weight: torch.Tensor) -> torch.Tensor:
    """``(out, K)`` view of a weight in kernel reduction order (conv: ``(kh, kw, c)``, channel fastest)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    raise ValueError(f"expected a 2-D (linear) or 4-D (conv) weight, got shape {tuple(weight.shape)}")


def from_reduction_view(rv: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Inverse of :func:`reduction_view`."""
    shape = tuple(shape)
    if len(shape) == 2:
        return rv.reshape(shape)
    o, c, kh, kw = shape
    return rv.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()


def magnitude_mask(weight: torch.Tensor, pattern: "str | Pattern", sparsity: float | None) -> torch.Tensor:
    """Largest-|weight| mask for a layer weight (2-D or 4-D) under ``pattern`` (:meth:`Pattern.top_mask`).

    N:M keeps the top-n of every m-group in reduction order (``sparsity`` must be ``None`` or ``1-n/m``);
    unstructured keeps ``round((1 - sparsity) * numel)`` weights; ``block:B`` the largest-|w|-sum blocks.
    """
    pat = parse_pattern(pattern)
    if sparsity is not None:
        check_sparsity(sparsity)
    density = None if sparsity is None else 1.0 - float(sparsity)
    why = pat.fits(tuple(weight.shape))
    if why is not None:
        raise ValueError(why)
    if isinstance(pat, Unstructured):  # ranking the natural layout: same set, ties as before
        return pat.top_mask(weight, density)
    return from_reduction_view(pat.top_mask(reduction_view(weight), density), weight.shape)


def validate_mask(mask: torch.Tensor, weight: torch.Tensor, pattern: "str | Pattern", *, where: str = "") -> torch.Tensor:
    """Check that ``mask`` fits ``weight`` (any tensor of the weight's shape and device) and ``pattern``;
    return it as a bool tensor on the weight's device. Raises ``ValueError``/``TypeError`` naming
    ``where``, the shapes and the broken rule."""
    pre = f"{where}: " if where else ""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{pre}mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{pre}mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            if mask.is_floating_point() and torch.isnan(mask).any():
                raise ValueError(f"{pre}mask contains NaN")
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"{pre}mask of dtype {mask.dtype} must hold only 0 and 1")
            mask = mask != 0
        else:
            raise TypeError(f"{pre}mask must be bool (or 0/1 numbers), got dtype {mask.dtype}")
    if mask.device != weight.device:
        raise ValueError(f"{pre}mask is on {mask.device} but the weight is on {weight.device}; move it first")
    pat = parse_pattern(pattern)
    why = pat.fits(tuple(weight.shape))
    if why is None and mask.device.type != "meta":
        why = pat.mask_error(reduction_view(mask))
    if why is not None:
        raise ValueError(f"{pre}{why}")
    return mask
