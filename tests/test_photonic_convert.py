"""convert_to_photonic, PhotonicNetwork, training in ClassifierModule, checkpoints, prediction helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from lightning_relief.models import MLP, ClassifierModule, LeNet5
from lightning_relief.nn.photonic import PhotonicConv2d, PhotonicLinear
from lightning_relief.nn.structure import structure_of
from lightning_relief.photonic import (
    ChipModel,
    PhotonicNetwork,
    convert_to_photonic,
    crossbar_passes,
    photonic_layers,
    predictive,
    sample_logits,
    summarize_samples,
)


def test_conversion_keeps_the_mean_network(seed):
    model = LeNet5(input_size=8).eval()
    x = torch.randn(4, 1, 8, 8)
    converted = convert_to_photonic(model, bandwidth_ratio=0.0)  # no spread: samples equal the mean network
    assert isinstance(model.classifier[1], nn.Linear)  # a copy by default
    assert sorted(photonic_layers(converted)) == [
        "classifier.1",
        "classifier.4",
        "classifier.7",
        "features.0.0",
        "features.1.0",
    ]
    assert isinstance(converted.features[0][0], PhotonicConv2d)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)
    for name, layer in photonic_layers(converted).items():
        mean_w, _ = layer.weight_moments()
        torch.testing.assert_close(mean_w, model.get_submodule(name).weight, atol=1e-6, rtol=1e-5)
        assert float(layer.amplitude.min()) > 0  # both arms lit


def test_partial_conversion_and_bad_input_change_nothing():
    model = MLP(in_features=64)
    partial = convert_to_photonic(model, layers=["net.4"], correlation=0.2)
    assert isinstance(partial.net[4], PhotonicLinear) and isinstance(partial.net[1], nn.Linear)
    assert partial.net[4].correlation == 0.2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layers, options, match in (
        (["net.9"], {}, "not a submodule"),
        (["net.2"], {}, "ReLU, not an nn.Linear"),
        ("net.1", {}, "list of layer names"),
        (None, {"correlation": 2.0}, "correlation"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            convert_to_photonic(model, layers=layers, inplace=True, **options)
    assert all(isinstance(model.net[i], nn.Linear) for i in (1, 4, 7))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summary_matches_a_direct_numpy_computation():
    logits = torch.randn(16, 5, 4, generator=torch.Generator().manual_seed(0))
    result = summarize_samples(logits)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
    mean = p.mean(0)
    entropy = -(mean * np.log(mean)).sum(-1)
    expected_entropy = -(p * np.log(p)).sum(-1).mean(0)
    np.testing.assert_allclose(result.mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(result.entropy.numpy(), entropy, rtol=1e-5)
    np.testing.assert_allclose(result.mutual_information.numpy(), entropy - expected_entropy, atol=1e-5)


def test_predictive_is_seeded_and_chunking_changes_nothing_in_distribution(seed):
    model = convert_to_photonic(MLP(in_features=64, dropout=0.0), bandwidth_ratio=0.05).eval()
    x = torch.randn(6, 1, 8, 8)
    a = predictive(model, x, num_samples=16, seed=3)
    b = predictive(model, x, num_samples=16, seed=3)
    torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)
    chunked = predictive(model, x, num_samples=16, seed=3, batch_size=4)
    assert chunked.probs.shape == (16, 6, 10)
    assert float((a.mutual_information > 0).float().mean()) == 1.0


def test_chip_model_counts_crossbar_passes():
    chip = ChipModel(rows=16, cols=16)
    assert chip.sample_rate_hz == pytest.approx(70.4e9)
    model = convert_to_photonic(LeNet5(input_size=8))
    # conv1: 8x8 positions, 25 inputs -> 2 row tiles, 6 outputs -> 1: 128; conv2: 4x4 positions, 150 -> 10, 16 -> 1: 160
    # linear 64->120: 4x8 = 32; 120->84: 8x6 = 48; 84->10: 6x1 = 6
    assert crossbar_passes(model, (1, 8, 8), chip) == 128 + 160 + 32 + 48 + 6
    assert chip.network_samples_per_second(374) == pytest.approx(70.4e9 / 374)
    with pytest.raises(ValueError, match="channels"):
        ChipModel(channels=0)


def _fit(module, digits, **trainer_kwargs):
    trainer = quiet_trainer(**trainer_kwargs)
    trainer.fit(module, digits)
    return trainer


def test_trains_inside_classifier_module_and_reloads_from_a_checkpoint(digits, seed, tmp_path):
    module = convert_to_photonic(ClassifierModule(MLP(in_features=64, dropout=0.0), lr=1e-2), bandwidth_ratio=0.02)
    assert structure_of(module)[0]["rebuild"] == "lightning_relief.photonic.convert:rebuild_photonic"
    trainer = _fit(module, digits, max_epochs=3)
    assert trainer.callback_metrics["val_acc"] > 0.85
    path = tmp_path / "photonic.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassifierModule.load_from_checkpoint(path).eval()
    assert isinstance(reloaded.model.net[1], PhotonicLinear)
    x = digits.dataset("test").tensors[0][:16]
    expected = sample_logits(module.eval(), x, 8, seed=5)
    torch.testing.assert_close(sample_logits(reloaded, x, 8, seed=5), expected, rtol=0, atol=0)


def test_photonic_network_conv_trains_and_reloads_with_trainable_bandwidth(digits, seed, tmp_path):
    net = PhotonicNetwork(LeNet5(input_size=8), num_samples=4, train_samples=2, bandwidth="layer", correlation=0.1)
    module = ClassifierModule(net, lr=1e-2)
    assert module.hparams["model"]["class_path"] == "lightning_relief.photonic.network.PhotonicNetwork"
    start = net.model.features[0][0].bandwidth_ratio.item()
    trainer = _fit(module, digits, max_epochs=1, limit_train_batches=5, limit_val_batches=2)
    assert net.model.features[0][0].bandwidth_ratio.item() != start  # the optimizer reached it
    path = tmp_path / "net.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassifierModule.load_from_checkpoint(path).eval()
    x = digits.dataset("val").tensors[0][:8]
    torch.manual_seed(7)
    expected = module.eval()(x)
    torch.manual_seed(7)
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    # eval output: log of the 4-sample predictive mean
    assert torch.allclose(expected.exp().sum(-1), torch.ones(8), atol=1e-5)
    torch.manual_seed(7)
    samples = sample_logits(net.model, x, 4)
    torch.testing.assert_close(expected, samples.softmax(-1).mean(0).log(), atol=1e-5, rtol=1e-5)


def test_photonic_network_rejects_bad_sample_counts():
    with pytest.raises(ValueError, match="num_samples"):
        PhotonicNetwork(MLP(), num_samples=0)
    with pytest.raises(ValueError, match="train_samples"):
        PhotonicNetwork(MLP(), train_samples=1.5)
    assert PhotonicNetwork(MLP(), bandwidth_ratio=0.03).model.net[1].bandwidth_ratio.item() == pytest.approx(0.03)


def test_recipe_runs_through_the_cli(tmp_path, monkeypatch):
    from lightning_relief.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = __import__("pathlib").Path(__file__).parents[1] / "recipes" / "photonic_bnn_digits.yaml"
    assert recipe.read_text().startswith("# ")
    code = main(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.enable_progress_bar",
            "false",
            "--test_after_fit",
            "false",
        ]
    )
    assert code in (0, None)


class _SkipAround(nn.Module):
    """A skip connection around the layer that gets converted: the unstacked branch meets the stacked one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.inner = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.inner(h) + h


