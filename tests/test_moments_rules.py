"""Every moment rule against Monte-Carlo sampling of its operation on random Gaussian inputs.

Exact rules (the output moments of the operation are exactly what the rule says
for independent Gaussian inputs) are checked to within 5 Monte-Carlo standard
errors, estimated from the samples themselves: for the mean ``sqrt(s^2 / N)``,
for the variance ``sqrt((m4 - s^4) / N)``. Approximate rules state their own
tolerance next to the check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_relief.moments import functional as MF

N = 40_000  # Monte-Carlo samples per unit


def _gauss(shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g) * scale
    var = torch.rand(shape, generator=g) * scale**2 + 0.05
    return mean, var, g


def _sample(mean, var, g, n=N):
    return mean + var.sqrt() * torch.randn((n, *mean.shape), generator=g)


def _assert_exact(
    samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, k: float = 5.0, atol: float = 1e-5, rtol_var: float = 0.0
) -> None:
    """Rule moments equal the sample moments within ``k`` standard errors (plus ``atol``, ``rtol_var``)."""
    n = samples.shape[0]
    mc_mean = samples.mean(0)
    centred = samples - mc_mean
    mc_var = (centred**2).mean(0)
    se_mean = (mc_var / n).sqrt()
    se_var = (((centred**4).mean(0) - mc_var**2).clamp_min(0) / n).sqrt()
    assert torch.all((mean - mc_mean).abs() <= k * se_mean + atol), (mean - mc_mean).abs().max()
    tol_var = k * se_var + atol + rtol_var * mc_var
    assert torch.all((var - mc_var).abs() <= tol_var), ((var - mc_var).abs() / se_var.clamp_min(1e-12)).max()


def test_dropout_rule_matches_sampled_dropout():
    mean, var, g = _gauss((100,), scale=2.0)
    p = 0.3
    x = _sample(mean, var, g)
    keep = (torch.rand(x.shape, generator=g) >= p).float()
    _assert_exact(x * keep / (1 - p), *MF.dropout_moments(mean, var, p))


def test_dropout_of_deterministic_input_and_p_zero():
    mean = torch.randn(50)
    out_mean, out_var = MF.dropout_moments(mean, None, 0.5)
    torch.testing.assert_close(out_var, mean**2)  # (0 + p mu^2) / (1 - p) at p = 1/2
    var = torch.rand(50)
    out_mean, out_var = MF.dropout_moments(mean, var, 0.0)
    assert torch.equal(out_mean, mean) and torch.equal(out_var, var)
    with pytest.raises(ValueError, match="p must be in"):
        MF.dropout_moments(mean, var, 1.0)


def test_linear_rule_matches_sampling():
    mean, var, g = _gauss((6,), scale=1.5)
    weight, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    x = _sample(mean, var, g)
    _assert_exact(F.linear(x, weight, bias), *MF.linear_moments(mean, var, weight, bias))


def test_conv2d_rule_matches_sampling():
    mean, var, g = _gauss((2, 3, 5, 5))
    weight, bias = torch.randn(4, 3, 3, 3, generator=g) * 0.3, torch.randn(4, generator=g)
    x = _sample(mean, var, g, n=20_000)
    out = F.conv2d(x.flatten(0, 1), weight, bias, 2, 1).unflatten(0, (20_000, 2))
    _assert_exact(out, *MF.conv_moments(mean, var, weight, bias, 2, 1))


def test_conv1d_rule_matches_sampling():
    mean, var, g = _gauss((2, 3, 9))
    weight = torch.randn(2, 3, 3, generator=g) * 0.5
    x = _sample(mean, var, g, n=20_000)
    out = F.conv1d(x.flatten(0, 1), weight, None, 1, 1).unflatten(0, (20_000, 2))
    _assert_exact(out, *MF.conv_moments(mean, var, weight, None, 1, 1))


def test_batch_norm_rule_matches_sampling():
    mean, var, g = _gauss((2, 3, 4), scale=2.0)
    bn = torch.nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    x = _sample(mean, var, g, n=20_000)
    with torch.no_grad():
        out = bn(x.flatten(0, 1)).unflatten(0, (20_000, 2))
    rule = MF.batch_norm_moments(mean, var, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    _assert_exact(out, *rule)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_and_leaky_relu_rules_match_sampling(slope):
    mean, var, g = _gauss((100,), scale=2.0)
    x = _sample(mean, var, g)
    rule = MF.relu_moments(mean, var) if slope == 0 else MF.leaky_relu_moments(mean, var, slope)
    _assert_exact(F.leaky_relu(x, slope), *rule)


@pytest.mark.parametrize(("rule", "fn"), [(MF.sigmoid_moments, torch.sigmoid), (MF.tanh_moments, torch.tanh)])
def test_smooth_activations_match_sampling_within_quadrature_error(rule, fn):
    mean, var, g = _gauss((100,), scale=2.5)
    y = fn(_sample(mean, var, g))
    # 24-point Gauss-Hermite quadrature: within 5 standard errors plus 0.005, variance plus 5 %
    _assert_exact(y, *rule(mean, var), atol=0.005, rtol_var=0.05)


def test_max_of_two_gaussians_matches_sampling():
    mean1, var1, g = _gauss((100,), scale=2.0, seed=1)
    mean2, var2, _ = _gauss((100,), scale=2.0, seed=2)
    y = torch.maximum(_sample(mean1, var1, g), _sample(mean2, var2, g))
    _assert_exact(y, *MF.max_moments(mean1, var1, mean2, var2))


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(2, 2, 0), (3, 2, 1)])
def test_max_pool_matches_sampling_within_clark_error(kernel, stride, padding):
    mean, var, g = _gauss((2, 3, 8, 8))
    n = 20_000
    x = _sample(mean, var, g, n=n)
    y = F.max_pool2d(x.flatten(0, 1), kernel, stride, padding).unflatten(0, (n, 2))
    out_mean, out_var = MF.max_pool_moments(mean, var, kernel, stride, padding)
    # a window of more than two units re-approximates each running max by a Gaussian (Clark 1961):
    # measured here within 0.03 in the mean and 0.63..1.02 x in the variance
    torch.testing.assert_close(out_mean, y.mean(0), atol=0.05, rtol=0)
    ratio = out_var / y.var(0)
    assert 0.5 < ratio.min() and ratio.max() < 1.1


def test_avg_pool_divides_by_m_squared_not_m_cubed():
    mean, var, g = _gauss((2, 3, 6, 6))
    n = 20_000
    x = _sample(mean, var, g, n=n)
    y = F.avg_pool2d(x.flatten(0, 1), 3).unflatten(0, (n, 2))
    out_mean, out_var = MF.avg_pool_moments(mean, var, 3)
    _assert_exact(y, out_mean, out_var)
    window_sum = F.avg_pool2d(var, 3) * 9
    torch.testing.assert_close(out_var, window_sum / 81)  # the TF reference's m^3 would be 9x smaller


def test_avg_pool_with_padding_excluded_from_count_matches_sampling():
    mean, var, g = _gauss((1, 2, 5, 5))
    n = 20_000
    x = _sample(mean, var, g, n=n)
    y = F.avg_pool2d(x.flatten(0, 1), 3, 2, 1, count_include_pad=False).unflatten(0, (n, 1))
    _assert_exact(y, *MF.avg_pool_moments(mean, var, 3, 2, 1, count_include_pad=False))


def test_adaptive_and_global_average_pooling_match_sampling():
    mean, var, g = _gauss((2, 3, 4, 4))
    n = 20_000
    x = _sample(mean, var, g, n=n).flatten(0, 1)
    _assert_exact(F.adaptive_avg_pool2d(x, 2).unflatten(0, (n, 2)), *MF.adaptive_avg_pool_moments(mean, var, 2))
    _assert_exact(x.mean((2, 3)).unflatten(0, (n, 2)), *MF.mean_moments(mean, var, (2, 3)))
    with pytest.raises(ValueError, match="unequal windows"):
        MF.adaptive_avg_pool_moments(mean, var, 3)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gaussian_weight_layers_match_sampled_weights(kind):
    mean, var, g = _gauss((3, 4, 5, 5) if kind == "conv" else (3, 6))
    shape = (2, 4, 3, 3) if kind == "conv" else (5, 6)
    w_mean, w_var = torch.randn(shape, generator=g) * 0.5, torch.rand(shape, generator=g) * 0.2
    b_mean, b_var = torch.randn(shape[0], generator=g), torch.rand(shape[0], generator=g) * 0.2
    n = 10_000
    x = _sample(mean, var, g, n=n)
    # an independent weight draw for every sample and every input row
    w = w_mean + w_var.sqrt() * torch.randn((n, 3, *shape), generator=g)
    b = b_mean + b_var.sqrt() * torch.randn((n, 3, shape[0]), generator=g)
    if kind == "conv":
        cols = F.unfold(x.flatten(0, 1), 3, padding=1).unflatten(0, (n, 3))  # [n, 3, 4*9, 25]
        out = torch.einsum("nbkl,nbok->nbol", cols, w.flatten(-3)) + b[..., None]
        out = out.unflatten(-1, (5, 5))
        rule = MF.gaussian_conv_moments(mean, var, w_mean, w_var, b_mean, b_var, 1, 1)
    else:
        out = torch.einsum("nbi,nboi->nbo", x, w) + b
        rule = MF.gaussian_linear_moments(mean, var, w_mean, w_var, b_mean, b_var)
    _assert_exact(out, *rule)


def test_product_and_sum_of_independent_variables_match_sampling():
    mean1, var1, g = _gauss((100,), seed=3)
    mean2, var2, _ = _gauss((100,), seed=4)
    a, b = _sample(mean1, var1, g), _sample(mean2, var2, g)
    _assert_exact(a * b, *MF.product_moments(mean1, var1, mean2, var2))


# measured mean / max error against 10 000 samples (whose own standard error is ~0.005):
#   heterogeneous variances: Daunizeau 0.013 / 0.079, mean field 0.021 / 0.176 (no better than the
#   plug-in softmax of the means, 0.019 / 0.179), logit samples 0.002 / 0.016;
#   one variance per row:    Daunizeau 0.006 / 0.041, mean field 0.003 / 0.025, logit samples 0.002 / 0.019
@pytest.mark.parametrize(
    ("method", "shared_variance", "mean_tol", "max_tol"),
    [
        ("daunizeau", False, 0.02, 0.1),
        ("daunizeau", True, 0.01, 0.06),
        ("mean_field", True, 0.006, 0.04),
        ("logit_samples", False, 0.005, 0.03),
        ("logit_samples", True, 0.005, 0.03),
    ],
)
def test_softmax_approximation_matches_sampled_softmax(method, shared_variance, mean_tol, max_tol):
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(50, 10, generator=g) * 2
    var = torch.rand(50, 1 if shared_variance else 10, generator=g).expand(50, 10) * 3  # logit std up to 1.7
    x = mean + var.sqrt() * torch.randn(10_000, 50, 10, generator=g)
    mc = x.softmax(-1).mean(0)
    probs = MF.softmax_probs(mean, var, method=method)
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))
    err = (probs - mc).abs()
    plug_in = (mean.softmax(-1) - mc).abs()
    assert err.mean() < mean_tol and err.max() < max_tol
    assert err.mean() < 0.8 * plug_in.mean() and err.max() < 0.6 * plug_in.max()


def test_unknown_softmax_method_is_named():
    with pytest.raises(ValueError, match="method must be one of"):
        MF.softmax_probs(torch.zeros(1, 3), torch.zeros(1, 3), method="probit")


# ---- edge cases ------------------------------------------------------------------------------


def test_zero_variance_reproduces_the_deterministic_operation():
    x = torch.randn(2, 3, 8, 8) * 3
    zero = torch.zeros_like(x)
    m, v = MF.relu_moments(x, zero)
    torch.testing.assert_close(m, F.relu(x), atol=1e-30, rtol=0)  # std * phi(-10) is ~1e-41, not 0
    assert torch.equal(v, zero)
    m, v = MF.leaky_relu_moments(x, zero, 0.2)
    torch.testing.assert_close(m, F.leaky_relu(x, 0.2))
    assert torch.equal(v, zero)
    m, v = MF.max_pool_moments(x, zero, 2)
    torch.testing.assert_close(m, F.max_pool2d(x, 2))
    assert v.abs().max() == 0
    m, v = MF.max_pool_moments(x, zero, 3, 2, 1)
    torch.testing.assert_close(m, F.max_pool2d(x, 3, 2, 1))
    m, v = MF.sigmoid_moments(x, zero)
    torch.testing.assert_close(m, torch.sigmoid(x))
    assert v.max() < 1e-12
    logits = torch.randn(4, 10) * 5
    for method in MF.SOFTMAX_METHODS:
        torch.testing.assert_close(MF.softmax_log_probs(logits, torch.zeros_like(logits), method=method), logits.log_softmax(-1))


@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_very_large_means_stay_finite_and_accurate(scale):
    mean = torch.tensor([scale, -scale, scale, 0.0])
    var = torch.tensor([1.0, 1.0, 4.0, 1.0])
    m, v = MF.relu_moments(mean, var)
    assert torch.isfinite(m).all() and torch.isfinite(v).all()
    torch.testing.assert_close(m[:3], torch.tensor([scale, 0.0, scale]))
    torch.testing.assert_close(v[:3], torch.tensor([1.0, 0.0, 4.0]))  # no cancellation in E[y^2] - E[y]^2
    m, v = MF.max_moments(mean, var, mean.flip(0), var.flip(0))
    assert torch.isfinite(m).all() and torch.isfinite(v).all()
    torch.testing.assert_close(v, torch.tensor([1.0, 4.0, 4.0, 1.0]))
    m, v = MF.max_pool_moments(torch.full((1, 1, 2, 2), scale), torch.ones(1, 1, 2, 2), 2)
    # the max of four iid N(s, 1) has mean s + 1.0294 and variance 0.4917
    torch.testing.assert_close(m.flatten(), torch.tensor([scale + 1.0294]), rtol=1e-6, atol=0.05 + scale * 1e-7)
    probs = MF.softmax_probs(torch.tensor([[scale, 0.0, -scale]]), torch.ones(1, 3))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0]]))


def test_rules_work_in_float64():
    mean, var, _ = _gauss((3, 4))
    m, v = MF.relu_moments(mean.double(), var.double())
    m32, v32 = MF.relu_moments(mean, var)
    torch.testing.assert_close(m.float(), m32)
    torch.testing.assert_close(v.float(), v32)
    assert math.isfinite(float(v.sum()))


def test_rules_are_differentiable():
    # the rules run in place on their temporaries for speed; gradients through them must stay exact
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 3, 6, generator=g, dtype=torch.double, requires_grad=True)
    var = (torch.rand(2, 3, 6, generator=g, dtype=torch.double) + 0.1).requires_grad_()
    slope = torch.rand(3, dtype=torch.double, generator=g)
    checks = {
        "dropout": lambda m, v: MF.dropout_moments(m, v, 0.3),
        "dropout_of_deterministic": lambda m, v: MF.dropout_moments(m, None, 0.3),
        "relu": lambda m, v: MF.relu_moments(m, v),
        "leaky_relu": lambda m, v: MF.leaky_relu_moments(m, v, 0.1),
        "prelu": lambda m, v: MF.prelu_moments(m, v, slope),
        "max": lambda m, v: MF.max_moments(m, v, m.flip(-1), v.flip(-1)),
        "correlated_max_pool": lambda m, v: MF.max_pool_moments(
            m, v, 3, 2, dims=1, covariances={(k,): 0.5 * (v * v.roll(-k, -1)).sqrt() for k in (1, 2)}
        ),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (mean, var)), name


def test_max_of_tied_means_matches_sampling():
    # at equal means the rule blends both orderings half and half, which is exact because Clark's formulas are
    # symmetric there; the variances differ, so either ordering alone would have to be right too
    mean = torch.zeros(4)
    var1, var2 = torch.tensor([0.5, 1.0, 2.0, 0.0]), torch.tensor([1.5, 1.0, 0.1, 3.0])
    g = torch.Generator().manual_seed(5)
    y = torch.maximum(_sample(mean, var1, g), _sample(mean, var2, g))
    _assert_exact(y, *MF.max_moments(mean, var1, mean, var2))
    torch.testing.assert_close(MF.max_moments(mean, var1, mean, var2), MF.max_moments(mean, var2, mean, var1))


@pytest.mark.parametrize("offset", [(0, 1), (1, 0), (1, 1)])
def test_a_deterministic_input_drops_the_variance_term_only(offset):
    # var=None (the first Gaussian layer of a network) equals a zero variance, without its convolution
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 7, 7, generator=g)
    wm, wv, bv = torch.randn(4, 3, 3, 3, generator=g), torch.rand(4, 3, 3, 3, generator=g), torch.rand(4, generator=g)
    zero = torch.zeros_like(x)
    torch.testing.assert_close(
        MF.gaussian_conv_moments(x, None, wm, wv, None, bv, 1, 1), MF.gaussian_conv_moments(x, zero, wm, wv, None, bv, 1, 1)
    )
    torch.testing.assert_close(
        MF.conv_neighbour_cov(x, None, wm, wv, bv, 1, 1, 1, 1, offset),
        MF.conv_neighbour_cov(x, zero, wm, wv, bv, 1, 1, 1, 1, offset),
    )
