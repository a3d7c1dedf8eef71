"""Noise injection as a mixin for any Lightning strategy (single device, DDP, ...).

:class:`AnalogNoiseMixin` goes before the strategy class in the bases, e.g.
``class S(AnalogNoiseMixin, DDPStrategy)``, and calls :meth:`_init_noise` in
``__init__``. It

- attaches a :class:`~lightning_relief.noise.injector.NoiseInjector` to the
  LightningModule in ``setup`` and detaches it in ``teardown`` (no hook or
  perturbed weight outlives ``fit``);
- turns noise on for each ``training_step`` only: hooks fire during the
  forward pass, perturbed weights are restored right after ``backward``;
- leaves validation, test and predict clean unless ``eval_noise=True``;
- logs the level of every step (``noise_sigma``, or ``noise_time_s`` for
  drift models) through ``LightningModule.log``;
- saves the schedule state (step count, schedule RNG, random-walk σ, current
  level) in the checkpoint under ``"analog_noise"`` and restores it on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_relief.noise.injector import NoiseInjector
from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Schedule

NOISE_STATE_KEY = "analog_noise"


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # noqa: BLE001 - batches without a tensor: one level for all
        return 1


class AnalogNoiseMixin:
    """Mixin for :class:`lightning.pytorch.strategies.Strategy` subclasses (see module doc)."""

    injector: NoiseInjector

    def _init_noise(
        self,
        noise: NoiseModel,
        schedule: Schedule | float | None,
        placement: Placement | str | Sequence[Placement | str] | None,
        eval_noise: bool,
        eval_level: float | None,
        seed: int,
        log_level: bool,
    ) -> None:
        self.injector = NoiseInjector(noise, schedule, placement, seed=seed)
        if eval_level is not None and not float(eval_level) >= 0:
            raise ValueError(f"eval_level must be >= 0 or None, got {eval_level}")
        self.eval_noise = bool(eval_noise)
        self.eval_level = None if eval_level is None else float(eval_level)
        self.log_level = bool(log_level)
        self.log_name = "noise_time_s" if noise.level_kind == "time" else "noise_sigma"
        self._pending_noise_state: dict[str, Any] | None = None

    # -- lifecycle
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # type: ignore[misc]
        module = self.lightning_module  # type: ignore[attr-defined]
        self.injector.attach(module, rank=self.global_rank, device=self.root_device)  # type: ignore[attr-defined]
        if self._pending_noise_state is not None:
            self.injector.load_state_dict(self._pending_noise_state)
            self._pending_noise_state = None

    def teardown(self) -> None:
        self.injector.detach()
        super().teardown()  # type: ignore[misc]

    def on_exception(self, exception: BaseException) -> None:
        self.injector.end()
        super().on_exception(exception)  # type: ignore[misc]

    def on_validation_start(self) -> None:
        self.injector.end()
        super().on_validation_start()  # type: ignore[misc]

    def on_train_end(self) -> None:
        self.injector.end()
        super().on_train_end()  # type: ignore[misc]

    # -- steps
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        batch_size = _batch_size(batch)
        level = self.injector.begin_training_step(batch_size)
        if self.log_level:
            self.lightning_module.log(  # type: ignore[attr-defined]
                self.log_name, float(level.float().mean()), on_step=True, on_epoch=False, batch_size=batch_size
            )
        try:
            output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self.injector.end()
            raise
        self.injector.deactivate()
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:  # a skipped step has no backward to restore after
            self.injector.restore_weights()
        return output

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.injector.restore_weights()  # the optimizer must step the clean weights

    def _eval_step(self, name: str, *args: Any, **kwargs: Any) -> Any:
        step = getattr(super(), name)
        if not self.eval_noise:
            return step(*args, **kwargs)
        self.injector.begin_eval_step(self.eval_level)
        try:
            return step(*args, **kwargs)
        finally:
            self.injector.end()

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", *args, **kwargs)

    # -- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[NOISE_STATE_KEY] = self.injector.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        state = checkpoint.get(NOISE_STATE_KEY)
        if state is not None:
            if self.injector.attached:
                self.injector.load_state_dict(state)
            else:
                self._pending_noise_state = state
        return checkpoint
