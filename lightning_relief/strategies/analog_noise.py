"""``AnalogNoiseStrategy``: train on one device with the noise of analog hardware."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Schedule
from lightning_relief.noise.strategy_mixin import NOISE_STATE_KEY, AnalogNoiseMixin

__all__ = ["AnalogNoiseStrategy", "NOISE_STATE_KEY"]


class AnalogNoiseStrategy(AnalogNoiseMixin, SingleDeviceStrategy):
    """Single-device training with analog noise injected into the forward pass.

    The user's module is not changed: noise comes from forward hooks and from
    weights perturbed for the span of a training step, all removed when the
    trainer tears down. Validation, test, predict and export stay clean unless
    ``eval_noise=True``. For several GPUs use
    :class:`lightning_relief.noise.distributed.AnalogNoiseDDPStrategy`
    (same arguments plus DDP's).

    Args:
        noise: a noise model: ``AdditiveGaussian``, ``MultiplicativeGaussian``,
            ``CombinedGaussian``, ``WeightNoise`` or ``PCMNoise``.
        schedule: the level per step (a ``Schedule`` or a number for a constant
            level). Default: σ = 0.1 (Gaussian), scale 1.0 (``WeightNoise``);
            ``PCMNoise`` needs a time schedule such as ``DeploymentTime()``.
        placement: a ``Placement``, a site name (``"weights"``, ``"outputs"``,
            ``"activations"``) or a list of them; default: the model's own sites
            (outputs of conv/linear layers; weights for ``PCMNoise``; weights and
            outputs for ``WeightNoise``).
        eval_noise: inject noise in validation/test/predict too.
        eval_level: the level used there (default: mean of the last training level).
        seed: seeds the schedule and noise generators.
        log_level: log ``noise_sigma`` (or ``noise_time_s``) every step.
        device: the device to train on; default: the trainer's accelerator
            (``cuda:<current>`` on GPU, else CPU).

    Example::

        >>> import lightning as L
        >>> from lightning_relief import AnalogNoiseStrategy, ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> from lightning_relief.noise import AdditiveGaussian, LinearWarmup, PerSampleVariance, SequentialSchedule
        >>> vant = SequentialSchedule([LinearWarmup(0.5, warmup_steps=40),
        ...                            PerSampleVariance(0.5, alpha=0.45, theta=0.3)], milestones=[40])
        >>> strategy = AnalogNoiseStrategy(noise=AdditiveGaussian(), schedule=vant,
        ...                                placement=["outputs", "activations"])
        >>> trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_epochs=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassifierModule(LeNet5(input_size=8)), DigitsDataModule())
        >>> round(trainer.callback_metrics["noise_sigma"].item(), 1) > 0
        True
    """

    strategy_name = "analog_noise"

    def __init__(
        self,
        noise: NoiseModel,
        schedule: Schedule | float | None = None,
        placement: Placement | str | Sequence[Placement | str] | None = None,
        eval_noise: bool = False,
        eval_level: float | None = None,
        seed: int = 0,
        log_level: bool = True,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._auto_device = device is None
        self._init_noise(noise, schedule, placement, eval_noise, eval_level, seed, log_level)

    def setup_environment(self) -> None:
        if self._auto_device:
            from lightning.pytorch.accelerators import CUDAAccelerator

            if isinstance(self.accelerator, CUDAAccelerator):
                self._root_device = torch.device("cuda", torch.cuda.current_device())
        super().setup_environment()

    def __repr__(self) -> str:
        inj = self.injector
        return (
            f"AnalogNoiseStrategy(noise={inj.noise!r}, schedule={inj.schedule!r}, placement={inj.placements!r}, "
            f"eval_noise={self.eval_noise}, device={self.root_device})"
        )
