"""Photonic layers inside MomentPropagationWrapper: analytic logits' moments vs Monte-Carlo sampling."""

from __future__ import annotations

import pytest
import torch

from lightning_relief import MomentPropagationWrapper
from lightning_relief.models import MLP, LeNet5
from lightning_relief.photonic import convert_to_photonic, sample_logits


@pytest.mark.parametrize(
    "make", [lambda: MLP(in_features=64, dropout=0.0), lambda: LeNet5(input_size=8, dropout=0.0)], ids=["mlp", "lenet5"]
)
def test_wrapper_moments_match_sampling(make, seed):
    model = convert_to_photonic(make(), bandwidth_ratio=0.05, noise_floor=0.01).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        mean, var = MomentPropagationWrapper(model)(x)
        samples = sample_logits(model, x, 3000, seed=0)
    # the wrapper assumes independent Gaussian units after each ReLU: an approximation, hence the margins
    # (observed here: |mean error| < 0.07 std, variance ratio 0.83..1.10)
    assert ((mean - samples.mean(0)).abs() / samples.std(0)).max() < 0.2
    ratio = var / samples.var(0)
    assert 0.7 < ratio.min() and ratio.max() < 1.35


def test_wrapper_uses_the_layer_protocol_not_tracing():
    model = convert_to_photonic(MLP(in_features=64, dropout=0.0), bandwidth_ratio=0.05).eval()
    wrapper = MomentPropagationWrapper(model)
    assert wrapper.code.count("_protocol_call(") == 3  # each photonic layer answers for itself
