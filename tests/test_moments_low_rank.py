"""``covariance="low_rank"``: shared noise sources carried as factors (:mod:`lightning_relief.moments.low_rank`).

References: the covariance computed directly (dense matrices) for the algebra, Monte-Carlo
dropout for the logits' correlation and the mutual information it changes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relief.moments import MomentPropagationWrapper, mc_dropout_logits
from lightning_relief.moments import functional as MF
from lightning_relief.moments import low_rank as LR
from lightning_relief.uncertainty import functional as U
from moments_export import assert_compiles_to_matching_tvm


def test_the_sweep_gives_the_covariance_of_linear_relu_linear_computed_densely():
    g = torch.Generator().manual_seed(0)
    n, d0, d1, d2 = 3, 7, 5, 4
    std, slope = torch.rand(n, d0, generator=g), torch.rand(n, d1, generator=g)
    w1, w2 = torch.randn(d1, d0, generator=g), torch.randn(d2, d1, generator=g)
    # dense: Cov = M diag(std^2) M^T with M = W2 diag(s) W1, per input
    m = w2 @ (slope.unsqueeze(-1) * w1)  # [N, d2, d0]
    cov = m @ torch.diag_embed(std * std) @ m.transpose(1, 2)
    logits = torch.zeros(n, d2)
    sweep = LR.linear_back(LR.scale_back(LR.linear_back(LR.sweep_start(logits), w2), slope), w1)
    factor = LR.diag_sources(sweep, std)  # [N, C, K]
    torch.testing.assert_close(factor @ factor.transpose(1, 2), cov)
    share = F.linear(LR.scale_share(F.linear(std * std, w1 * w1), slope), w2 * w2)  # what the diagonal rules give
    var = LR.corrected_var(logits, share + 1.0, share, [LR.factor_variance(factor)])  # 1.0: from elsewhere, kept
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2) + 1.0)
    # the sweep's first linear step from the identity is the weight's rows
    torch.testing.assert_close(LR.linear_start(logits, w2), LR.linear_back(LR.sweep_start(logits), w2))
    kept = LR.logit_factor(torch.zeros(n, 8), [torch.randn(n, 8, 5, generator=g)])  # fewer sources than classes
    assert kept.shape == (n, 5, 8)


def test_more_sources_than_classes_are_compressed_to_as_many_as_classes():
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 7, generator=g)]
    compact = LR.logit_factor(torch.zeros(2, 3), factors)
    full = torch.cat(factors, dim=2)
    assert compact.shape == (2, 3, 3)
    torch.testing.assert_close(compact.transpose(1, 2) @ compact, full @ full.transpose(1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "size"),
    [(1, 1, 1, 1, 9), (2, 1, 1, 1, 9), (2, 1, 1, 1, 8), (1, 2, 2, 2, 9), (2, 0, 1, 2, 8)],
)
def test_the_sweep_through_a_convolution_is_its_adjoint(dims, stride, padding, dilation, groups, size):
    # reference: autograd's vector-Jacobian products, one per logit
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *(size,) * dims, generator=g, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 4 // groups, *(3,) * dims, generator=g, dtype=torch.double)
    y = (F.conv1d if dims == 1 else F.conv2d)(x, w, None, stride, padding, dilation, groups)
    sweep = torch.randn(2, 3, *y.shape[1:], generator=g, dtype=torch.double)
    reference = torch.stack([torch.autograd.grad(y, x, sweep[:, j], retain_graph=True)[0] for j in range(3)], 1)
    back = LR.conv_back(sweep, w, x.detach(), (stride,) * dims, (padding,) * dims, (dilation,) * dims, groups)
    torch.testing.assert_close(back, reference)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(("kernel", "stride", "dilation", "size"), [(2, 2, 1, 9), (3, 3, 1, 10), (3, 2, 1, 9), (2, 1, 2, 9)])
def test_the_sweep_through_a_max_pool_is_the_adjoint_of_its_win_mixture(dims, kernel, stride, dilation, size):
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(2, 4, *(size,) * dims, generator=g, dtype=torch.double)
    k, s, d = (kernel,) * dims, (stride,) * dims, (dilation,) * dims
    wins = MF.max_pool_wins(mean, torch.rand(mean.shape, generator=g, dtype=torch.double), k, s, d, dims)[2]
    torch.testing.assert_close(wins.sum(1), torch.ones_like(wins[:, 0]))  # probabilities of being the maximum
    x = mean.clone().requires_grad_(True)
    y = sum(wins[:, i] * window for i, window in enumerate(MF._window_slices(x, dims, k, s, d)))
    sweep = torch.randn(2, 3, *y.shape[1:], generator=g, dtype=torch.double)
    reference = torch.stack([torch.autograd.grad(y, x, sweep[:, j], retain_graph=True)[0] for j in range(3)], 1)
    torch.testing.assert_close(LR.pool_back(sweep, wins, mean, k, s, d), reference)


@pytest.mark.parametrize("correlated", [False, True])
def test_the_win_probabilities_are_the_derivatives_of_the_pooled_mean(correlated):
    # what makes a max pool's map of the sources first-order exact: d E[max] / d mean_i = P(x_i is the maximum)
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(3, 2, 8, generator=g, dtype=torch.double, requires_grad=True)
    var = torch.rand(3, 2, 8, generator=g, dtype=torch.double) + 0.1
    covariances = {(1,): 0.5 * (var * var.roll(-1, -1)).sqrt()} if correlated else None
    out_mean, _, wins = MF.max_pool_wins(mean, var, 2, 2, 1, 1, covariances)
    grad = torch.autograd.grad(out_mean.sum(), mean)[0]
    torch.testing.assert_close(grad, torch.stack([wins[:, 0], wins[:, 1]], -1).flatten(-2))


@pytest.mark.parametrize(("dims", "stride", "padding", "dilation"), [(1, 1, 1, 1), (2, 1, 1, 1), (2, 2, 0, 1), (1, 1, 2, 2)])
def test_the_factor_of_a_gaussian_convolution_gives_its_weight_noise_covariance(dims, stride, padding, dilation):
    # deterministic input: the output's whole covariance is the one weight draw's, checked against the
    # neighbour covariance rule (itself checked against sampling in test_moments_correlated.py)
    g = torch.Generator().manual_seed(2)
    spatial = (9,) * dims
    mean = torch.randn(2, 3, *spatial, generator=g)
    wm, wv = torch.randn(4, 3, *(3,) * dims, generator=g), torch.rand(4, 3, *(3,) * dims, generator=g) * 0.1
    bv = torch.rand(4, generator=g) * 0.1
    tup = (stride,) * dims, (padding,) * dims, (dilation,) * dims
    patches, sd, share = LR.gaussian_conv_sources(mean, wv, bv, *tup)
    factor = patches.unsqueeze(2) * sd.reshape(*sd.shape, *(1,) * dims)  # [N, R, C_out, *S]: source r of channel c
    torch.testing.assert_close(share, (factor * factor).sum(1))
    var = MF.gaussian_conv_moments(mean, torch.zeros_like(mean), wm, wv, None, bv, stride, padding, dilation)[1]
    torch.testing.assert_close((factor * factor).sum(1), var)
    offset = (1,) * dims
    cov = MF.conv_neighbour_cov(mean, torch.zeros_like(mean), wm, wv, bv, stride, padding, dilation, 1, offset)
    tail = (slice(None, -1),) * dims
    inner = (factor[(..., *tail)] * factor[(..., *((slice(1, None),) * dims))]).sum(1)
    torch.testing.assert_close(inner, cov[(..., *tail)])


def test_the_logits_correlation_brings_the_mutual_information_to_that_of_mc_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5)).eval()
    with torch.no_grad():  # classes that share a direction (as trained ones do): their logits move together
        model[3].weight.copy_(torch.randn(5, 32) * 0.3 + torch.randn(1, 32))
    x = torch.randn(64, 8) * 2
    probs = mc_dropout_logits(model, x, 20_000).softmax(-1)
    reference = U.mutual_information(probs)
    wrapper = MomentPropagationWrapper(model, covariance="low_rank")
    with torch.no_grad():
        correlated = wrapper.uncertainty(x)["mutual_information"]
        independent = MF.logit_uncertainty(*wrapper.moments(x))[2]
    # measured: with the classes' correlation 0.98x MC's mutual information, independent classes 5.4x
    assert 0.85 < (correlated / reference).median() < 1.15, (correlated / reference).median()
    assert (independent / reference).median() > 1.3, (independent / reference).median()


@pytest.mark.parametrize("covariance", ["diagonal", "low_rank"])
def test_low_rank_leaves_a_network_without_shared_sources_as_it_was(covariance):
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(5, 1, 8)
    mean, var = MomentPropagationWrapper(model, covariance=covariance)(x)
    assert mean.shape == var.shape == (5, 3) and bool((var > 0).all())


def test_the_diagonal_mode_correlates_the_logits_through_the_last_linear_layer():
    # one dropout layer right before the classifier: its units are independent, so the classes' covariance
    # W diag(v) W^T is exact, and the diagonal mode gives it as well
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5)).eval()
    x = torch.randn(6, 8)
    mean, var, factor = MomentPropagationWrapper(model).logit_moments(x)
    hidden = model[1](model[0](x))
    cov = model[3].weight @ torch.diag_embed(hidden * hidden * 0.3 / 0.7) @ model[3].weight.t()
    torch.testing.assert_close(factor.transpose(1, 2) @ factor, cov)
    torch.testing.assert_close(torch.diagonal(cov, dim1=1, dim2=2), var)
    low_rank = MomentPropagationWrapper(model, covariance="low_rank").logit_moments(x)[2]
    torch.testing.assert_close(low_rank.transpose(1, 2) @ low_rank, cov)


def test_moment_uncertainty_metric_takes_the_factor():
    from lightning_relief.moments import MomentUncertainty

    mean, var = torch.zeros(4, 3), torch.ones(4, 3)
    together = torch.ones(4, 1, 3)  # one source moving all logits together: the softmax does not change
    metric = MomentUncertainty()
    metric.update(mean, var, together)
    assert metric.compute().item() < 1e-6
    independent = MomentUncertainty()
    independent.update(mean, var)
    assert independent.compute().item() > 0.05
    with pytest.raises(ValueError, match="factor must be"):
        metric.update(mean, var, torch.ones(4, 3))


@pytest.mark.slow
def test_low_rank_compiles_to_one_tvm_graph_matching_pytorch():
    pytest.importorskip("tvm")
    pytest.importorskip("bayesian_torch")
    from bayesian_torch.layers import Conv1dReparameterization

    class Conv(nn.Module):  # bayesian-torch's layer without its KL output
        def __init__(self) -> None:
            super().__init__()
            self.layer = Conv1dReparameterization(1, 4, 3, padding=1)

        def forward(self, x):
            return self.layer(x, return_kl=False)

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv(), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    x = torch.randn(4, 1, 16)
    wrapper = MomentPropagationWrapper(model, covariance="low_rank")
    for rule in ("gaussian_conv_sources", "max_pool_wins", "conv_back", "pool_back", "linear_back", "channel_sources"):
        assert rule in wrapper.code, rule
    assert_compiles_to_matching_tvm(wrapper, x, rtol=1e-4, atol=1e-5)


class Tokens(nn.Module):
    """A ReLU transformer layer over 5 tokens, then the mean over tokens: dropout on [N, T, D] activations."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.layer.self_attn.dropout = 0.0  # sampled attention dropout would make two calls differ
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def test_dropout_on_tokens_adds_no_factor_and_changes_nothing():
    # the masks of a [N, T, D] activation are sources too, but their path ends at the residual sums and the
    # mean over tokens (no step rule): nothing is swept back (before, a ReLU feed-forward block made shapes disagree)
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention block is sampled
        low_rank = MomentPropagationWrapper(model, covariance="low_rank")
        diagonal = MomentPropagationWrapper(model)
    assert "sweep_start" not in low_rank.code
    torch.testing.assert_close(low_rank(x), diagonal(x))
    assert not low_rank.logit_moments(x)[2].any()


