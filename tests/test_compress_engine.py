"""The compression engine and its meters: MACs against a direct count, bad input, torch.compile, DDP."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, SensitivityPruningCallback
from lightning_relief.compress import (
    AnalyticMeter,
    CompressionConfig,
    UnreachableTargetError,
    analyze,
    compress,
    plan,
    quantized_bits,
)
from lightning_relief.errors import UnsupportedLayerError, UnsupportedModelError
from lightning_relief.models import LeNet5

ROOT = Path(__file__).resolve().parents[1]


def _batches(shape=(1, 8, 8), n=2, size=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn((size, *shape), generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


class Attention(nn.Module):
    """Functional attention between two linears: matmuls no conv/linear counter sees."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 8, 8)
        q = self.q(tokens)
        mixed = torch.softmax(q @ tokens.transpose(1, 2), dim=-1) @ tokens
        return self.head(mixed.mean(1))


def test_macs_count_the_whole_forward_directly():
    model = Attention()
    meter = AnalyticMeter("macs")
    meter.cost_model(analyze(model, torch.zeros(1, 1, 8, 8)), model)
    # by hand: q 8·8·8, two batched matmuls 8·8·8 each, head 8·10
    assert meter.measure(model) == pytest.approx((3 * 8 * 8 * 8 + 8 * 10) / 1e6)


def test_quantized_conv1d_counts_bytes_at_its_bits():
    model = nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 38, 10))
    result = compress(
        model, _batches((1, 40)), CompressionConfig(target=0.5, methods=("quantize",), bit_widths=(4, 8)), AnalyticMeter("size")
    )
    assert quantized_bits(model) == result.policy.quantized_layers() != {}
    assert result.chosen.measured_cost <= 0.5 * result.original_cost
    assert AnalyticMeter("size").measure(model) == pytest.approx(result.chosen.measured_cost)


def test_unreachable_target_names_budget_and_best_value_and_leaves_the_model():
    model = LeNet5(input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CompressionConfig(target=0.01, methods=("prune",), prune_ratios=(0.25, 0.5))
    with pytest.raises(
        UnreachableTargetError, match=r"budget .* cannot be reached: the strongest compression .* measures"
    ) as info:
        compress(model, _batches(), config, AnalyticMeter("macs"))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the value named is the true boundary: just above it is reachable, just below is not
    best = info.value.best / info.value.original
    assert info.value.budget < info.value.best
    reached = compress(model, _batches(), CompressionConfig(**{**vars(config), "target": best * 1.001}), AnalyticMeter("macs"))
    assert reached.chosen.measured_cost == pytest.approx(info.value.best)
    with pytest.raises(UnreachableTargetError):
        plan(
            LeNet5(input_size=8), _batches(), CompressionConfig(**{**vars(config), "target": best * 0.99}), AnalyticMeter("macs")
        )


def test_unreachable_target_inside_fit_raises_before_touching_the_model(digits, seed, tmp_path):
    module = ClassifierModule(LeNet5(input_size=8))
    cb = SensitivityPruningCallback(
        target=0.01,
        metric="params",
        methods=("prune",),
        start_epoch=0,
        prune_ratios=(0.25,),
        calibration_batches=1,
        verbose=False,
    )
    before = sum(p.numel() for p in module.parameters())
    with pytest.raises(UnreachableTargetError, match="params budget"):
        quiet_trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path).fit(module, digits)
    assert sum(p.numel() for p in module.parameters()) == before and cb.phase == "waiting"


def test_nothing_compressible_and_unsupported_layers_are_typed_errors():
    only_head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UnsupportedModelError, match="nothing is compressible"):
        plan(only_head, _batches(), CompressionConfig(methods=("prune",)), AnalyticMeter("macs"))
    gru = nn.GRU(8, 8, batch_first=True)
    with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(GRU\)"):
        analyze(nn.ModuleDict({"rnn": gru}), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="AnalyticMeter metric"):
        AnalyticMeter("latency")
    with pytest.raises(TypeError, match="meter must be"):
        SensitivityPruningCallback(meter="macs")


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        _, h = self.gru(F.relu(self.conv(x)).transpose(1, 2))
        return self.head(h[-1])


def test_an_ignored_layer_is_left_alone_and_nothing_it_touches_is_pruned():
    model = Recurrent()
    units = analyze(model, torch.zeros(1, 1, 40), ignored_layers=("gru",))
    assert units.groups == []  # the conv's channels feed the GRU: not prunable
    result = compress(
        model, _batches((1, 40)), CompressionConfig(target=0.9, bit_widths=(8,), ignored_layers=("gru",)), AnalyticMeter("size")
    )
    assert "gru" not in result.policy.quantized_layers() and isinstance(model.gru, nn.GRU)


