"""Fit a temperature on the validation set when training ends, and apply it to the module."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.temperature import (
    NotIdentifiableError,
    _install,
    apply_temperature,
    fit_temperature,
    temperature_of,
)


class TemperatureScaling(Callback):
    """Post-hoc temperature scaling of the trained module, fitted on its validation data.

    When ``fit`` ends (``on_train_end``, before export callbacks run in ``on_fit_end``)
    the module runs once over the validation dataloader(s) in eval mode; its outputs
    ``z`` (logits, or the log-probabilities a ``DeepEnsembleStrategy`` mixture returns)
    and the labels give the temperature ``T`` minimising the NLL of ``softmax(z / T)``
    (:func:`~lightning_relief.uncertainty.temperature.fit_temperature`). The module's
    forward then returns ``z / T`` (:func:`~lightning_relief.uncertainty.temperature.apply_temperature`):
    predictions, later ``validate``/``test`` metrics, a checkpoint saved afterwards
    (``load_from_checkpoint`` restores ``T``) and the TVM export all use it.

    When every validation sample is classified correctly no temperature minimises the NLL
    (it keeps falling as ``T -> 0``): the module is then left unscaled, with a warning.

    Under DDP every rank's outputs are gathered first, so all ranks fit the same ``T``.
    ``temperature``, ``ece_before``, ``ece_after``, ``nll_before``, ``nll_after`` are
    kept in the callback's state (and checkpoint) and sent to the trainer's loggers as
    ``{prefix}temperature``, ``{prefix}ece_before``...

    Args:
        n_bins: bins of the reported ECE.
        max_iter: L-BFGS iterations of the fit.
        prefix: prefix of the logged names.

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> from lightning_relief.callbacks.temperature_scaling import TemperatureScaling
        >>> scaling = TemperatureScaling()
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, callbacks=[scaling])
        >>> module = ClassifierModule(LeNet5(input_size=8))
        >>> trainer.fit(module, DigitsDataModule())
        >>> scaling.temperature > 0 and scaling.ece_after <= scaling.ece_before + 0.05
        True
    """

    def __init__(self, n_bins: int = 15, max_iter: int = 200, prefix: str = "calibration_") -> None:
        super().__init__()
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        self.n_bins = n_bins
        self.max_iter = max_iter
        self.prefix = prefix
        self.temperature: float | None = None
        self.ece_before = self.ece_after = self.nll_before = self.nll_after = float("nan")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logits, target = self._collect(trainer, pl_module)
        try:
            temperature = fit_temperature(logits, target, self.max_iter)
        except NotIdentifiableError as err:
            # the run itself succeeded: leave the module unscaled rather than fail at its end
            rank_zero_warn(f"TemperatureScaling: the module is left unscaled (temperature None): {err}")
            return
        probs_before = logits.double().softmax(-1)
        probs_after = (logits.double() / temperature.double()).softmax(-1)
        self.temperature = float(temperature)
        self.ece_before = float(U.expected_calibration_error(probs_before, target, self.n_bins))
        self.ece_after = float(U.expected_calibration_error(probs_after, target, self.n_bins))
        self.nll_before = float(U.negative_log_likelihood(probs_before, target))
        self.nll_after = float(U.negative_log_likelihood(probs_after, target))
        apply_temperature(pl_module, self.temperature)
        metrics = {f"{self.prefix}{k}": v for k, v in self.metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"TemperatureScaling: T={self.temperature:.4f}, validation ECE {self.ece_before:.4f} -> {self.ece_after:.4f}, "
            f"NLL {self.nll_before:.4f} -> {self.nll_after:.4f}"
        )

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "temperature": float("nan") if self.temperature is None else self.temperature,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
        }

    @torch.no_grad()
    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loaders = trainer.datamodule.val_dataloader()
        if loaders is None:
            raise ValueError("TemperatureScaling needs validation data: give fit a val dataloader or a datamodule with one")
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        previous = temperature_of(pl_module)
        if previous is not None:
            _install(pl_module, 1.0)  # fit on the raw outputs, not on those of an earlier temperature
        was_training = pl_module.training
        pl_module.eval()
        outputs, targets = [], []
        try:
            for loader in loaders:
                for batch in loader:
                    x, y = batch[0], batch[1]
                    outputs.append(pl_module(x.to(pl_module.device)).float())
                    targets.append(y.to(pl_module.device))
        finally:
            pl_module.train(was_training)
            if previous is not None:
                _install(pl_module, previous)
        if not outputs:
            raise ValueError("TemperatureScaling found no validation batches")
        logits, target = torch.cat(outputs), torch.cat(targets)
        if trainer.world_size > 1:
            # every rank fits on all ranks' outputs (a DistributedSampler gives each the same count)
            logits = trainer.strategy.all_gather(logits).flatten(0, 1)
            target = trainer.strategy.all_gather(target).flatten(0, 1)
        return logits.cpu(), target.cpu()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "max_iter": self.max_iter, "prefix": self.prefix, **self.metrics}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        temperature = state_dict.get("temperature")
        self.temperature = None if temperature is None or temperature != temperature else float(temperature)
        for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
            setattr(self, key, float(state_dict.get(key, float("nan"))))
