"""Every plugin on every device: `pytest tests/test_devices.py --device all` (`make test-gpu`).

Each test takes the `device` fixture (tests/conftest.py): the CPU by default, CUDA (and MPS)
with ``--device all``; a missing CUDA shows as a skip with its reason. References are the same
computation on the CPU, a direct computation with the device's own generator, or fp32 training.
The meta-device tests run everywhere: a forward on meta tensors fails on any hidden host copy
(``.item()``, ``.cpu()``, a constant created on the CPU) or hard-coded device.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from conftest import device_trainer
from lightning_relief import AnalogNoise, AnalogNoiseStrategy, ClassifierModule, DeepEnsembleStrategy, MomentPropagationWrapper
from lightning_relief.bayes import kl_divergence, to_bayesian
from lightning_relief.models import MLP, LeNet5, ResNet
from lightning_relief.nn.photonic import PhotonicLinear
from lightning_relief.noise import AdditiveGaussian, NoiseInjector, Placement
from lightning_relief.noise.injector import step_seed
from lightning_relief.photonic import convert_to_photonic, sample_logits


def _tolerance(device: str) -> dict[str, float]:
    # cuDNN/cuBLAS pick other reduction orders (and TF32 for convolutions) than the CPU
    return dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=2e-3, atol=2e-4)


def _mixed_precisions(device: str) -> list[str]:
    return {"cpu": ["bf16-mixed"], "cuda": ["16-mixed", "bf16-mixed"], "mps": ["16-mixed"]}[device]


def _strategies_run_on(device: str) -> None:
    if device == "mps":  # Lightning's accelerator connector raises for any ParallelStrategy on MPS
        pytest.skip("Lightning refuses DDP-family strategies (DeepEnsembleStrategy, AnalogNoiseStrategy) on MPS")


class TrainedOn(L.Callback):
    """The device of every parameter at train end (Lightning's teardown then moves the module to the CPU)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.devices = {p.device.type for p in pl_module.parameters()}


def _mlp_module() -> ClassifierModule:
    return ClassifierModule(MLP(in_features=64, dropout=0.0), optimizer="sgd", lr=0.05, scheduler="none")


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


# -- DeepEnsembleStrategy
def test_ensemble_vectorized_equals_sequential_on_device(device, digits):
    _strategies_run_on(device)
    results = {}
    for mode in ("vectorized", "sequential"):
        L.seed_everything(0, verbose=False)
        module = _mlp_module()
        trained_on = TrainedOn()
        device_trainer(
            device,
            max_steps=3,
            limit_val_batches=0,
            callbacks=[trained_on],
            strategy=DeepEnsembleStrategy(num_members=3, mode=mode),
        ).fit(module, digits)
        assert trained_on.devices == {device}
        results[mode] = _weights(module)
    for name, value in results["vectorized"].items():
        torch.testing.assert_close(value, results["sequential"][name], **_tolerance(device), msg=name)
    stacked = next(v for v in results["vectorized"].values() if v.dim() > 1)
    assert not torch.allclose(stacked[0], stacked[1])  # members were initialised apart on the device


def test_ensemble_mixed_precision_follows_fp32(device, digits):
    _strategies_run_on(device)

    def fit(precision: str) -> dict[str, torch.Tensor]:
        L.seed_everything(0, verbose=False)
        module = _mlp_module()
        device_trainer(
            device, max_steps=3, limit_val_batches=0, precision=precision, strategy=DeepEnsembleStrategy(num_members=2)
        ).fit(module, digits)
        assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: master weights stay fp32
        return _weights(module)

    reference = fit("32-true")
    for precision in _mixed_precisions(device):
        mixed = fit(precision)
        for name, value in mixed.items():
            assert torch.isfinite(value).all(), (precision, name)
            moved = (reference[name] - value).abs().max()
            # 3 SGD steps at lr 0.05: half-precision activations move the weights by far less than training does
            assert moved < 0.02, (precision, name, float(moved))


# -- analog noise
def test_analog_noise_is_drawn_on_the_model_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).to(device)
    x = torch.randn(3, 6, device=device)
    clean = model(x).detach()
    injector = NoiseInjector(AdditiveGaussian(), 0.2, Placement("outputs", layers=["Linear"]), seed=7, draws="fresh").attach(
        model
    )
    with injector.step(batch_size=3) as level:
        assert level.device.type == device and injector._level is not None and injector._level.device.type == device
        noisy = model(x).detach()
    generator = torch.Generator(device=device).manual_seed(step_seed(7, 0, 0))
    expected = clean + 0.2 * torch.randn(clean.shape, generator=generator, device=device)
    torch.testing.assert_close(noisy, expected)


