"""Noise models, schedules and placement against their closed forms (sample statistics vs formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_relief.models import MLP, LeNet5
from lightning_relief.noise import (
    AdditiveGaussian,
    CombinedGaussian,
    Constant,
    Cosine,
    DeploymentTime,
    LinearWarmup,
    MultiplicativeGaussian,
    NoiseInjector,
    PCMNoise,
    PerSampleVariance,
    Placement,
    RandomWalk,
    SequentialSchedule,
    Step,
    WeightNoise,
)
from lightning_relief.noise.pcm import drift_nu_params, prog_noise_std, read_noise_q, read_noise_time_factor

N = 200_000
ONE_YEAR_S = 365 * 24 * 3600.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_std(sample: torch.Tensor, expected: float, n_sigma: float = 5.0) -> None:
    """Sample std within n_sigma standard errors (SE of a normal std ≈ σ/sqrt(2n))."""
    se = expected / math.sqrt(2 * sample.numel())
    assert abs(float(sample.std()) - expected) < n_sigma * se + 1e-9, (float(sample.std()), expected)


def assert_mean(sample: torch.Tensor, expected: float, std: float, n_sigma: float = 5.0) -> None:
    se = std / math.sqrt(sample.numel())
    assert abs(float(sample.mean()) - expected) < n_sigma * se + 1e-9, (float(sample.mean()), expected)


# ---- Gaussian models: sample mean/std vs the formula
def test_additive_gaussian_statistics():
    x = torch.linspace(-2, 2, N)
    noise = AdditiveGaussian().apply(x, torch.tensor(0.3), gen()) - x
    assert_mean(noise, 0.0, 0.3)
    assert_std(noise, 0.3)
    relative = AdditiveGaussian(relative=True).apply(x, torch.tensor(0.1), gen()) - x
    assert_std(relative, 0.1 * 2.0)  # σ · max|x|


def test_multiplicative_gaussian_statistics():
    x = torch.full((N,), -1.5)
    eta = MultiplicativeGaussian().apply(x, torch.tensor(0.2), gen()) / x
    assert_mean(eta, 1.0, 0.2)
    assert_std(eta, 0.2)


def test_combined_gaussian_walking_noise_split():
    x = torch.full((N,), 2.0)
    amplitude, ratio = 0.4, 0.25
    y = CombinedGaussian(ratio=ratio).apply(x, torch.tensor(amplitude), gen())
    sigma_add, sigma_mul = amplitude * ratio, amplitude * (1 - ratio)
    expected = math.sqrt((2.0 * sigma_mul) ** 2 + sigma_add**2)  # Var = x²σ_mul² + σ_add²
    assert_mean(y, 2.0, expected)
    assert_std(y, expected)


def test_per_sample_level_scales_each_row():
    x = torch.zeros(4, 50_000)
    levels = torch.tensor([0.0, 0.1, 0.5, 1.0])
    y = AdditiveGaussian().apply(x, levels, gen())
    assert torch.equal(y[0], x[0])
    for row, sigma in zip(y[1:], levels[1:]):
        assert_std(row, float(sigma))


def test_weight_noise_matches_aihwkit_preset_scaling():
    layer = torch.nn.Linear(64, 256)
    w = layer.weight.detach()
    dw = WeightNoise().apply(w, torch.tensor(1.0), gen(), site="weights") - w
    assert_std(dw.flatten(), 0.0175 * float(w.abs().max()))
    x = torch.randn(3, 64)
    x[1] *= 5  # per-sample input scaling: output noise follows max|x_b|
    y = layer(x).detach()
    outs = torch.stack([WeightNoise().apply(y, torch.tensor(1.0), gen(s), "outputs", layer, (x,)) - y for s in range(400)])
    for b in range(3):
        expected = 0.04 * float(x[b].abs().max()) * float(w.abs().max())
        assert_std(outs[:, b].flatten(), expected)


def test_noise_model_argument_errors():
    with pytest.raises(ValueError, match="ratio"):
        CombinedGaussian(ratio=1.5)
    with pytest.raises(ValueError, match="w_noise"):
        WeightNoise(w_noise=-1)
    with pytest.raises(ValueError, match="g_max"):
        PCMNoise(g_max=0)
    with pytest.raises(ValueError, match="weights and outputs"):
        PCMNoise().apply(torch.ones(3), torch.tensor(1.0), site="activations")
    with pytest.raises(ValueError, match="out_noise"):
        PCMNoise(out_noise=-0.1)


# ---- PCM formulas vs reference.md §3, evaluated with numpy
def test_pcm_formulas_closed_form():
    g = np.linspace(0.0, 25.0, 101)
    gt = torch.tensor(g)
    g_hat = g / 25.0
    np.testing.assert_allclose(
        prog_noise_std(gt).numpy(), np.maximum(-1.1731 * g_hat**2 + 1.9650 * g_hat + 0.26348, 0), rtol=1e-12
    )
    mu, sig = drift_nu_params(gt)
    lg = np.log(np.clip(g_hat, 1e-7, None))
    np.testing.assert_allclose(mu.numpy(), np.clip(-0.0155 * lg + 0.0244, 0.049, 0.1), rtol=1e-12)
    np.testing.assert_allclose(sig.numpy(), np.clip(-0.0125 * lg - 0.0059, 0.008, 0.045), rtol=1e-12)
    q = read_noise_q(gt).numpy()
    np.testing.assert_allclose(q, np.minimum(0.0088 / np.clip(g_hat**0.65, 1e-3, None), 0.2), rtol=1e-12)
    t = 3600.0
    assert read_noise_time_factor(t) == pytest.approx(math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9))))


def test_pcm_drift_only_follows_power_law():
    """No programming/read noise: every device drifts by (t/t0)^-ν with ν ~ |N(μ_ν, σ_ν)|."""
    pcm = PCMNoise(prog_noise_scale=0.0, read_noise_scale=0.0, drift_compensation=False)
    w = torch.full((N,), 0.5)
    w[0] = 1.0  # the max maps to g_max; the rest sit at g = 12.5 µS
    t = 86400.0
    drifted = pcm.weights_at(w, t, gen())[1:] / 0.5
    mu, sigma = (float(v) for v in drift_nu_params(torch.tensor(12.5)))
    z = np.random.default_rng(0).standard_normal(2_000_000)
    reference = ((t + 20.0) / 20.0) ** (-np.abs(mu + sigma * z))
    assert float(drifted.mean()) == pytest.approx(reference.mean(), rel=2e-3)
    assert float(drifted.std()) == pytest.approx(reference.std(), rel=2e-2)


def test_pcm_global_drift_compensation_restores_mean_magnitude():
    w = torch.randn(256, 128)
    comp = PCMNoise(read_noise_scale=0.0, out_noise=0.0).weights_at(w, 3.15e7, gen(1))  # an ideal readout
    raw = PCMNoise(read_noise_scale=0.0, drift_compensation=False).weights_at(w, 3.15e7, gen(1))
    programmed = PCMNoise(read_noise_scale=0.0, drift_compensation=False).weights_at(w, 0.0, gen(1))
    assert float(raw.abs().mean()) < 0.75 * float(programmed.abs().mean())  # a year of drift shrinks weights
    assert float(comp.abs().mean()) == pytest.approx(float(programmed.abs().mean()), rel=1e-5)


def test_pcm_output_noise_scales_with_input_weight_and_drift_compensation():
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(4, 32)
    x[2] *= 3
    y = layer(x).detach()
    pcm = PCMNoise(out_noise=0.06)
    pcm.apply_weights([layer.weight.detach()], torch.tensor(ONE_YEAR_S), gen(), modules=[layer])
    gain = float(pcm._last_gains[0])  # the layer's digital drift-compensation factor
    assert gain > 1.2  # a year of drift: the digital compensation amplifies by about (t/t0)^0.05
    outs = torch.stack([pcm.apply(y, torch.tensor(ONE_YEAR_S), gen(s), "outputs", layer, (x,)) - y for s in range(300)])
    for b in range(4):
        assert_std(outs[:, b].flatten(), 0.06 * float(x[b].abs().max()) * float(layer.weight.abs().max()) * gain)
    assert torch.equal(PCMNoise(out_noise=0.0).apply(y, torch.tensor(1.0), gen(), "outputs", layer, (x,)), y)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_output_noise_is_relative_to_each_receptive_field(dims):
    """aihwkit multiplies unfolded patches: each output's noise scales with max|x| of its own patch."""
    conv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, *([9] * dims))
    x[..., :2] *= 10  # a few loud inputs: a per-sample max would overstate the noise of most outputs
    y = conv(x).detach()
    outs = torch.stack(
        [WeightNoise(out_noise=0.1).apply(y, torch.tensor(1.0), gen(s), "outputs", conv, (x,)) - y for s in range(400)]
    )
    x2 = x if dims == 2 else x[..., None]
    kernel, pad, stride = (3, 3) if dims == 2 else (3, 1), (1, 1) if dims == 2 else (1, 0), (2, 2) if dims == 2 else (2, 1)
    patch_max = torch.nn.functional.unfold(x2, kernel, padding=pad, stride=stride).abs().amax(1)  # [N, positions]
    expected = 0.1 * patch_max * float(conv.weight.abs().max())
    measured = outs.std(0).flatten(2).mean(1)  # [N, positions], pooled over the 4 output channels
    torch.testing.assert_close(measured, expected, rtol=0.12, atol=0)


