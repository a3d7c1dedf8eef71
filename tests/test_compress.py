"""The compression building blocks, each against an independent reference."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_relief.compress import (
    CompressionPolicy,
    CostModel,
    analyze,
    apply_policy,
    compute_sensitivity,
    lagrangian_search,
    policy_cost,
    propose_candidates,
    search_candidates,
    uniform_search,
)
from lightning_relief.compress.apply import apply_pruning, channels_to_prune, prune_channels
from lightning_relief.compress.bracket import BudgetBracket
from lightning_relief.compress.cost import layer_macs, layer_params, policy_layer_costs
from lightning_relief.compress.sensitivity import SensitivityTable, _masked_consumers, fake_quantize_weight, pruned_count
from lightning_relief.models import LeNet5, ResNet
from lightning_relief.nn.structure import rebuild_structure, structure_of


class ResCatNet(nn.Module):
    """Residual sum, concatenation and functional calls in forward (not from our zoo)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.mix = nn.Conv2d(2 * width, width, 1)
        self.fc = nn.Linear(width * 4, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        r = F.relu(self.a(h))
        h = h + self.b(r)
        h = F.relu(self.mix(torch.cat([h, r], dim=1)))
        return self.fc(F.avg_pool2d(h, 4).flatten(1))


MODELS = {
    "lenet": lambda: LeNet5(input_size=8),
    "resnet8": lambda: ResNet(depth=8, width=4),
    "rescat": lambda: ResCatNet(),
}


def _trained_like(model: nn.Module) -> nn.Module:
    # random BN statistics so that removing a channel changes more than the weights say
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masking_equals_real_channel_removal(name, batch):
    """The sensitivity shortcut (zeroing consumers' input slices) gives torch-pruning's pruned outputs."""
    x, _ = batch
    model = _trained_like(MODELS[name]())
    units = analyze(model, x[:1])
    assert units.groups, "every test model has prunable groups"
    names = {m: n for n, m in model.named_modules()}
    for group in units.groups:
        idxs = list(range(0, group.channels, 2))[: group.channels - 1]
        masked = copy.deepcopy(model)
        for layer, ix in _masked_consumers(units, model, group.root, idxs):
            masked.get_submodule(names[layer]).weight.data[:, ix] = 0
        pruned = copy.deepcopy(model)
        prune_channels(pruned, x[:1], {group.root: idxs})
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)


def test_residual_and_concat_channels_stay_coupled(batch):
    x, _ = batch
    model = ResCatNet()
    units = analyze(model, x[:1])
    stem_group = units.group("stem")
    # the residual sum ties stem, b and the channels they feed (mix's first half)
    assert set(stem_group.out_layers) == {"stem", "b"}
    assert set(stem_group.in_layers) == {"a", "mix"}
    pruned = copy.deepcopy(model)
    prune_channels(pruned, x[:1], {"stem": [0, 3]})
    assert pruned.stem.out_channels == pruned.b.out_channels == 4
    assert pruned.mix.in_channels == 4 + 6
    assert pruned(x).shape == (16, 10)


def test_fake_quantization_matches_brevitas():
    from brevitas.nn import QuantConv2d
    from brevitas.quant import Int8WeightPerChannelFloat

    torch.manual_seed(0)
    for bits in (2, 3, 4, 8):
        layer = QuantConv2d(3, 5, 3, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
        reference = layer.quant_weight().value.detach()
        torch.testing.assert_close(fake_quantize_weight(layer.weight.detach(), bits), reference, atol=1e-6, rtol=1e-5)
        assert len(torch.unique(reference[0])) <= 2**bits - 1


def test_sensitivity_is_the_kl_divergence(batch):
    """One table entry recomputed by hand with numpy, the pruning done for real."""
    x, y = batch
    model = _trained_like(LeNet5(input_size=8))
    units = analyze(model, x[:1])
    table = compute_sensitivity(model, units, [(x, y)], prune_ratios=(0.5,), bit_widths=(4,))
    with torch.no_grad():
        p = F.softmax(model(x), -1).double().numpy()
        root = "features.1.0"
        pruned = copy.deepcopy(model)
        prune_channels(pruned, x[:1], {root: table.order[root][: pruned_count(16, 0.5)]})
        q = F.softmax(pruned(x), -1).double().numpy()
        quant = copy.deepcopy(model)
        quant.classifier[1].weight.data = fake_quantize_weight(quant.classifier[1].weight.data, 4)
        r = F.softmax(quant(x), -1).double().numpy()
    kl = lambda a, b: float(np.mean(np.sum(a * (np.log(a) - np.log(b)), axis=1)))
    assert table.prune[root][0.5] == pytest.approx(kl(p, q), rel=1e-3, abs=1e-7)
    assert table.quant["classifier.1"][4] == pytest.approx(kl(p, r), rel=1e-3, abs=1e-7)
    # the model is left exactly as it was
    with torch.no_grad():
        np.testing.assert_allclose(F.softmax(model(x), -1).numpy(), p, rtol=1e-6)


def test_taylor_importance_ranks_and_clears_gradients(batch):
    x, y = batch
    model = _trained_like(ResNet(depth=8, width=4))
    units = analyze(model, x[:1])
    table = compute_sensitivity(model, units, [(x, y)], prune_ratios=(0.25,), importance="taylor")
    for group in units.groups:
        assert sorted(table.order[group.root]) == list(range(group.channels))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["lenet", "resnet8"])
