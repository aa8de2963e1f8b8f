"""Toy pattern types written the way a user would, for the tests that add a pattern type with
``register_pattern`` (tests/pruning/test_patterns_api.py, test_wanda_sparsegpt.py):

* :class:`Vec` (``"vec:C"``): runs of ``C`` consecutive weights along the reduction dim kept or dropped
  whole, allocated like unstructured / block (``kept_per_group`` None, ``unit == (1, C)``).
* :class:`TileNM` (``"N@RxC"``): at most ``N`` kept in every ``R x C`` tile of the reduction view, a
  per-group rule like N:M on 2-D groups (``kept_per_group == N``, the density fixed at ``N/(R·C)``;
  ``R = 1`` is N:M written another way).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsefast import masks as M


@dataclass(frozen=True)
class Vec(M.Pattern):
    c: int = 4
    kind: ClassVar[str] = "vec"

    @property
    def group_shape(self):
        return (1, self.c)

    @classmethod
    def parse(cls, s):
        if s.startswith("vec:") and s[4:].isdigit():
            return cls(int(s[4:]))
        return None

    def fits(self, shape, op="linear"):
        k = math.prod(shape[1:])
        if (len(shape) == 4 and shape[1] % self.c) or k % self.c:
            return f"pattern {self}: reduction dim {k} is not made of runs of {self.c}"
        return None

    def top_mask(self, scores_rv, density):
        if density is None:
            raise ValueError(f"pattern {self} needs a sparsity")
        runs = scores_rv.detach().abs().float().reshape(scores_rv.shape[0], -1, self.c).sum(-1)
        keep = M.topk_mask(runs, density) if density < 1.0 else torch.ones_like(runs, dtype=torch.bool)
        return keep.repeat_interleave(self.c, 1)

    def mask_error(self, mask_rv):
        runs = mask_rv.reshape(mask_rv.shape[0], -1, self.c).sum(-1)
        mixed = int(((runs != 0) & (runs != self.c)).sum())
        return f"mask does not satisfy {self}: {mixed} run(s) partly kept" if mixed else None

    def __str__(self):
        return f"vec:{self.c}"


@dataclass(frozen=True)
class TileNM(M.Pattern):
    n: int = 2
    r: int = 2
    c: int = 2
    kind: ClassVar[str] = "tilenm"
    label: ClassVar[str] = "tile N:M"

    @property
    def density(self):
        return self.n / (self.r * self.c)

    @property
    def group_shape(self):
        return (self.r, self.c)

    @property
    def kept_per_group(self):
        return self.n

    @classmethod
    def parse(cls, s):
        if "@" in s and "x" in s:
            n, rc = s.split("@")
            r, c = rc.split("x")
            return cls(int(n), int(r), int(c))
        return None

    def fits(self, shape, op="linear"):
        rows, k = shape[0], math.prod(shape[1:])
        if rows % self.r or k % self.c or (len(shape) == 4 and shape[1] % self.c):
            return f"pattern {self} needs the reduction view {(rows, k)} made of {self.r}x{self.c} tiles"
        return None

    def _tiles(self, rv):
        R, K = rv.shape
        return rv.reshape(R // self.r, self.r, K // self.c, self.c).permute(0, 2, 1, 3).reshape(-1, self.r * self.c)

    def top_mask(self, scores_rv, density):
        t = self._tiles(scores_rv.detach().abs().float())
        idx = torch.sort(t, dim=1, descending=True, stable=True).indices[:, :self.n]
        keep = torch.zeros_like(t, dtype=torch.bool).scatter_(1, idx, True)
        R, K = scores_rv.shape
        return keep.reshape(R // self.r, K // self.c, self.r, self.c).permute(0, 2, 1, 3).reshape(R, K)

    def mask_error(self, mask_rv):
        bad = int((self._tiles(mask_rv).sum(1) > self.n).sum())
        return f"mask does not satisfy {self}: {bad} tile(s) keep more than {self.n}" if bad else None

    def __str__(self):
        return f"{self.n}@{self.r}x{self.c}"


@contextlib.contextmanager
def registered(*classes):
    """The pattern types registered inside the block; the registry is left as the other tests expect it."""
    for cls in classes:
        M.register_pattern(cls)
    try:
        yield
    finally:
        for cls in classes:
            M.PATTERN_TYPES.remove(cls)
        M._PARSED.clear()
