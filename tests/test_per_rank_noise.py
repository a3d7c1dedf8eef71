"""PerRankNoise: photonic (and dropout) draws differ per DDP rank, the weights stay one model, resume is exact."""

from __future__ import annotations

import json
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.callbacks.per_rank_noise import PerRankNoise
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import MLP
from lightning_relief.photonic import PhotonicNetwork


class NoiseRecord(Callback):
    """Per training batch: the noisy output on a fixed probe (the draw of this batch); at the end: weights."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag
        self.rows: list[dict[str, float]] = []
        self.probe = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    def on_before_backward(self, trainer, pl_module, loss):
        with torch.no_grad():  # train mode: the photonic layers and dropout sample
            first = pl_module(self.probe.to(pl_module.device))
        self.rows.append({"step": trainer.global_step, "first": float(first[0, 0]), "sum": float(first.sum())})

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({"step": trainer.global_step, "val_nll": float(trainer.callback_metrics["val_nll"])})

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), f"{self.out_dir}/{self.tag}_rank{rank}.pt")
        with open(f"{self.out_dir}/{self.tag}_rank{rank}.json", "w") as f:
            json.dump(self.rows, f)


def _module() -> ClassifierModule:
    L.seed_everything(0, verbose=False)
    net = PhotonicNetwork(MLP(in_features=64, hidden=(32,), dropout=0.2), bandwidth_ratio=0.05, num_samples=4)
    return ClassifierModule(net, lr=5e-3, scheduler="none")


def _run(tmp_path, tag: str, max_epochs: int, ckpt_path=None, **trainer_options) -> None:
    module = _module()
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[PerRankNoise(seed=5), NoiseRecord(str(tmp_path), tag), ModelCheckpoint(dirpath=tmp_path / tag, save_last=True)],
        **trainer_options,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0), ckpt_path=ckpt_path)


def _load(tmp_path, tag: str, rank: int):
    rows = json.loads((tmp_path / f"{tag}_rank{rank}.json").read_text())
    return rows, torch.load(tmp_path / f"{tag}_rank{rank}.pt")


def _assert_resume_exact(tmp_path, rank: int) -> None:
    straight_rows, straight_weights = _load(tmp_path, "straight", rank)
    first_rows, _ = _load(tmp_path, "first", rank)
    resumed_rows, resumed_weights = _load(tmp_path, "resumed", rank)
    assert straight_rows[: len(first_rows)] == first_rows
    assert resumed_rows == straight_rows[len(first_rows) :]  # noise draws and sampled val_nll, exactly
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")


def test_resumed_run_draws_the_noise_of_the_straight_run(tmp_path):
    # without the callback the global generator after a resume is not the straight run's, so the draws differ
    _run(tmp_path, "straight", 2)
    _run(tmp_path, "first", 1)
    torch.manual_seed(123)  # whatever the global generator holds at resume, the draws are the batch's own
    _run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    _assert_resume_exact(tmp_path, 0)


def test_seed_is_validated():
    with pytest.raises(ValueError, match="seed must be an int"):
        PerRankNoise(seed=1.5)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_draw_own_noise_keep_one_model_and_resume_exactly(tmp_path):
    # the spawn launcher hands the module's tensors over in shared memory; this sandbox's /dev/shm is too small
    sharing = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    ddp = dict(devices=2)
    try:
        for tag, epochs, ckpt in (("straight", 2, None), ("first", 1, None), ("resumed", 2, "first")):
            strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=90))
            path = None if ckpt is None else tmp_path / ckpt / "last.ckpt"
            _run(tmp_path, tag, epochs, ckpt_path=path, strategy=strategy, **ddp)
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)

    (rows0, weights0), (rows1, weights1) = _load(tmp_path, "straight", 0), _load(tmp_path, "straight", 1)
    train0, train1 = [r for r in rows0 if "first" in r], [r for r in rows1 if "first" in r]
    assert len(train0) == len(train1) == 6
    assert all(a["first"] != b["first"] for a, b in zip(train0, train1))  # each rank its own draws
    for key, value in weights0.items():  # DDP averaged the gradients of the ranks' draws: one model
        torch.testing.assert_close(weights1[key], value, rtol=0, atol=0, msg=key)
    for rank in (0, 1):
        _assert_resume_exact(tmp_path, rank)
