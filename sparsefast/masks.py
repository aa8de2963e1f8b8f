"""Sparsity patterns and mask construction / validation.

A *pattern* is ``"unstructured"`` or ``"N:M"``: N kept out of every M consecutive weights along the
reduction dimension.

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

import torch

__all__ = [
    "Pattern", "parse_pattern", "nm_mask", "topk_mask", "transposable_nm_mask", "is_nm",
    "is_transposable_nm", "density", "reduction_view", "from_reduction_view", "validate_mask",
    "magnitude_mask", "check_sparsity",
]


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern. ``n``/``m`` are ``None`` for unstructured."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def density(self) -> float | None:
        """Density implied by the pattern (``n/m``), ``None`` for unstructured."""
        return self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


_PARSED: dict[str, Pattern] = {}


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (1 <= N < M). Raises ``ValueError`` otherwise."""
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
    if s in ("unstructured", "dense"):
        return Pattern()
    parts = s.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"cannot parse sparsity pattern {pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(parts[0]), int(parts[1])
    _check_nm(n, m)
    return Pattern(n, m)


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


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` entries with the largest |score| (bool, same shape)."""
    _check_scores(scores)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    k = int(round(float(density) * scores.numel()))
    flat = scores.detach().abs().float().reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(flat, descending=True, stable=True).indices[:k]
        out[idx] = True
    return out.reshape(scores.shape)


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
    """Largest-|weight| mask for a layer weight (2-D or 4-D) under ``pattern``.

    N:M keeps the top-n of every m-group in reduction order (``sparsity`` must be ``None`` or ``1-n/m``);
    unstructured keeps ``round((1 - sparsity) * numel)`` weights.
    """
    pat = parse_pattern(pattern)
    if pat.is_nm:
        if sparsity is not None and abs(float(sparsity) - (1 - pat.density)) > 1e-9:
            raise ValueError(f"pattern {pat} implies sparsity {1 - pat.density:g}, got sparsity={sparsity}")
        rv = reduction_view(weight)
        return from_reduction_view(nm_mask(rv, pat.n, pat.m), weight.shape)
    if sparsity is None:
        raise ValueError("an unstructured pattern needs a sparsity (or an explicit mask)")
    s = check_sparsity(sparsity)
    if s == 0.0:
        return torch.ones_like(weight, dtype=torch.bool)
    return topk_mask(weight, 1.0 - s)


def validate_mask(mask: torch.Tensor, weight: torch.Tensor, pattern: "str | Pattern", *, where: str = "") -> torch.Tensor:
    """Check that ``mask`` fits ``weight`` and ``pattern``; return it as a bool tensor on the weight's
    device. Raises ``ValueError``/``TypeError`` naming ``where``, the shapes and the broken rule."""
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
    if pat.is_nm:
        rv = reduction_view(mask)
        if rv.shape[1] % pat.m:
            raise ValueError(f"{pre}reduction dim {rv.shape[1]} of weight {tuple(weight.shape)} is not divisible by m={pat.m}")
        if not is_nm(rv, pat.n, pat.m):
            bad = int((rv.reshape(-1, pat.m).sum(1) > pat.n).sum())
            raise ValueError(f"{pre}mask does not satisfy the {pat} pattern: {bad} group(s) of {pat.m} keep more than {pat.n}")
    return mask
