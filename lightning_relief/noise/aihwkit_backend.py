"""The independent check: the same trained model on IBM aihwkit's PCM inference simulator.

``convert_to_analog`` turns every Conv/Linear into an analog tile with an
``InferenceRPUConfig`` (``PCMLikeNoiseModel``, global drift compensation);
each repeat programs the weights once (one chip) and drifts that chip to each
time. aihwkit is optional (``pip install lightning-relief[analog]``, built from
source); everything here imports it lazily and says how to install it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_relief._rng import isolated_seed
from lightning_relief.noise.evaluate import RobustnessResult, _accuracy, _loader
from lightning_relief.noise.pcm import ONE_YEAR

AIHWKIT_TIMES = (3600.0, 86400.0, ONE_YEAR)


def require_aihwkit() -> Any:
    try:
        import aihwkit  # noqa: F401
        from aihwkit.nn.conversion import convert_to_analog
    except ImportError as err:  # the build needs OpenBLAS and a compiler; say so
        raise ImportError(
            "aihwkit is not installed: `make install` builds it (needs libopenblas-dev, cmake, pybind11, "
            "scikit-build and mypy's stubgen on PATH), or pip install 'lightning-relief[analog]' --no-build-isolation"
        ) from err
    return convert_to_analog


def pcm_rpu_config(
    g_max: float = 25.0,
    drift_compensation: bool = True,
    ideal_periphery: bool = False,
    weight_scaling_omega: float = 1.0,
) -> Any:
    """An ``InferenceRPUConfig`` with aihwkit's PCM model.

    ``ideal_periphery=True`` makes the analog MVM exact (no input/output
    quantisation, output noise or bounds), isolating the PCM device model;
    otherwise aihwkit's standard forward applies (7-bit inputs, 9-bit outputs,
    output noise 0.06, bound management). ``weight_scaling_omega=1`` maps each
    layer's largest weight to 1 in the tile (aihwkit's usual setting for
    hardware-aware models, and what ``PCMNoise(out_noise=...)`` assumes);
    ``0`` is ``InferenceRPUConfig``'s default: raw weights, so output noise is
    fixed in absolute terms.
    """
    require_aihwkit()
    from aihwkit.inference.compensation.drift import GlobalDriftCompensation
    from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig

    config = InferenceRPUConfig()
    config.noise_model = PCMLikeNoiseModel(g_max=g_max)
    config.drift_compensation = GlobalDriftCompensation() if drift_compensation else None
    if ideal_periphery:
        config.forward.is_perfect = True
    config.mapping.weight_scaling_omega = float(weight_scaling_omega)
    return config


def to_analog(model: nn.Module, rpu_config: Any | None = None) -> nn.Module:
    """An analog copy of ``model`` (the original is untouched)."""
    convert_to_analog = require_aihwkit()
    inner = model.model if hasattr(model, "model") and isinstance(model.model, nn.Module) else model
    analog = convert_to_analog(copy.deepcopy(inner).cpu().eval(), rpu_config if rpu_config is not None else pcm_rpu_config())
    return analog.eval()


def evaluate_aihwkit(
    model: nn.Module,
    datamodule: Any,
    times: Sequence[float] = AIHWKIT_TIMES,
    repeats: int = 3,
    g_max: float = 25.0,
    drift_compensation: bool = True,
    ideal_periphery: bool = False,
    weight_scaling_omega: float = 1.0,
    split: str = "test",
    seed: int = 0,
) -> RobustnessResult:
    """Accuracy of ``model`` on aihwkit PCM tiles at each time since programming.

    ``model`` is an ``nn.Module`` or a LightningModule with a ``.model``
    (ClassifierModule). ``extra["programmed"]`` holds the accuracy just after
    programming (t = 0) per repeat.
    """
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    times = [float(t) for t in times]
    if not times or any(t < 0 for t in times):
        raise ValueError(f"times must be a non-empty list of seconds >= 0, got {times}")
    loader = _loader(datamodule, split)
    inner = model.model if hasattr(model, "model") and isinstance(model.model, nn.Module) else model
    clean = _accuracy(copy.deepcopy(inner).cpu().eval(), loader, torch.device("cpu"))
    config = pcm_rpu_config(g_max, drift_compensation, ideal_periphery, weight_scaling_omega)
    per_time: list[list[float]] = [[] for _ in times]
    programmed = []
    for r in range(int(repeats)):
        with isolated_seed(seed + r):  # aihwkit draws from torch's global generator
            analog = to_analog(inner, config)
            analog.program_analog_weights()
            programmed.append(_accuracy(analog, loader, torch.device("cpu")))
            for i, t in enumerate(times):
                analog.drift_analog_weights(t)
                per_time[i].append(_accuracy(analog, loader, torch.device("cpu")))
    stats = [torch.tensor(a, dtype=torch.float64) for a in per_time]
    return RobustnessResult(
        kind="time",
        noise=(
            f"aihwkit PCMLikeNoiseModel(g_max={g_max}, drift_compensation={drift_compensation}, "
            f"ideal_periphery={ideal_periphery}, weight_scaling_omega={weight_scaling_omega})"
        ),
        clean_accuracy=clean,
        levels=times,
        accuracy_mean=[float(s.mean()) for s in stats],
        accuracy_std=[float(s.std()) if len(s) > 1 else 0.0 for s in stats],
        repeats=int(repeats),
        extra={"programmed": programmed},
    )
