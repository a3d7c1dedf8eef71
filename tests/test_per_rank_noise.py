"""Photonic draws differ per DDP rank by default; PerRankNoise adds dropout's and exact resume; one model throughout."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.callbacks.per_rank_noise import PerRankNoise
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import MLP
from lightning_relief.photonic import PhotonicNetwork
from rank_record import PrivateTensors, RankRecord, assert_resume_exact, file_system_sharing, load_rank_record


class NoiseRecord(RankRecord):
    """The noisy output on a fixed probe (train mode: the photonic layers and dropout sample this batch's draw)."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__(out_dir, tag, (4, 1, 8, 8))

    def row(self, trainer, pl_module):
        first = pl_module(self.probe.to(pl_module.device))
        return {"first": float(first[0, 0]), "sum": float(first.sum())}


def _module(dropout: float = 0.2) -> ClassifierModule:
    L.seed_everything(0, verbose=False)
    net = PhotonicNetwork(MLP(in_features=64, hidden=(32,), dropout=dropout), bandwidth_ratio=0.05, num_samples=4)
    return ClassifierModule(net, lr=5e-3, scheduler="none")


def _run(tmp_path, tag: str, max_epochs: int, ckpt_path=None, per_rank_noise=True, **trainer_options) -> None:
    module = _module(0.2 if per_rank_noise else 0.0)
    callbacks = [PrivateTensors(), NoiseRecord(str(tmp_path), tag), ModelCheckpoint(dirpath=tmp_path / tag, save_last=True)]
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[PerRankNoise(seed=5), *callbacks] if per_rank_noise else callbacks,
        **trainer_options,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0), ckpt_path=ckpt_path)


def test_resumed_run_draws_the_noise_of_the_straight_run(tmp_path):
    # without the callback the global generator after a resume is not the straight run's, so the draws differ
    _run(tmp_path, "straight", 2)
    _run(tmp_path, "first", 1)
    torch.manual_seed(123)  # whatever the global generator holds at resume, the draws are the batch's own
    _run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert_resume_exact(tmp_path, 0)


def test_seed_is_validated():
    with pytest.raises(ValueError, match="seed must be an int"):
        PerRankNoise(seed=1.5)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_draw_own_noise_keep_one_model_and_resume_exactly(tmp_path):
    # forkserver: the ranks fork from a server that imported torch and Lightning once (spawn took a minute here)
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief.photonic"])
    with file_system_sharing():
        for tag, epochs, ckpt in (("straight", 2, None), ("first", 1, None), ("resumed", 2, "first")):
            path = None if ckpt is None else tmp_path / ckpt / "last.ckpt"
            _run(tmp_path, tag, epochs, ckpt_path=path, strategy=_ddp(), devices=2)
    _assert_own_draws_one_model(tmp_path, "straight")
    for rank in (0, 1):
        assert_resume_exact(tmp_path, rank)


def _ddp() -> DDPStrategy:
    return DDPStrategy(start_method="forkserver", process_group_backend="gloo", timeout=timedelta(seconds=90))


def _assert_own_draws_one_model(tmp_path, tag: str) -> None:
    (rows0, weights0), (rows1, weights1) = load_rank_record(tmp_path, tag, 0), load_rank_record(tmp_path, tag, 1)
    train0, train1 = [r for r in rows0 if "first" in r], [r for r in rows1 if "first" in r]
    assert len(train0) == len(train1) == 6
    assert all(a["first"] != b["first"] for a, b in zip(train0, train1))  # each rank its own draws
    for key, value in weights0.items():  # DDP averaged the gradients of the ranks' draws: one model
        torch.testing.assert_close(weights1[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_ddp_photonic_layers_draw_own_noise_per_rank_without_the_callback(tmp_path):
    # forkserver: the ranks fork from a server that imported torch and Lightning once (spawn re-imports
    # them in every rank; plain fork is unsafe once this process ran threads)
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief.photonic"])
    _run(tmp_path, "plain", 2, per_rank_noise=False, strategy=_ddp(), devices=2)
    _assert_own_draws_one_model(tmp_path, "plain")
