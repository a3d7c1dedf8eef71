"""PhotonicSamplerLayer against the physical model it claims to simulate.

Reference values come from the model (reference notes §4): intensity mean ``a``,
relative spread ``sqrt(2·f_e/f_o)``, AR(1) lag-1 correlation; local
reparameterization is checked against exact weight sampling, and the analytic
moments against Monte-Carlo sampling of inputs and weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lightning_relief.nn.photonic import PhotonicConv2d, PhotonicLinear, PhotonicSamplerLayer
from lightning_relief.photonic import (
    ar1_noise,
    correlation_from_rates,
    photonic_samples,
    quantize_readout,
    relative_spread,
    sample_logits,
)


def _lag1(series: torch.Tensor) -> float:
    """Pooled lag-1 autocorrelation along axis 0 of standardized series."""
    z = (series - series.mean(0)) / series.std(0)
    return float((z[1:] * z[:-1]).mean())


def test_ar1_noise_has_unit_variance_and_geometric_correlation():
    g = torch.Generator().manual_seed(0)
    eps = ar1_noise((2000, 200), 0.6, generator=g)
    # 400k draws: SE of the variance ~0.005 (inflated by the correlation), of the lag correlations ~0.005
    assert eps.var().item() == pytest.approx(1.0, abs=0.03)
    assert eps.mean().item() == pytest.approx(0.0, abs=0.03)
    assert _lag1(eps) == pytest.approx(0.6, abs=0.02)
    z = (eps - eps.mean()) / eps.std()
    assert float((z[2:] * z[:-2]).mean()) == pytest.approx(0.36, abs=0.02)


def test_rates_and_spread_formulas():
    assert correlation_from_rates(1e9, 10e9) == pytest.approx(math.exp(-2 * math.pi / 10))
    assert relative_spread(0.02).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="bandwidth_ratio"):
        relative_spread(-0.1)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        correlation_from_rates(1e9, 0.0)


@pytest.mark.parametrize("correlation", [0.0, 0.7])
def test_sampled_intensities_match_the_physical_model(correlation):
    torch.manual_seed(0)
    layer = PhotonicLinear(6, 4, bandwidth_ratio=0.02, correlation=correlation)
    amp = layer.amplitude.detach()
    samples = layer.sample_intensities(4000, generator=torch.Generator().manual_seed(1)).detach()
    assert samples.shape == (4000, 2, 4, 6)
    assert bool((samples >= 0).all())
    rel = samples.std(0) / samples.mean(0)
    # 48 intensities x 4000 correlated draws: SE per element ~1.5e-3 relative (mean) and ~2.5 % (spread)
    torch.testing.assert_close(samples.mean(0), amp, rtol=0.02, atol=0.0)
    assert rel.mean().item() == pytest.approx(math.sqrt(2 * 0.02), rel=0.02)
    assert rel.min().item() > 0.17 and rel.max().item() < 0.23
    assert _lag1(samples.reshape(4000, -1)) == pytest.approx(correlation, abs=0.03)
    mean_w, var_w = layer.weight_moments()
    weights = layer.sample_weights(4000).detach()
    # 4 standard errors; the AR(1) chain (rho <= 0.7) inflates the variance of a mean by at most 2.5^2
    standard_error = var_w.max().sqrt().item() / math.sqrt(4000) * 2.5
    torch.testing.assert_close(weights.mean(0), mean_w.detach(), atol=4 * standard_error, rtol=0)
    torch.testing.assert_close(weights.var(0) / var_w.detach(), torch.ones_like(var_w), atol=0.15, rtol=0)


def test_local_outputs_follow_the_moments_and_the_chain():
    torch.manual_seed(0)
    layer = PhotonicLinear(8, 5, bandwidth_ratio=0.05, correlation=0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = sample_logits(layer, x, 6000, seed=0)  # [K, N, out]
        mean, var = layer.propagate_moments(x, torch.zeros_like(x))
    torch.testing.assert_close(y.mean(0), mean, atol=float(4 * var.max().sqrt() * math.sqrt(3 / 6000)), rtol=0)
    torch.testing.assert_close(y.var(0) / var, torch.ones_like(var), atol=0.1, rtol=0)
    assert _lag1(y.reshape(6000, -1)) == pytest.approx(0.5, abs=0.03)


def _output_samples(layer: PhotonicSamplerLayer, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return sample_logits(layer, x, k, seed=seed).reshape(k, -1)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: PhotonicLinear(10, 4, **kw),
        lambda **kw: PhotonicConv2d(2, 3, 3, padding=1, **kw),
    ],
    ids=["linear", "conv2d"],
)
def test_local_reparameterization_matches_exact_weight_sampling(make):
    torch.manual_seed(0)
    local = make(bandwidth_ratio=0.08, sampling="local")
    exact = make(bandwidth_ratio=0.08, sampling="exact")
    exact.load_state_dict(local.state_dict())
    x = torch.randn(1, 10) if isinstance(local, PhotonicLinear) else torch.randn(1, 2, 4, 4)
    k = 4000
    y_local = _output_samples(local, x, k, seed=1)
    y_exact = _output_samples(exact, x, k, seed=2)
    mean, var = local.propagate_moments(x, torch.zeros_like(x))
    mean, var = mean.detach().reshape(-1), var.detach().reshape(-1)
    # both against the analytic moments, and against each other
    for y in (y_local, y_exact):
        assert (((y.mean(0) - mean) / (var / k).sqrt()).abs() < 4.5).all()
        torch.testing.assert_close(y.var(0) / var, torch.ones_like(var), atol=0.12, rtol=0)
    # the whole distribution of every output: two-sample KS test on standardized samples
    z_local = ((y_local - mean) / var.sqrt()).numpy()
    z_exact = ((y_exact - mean) / var.sqrt()).numpy()
    # one output's K draws, local vs exact; then every output of both paths against N(0, 1)
    assert stats.ks_2samp(z_local[:, 0], z_exact[:, 0]).pvalue > 0.001
    for z in (z_local, z_exact):
        assert stats.kstest(z.flatten(), "norm").pvalue > 0.001


@pytest.mark.parametrize("sampling", ["local", "exact"])
@pytest.mark.parametrize("bandwidth", ["layer", "weight"])
def test_gradients_reach_amplitudes_and_bandwidths(sampling, bandwidth):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        PhotonicConv2d(1, 2, 3, padding=1, bandwidth=bandwidth, sampling=sampling),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        PhotonicLinear(2 * 16, 3, bandwidth=bandwidth, sampling=sampling),
    )
    x, target = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    loss = torch.nn.functional.cross_entropy(sample_logits(net, x, 4, seed=0).flatten(0, 1), target.repeat(4))
    loss.backward()
    for layer in (net[0], net[3]):
        grad = layer.raw_amplitude.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0  # both arms of the pair
        assert layer.raw_bandwidth.grad is not None and layer.raw_bandwidth.grad.abs().sum() > 0
        assert layer.raw_bandwidth.grad.shape == (() if bandwidth == "layer" else layer.weight_shape)
        assert layer.bias.grad is not None


def test_trainable_bandwidth_stays_inside_its_bounds():
    layer = PhotonicLinear(4, 3, bandwidth="weight", bandwidth_ratio=0.01, bandwidth_bounds=(0.001, 0.1))
    with torch.no_grad():
        layer.raw_bandwidth[0].fill_(1e4)
        layer.raw_bandwidth[1].fill_(-1e4)
    ratio = layer.bandwidth_ratio
    assert ratio[0].max().item() == pytest.approx(0.1) and ratio[1].min().item() == pytest.approx(0.001)
    assert bool(((ratio >= 0.001) & (ratio <= 0.1)).all())
    assert PhotonicLinear(4, 3, bandwidth="layer", bandwidth_ratio=0.02).bandwidth_ratio.item() == pytest.approx(0.02)


def test_max_intensity_bounds_amplitudes_and_clips_samples():
    layer = PhotonicLinear(6, 4, max_intensity=0.5, bandwidth_ratio=0.5, sampling="exact")  # s = 1: clipping happens
    with torch.no_grad():
        layer.raw_amplitude.add_(50.0)  # push every amplitude against the limit
    assert float(layer.amplitude.max()) <= 0.5
    samples = layer.sample_intensities(500)
    assert float(samples.min()) == 0.0 and float(samples.max()) == 0.5
    assert bool(((samples == 0) | (samples == 0.5)).any()) and bool(((samples > 0) & (samples < 0.5)).any())
    with pytest.raises(ValueError, match="max_intensity=0.1"):
        PhotonicLinear(3, 2, max_intensity=0.1).set_weight(torch.ones(2, 3))


def test_noise_floor_sets_the_variance_of_an_otherwise_deterministic_layer():
    torch.manual_seed(0)
    layer = PhotonicLinear(5, 3, bandwidth_ratio=0.0, noise_floor=0.3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        y = sample_logits(layer, x, 5000, seed=0)
        mean, var = layer.propagate_moments(x, torch.zeros_like(x))
    torch.testing.assert_close(var, torch.full_like(var, 0.09))
    assert y.std(0).mean().item() == pytest.approx(0.3, rel=0.03)
    torch.testing.assert_close(y.mean(0), mean, atol=0.03, rtol=0)


def test_adc_quantizes_to_its_levels_and_passes_gradients():
    torch.manual_seed(0)
    layer = PhotonicLinear(5, 3, adc_bits=3, adc_range=1.0)
    x = 3 * torch.randn(64, 5)
    y = layer(x)
    step = 2.0 / 7
    levels = torch.unique(y.detach())
    assert len(levels) <= 8 and float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    torch.testing.assert_close((levels + 1.0) / step, torch.round((levels + 1.0) / step), atol=1e-5, rtol=0)
    assert bool((y.detach().abs() == 1.0).any())  # saturated outputs sit on the end levels
    y.sum().backward()
    assert layer.raw_amplitude.grad.abs().sum() > 0
    assert quantize_readout(torch.tensor([0.49]), 1, 1.0).item() == 1.0  # one bit: the two ends


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: PhotonicLinear(12, 4, bandwidth_ratio=0.05, noise_floor=0.05, adc_bits=10, adc_range=8.0), (2, 12)),
        (lambda: PhotonicConv2d(2, 3, 3, padding=1, stride=2, bandwidth_ratio=0.05), (1, 2, 5, 5)),
    ],
    ids=["linear+readout", "conv2d"],
)
def test_propagate_moments_matches_monte_carlo(make, shape):
    """Input ~ N(m, v) independent of Gaussian weights: analytic moments vs sampling both."""
    torch.manual_seed(0)
    layer = make()
    layer.sampling = "exact"
    m, v = torch.randn(shape), torch.rand(shape) * 0.5
    k = 6000
    g = torch.Generator().manual_seed(3)
    x = (m + v.sqrt() * torch.randn((k, *shape), generator=g)).reshape(-1, *shape[1:])  # sample-major batch
    with torch.no_grad(), photonic_samples(layer, k, torch.Generator().manual_seed(4)):
        y = layer(x).reshape(k, -1)
        mean, var = layer.propagate_moments(m, v)
    mean, var = mean.reshape(-1), var.reshape(-1)
    assert (((y.mean(0) - mean) / (var / k).sqrt()).abs() < 4.5).all()
    torch.testing.assert_close(y.var(0) / var, torch.ones_like(var), atol=0.1, rtol=0)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    layer = PhotonicConv2d(1, 2, 3, correlation=0.3)
    x = torch.randn(2, 1, 6, 6)
    a, b, c = (sample_logits(layer, x, 8, seed=s) for s in (0, 0, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert layer._num_samples is None and layer._generator is None  # the context restored the layer


def test_constructor_rejects_bad_arguments_by_name():
    cases = {
        "correlation": dict(correlation=1.0),
        "bandwidth must": dict(bandwidth="dynamic"),
        "sampling": dict(sampling="fast"),
        "adc_range": dict(adc_bits=8),
        "adc_bits": dict(adc_bits=0, adc_range=1.0),
        "noise_floor": dict(noise_floor=-1.0),
        "bandwidth_bounds": dict(bandwidth="layer", bandwidth_ratio=0.9),
        "max_intensity": dict(max_intensity=0.0),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message):
            PhotonicLinear(3, 2, **kwargs)
    with pytest.raises(ValueError, match="multiple of 4"):
        with photonic_samples(PhotonicLinear(3, 2), 4) as layer:
            layer(torch.randn(6, 3))


def test_ar1_matrix_and_recursion_give_the_same_chain(monkeypatch):
    from lightning_relief.photonic import physics

    by_matrix = ar1_noise((40, 7), 0.8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(physics, "_MATRIX_CHAIN_MAX", 8)
    by_loop = ar1_noise((40, 7), 0.8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(by_matrix, by_loop, atol=1e-5, rtol=1e-5)


def test_from_module_and_base_class_errors():
    conv = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
    layer = PhotonicSamplerLayer.from_module(conv, bandwidth_ratio=0.0)
    x = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)  # zero spread: the old layer exactly
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        PhotonicSamplerLayer.from_module(torch.nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        PhotonicSamplerLayer.from_module(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="base class"):
        PhotonicSamplerLayer((3, 2), True)
    layer.reset_parameters()  # the no-argument form other plugins call
    assert layer.weight_moments()[0].abs().sum() > 0


def test_inference_and_autograd_paths_draw_the_same_samples():
    layer = PhotonicConv2d(1, 3, 3, padding=1, bandwidth_ratio=0.05, correlation=0.2)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        inference = sample_logits(layer, x, 4, seed=0)
    with_grad = sample_logits(layer, x, 4, seed=0)
    assert with_grad.requires_grad
    torch.testing.assert_close(inference, with_grad.detach(), rtol=1e-6, atol=1e-6)
