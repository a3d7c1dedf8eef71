"""DeepEnsembleStrategy(mode="distributed"): 2 CPU processes (gloo), no gradient averaging."""

from __future__ import annotations

import multiprocessing

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.models import LeNet5
from lightning_relief.uncertainty.stacking import num_members


def _module() -> ClassifierModule:
    return ClassifierModule(LeNet5(input_size=8, dropout=0.0), optimizer="sgd", lr=0.05, scheduler="none")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_the_same_members_as_one_vectorized_process(digits, tmp_path):
    """Members spread over 2 ranks end up where one process training all of them ends up:
    so no gradients were averaged between members, and all members were gathered at the end."""
    # forkserver: children fork from a clean server that imported these once (plain fork is unsafe
    # after autograd ran threads in this process; spawn re-imports torch in every child)
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief.strategies.deep_ensemble"])
    results, metrics = {}, {}
    for mode, devices in (("vectorized", 1), ("distributed", 2)):
        L.seed_everything(0, verbose=False)
        module = _module()
        trainer = quiet_trainer(
            devices=devices,
            max_steps=3,
            limit_val_batches=2,
            default_root_dir=tmp_path / mode,
            strategy=DeepEnsembleStrategy(num_members=4, mode=mode, start_method="forkserver"),
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
