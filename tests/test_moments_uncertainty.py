"""Uncertainty scores from Gaussian logits (predictive / expected entropy, mutual information)
against direct Monte-Carlo: many logit draws, and MC dropout through the network."""

from __future__ import annotations

import pytest
import torch

from lightning_relief.models import LeNet5
from lightning_relief.moments import MomentPropagationWrapper, MomentUncertainty, mc_dropout_logits
from lightning_relief.moments import functional as MF
from lightning_relief.uncertainty import functional as U


def _direct(mean, var, n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = (mean + var.sqrt() * torch.randn((n, *mean.shape), generator=g, dtype=mean.dtype)).softmax(-1)
    return (
        U.predictive_entropy(probs.mean(0)),
        U.predictive_entropy(probs.flatten(0, 1)).view(n, -1).mean(0),
        U.mutual_information(probs),
    )


def test_scores_of_gaussian_logits_match_many_logit_draws():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 10, generator=g, dtype=torch.float64) * 2
    var = torch.rand(64, 10, generator=g, dtype=torch.float64) * torch.rand(64, 1, generator=g, dtype=torch.float64) * 4
    total, expected, mutual = MF.logit_uncertainty(mean, var)
    ref_total, ref_expected, ref_mutual = _direct(mean, var)
    # 256 antithetic draws against 20 000: measured max |diff| 0.033 / 0.047 / 0.040, mean 0.008 / 0.011 / 0.011
    # (mutual information: mean 0.22 here)
    for ours, reference in ((total, ref_total), (expected, ref_expected), (mutual, ref_mutual)):
        assert (ours - reference).abs().max() < 0.08 and (ours - reference).abs().mean() < 0.02
    assert torch.corrcoef(torch.stack([mutual, ref_mutual]))[0, 1] > 0.99  # ranks inputs as the reference does
    zero = MF.logit_uncertainty(mean, torch.zeros_like(var))
    assert zero[2].abs().max() < 1e-12  # certain logits: no epistemic part
    torch.testing.assert_close(zero[0], U.predictive_entropy(mean.softmax(-1)))


def test_metric_class_accumulates_the_functional_value():
    g = torch.Generator().manual_seed(1)
    mean, var = torch.randn(50, 5, generator=g), torch.rand(50, 5, generator=g)
    for score, index in (("predictive_entropy", 0), ("expected_entropy", 1), ("mutual_information", 2)):
        metric = MomentUncertainty(score)
        metric.update(mean[:20], var[:20])
        metric.update(mean[20:], var[20:])
        torch.testing.assert_close(metric.compute(), MF.logit_uncertainty(mean, var)[index].mean())
    with pytest.raises(ValueError, match="score must be one of"):
        MomentUncertainty("variance")
    with pytest.raises(ValueError, match="non-negative"):
        MomentUncertainty().update(mean, -var)


def test_mutual_information_of_the_wrapper_tracks_mc_dropout(digits):
    torch.manual_seed(0)
    model = LeNet5(input_size=8, dropout=0.5).eval()
    x = digits.dataset("test").tensors[0][:64] * 3  # larger logits: a spread of uncertainty
    with torch.no_grad():
        scores = MomentPropagationWrapper(model).uncertainty(x)
        mc = mc_dropout_logits(model, x, 2000).softmax(-1)
    reference = U.mutual_information(mc)
    # the logit moments are MC dropout's to within their own approximation: measured mean |diff| 6 % of the mean
    assert (scores["mutual_information"] - reference).abs().mean() < 0.15 * reference.mean()
    assert torch.corrcoef(torch.stack([scores["mutual_information"], reference]))[0, 1] > 0.95
    torch.testing.assert_close(scores["predictive_entropy"], U.predictive_entropy(mc.mean(0)), atol=0.05, rtol=0.05)
