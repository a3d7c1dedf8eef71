"""Round-2 rules (activations, clamps, normalisation, transposed convolution, upsampling, attention)
against Monte-Carlo sampling, and the warnings/errors that keep moment propagation from being silently wrong.

Exact rules are held to 5 Monte-Carlo standard errors; quadrature and first-order rules to the
stated bounds, each a few times the measured error so that a wrong rule (a missing factor, a
dropped term) fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relief.moments import MomentPropagationWrapper, UnsupportedOperationError
from lightning_relief.moments import functional as MF
from moments_export import assert_compiles_to_matching_tvm
from test_moments_rules import _assert_exact, _gauss, _sample


@pytest.mark.parametrize(("low", "high"), [(-1.0, 2.0), (0.0, 6.0), (None, 0.5), (-0.5, None)])
def test_clamp_rule_is_exact(low, high):
    mean, var, g = _gauss((200,), scale=2.5)
    y = _sample(mean, var, g).clamp(low, high)
    _assert_exact(y, *MF.clamp_moments(mean, var, low, high), atol=1e-4)


def test_clamp_rule_at_zero_variance_and_far_bounds():
    mean = torch.tensor([0.5, 5.0, -5.0, 1e6])
    out_mean, out_var = MF.clamp_moments(mean, torch.zeros(4), -1.0, 2.0)
    assert torch.equal(out_var, torch.zeros(4))
    torch.testing.assert_close(out_mean, mean.clamp(-1.0, 2.0))


@pytest.mark.parametrize(
    ("name", "fn", "tol"),
    [
        ("gelu", F.gelu, 0.003),
        ("silu", F.silu, 0.003),
        ("mish", F.mish, 0.003),
        ("softplus", F.softplus, 0.003),
        ("elu", F.elu, 0.005),
        ("selu", F.selu, 0.005),
        # a kink in the slope at +-3: quadrature is least accurate there
        ("hardswish", F.hardswish, 0.02),
    ],
)
def test_activations_by_quadrature_match_sampling(name, fn, tol):
    mean, var, g = _gauss((200,), scale=2.5)
    y = fn(_sample(mean, var, g))
    _assert_exact(y, *MF.activation_moments(mean, var, name), atol=tol, rtol_var=5 * tol)


def test_alpha_dropout_rule_is_exact_and_keeps_a_standard_normal():
    mean, var, g = _gauss((200,), scale=1.5)
    x = _sample(mean, var, g)
    torch.manual_seed(0)
    _assert_exact(F.alpha_dropout(x, 0.3, training=True), *MF.alpha_dropout_moments(mean, var, 0.3))
    m, v = MF.alpha_dropout_moments(torch.zeros(1), torch.ones(1), 0.3)  # SELU's self-normalising fixed point
    torch.testing.assert_close((m, v), (torch.zeros(1), torch.ones(1)))


def test_prelu_rule_with_one_slope_per_channel_is_exact():
    mean, var, g = _gauss((2, 3, 4), scale=2.0)
    weight = torch.tensor([0.25, -0.1, 0.6])
    y = F.prelu(_sample(mean, var, g, n=20_000).flatten(0, 1), weight).unflatten(0, (20_000, 2))
    _assert_exact(y, *MF.prelu_moments(mean, var, weight))


def test_conv_transpose_rule_is_exact():
    mean, var, g = _gauss((2, 3, 4, 4))
    weight, bias = torch.randn(3, 2, 3, 3, generator=g) * 0.4, torch.randn(2, generator=g)
    n = 20_000
    y = F.conv_transpose2d(_sample(mean, var, g, n=n).flatten(0, 1), weight, bias, 2, 1, 1).unflatten(0, (n, 2))
    _assert_exact(y, *MF.conv_transpose_moments(mean, var, weight, bias, 2, 1, 1))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_normalisation_rules_match_sampling_to_first_order(norm):
    # 32 units per group: the normaliser concentrates; inputs' std up to half their spread
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 8, 16, generator=g) * 2
    var = torch.rand(4, 8, 16, generator=g) * 0.8 + 0.05
    n = 20_000
    x = _sample(mean, var, g, n=n).flatten(0, 1)
    weight, bias = torch.randn(16, generator=g), torch.randn(16, generator=g)
    if norm == "layer":
        y = F.layer_norm(x, (16,), weight, bias)
        out = MF.layer_norm_moments(mean, var, (16,), weight, bias, 1e-5)
    else:
        y = F.group_norm(x.transpose(1, 2), 4, weight, bias).transpose(1, 2)
        out = MF.group_norm_moments(mean.transpose(1, 2), var.transpose(1, 2), 4, weight, bias, 1e-5)
        out = (out[0].transpose(1, 2), out[1].transpose(1, 2))
    y = y.unflatten(0, (n, 4))
    mc_std = y.std(0)
    # measured: means within 0.05 std, variance ratios 0.88..1.1 (the normaliser's own noise is dropped)
    assert ((out[0] - y.mean(0)).abs() / mc_std).max() < 0.15
    ratio = out[1] / y.var(0)
    assert 0.8 < ratio.min() and ratio.max() < 1.2, (ratio.min(), ratio.max())
    # without the centring and normaliser terms (v * w^2 / s^2) the ratio would drift with the input noise
    naive = var * weight**2 / (mean.var(-1, unbiased=False, keepdim=True) + 1e-5) if norm == "layer" else None
    if naive is not None:
        assert (naive / y.var(0)).max() > 1.2


def test_max_pool_with_ceil_mode_and_adaptive_max_pool_match_sampling():
    mean, var, g = _gauss((1, 2, 7, 7))
    n = 20_000
    x = _sample(mean, var, g, n=n).flatten(0, 1)
    y = F.max_pool2d(x, 2, 2, ceil_mode=True).unflatten(0, (n, 1))
    out_mean, out_var = MF.max_pool_moments(mean, var, 2, 2, ceil_mode=True)
    assert out_mean.shape == y.shape[1:]
    torch.testing.assert_close(out_mean, y.mean(0), atol=0.05, rtol=0)
    assert 0.6 < (out_var / y.var(0)).min() and (out_var / y.var(0)).max() < 1.1
    # the last row/column (one unit, or two) must be exact: the padding units never win
    _assert_exact(y[..., -1, -1], out_mean[..., -1, -1], out_var[..., -1, -1])
    mean, var, g = _gauss((1, 2, 8, 8))
    y = F.adaptive_max_pool2d(_sample(mean, var, g, n=n).flatten(0, 1), 4).unflatten(0, (n, 1))
    out_mean, out_var = MF.adaptive_max_pool_moments(mean, var, 4)
    torch.testing.assert_close(out_mean, y.mean(0), atol=0.05, rtol=0)  # the same 2x2 Clark chain as max_pool2d
    torch.testing.assert_close(out_mean, MF.max_pool_moments(mean, var, 2)[0])
    with pytest.raises(ValueError, match="unequal windows"):
        MF.adaptive_max_pool_moments(mean, var, 3)


def _compare_networks(model, x, n=4000, mean_tol=0.15, ratio=(0.6, 1.6), input_var=0.0):
    var = torch.full_like(x, input_var)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = MomentPropagationWrapper(model)
        mean, out_var = wrapper.propagate_moments(x, var) if input_var else wrapper(x)
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        samples = torch.stack([model(x + var.sqrt() * torch.randn_like(x)) for _ in range(n)])
    model.eval()
    mc_mean, mc_std = samples.mean(0), samples.std(0)
    r = out_var / samples.var(0)
    assert ((mean - mc_mean).abs() / mc_std).max() < mean_tol
    assert ratio[0] < r.median() < ratio[1], r.median()
    return r


def test_transformer_encoder_layer_with_attention_sampled_matches_mc():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation="gelu", batch_first=True)
    model = nn.Sequential(layer, nn.LayerNorm(16), nn.Flatten(), nn.Linear(16 * 5, 4))
    x = torch.randn(3, 5, 16)
    with pytest.warns(UserWarning, match=r"samples the attention block '0.self_attn'"):
        MomentPropagationWrapper(model).propagate_moments(x, torch.full_like(x, 0.05))
    # measured: variance ratio median 0.83 (0.70..0.90): the residual sums add correlated branches as
    # if independent; the attention block itself is sampled
    r = _compare_networks(model, x, n=2000, input_var=0.05, ratio=(0.7, 1.3))
    assert 0.5 < r.min() and r.max() < 1.6
    # a deterministic input: the attention block is still sampled, for its attention dropout (0.1);
    # measured median 0.84 (0.67..1.04); without the attention dropout it would be ~0.35
    with pytest.warns(UserWarning, match=r"samples the attention block '0.self_attn'"):
        MomentPropagationWrapper(model)
    r = _compare_networks(model, x, n=2000, ratio=(0.7, 1.3))
    assert 0.5 < r.min() and r.max() < 1.6


def test_new_layers_in_one_network_match_mc():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Dropout(0.2),
        nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Hardswish(), nn.Upsample(scale_factor=0.5, mode="nearest"),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.AdaptiveMaxPool2d(2), nn.ReLU6(), nn.Flatten(), nn.AlphaDropout(0.1),
        nn.Linear(16, 8), nn.PReLU(), nn.Hardtanh(-1, 1), nn.Linear(8, 3), nn.LogSoftmax(-1),
    ).eval()  # fmt: skip
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="ends in log_softmax"):
        MomentPropagationWrapper(model)
    # the output is the logits' moments: compare with the logits of the sampled network
    _compare_networks(nn.Sequential(*list(model)[:-1]), x, mean_tol=0.3, ratio=(0.7, 1.4))


def test_softmax_inside_the_network_is_an_error():
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 2))
    with pytest.raises(UnsupportedOperationError, match="softmax is only supported at the output") as info:
        MomentPropagationWrapper(model)
    assert info.value.module_path == "3"


def test_custom_activation_declared_elementwise_uses_quadrature():
    class Square(nn.Module):
        def forward(self, x):
            return x * x  # traced, this would be a product of two "independent" copies of x

    model = nn.Sequential(nn.Linear(6, 6), Square())
    mean, var, g = _gauss((5, 6))
    out = MomentPropagationWrapper(model, elementwise=(Square,)).propagate_moments(mean, var)
    with torch.no_grad():
        samples = model(_sample(mean, var, g))
    _assert_exact(samples, *out)  # a Gaussian input stays Gaussian through Linear, and x^2 is a polynomial


def test_dropout_guarded_by_the_training_flag_is_named_in_a_warning():
    class Guarded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            if self.training:
                x = F.dropout(x, 0.2)
                x = self.drop(x)
            return self.fc(x)

    with pytest.warns(UserWarning, match=r"does not reach module 'drop' \(Dropout\); dropout in the root forward"):
        MomentPropagationWrapper(Guarded())


def test_recurrent_layer_is_a_typed_error_naming_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)
            self.lstm = nn.LSTM(3, 4)

        def forward(self, x):
            return self.lstm(self.drop(x))[0]

    with pytest.raises(UnsupportedOperationError) as info:
        MomentPropagationWrapper(Net())
    assert (info.value.module_path, info.value.layer_type) == ("lstm", "LSTM")


@pytest.mark.slow
def test_new_rules_compile_to_one_tvm_graph_matching_pytorch():
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.2), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),  # correlated pool
        nn.ConvTranspose2d(4, 4, 2, stride=2), nn.GELU(), nn.Upsample(scale_factor=0.5), nn.GroupNorm(2, 4),
        nn.Hardswish(), nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU6(), nn.Hardsigmoid(),
        nn.Linear(16, 3), nn.LogSoftmax(-1),
    ).eval()  # fmt: skip
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ends in log_softmax
        wrapper = MomentPropagationWrapper(model)
    assert "conv_neighbour_cov" in wrapper.code
    assert_compiles_to_matching_tvm(wrapper, x, rtol=1e-4, atol=1e-5)


class FunctionalForms(nn.Module):
    """The functional and method spellings of the round-2 rules, with their keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.gelu(self.conv(x), approximate="tanh")
        x = F.max_pool1d(x, 3, 2, ceil_mode=True)  # [N, 4, 4]
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # [N, 4, 8]
        x = F.softplus(x, beta=2.0).clamp(min=0.1, max=3.0)
        x = F.layer_norm(x, (8,), self.norm.weight, self.norm.bias)
        x = F.elu(x, alpha=0.5)
        return self.fc(F.hardtanh(x, -0.5, 1.5).amax(dim=1))