@pytest.mark.parametrize("whole", [False, True], ids=["compiled-submodule", "compiled-lightning-module"])
def test_torch_compile_is_compressed_underneath_and_recompiled(digits, seed, tmp_path, whole):
    from torch._dynamo.eval_frame import OptimizedModule

    torch._dynamo.reset()
    net = LeNet5(input_size=8)
    module = ClassifierModule(net if whole else torch.compile(net, backend="eager"), lr=1e-2)
    cb = SensitivityPruningCallback(
        target=0.5,
        metric="macs",
        start_epoch=1,
        calibration_batches=1,
        prune_ratios=(0.25, 0.5, 0.75),
        bit_widths=(8,),
        recovery_steps=2,
        verbose=False,
    )
    # no validation loop: dynamo would compile validation_step as well; the candidates are scored by the engine
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(torch.compile(module, backend="eager") if whole else module, digits)
    assert cb.phase == "compressed" and cb.chosen.measured_cost <= 0.5 * cb.original_cost
    if not whole:
        assert isinstance(module.model, OptimizedModule)  # compiled again around the compressed model
    eager = module.model._orig_mod if not whole else module.model
    assert eager.features[0][0].out_channels < 6 or cb.policy.quantized_layers()
    x = digits.dataset("val").tensors[0][:8]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), eager(x))
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    again = LeNet5(input_size=8)
    reloaded = ClassifierModule.load_from_checkpoint(path, model=again if whole else torch.compile(again, backend="eager"))
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), module(x))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_ddp_ranks_apply_one_plan_and_the_checkpoint_reloads_on_one(tmp_path, digits):
    """2 CPU processes (gloo): rank 0 plans, both apply the same structure, fine-tune in sync; the
    checkpoint reloads into a single-process module."""
    out = tmp_path / "ddp"
    out.mkdir()
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_compress_script.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["policy"] == ranks[1]["policy"] and any(ranks[0]["policy"]["prune"].values())
    assert ranks[0]["shapes"] == ranks[1]["shapes"]
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the rebuilt DDP kept the ranks in step
    assert ranks[0]["optimizer_holds_model"] and ranks[1]["optimizer_holds_model"]
    reloaded = ClassifierModule.load_from_checkpoint(out / "last.ckpt", weights_only=False).eval()
    assert {k: list(v.shape) for k, v in reloaded.state_dict().items()} == ranks[0]["shapes"]
    checksums = {k: v.double().sum().item() for k, v in reloaded.state_dict().items() if v.is_floating_point()}
    assert checksums == pytest.approx(ranks[0]["checksums"])
    assert quiet_trainer().validate(reloaded, digits, verbose=False)[0]["val_acc"] > 0.3


def test_the_chosen_policy_is_never_worse_than_uniform_after_recovery(digits):
    x, y = digits.dataset("train").tensors
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    val = [digits.dataset("val").tensors]
    config = CompressionConfig(target=0.4, prune_ratios=(0.25, 0.5, 0.75), bit_widths=(8,), recovery_steps=8)
    result = plan(LeNet5(input_size=8), train[:2], config, AnalyticMeter("macs"), val, train)
    budget = 0.4 * result.original_cost
    kinds = {c.extra.get("kind", "search") for c in result.evaluated if c.measured_cost <= budget}
    assert {"search", "uniform", "joint uniform"} <= kinds
    uniform = [
        c.extra["recovered_acc"] for c in result.evaluated if c.extra.get("kind") == "uniform" and c.measured_cost <= budget
    ]
    assert result.chosen.measured_cost <= budget
    assert result.chosen.extra["recovered_acc"] >= max(uniform)