@pytest.mark.parametrize("sampling", ["local", "exact"])
def test_fan_out_at_the_first_photonic_layer_equals_stacking_the_input(sampling, seed):
    model = convert_to_photonic(LeNet5(input_size=8), layers=["features.1.0", "classifier.4"], sampling=sampling).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        by_layer = sample_logits(model, x, 5, seed=0, fan_out="layer")
        by_input = sample_logits(model, x, 5, seed=0, fan_out="input")
    torch.testing.assert_close(by_layer, by_input, atol=1e-5, rtol=1e-5)
    assert by_layer.std(0).min() > 0


def test_fan_out_falls_back_when_branches_do_not_meet(seed):
    model = convert_to_photonic(_SkipAround(), layers=["inner"], bandwidth_ratio=0.05)
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError):
        sample_logits(model, x, 3, seed=0, fan_out="layer")
    torch.testing.assert_close(sample_logits(model, x, 3, seed=0), sample_logits(model, x, 3, seed=0, fan_out="input"))
    torch.manual_seed(1)
    auto = sample_logits(model, x, 3)  # global RNG: the retry starts from the same state
    torch.manual_seed(1)
    torch.testing.assert_close(auto, sample_logits(model, x, 3, fan_out="input"))


def test_checkpoint_round_trip_keeps_every_physical_option(digits, seed, tmp_path):
    options = dict(
        bandwidth="weight",
        bandwidth_ratio=0.05,
        bandwidth_bounds=(0.01, 0.2),
        correlation=0.4,
        max_intensity=4.0,
        noise_floor=0.02,
        adc_bits=8,
        adc_range=20.0,
        sampling="exact",
    )
    module = convert_to_photonic(
        ClassifierModule(LeNet5(input_size=8)), layers=["model.features.0.0", "model.classifier.7"], **options
    )
    trainer = _fit(module, digits, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "options.ckpt")
    reloaded = ClassifierModule.load_from_checkpoint(tmp_path / "options.ckpt").eval()
    layer = reloaded.model.classifier[7]
    assert isinstance(layer, PhotonicLinear) and isinstance(reloaded.model.classifier[4], nn.Linear)
    assert (layer.bandwidth_bounds, layer.correlation, layer.max_intensity, layer.adc_bits, layer.sampling) == (
        (0.01, 0.2),
        0.4,
        4.0,
        8,
        "exact",
    )
    x = digits.dataset("test").tensors[0][:4]
    torch.testing.assert_close(sample_logits(reloaded, x, 6, seed=2), sample_logits(module.eval(), x, 6, seed=2), rtol=0, atol=0)
