"""Our data-parallel strategies give each rank its own weights under fork-style launchers.

Lightning's multiprocessing launcher leaves the module's tensors in shared memory for ``forkserver``; a rank that
kept them would step the other rank's weights too (analog noise is even written into them in place)."""

from __future__ import annotations

import json
import multiprocessing
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer
from lightning_relief import AnalogNoiseStrategy, ClassifierModule, DeepEnsembleStrategy
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5
from lightning_relief.noise import AdditiveGaussian
from rank_record import file_system_sharing


class SharedRecord(Callback):
    """Each rank writes whether any of its tensors is still shared when training starts, and its final weights."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.shared: list[str] = []

    def on_train_start(self, trainer, pl_module):
        self.shared = [name for name, t in [*pl_module.named_parameters(), *pl_module.named_buffers()] if t.is_shared()]

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), f"{self.out}_rank{rank}.pt")
        with open(f"{self.out}_rank{rank}.json", "w") as f:
            json.dump(self.shared, f)


def _fit(strategy, out: str) -> None:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        strategy=strategy,
        devices=2,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[SharedRecord(out)],
    )
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), lr=5e-3, scheduler="none")
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["analog", "ensemble"])
def test_forkserver_ranks_step_their_own_weights_and_identical_runs_agree_bit_for_bit(tmp_path, kind):
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief"])

    def strategy():
        common = {"start_method": "forkserver", "process_group_backend": "gloo", "timeout": timedelta(seconds=90)}
        if kind == "analog":
            return AnalogNoiseStrategy(AdditiveGaussian(), 0.1, placement="outputs", seed=3, **common)
        return DeepEnsembleStrategy(num_members=2, mode="distributed", **common)

    with file_system_sharing():
        for tag in ("a", "b"):
            _fit(strategy(), str(tmp_path / tag))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"a_rank{rank}.json").read_text()) == []
        first, again = (torch.load(tmp_path / f"{tag}_rank{rank}.pt") for tag in ("a", "b"))
        for key, value in first.items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
