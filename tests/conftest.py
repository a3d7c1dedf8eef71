"""Shared fixtures. Tests run with 2 xdist workers on 2 cores: one torch thread each."""

from __future__ import annotations

import os

os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import lightning as L
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    L.seed_everything(0, workers=True, verbose=False)
    return 0


@pytest.fixture
def digits():
    """The embedded digits at 8 px, set up."""
    from lightning_relief.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, size=8, seed=0)
    dm.setup()
    return dm


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, progress bar or summary (kwargs override)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def trainer_factory():
    return quiet_trainer