def test_analog_strategy_trains_on_device_with_mixed_precision(device, digits):
    _strategies_run_on(device)
    for precision in ["32-true", *_mixed_precisions(device)]:
        L.seed_everything(0, verbose=False)
        module = _mlp_module()
        before = _weights(module)
        strategy = AnalogNoiseStrategy(noise=AdditiveGaussian(), schedule=0.1)
        trainer = device_trainer(device, max_steps=3, limit_val_batches=0, precision=precision, strategy=strategy)
        trainer.fit(module, digits)
        assert trainer.strategy.root_device.type == device
        assert strategy.injector.current_level.device.type == device
        assert float(trainer.callback_metrics["noise_sigma"]) == pytest.approx(0.1)
        after = _weights(module)
        assert all(torch.isfinite(v).all() for v in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before), precision


def test_analog_noise_callback_with_an_ensemble_on_device(device, digits):
    _strategies_run_on(device)
    L.seed_everything(0, verbose=False)
    module = _mlp_module()
    noise = AnalogNoise(AdditiveGaussian(), 0.1, Placement("weights", layers=["Linear"]))
    trained_on = TrainedOn()
    device_trainer(
        device, max_steps=2, limit_val_batches=0, callbacks=[noise, trained_on], strategy=DeepEnsembleStrategy(num_members=2)
    ).fit(module, digits)
    assert noise.injector.current_level.device.type == device and trained_on.devices == {device}
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -- moment propagation
def test_moments_on_device_equal_the_cpu(device):
    torch.manual_seed(0)
    net = MLP(in_features=64, dropout=0.2)
    x = torch.randn(5, 1, 8, 8)
    mean_cpu, var_cpu = MomentPropagationWrapper(copy.deepcopy(net))(x)
    mean, var = MomentPropagationWrapper(net.to(device))(x.to(device))
    assert mean.device.type == device and var.device.type == device
    torch.testing.assert_close(mean.cpu(), mean_cpu, **_tolerance(device))
    torch.testing.assert_close(var.cpu(), var_cpu, **_tolerance(device))


# -- photonic sampling
def test_photonic_samples_on_device_follow_the_propagated_moments(device):
    torch.manual_seed(0)
    layer = PhotonicLinear(8, 3, bandwidth_ratio=0.02, correlation=0.3).to(device)
    x = torch.randn(4, 8, device=device)
    k = 4000
    samples = sample_logits(layer, x, num_samples=k, seed=0)
    assert samples.device.type == device
    mean, var = layer.propagate_moments(x, torch.zeros_like(x))
    # Monte-Carlo against the closed form: 5 standard errors for the mean, 5 for the variance of a Gaussian
    se = (var / k).sqrt()
    assert ((samples.mean(0) - mean).abs() <= 5 * se + 1e-6).all()
    assert ((samples.var(0) - var).abs() <= 5 * var * (2 / (k - 1)) ** 0.5 + 1e-6).all()


# -- Bayesian layers
def test_bayes_kl_and_forward_on_device_equal_the_cpu(device):
    torch.manual_seed(0)
    bnn = to_bayesian(MLP(in_features=4, hidden=(8,), num_classes=3))
    kl_cpu = kl_divergence(bnn).detach()
    bnn = bnn.to(device)
    kl = kl_divergence(bnn)
    assert kl.device.type == device
    torch.testing.assert_close(kl.detach().cpu(), kl_cpu, **_tolerance(device))
    loss = bnn(torch.randn(2, 4, device=device)).logsumexp(-1).mean() + kl
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == device for p in bnn.parameters() if p.requires_grad)
    # a model without Bayesian layers: a zero on its own device, to be added to that device's loss
    assert kl_divergence(nn.Linear(2, 2).to(device)).device.type == device


# -- export of a model trained on the device
def test_export_of_a_device_trained_model_matches_it(device, digits, tmp_path):
    from lightning_relief.callbacks.tvm_export import TVMExportCallback
    from lightning_relief.deploy import compile_for_target, load_compiled

    L.seed_everything(0, verbose=False)
    module = _mlp_module()
    trained_on = TrainedOn()  # the export callback runs at on_fit_end, after the teardown moved the module to the CPU
    export = TVMExportCallback(target="llvm", dirpath=tmp_path / "artifact", example_input_shape=(1, 1, 8, 8), measure=False)
    device_trainer(device, max_steps=3, limit_val_batches=1, callbacks=[trained_on, export]).fit(module, digits)
    assert trained_on.devices == {device} and "error" not in export.last_export, export.last_export
    assert export.last_export["max_abs_error"] < 1e-4  # the callback's own parity check, on a real batch
    x = next(iter(digits.val_dataloader()))[0][:16]
    module = module.to(device).eval()
    with torch.no_grad():
        reference = module(x.to(device)).cpu()
    artifact = load_compiled(tmp_path / "artifact")
    torch.testing.assert_close(torch.as_tensor(artifact.run_batched(x)[0]), reference, rtol=1e-4, atol=1e-4)
    # exporting the device-resident module directly: it is copied, not moved; the device's tensors go straight in
    compiled = compile_for_target(module, x[:1])
    assert all(p.device.type == device for p in module.parameters())
    torch.testing.assert_close(compiled(x.to(device)).cpu(), reference, rtol=1e-4, atol=1e-4)


