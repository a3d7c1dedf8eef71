"""Search a policy that meets a cost budget with the least summed sensitivity.

The problem is a multiple-choice knapsack: one option per unit (a pruning
ratio per channel group, a bit width per layer), each with a sensitivity (KL)
and a cost, the total cost bounded by the budget. Costs are not quite
separable (pruning a group shrinks the inputs of the next layers too), so we
solve the Lagrangian relaxation ``min Σ sensitivity + λ · cost`` by coordinate
descent with exact cost deltas, bisect λ until the budget is just met, then
greedily spend whatever budget is left on the options that lower sensitivity
most. This takes milliseconds to seconds, against Galen's hundreds of
reinforcement-learning episodes, each compiled and measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lightning_relief.compress.cost import CostModel, kept_channels, layer_shape, policy_cost
from lightning_relief.compress.policy import FLOAT_BITS, CompressionPolicy
from lightning_relief.compress.sensitivity import SensitivityTable
from lightning_relief.compress.units import ModelUnits

SEARCHES = ("lagrangian", "uniform")


@dataclass
class Candidate:
    """A policy with its predicted and (once evaluated) measured figures."""

    policy: CompressionPolicy
    predicted_cost: float
    sensitivity: float
    budget: float
    measured_cost: float | None = None
    val_acc: float | None = None
    chosen: bool = False
    round: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "predicted_cost": self.predicted_cost,
            "sensitivity": self.sensitivity,
            "budget": self.budget,
            "measured_cost": self.measured_cost,
            "val_acc": self.val_acc,
            "chosen": self.chosen,
            "round": self.round,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        known = {"policy", "predicted_cost", "sensitivity", "budget", "measured_cost", "val_acc", "chosen", "round"}
        return cls(
            CompressionPolicy.from_dict(data["policy"]),
            data["predicted_cost"],
            data["sensitivity"],
            data["budget"],
            data.get("measured_cost"),
            data.get("val_acc"),
            data.get("chosen", False),
            data.get("round", 0),
            {k: v for k, v in data.items() if k not in known},
        )


class _Problem:
    """Options, sensitivities and incremental costs of one search."""

    def __init__(
        self,
        units: ModelUnits,
        table: SensitivityTable,
        cost: CostModel,
        prune_ratios: Sequence[float],
        bit_widths: Sequence[int],
        quant_layers: Sequence[str],
    ) -> None:
        self.units, self.cost = units, cost
        self.vars: list[tuple[str, str, list]] = []  # (kind, unit, options)
        self.sens: dict[tuple[str, str], dict] = {}
        if prune_ratios:
            for g in units.groups:
                options = [0.0, *sorted(float(r) for r in prune_ratios)]
                self.vars.append(("prune", g.root, options))
                self.sens[("prune", g.root)] = {0.0: 0.0, **table.prune[g.root]}
        if bit_widths:
            for name in quant_layers:
                options = [FLOAT_BITS, *sorted((int(b) for b in bit_widths), reverse=True)]
                self.vars.append(("quant", name, options))
                self.sens[("quant", name)] = {FLOAT_BITS: 0.0, **table.quant[name]}
        index = {info.name: i for i, info in enumerate(units.layers)}
        self.affected: dict[tuple[str, str], list[int]] = {}
        for kind, unit, _ in self.vars:
            if kind == "quant":
                self.affected[(kind, unit)] = [index[unit]]
            else:
                gi = next(i for i, g in enumerate(units.groups) if g.root == unit)
                self.affected[(kind, unit)] = [i for i, info in enumerate(units.layers) if gi in (info.in_group, info.out_group)]
        self._cache: dict[tuple, float] = {}

    def start(self) -> dict[tuple[str, str], object]:
        return {(kind, unit): options[0] for kind, unit, options in self.vars}

    def split(self, state: Mapping) -> tuple[dict[str, float], dict[str, int]]:
        ratios = {u: v for (k, u), v in state.items() if k == "prune"}
        bits = {u: v for (k, u), v in state.items() if k == "quant"}
        return ratios, bits

    def layer_cost(self, i: int, kept: list[int], bits: Mapping[str, int]) -> float:
        info = self.units.layers[i]
        cin, cout = layer_shape(self.units, info, kept)
        b = int(bits.get(info.name, FLOAT_BITS))
        key = (i, cin, cout, b)
        if key not in self._cache:
            self._cache[key] = self.cost.layer_cost(info, cin, cout, b)
        return self._cache[key]

    def total_cost(self, state: Mapping) -> float:
        ratios, bits = self.split(state)
        kept = kept_channels(self.units, ratios)
        return self.cost.overhead + math.fsum(self.layer_cost(i, kept, bits) for i in range(len(self.units.layers)))

    def sensitivity(self, state: Mapping) -> float:
        return math.fsum(self.sens[key][value] for key, value in state.items())

    def local_cost(self, state: dict, key: tuple[str, str], value: object) -> float:
        """Cost of the layers that ``key`` touches, with ``key`` set to ``value``."""
        old = state[key]
        state[key] = value
        ratios, bits = self.split(state)
        kept = kept_channels(self.units, ratios)
        total = math.fsum(self.layer_cost(i, kept, bits) for i in self.affected[key])
        state[key] = old
        return total

    def descend(self, lam: float, state: dict, sweeps: int = 8) -> dict:
        state = dict(state)
        for _ in range(sweeps):
            changed = False
            for kind, unit, options in self.vars:
                key = (kind, unit)
                scores = [self.sens[key][o] + lam * self.local_cost(state, key, o) for o in options]
                best = options[min(range(len(options)), key=lambda j: (scores[j], j))]
                if best != state[key]:
                    state[key] = best
                    changed = True
            if not changed:
                break
        return state

    def fill(self, state: dict, budget: float) -> dict:
        """Greedy: take back compression where the leftover budget allows, most sensitivity first."""
        state = dict(state)
        current = self.total_cost(state)
        while True:
            best = None
            for kind, unit, options in self.vars:
                key = (kind, unit)
                for o in options:
                    gain = self.sens[key][state[key]] - self.sens[key][o]
                    if gain <= 0:
                        continue
                    delta = self.local_cost(state, key, o) - self.local_cost(state, key, state[key])
                    if current + delta <= budget and (best is None or gain > best[0]):
                        best = (gain, key, o, delta)
            if best is None:
                return state
            _, key, o, delta = best
            state[key] = o
            current = self.total_cost(state)


def _policy(problem: _Problem, state: Mapping) -> CompressionPolicy:
    ratios, bits = problem.split(state)
    return CompressionPolicy(prune=ratios, bits=bits)


def lagrangian_search(
    units: ModelUnits,
    table: SensitivityTable,
    cost: CostModel,
    budget: float,
    prune_ratios: Sequence[float],
    bit_widths: Sequence[int],
    quant_layers: Sequence[str],
    iterations: int = 30,
    or_tightest: bool = False,
) -> Candidate:
    """The least-sensitivity policy whose predicted cost is at most ``budget``.

    If no policy is predicted to fit, raise ``ValueError`` or, with
    ``or_tightest``, return the strongest compression (marked ``tightest``):
    a prediction must not block a policy that measures within budget.
    """
    problem = _Problem(units, table, cost, prune_ratios, bit_widths, quant_layers)
    base = problem.start()
    scale = problem.total_cost(base)
    if scale <= budget:
        return Candidate(_policy(problem, base), scale, 0.0, budget)
    # λ is per unit of the *relative* cost, so one bracket fits every metric
    lo, hi = 1e-6 / scale, 1e6 / scale
    tightest = problem.descend(hi, base)
    if problem.total_cost(tightest) > budget:
        if or_tightest:
            return Candidate(
                _policy(problem, tightest),
                problem.total_cost(tightest),
                problem.sensitivity(tightest),
                budget,
                extra={"tightest": True},
            )
        raise ValueError(
            f"target cost {budget:.4g} is out of reach: the strongest compression with these options costs "
            f"{problem.total_cost(tightest):.4g} (original {scale:.4g}); raise target or allow more ratios/bits"
        )
    best_state = tightest
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        state = problem.descend(mid, base)
        if problem.total_cost(state) <= budget:
            hi, best_state = mid, state
        else:
            lo = mid
        if hi / lo < 1.01:
            break
    best_state = problem.fill(best_state, budget)
    return Candidate(_policy(problem, best_state), problem.total_cost(best_state), problem.sensitivity(best_state), budget)


def _interpolated(curve: Mapping[float, float], ratio: float) -> float:
    points = sorted({0.0: 0.0, **curve}.items())
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if r0 <= ratio <= r1:
            return v0 + (v1 - v0) * (ratio - r0) / (r1 - r0)
    return points[-1][1]


def uniform_search(
    units: ModelUnits,
    table: SensitivityTable | None,
    cost: CostModel,
    budget: float,
    max_ratio: float = 0.95,
    or_tightest: bool = False,
    bits: Mapping[str, int] | None = None,
) -> Candidate:
    """The smallest ratio that, applied to every group alike, meets ``budget`` (the usual baseline);
    with ``bits``, on top of those layers quantized (the joint baseline)."""
    bits = dict(bits or {})

    def cost_at(r: float) -> float:
        return policy_cost(units, cost, {g.root: r for g in units.groups}, bits)

    if cost_at(max_ratio) > budget:
        if or_tightest:
            return Candidate(
                CompressionPolicy(prune={g.root: max_ratio for g in units.groups}, bits=bits),
                cost_at(max_ratio),
                0.0,
                budget,
                extra={"uniform_ratio": max_ratio, "tightest": True},
            )
        raise ValueError(f"uniform pruning cannot reach cost {budget:.4g} (at ratio {max_ratio}: {cost_at(max_ratio):.4g})")
    lo, hi = 0.0, max_ratio
    if cost_at(0.0) <= budget:
        hi = 0.0
    # cost only changes where a group's rounded channel count does: bisect to the first such step
    for _ in range(40):
        if hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        if cost_at(mid) <= budget:
            hi = mid
        else:
            lo = mid
    ratios = {g.root: hi for g in units.groups}
    sens = 0.0
    if table is not None:
        sens = math.fsum(_interpolated(table.prune.get(g.root, {}), hi) for g in units.groups)
        sens += math.fsum(table.quant.get(n, {}).get(b, 0.0) for n, b in bits.items())
    return Candidate(CompressionPolicy(prune=ratios, bits=bits), cost_at(hi), sens, budget, extra={"uniform_ratio": hi})


def search_candidates(
    units: ModelUnits,
    table: SensitivityTable | None,
    cost: CostModel,
    budget: float,
    method: str,
    prune_ratios: Sequence[float],
    bit_widths: Sequence[int],
    quant_layers: Sequence[str],
    count: int = 4,
    spread: float = 0.05,
    round_: int = 0,
    centered: bool = False,
) -> list[Candidate]:
    """Up to ``count`` distinct policies for budgets ``budget · (1 − k·spread)``: a hedge for measurement.

    With ``centered`` the budgets straddle ``budget`` (``k − (count − 1)/2`` steps of ``spread``): for
    measured costs, where the prediction may err either way. Where nothing is predicted to fit, the
    strongest compression is returned: measuring decides.
    """
    out: list[Candidate] = []
    seen = set()
    shift = (count - 1) / 2 if centered else 0.0
    for k in range(count):
        b = budget * (1 - (k - shift) * spread)
        if method == "uniform":  # no further than the user allowed any group to go
            cand = uniform_search(units, table, cost, b, max(prune_ratios, default=0.95), or_tightest=True)
        else:
            cand = lagrangian_search(units, table, cost, b, prune_ratios, bit_widths, quant_layers, or_tightest=True)
        cand.round = round_
        if cand.policy.key() not in seen:
            seen.add(cand.policy.key())
            out.append(cand)
    return out


def nearby_candidates(
    units: ModelUnits,
    table: SensitivityTable,
    cost: CostModel,
    anchors: Sequence[CompressionPolicy],
    predicted_budget: float,
    prune_ratios: Sequence[float],
    bit_widths: Sequence[int],
    quant_layers: Sequence[str],
    count: int,
    seen: set,
    round_: int = 0,
) -> list[Candidate]:
    """Policies one option away from ``anchors`` whose predicted cost is nearest ``predicted_budget``.

    The Lagrangian solutions are sparse in cost: between a candidate that measured too cheap and one
    that measured too dear there may be none. One-step neighbours of both fill that gap; among
    neighbours about equally near the budget (within 1 %), the least sensitive comes first, and of
    neighbours with the same predicted cost (2- and 4-bit layers time as int8) only the least sensitive.
    """
    problem = _Problem(units, table, cost, prune_ratios, bit_widths, quant_layers)
    ranked = []
    for anchor in anchors:
        state = problem.start()
        for kind, unit, _ in problem.vars:
            state[(kind, unit)] = anchor.prune.get(unit, 0.0) if kind == "prune" else anchor.bits.get(unit, FLOAT_BITS)
        if any(value not in options for (_, _, options), value in zip(problem.vars, state.values())):
            continue  # a baseline off the search's grid (uniform ratios are continuous): no neighbours
        for kind, unit, options in problem.vars:
            for option in options:
                if option == state[(kind, unit)]:
                    continue
                moved = {**state, (kind, unit): option}
                policy = _policy(problem, moved)
                if policy.key() in seen:
                    continue
                predicted = problem.total_cost(moved)
                closeness = round(abs(predicted - predicted_budget) / (0.01 * predicted_budget))
                ranked.append((closeness, problem.sensitivity(moved), predicted, policy))
    out: list[Candidate] = []
    costs: set[float] = set()
    for _, sensitivity, predicted, policy in sorted(ranked, key=lambda r: (r[0], r[1])):
        if round(predicted, 12) not in costs:
            costs.add(round(predicted, 12))
            out.append(Candidate(policy, predicted, sensitivity, predicted_budget, round=round_, extra={"nearby": True}))
        if len(out) >= count:
            break
    return out


def propose_candidates(
    units: ModelUnits,
    table: SensitivityTable,
    cost: CostModel,
    predicted_budget: float,
    method: str,
    prune_ratios: Sequence[float],
    bit_widths: Sequence[int],
    quant_layers: Sequence[str],
    count: int,
    seen: set,
    anchors: Sequence[CompressionPolicy] = (),
    spread: float = 0.05,
    centered: bool = True,
    round_: int = 0,
) -> list[Candidate]:
    """One measurement round: up to ``count`` unmeasured policies around ``predicted_budget``.

    The search's own solutions come first; the rest are one-step neighbours of ``anchors`` (the
    measured candidates that bracket the target), for the Lagrangian search only, since a
    neighbour of a uniform policy is no longer uniform.
    """
    found = [
        c
        for c in search_candidates(
            units,
            table,
            cost,
            predicted_budget,
            method,
            prune_ratios,
            bit_widths,
            quant_layers,
            count=count,
            spread=spread,
            round_=round_,
            centered=centered,
        )
        if c.policy.key() not in seen
    ]
    if method == "lagrangian" and anchors and len(found) < count:
        taken = seen | {c.policy.key() for c in found}
        found += nearby_candidates(
            units,
            table,
            cost,
            anchors,
            predicted_budget,
            prune_ratios,
            bit_widths,
            quant_layers,
            count - len(found),
            taken,
            round_,
        )
    return found
