"""One rank of a torchrun-style launch (see test_ensemble_distributed.py): writes the gathered ensemble."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5


class _Members(Callback):
    def on_train_start(self, trainer, pl_module):
        local = torch.tensor(trainer.strategy.local_members)
        gathered = trainer.strategy.all_gather(local)
        self.members = gathered.tolist()


def main(out: Path) -> None:
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, size=8, seed=0)
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), optimizer="sgd", lr=0.05, scheduler="none")
    members = _Members()
    trainer = quiet_trainer(
        devices=1,
        num_nodes=2,
        max_steps=3,
        limit_val_batches=0,
        callbacks=[members],
        strategy=DeepEnsembleStrategy(num_members=4, mode="distributed", timeout=timedelta(seconds=90)),
    )
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save({"state_dict": state, "members_per_rank": members.members}, out / "rank0.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
