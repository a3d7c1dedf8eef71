"""Temperature scaling: the fit against an independent optimiser, the callback on a single model and an ensemble."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from torch import nn

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.callbacks.temperature_scaling import TemperatureScaling
from lightning_relief.models import MLP, LeNet5
from lightning_relief.nn.structure import structure_of
from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.stacking import num_members
from lightning_relief.uncertainty.temperature import NotIdentifiableError, apply_temperature, fit_temperature, temperature_of


def _overconfident(n=600, c=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=gen)
    logits = 3 * torch.randn(n, c, generator=gen) + 2.5 * nn.functional.one_hot(target, c)
    return logits, target


def _scipy_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    z, y = logits.double().numpy(), target.numpy()

    def nll(log_t: float) -> float:
        return -log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}).x))


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_equals_an_independent_optimum_and_ece_drops(seed):
    logits, target = _overconfident(seed=seed)
    temperature = fit_temperature(logits, target).item()
    assert temperature == pytest.approx(_scipy_temperature(logits, target), rel=1e-5)
    assert temperature > 1.2  # overconfident logits are softened
    before = U.expected_calibration_error(logits.double().softmax(-1), target)
    after = U.expected_calibration_error((logits.double() / temperature).softmax(-1), target)
    assert after < before / 2
    # an under-confident model is sharpened
    assert fit_temperature(logits / 8, target).item() < 1


def test_fit_on_mixture_log_probabilities_and_bad_input():
    logits, target = _overconfident(c=4)
    log_probs = logits.log_softmax(-1)
    log_probs[0, (target[0] + 1) % 4] = float("-inf")  # a class the mixture rules out
    expected = _scipy_temperature(log_probs.clamp_min(-1e4), target)
    assert fit_temperature(log_probs, target).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fit_temperature(torch.randn(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.randn(3, 4), torch.tensor([0, 1, 4]))


def test_apply_divides_the_output_replaces_and_exports():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    raw = model(x)
    apply_temperature(model, 2.0)
    apply_temperature(model, 4.0)  # replaces, does not compound
    torch.testing.assert_close(model(x), raw / 4.0)
    assert temperature_of(model) == 4.0 and len(structure_of(model)) == 1
    torch.testing.assert_close(copy.deepcopy(model)(x), raw / 4.0)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), raw / 4.0)
    with pytest.raises(ValueError, match="> 0"):
        apply_temperature(model, 0.0)


def _fit_with_scaling(module, digits, tmp_path, **kwargs):
    scaling = TemperatureScaling()
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=1.0, callbacks=[scaling], default_root_dir=tmp_path, **kwargs)
    trainer.fit(module, digits)
    return trainer, scaling


@pytest.mark.parametrize("ensemble", [False, True], ids=["single", "ensemble"])
def test_callback_fits_on_validation_applies_and_survives_a_checkpoint(digits, seed, tmp_path, ensemble):
    module = ClassifierModule(MLP(in_features=64, hidden=(32,), dropout=0.1), lr=1e-2)
    strategy = DeepEnsembleStrategy(num_members=3) if ensemble else "auto"
    trainer, scaling = _fit_with_scaling(module, digits, tmp_path, strategy=strategy)
    assert num_members(module) == (3 if ensemble else 0)

    module.eval()
    x, y = digits.dataset("val").tensors
    with torch.no_grad():
        scaled = module(x)
        apply_temperature(module, 1.0)
        raw = module(x)  # logits, or the mixture's log-probabilities
        apply_temperature(module, scaling.temperature)
    # the reference: an independent optimiser on the raw validation outputs
    assert scaling.temperature == pytest.approx(_scipy_temperature(raw, y), rel=1e-4)
    torch.testing.assert_close(scaled, raw / scaling.temperature)
    assert scaling.ece_before == pytest.approx(U.expected_calibration_error(raw.double().softmax(-1), y).item(), abs=1e-6)
    assert scaling.nll_after <= scaling.nll_before + 1e-9
    assert scaling.ece_after < scaling.ece_before

    path = tmp_path / "calibrated.ckpt"
    trainer.save_checkpoint(path)
    loaded = ClassifierModule.load_from_checkpoint(path).eval()
    assert temperature_of(loaded) == pytest.approx(scaling.temperature)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), scaled)
    restored = TemperatureScaling()
    restored.load_state_dict(torch.load(path, weights_only=True)["callbacks"]["TemperatureScaling"])
    assert restored.metrics == scaling.metrics


def test_callback_refuses_bad_arguments_and_missing_validation_data(digits, seed):
    with pytest.raises(ValueError, match="n_bins"):
        TemperatureScaling(n_bins=0)
    with pytest.raises(ValueError, match="max_iter"):
        TemperatureScaling(max_iter=0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[TemperatureScaling()])
    with pytest.raises(ValueError, match="validation data"):
        trainer.fit(ClassifierModule(LeNet5(input_size=8)), train_dataloaders=digits.train_dataloader())


@pytest.mark.slow
def test_scaled_ensemble_compiles_through_tvm_with_its_temperature(digits, seed, tmp_path):
    """What TVMExportCallback (on_fit_end, after TemperatureScaling's on_train_end) compiles: the scaled module."""
    from lightning_relief.deploy import compile_for_target
    from lightning_relief.deploy.frontend import frozen_copy

    module = ClassifierModule(MLP(in_features=64, hidden=(16,)), lr=1e-2)
    _, scaling = _fit_with_scaling(module, digits, tmp_path, strategy=DeepEnsembleStrategy(num_members=2))
    x = digits.dataset("val").tensors[0][:8]
    with torch.no_grad():
        expected = module.eval()(x)
    compiled = compile_for_target(frozen_copy(module), (x,))
    torch.testing.assert_close(torch.as_tensor(compiled(x)), expected, rtol=1e-4, atol=1e-5)
    # the unscaled outputs would not pass the comparison above
    assert not torch.allclose(expected * scaling.temperature, expected, rtol=1e-4, atol=1e-5)


def test_no_temperature_is_fitted_when_every_held_out_sample_is_right():
    """Every label with the top score: the NLL only falls as T -> 0 and has no minimiser (L-BFGS used to
    stop at T ~ 0.05 on the digits validation set and make the model near one-hot on new data)."""
    logits, target = _overconfident(c=4)
    right = logits + 100 * nn.functional.one_hot(target, 4)
    tied = right.clone()
    tied[0] = 0.0  # a tie at the top: that sample's NLL tends to log 4, the others' still to 0
    for scores in (right, tied):
        with pytest.raises(NotIdentifiableError, match="all 600 samples are classified correctly"):
            fit_temperature(scores, target)
    wrong = right.clone()
    wrong[0, target[0]] -= 200  # one error: the NLL grows again as T -> 0
    assert fit_temperature(wrong, target).item() == pytest.approx(_scipy_temperature(wrong, target), rel=1e-5)


class _OneHotData(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        return torch.nn.functional.one_hot(torch.tensor(index % 4), 4).float(), index % 4


def test_callback_leaves_the_module_unscaled_when_validation_has_no_errors(seed):
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.copy_(5 * torch.eye(4))
        model.bias.zero_()
    module = ClassifierModule(model, num_classes=4, lr=1e-6, scheduler="none")
    scaling = TemperatureScaling()
    loader = torch.utils.data.DataLoader(_OneHotData(), batch_size=8)
    with pytest.warns(UserWarning, match="left unscaled"):
        quiet_trainer(max_steps=1, callbacks=[scaling]).fit(module, loader, loader)
    assert scaling.temperature is None and temperature_of(module) is None