class ModuleForms(FunctionalForms):
    """The same computation spelled with modules (and a max pool over the channels for ``amax``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.GELU(approximate="tanh"), nn.MaxPool1d(3, 2, ceil_mode=True), nn.Upsample(scale_factor=2),
            nn.Softplus(beta=2.0), nn.Hardtanh(0.1, 3.0), self.norm, nn.ELU(alpha=0.5), nn.Hardtanh(-0.5, 1.5),
        )  # fmt: skip

    def forward(self, x):
        x = self.layers(self.conv(x))
        return self.fc(F.max_pool2d(x.unsqueeze(1), (4, 1)).flatten(1))


def test_functional_spellings_and_their_arguments_equal_the_module_forms():
    # each rule is checked against sampling above; this checks that the arguments reach it
    torch.manual_seed(0)
    functional = FunctionalForms().eval()
    modules = ModuleForms().eval()
    modules.load_state_dict(functional.state_dict(), strict=False)
    mean, var = torch.randn(6, 2, 8), torch.rand(6, 2, 8) * 0.5
    out = MomentPropagationWrapper(functional).propagate_moments(mean, var)
    expected = MomentPropagationWrapper(modules).propagate_moments(mean, var)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the two models are the same function
        torch.testing.assert_close(functional(mean), modules(mean))
