"""AnalogNoiseStrategy on 2 CPU ranks (gloo): own noise per rank, one level, one set of weights, exact resume."""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from lightning_relief import AnalogNoiseStrategy, ClassifierModule
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5
from lightning_relief.noise import AdditiveGaussian, LinearWarmup, PerSampleVariance, SequentialSchedule
from rank_record import RankRecord, file_system_sharing, load_rank_record


class LevelRecord(RankRecord):
    """The level and a fingerprint of the noise drawn (per-sample σ: the probe is one batch)."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__(out_dir, tag, (32, 1, 8, 8))

    def row(self, trainer, pl_module):
        fingerprint = float(pl_module(self.probe.to(pl_module.device)).sum())
        return {"level": float(trainer.strategy.injector.current_level.float().mean()), "noise": fingerprint}


def _run(tmp_path, tag: str, max_epochs: int, ckpt_path=None) -> None:
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), lr=5e-3, scheduler="none")
    schedule = SequentialSchedule([LinearWarmup(0.3, warmup_steps=4), PerSampleVariance(0.3, theta=0.2)], milestones=[4])
    strategy = AnalogNoiseStrategy(
        AdditiveGaussian(),
        schedule,
        placement=["outputs", "activations"],
        eval_noise=True,
        seed=3,
        start_method="spawn",
        process_group_backend="gloo",
        timeout=timedelta(seconds=90),
    )
    trainer = quiet_trainer(
        strategy=strategy,
        devices=2,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[LevelRecord(str(tmp_path), tag), ModelCheckpoint(dirpath=tmp_path / tag, save_top_k=-1)],  # every epoch
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0), ckpt_path=ckpt_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_share_level_and_weights_draw_own_noise_and_resume_exactly(tmp_path):
    with file_system_sharing():  # two 2-rank launches (each rank imports everything anew: most of the time)
        _run(tmp_path, "straight", 2)
        _run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "straight" / "epoch=0-step=4.ckpt")

    (rows0, weights0), (rows1, weights1) = load_rank_record(tmp_path, "straight", 0), load_rank_record(tmp_path, "straight", 1)
    train0 = [r for r in rows0 if "level" in r]
    train1 = [r for r in rows1 if "level" in r]
    assert len(train0) == len(train1) == 8
    assert [r["level"] for r in train0] == [r["level"] for r in train1]  # one level on every rank
    noisy = [(a, b) for a, b in zip(train0, train1) if a["level"] > 0]  # the warm-up starts at σ = 0
    assert len(noisy) == 7 and all(a["noise"] != b["noise"] for a, b in noisy)  # each rank its own draws
    for key, value in weights0.items():  # DDP averaged gradients of the noisy forwards: one model
        torch.testing.assert_close(weights1[key], value, rtol=0, atol=0, msg=key)

    for rank in (0, 1):  # resumed after the first epoch: the straight run's levels, draws, noisy val_nll and weights
        (straight, straight_weights), (resumed, resumed_weights) = (
            load_rank_record(tmp_path, tag, rank) for tag in ("straight", "resumed")
        )
        first_epoch = next(i for i, row in enumerate(straight) if "val_nll" in row) + 1
        assert resumed == straight[first_epoch:]
        for key, value in straight_weights.items():
            torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
