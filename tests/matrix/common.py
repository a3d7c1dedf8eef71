"""What the cells share: the zoo model's embedded data, a short real fit, and a Monte-Carlo reference."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from conftest import quiet_trainer
from lightning_relief.data import DigitsDataModule, MNIST1DDataModule
from zoo import ZooModel


@functools.cache
def _datamodule(data: str, input_shape: tuple[int, ...], batch_size: int) -> L.LightningDataModule:
    if data == "mnist1d":
        dm: L.LightningDataModule = MNIST1DDataModule(batch_size=batch_size, length=input_shape[-1])
    else:
        dm = DigitsDataModule(batch_size=batch_size, size=input_shape[-1], channels=input_shape[0])
    dm.setup()
    return dm


def datamodule(zoo_model: ZooModel, batch_size: int = 16) -> L.LightningDataModule:
    """The embedded data set whose inputs fit ``zoo_model`` (set up, shared between cells)."""
    return _datamodule(zoo_model.data, zoo_model.input_shape, batch_size)


def batch(zoo_model: ZooModel, size: int = 8) -> tuple[Tensor, Tensor]:
    """``size`` real validation inputs and labels for ``zoo_model``."""
    x, y = datamodule(zoo_model).dataset("val").tensors
    return x[:size], y[:size]


def fit_briefly(module: L.LightningModule, zoo_model: ZooModel, steps: int = 2, **trainer_kwargs) -> L.Trainer:
    """``steps`` optimizer steps on the zoo model's real data, no validation."""
    options = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    options.update(trainer_kwargs)
    trainer = quiet_trainer(**options)
    trainer.fit(module, datamodule(zoo_model))
    return trainer


def parameters_changed(before: dict[str, Tensor], module: nn.Module) -> list[str]:
    """Names of the floating-point parameters that differ from ``before``."""
    return [name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p.detach())]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def save_and_reload(trainer: L.Trainer, cls: type[L.LightningModule], path: Path, **load_kwargs) -> L.LightningModule:
    """Save ``trainer``'s checkpoint to ``path`` and load it back safely (``weights_only=True``)."""
    trainer.save_checkpoint(path)
    return cls.load_from_checkpoint(path, weights_only=True, **load_kwargs)


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every stochastic op samples: the model in train mode except its norm layers; modes restored after.

    Independent of any converter: module dropout, ``F.dropout(..., self.training)`` and the
    dropout inside attention all sample; batch norm uses its running statistics.
    """
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)