@pytest.mark.parametrize("covariance", ["diagonal", "low_rank"])
def test_per_token_logits_get_scores_without_shared_sources(covariance):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5, 4)  # [N, T, features]: logits [N, T, C]
    wrapper = MomentPropagationWrapper(model, covariance=covariance)
    mean, var, factor = wrapper.logit_moments(x)
    assert mean.shape == (2, 5, 3) and factor.shape[1] == 0
    scores = wrapper.uncertainty(x)
    assert scores["mutual_information"].shape == (2, 5)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("kind", ["conv_transpose", "upsample", "average"])
def test_the_sweep_through_the_other_linear_maps_is_their_adjoint(dims, kind):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, *(6,) * dims, generator=g, dtype=torch.double, requires_grad=True)
    if kind == "conv_transpose":
        w = torch.randn(4, 3, *(3,) * dims, generator=g, dtype=torch.double)
        y = (F.conv_transpose1d if dims == 1 else F.conv_transpose2d)(x, w, None, 2, 1, 1)  # output padding 1
    elif kind == "upsample":
        y = F.interpolate(x, scale_factor=2, mode="nearest")
    else:
        y = (F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d)(x, 3)
    sweep = torch.randn(2, 3, *y.shape[1:], generator=g, dtype=torch.double)
    reference = torch.stack([torch.autograd.grad(y, x, sweep[:, j], retain_graph=True)[0] for j in range(3)], 1)
    if kind == "conv_transpose":
        back = LR.conv_transpose_back(sweep, w, 2, 1, 1, 1)
    else:
        back = (LR.copies_back if kind == "upsample" else LR.average_back)(sweep, x.detach())
    torch.testing.assert_close(back, reference)


