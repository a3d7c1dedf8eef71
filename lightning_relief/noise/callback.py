"""``AnalogNoise``: analog-hardware noise as a Lightning callback, usable with any strategy.

Noise-aware training is a cross-cutting change of the training step, the
kind Lightning ships as callbacks (``StochasticWeightAveraging``,
``ModelPruning``); as a callback it composes with whatever strategy runs the
loop: single device, DDP, ``DeepEnsembleStrategy`` or a user's own.
``AnalogNoiseStrategy`` is the same callback installed by a DDP strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lightning_relief.errors import UnsupportedStrategyError
from lightning_relief.noise.injector import NoiseInjector
from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Schedule

_STAGES = {"validate": 0, "test": 1, "predict": 2}
# strategies that shard parameters: a layer's ``weight`` is a flat shard (or a DTensor) outside its
# forward, so weights perturbed before the forward pass would miss (or corrupt) the gathered copy
_SHARDING = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # batches without a tensor: one level for all
        return 1


class AnalogNoise(Callback):
    """Train (and optionally evaluate) under analog noise, without changing the module.

    For every training batch the schedule gives a level at the *optimizer*
    step (``trainer.global_step``: the micro-batches of an accumulated step
    share it); noise then enters through forward hooks (``"outputs"``,
    ``"activations"``) and through weights perturbed from before the forward
    pass until right after the backward pass, so the optimizer steps the clean
    weights. Draws differ per rank (seeded by ``(seed, rank, batch)``); the
    level, drawn from a generator seeded by ``seed`` alone, is the same on all
    ranks. Validation, test and predict are clean unless ``eval_noise=True``;
    then each evaluation batch draws from ``(seed, rank, global step, batch)``,
    so a resumed run logs exactly the metrics of a straight one. The schedule
    state (batch count, its RNG, random-walk σ, last level) is in the
    callback's checkpoint state.

    Args:
        noise: ``AdditiveGaussian``, ``MultiplicativeGaussian``,
            ``CombinedGaussian``, ``WeightNoise`` or ``PCMNoise``.
        schedule: the level per optimizer step (a ``Schedule`` or a number).
            Default: σ = 0.1 (Gaussian), scale 1.0 (``WeightNoise``);
            ``PCMNoise`` needs a time schedule such as ``DeploymentTime()``.
        placement: a ``Placement``, a site name (``"weights"``, ``"outputs"``,
            ``"activations"``) or a list of them; default: the noise model's
            sites. A placement that selects no layer, or covers a layer noise
            cannot reach (GRU, attention), is an error at setup; so is weight
            noise under a strategy that shards weights (FSDP, DeepSpeed).
        eval_noise: inject noise in validation/test/predict too.
        eval_level: the level used there (default: mean of the last training level).
        seed: seeds the schedule and noise generators.
        log_level: log ``noise_sigma`` (``noise_time_s`` for drift models) every step.
        draws: where training noise comes from: ``"fresh"`` Gaussians every
            step, or ``"pool"``: slices at random offsets of a pool of Gaussians
            redrawn over 64 steps (:mod:`lightning_relief.noise.pool`; drawing is
            the largest cost of a noisy step on a CPU). ``"auto"`` (default):
            the pool on CPU, fresh draws on accelerators. Evaluation noise is always fresh.

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> from lightning_relief.noise import AdditiveGaussian, AnalogNoise, LinearWarmup
        >>> noise = AnalogNoise(AdditiveGaussian(), LinearWarmup(0.3, warmup_steps=4), placement=["outputs", "activations"])
        >>> trainer = L.Trainer(callbacks=[noise], accelerator="cpu", max_steps=6, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassifierModule(LeNet5(input_size=8)), DigitsDataModule())
        >>> round(trainer.callback_metrics["noise_sigma"].item(), 2)
        0.3
    """

    def __init__(
        self,
        noise: NoiseModel,
        schedule: Schedule | float | None = None,
        placement: Placement | str | Sequence[Placement | str] | None = None,
        eval_noise: bool = False,
        eval_level: float | None = None,
        seed: int = 0,
        log_level: bool = True,
        draws: str = "auto",
    ) -> None:
        self.injector = NoiseInjector(noise, schedule, placement, seed=seed, draws=draws)
        if eval_level is not None and not float(eval_level) >= 0:
            raise ValueError(f"eval_level must be >= 0 or None, got {eval_level}")
        if noise.level_kind == "time" and eval_level is not None and not float(eval_level) > 0:
            raise ValueError(f"eval_level: a drift time must be > 0 seconds, got {eval_level}")
        self.eval_noise = bool(eval_noise)
        self.eval_level = None if eval_level is None else float(eval_level)
        self.log_level = bool(log_level)
        self.log_name = "noise_time_s" if noise.level_kind == "time" else "noise_sigma"

    @property
    @override
    def state_key(self) -> str:
        inj = self.injector
        return self._generate_state_key(noise=repr(inj.noise), placement=repr(inj.placements), seed=inj.seed)

    # -- lifecycle
    def check_strategy(self, strategy: Strategy) -> None:
        """Raise :class:`~lightning_relief.errors.UnsupportedStrategyError` for weight noise under a
        strategy that shards parameters (FSDP, ``ModelParallelStrategy``, DeepSpeed)."""
        if isinstance(strategy, _SHARDING) and any(p.site == "weights" for p in self.injector.placements):
            raise UnsupportedStrategyError(
                type(self).__name__,
                strategy,
                "weight noise needs each layer's full weight between steps, and this strategy keeps flat shards; "
                "use placement 'outputs'/'activations' here, or DDP (AnalogNoiseStrategy) for weight noise",
            )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_strategy(trainer.strategy)
        self.injector.attach(pl_module, rank=trainer.global_rank, plugin=type(self).__name__)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.injector.detach()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.injector.end()

    # -- training
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        batch_size = _batch_size(batch)
        level = self.injector.begin_training_step(batch_size, step=trainer.global_step)
        if self.log_level:
            pl_module.log(self.log_name, level.float().mean(), on_step=True, on_epoch=False, batch_size=batch_size)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.injector.restore_weights()  # the optimizer must step the clean weights

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.injector.restore_weights()  # a backward outside the strategy (manual closures) skipped the hook

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.injector.end()  # also restores after a skipped step (no backward)

    # -- evaluation
    def _begin_eval(self, trainer: L.Trainer, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        self.injector.end()
        if self.eval_noise:
            key = ((trainer.global_step * 64 + dataloader_idx) * 2**24 + batch_idx) * 4 + _STAGES[stage]
            self.injector.begin_eval_step(key, self.eval_level)

    def _end_eval(self) -> None:
        if self.eval_noise:
            self.injector.end()

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin_eval(trainer, "validate", batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end_eval()

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin_eval(trainer, "test", batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end_eval()

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin_eval(trainer, "predict", batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end_eval()

    # -- checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.injector.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.injector.load_state_dict(state_dict)

    def __repr__(self) -> str:
        inj = self.injector
        return (
            f"{type(self).__name__}(noise={inj.noise!r}, schedule={inj.schedule!r}, placement={inj.placements!r}, "
            f"eval_noise={self.eval_noise}, seed={inj.seed}, draws={inj.draws!r})"
        )