def test_cost_model_matches_torch_pruning_counts(name, batch):
    """Predicted MACs and parameters of a policy vs torch-pruning's counter on the really pruned model."""
    x, y = batch
    model = _trained_like(MODELS[name]())
    units = analyze(model, x[:1])
    table = compute_sensitivity(model, units, [(x, y)], prune_ratios=(0.3, 0.6))
    policy = CompressionPolicy(prune={g.root: (0.3, 0.6)[i % 2] for i, g in enumerate(units.groups)})
    pruned = copy.deepcopy(model)
    apply_pruning(pruned, x[:1], channels_to_prune(units, table.order, policy))
    _, _, per_layer, per_layer_params = tp.utils.count_ops_and_params(pruned, x[:1], layer_wise=True)
    macs = policy_layer_costs(units, CostModel("macs"), policy.prune, {})
    params = policy_layer_costs(units, CostModel("params"), policy.prune, {})
    for info in units.layers:
        layer = pruned.get_submodule(info.name)
        bias_adds = (info.out_hw[0] * info.out_hw[1] * layer.weight.shape[0]) if layer.bias is not None else 0
        assert macs[info.name] * 1e6 + bias_adds == pytest.approx(per_layer[layer])
        assert params[info.name] * 1e3 == pytest.approx(per_layer_params[layer]) == sum(p.numel() for p in layer.parameters())


def test_size_counts_bits():
    info = analyze(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10)), torch.zeros(1, 1, 8, 8)).layers[0]
    cost = CostModel("size")
    weights = 4 * 9
    assert cost.layer_cost(info, 1, 4, 32) == pytest.approx((weights * 4 + 4 * 4) / 1e3)
    assert cost.layer_cost(info, 1, 4, 4) == pytest.approx((weights / 2 + 4 * 4 + 4 * 4) / 1e3)
    assert layer_macs(info, 1, 4) == 4 * 9 * 36 and layer_params(info, 1, 4) == 40


