"""``AnalogNoiseDDPStrategy``: the analog-noise strategy composed with Lightning's DDP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Schedule
from lightning_relief.noise.strategy_mixin import AnalogNoiseMixin


class AnalogNoiseDDPStrategy(AnalogNoiseMixin, DDPStrategy):
    """Data-parallel training with analog noise; arguments as ``AnalogNoiseStrategy`` plus DDP's.

    Every rank draws its own noise (noise is seeded by ``(seed, rank, step)``)
    while the schedule, seeded by ``seed`` alone, gives all ranks the same level.
    Weights are perturbed before the forward pass and restored after the
    backward pass, so DDP all-reduces gradients of the noisy forward and all
    ranks step the same clean weights.

    Example::

        trainer = L.Trainer(strategy=AnalogNoiseDDPStrategy(AdditiveGaussian(), 0.1, process_group_backend="gloo"),
                            accelerator="cpu", devices=2)
    """

    strategy_name = "analog_noise_ddp"

    def __init__(
        self,
        noise: NoiseModel,
        schedule: Schedule | float | None = None,
        placement: Placement | str | Sequence[Placement | str] | None = None,
        eval_noise: bool = False,
        eval_level: float | None = None,
        seed: int = 0,
        log_level: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(**ddp_kwargs)
        self._init_noise(noise, schedule, placement, eval_noise, eval_level, seed, log_level)
