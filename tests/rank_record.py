"""What the 2-rank DDP tests record per rank (noise fingerprints, val_nll, final weights) and how they compare runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_relief.strategies._private_tensors import privatize_shared_tensors


class RankRecord(Callback):
    """Per training batch the row of :meth:`row` (noise is armed then), per validation epoch ``val_nll``; at the
    end each rank writes its rows and weights to ``{out_dir}/{tag}_rank{rank}.json/.pt``."""

    def __init__(self, out_dir: str, tag: str, probe_shape: tuple[int, ...]) -> None:
        self.out_dir, self.tag = out_dir, tag
        self.rows: list[dict[str, float]] = []
        self.probe = torch.randn(probe_shape, generator=torch.Generator().manual_seed(1))

    def row(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        raise NotImplementedError

    def on_before_backward(self, trainer, pl_module, loss):
        with torch.no_grad():
            self.rows.append({"step": trainer.global_step, **self.row(trainer, pl_module)})

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({"step": trainer.global_step, "val_nll": float(trainer.callback_metrics["val_nll"])})

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), f"{self.out_dir}/{self.tag}_rank{rank}.pt")
        with open(f"{self.out_dir}/{self.tag}_rank{rank}.json", "w") as f:
            json.dump(self.rows, f)


class PrivateTensors(Callback):
    """For 2-rank runs on Lightning's own ``DDPStrategy`` under ``forkserver``: each rank copies its tensors out of
    shared memory (see :func:`privatize_shared_tensors`; our strategies do this themselves). ``setup`` runs in each
    rank before the strategy wraps the module and builds the optimizers."""

    def setup(self, trainer, pl_module, stage):
        privatize_shared_tensors(pl_module)


def load_rank_record(tmp_path: Path, tag: str, rank: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    rows = json.loads((tmp_path / f"{tag}_rank{rank}.json").read_text())
    return rows, torch.load(tmp_path / f"{tag}_rank{rank}.pt")


def assert_resume_exact(tmp_path: Path, rank: int) -> None:
    """The runs tagged first + resumed recorded exactly what the straight run did, and end on its weights."""
    straight_rows, straight_weights = load_rank_record(tmp_path, "straight", rank)
    first_rows, _ = load_rank_record(tmp_path, "first", rank)
    resumed_rows, resumed_weights = load_rank_record(tmp_path, "resumed", rank)
    assert straight_rows[: len(first_rows)] == first_rows
    assert resumed_rows == straight_rows[len(first_rows) :]  # noise draws and noisy val_nll, exactly
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")


@contextmanager
def file_system_sharing() -> Iterator[None]:
    """The spawn launcher hands the module's tensors over in shared memory; this sandbox's /dev/shm is too small."""
    sharing = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)
