"""DeepEnsembleStrategy(mode="distributed"): 2 CPU processes (gloo), no gradient averaging, exact resume."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.models import MLP, LeNet5
from lightning_relief.uncertainty.stacking import num_members

HERE = Path(__file__).resolve().parent
# a rank that waits on a dead peer fails after this instead of hanging the suite
PG_TIMEOUT = timedelta(seconds=90)


def _module() -> ClassifierModule:
    return ClassifierModule(LeNet5(input_size=8, dropout=0.0), optimizer="sgd", lr=0.05, scheduler="none")


def _preload() -> None:
    # forkserver: children fork from a clean server that imported these once (plain fork is unsafe
    # after autograd ran threads in this process; spawn re-imports torch in every child)
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief.strategies.deep_ensemble"])


def _strategy(mode: str, **kwargs) -> DeepEnsembleStrategy:
    return DeepEnsembleStrategy(num_members=4, mode=mode, start_method="forkserver", timeout=PG_TIMEOUT, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_the_same_members_as_one_vectorized_process(digits, tmp_path):
    """Members spread over 2 ranks end up where one process training all of them ends up:
    so no gradients were averaged between members, and all members were gathered at the end."""
    _preload()
    results, metrics = {}, {}
    for mode, devices in (("vectorized", 1), ("distributed", 2)):
        L.seed_everything(0, verbose=False)
        module = _module()
        trainer = quiet_trainer(
            devices=devices,
            max_steps=3,
            limit_val_batches=2,
            default_root_dir=tmp_path / mode,
            strategy=_strategy(mode),
        )
        trainer.fit(module, digits)
        assert num_members(module) == 4
        results[mode] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        # evaluation alone: each rank takes its members from the full ensemble and gathers their outputs
        metrics[mode] = trainer.validate(module, digits, verbose=False)[0]
        assert num_members(module) == 4
    for name, tensor in results["vectorized"].items():
        torch.testing.assert_close(results["distributed"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # validation on 2 ranks gathered every member's output: the same ensemble metrics
    for key in ("val_nll", "val_ensemble_disagreement", "val_member_acc"):
        assert metrics["distributed"][key] == pytest.approx(metrics["vectorized"][key], abs=1e-5), key


def _dropout_module() -> ClassifierModule:
    # dropout draws from each rank's generator, Adam keeps two moments per member (no cosine schedule:
    # its length follows max_epochs, which differs between the stopped and the straight run)
    return ClassifierModule(MLP(in_features=64, hidden=(32,), dropout=0.3), optimizer="adam", lr=1e-2, scheduler="none")


class _OptimizerAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        state = trainer.strategy.optimizer_state(trainer.optimizers[0])["state"]  # live tensors: copy them
        self.state = {i: {k: v.clone() for k, v in entry.items()} for i, entry in state.items()}
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_on_two_ranks_is_exact_for_every_member_and_reloads_on_one_process(digits, tmp_path):
    """2 ranks: 2 epochs straight == 1 epoch, stop, resume from last.ckpt for the 2nd (every member, with
    dropout and Adam); the same checkpoint resumes on one process with every member's optimizer state."""
    _preload()

    def fit(name: str, epochs: int, ckpt_path: str | None = None, mode: str = "distributed", callbacks=()):
        L.seed_everything(0, verbose=False)
        module = _dropout_module()
        trainer = quiet_trainer(
            devices=2 if mode == "distributed" else 1,
            max_epochs=epochs,
            limit_train_batches=3,
            limit_val_batches=1,
            enable_checkpointing=True,
            default_root_dir=tmp_path / name,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0), *callbacks],
            strategy=_strategy(mode),
        )
        trainer.fit(module, digits, ckpt_path=ckpt_path)
        return module

    straight = fit("straight", 2)
    fit("stopped", 1)
    last = str(tmp_path / "stopped" / "last.ckpt")
    resumed = fit("resumed", 2, ckpt_path=last)
    assert num_members(resumed) == 4
    for name, tensor in straight.state_dict().items():
        diff = [(resumed.state_dict()[name][m] - tensor[m]).abs().max().item() for m in range(4)]
        assert max(diff) <= 1e-6, (name, diff)
    weight = straight.state_dict()["model.net.1.weight"]
    assert not torch.allclose(weight[0], weight[3])

    # the checkpoint holds every member's Adam moments, each rank's random state, and loads on one process
    saved = torch.load(last, weights_only=True)
    assert len(saved["deep_ensemble_rng_states"]) == 2
    # each rank drew from its own generator (seeded alike, the ranks' members would share dropout masks)
    rank0, rank1 = (state["torch"] for state in saved["deep_ensemble_rng_states"])
    assert not torch.equal(rank0, rank1)
    moments = saved["optimizer_states"][0]["state"][0]["exp_avg"]
    assert moments.shape[0] == 4 and all(moments[m].abs().sum() > 0 for m in range(4))
    probe = _OptimizerAtStart()
    with pytest.warns(UserWarning, match="random states of 2 processes"):
        single = fit("single", 2, ckpt_path=last, mode="vectorized", callbacks=[probe])
    for name, tensor in saved["state_dict"].items():
        torch.testing.assert_close(probe.weights[name], tensor, rtol=0, atol=0, msg=name)
    for index, entry in saved["optimizer_states"][0]["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(probe.state[index][key], value, rtol=0, atol=0, msg=f"{index}.{key}")
    assert num_members(single) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_style_processes_on_two_nodes_shard_members_over_global_ranks(digits, tmp_path):
    """Two processes started outside Lightning with torchrun's environment, as two nodes of one device:
    the default start_method starts nothing more, members split over global ranks, and the result
    equals one process training all members."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
            "RANK": str(rank),
            "GROUP_RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "ensemble_torchrun_worker.py"), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert distributed["members_per_rank"] == [[0, 1], [2, 3]]

    L.seed_everything(0, verbose=False)
    module = _module()
    quiet_trainer(max_steps=3, limit_val_batches=0, strategy=DeepEnsembleStrategy(num_members=4)).fit(module, digits)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(distributed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
