"""ClassifierModule's epoch ``train_acc`` against torchmetrics over the same predictions, in one process and summed over DDP ranks."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.models import MLP


class LogitsRecord(L.Callback):
    """The training logits and targets of the last epoch, as ``training_step`` saw them."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(lambda _m, _i, out: self.logits.append(out.detach().clone()))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.targets.append(batch[1].clone())


def _data(rows: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(rows, 16, generator=g), torch.randint(0, 4, (rows,), generator=g))


def _module() -> ClassifierModule:
    L.seed_everything(0, verbose=False)
    return ClassifierModule(
        MLP(in_features=16, hidden=(8,), num_classes=4, dropout=0.3), num_classes=4, lr=0.05, scheduler="none"
    )


def _reference(record: LogitsRecord) -> torch.Tensor:
    metric = MulticlassAccuracy(4, average="micro")
    metric.update(torch.cat(record.logits), torch.cat(record.targets))
    return metric.compute()


def test_epoch_train_acc_equals_torchmetrics_over_the_epochs_predictions():
    record = LogitsRecord()
    trainer = quiet_trainer(max_epochs=2, callbacks=[record], limit_val_batches=0)
    # 50 rows in batches of 16: the last batch is short, so a mean of batch accuracies would differ
    trainer.fit(_module(), DataLoader(_data(50, 1), batch_size=16))
    assert len(record.targets) == 4
    assert trainer.callback_metrics["train_acc"].item() == _reference(record).item()


class RankData(L.LightningDataModule):
    """Batches of 12 rows on rank 0 and 4 on rank 1, 3 steps each: the accuracy of all rows is not the ranks' mean."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        batch = 12 if rank == 0 else 4
        return DataLoader(_data(3 * batch, 10 + rank), batch_size=batch)


class SaveRank(LogitsRecord):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "acc": trainer.callback_metrics["train_acc"],
            "logits": torch.cat(self.logits),
            "targets": torch.cat(self.targets),
        }
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_train_acc_is_the_accuracy_of_all_ranks_rows(tmp_path):
    # forkserver: the ranks fork from a server that imported torch and Lightning once
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief"])
    trainer = quiet_trainer(
        devices=2,
        strategy=DDPStrategy(start_method="forkserver", process_group_backend="gloo", timeout=timedelta(seconds=90)),
        max_epochs=2,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[SaveRank(str(tmp_path))],
    )
    trainer.fit(_module(), RankData())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    metric = MulticlassAccuracy(4, average="micro")
    for rank in ranks:
        metric.update(rank["logits"], rank["targets"])
    assert [len(r["targets"]) for r in ranks] == [36, 12]
    for rank in ranks:
        assert rank["acc"].item() == metric.compute().item()