@pytest.mark.slow  # eight layers compiled by TVM for the cost table (~40 s)
def test_a_latency_meter_prices_and_measures_quantized_conv1d_layers(tmp_path):
    """Conv1d layers are priced quantized (their own int8 compile in TVM's layer table) and measured quantized
    (the whole model integer-lowered), so the search can choose their bits. No budget is asserted: at batch 1
    the 8-bit MNIST-1D CNN measured x0.9-1.7 of its float latency here (timed side by side, under load), so a
    quantize-only target below 1 is met or missed by noise."""
    from lightning_relief.compress import apply_quantization
    from lightning_relief.compress.latency import LatencyMeter
    from lightning_relief.deploy import LayerLatencyTable
    from lightning_relief.models import MNIST1DCNN

    torch.manual_seed(0)
    model = MNIST1DCNN().eval()
    x = _batches((1, 40))[0][0]
    meter = LatencyMeter("llvm", cache_dir=tmp_path, repeat=3, number=10, compare_seconds=0.0)
    assert nn.Conv1d in meter.quantizable_types
    units = analyze(model, x[:1])
    convs = [info for info in units.layers if isinstance(model.get_submodule(info.name), nn.Conv1d)]
    assert len(convs) == 3
    cost = meter.cost_model(units, model)
    info = convs[1]  # prunable on both sides: priced from four corner compiles
    priced = cost.layer_cost(info, info.in_channels, info.out_channels, 8)
    table = LayerLatencyTable("llvm", cache_dir=tmp_path / "layers", repeat=3, number=10)
    int8 = table.latency_ms(
        "conv1d",
        info.in_channels,
        info.out_channels,
        info.kernel,
        info.stride,
        info.padding,
        info.groups,
        input_size=info.in_hw,
        bits=8,
        bias=info.bias,
    )
    assert priced == pytest.approx(int8) and table.misses == 0  # the int8 figure TVM's layer table measured
    quantized = copy.deepcopy(model)
    apply_quantization(quantized, {info.name: 8 for info in convs}, [x])
    assert meter.reference(model) > 0 and meter.measure(quantized) > 0
    assert quantized_bits(model) == {}


class PaddedMACsMeter(AnalyticMeter):
    """MACs on a machine of 8-wide vectors: a layer's output channels count rounded up to a multiple of 8,
    so cost is a staircase in channels (as measured latency is), and noisy-meter rules apply."""

    def __init__(self) -> None:
        super().__init__("macs")
        self.exact = False

    def measure(self, module: nn.Module) -> float:
        total = []

        def count(layer, inputs, output):
            channels = output.shape[1]
            padded = -(-channels // 8) * 8
            per_out = layer.weight[0].numel()
            total.append(output[0].numel() // channels * padded * per_out)

        handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                module.eval()(torch.zeros(self._example_shape))
        finally:
            for h in handles:
                h.remove()
        return sum(total) / 1e6


def test_channels_are_given_back_while_the_measured_cost_stays_within_budget(digits):
    x, y = digits.dataset("train").tensors
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    val = [digits.dataset("val").tensors]
    torch.manual_seed(0)
    model = LeNet5(input_size=8)
    config = CompressionConfig(target=0.4, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75), candidates=2, max_rounds=2, grow=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(model, train[:2], config, PaddedMACsMeter(), val, train)
    high = 0.4 * 1.05 * result.original_cost
    grown = [c for c in result.evaluated if c.extra.get("kind") == "grown"]
    assert 1 <= len(grown) <= 6
    units = analyze(model, x[:1])
    kept = {g.root: g.channels for g in units.groups}
    start = max(
        (
            c
            for c in result.evaluated
            if c.extra.get("kind") != "grown" and c.measured_cost <= 0.4 * result.original_cost and c.policy.pruned_groups()
        ),
        key=lambda c: (c.val_acc, -c.measured_cost),
    )

    def channels(c):
        return {r: n - round(c.policy.prune.get(r, 0.0) * n) for r, n in kept.items()}

    # each grown policy is its start with channels given back to one group
    first = channels(grown[0])
    assert sum(first[r] - channels(start)[r] for r in kept) >= 1 and all(first[r] >= channels(start)[r] for r in kept)
    chosen = result.chosen
    assert chosen.measured_cost <= high and chosen.extra["first_measured_cost"] == chosen.measured_cost  # confirmed
    in_window = [c for c in result.evaluated if 0.4 * 0.95 * result.original_cost <= c.measured_cost <= high]
    assert chosen.val_acc >= max(c.val_acc for c in in_window or result.evaluated if c.measured_cost <= high)


def _digits_split(digits, n=256):
    x, y = digits.dataset("train").tensors
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)], [digits.dataset("val").tensors]


class UnevenMeter(PaddedMACsMeter):
    """Uneven pruning measures 1.6x its padded MACs, uniform pruning as counted: the cost model's predictions
    err for the search's policies and not for the uniform baseline's (ResNet-20 at 0.2: x0.34-0.38 against
    x0.21 for one predicted budget)."""

    def reference(self, module: nn.Module) -> float:
        self.full = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
        return self.measure(module)

    def measure(self, module: nn.Module) -> float:
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        kept = [m.out_channels / n for m, n in zip(convs, self.full)]
        return super().measure(module) * (1.6 if max(kept) - min(kept) > 0.15 else 1.0)


