"""NormalPool: the training noise's cheap Gaussians (statistics, purity in the step, read-only use)."""

from __future__ import annotations

import pytest
import torch

from lightning_relief.noise import AdditiveGaussian, CombinedGaussian, MultiplicativeGaussian, PCMNoise, WeightNoise
from lightning_relief.noise.pool import NormalPool

CPU = torch.device("cpu")


def seed_of(step: int) -> int:
    return 1000 + step


def test_slices_are_standard_normal_and_independent_within_a_slice():
    pool = NormalPool(seed_of, chunks=8)
    pool.begin(0, offset_seed=1)
    eps = pool.take((400, 500), torch.float32, CPU)
    assert abs(float(eps.mean())) < 0.01 and float(eps.std()) == pytest.approx(1.0, abs=0.01)
    assert pool.size >= 4 * eps.numel()
    # neighbouring entries uncorrelated (distinct draws, not a repeated pattern)
    flat = eps.flatten()
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01


def test_pool_is_a_function_of_size_and_step():
    """A pool built fresh at step s (a resumed run) reads what the pool that ran every step reads."""
    straight = NormalPool(seed_of, chunks=4)
    for step in range(11):
        straight.begin(step, offset_seed=step)
        last = straight.take((1000,), torch.float32, CPU).clone()
    resumed = NormalPool(seed_of, chunks=4, size=straight.size)
    resumed.begin(10, offset_seed=10)
    assert torch.equal(resumed.take((1000,), torch.float32, CPU), last)


def test_one_chunk_is_redrawn_per_step():
    pool = NormalPool(seed_of, chunks=4)
    pool.begin(0, offset_seed=0)
    pool.take((100,), torch.float32, CPU)
    before = pool._pool.clone()
    pool.begin(1, offset_seed=0)
    pool.take((100,), torch.float32, CPU)
    changed = (pool._pool != before).float().mean()
    assert float(changed) == pytest.approx(0.25, abs=0.01)
    for step in range(2, 5):
        pool.begin(step, offset_seed=0)
        pool.take((100,), torch.float32, CPU)
    assert float((pool._pool != before).float().mean()) > 0.99


@pytest.mark.parametrize("inplace", [False, True])
def test_noise_models_never_write_into_the_pool(inplace):
    pool = NormalPool(seed_of, chunks=2)
    pool.begin(0, offset_seed=0)
    pool.take((8, 16), torch.float32, CPU)
    snapshot = pool._pool.clone()
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    level = torch.tensor(0.3)
    for model in (AdditiveGaussian(), AdditiveGaussian(relative=True), MultiplicativeGaussian(), CombinedGaussian()):
        model.apply(layer(x).detach(), level, pool, "outputs", layer, (x,), inplace=inplace)
    WeightNoise().apply(layer(x).detach(), torch.tensor(1.0), pool, "outputs", layer, (x,), inplace=inplace)
    WeightNoise().apply(layer.weight.detach(), torch.tensor(1.0), pool, "weights")
    pcm = PCMNoise()
    pcm.apply_weights([layer.weight.detach()], torch.tensor(3600.0), pool, modules=[layer])
    pcm.apply(layer(x).detach(), torch.tensor(3600.0), pool, "outputs", layer, (x,), inplace=inplace)
    assert torch.equal(pool._pool, snapshot)


def test_pcm_statistics_equal_with_pool_and_fresh_draws():
    """The pool changes where numbers come from, not the PCM model: mean |w| and spread after a day agree."""
    w = torch.randn(300, 200)
    pcm = PCMNoise(drift_compensation=False)
    fresh = pcm.weights_at(w, 86400.0, torch.Generator().manual_seed(0)) - w
    pool = NormalPool(seed_of)
    pool.begin(0, offset_seed=0)
    pooled = pcm.weights_at(w, 86400.0, pool) - w
    assert float(pooled.mean()) == pytest.approx(float(fresh.mean()), abs=3e-3)
    assert float(pooled.std()) == pytest.approx(float(fresh.std()), rel=0.02)
