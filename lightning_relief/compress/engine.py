"""The compression engine: plan a policy that meets a budget, then apply it. No Trainer needed.

:func:`plan` works on a copy of the model and never changes it: it measures the
sensitivity table (the fast prior), prices policies with the meter's cost
model, proposes candidates (the Lagrangian search's policies plus the uniform,
quantization-only and joint uniform + 8-bit baselines), measures each one
whole with the meter, steers the budget until candidates land in the target
window, gives channels back to the best one while it measures within budget
(measured meters; uniform pruning is grown back as uniform pruning, one ratio for
every group, so the baselines reach the budget too), and scores the candidates that
meet the budget by validation accuracy after a short recovery (``recovery_steps`` of
fine-tuning on a copy); every baseline within budget is among them, so the answer is
never worse on validation than the baselines it was compared with.
The result is a small picklable :class:`CompressionResult` (the channel
indices to remove and the bit widths), which :func:`apply_plan` replays on any
copy of the model: under DDP one rank plans and every rank applies the same.

>>> import torch
>>> from torch import nn
>>> from lightning_relief.compress.meter import AnalyticMeter
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
>>> batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
>>> config = CompressionConfig(target=0.5, methods=("prune",), prune_ratios=(0.25, 0.5, 0.75))
>>> result = compress(model, batches, config, AnalyticMeter("macs"))
>>> result.chosen.measured_cost <= 0.5 * result.original_cost, model[0].out_channels < 8
(True, True)
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relief._rng import isolated_seed
from lightning_relief.compress.apply import apply_channels_and_bits, apply_policy, channels_to_prune
from lightning_relief.compress.bracket import BudgetBracket
from lightning_relief.compress.cost import CostModel, policy_cost
from lightning_relief.compress.meter import Meter
from lightning_relief.compress.policy import CompressionPolicy
from lightning_relief.compress.report import layer_rows
from lightning_relief.compress.search import SEARCHES, Candidate, lagrangian_search, propose_candidates, uniform_search
from lightning_relief.compress.sensitivity import (
    IMPORTANCES,
    SensitivityTable,
    cached_sensitivity,
    compute_sensitivity,
    fingerprint,
    pruned_count,
)
from lightning_relief.compress.units import PLUGIN, ModelUnits, analyze
from lightning_relief.errors import ReliefError, UnsupportedModelError

METHODS = ("prune", "quantize")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Batch = tuple[Tensor, Tensor]
Progress = Callable[[str], Callable[[int, int], None]]
_SENSITIVITY_MEMO: dict[str, SensitivityTable] = {}
BASELINES = ("uniform", "joint uniform", "quantize only")


class UnreachableTargetError(ReliefError, ValueError):
    """No policy with the allowed options meets the budget; the model was not changed."""

    def __init__(self, budget: float, best: float, original: float, unit: str, metric: str) -> None:
        self.budget, self.best, self.original = budget, best, original
        super().__init__(
            f"{PLUGIN}: the {metric} budget {budget:.4g} {unit} ({budget / original:.1%} of the original "
            f"{original:.4g}) cannot be reached: the strongest compression with these options measures "
            f"{best:.4g} {unit} ({best / original:.1%}); raise target to at least {best / original:.3f} or allow "
            "higher prune_ratios / lower bit_widths. The model was left unchanged."
        )


@dataclass
class CompressionConfig:
    """What to search for: the budget, the allowed options, and how hard to look (validated here).

    Args:
        target: budget as a fraction of the original model's cost, in (0, 1].
        methods: any of ``"prune"`` and ``"quantize"``.
        prune_ratios: pruning ratios tried per channel group.
        bit_widths: weight bit widths tried per layer (activations use 8 bits).
        importance: channel ranking: ``"magnitude"``, ``"taylor"``, ``"bn_scale"``, ``"lamp"`` or ``"fpgm"``.
        ignored_layers: module names never pruned or quantized.
        search: ``"lagrangian"`` (ours, with the baselines among its candidates) or ``"uniform"`` only.
        candidates: policies proposed by the search per round.
        tolerance: target window ``budget · (1 ± tolerance)`` for measured meters.
        max_rounds: measurement rounds.
        recovery_steps: fine-tuning steps on a copy before a candidate is scored (0: scored as cut).
        recovery_lr: Adam learning rate of that fine-tuning.
        grow: measurements spent giving channels back to the best candidate within budget (measured
            meters only; 0: off).
        seed: seed of the search's own random stream.
    """

    target: float = 0.25
    methods: tuple[str, ...] = METHODS
    prune_ratios: tuple[float, ...] = DEFAULT_RATIOS
    bit_widths: tuple[int, ...] = (2, 4, 8)
    importance: str = "magnitude"
    ignored_layers: tuple[str, ...] = ()
    search: str = "lagrangian"
    candidates: int = 4
    tolerance: float = 0.05
    max_rounds: int = 5
    recovery_steps: int = 0
    recovery_lr: float = 1e-3
    grow: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        self.methods = methods
        if not isinstance(self.target, (int, float)) or not 0 < self.target <= 1:
            raise ValueError(f"target must be a fraction of the original cost in (0, 1], got {self.target!r}")
        if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
        ratios = tuple(float(r) for r in self.prune_ratios)
        if "prune" in methods and (not ratios or any(not 0 < r < 1 for r in ratios)):
            raise ValueError(f"prune_ratios must be non-empty, each in (0, 1), got {list(self.prune_ratios)}")
        bits = tuple(int(b) for b in self.bit_widths)
        if "quantize" in methods and (not bits or any(not 2 <= b <= 16 for b in bits)):
            raise ValueError(f"bit_widths must be non-empty, each in [2, 16], got {list(self.bit_widths)}")
        self.prune_ratios = ratios if "prune" in methods else ()
        self.bit_widths = bits if "quantize" in methods else ()
        self.ignored_layers = tuple(self.ignored_layers)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.search == "uniform" and methods != ("prune",):
            raise ValueError(f"search='uniform' prunes every group alike and needs methods=('prune',), got {methods!r}")
        if self.candidates < 1 or self.max_rounds < 1:
            raise ValueError(f"candidates and max_rounds must be >= 1, got {self.candidates} and {self.max_rounds}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.grow < 0:
            raise ValueError(f"grow must be >= 0, got {self.grow}")
        if self.recovery_steps < 0 or self.recovery_lr <= 0:
            raise ValueError(f"recovery_steps must be >= 0 and recovery_lr > 0, got {self.recovery_steps}, {self.recovery_lr}")


@dataclass
class CompressionResult:
    """A plan (what to remove and quantize) with everything measured on the way. Picklable."""

    policy: CompressionPolicy
    channels: dict[str, list[int]]  # group root -> output channel indices removed
    input_shape: list[int]
    evaluated: list[Candidate]
    sensitivity: SensitivityTable
    original_cost: float
    original_acc: float | None
    metric: str
    unit: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.evaluated if c.chosen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "channels": self.channels,
            "input_shape": self.input_shape,
            "evaluated": [c.to_dict() for c in self.evaluated],
            "sensitivity": self.sensitivity.state_dict(),
            "original_cost": self.original_cost,
            "original_acc": self.original_acc,
            "metric": self.metric,
            "unit": self.unit,
            "layers": self.layers,
            "calibration": self.calibration,
            "timings": self.timings,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CompressionResult:
        return cls(
            CompressionPolicy.from_dict(state["policy"]),
            {k: [int(i) for i in v] for k, v in state["channels"].items()},
            list(state["input_shape"]),
            [Candidate.from_dict(c) for c in state["evaluated"]],
            SensitivityTable.from_state_dict(state["sensitivity"]),
            state["original_cost"],
            state["original_acc"],
            state["metric"],
            state["unit"],
            state.get("layers", []),
            state.get("calibration", {}),
            state.get("timings", {}),
        )


def _no_progress(description: str) -> Callable[[int, int], None]:
    return lambda done, total: None


@torch.no_grad()
def accuracy(module: nn.Module, batches: Sequence[Batch]) -> float:
    """Top-1 accuracy of ``module(x)`` over ``(x, y)`` batches, in eval mode."""
    was_training = module.training
    module.eval()
    correct = total = 0
    for x, y in batches:
        correct += (module(x).argmax(-1) == y).sum().item()
        total += y.numel()
    module.train(was_training)
    return correct / max(total, 1)


def recover(module: nn.Module, batches: Sequence[Batch], steps: int, lr: float) -> None:
    """``steps`` Adam steps of cross-entropy on ``batches`` (cycled), in train mode: a candidate's short
    recovery before it is scored (batch norm re-estimates its statistics on the way)."""
    if steps <= 0 or not batches:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    was_training = module.training
    module.train()
    with torch.enable_grad():
        for step in range(steps):
            x, y = batches[step % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
    module.train(was_training)


def apply_plan(module: nn.Module, result: CompressionResult, calibration: Sequence[Tensor] = ()) -> None:
    """Prune then quantize ``module`` in place as ``result`` says, recording both for checkpoints;
    re-estimate batch norm and calibrate the quantizers on ``calibration`` inputs."""
    param = next(module.parameters())
    example = torch.zeros(result.input_shape, device=param.device, dtype=param.dtype)
    apply_channels_and_bits(module, example, result.channels, result.policy.quantized_layers(), calibration)


def compress(
    module: nn.Module,
    calibration: Sequence[Batch],
    config: CompressionConfig,
    meter: Meter,
    validation: Sequence[Batch] | None = None,
    train: Sequence[Batch] | None = None,
    progress: Progress = _no_progress,
) -> CompressionResult:
    """:func:`plan` and :func:`apply_plan` in one: ``module`` ends up compressed."""
    result = plan(module, calibration, config, meter, validation, train, progress)
    apply_plan(module, result, [x for x, _ in calibration])
    return result


def _baselines(
    units: ModelUnits,
    table: SensitivityTable,
    cost: CostModel,
    budget: float,
    config: CompressionConfig,
    quant_layers: Sequence[str],
    round_: int,
) -> list[Candidate]:
    """Uniform pruning, 8-bit-only, and uniform pruning of an 8-bit model, at the predicted ``budget``."""
    out = []
    eight = {n: min(8, max(config.bit_widths)) for n in quant_layers} if config.bit_widths else {}
    if config.prune_ratios and units.groups:
        top = max(config.prune_ratios)
        out.append(("uniform", uniform_search(units, table, cost, budget, top, or_tightest=True)))
        if eight:
            out.append(("joint uniform", uniform_search(units, table, cost, budget, top, or_tightest=True, bits=eight)))
    if eight:
        predicted = policy_cost(units, cost, {}, eight)
        sens = sum(table.quant.get(n, {}).get(b, 0.0) for n, b in eight.items())
        out.append(("quantize only", Candidate(CompressionPolicy(bits=eight), predicted, sens, budget)))
    for kind, cand in out:
        cand.round = round_
        cand.extra["kind"] = kind
    return [c for _, c in out]


def plan(
    module: nn.Module,
    calibration: Sequence[Batch],
    config: CompressionConfig,
    meter: Meter,
    validation: Sequence[Batch] | None = None,
    train: Sequence[Batch] | None = None,
    progress: Progress = _no_progress,
    cache_dir: str | None = None,
) -> CompressionResult:
    """Choose what to remove and quantize in ``module`` (left unchanged) to meet ``config.target``.

    ``calibration``: ``(x, y)`` batches for sensitivity, batch-norm re-estimation and quantizer scales;
    ``validation``: batches the candidates are scored on (default: ``calibration``); ``train``: batches
    for the recovery fine-tuning (default: ``calibration``).
    Raises :class:`UnreachableTargetError` when even the strongest compression misses the budget.
    """
    if not calibration:
        raise ValueError("plan needs at least one calibration batch")
    t0 = time.perf_counter()
    base = copy.deepcopy(module)  # hooks, traces and trial edits never touch the caller's model
    inputs = [x for x, _ in calibration]
    validation = list(validation) if validation else list(calibration)
    train = list(train) if train else list(calibration)
    units = analyze(base, inputs[0][:1], config.ignored_layers)
    named = dict(base.named_modules())
    quant_layers = (
        [
            info.name
            for info in units.layers
            if info.name not in config.ignored_layers and isinstance(named[info.name], meter.quantizable_types)
        ]
        if config.bit_widths
        else []
    )
    if config.bit_widths:
        left = [i.name for i in units.layers if i.name not in quant_layers and i.name not in config.ignored_layers]
        if left:
            warnings.warn(
                f"{PLUGIN}: {type(meter).__name__} cannot measure quantized {left} "
                f"(supported: {[t.__name__ for t in meter.quantizable_types]}); they stay float",
                stacklevel=2,
            )
    if not (config.prune_ratios and units.groups) and not quant_layers:
        raise UnsupportedModelError(
            PLUGIN,
            module,
            "nothing is compressible with these settings: no channel group "
            "can be pruned (every one reaches the output or an ignored/unsupported layer) "
            "and no layer can be quantized",
        )
    key = fingerprint(
        base, calibration, (config.prune_ratios, config.bit_widths, config.importance, config.ignored_layers, quant_layers)
    )
    if key in _SENSITIVITY_MEMO:
        table = _SENSITIVITY_MEMO[key]
    else:
        table, _ = cached_sensitivity(
            cache_dir,
            key,
            lambda: compute_sensitivity(
                base,
                units,
                calibration,
                config.prune_ratios,
                config.bit_widths,
                config.importance,
                quant_layers,
                progress=progress("sensitivity"),
            ),
        )
        _SENSITIVITY_MEMO[key] = table
    t1 = time.perf_counter()

    cost = meter.cost_model(units, base)
    meter.warm(cost, units, list(config.bit_widths), progress("layer cost table"))
    original_cost = meter.reference(base)

    def trial(policy: CompressionPolicy) -> nn.Module:
        copy_ = copy.deepcopy(base)
        apply_policy(copy_, units, table.order, policy, inputs)
        return copy_

    # the layers alone are not the whole model: fit scale and overhead to the original and a half-pruned one
    points = [({}, {}, original_cost)]
    if units.groups and config.prune_ratios:
        half = CompressionPolicy(prune={g.root: 0.5 for g in units.groups})
        points.append((half.prune, {}, meter.measure(trial(half))))
    cost.calibrate(units, points)
    calibration_info = {"measured": [p[2] for p in points], "scale": cost.scale, "overhead": cost.overhead}
    original_acc = accuracy(base, validation)
    budget = config.target * original_cost
    t2 = time.perf_counter()

    evaluated: list[Candidate] = []
    seen: set = set()
    tolerance = 0.0 if meter.exact else config.tolerance
    ceiling = 0.999 * policy_cost(units, cost, {}, {})
    high = budget * (1 + tolerance)

    def evaluate(cand: Candidate) -> None:
        seen.add(cand.policy.key())
        model = trial(cand.policy)
        cand.measured_cost = meter.measure(model)
        cand.val_acc = accuracy(model, validation)
        cand.extra["params"] = sum(p.numel() for p in model.parameters())
        evaluated.append(cand)

    # bad input first: if even the strongest compression misses the budget, say so before any edit
    tightest = lagrangian_search(units, table, cost, 0.0, config.prune_ratios, config.bit_widths, quant_layers, or_tightest=True)
    if tightest.predicted_cost > budget:
        tightest.extra["kind"] = "tightest"
        evaluate(tightest)
        if tightest.measured_cost > high:
            raise UnreachableTargetError(budget, tightest.measured_cost, original_cost, meter.unit, meter.metric)

    def rounds(search: str, baselines: bool) -> None:
        """Measurement rounds of one search, each steering its own predicted budget into the window."""
        bracket = BudgetBracket(budget, max(tolerance, 1e-9), ceiling=ceiling)
        # this search's policies measured already (as another search's baselines) steer it from the start
        own = [c for c in evaluated if search == "uniform" and c.extra.get("kind") == "uniform"]
        for cand in own:
            bracket.add(cand.predicted_cost, cand.measured_cost)
        if bracket.hit():
            return
        predicted_budget = bracket.next()
        for round_ in range(config.max_rounds):
            anchors = [own[i].policy for i in bracket.anchors()]
            fresh = propose_candidates(
                units,
                table,
                cost,
                predicted_budget,
                search,
                config.prune_ratios,
                config.bit_widths,
                quant_layers,
                config.candidates,
                seen,
                anchors,
                spread=max(config.tolerance, 0.01),
                centered=not meter.exact,
                round_=round_,
            )
            if baselines:
                keys = {c.policy.key() for c in fresh} | seen
                for cand in _baselines(units, table, cost, predicted_budget, config, quant_layers, round_):
                    if cand.policy.key() not in keys and cand.predicted_cost <= predicted_budget * (1 + config.tolerance):
                        keys.add(cand.policy.key())
                        fresh.append(cand)
            advance = progress(f"measuring {search} candidates (round {round_ + 1})")
            for i, cand in enumerate(fresh):
                advance(i, len(fresh))
                if search == "uniform":
                    cand.extra.setdefault("kind", "uniform")
                evaluate(cand)
                # a baseline is scored, but steers only its own rounds: its prediction errs otherwise (ResNet-20
                # at 0.2: uniform predicted x0.2 measured x0.21, ours x0.34-0.38), and its hit ended these
                # rounds before any of ours reached the window
                if cand.extra.get("kind") not in BASELINES or search == "uniform":
                    bracket.add(cand.predicted_cost, cand.measured_cost)
                    own.append(cand)
            advance(len(fresh), len(fresh))
            if bracket.hit() or not fresh or (meter.exact and any(c.measured_cost <= high for c in own)):
                break
            predicted_budget = bracket.next()

    # growing stops at the budget, not at the window's top: a policy accepted at the edge is there by a
    # lucky measurement about as often as not and then fails its fresh confirmation (at 0.25 on MNIST-1D,
    # grown to the edge, every seed fell back to uniform)
    grown_to = budget

    def grow() -> None:
        """NetAdapt run backwards: give channels back to one group at a time while the whole model
        measures within budget. Measured latency is not smooth in channels (a multiple of the vector
        width can run faster than one channel fewer), so each step is measured; the moves are tried
        best validation accuracy first. It starts from a candidate within the budget: giving channels back
        raises the cost, so from one measured between the budget and the window's top every move is
        rejected (6 of 6 measurements wasted on LeNet at 0.2, each a compile and 6 s of timing)."""
        under = [c for c in evaluated if c.measured_cost <= grown_to and c.policy.pruned_groups()]
        if not under:
            return
        current = max(under, key=lambda c: (c.val_acc, -c.measured_cost))
        spent = 0
        while spent < config.grow:
            moves = []
            for g in units.groups:
                kept = g.channels - pruned_count(g.channels, current.policy.prune.get(g.root, 0.0))
                for new in sorted({kept + 1, kept + 2, -(-(kept + 1) // 8) * 8}):
                    policy = CompressionPolicy(
                        prune={**current.policy.prune, g.root: (g.channels - new) / g.channels}, bits=dict(current.policy.bits)
                    )
                    if new <= g.channels and policy.key() not in seen:
                        seen.add(policy.key())
                        moves.append((accuracy(trial(policy), validation), policy))
            accepted = False
            for _, policy in sorted(moves, key=lambda m: -m[0]):
                if spent >= config.grow:
                    return
                cand = Candidate(
                    policy, policy_cost(units, cost, policy.prune, policy.bits), 0.0, budget, extra={"kind": "grown"}
                )
                evaluate(cand)
                spent += 1
                if cand.measured_cost <= grown_to:
                    current, accepted = cand, True
                    break
            if not accepted:
                return

    def grow_uniform(kind: str) -> None:
        """Uniform pruning given its channels back as uniform pruning, so that it is compared at the
        latency ours reaches, not at whatever its rounds hit (×0.37 for a 0.5 target seen): bisect the
        one ratio between the least pruned that measured within budget and the most pruned that measured
        over it, over the ratios that change some group's channel count, each step measured."""
        mine = [c for c in evaluated if c.extra.get("kind") == kind and "uniform_ratio" in c.extra]
        under = [c for c in mine if c.measured_cost <= high]
        if not under:
            return
        start = min(under, key=lambda c: c.extra["uniform_ratio"])
        if start.measured_cost >= budget * (1 - config.tolerance):
            return  # already at the budget: each measurement costs a compile and seconds of timing
        hi = start.extra["uniform_ratio"]
        lo = max(
            (c.extra["uniform_ratio"] for c in mine if c.measured_cost > high and c.extra["uniform_ratio"] < hi), default=0.0
        )

        def counts(ratio: float) -> tuple[int, ...]:
            return tuple(pruned_count(g.channels, ratio) for g in units.groups)

        ratios: dict[tuple[int, ...], float] = {}
        for i in range(1, 512):
            ratios.setdefault(counts(lo + (hi - lo) * i / 512), lo + (hi - lo) * i / 512)
        steps = [r for key, r in ratios.items() if key not in (counts(lo), counts(hi))]
        spent = 0
        while steps and spent < config.grow:
            ratio = steps[len(steps) // 2]
            policy = CompressionPolicy(prune={g.root: ratio for g in units.groups}, bits=dict(start.policy.bits))
            cand = Candidate(
                policy,
                policy_cost(units, cost, policy.prune, policy.bits),
                0.0,
                budget,
                extra={"kind": kind, "uniform_ratio": ratio, "grown": True},
            )
            evaluate(cand)
            spent += 1
            # measured cost falls as the ratio rises: keep the half that still brackets the budget
            steps = [r for r in steps if (r < ratio if cand.measured_cost <= grown_to else r > ratio)]

    rounds(config.search, baselines=config.search == "lagrangian")
    if config.search == "lagrangian" and config.prune_ratios and units.groups:
        # the uniform baseline steered into the window on its own: the answer is compared with it
        rounds("uniform", baselines=False)
    if not meter.exact and config.prune_ratios and units.groups:
        for kind in ("uniform", "joint uniform"):
            grow_uniform(kind)
        if config.search == "lagrangian":
            grow()
    t3 = time.perf_counter()

    low = budget * (1 - config.tolerance) if not meter.exact else 0.0
    in_window = [c for c in evaluated if low <= c.measured_cost <= high]
    # compared at equal measured cost: below the window only when nothing measured inside it (a run that
    # let faster candidates compete chose ones measured low by noise, and lost up to 8 points after fine-tuning)
    feasible = in_window or [c for c in evaluated if c.measured_cost <= high]
    # but a baseline is always scored (its least compressed policy within budget), so that the answer never
    # loses to it on validation: uniform at ×0.37 once beat every candidate measured inside a 0.5 window
    for kind in BASELINES:
        within = [c for c in evaluated if c.extra.get("kind") == kind and c.measured_cost <= high]
        if within and not any(c.extra.get("kind") == kind for c in feasible):
            feasible.append(max(within, key=lambda c: c.measured_cost))
    if not feasible:
        best = min(c.measured_cost for c in evaluated)
        raise UnreachableTargetError(budget, best, original_cost, meter.unit, meter.metric)
    if not in_window and not meter.exact:
        warnings.warn(
            f"{PLUGIN}: no candidate measured within {config.tolerance:.0%} of the {meter.metric} budget "
            f"{budget:.4g} {meter.unit} after {len(evaluated)} candidates; the closest under it measures "
            f"{max(c.measured_cost for c in feasible):.4g}",
            stacklevel=2,
        )
    if config.recovery_steps:
        # the search's prior (summed single-layer KL) misjudges hard cuts: score by accuracy after recovery
        advance = progress("recovering candidates")
        for i, cand in enumerate(feasible):
            advance(i, len(feasible))
            with isolated_seed(config.seed):
                model = trial(cand.policy)
                recover(model, train, config.recovery_steps, config.recovery_lr)
            cand.extra["recovered_acc"] = accuracy(model, validation)
        advance(len(feasible), len(feasible))

    def score(c: Candidate) -> tuple:
        return (round(c.extra.get("recovered_acc", c.val_acc), 4), c.measured_cost)

    chosen = max(feasible, key=score)
    if not meter.exact:
        # the best of many noisy measurements under the budget is likely to have measured low by luck:
        # confirm the winner with a second, uncached measurement, else try the runner-up. The fresh figure
        # alone counts: the first is biased low by the choice and may be a cached one taken under other
        # conditions, and a mean with it let fresh figures over budget pass
        for cand in sorted(feasible, key=score, reverse=True)[:5]:
            again = meter.remeasure(trial(cand.policy))
            cand.extra["first_measured_cost"] = cand.measured_cost
            cand.measured_cost = again
            if cand.measured_cost <= high:
                chosen = cand
                break
        else:
            confirmed = [c for c in feasible if c.measured_cost <= high]
            if not confirmed:
                warnings.warn(
                    f"{PLUGIN}: no candidate was confirmed within the {meter.metric} budget by a fresh "
                    f"measurement; the best-scored one is kept at {chosen.measured_cost:.4g} {meter.unit}, "
                    f"{chosen.measured_cost / budget - 1:+.1%} of the budget {budget:.4g} (window "
                    f"+{config.tolerance:.0%})",
                    stacklevel=2,
                )
            chosen = max(confirmed or [chosen], key=score)
    chosen.chosen = True
    t4 = time.perf_counter()
    return CompressionResult(
        chosen.policy,
        channels_to_prune(units, table.order, chosen.policy),
        [1, *inputs[0].shape[1:]],
        evaluated,
        table,
        original_cost,
        original_acc,
        meter.metric,
        meter.unit,
        layer_rows(units, table, cost, chosen.policy),
        calibration_info,
        {
            "sensitivity_s": t1 - t0,
            "layer_table_s": t2 - t1,
            "candidates_s": t3 - t2,
            "recovery_s": t4 - t3,
            "plan_s": t4 - t0,
            "sensitivity_table_s": table.seconds,
        },
    )
