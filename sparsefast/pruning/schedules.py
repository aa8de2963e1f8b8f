"""Schedules: pure functions of the step counter plus their hyperparameters, so a run resumes exactly
from ``state_dict()`` (the pruner stores its step counter; a schedule stores its parameters).

Step convention: ``t`` counts completed optimizer steps (``pruner.step()`` calls), starting at 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["Schedule", "UpdateEvery", "CubicSparsity", "CosineDecay", "ConstantSchedule", "ExponentialDensity"]


def _int(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


@dataclass
class Schedule:
    """Base: ``state_dict()`` / ``load_state_dict()`` round-trip the parameters."""

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("type", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state dict is for a {d.get('type')}, not a {type(self).__name__}")
        for f in fields(self):
            if f.name in d:
                setattr(self, f.name, d[f.name])


@dataclass
class UpdateEvery(Schedule):
    """Mask updates at ``t = start_step + k·update_every`` (``t > 0``) while ``t < end_step`` (``None``: forever)."""

    update_every: int = 100
    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self) -> None:
        _int("update_every", self.update_every, 1)
        _int("start_step", self.start_step, 0)
        if self.end_step is not None:
            _int("end_step", self.end_step, 0)
            if self.end_step < self.start_step:
                raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")

    def is_update(self, t: int) -> bool:
        if t <= 0 or t < self.start_step or (self.end_step is not None and t >= self.end_step):
            return False
        return (t - self.start_step) % self.update_every == 0


@dataclass
class CubicSparsity(Schedule):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(end − t₀))³`` for ``t₀ ≤ t ≤ end``,
    ``s_i`` before, ``s_f`` after; pruning happens every ``update_every`` steps from ``t₀`` and at ``end``."""

    initial: float = 0.0
    final: float = 0.9
    start_step: int = 0
    end_step: int = 1000
    update_every: int = 100

    def __post_init__(self) -> None:
        _int("start_step", self.start_step, 0)
        _int("end_step", self.end_step, 0)
        _int("update_every", self.update_every, 1)
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be > start_step ({self.start_step})")
        for nm in ("initial", "final"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1.0):
                raise ValueError(f"{nm} sparsity must be in [0, 1), got {v!r}")
        if self.initial > self.final:
            raise ValueError(f"initial sparsity {self.initial} exceeds the final sparsity {self.final}")

    def __call__(self, t: int) -> float:
        if t <= self.start_step:
            return float(self.initial)
        if t >= self.end_step:
            return float(self.final)
        frac = (t - self.start_step) / (self.end_step - self.start_step)
        return float(self.final + (self.initial - self.final) * (1.0 - frac) ** 3)

    def is_update(self, t: int) -> bool:
        if t < self.start_step or t > self.end_step:
            return False
        return t == self.end_step or (t - self.start_step) % self.update_every == 0


@dataclass
class CosineDecay(Schedule):
    """RigL's drop fraction ``α_t = α/2 (1 + cos(π (t − start)/(end − start)))``; ``α`` when ``end`` is None."""

    initial: float = 0.3
    end_step: int | None = None
    start_step: int = 0

    def __call__(self, t: int) -> float:
        if self.end_step is None:
            return float(self.initial)
        span = max(self.end_step - self.start_step, 1)
        x = min(max((t - self.start_step) / span, 0.0), 1.0)
        return float(self.initial / 2 * (1 + math.cos(math.pi * x)))


@dataclass
class ConstantSchedule(Schedule):
    value: float = 0.3

    def __call__(self, t: int) -> float:
        return float(self.value)


@dataclass
class ExponentialDensity(Schedule):
    """SynFlow's iterative schedule: density after round ``k`` of ``rounds`` is ``D^(k/rounds)``."""

    final_density: float = 0.1
    rounds: int = 100

    def __post_init__(self) -> None:
        _int("rounds", self.rounds, 1)

    def __call__(self, k: int) -> float:
        return float(self.final_density ** (k / self.rounds))
