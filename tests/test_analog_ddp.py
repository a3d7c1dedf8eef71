"""AnalogNoiseStrategy on 2 CPU ranks (gloo): own noise per rank, one level, one set of weights, exact resume."""

from __future__ import annotations

import json
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import quiet_trainer
from lightning_relief import AnalogNoiseStrategy, ClassifierModule
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5
from lightning_relief.noise import AdditiveGaussian, LinearWarmup, PerSampleVariance, SequentialSchedule


class RankRecord(Callback):
    """Per rank and batch: the level, a fingerprint of the noise drawn; at the end: weights and metrics."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag
        self.rows: list[dict[str, float]] = []
        self.probe = torch.randn((32, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    def on_before_backward(self, trainer, pl_module, loss):
        with torch.no_grad():  # noise is armed for this batch (per-sample σ: probe one batch size)
            fingerprint = float(pl_module(self.probe.to(pl_module.device)).sum())
        level = trainer.strategy.injector.current_level
        self.rows.append({"step": trainer.global_step, "level": float(level.float().mean()), "noise": fingerprint})

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({"step": trainer.global_step, "val_nll": float(trainer.callback_metrics["val_nll"])})

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), f"{self.out_dir}/{self.tag}_rank{rank}.pt")
        with open(f"{self.out_dir}/{self.tag}_rank{rank}.json", "w") as f:
            json.dump(self.rows, f)


def _run(tmp_path, tag: str, max_epochs: int, ckpt_path=None) -> None:
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), lr=5e-3, scheduler="none")
    schedule = SequentialSchedule([LinearWarmup(0.3, warmup_steps=4), PerSampleVariance(0.3, theta=0.2)], milestones=[4])
    strategy = AnalogNoiseStrategy(
        AdditiveGaussian(), schedule, placement=["outputs", "activations"], eval_noise=True, seed=3,
        start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=90),
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
        callbacks=[RankRecord(str(tmp_path), tag), ModelCheckpoint(dirpath=tmp_path / tag, save_last=True)],
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0), ckpt_path=ckpt_path)


def _load(tmp_path, tag: str, rank: int):
    rows = json.loads((tmp_path / f"{tag}_rank{rank}.json").read_text())
    return rows, torch.load(tmp_path / f"{tag}_rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_share_level_and_weights_draw_own_noise_and_resume_exactly(tmp_path):
    # the spawn launcher hands the module's tensors over in shared memory; this sandbox's /dev/shm is too small
    sharing = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        _run(tmp_path, "straight", 2)
        _run(tmp_path, "first", 1)
        _run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)

    (rows0, weights0), (rows1, weights1) = _load(tmp_path, "straight", 0), _load(tmp_path, "straight", 1)
    train0 = [r for r in rows0 if "level" in r]
    train1 = [r for r in rows1 if "level" in r]
    assert len(train0) == len(train1) == 8
    assert [r["level"] for r in train0] == [r["level"] for r in train1]  # one level on every rank
    noisy = [(a, b) for a, b in zip(train0, train1) if a["level"] > 0]  # the warm-up starts at σ = 0
    assert len(noisy) == 7 and all(a["noise"] != b["noise"] for a, b in noisy)  # each rank its own draws
    for key, value in weights0.items():  # DDP averaged gradients of the noisy forwards: one model
        torch.testing.assert_close(weights1[key], value, rtol=0, atol=0, msg=key)

    for rank in (0, 1):
        straight_rows, straight_weights = _load(tmp_path, "straight", rank)
        first_rows, _ = _load(tmp_path, "first", rank)
        resumed_rows, resumed_weights = _load(tmp_path, "resumed", rank)
        assert straight_rows[: len(first_rows)] == first_rows
        assert resumed_rows == straight_rows[len(first_rows) :]  # levels, noise draws and noisy val_nll, exactly
        for key, value in straight_weights.items():
            torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
