"""bayesian-torch integration: KL against torch.distributions, training, checkpoints, prediction helpers."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from bayesian_torch.layers import LinearReparameterization
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.bayes import (
    KLDivergenceCallback,
    OutputOnly,
    bayesian_layers,
    kl_divergence,
    make_bayesian,
    mc_predict,
    mean_weights,
    predict_mean,
    to_bayesian,
)
from lightning_relief.models import MLP, LeNet5


def _reference_kl(model: nn.Module) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for layer in bayesian_layers(model):
        for mu, rho, pm, ps in (
            (
                getattr(layer, "mu_weight", None) if hasattr(layer, "mu_weight") else layer.mu_kernel,
                getattr(layer, "rho_weight", None) if hasattr(layer, "rho_weight") else layer.rho_kernel,
                layer.prior_weight_mu,
                layer.prior_weight_sigma,
            ),
            (layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma),
        ):
            q = Normal(mu.double(), torch.log1p(torch.exp(rho.double())))
            total += torch_kl(q, Normal(pm.double(), ps.double())).sum()
    return total


def test_kl_divergence_is_the_summed_gaussian_kl(seed):
    bnn = to_bayesian(LeNet5(input_size=8), prior_sigma=0.5, posterior_rho_init=-2.0)
    ours = kl_divergence(bnn)
    assert ours.item() == pytest.approx(_reference_kl(bnn).item(), rel=1e-5)
    # bayesian-torch's own kl_loss averages per tensor: sum of (mean * count) must agree
    per_tensor_sum = sum(
        layer.kl_div(
            layer.mu_kernel if hasattr(layer, "mu_kernel") else layer.mu_weight,
            F.softplus(layer.rho_kernel if hasattr(layer, "rho_kernel") else layer.rho_weight),
            layer.prior_weight_mu,
            layer.prior_weight_sigma,
        )
        * layer.prior_weight_mu.numel()
        + layer.kl_div(layer.mu_bias, F.softplus(layer.rho_bias), layer.prior_bias_mu, layer.prior_bias_sigma)
        * layer.prior_bias_mu.numel()
        for layer in bayesian_layers(bnn)
    )
    assert ours.item() == pytest.approx(per_tensor_sum.item(), rel=1e-4)
    assert kl_divergence(MLP()).item() == 0.0


def test_conversion_works_on_a_copy_and_returns_plain_tensors(seed):
    model = LeNet5(input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bnn = to_bayesian(model)
    assert len(bayesian_layers(bnn)) == 5 and not bayesian_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = bnn.eval()(torch.randn(3, 1, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
    with pytest.raises(ValueError, match="already holds"):
        to_bayesian(bnn)
    with pytest.raises(ValueError, match="type"):
        to_bayesian(model, type="Laplace")
    with pytest.raises(ValueError, match="no Linear or Conv"):
        to_bayesian(nn.Sequential(nn.ReLU()))
    # a bayesian-torch layer built by hand returns (out, kl): OutputOnly strips the tuple
    raw = LinearReparameterization(4, 3)
    assert isinstance(raw(torch.randn(2, 4)), tuple)
    assert OutputOnly(raw)(torch.randn(2, 4)).shape == (2, 3)


def test_mean_weights_equal_the_deterministic_model_with_mu_weights(seed):
    model = LeNet5(input_size=8).eval()
    bnn = to_bayesian(model, posterior_rho_init=-1.0).eval()
    # copy every posterior mean into the deterministic twin
    with torch.no_grad():
        for (_, layer), twin in zip(
            [(n, m) for n, m in bnn.named_modules() if m in bayesian_layers(bnn)],
            [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
        ):
            twin.weight.copy_(layer.mu_kernel if hasattr(layer, "mu_kernel") else layer.mu_weight)
            twin.bias.copy_(layer.mu_bias)
    x = torch.randn(16, 1, 8, 8)
    rho_before = bnn.features[0][0].rho_kernel.clone()
    torch.testing.assert_close(predict_mean(bnn, x), model(x).softmax(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(bnn.features[0][0].rho_kernel, rho_before)  # restored
    with pytest.raises(RuntimeError, match="boom"):
        with mean_weights(bnn):
            raise RuntimeError("boom")
    assert torch.equal(bnn.features[0][0].rho_kernel, rho_before)  # restored on error too
    mean, samples = mc_predict(bnn, x, num_samples=8)
    assert samples.shape == (8, 16, 10) and not torch.allclose(samples[0], samples[1])
    torch.testing.assert_close(mean, samples.mean(0))
    with pytest.raises(ValueError, match="num_samples"):
        mc_predict(bnn, x, num_samples=0)


def test_mc_dropout_samples_differ_and_batchnorm_stays_in_eval(seed):
    model = LeNet5(input_size=8, dropout=0.5).eval()
    running = model.features[0][1].running_mean.clone()
    x = torch.randn(8, 1, 8, 8)
    _, deterministic = mc_predict(model, x, num_samples=3)
    assert torch.allclose(deterministic[0], deterministic[2])
    mean, samples = mc_predict(model, x, num_samples=4, mc_dropout=True)
    assert not torch.allclose(samples[0], samples[1])
    assert torch.equal(model.features[0][1].running_mean, running) and not model.training
    assert not any(m.training for m in model.modules())


def test_classifier_module_trains_a_bnn_on_the_elbo_and_reloads(digits, seed, tmp_path):
    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
    make_bayesian(module, posterior_rho_init=-4.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=2, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, digits)
    n_train = len(digits.dataset("train"))
    module.eval()
    assert trainer.callback_metrics["train_kl_term"].item() == pytest.approx(
        kl_divergence(module.model).item() / n_train, rel=0.05
    )  # logged as an epoch mean while the posterior moved: close, not equal
    loaded = ClassifierModule.load_from_checkpoint(checkpoint.last_model_path).eval()
    assert len(bayesian_layers(loaded.model)) == 5
    x = digits.dataset("test").tensors[0]
    torch.testing.assert_close(predict_mean(loaded, x), predict_mean(module, x))
    torch.manual_seed(1)
    a = mc_predict(loaded, x, num_samples=3)[0]
    torch.manual_seed(1)
    b = mc_predict(module, x, num_samples=3)[0]
    torch.testing.assert_close(a, b)
    acc = (predict_mean(loaded, x).argmax(-1) == digits.dataset("test").tensors[1]).float().mean()
    assert acc > 0.5  # it learned something in two epochs


class _UserModule(L.LightningModule):
    """A user's own module; its model returns (out, kl) tuples, wrapped by OutputOnly."""

    def __init__(self, data_weight: float = 1.0) -> None:
        super().__init__()
        self.net = OutputOnly(nn.Sequential(nn.Flatten(), LinearReparameterization(64, 10)))
        self.data_weight = data_weight

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        assert isinstance(logits, torch.Tensor)
        return self.data_weight * F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_kl_callback_adds_exactly_the_scaled_kl_gradient_to_a_user_module(digits, seed):
    module = _UserModule(data_weight=0.0)  # only the KL term moves the weights
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    reference = _UserModule()
    reference.load_state_dict(module.state_dict())
    n = len(digits.dataset("train"))
    (kl_divergence(reference) * (0.5 / n)).backward()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[KLDivergenceCallback(weight=0.5)])
    trainer.fit(module, digits)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(module.state_dict()[name], start[name] - 1.0 * param.grad, msg=name)
    assert not torch.equal(module.state_dict()["net.model.1.rho_weight"], start["net.model.1.rho_weight"])
    assert trainer.callback_metrics["train_kl"].item() == pytest.approx(kl_divergence(reference).item(), rel=1e-5)
    with pytest.raises(ValueError, match="weight"):
        KLDivergenceCallback(weight=-1)


def test_kl_callback_through_fabric_adds_the_same_gradient(digits, seed):
    """A plain model in a Fabric loop: fabric.call runs the callback after fabric.backward."""
    n = len(digits.dataset("train"))
    model = nn.Sequential(nn.Flatten(), LinearReparameterization(64, 10))
    reference = copy.deepcopy(model)
    (kl_divergence(reference) * (0.5 / n)).backward()
    callback = KLDivergenceCallback(dataset_size=n, weight=0.5)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    wrapped = fabric.setup_module(model)
    x, _ = next(iter(digits.train_dataloader()))
    fabric.backward(0.0 * wrapped(x)[0].sum())  # only the KL term gives gradients
    fabric.call("on_after_backward", None, wrapped)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, param.grad, msg=name)
    assert callback.last_kl == pytest.approx(kl_divergence(reference).item(), rel=1e-5)
    with pytest.raises(ValueError, match="dataset_size"):
        KLDivergenceCallback().on_after_backward(None, wrapped)
