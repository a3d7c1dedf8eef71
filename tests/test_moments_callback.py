"""MomentPropagationEvalCallback: logged metrics against direct numpy / torchmetrics / sklearn computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_relief.callbacks.moment_propagation_eval import MomentPropagationEvalCallback
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import ClassifierModule, LeNet5
from lightning_relief.moments import MomentPropagationWrapper


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


def test_logs_metrics_equal_to_a_direct_computation(trainer_factory, seed):
    data = DigitsDataModule(batch_size=64, size=8, ood="rotate")
    callback = MomentPropagationEvalCallback(stages=("validate", "test"))
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.3))
    trainer = trainer_factory(max_epochs=1, callbacks=[callback])
    trainer.fit(module, data)
    assert set(callback.last_metrics) >= {"mp_val_nll", "mp_val_ood_auroc"}
    metrics = trainer.test(module, data, verbose=False)[0]

    x, y = data.dataset("test").tensors
    x_ood = data.dataset("ood").tensors[0]
    wrapper = MomentPropagationWrapper(module.model)
    with torch.no_grad():
        probs = wrapper.predict_proba(x).double().numpy()
        probs_ood = wrapper.predict_proba(x_ood).double().numpy()
    nll = -np.log(probs[np.arange(len(y)), y.numpy()]).mean()
    assert metrics["mp_test_nll"] == pytest.approx(nll, rel=1e-4)
    assert metrics["mp_test_acc"] == pytest.approx((probs.argmax(-1) == y.numpy()).mean(), abs=1e-6)
    ece = multiclass_calibration_error(torch.from_numpy(probs).float(), y, num_classes=10, n_bins=15)
    assert metrics["mp_test_ece"] == pytest.approx(float(ece), abs=1e-4)
    assert metrics["mp_test_entropy"] == pytest.approx(_entropy(probs).mean(), rel=1e-4)
    labels = np.r_[np.zeros(len(probs)), np.ones(len(probs_ood))]
    auroc = roc_auc_score(labels, np.r_[_entropy(probs), _entropy(probs_ood)])
    assert metrics["mp_test_ood_auroc"] == pytest.approx(auroc, abs=1e-4)
    assert callback.history[-1]["mp_test_nll"] == metrics["mp_test_nll"]

    restored = MomentPropagationEvalCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.last_metrics == callback.last_metrics and restored.history == callback.history


def test_variance_score_and_explicit_ood_loader(digits, trainer_factory, seed):
    loader = torch.utils.data.DataLoader(torch.randn(64, 1, 8, 8) * 3, batch_size=32)
    callback = MomentPropagationEvalCallback(ood_dataloader=loader, ood_score="variance", prefix="analytic_")
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.3))
    metrics = trainer_factory(callbacks=[callback]).test(module, digits, verbose=False)[0]
    x = digits.dataset("test").tensors[0]
    wrapper = MomentPropagationWrapper(module.model)
    with torch.no_grad():
        score_in = wrapper(x)[1].sum(-1).numpy()
        score_out = torch.cat([wrapper(b)[1].sum(-1) for b in loader]).numpy()
    labels = np.r_[np.zeros(len(score_in)), np.ones(len(score_out))]
    expected = roc_auc_score(labels, np.r_[score_in, score_out])
    assert metrics["analytic_test_ood_auroc"] == pytest.approx(expected, abs=1e-4)
    assert "analytic_val_nll" not in metrics


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stages"):
        MomentPropagationEvalCallback(stages=("fit",))
    with pytest.raises(ValueError, match="ood_score"):
        MomentPropagationEvalCallback(ood_score="margin")


def test_mutual_information_score_and_its_ood_auroc_equal_a_direct_computation(digits, trainer_factory, seed):
    loader = torch.utils.data.DataLoader(torch.randn(64, 1, 8, 8) * 3, batch_size=32)
    callback = MomentPropagationEvalCallback(ood_dataloader=loader, ood_score="mutual_information")
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.3))
    metrics = trainer_factory(callbacks=[callback]).test(module, digits, verbose=False)[0]
    x = digits.dataset("test").tensors[0]
    wrapper = MomentPropagationWrapper(module.model)
    with torch.no_grad():
        score_in = wrapper.uncertainty(x)["mutual_information"].numpy()
        score_out = torch.cat([wrapper.uncertainty(b)["mutual_information"] for b in loader]).numpy()
    assert metrics["mp_test_mutual_information"] == pytest.approx(score_in.mean(), rel=1e-4)
    labels = np.r_[np.zeros(len(score_in)), np.ones(len(score_out))]
    assert metrics["mp_test_ood_auroc"] == pytest.approx(roc_auc_score(labels, np.r_[score_in, score_out]), abs=1e-4)