def _brute_force(units, table, cost, budget, ratios, bits, layers):
    best = (math.inf, None)
    prune_opts = [[0.0, *ratios] for _ in units.groups]
    bit_opts = [[32, *bits] for _ in layers]
    for combo in itertools.product(*prune_opts, *bit_opts):
        rs = dict(zip([g.root for g in units.groups], combo[: len(units.groups)]))
        bs = dict(zip(layers, combo[len(units.groups) :]))
        if policy_cost(units, cost, rs, bs) > budget:
            continue
        sens = sum(table.prune[k][v] for k, v in rs.items() if v) + sum(table.quant[k][v] for k, v in bs.items() if v < 32)
        best = min(best, (sens, (rs, bs)), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("target", [0.6, 0.35])
def test_lagrangian_search_is_near_the_exhaustive_optimum(target, batch):
    x, y = batch
    model = _trained_like(LeNet5(input_size=8))
    units = analyze(model, x[:1])
    ratios, bits = (0.25, 0.5, 0.75), (4, 8)
    layers = [units.layers[1].name, units.layers[2].name]
    table = compute_sensitivity(model, units, [(x, y)], ratios, bits, quant_layers=layers)
    cost = CostModel("size")
    budget = target * policy_cost(units, cost, {}, {})
    found = lagrangian_search(units, table, cost, budget, ratios, bits, layers)
    optimum, _ = _brute_force(units, table, cost, budget, ratios, bits, layers)
    assert found.predicted_cost <= budget
    assert found.predicted_cost == pytest.approx(policy_cost(units, cost, found.policy.prune, found.policy.bits))
    assert found.sensitivity <= 1.25 * optimum + 1e-9
    uniform = uniform_search(units, table, cost, budget)
    assert len(set(uniform.policy.prune.values())) == 1 and uniform.predicted_cost <= budget


def test_unreachable_target_is_a_clear_error(batch):
    x, y = batch
    model = LeNet5(input_size=8)
    units = analyze(model, x[:1])
    table = compute_sensitivity(model, units, [(x, y)], prune_ratios=(0.5,))
    with pytest.raises(ValueError, match="out of reach"):
        lagrangian_search(units, table, CostModel("macs"), 1e-9, (0.5,), (), [])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_policy_replays_on_a_fresh_model(name, batch):
    """Prune + quantize, then rebuild the recorded structure on a new instance: same state, same outputs."""
    x, y = batch
    model = _trained_like(MODELS[name]())
    units = analyze(model, x[:1])
    table = compute_sensitivity(model, units, [(x, y)], prune_ratios=(0.5,), bit_widths=(4,))
    policy = CompressionPolicy(
        prune={g.root: 0.5 for g in units.groups}, bits={units.layers[1].name: 4, units.layers[-1].name: 8}
    )
    apply_policy(model, units, table.order, policy, [x])
    model.eval()
    steps = structure_of(model)
    assert [s["rebuild"].rsplit(":", 1)[1] for s in steps] == ["replay_pruning", "replay_quantization"]
    fresh = MODELS[name]()
    rebuild_structure(fresh, {"relief_structure": steps})
    fresh.load_state_dict(model.state_dict())  # strict: every shape matches
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert type(fresh.get_submodule(units.layers[1].name)).__name__.startswith("Quant")


def test_bad_policy_leaves_the_model_untouched(batch):
    x, _ = batch
    model = LeNet5(input_size=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="bad channel indices"):
        prune_channels(model, x[:1], {"features.0.0": [0, 1], "features.1.0": [99]})
    with pytest.raises(ValueError, match="not a module"):
        prune_channels(model, x[:1], {"nope": [0]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.features[0][0].out_channels == 6


def test_ignored_layers_are_neither_pruned_nor_quantized(batch):
    x, _ = batch
    units = analyze(LeNet5(input_size=8), x[:1], ignored_layers=["features.0.0"])
    assert "features.0.0" not in [g.root for g in units.groups]
    assert "classifier.7" not in [g.root for g in units.groups]  # the classifier keeps its classes
    with pytest.raises(ValueError, match="ignored_layers"):
        analyze(LeNet5(input_size=8), x[:1], ignored_layers=["features.9"])


def test_sensitivity_table_round_trips():
    table = SensitivityTable(prune={"a": {0.5: 0.1}}, quant={"b": {4: 0.2}}, order={"a": [1, 0]}, seconds=1.0)
    assert SensitivityTable.from_state_dict(table.state_dict()) == table


def test_latency_cost_model_is_bilinear_through_its_corners(batch):
    """With a table that is exactly a + b·cin + c·cout + d·cin·cout, the model reproduces it everywhere."""
    from lightning_relief.compress.cost import LatencyCostModel

    x, _ = batch
    units = analyze(LeNet5(input_size=8), x[:1])
    calls = []

    def table(info, cin, cout, bits):
        calls.append((info.name, cin, cout, bits))
        return 0.01 + 0.002 * cin + 0.003 * cout + 0.0005 * cin * cout + (0.0 if bits == 32 else -0.001)

    cost = LatencyCostModel(table)
    for info in units.layers:
        for cin, cout in [(info.in_channels, info.out_channels), (max(1, info.in_channels // 3), max(1, info.out_channels // 2))]:
            cin = cin if info.in_group is not None else info.in_channels
            cout = cout if info.out_group is not None else info.out_channels
            assert cost.layer_cost(info, cin, cout, 32) == pytest.approx(table(info, cin, cout, 32))
    assert len({c for c in calls}) <= 4 * len(units.layers) + 2 * len(units.layers)  # corners only, no grid


def test_latency_calibration_recovers_scale_and_overhead(batch):
    from lightning_relief.compress.cost import LatencyCostModel

    x, _ = batch
    units = analyze(LeNet5(input_size=8), x[:1])
    cost = LatencyCostModel(lambda info, cin, cout, bits: 1e-4 * cin * cout)
    half = {g.root: 0.5 for g in units.groups}
    truth = lambda ratios: 2.0 * policy_cost(units, cost, ratios, {}) + 0.3
    cost.calibrate(units, [({}, {}, truth({})), (half, {}, truth(half))])
    assert cost.scale == pytest.approx(2.0) and cost.overhead == pytest.approx(0.3)
    quarter = {g.root: 0.75 for g in units.groups}
    cost.scale, cost.overhead = 1.0, 0.0
    expected = truth(quarter)
    cost.calibrate(units, [({}, {}, truth({})), (half, {}, truth(half))])
    assert policy_cost(units, cost, quarter, {}) == pytest.approx(expected)
    # one point: the difference is overhead
    cost.calibrate(units, [({}, {}, policy_cost(units, LatencyCostModel(cost.table), {}, {}) + 0.25)])
    assert cost.scale == 1.0 and cost.overhead == pytest.approx(0.25)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_bracket_steers_a_mispriced_search_into_the_window(target, batch):
    """The cost model is wrong in scale, shape and granularity; measuring a few candidates still lands one
    within ±5 % of the true cost, as the callback's refinement rounds do."""
    from lightning_relief.compress.cost import LatencyCostModel, kept_channels, layer_shape

    x, y = batch
    model = _trained_like(LeNet5(input_size=8))
    units = analyze(model, x[:1])
    ratios = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    table = compute_sensitivity(model, units, [(x, y)], ratios)
    cost = LatencyCostModel(lambda info, cin, cout, bits: 1e-4 * cin * cout)

    def measured(policy) -> float:  # the "hardware": vector units of 4 channels, super-linear, a fixed cost
        kept = kept_channels(units, policy.prune)
        shapes = [layer_shape(units, info, kept) for info in units.layers]
        return 0.05 + math.fsum(3e-4 * math.ceil(ci / 4) * math.ceil(co / 4) ** 1.3 for ci, co in shapes)

    budget = target * measured(CompressionPolicy())
    ceiling = policy_cost(units, cost, {}, {})
    bracket = BudgetBracket(budget, 0.05, ceiling=ceiling)
    first = search_candidates(units, table, cost, budget, "lagrangian", ratios, (), [], count=1, centered=True)[0]
    assert not 0.95 * budget <= measured(first.policy) <= 1.05 * budget  # the model alone misses the window
    predicted, seen, measured_policies = budget, set(), []
    for round_ in range(6):
        anchors = [measured_policies[i] for i in bracket.anchors()]
        for cand in propose_candidates(
            units, table, cost, predicted, "lagrangian", ratios, (), [], 2, seen, anchors, round_=round_
        ):
            seen.add(cand.policy.key())
            measured_policies.append(cand.policy)
            bracket.add(cand.predicted_cost, measured(cand.policy))
        if bracket.hit():
            break
        predicted = bracket.next()
    assert bracket.hit(), bracket.points
    assert len(bracket.points) <= 12


def test_bracket_interpolates_inside_and_survives_noise():
    bracket = BudgetBracket(1.0, 0.05, ceiling=5.0)
    assert bracket.next() == 1.0
    bracket.add(2.0, 0.5)
    assert bracket.next() == pytest.approx(4.0)  # one side only: rescale by measured/predicted
    bracket.add(4.0, 2.5)
    assert 2.2 <= bracket.next() <= 3.8  # regula falsi, kept off the ends of [2, 4]
    bracket.add(3.9, 0.9)  # noise: a larger prediction measured cheaper
    assert 2.0 < bracket.next() < 4.0
    assert BudgetBracket(1.0, 0.05, ceiling=1.5, points=[(1.0, 0.5)]).next() == 1.5  # never above the original
    with pytest.raises(ValueError, match="tolerance"):
        BudgetBracket(1.0, 1.0, ceiling=2.0)