def test_a_baseline_in_the_window_does_not_end_the_searchs_rounds(digits):
    """The search's own candidates are steered to the budget even when the uniform baseline measured in the
    window at once (before, its hit ended the rounds with ours at x1.76 of the budget: uniform won unopposed)."""
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    config = CompressionConfig(target=0.4, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75), candidates=2, max_rounds=3, grow=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(LeNet5(input_size=8), train[:2], config, UnevenMeter(), val, train)
    budget = 0.4 * result.original_cost
    ratios = [(c.extra.get("kind", "search"), c.measured_cost / budget) for c in result.evaluated]
    assert ("uniform", pytest.approx(1, abs=0.05)) in ratios[:2]  # the case: uniform hit in the first round
    # steered down from x1.76 to within 10 % under the budget (x0.95 after three rounds)
    assert max(ratio for kind, ratio in ratios if kind == "search" and ratio <= 1.05) >= 0.9, ratios


class FlooredMeter(PaddedMACsMeter):
    """Nothing runs faster than x0.306 of the original (a fixed overhead): under a 0.3 budget with a 10 % window,
    every candidate that reaches the window measures above the budget."""

    def reference(self, module: nn.Module) -> float:
        self.floor = 0.306 * self.measure(module)
        return self.floor / 0.306

    def measure(self, module: nn.Module) -> float:
        return max(super().measure(module), getattr(self, "floor", 0.0))


def test_growing_back_starts_within_the_budget(digits):
    """Giving channels back raises the cost, so growing from a candidate measured between the budget and the
    window's top would measure every move and reject it (LeNet at 0.2: 6 of 6)."""
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    config = CompressionConfig(
        target=0.3, tolerance=0.1, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75), candidates=2, max_rounds=2, grow=6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(LeNet5(input_size=8), train[:2], config, FlooredMeter(), val, train)
    budget = 0.3 * result.original_cost
    cut = [c for c in result.evaluated if c.policy.pruned_groups()]
    assert any(budget < c.measured_cost <= 1.1 * budget for c in cut)  # the case: within the window, over budget
    assert not [c for c in result.evaluated if c.extra.get("kind") == "grown"]


