"""Under plain DDP, ClassifierModule gives dropout and Bayesian layers their own draws per rank (PerRankNoise by default)."""

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
from lightning_relief.bayes import make_bayesian
from lightning_relief.callbacks.per_rank_noise import PerRankNoise
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import MLP
from lightning_relief.strategies.deep_ensemble import DeepEnsembleStrategy
from rank_record import PrivateTensors, RankRecord, load_rank_record


def _module(dropout: float = 0.3) -> ClassifierModule:
    L.seed_everything(4, verbose=False)
    return ClassifierModule(MLP(in_features=64, hidden=(32,), dropout=dropout), lr=5e-3, scheduler="none")


def _added(module: ClassifierModule, callbacks=(), **trainer_options) -> list:
    trainer = quiet_trainer(callbacks=list(callbacks), **trainer_options)
    module.trainer = trainer  # configure_callbacks reads the trainer's world size and callbacks, before any launch
    return module.configure_callbacks()


def _ddp(start_method: str = "spawn") -> DDPStrategy:
    return DDPStrategy(start_method=start_method, process_group_backend="gloo", timeout=timedelta(seconds=90))


def test_per_rank_noise_is_added_only_where_ranks_would_draw_alike():
    (added,) = _added(_module(), devices=2, strategy=_ddp())
    assert isinstance(added, PerRankNoise) and added.seed == 4  # the seed_everything seed
    bayes = _module(0.0)
    make_bayesian(bayes)
    assert [type(c) for c in _added(bayes, devices=2, strategy=_ddp())] == [PerRankNoise]
    assert _added(_module(), devices=1) == []  # one process: nothing to decorrelate
    assert _added(_module(0.0), devices=2, strategy=_ddp()) == []  # nothing draws
    assert _added(_module(), [PerRankNoise(seed=9)], devices=2, strategy=_ddp()) == []  # the user's is kept
    assert _added(_module(), devices=2, strategy=DeepEnsembleStrategy(num_members=2, mode="distributed")) == []


class DropoutRecord(RankRecord):
    """The train-mode output on a fixed probe at each step (its dropout mask is this batch's draw), and the
    generator's next draws: a fingerprint of the batch's noise stream that does not depend on the weights."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__(out_dir, tag, (4, 1, 8, 8))

    def row(self, trainer, pl_module):
        out = pl_module(self.probe.to(pl_module.device))
        return {"first": float(out[0, 0]), "stream": torch.rand(2).tolist()}


def _run(tmp_path, tag: str, max_epochs: int, ckpt_path=None) -> None:
    trainer = quiet_trainer(
        devices=2,
        strategy=_ddp("forkserver"),
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[
            PrivateTensors(),
            DropoutRecord(str(tmp_path), tag),
            ModelCheckpoint(dirpath=tmp_path / tag, save_last=True),
        ],
    )
    torch.manual_seed(123)  # whatever the global generator holds at launch, the draws are the batches' own
    trainer.fit(_module(), DigitsDataModule(batch_size=32, size=8, seed=0), ckpt_path=ckpt_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_ddp_dropout_draws_differ_per_rank_one_model_and_resume_draws_alike(tmp_path):
    # forkserver: the ranks fork from a server that imported torch and Lightning once
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief"])
    _run(tmp_path, "straight", 2)
    _run(tmp_path, "again", 2)
    _run(tmp_path, "first", 1)
    _run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    (rows0, weights0), (rows1, weights1) = (load_rank_record(tmp_path, "straight", r) for r in (0, 1))
    assert len(rows0) == len(rows1) == 6
    assert all(a["first"] != b["first"] for a, b in zip(rows0, rows1))  # each rank its own dropout masks
    for key, value in weights0.items():  # DDP averaged the gradients of the ranks' draws: one model
        torch.testing.assert_close(weights1[key], value, rtol=0, atol=0, msg=key)
    for rank in (0, 1):
        straight, straight_weights = load_rank_record(tmp_path, "straight", rank)
        again, again_weights = load_rank_record(tmp_path, "again", rank)
        resumed, resumed_weights = load_rank_record(tmp_path, "resumed", rank)
        assert again == straight  # an identical run: the same noise and outputs, batch by batch
        # the resumed run found the callback's state: the straight run's noise, batch by batch
        assert resumed == straight[3:]
        for key, value in straight_weights.items():  # bit for bit (each rank steps its own weights)
            torch.testing.assert_close(again_weights[key], value, rtol=0, atol=0, msg=key)
            torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=key)
