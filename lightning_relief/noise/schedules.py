"""Noise-level schedules: how the noise level changes over training steps.

A schedule maps the global training step to a level: a 0-d tensor (one level
for the whole batch) or a ``(batch,)`` tensor (one per sample, VANT). Levels
are σ for the Gaussian models, a scale factor for ``WeightNoise`` and seconds
since programming for ``PCMNoise`` (see :attr:`Schedule.kind`).

Deterministic schedules are pure functions of the step. Random ones
(``PerSampleVariance``, ``RandomWalk``, ``DeploymentTime``) draw from the
generator they are given; the strategy owns that generator and saves its state
with :meth:`Schedule.state_dict`, so a resumed run draws the same levels.

>>> s = SequentialSchedule([LinearWarmup(0.3, warmup_steps=10), PerSampleVariance(0.3)], milestones=[10])
>>> round(float(s.level(5, batch_size=4)), 4)
0.15
>>> tuple(s.level(20, batch_size=4, generator=torch.Generator().manual_seed(0)).shape)
(4,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_relief.noise.pcm import ONE_YEAR


def _positive_int(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < math.inf:  # also rejects NaN; an infinite σ or time only makes NaNs later
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class Schedule:
    """Base class: ``level(step, batch_size, generator) -> Tensor``.

    ``kind`` is ``"value"`` (σ or scale), ``"time"`` (seconds) or ``None`` (either).
    """

    kind: ClassVar[str | None] = "value"

    def level(self, step: int, batch_size: int = 1, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Mutable state (for schedules that walk); stateless schedules return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The same level at every step (a σ, a scale or a time in seconds).

    >>> round(float(Constant(0.1).level(1000)), 6)
    0.1
    """

    kind = None

    def __init__(self, value: float) -> None:
        self.value = _non_negative("value", value)

    def level(self, step, batch_size=1, generator=None):
        return torch.scalar_tensor(self.value)


