"""MomentPropagationWrapper on whole networks against Monte-Carlo sampling, and its integration.

Ground truth is MC dropout with 4 000 samples (standard error of a logit mean
1.6 % of its std, of a variance about 2.2 %). Moment propagation assumes independent Gaussian units, so
whole networks are compared loosely where that assumption breaks: means within a
fraction of the MC logit std, variances within a factor. Where the network is
exact under the assumption (a dropout followed only by linear layers) the
comparison is tight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relief.errors import ReliefError
from lightning_relief.models import MLP, ClassifierModule, LeNet5, resnet8
from lightning_relief.moments import (
    MomentPropagationWrapper,
    UnsupportedOperationError,
    mc_bayesian_logits,
    mc_dropout_logits,
)
from moments_export import assert_compiles_to_matching_tvm

SAMPLES = 4_000


class ResidualDropoutNet(nn.Module):
    """Functional dropout inside a residual block, max and adaptive average pooling."""

    def __init__(self, p: float = 0.2, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, 10)
        self.p = p

    def forward(self, x):
        x = F.dropout(F.relu(self.stem(x)), self.p, training=True)  # always on: MC dropout by construction
        h = F.dropout(F.relu(self.bn1(self.conv1(x))), self.p, training=True)
        x = F.relu(x + self.conv2(h))
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


def _bayesian_mlp():
    from bayesian_torch.layers import LinearReparameterization

    class BayesMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = LinearReparameterization(64, 32, posterior_rho_init=-2.0)
            self.fc2 = LinearReparameterization(32, 10, posterior_rho_init=-2.0)

        def forward(self, x):
            x, kl1 = self.fc1(torch.flatten(x, 1))
            x, kl2 = self.fc2(F.relu(x))
            return x, kl1 + kl2

    return BayesMLP()


@pytest.fixture
def images(digits):
    return digits.dataset("test").tensors[0][:8]


def _randomise_batch_norm(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _compare(mean, var, samples, mean_tol, ratio_range, median_range):
    mc_mean, mc_std = samples.mean(0), samples.std(0)
    ratio = var / samples.var(0)
    assert ((mean - mc_mean).abs() / mc_std).max() < mean_tol
    assert ratio_range[0] < ratio.min() and ratio.max() < ratio_range[1], (ratio.min(), ratio.max())
    assert median_range[0] < ratio.median() < median_range[1], ratio.median()


@pytest.mark.parametrize(
    ("name", "build", "mean_tol", "ratio_range", "median_range"),
    [
        # ReLU and dropout stacked twice: Gaussian re-approximation after each hidden layer
        # (measured: means within 0.03 std, ratios 0.82..1.26)
        ("mlp", lambda: MLP(dropout=0.3), 0.1, (0.7, 1.4), (0.9, 1.12)),
        # dropout only in the classifier, before linear + ReLU layers (measured 0.02 std, 0.85..1.12)
        ("lenet", lambda: LeNet5(input_size=8, dropout=0.3), 0.1, (0.7, 1.3), (0.9, 1.12)),
        # dropout -> linear at the head is exact under independence (measured 0.03 std, 0.98..1.02)
        ("resnet", lambda: resnet8(width=8, dropout=0.3), 0.1, (0.88, 1.12), (0.96, 1.04)),
        # functional dropout, a residual sum of correlated branches, max pooling of correlated
        # units: the independence assumption is broken three ways (measured 0.60 std, 0.56..1.43)
        ("residual", lambda: ResidualDropoutNet(), 0.8, (0.4, 2.0), (0.8, 1.25)),
    ],
)
def test_whole_network_matches_mc_dropout(name, build, mean_tol, ratio_range, median_range, images, seed):
    model = _randomise_batch_norm(build())
    mean, var = MomentPropagationWrapper(model)(images)
    samples = mc_dropout_logits(model, images, SAMPLES)
    _compare(mean, var, samples, mean_tol, ratio_range, median_range)


def test_bayesian_torch_network_matches_sampled_weights(images, seed):
    model = _bayesian_mlp()
    wrapper = MomentPropagationWrapper(model)
    mean, var = wrapper(images)
    samples = mc_bayesian_logits(model, images, 2000)
    # the first layer is exact, the second sees a ReLU of a sum of 64 terms (near Gaussian)
    _compare(mean, var, samples, 0.15, (0.75, 1.33), (0.9, 1.1))
    assert "kl_loss" not in wrapper.code  # the (out, kl) tuple is resolved and the KL dropped


def test_moment_probabilities_match_mc_predictive(images, seed):
    model = _randomise_batch_norm(LeNet5(input_size=8, dropout=0.5))
    with torch.no_grad():  # larger weights: logit spread comparable to a trained net
        for p in model.parameters():
            p.mul_(3)
    wrapper = MomentPropagationWrapper(model, output="probs")
    probs = wrapper(images)
    mc = mc_dropout_logits(model, images, SAMPLES).softmax(-1).mean(0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(images)))
    # Daunizeau's softmax approximation on LeNet logits (measured: max error 0.07)
    error = (probs - mc).abs()
    assert error.max() < 0.1 and error.mean() < 0.02
    torch.testing.assert_close(wrapper.predict_proba(images), probs)
    torch.testing.assert_close(MomentPropagationWrapper(model, output="log_probs")(images).exp(), probs)


def test_dropout_rate_zero_gives_the_deterministic_network(images):
    model = _randomise_batch_norm(LeNet5(input_size=8, dropout=0.0)).eval()
    mean, var = MomentPropagationWrapper(model)(images)
    torch.testing.assert_close(mean, model(images))
    assert torch.equal(var, torch.zeros_like(var))


def test_network_without_randomness_warns_and_has_zero_variance(images):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.warns(UserWarning, match="variance is zero"):
        wrapper = MomentPropagationWrapper(model)
    mean, var = wrapper(images)
    torch.testing.assert_close(mean, model(images))
    assert torch.equal(var, torch.zeros_like(var))


def test_layers_before_the_first_dropout_run_unchanged():
    code = MomentPropagationWrapper(LeNet5(input_size=8)).code
    # the conv features are deterministic: called as the original modules, no moment rule
    assert "self.model.features" in code and "conv_moments" not in code and "max_pool_moments" not in code
    assert code.count("functional_dropout_moments(") == 2


# ---- errors that name the operation and where it is -------------------------------------------


def test_unsupported_module_names_its_class_path_and_what_is_supported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.2)
            self.rnn = nn.GRU(8, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(self.drop(x.flatten(2)))[0]

    with pytest.raises(UnsupportedOperationError, match=r"GRU; supported modules: .*Conv2d.*module 'rnn'") as info:
        MomentPropagationWrapper(Net())
    assert (info.value.module_path, info.value.layer_type) == ("rnn", "GRU")
    assert isinstance(info.value, ReliefError) and isinstance(info.value, NotImplementedError)


def test_unsupported_function_names_it_and_the_source_line():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Flatten(), nn.Dropout(0.1))
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            return torch.cumsum(self.fc(self.block(x)), 1)

    with pytest.raises(UnsupportedOperationError, match=r"cumsum.*node 'cumsum'.*test_moments_wrapper.py:\d+") as info:
        MomentPropagationWrapper(Net())
    assert (info.value.module_path, info.value.layer_type) == ("", "cumsum")


def test_untraceable_forward_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.1) if x.sum() > 0 else x

    with pytest.raises(UnsupportedOperationError, match="cannot trace Branchy"):
        MomentPropagationWrapper(Branchy())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="output must be one of"):
        MomentPropagationWrapper(MLP(), output="logits")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MomentPropagationWrapper("mlp")
    with pytest.raises(TypeError, match="leaf_types"):
        MomentPropagationWrapper(MLP(), leaf_types=(int,))


# ---- the extension protocol ------------------------------------------------------------------


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise; its forward branches on data, so it cannot be traced."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        if x.abs().sum() > 0:
            return x + self.sigma * torch.randn_like(x)
        return x

    def propagate_moments(self, mean, var):
        return mean, var + self.sigma**2


def test_modules_with_propagate_moments_are_called_not_traced(images, seed):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), GaussianNoise(0.5), nn.ReLU(), nn.Linear(16, 10))
    wrapper = MomentPropagationWrapper(model)
    mean, var = wrapper(images)
    with torch.no_grad():
        samples = torch.stack([model(images) for _ in range(4000)])
    _compare(mean, var, samples, 0.1, (0.85, 1.18), (0.93, 1.07))


def test_wrapper_implements_the_protocol_and_nests(images):
    inner = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 16))
    outer = nn.Sequential(MomentPropagationWrapper(inner), nn.ReLU(), nn.Linear(16, 10))
    mean, var = MomentPropagationWrapper(outer)(images)
    m1, v1 = MomentPropagationWrapper(inner).propagate_moments(images, torch.zeros_like(images))
    m2, v2 = MomentPropagationWrapper(outer[1:]).propagate_moments(m1, v1)
    torch.testing.assert_close(mean, m2)
    torch.testing.assert_close(var, v2)
    # a protocol module as the whole model: called directly
    m3, v3 = MomentPropagationWrapper(MomentPropagationWrapper(inner))(images)
    torch.testing.assert_close(m3, m1)
    torch.testing.assert_close(v3, v1)


# ---- Lightning, checkpoints, export ---------------------------------------------------------


def test_as_model_of_classifier_module_for_test_predict_and_checkpoint(digits, trainer_factory, tmp_path, seed):
    lenet = LeNet5(input_size=8, dropout=0.3)
    trainer_factory(max_epochs=1).fit(ClassifierModule(lenet), digits)
    module = ClassifierModule(MomentPropagationWrapper(lenet, output="log_probs"))
    trainer = trainer_factory(default_root_dir=tmp_path)
    metrics = trainer.test(module, digits, verbose=False)[0]
    x, y = digits.dataset("test").tensors
    with torch.no_grad():
        probs = MomentPropagationWrapper(lenet).predict_proba(x)
    expected_nll = -probs[torch.arange(len(y)), y].log().mean()
    assert metrics["test_nll"] == pytest.approx(float(expected_nll), rel=1e-4)
    assert metrics["test_acc"] == pytest.approx(float((probs.argmax(-1) == y).float().mean()), abs=1e-6)
    predicted = torch.cat(trainer.predict(module, digits))
    torch.testing.assert_close(predicted, probs)

    path = tmp_path / "mp.ckpt"
    trainer.save_checkpoint(path)
    restored = ClassifierModule.load_from_checkpoint(path).eval()
    assert isinstance(restored.model, MomentPropagationWrapper)
    with torch.no_grad():
        torch.testing.assert_close(restored(x).exp(), probs)


def test_follows_the_model_to_another_dtype(images):
    model = _randomise_batch_norm(ResidualDropoutNet())
    wrapper = MomentPropagationWrapper(model)
    mean, var = wrapper(images)
    mean64, var64 = wrapper.double()(images.double())
    assert mean64.dtype == torch.float64
    torch.testing.assert_close(mean64.float(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var64.float(), var, rtol=1e-4, atol=1e-6)


def test_exports_as_one_graph_with_two_outputs(images):
    model = _randomise_batch_norm(ResidualDropoutNet())
    wrapper = MomentPropagationWrapper(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (images,))
    outputs = [s for s in program.graph_signature.output_specs]
    assert len(outputs) == 2
    mean, var = program.module()(images)
    expected_mean, expected_var = wrapper(images)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(t.startswith("aten.") or "getitem" in t for t in targets), targets


@pytest.mark.slow
def test_tvm_compiled_graph_matches_pytorch(images):
    pytest.importorskip("tvm")
    # dropout first, so that conv, batch norm, ReLU and max-pool rules are all in the compiled graph
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    wrapper = MomentPropagationWrapper(_randomise_batch_norm(model))
    assert_compiles_to_matching_tvm(wrapper, images, torch.randn(5, 1, 8, 8), rtol=1e-5, atol=1e-6)


class ManyOpsNet(nn.Module):
    """Exercises the graph handlers (argument parsing of modules, functions and methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop2d = nn.Dropout2d(0.1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.pool = nn.AvgPool2d(2)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(4 * 16 + 4, 10)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        x = self.leaky(self.conv(self.drop2d(x)))
        x = F.max_pool2d(x, kernel_size=2, stride=1, padding=0)  # 7 x 7, overlapping windows
        x = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)  # 4 x 4
        seq = x.view(x.size(0), 4, -1)  # [N, 4, 16]
        seq = torch.tanh(self.bn(self.conv1d(seq))) * self.scale - 0.1
        summary = seq.mean(dim=-1) + torch.sigmoid(seq).sum(-1) / 16
        out = torch.cat([seq.flatten(1), summary], dim=1)
        return self.fc(F.dropout(out, 0.2, training=True))


def test_handlers_of_many_operations_match_mc(images, seed):
    model = _randomise_batch_norm(ManyOpsNet()).eval()
    model.bn.running_var.fill_(0.5)
    wrapper = MomentPropagationWrapper(model)
    mean, var = wrapper(images)
    samples = mc_dropout_logits(model, images, SAMPLES)
    # a wiring mistake (wrong stride, kernel, dim, scale) shifts the means by whole stds;
    # the approximations here (Dropout2d correlations, overlapping max windows) do not
    # (measured: means within 0.23 std, variance ratios 0.56..1.13)
    _compare(mean, var, samples, 0.5, (0.4, 2.5), (0.7, 1.4))


def test_flatten_module_after_dropout_is_exact(images, seed):
    model = nn.Sequential(nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 10))
    mean, var = MomentPropagationWrapper(model)(images)
    samples = mc_dropout_logits(model, images, SAMPLES)
    _compare(mean, var, samples, 0.1, (0.88, 1.12), (0.95, 1.05))


