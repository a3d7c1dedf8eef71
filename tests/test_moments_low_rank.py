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


def test_a_mapped_factor_gives_the_covariance_of_linear_relu_linear_computed_densely():
    g = torch.Generator().manual_seed(0)
    n, d0, d1, d2 = 3, 7, 5, 4
    std, slope = torch.rand(n, d0, generator=g), torch.rand(n, d1, generator=g)
    w1, w2 = torch.randn(d1, d0, generator=g), torch.randn(d2, d1, generator=g)
    # dense: Cov = M diag(std^2) M^T with M = W2 diag(s) W1, per input
    m = w2 @ (slope.unsqueeze(-1) * w1)  # [N, d2, d0]
    cov = m @ torch.diag_embed(std * std) @ m.transpose(1, 2)
    mapped, var1 = LR.linear_factor(std, "diag", 0, w1, torch.zeros(n, d1))
    assert torch.equal(var1, torch.zeros(n, d1))  # independent sources: nothing added at the first layer
    mapped = LR.scale_factor(mapped, "mapped", slope)
    per_unit = F.linear(F.linear(std * std, w1 * w1) * slope * slope, w2 * w2)  # what the diagonal rule gives
    factor, var2 = LR.linear_factor(mapped, "mapped", 0, w2, per_unit)
    torch.testing.assert_close(var2, torch.diagonal(cov, dim1=1, dim2=2))
    torch.testing.assert_close(factor.transpose(1, 2) @ factor, cov)
    torch.testing.assert_close(LR.materialize(mapped, "mapped") @ w2.t(), factor)


def test_a_channels_factor_through_a_convolution_matches_the_dense_covariance():
    g = torch.Generator().manual_seed(1)
    n, r, c, length = 2, 3, 4, 9
    factor = torch.randn(n, r, c, length, generator=g)  # source (r, c) only in channel c
    weight = torch.randn(5, c, 3, generator=g)
    out, var = LR.conv_factor(factor, "channels", weight, torch.zeros(n, 5, length), (1,), (1,), (1,), 1)
    # dense: every source's own output, summed over sources
    each = torch.stack([
        F.conv1d(F.pad(factor[:, k, j : j + 1], (0, 0, j, c - j - 1)), weight, padding=1) for k in range(r) for j in range(c)
    ], dim=1)  # fmt: skip
    torch.testing.assert_close(out, each)
    before = F.conv1d((factor * factor).sum(1), weight * weight, padding=1)
    torch.testing.assert_close(var, ((each * each).sum(1) - before).clamp_min(0.0))


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
    factor = LR.gaussian_conv_factor(mean, wv, bv, *tup)
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


def test_a_factor_with_more_sources_than_max_rank_is_dropped(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(32, 5)).eval()  # fmt: skip
    monkeypatch.setattr(LR, "MAX_RANK", 16)
    wrapper = MomentPropagationWrapper(model, covariance="low_rank")
    assert "linear_factor" not in wrapper.code
    x = torch.randn(4, 8)
    torch.testing.assert_close(wrapper(x), MomentPropagationWrapper(model)(x))


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
    for rule in ("gaussian_conv_factor", "max_pool_factor_moments", "conv_factor", "linear_factor"):
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
    # per-unit masks of a [N, T, D] activation are per-token sources too: the factor layout cannot say so,
    # so they are carried as a zero factor (before, a ReLU feed-forward block made shapes disagree)
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention block is sampled
        low_rank = MomentPropagationWrapper(model, covariance="low_rank")
        diagonal = MomentPropagationWrapper(model)
    assert "linear_factor" in low_rank.code
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
