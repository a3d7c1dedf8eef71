"""Max pooling of correlated units: the neighbour covariance of a convolution, and Clark's correlated maximum.

References: Monte-Carlo with one weight draw per sample (as bayesian-torch draws them), inputs
sampled independently. The independent-units rule is checked to be measurably worse, so the
tolerances would catch a dropped covariance term.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relief.moments import MomentPropagationWrapper, mc_bayesian_logits, mc_dropout_logits, rules
from lightning_relief.moments import functional as MF


def _setup(stride=1, dilation=1, gaussian=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean, var = torch.randn(1, 3, 9, 9, generator=g), torch.rand(1, 3, 9, 9, generator=g) * 0.3
    wm = torch.randn(4, 3, 3, 3, generator=g) * 0.3
    wv = torch.rand(4, 3, 3, 3, generator=g) * 0.05 if gaussian else None
    bm, bv = torch.randn(4, generator=g), (torch.rand(4, generator=g) * 0.1 if gaussian else None)
    n = 20_000
    x = mean + var.sqrt() * torch.randn(n, 3, 9, 9, generator=g)
    w = wm + (wv.sqrt() * torch.randn(n, *wm.shape, generator=g) if gaussian else torch.zeros(n, *wm.shape))
    b = bm + (bv.sqrt() * torch.randn(n, 4, generator=g) if gaussian else torch.zeros(n, 4))
    # one weight draw per sample: a grouped convolution over the samples
    y = F.conv2d(x.reshape(1, -1, 9, 9), w.flatten(0, 1), b.flatten(), stride, 1, dilation, n)
    y = y.reshape(n, 4, *y.shape[-2:])
    conv = (stride, 1, dilation, 1)
    return (mean, var, wm, wv, bm, bv, conv), y


@pytest.mark.parametrize(("stride", "dilation", "gaussian"), [(1, 1, True), (2, 1, True), (1, 2, False), (1, 1, False)])
def test_neighbour_covariance_of_a_convolution_matches_sampling(stride, dilation, gaussian):
    (mean, var, wm, wv, _, bv, conv), y = _setup(stride, dilation, gaussian)
    yc = y - y.mean(0)
    h, w = y.shape[-2:]
    scale = y.var(0).mean()
    for off in [(0, 1), (1, 0), (1, 1), (1, -1), (0, 2)]:
        cov = MF.conv_neighbour_cov(mean, var, wm, wv, bv, *conv, off)[0]
        lo = max(0, -off[1])
        a = yc[:, :, : h - off[0], lo : w - max(0, off[1])]
        b = yc[:, :, off[0] :, lo + off[1] : w - max(0, off[1]) + off[1]]
        mc = (a * b).mean(0)
        # Monte-Carlo error of a covariance ~ var / sqrt(n) = 0.7 % of the variance; measured max 2.5 %
        err = (cov[:, : h - off[0], lo : w - max(0, off[1])] - mc).abs().max() / scale
        assert err < 0.05, (off, err)
        assert mc.abs().max() / scale > 0.05 or not gaussian  # the covariances are not negligible


def test_correlated_max_pool_after_gaussian_conv_and_relu_beats_independence():
    # larger weight noise, small input noise: the shared weight draw makes neighbours strongly correlated
    g = torch.Generator().manual_seed(1)
    mean, var = torch.randn(1, 3, 8, 8, generator=g), torch.full((1, 3, 8, 8), 0.01)
    wm, wv = torch.randn(4, 3, 3, 3, generator=g) * 0.3, torch.full((4, 3, 3, 3), 0.04)
    n = 20_000
    x = mean + var.sqrt() * torch.randn(n, 3, 8, 8, generator=g)
    w = wm + wv.sqrt() * torch.randn(n, *wm.shape, generator=g)
    y = F.conv2d(x.reshape(1, -1, 8, 8), w.flatten(0, 1), None, 1, 1, 1, n).reshape(n, 4, 8, 8)
    pooled = F.max_pool2d(F.relu(y), 2)
    m, v = MF.gaussian_conv_moments(mean, var, wm, wv, None, None, 1, 1)
    covs = {o: MF.conv_neighbour_cov(mean, var, wm, wv, None, 1, 1, 1, 1, o) for o in MF.pool_offsets(2, 1, 2)}
    corr = MF.relu_moments(*MF.max_pool_moments(m, v, 2, 2, covariances=covs))
    indep = MF.max_pool_moments(*MF.relu_moments(m, v), 2, 2)
    std = pooled.std(0)
    err_corr = ((corr[0] - pooled.mean(0)).abs() / std).max()
    err_indep = ((indep[0] - pooled.mean(0)).abs() / std).max()
    ratio_corr, ratio_indep = corr[1] / pooled.var(0), indep[1] / pooled.var(0)
    # measured: correlated 0.04 std, variance 0.85..1.04; independent 0.5 std, variance down to 0.3
    assert err_corr < 0.1 and err_indep > 3 * err_corr, (err_corr, err_indep)
    assert 0.75 < ratio_corr.min() and ratio_corr.max() < 1.1, (ratio_corr.min(), ratio_corr.max())
    assert ratio_indep.min() < 0.6


@pytest.fixture
def images(digits):
    return digits.dataset("test").tensors[0][:16]


class BayesPoolNet(nn.Module):
    """bayesian-torch's example CNN (conv, conv, max pool, two linear layers, log-softmax), for 8 x 8 inputs."""

    def __init__(self):
        super().__init__()
        from bayesian_torch.layers import (
            Conv2dReparameterization,
            LinearReparameterization,
        )

        self.conv1 = Conv2dReparameterization(1, 8, 3, 1, posterior_rho_init=-2.5)
        self.conv2 = Conv2dReparameterization(8, 16, 3, 1, posterior_rho_init=-2.5)
        self.fc = LinearReparameterization(16 * 2 * 2, 10, posterior_rho_init=-2.5)

    def forward(self, x):
        x, _ = self.conv1(x)
        x, _ = self.conv2(F.relu(x))
        x = F.max_pool2d(F.relu(x), 2)
        x, _ = self.fc(torch.flatten(x, 1))
        return F.log_softmax(x, dim=1)