# -- hidden host copies: meta tensors fail on any of them
@pytest.mark.parametrize("net", ["mlp", "lenet", "resnet"])
def test_moments_forward_on_meta_has_no_host_copy(net):
    model = {
        "mlp": lambda: MLP(in_features=64, dropout=0.2),
        "lenet": lambda: LeNet5(input_size=8, dropout=0.2),
        "resnet": lambda: ResNet(depth=8, width=4),
    }[net]()
    wrapper = MomentPropagationWrapper(model.eval()).to("meta")
    mean, var = wrapper(torch.empty(4, 1, 8, 8, device="meta"))
    assert mean.device.type == "meta" and var.shape == mean.shape == (4, 10)
    assert wrapper.predict_proba(torch.empty(4, 1, 8, 8, device="meta")).shape == (4, 10)


def test_photonic_forward_and_moments_on_meta_have_no_host_copy():
    layer = PhotonicLinear(8, 3, bandwidth_ratio=0.02, correlation=0.3).to("meta")
    x = torch.empty(5, 8, device="meta")
    assert layer(x).shape == (5, 3)
    mean, var = layer.propagate_moments(x, torch.zeros_like(x))
    assert mean.device.type == var.device.type == "meta"
    converted = convert_to_photonic(LeNet5(input_size=8)).eval().to("meta")
    assert sample_logits(converted, torch.empty(2, 1, 8, 8, device="meta"), num_samples=4).shape == (4, 2, 10)


def test_bayesian_forward_on_meta_has_no_host_copy():
    bnn = to_bayesian(LeNet5(input_size=8)).to("meta")
    assert bnn(torch.empty(2, 1, 8, 8, device="meta")).device.type == "meta"
    assert kl_divergence(bnn).device.type == "meta"


def test_kl_of_a_model_without_bayesian_layers_is_on_its_device():
    assert kl_divergence(nn.Linear(2, 2).to("meta")).device.type == "meta"  # was a CPU zero


def test_pcm_drift_time_stays_on_the_host_and_noise_on_the_device(device):
    from lightning_relief.noise import PCMNoise

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).to(device)
    clean_weight = model[0].weight.detach().clone()
    x = torch.randn(3, 6, device=device)
    injector = NoiseInjector(PCMNoise(), 3600.0, seed=3).attach(model)
    with injector.step(batch_size=3) as level:
        # the drift model reads the time as a number: on the host it costs no device sync
        assert level.device.type == "cpu"
        assert model[0].weight.device.type == device and not torch.equal(model[0].weight, clean_weight)
        noisy = model(x)
    assert noisy.device.type == device and torch.isfinite(noisy).all()
    assert torch.equal(model[0].weight, clean_weight)


def test_isolated_seed_leaves_the_users_queued_cuda_seed_and_cpu_generator_alone():
    """The compression search and SensitivityPruningCallback seed their work with it; the old
    fork_rng(devices=[]) + torch.manual_seed replaced the CUDA seed seed_everything had queued."""
    from lightning_relief._rng import isolated_seed

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("checks the queue of seeds that only exists before CUDA starts")
    L.seed_everything(123, verbose=False)
    tracker = torch.cuda._lazy_seed_tracker  # private, but the only place the queued seed is visible
    queued = tracker.get_calls()[-1][0]
    cpu_state = torch.get_rng_state()
    with isolated_seed(7):
        first = torch.rand(3)
    with isolated_seed(7):
        assert torch.equal(torch.rand(3), first)
    assert tracker.get_calls()[-1][0] is queued
    assert torch.equal(torch.get_rng_state(), cpu_state)


@pytest.mark.parametrize("plugin", ["photonic", "bayes"])
def test_photonic_and_bayesian_training_under_mixed_precision_follow_fp32(device, digits, plugin):
    from lightning_relief import BayesianModel, PhotonicNetwork

    def fit(precision: str) -> tuple[dict[str, torch.Tensor], float]:
        L.seed_everything(0, verbose=False)
        net = MLP(in_features=64, dropout=0.0)
        model = PhotonicNetwork(net, bandwidth_ratio=0.02, num_samples=4) if plugin == "photonic" else BayesianModel(net)
        module = ClassifierModule(model, optimizer="sgd", lr=0.05, scheduler="none")
        trainer = device_trainer(device, max_steps=3, limit_val_batches=0, precision=precision)
        trainer.fit(module, digits)
        assert all(p.dtype == torch.float32 for p in module.parameters())
        return _weights(module), float(trainer.callback_metrics["train_loss"])

    reference, ref_loss = fit("32-true")
    for precision in _mixed_precisions(device):
        weights, loss = fit(precision)
        assert loss == pytest.approx(ref_loss, rel=0.05, abs=0.05), precision
        for name, value in weights.items():
            assert torch.isfinite(value).all(), (precision, name)
            assert (reference[name] - value).abs().max() < 0.02, (precision, name)