def test_photonic_sampler_layers_compose_through_the_protocol(images, seed):
    from lightning_relief.nn.photonic import PhotonicLinear
    from lightning_relief.photonic import sample_logits

    model = nn.Sequential(
        nn.Flatten(), PhotonicLinear(64, 32, bandwidth_ratio=0.05), nn.ReLU(), PhotonicLinear(32, 10, bandwidth_ratio=0.05)
    ).eval()
    mean, var = MomentPropagationWrapper(model)(images)
    with torch.no_grad():
        samples = sample_logits(model, images, num_samples=SAMPLES, seed=0)
    # the first layer is exact; the second sees a ReLU of a 64-term sum (near Gaussian)
    _compare(mean, var, samples, 0.15, (0.75, 1.33), (0.9, 1.1))


@pytest.mark.parametrize("softmax", ["daunizeau", "mean_field", "logit_samples"])
def test_probability_outputs_export_and_eager_stays_real(softmax, images):
    wrapper = MomentPropagationWrapper(MLP(dropout=0.3), output="log_probs", softmax=softmax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (images,))
    expected = wrapper(images)
    torch.testing.assert_close(program.module()(images), expected)
    # nothing made while exporting (e.g. a cached constant) leaks into later eager calls
    after = MomentPropagationWrapper(wrapper.model, output="log_probs", softmax=softmax)(images)
    assert torch.isfinite(after).all() and float(after.exp().sum()) == pytest.approx(len(images), rel=1e-5)
    torch.testing.assert_close(after, expected)


def test_a_fabric_module_is_unwrapped():
    from lightning.fabric import Fabric

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup_module(net)
    assert type(wrapped).__name__ == "_FabricModule"
    wrapper = MomentPropagationWrapper(wrapped)
    assert wrapper.model is net
    x = torch.randn(4, 6)
    torch.testing.assert_close(wrapper(x), MomentPropagationWrapper(net)(x))
    compiled = torch.compile(net)
    assert MomentPropagationWrapper(compiled).model is net


def test_the_covariance_mode_is_part_of_the_rebuildable_spec():
    from lightning_relief.models.spec import build_model, model_spec

    wrapper = MomentPropagationWrapper(MLP(in_features=64, dropout=0.2), covariance="low_rank")
    rebuilt = build_model(model_spec(wrapper))
    assert isinstance(rebuilt, MomentPropagationWrapper) and rebuilt.covariance == "low_rank"