def test_pcm_gradient_is_straight_through():
    w = torch.randn(8, 4, requires_grad=True)
    PCMNoise().apply(w, torch.tensor(100.0), gen(), site="weights").sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


# ---- schedules vs closed form
def test_deterministic_schedules_closed_form():
    warm = LinearWarmup(0.4, warmup_steps=8, start=0.1)
    for s in range(12):
        assert float(warm.level(s)) == pytest.approx(0.1 + 0.3 * min(s / 8, 1.0))
    cos = Cosine(1.0, 0.2, total_steps=50)
    for s in (0, 10, 25, 49, 50, 80):
        frac = min(s / 50, 1)
        assert float(cos.level(s)) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * frac)))
    step = Step(0.8, milestones=[10, 30], gamma=0.5)
    assert [float(step.level(s)) for s in (0, 9, 10, 29, 30, 99)] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])
    assert float(Constant(0.3).level(123)) == pytest.approx(0.3)


def test_per_sample_variance_vant_distribution():
    alpha, theta, sigma = 0.45, 0.66, 0.5
    levels = PerSampleVariance(sigma, alpha, theta).level(0, batch_size=N, generator=gen())
    assert levels.shape == (N,)
    # σ_i = α σ + θ |z|: half-normal mean θ sqrt(2/π), std θ sqrt(1 - 2/π)
    std = theta * math.sqrt(1 - 2 / math.pi)
    assert_mean(levels, alpha * sigma + theta * math.sqrt(2 / math.pi), std)
    assert float(levels.std()) == pytest.approx(std, rel=0.01)
    assert float(levels.min()) >= alpha * sigma