def test_bayesian_cnn_with_max_pool_is_closer_to_mc_with_the_correlated_rule(images, monkeypatch):
    torch.manual_seed(0)
    model = BayesPoolNet().eval()
    logits = []
    hook = model.fc.register_forward_hook(lambda module, inputs, output: logits.append(output[0]))
    mc_bayesian_logits(model, images, 2000)
    hook.remove()
    samples = torch.stack(logits)

    def errors(covariance="diagonal"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ends in log_softmax": the logits' moments are returned
            wrapper = MomentPropagationWrapper(model, covariance=covariance)
        mean, var = wrapper(images)
        rel = ((mean - samples.mean(0)).norm() / samples.mean(0).norm()).item()
        return wrapper.code, rel, (var / samples.var(0)).median().item()

    code, rel, ratio = errors()
    assert "conv_neighbour_cov" in code
    code, rel_low_rank, ratio_low_rank = errors("low_rank")
    assert "gaussian_conv_sources" in code and "max_pool_wins" in code
    # measured: mean 10 %, variance median 1.03 (0.96..1.10 for 5-95 %); the first layer's shared draws
    # reach the classifier through the second convolution as 8 x 10 sources
    assert rel_low_rank < 0.15 and abs(ratio_low_rank - 1.0) < 0.08, (rel_low_rank, ratio_low_rank)
    monkeypatch.setattr(rules, "_conv_cov", lambda *args: None)  # the independent-units rule
    code, rel_independent, _ = errors()
    assert "conv_neighbour_cov" not in code
    # measured (random weights, logits' means small against their std, MC noise ~2 %): correlated 11 %,
    # variance median 1.03; independent 19 %, 0.91. The remaining error is the correlation that the
    # first layer's shared weight draw leaves between the second layer's inputs (not tracked).
    assert rel < 0.15 and rel < 0.7 * rel_independent, (rel, rel_independent)
    assert 0.9 < ratio < 1.15, ratio


def test_dropout_conv_batch_norm_relu_pool_carries_the_covariance(images):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.3), nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.3, 0.3)
        model[2].running_var.uniform_(0.5, 1.5)
        model[2].weight.uniform_(-1.5, 1.5)  # negative scales too: the covariance scales by its square
    wrapper = MomentPropagationWrapper(model)
    assert "batch_norm_scale_squared" in wrapper.code and "conv_neighbour_cov" in wrapper.code
    mean, var = wrapper(images)
    samples = mc_dropout_logits(model, images, 4000)  # dropout samples, batch norm keeps its running statistics
    keep = samples.var(0) > 1e-6  # units that are zero in every sample
    z = ((mean - samples.mean(0)).abs() / samples.std(0))[keep]
    ratio = (var / samples.var(0))[keep]
    # measured: means within 0.21 std, variance ratio median 1.03 (2 % quantile 0.61); independent units:
    # 1.2 std, median 0.71. Dropout units are two-point
    # variables, not Gaussians, but neighbours sharing them through the kernel are now correlated
    assert z.max() < 0.35, z.max()
    assert 0.9 < ratio.median() < 1.15 and ratio.quantile(0.02) > 0.5, (ratio.median(), ratio.quantile(0.02))


def test_low_rank_covariance_restores_the_variance_of_an_mlp_with_two_dropout_layers(seed):
    from lightning_relief.data import MNIST1DDataModule

    data = MNIST1DDataModule(batch_size=100)
    data.setup()
    x = data.dataset("test").tensors[0][:100]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.1),
        nn.Dropout(0.2), nn.Linear(64, 10),
    )  # fmt: skip
    # trained: the hidden units become correlated through the masks they share (at random weights they are not)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for inputs, labels in torch.utils.data.DataLoader(data.dataset("train"), batch_size=100, shuffle=True):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.eval()
    samples = mc_dropout_logits(model, x, 4000)
    ratios = {}
    for covariance in ("diagonal", "low_rank"):
        mean, var = MomentPropagationWrapper(model, covariance=covariance)(x)
        assert ((mean - samples.mean(0)).abs() / samples.std(0)).max() < 0.3
        ratios[covariance] = (var / samples.var(0)).flatten()
    # measured after one epoch: diagonal median 0.67 (0.46..1.02 for 5-95 %); low rank (the first dropout
    # layer's 64 sources swept back through the leaky ReLU, first order) 0.99 (0.95..1.04), as a dense
    # covariance of the flat activations gave before it was removed
    assert ratios["diagonal"].median() < 0.75
    assert 0.9 < ratios["low_rank"].median() < 1.1
    assert 0.8 < ratios["low_rank"].quantile(0.05) and ratios["low_rank"].quantile(0.95) < 1.2
    with pytest.raises(ValueError, match="covariance must be"):
        MomentPropagationWrapper(model, covariance="dense")
