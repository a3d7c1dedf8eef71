"""Run by tests/test_compress_engine.py: compress inside a 2-rank CPU DDP fit (gloo).

Lightning's DDP launcher starts rank 1 by running this script again. Each rank
writes what it ended with (policy, shapes, a weight checksum) to ``out/rank<r>.json``;
rank 0 saves the final checkpoint to ``out/last.ckpt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_relief import ClassifierModule, SensitivityPruningCallback
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2, scheduler="none")
    cb = SensitivityPruningCallback(
        target=0.5,
        metric="macs",
        methods=("prune",),
        start_epoch=1,
        calibration_batches=2,
        prune_ratios=(0.25, 0.5, 0.75),
        candidates=2,
        recovery_steps=5,
        verbose=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, size=8, seed=0))
    rank = trainer.global_rank
    state = {k: v.detach().double().sum().item() for k, v in module.state_dict().items() if v.is_floating_point()}
    optimizer_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "policy": cb.policy.to_dict(),
                "shapes": {k: list(v.shape) for k, v in module.state_dict().items()},
                "checksums": state,
                "optimizer_holds_model": optimizer_ids == {id(p) for p in module.parameters()},
                "steps": trainer.global_step,
            }
        )
    )
    trainer.save_checkpoint(out / "last.ckpt")  # every rank must call it; rank 0 writes


if __name__ == "__main__":
    main(Path(sys.argv[1]))