class LinearWarmup(Schedule):
    """``start`` → ``value`` linearly over ``warmup_steps`` steps, then ``value``.

    >>> [round(float(LinearWarmup(1.0, warmup_steps=4).level(s)), 2) for s in (0, 2, 4, 9)]
    [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, value: float, warmup_steps: int, start: float = 0.0) -> None:
        self.value = _non_negative("value", value)
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps)
        self.start = _non_negative("start", start)

    def level(self, step, batch_size=1, generator=None):
        frac = min(max(step, 0) / self.warmup_steps, 1.0)
        return torch.scalar_tensor(self.start + (self.value - self.start) * frac)


class Cosine(Schedule):
    """Cosine from ``start`` to ``end`` over ``total_steps`` (then ``end``).

    >>> round(float(Cosine(0.0, 1.0, total_steps=10).level(5)), 3)
    0.5
    """

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start = _non_negative("start", start)
        self.end = _non_negative("end", end)
        self.total_steps = _positive_int("total_steps", total_steps)

    def level(self, step, batch_size=1, generator=None):
        frac = min(max(step, 0) / self.total_steps, 1.0)
        return torch.scalar_tensor(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac)))


class Step(Schedule):
    """``value · gamma^k`` where k is the number of ``milestones`` passed.

    >>> [float(Step(1.0, milestones=[2, 4], gamma=2.0).level(s)) for s in (0, 2, 5)]
    [1.0, 2.0, 4.0]
    """

    def __init__(self, value: float, milestones: Sequence[int], gamma: float = 0.5) -> None:
        self.value = _non_negative("value", value)
        self.milestones = sorted(int(m) for m in milestones)
        if any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be >= 0, got {list(milestones)}")
        self.gamma = _non_negative("gamma", gamma)

    def level(self, step, batch_size=1, generator=None):
        passed = sum(step >= m for m in self.milestones)
        return torch.scalar_tensor(self.value * self.gamma**passed)


class PerSampleVariance(Schedule):
    """VANT: a level per sample, ``σ_i = α·σ + θ·|z_i|``, z_i ~ N(0, 1).

    ``sigma`` is a number or a schedule (its level at the step is σ). θ is in
    the units of σ (absolute), as in the VANT paper's formula.

    >>> s = PerSampleVariance(0.5, alpha=0.45, theta=0.66)
    >>> levels = s.level(0, batch_size=100000, generator=torch.Generator().manual_seed(0))
    >>> round(float(levels.mean()), 2)  # α·σ + θ·sqrt(2/π)
    0.75
    """

    def __init__(self, sigma: float | Schedule, alpha: float = 0.45, theta: float = 0.66) -> None:
        if isinstance(sigma, Schedule):
            if sigma.kind == "time":
                raise ValueError("PerSampleVariance needs a σ schedule, got a time schedule")
            self.sigma: float | Schedule = sigma
        else:
            self.sigma = _non_negative("sigma", sigma)
        self.alpha = _non_negative("alpha", alpha)
        self.theta = _non_negative("theta", theta)

    def level(self, step, batch_size=1, generator=None):
        sigma = self.sigma.level(step, 1, generator) if isinstance(self.sigma, Schedule) else torch.scalar_tensor(self.sigma)
        z = torch.randn(_positive_int("batch_size", batch_size), generator=generator)
        return self.alpha * sigma + self.theta * z.abs()

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma.state_dict()} if isinstance(self.sigma, Schedule) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sigma, Schedule) and "sigma" in state:
            self.sigma.load_state_dict(state["sigma"])


class RandomWalk(Schedule):
    """σ wanders: each step ``σ ← clip(σ + step_std·z, low, high)`` (reflected at the bounds).

    Its current σ and last step are state: saved in checkpoints, so a resumed
    run continues the same walk. Asking for an earlier step than the last one
    returns the current σ without moving (e.g. a repeated step after resume).

    >>> w = RandomWalk(start=0.1, low=0.05, high=0.2, step_std=0.01)
    >>> g = torch.Generator().manual_seed(0)
    >>> all(0.05 <= float(w.level(s, generator=g)) <= 0.2 for s in range(1000))
    True
    """

    def __init__(self, start: float, low: float, high: float, step_std: float) -> None:
        self.start = _non_negative("start", start)
        self.low = _non_negative("low", low)
        self.high = _non_negative("high", high)
        if not self.low <= self.start <= self.high:
            raise ValueError(f"RandomWalk needs low <= start <= high, got low={low}, start={start}, high={high}")
        self.step_std = _non_negative("step_std", step_std)
        self._sigma = self.start
        self._step = -1

    @property
    def current(self) -> float:
        return self._sigma

    def level(self, step, batch_size=1, generator=None):
        while self._step < step:
            if self._step >= 0:  # step 0 is the start value
                moved = self._sigma + self.step_std * float(torch.randn((), generator=generator))
                span = self.high - self.low
                if span > 0:  # reflect into [low, high]
                    offset = (moved - self.low) % (2 * span)
                    moved = self.low + (offset if offset <= span else 2 * span - offset)
                else:
                    moved = self.low
                self._sigma = moved
            self._step += 1
        return torch.scalar_tensor(self._sigma)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self._sigma, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sigma = float(state["sigma"])
        self._step = int(state["step"])


class DeploymentTime(Schedule):
    """Time since programming, 1 s to 10 years, on a log scale.

    ``mode="random"`` draws ``log10 t`` uniformly each step (drift-aware
    training sees every age of the chip); ``mode="sweep"`` walks from
    ``t_min`` to ``t_max`` log-linearly over ``total_steps``.

    >>> s = DeploymentTime(mode="sweep", total_steps=10)
    >>> float(s.level(0)), round(float(s.level(10)) / DeploymentTime.TEN_YEARS, 6)
    (1.0, 1.0)
    """

    kind = "time"
    TEN_YEARS: ClassVar[float] = 10 * ONE_YEAR

    def __init__(self, t_min: float = 1.0, t_max: float = 10 * ONE_YEAR, mode: str = "random", total_steps: int = 1000) -> None:
        if not 0 < float(t_min) < float(t_max) < math.inf:
            raise ValueError(f"DeploymentTime needs 0 < t_min < t_max < inf, got t_min={t_min}, t_max={t_max}")
        if mode not in ("random", "sweep"):
            raise ValueError(f"mode must be 'random' or 'sweep', got {mode!r}")
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.mode = mode
        self.total_steps = _positive_int("total_steps", total_steps)

    def level(self, step, batch_size=1, generator=None):
        lo, hi = math.log10(self.t_min), math.log10(self.t_max)
        if self.mode == "sweep":
            u = min(max(step, 0) / self.total_steps, 1.0)
        else:
            u = float(torch.rand((), generator=generator))
        return torch.scalar_tensor(10 ** (lo + (hi - lo) * u))


class SequentialSchedule(Schedule):
    """Schedules one after another: ``schedules[i]`` from ``milestones[i-1]`` on.

    Each later schedule sees the global step (like ``torch.optim.lr_scheduler.SequentialLR``
    but without restarting the count), so ``LinearWarmup`` then ``PerSampleVariance``
    is the VANT recipe.
    """

    def __init__(self, schedules: Sequence[Schedule], milestones: Sequence[int]) -> None:
        schedules = list(schedules)
        milestones = [int(m) for m in milestones]
        if not schedules or not all(isinstance(s, Schedule) for s in schedules):
            raise ValueError(f"schedules must be a non-empty list of Schedule, got {schedules!r}")
        if len(milestones) != len(schedules) - 1 or milestones != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be {len(schedules) - 1} increasing steps >= 0 (one per switch), got {milestones}")
        kinds = {s.kind for s in schedules if s.kind is not None}
        if len(kinds) > 1:
            raise ValueError(f"cannot chain schedules of different kinds {sorted(kinds)}")
        self.schedules = schedules
        self.milestones = milestones

    @property
    def kind(self) -> str | None:  # type: ignore[override]
        kinds = {s.kind for s in self.schedules} - {None}
        return kinds.pop() if kinds else None

    def active(self, step: int) -> Schedule:
        return self.schedules[sum(step >= m for m in self.milestones)]

    def level(self, step, batch_size=1, generator=None):
        return self.active(step).level(step, batch_size, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for schedule, sub in zip(self.schedules, state.get("schedules", [])):
            schedule.load_state_dict(sub)