def test_sequential_schedule_warmup_then_per_sample():
    vant = SequentialSchedule([LinearWarmup(0.5, warmup_steps=10), PerSampleVariance(0.5, 0.45, 0.66)], milestones=[10])
    assert float(vant.level(4, batch_size=8)) == pytest.approx(0.2)
    assert vant.level(9, batch_size=8).dim() == 0
    assert vant.level(10, batch_size=8, generator=gen()).shape == (8,)
    with pytest.raises(ValueError, match="milestones"):
        SequentialSchedule([Constant(0.1), Constant(0.2)], milestones=[])
    with pytest.raises(ValueError, match="kinds"):
        SequentialSchedule([LinearWarmup(0.1, 5), DeploymentTime()], milestones=[5])


def test_random_walk_stays_in_bounds_and_steps_with_its_std():
    walk = RandomWalk(start=0.5, low=0.0, high=1.0, step_std=0.01)
    g = gen()
    values = torch.stack([walk.level(s, generator=g) for s in range(20_000)]).double()
    assert float(values[0]) == 0.5
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    steps = values.diff()
    inside = (values[:-1] > 0.05) & (values[:-1] < 0.95)  # away from the reflecting bounds
    assert_std(steps[inside], 0.01)
    # state round trip: a copy resumed from the state continues identically
    state, rng = walk.state_dict(), g.get_state()
    other = RandomWalk(start=0.5, low=0.0, high=1.0, step_std=0.01)
    other.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(rng)
    assert [float(walk.level(s, generator=g)) for s in range(20_000, 20_050)] == [
        float(other.level(s, generator=g2)) for s in range(20_000, 20_050)
    ]


