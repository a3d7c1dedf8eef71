"""Analog-hardware noise: models, schedules, placement, injection and evaluation.

The Lightning entry points are :class:`AnalogNoise` (a callback, composes with
any strategy) and :class:`lightning_relief.AnalogNoiseStrategy` (DDP or one
device with that callback installed);
:func:`evaluate_robustness` sweeps a trained model over noise levels or
deployment times, and :mod:`lightning_relief.noise.aihwkit_backend` checks it
on IBM aihwkit (optional dependency).
"""

from lightning_relief.noise.injector import NoiseInjector
from lightning_relief.noise.models import (
    AdditiveGaussian,
    CombinedGaussian,
    MultiplicativeGaussian,
    NoiseModel,
    WeightNoise,
)
from lightning_relief.noise.pcm import PCMNoise, pcm_drifted_weights
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import (
    Constant,
    Cosine,
    DeploymentTime,
    LinearWarmup,
    PerSampleVariance,
    RandomWalk,
    Schedule,
    SequentialSchedule,
    Step,
)

__all__ = [
    "AdditiveGaussian",
    "AnalogNoise",
    "CombinedGaussian",
    "Constant",
    "Cosine",
    "DeploymentTime",
    "LinearWarmup",
    "MultiplicativeGaussian",
    "NoiseInjector",
    "NoiseModel",
    "PCMNoise",
    "PerSampleVariance",
    "Placement",
    "RandomWalk",
    "Schedule",
    "SequentialSchedule",
    "Step",
    "WeightNoise",
    "evaluate_robustness",
    "pcm_drifted_weights",
]


def __getattr__(name: str):
    # evaluation pulls in rich and matplotlib, the callback Lightning: load them on first use
    if name in ("evaluate_robustness", "RobustnessResult"):
        from lightning_relief.noise import evaluate

        return getattr(evaluate, name)
    if name == "AnalogNoise":
        from lightning_relief.noise.callback import AnalogNoise

        return AnalogNoise
    raise AttributeError(f"module 'lightning_relief.noise' has no attribute {name!r}")
