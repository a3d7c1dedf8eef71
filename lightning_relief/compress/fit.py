"""What a structural change inside ``Trainer.fit`` must rebuild, and the batches it plans on.

The engine (:mod:`lightning_relief.compress.engine`) needs no Trainer; these helpers are the
Trainer side of :class:`~lightning_relief.callbacks.sensitivity_pruning.SensitivityPruningCallback`.
After channels are removed and layers swapped for quantized ones, the DDP wrapper, the optimizers
and LR schedulers still hold the old tensors, and monitored checkpoints rank epochs of a model that
no longer exists.

>>> import torch
>>> batches = take_batches([(torch.zeros(2, 3), torch.zeros(2)), {"x": torch.ones(2, 3), "y": torch.ones(2)}], None,
...                        torch.device("cpu"))
>>> [b[0].sum().item() for b in batches]
[0.0, 6.0]
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_relief.compress.quantize import exempt_quantizers_from_weight_decay


def take_batches(loader: Any, count: int | None, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` (all for ``None``) ``(x, y)`` pairs of ``loader``'s batches, on ``device``."""
    batches = []
    for batch in loader:
        if isinstance(batch, dict):
            batch = tuple(batch.values())
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("SensitivityPruningCallback expects batches (x, y, ...)")
        batches.append((batch[0].to(device), batch[1].to(device)))
        if count is not None and len(batches) >= count:
            break
    return batches


def fit_batches(
    trainer: L.Trainer, device: torch.device, calibration: int, train: int, validation: int | None
) -> tuple[list, list, list, str]:
    """Calibration and recovery batches from the training data, and validation batches for scoring
    (the calibration batches when there is no validation data, as the last item says)."""
    if trainer.train_dataloader is None:
        raise RuntimeError("SensitivityPruningCallback needs the training dataloader for calibration")
    train_batches = take_batches(trainer.train_dataloader, max(calibration, train), device)
    loader = None
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        try:
            loader = datamodule.val_dataloader()
        except Exception:  # a datamodule without validation data
            loader = None
    if loader is None:
        loader = trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    calibration_batches = train_batches[:calibration]
    if loader is None:
        return calibration_batches, calibration_batches, train_batches, "calibration"
    return calibration_batches, take_batches(loader, validation, device), train_batches, "validation"


def rebuild_training(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """After ``pl_module`` changed structure: wrap it in DDP anew, build optimizers and schedulers for
    its new tensors (schedules carried on where they were), and restart checkpoint ranking."""
    _rebuild_ddp(trainer, pl_module)
    trainer.strategy.setup_optimizers(trainer)
    exempt_quantizers(trainer, pl_module)
    _resume_schedules(trainer)
    _forget_uncompressed_best(trainer)


def exempt_quantizers(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """No weight decay on learned quantizer scales (see :func:`exempt_quantizers_from_weight_decay`)."""
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    for optimizer in trainer.optimizers:
        exempt_quantizers_from_weight_decay(optimizer, pl_module, schedulers)


def _rebuild_ddp(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """A DDP wrapper registered the old parameters with its reducer: wrap the compressed module anew
    (which also broadcasts rank 0's weights and buffers, so every rank starts fine-tuning identical)."""
    from torch.nn.parallel import DistributedDataParallel

    strategy: Any = trainer.strategy  # DDP's or a subclass's: the private hooks are Lightning's own
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy._setup_model(pl_module)
        strategy._register_ddp_hooks()


def _resume_schedules(trainer: L.Trainer) -> None:
    """New schedulers start at step 0; advance them to where the old ones were, so the learning rate
    carries on along the user's schedule instead of jumping back to its start for the fine-tuning."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, ReduceLROnPlateau):
            continue  # driven by a monitored metric, not by a step count
        done = trainer.current_epoch if config.interval == "epoch" else trainer.global_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            for _ in range(done // max(config.frequency, 1)):
                config.scheduler.step()


def _forget_uncompressed_best(trainer: L.Trainer) -> None:
    """Monitored checkpoints from before compression cannot load into the compressed model (and would
    win on accuracy): restart the ranking so ``ckpt_path="best"`` means the best compressed epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for ckpt in trainer.checkpoint_callbacks:
        if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor is not None:
            ckpt.best_k_models = {}
            ckpt.kth_best_model_path = ""
            ckpt.best_model_path = ""
            ckpt.best_model_score = None
            ckpt.kth_value = torch.tensor(torch.inf if ckpt.mode == "min" else -torch.inf)
