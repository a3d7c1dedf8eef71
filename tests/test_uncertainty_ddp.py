"""Uncertainty metrics logged under DDP (2 CPU ranks, gloo) equal the values on all the data."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from conftest import quiet_trainer
from lightning_relief.callbacks.moment_propagation_eval import MomentPropagationEvalCallback
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import ClassifierModule, LeNet5
from lightning_relief.moments import MomentPropagationWrapper


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moment_propagation_metrics_on_two_ranks_equal_the_direct_computation(seed):
    """Each rank sees half of the test set and of the OOD batches; the logged ECE, NLL, accuracy,
    entropy and OOD AUROC are those of all 200 + 100 samples (not a mean of two per-rank values)."""
    multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_relief.moments"])
    data = DigitsDataModule(batch_size=50, size=8, ood="rotate")
    data.setup()
    x, y = (t[:200] for t in data.dataset("test").tensors)  # even: DistributedSampler pads nothing
    x_ood = data.dataset("ood").tensors[0][:100]
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.3))
    callback = MomentPropagationEvalCallback(ood_dataloader=DataLoader(x_ood, batch_size=25))
    trainer = quiet_trainer(
        devices=2,
        callbacks=[callback],
        strategy=DDPStrategy(start_method="forkserver", timeout=timedelta(seconds=90)),
    )
    metrics = trainer.test(module, DataLoader(TensorDataset(x, y), batch_size=50), verbose=False)[0]

    wrapper = MomentPropagationWrapper(module.model)
    with torch.no_grad():
        probs = wrapper.predict_proba(x).double().numpy()
        probs_ood = wrapper.predict_proba(x_ood).double().numpy()
    target = y.numpy()
    assert metrics["mp_test_nll"] == pytest.approx(-np.log(probs[np.arange(200), target]).mean(), rel=1e-4)
    assert metrics["mp_test_acc"] == pytest.approx((probs.argmax(-1) == target).mean(), abs=1e-6)
    ece = multiclass_calibration_error(torch.from_numpy(probs).float(), y, num_classes=10, n_bins=15)
    assert metrics["mp_test_ece"] == pytest.approx(float(ece), abs=1e-5)
    # what averaging the ranks' own values would have logged (DistributedSampler: rank r gets rows r::2)
    halves = [multiclass_calibration_error(torch.from_numpy(probs[r::2]).float(), y[r::2], 10, n_bins=15) for r in (0, 1)]
    assert abs(float(sum(halves)) / 2 - float(ece)) > 1e-3
    assert metrics["mp_test_entropy"] == pytest.approx(_entropy(probs).mean(), rel=1e-4)
    labels = np.r_[np.zeros(200), np.ones(100)]
    auroc = roc_auc_score(labels, np.r_[_entropy(probs), _entropy(probs_ood)])
    # 1e-4: one pair of the 20 000 may order differently between float32 (logged) and float64 entropies
    assert metrics["mp_test_ood_auroc"] == pytest.approx(auroc, abs=1e-4)
