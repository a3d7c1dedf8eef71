"""``AnalogNoiseStrategy``: train with the noise of analog hardware, on one device or data-parallel."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from lightning_relief.noise.callback import AnalogNoise
from lightning_relief.noise.models import AdditiveGaussian, NoiseModel
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Schedule
from lightning_relief.strategies._private_tensors import privatize_shared_tensors

__all__ = ["AnalogNoiseStrategy"]


class AnalogNoiseStrategy(DDPStrategy):
    """Lightning's DDP strategy with the :class:`~lightning_relief.noise.AnalogNoise` callback installed.

    The named entry point of the docs and recipes: it adds the one noise
    implementation, the ``AnalogNoise`` callback (same arguments, see there),
    to the trainer's callbacks. With ``devices=1`` it runs in-process like
    ``SingleDeviceStrategy`` (no launcher, no process group, no DDP wrapper);
    with ``devices=N`` it is Lightning's DDP, each rank drawing its own noise
    at the same level. ``devices=[k]`` picks the device as with any strategy.
    ``strategy="analog_noise"`` (additive Gaussian noise, σ = 0.1, on every
    conv/linear output) is registered in Lightning's ``StrategyRegistry`` once
    :mod:`lightning_relief.strategies` is imported. With another strategy
    (``DeepEnsembleStrategy``, FSDP, your own), pass
    ``callbacks=[AnalogNoise(...)]`` instead (under FSDP and other sharding
    strategies: output and activation noise only, weight noise is a typed error); on MPS too, where Lightning
    refuses every DDP-family strategy (the callback runs there on the MPS device).

    Args:
        noise, schedule, placement, eval_noise, eval_level, seed, log_level, draws:
            as :class:`~lightning_relief.noise.AnalogNoise` (``noise`` default:
            ``AdditiveGaussian()``).
        start_method, process_group_backend, timeout, **ddp_kwargs: DDP's
            arguments, used with several devices.

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
        noise: NoiseModel | None = None,
        schedule: Schedule | float | None = None,
        placement: Placement | str | Sequence[Placement | str] | None = None,
        eval_noise: bool = False,
        eval_level: float | None = None,
        seed: int = 0,
        log_level: bool = True,
        draws: str = "auto",
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        **ddp_kwargs: Any,
    ) -> None:
        self.noise = AnalogNoise(
            AdditiveGaussian() if noise is None else noise, schedule, placement, eval_noise, eval_level, seed, log_level, draws
        )
        super().__init__(start_method=start_method, process_group_backend=process_group_backend, timeout=timeout, **ddp_kwargs)

    @property
    def injector(self):  # the callback's injector, for scripts written against the strategy
        return self.noise.injector

    @property
    def _data_parallel(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    @override
    def _configure_launcher(self) -> None:
        if self._data_parallel:
            super()._configure_launcher()
        else:
            self._launcher = None  # one process: run in place, as SingleDeviceStrategy

    @override
    def setup_environment(self) -> None:
        trainer = self.lightning_module.trainer
        if not any(cb is self.noise for cb in trainer.callbacks):
            trainer.callbacks.append(self.noise)
        if self._data_parallel:
            super().setup_environment()
        else:
            super(DDPStrategy, self).setup_environment()  # no process group for one process

    @override
    def setup(self, trainer: Any) -> None:
        if self._data_parallel:
            # noise is added to the weights in place: ranks stepping one shared copy would corrupt each other
            privatize_shared_tensors(self.lightning_module)
            super().setup(trainer)
        else:
            super(DDPStrategy, self).setup(trainer)  # Strategy.setup: no DDP wrapper, no state broadcast

    @override
    def _setup_model(self, model: Any) -> Any:
        return super()._setup_model(model) if self._data_parallel else model

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="DDP (or one device) with analog noise: AdditiveGaussian, σ = 0.1, on conv/linear outputs",
        )

    def __repr__(self) -> str:
        return f"AnalogNoiseStrategy({self.noise!r}, devices={self.num_processes})"


if AnalogNoiseStrategy.strategy_name not in StrategyRegistry:
    AnalogNoiseStrategy.register_strategies(StrategyRegistry)