def test_uniform_pruning_is_grown_back_as_uniform_pruning_to_the_budget(digits):
    """On a staircase cost the uniform rounds stop where they land; growing back bisects the one ratio
    until the least pruned uniform policy within budget and the next lighter one (over it) are adjacent."""
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    model = LeNet5(input_size=8)
    # the rounds leave uniform at ×0.38-0.39, below the window 0.5 ± 3 %
    config = CompressionConfig(
        target=0.5,
        tolerance=0.03,
        methods=("prune",),
        search="uniform",
        prune_ratios=(0.25, 0.5, 0.75),
        candidates=2,
        max_rounds=2,
        grow=8,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(model, train[:2], config, PaddedMACsMeter(), val, train)
    assert all(len(set(c.policy.prune.values())) == 1 and not c.policy.bits for c in result.evaluated)
    assert any(c.extra.get("grown") for c in result.evaluated)
    groups = analyze(model, val[0][0][:1]).groups

    def counts(ratio):
        return [round(ratio * g.channels) for g in groups]

    high = 0.5 * 1.03 * result.original_cost
    ratios = [(c.extra["uniform_ratio"], c.measured_cost) for c in result.evaluated]
    least = min(r for r, m in ratios if m <= high)
    over = max(r for r, m in ratios if m > high and r < least)
    between = {tuple(counts(over + (least - over) * i / 200)) for i in range(201)}
    assert between == {tuple(counts(over)), tuple(counts(least))}, "a uniform ratio in between was left unmeasured"


def test_every_baseline_within_budget_is_scored_even_below_the_window(digits):
    """Noisy-meter rules choose inside the measured window, but a baseline that only measured below it
    still competes, so the answer is never worse on validation than uniform pruning."""
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    # not grown back, uniform stays below this window (×0.38-0.39 for 0.5 ± 3 %) while ours lands in it
    config = CompressionConfig(
        target=0.5,
        tolerance=0.03,
        prune_ratios=(0.25, 0.5, 0.75),
        bit_widths=(8,),
        candidates=2,
        max_rounds=2,
        grow=0,
        recovery_steps=4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(LeNet5(input_size=8), train[:2], config, PaddedMACsMeter(), val, train)
    high = 0.5 * 1.03 * result.original_cost
    assert any(0.5 * 0.97 * result.original_cost <= c.measured_cost <= high for c in result.evaluated)
    chosen = result.chosen
    assert chosen.measured_cost <= high
    within = [c for c in result.evaluated if c.extra.get("kind") == "uniform" and c.measured_cost <= high]
    assert within and all(c.measured_cost < 0.5 * 0.97 * result.original_cost for c in within)
    best = max(within, key=lambda c: c.measured_cost)
    assert "recovered_acc" in best.extra, "the uniform baseline within budget was not scored"
    assert chosen.extra["recovered_acc"] >= best.extra["recovered_acc"]


def test_the_plan_times_the_graph_the_applied_and_fine_tuned_model_ships(digits, tmp_path):
    """A plan's latency is measured on a trial copy (``apply_policy``); the model that ships is pruned and
    quantized by ``apply_plan`` and then fine-tuned. Both must lower to one TVM graph, or the plan's figure
    is not the shipped model's (the digits LeNet at 0.2 was planned at ×0.193 and re-timed at ×0.287)."""
    from lightning_relief.compress.apply import apply_policy, channels_to_prune
    from lightning_relief.compress.engine import apply_plan, recover
    from lightning_relief.compress.latency import LatencyMeter
    from lightning_relief.compress.policy import CompressionPolicy
    from lightning_relief.deploy.frontend import to_relax

    train, val = _digits_split(digits)
    torch.manual_seed(0)
    model = LeNet5(input_size=8)
    config = CompressionConfig(target=0.6, prune_ratios=(0.25,), bit_widths=(8,), max_rounds=1, candidates=1, grow=0)
    result = plan(model, train[:2], config, AnalyticMeter("macs"), val, train)
    units = analyze(model, train[0][0][:1])
    # the benchmark's policy: every group pruned, every layer at 8 bits
    result.policy = CompressionPolicy(prune={g.root: 0.25 for g in units.groups}, bits={i.name: 8 for i in units.layers})
    result.channels = channels_to_prune(units, result.sensitivity.order, result.policy)
    inputs = [x for x, _ in train[:2]]
    trial = copy.deepcopy(model)
    apply_policy(trial, units, result.sensitivity.order, result.policy, inputs)
    shipped = copy.deepcopy(model)
    apply_plan(shipped, result, inputs)
    recover(shipped, train, steps=5, lr=1e-2)  # fine-tuning moves weights and quantizer scales
    meter = LatencyMeter("llvm", cache_dir=tmp_path)
    meter.cost_model(units)
    graphs = [to_relax(*meter._deployable(m), dynamic_batch=False) for m in (trial, shipped)]
    assert quantized_bits(shipped) == result.policy.quantized_layers()
    assert graphs[0].graph_hash == graphs[1].graph_hash


class SlowerAgainMeter(PaddedMACsMeter):
    """Fresh re-measurements come out dearer than the first figures, by 3 % (which a choice among many
    measurements, or a cache filled under other conditions, biases low)."""

    def __init__(self, factor: float = 1.03) -> None:
        super().__init__()
        self.factor = factor
        self.fresh: list[float] = []

    def remeasure(self, module: nn.Module) -> float:
        self.fresh.append(self.factor * self.measure(module))
        return self.fresh[-1]


def test_the_winner_is_confirmed_by_its_fresh_measurement_alone(digits):
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    meter = SlowerAgainMeter()
    config = CompressionConfig(target=0.4, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75), candidates=2, max_rounds=2, grow=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(LeNet5(input_size=8), train[:2], config, meter, val, train)
    chosen = result.chosen
    assert chosen.measured_cost in meter.fresh and chosen.measured_cost <= 0.4 * 1.05 * result.original_cost
    assert chosen.extra["first_measured_cost"] < chosen.measured_cost


def test_a_winner_no_fresh_measurement_confirms_is_kept_with_a_warning(digits):
    """When every fresh figure lands over the window (ResNet-20 at 0.2: first within it, fresh ×0.211 for a
    window up to ×0.21), the best-scored candidate is kept, not silently: the warning names its figure."""
    train, val = _digits_split(digits)
    torch.manual_seed(0)
    meter = SlowerAgainMeter(factor=1.5)
    config = CompressionConfig(target=0.4, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75), candidates=2, max_rounds=1, grow=0)
    with pytest.warns(UserWarning, match=r"no candidate was confirmed .* kept at .* of the budget"):
        result = plan(LeNet5(input_size=8), train[:2], config, meter, val, train)
    assert result.chosen.measured_cost in meter.fresh and result.chosen.measured_cost > 0.4 * 1.05 * result.original_cost