def test_low_rank_follows_input_noise_through_upsampling_and_a_transposed_convolution():
    # nearest upsampling copies units and a transposed convolution spreads one over a block: the next
    # convolution sums copies, which the per-unit rules count as independent
    from zoo import ZOO

    torch.manual_seed(0)
    model = ZOO["upsample"].make().eval()
    x = torch.rand(4, 1, 8, 8)
    var = torch.full_like(x, 0.05 * float(x.var()))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no dropout ...": the variance here is the input's
        noisy = x + var.sqrt() * torch.randn(1000, *x.shape)
        samples = model(noisy.flatten(0, 1)).reshape(1000, 4, -1)
        ratios = {
            covariance: (MomentPropagationWrapper(model, covariance=covariance).propagate_moments(x, var)[1] / samples.var(0))
            for covariance in ("diagonal", "low_rank")
        }
    # measured (seed 0): diagonal median 1.58 (1.27..1.99 for 5-95 %), low rank 0.99 (0.94..1.07)
    assert ratios["diagonal"].median() > 1.2
    assert 0.85 < ratios["low_rank"].median() < 1.15, ratios["low_rank"].median()


@pytest.mark.slow
def test_low_rank_through_upsampling_compiles_to_one_tvm_graph_matching_pytorch():
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.2), nn.ConvTranspose2d(2, 3, 2, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    x = torch.randn(4, 2, 4, 4)
    wrapper = MomentPropagationWrapper(model, covariance="low_rank")
    for rule in ("conv_transpose_back", "batch_norm_scale", "copies_back", "conv_back", "average_back", "diag_sources"):
        assert rule in wrapper.code, rule
    assert_compiles_to_matching_tvm(wrapper, x, rtol=1e-4, atol=1e-5)


def test_low_rank_follows_conv_dropout_through_batch_norm_relu_and_max_pool():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.3), nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.3, 0.3)
        model[2].running_var.uniform_(0.5, 1.5)
        model[2].weight.uniform_(-1.5, 1.5)  # negative scales too
    x = torch.rand(16, 1, 8, 8)
    samples = mc_dropout_logits(model, x, 4000)
    wrapper = MomentPropagationWrapper(model, covariance="low_rank")
    assert "batch_norm_scale" in wrapper.code and "pool_back" in wrapper.code
    with torch.no_grad():
        ratio = (wrapper(x)[1] / samples.var(0)).flatten()
    # measured: median 1.10 (1.00..1.23 for 5-95 %); the diagonal mode 1.15 (0.88..1.60). The rest is
    # the two-point dropout units under the max pool (Known limits)
    assert 0.9 < ratio.median() < 1.2 and 0.85 < ratio.quantile(0.05) and ratio.quantile(0.95) < 1.35, ratio.quantile(
        torch.tensor([0.05, 0.5, 0.95])
    )