def test_deployment_time_log_uniform_and_sweep():
    d = DeploymentTime(t_min=1.0, t_max=1e8)
    g = gen()
    logs = torch.tensor([math.log10(float(d.level(s, generator=g))) for s in range(20_000)])
    assert float(logs.min()) >= 0.0 and float(logs.max()) <= 8.0
    assert_mean(logs, 4.0, 8 / math.sqrt(12))
    assert float(logs.std()) == pytest.approx(8 / math.sqrt(12), rel=0.02)  # uniform on [0, 8]
    sweep = DeploymentTime(t_min=1.0, t_max=1e8, mode="sweep", total_steps=8)
    assert [float(sweep.level(s)) for s in range(9)] == pytest.approx([10.0**k for k in range(9)], rel=1e-6)


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(0.1, warmup_steps=0)
    with pytest.raises(ValueError, match="value"):
        Constant(-0.1)
    with pytest.raises(ValueError, match="low <= start <= high"):
        RandomWalk(start=2.0, low=0.0, high=1.0, step_std=0.1)
    with pytest.raises(ValueError, match="t_min"):
        DeploymentTime(t_min=10.0, t_max=1.0)


# ---- placement and injector
def test_placement_selection_by_type_and_name():
    model = LeNet5()
    assert [n for n, _ in Placement("weights").select(model)] == [
        "features.0.0",
        "features.1.0",
        "classifier.1",
        "classifier.4",
        "classifier.7",
    ]
    assert [n for n, _ in Placement("activations").select(model)] == [
        "features.0.2",
        "features.1.2",
        "classifier.2",
        "classifier.5",
    ]
    assert [n for n, _ in Placement("outputs", layers=["Linear"], exclude=["classifier.7"]).select(model)] == [
        "classifier.1",
        "classifier.4",
    ]
    assert [n for n, _ in Placement("outputs", layers=[], names=["features.0.*"]).select(model)] == [
        "features.0.0",
        "features.0.1",
        "features.0.2",
        "features.0.3",
    ]
    with pytest.raises(ValueError, match="site"):
        Placement("inputs")


def test_injector_validates_before_touching_the_model():
    with pytest.raises(ValueError, match="time level"):
        NoiseInjector(AdditiveGaussian(), DeploymentTime())
    with pytest.raises(ValueError, match="supports sites"):
        NoiseInjector(PCMNoise(), DeploymentTime(), "activations")
    with pytest.raises(TypeError, match="NoiseModel"):
        NoiseInjector("gaussian", 0.1)  # type: ignore[arg-type]
    model = MLP()
    with pytest.raises(ValueError, match="selects no layer"):
        NoiseInjector(AdditiveGaussian(), 0.1, Placement("outputs", layers=["Conv2d"])).attach(model)
    assert not any(m._forward_hooks for m in model.modules())


def test_injector_noise_only_inside_a_step_and_weights_restored_bit_exact():
    torch.manual_seed(0)
    model = MLP(dropout=0.0).eval()
    clean_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    clean = model(x)
    injector = NoiseInjector(WeightNoise(), 1.0).attach(model)
    with injector.step(batch_size=16) as level:
        assert float(level) == 1.0
        first, second = model(x), model(x)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)  # output noise is fresh per forward
    assert torch.equal(model(x), clean)
    injector.detach()
    assert all(torch.equal(v, clean_state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_injector_draws_depend_on_seed_and_step_only():
    model = MLP(dropout=0.0).eval()
    x = torch.randn(4, 1, 8, 8)

    def draws(seed, rank=0):
        injector = NoiseInjector(AdditiveGaussian(), 0.2, seed=seed).attach(model, rank=rank)
        out = []
        for _ in range(3):
            with injector.step(4):
                out.append(model(x).detach())
        injector.detach()
        return out

    a, b, c, other_rank = draws(0), draws(0), draws(1), draws(0, rank=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], other_rank[0])  # data-parallel ranks draw their own noise
