"""Cost of a compressed model: latency, MACs, parameters or bytes.

A cost model prices one conv/linear layer given its kept input/output channels
and weight bits; a policy's cost is ``scale`` × the sum over layers plus a fixed
``overhead`` (everything that is not a conv/linear: pooling, activations,
call overhead, norm layers), both fitted to whole-model measurements by
:meth:`CostModel.calibrate`. ``metric="latency"`` reads the deploy package's measured
per-layer table (:class:`lightning_relief.deploy.LayerLatencyTable`) and gets its
overhead from one whole-model measurement; the final candidates are always
measured whole, so the table only has to rank policies well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_relief.compress.policy import FLOAT_BITS
from lightning_relief.compress.sensitivity import pruned_count
from lightning_relief.compress.units import LayerInfo, ModelUnits

METRICS = ("latency", "macs", "params", "size")
UNITS = {"latency": "ms", "macs": "MMAC", "params": "k params", "size": "kB"}


def _inputs_per_group(info: LayerInfo, cin: int) -> int:
    if info.groups > 1 and info.groups == info.in_channels:  # depthwise: groups shrink with the channels
        return info.in_channels // info.groups
    return max(cin // info.groups, 1)


def layer_macs(info: LayerInfo, cin: int, cout: int) -> float:
    kh, kw = info.kernel
    return float(cout * _inputs_per_group(info, cin) * kh * kw * info.out_hw[0] * info.out_hw[1])


def layer_params(info: LayerInfo, cin: int, cout: int) -> float:
    kh, kw = info.kernel
    return float(cout * _inputs_per_group(info, cin) * kh * kw + (cout if info.bias else 0))


class CostModel:
    """Analytic cost: ``"macs"`` (millions), ``"params"`` (thousands) or ``"size"`` (kB, bits-aware)."""

    def __init__(self, metric: str) -> None:
        if metric not in ("macs", "params", "size"):
            raise ValueError(f"analytic metric must be 'macs', 'params' or 'size', got {metric!r}")
        self.metric = metric
        self.overhead = 0.0
        self.scale = 1.0

    def _layer_cost(self, info: LayerInfo, cin: int, cout: int, bits: int) -> float:
        if self.metric == "macs":
            return layer_macs(info, cin, cout) / 1e6
        params = layer_params(info, cin, cout)
        if self.metric == "params":
            return params / 1e3
        # weights at their bit width; biases and scales stay float
        bias = cout if info.bias else 0
        return ((params - bias) * bits / 8 + bias * 4 + (cout * 4 if bits < FLOAT_BITS else 0)) / 1e3

    def layer_cost(self, info: LayerInfo, cin: int, cout: int, bits: int) -> float:
        return self.scale * self._layer_cost(info, cin, cout, bits)

    def calibrate(self, units: ModelUnits, points: list[tuple[Mapping[str, float], Mapping[str, int], float]]) -> None:
        """Fit ``scale`` and ``overhead`` to whole-model measurements ``(ratios, bits, cost)``.

        The layers alone are not the whole model: latency also goes to
        element-wise operators, fusion effects and call overhead; parameters
        and bytes to norm layers and biases. We model
        ``measured ≈ scale · Σ layers + overhead`` with ``overhead >= 0``: one
        measurement (the original) sets the overhead, two or more (the original
        and a uniformly pruned model) fit both by least squares.
        """
        self.scale, self.overhead = 1.0, 0.0
        rows = []
        for ratios, bits, measured in points:
            kept = kept_channels(units, ratios)
            total = 0.0
            for info in units.layers:
                cin, cout = layer_shape(units, info, kept)
                total += self.layer_cost(info, cin, cout, int(bits.get(info.name, FLOAT_BITS)))
            rows.append((total, measured))
        t = [r[0] for r in rows]
        m = [r[1] for r in rows]
        if len(rows) >= 2 and max(t) > min(t):
            n = len(rows)
            mt, mm = sum(t) / n, sum(m) / n
            slope = sum((a - mt) * (b - mm) for a, b in rows) / sum((a - mt) ** 2 for a in t)
            offset = mm - slope * mt
            if slope > 0 and offset >= 0:
                self.scale, self.overhead = slope, offset
                return
            if slope > 0:  # the fit wants negative overhead: scale alone, through the origin
                self.scale = sum(a * b for a, b in rows) / sum(a * a for a in t)
                return
        if m[0] >= t[0]:
            self.overhead = m[0] - t[0]
        else:
            self.scale = m[0] / t[0]


class LatencyCostModel(CostModel):
    """Measured latency (ms) per layer from a table, with a measured whole-model overhead.

    ``table(info, cin, cout, bits) -> ms`` is usually a
    :class:`lightning_relief.deploy.LayerLatencyTable` lookup. Each layer is
    measured at the corners of ``{low · C, C}`` for its prunable input and
    output channel counts (at most four compiles per layer and bit width) and
    priced in between by the bilinear function through those corners, i.e.
    ``a + b·cin + c·cout + d·cin·cout``, the form of a conv's work.
    """

    def __init__(self, table: Callable[[LayerInfo, int, int, int], float], low: float = 0.25) -> None:
        if not 0 < low < 1:
            raise ValueError(f"low must be in (0, 1), got {low}")
        super().__init__("macs")
        self.metric = "latency"
        self.table = table
        self.low = low
        self._cache: dict[tuple, float] = {}

    def _measured(self, info: LayerInfo, cin: int, cout: int, bits: int) -> float:
        key = (info.name, cin, cout, bits)
        if key not in self._cache:
            self._cache[key] = float(self.table(info, cin, cout, bits))
        return self._cache[key]

    def _corners(self, full: int, prunable: bool) -> tuple[int, int]:
        return (max(1, int(round(full * self.low))), full) if prunable else (full, full)

    def _layer_cost(self, info: LayerInfo, cin: int, cout: int, bits: int) -> float:
        i0, i1 = self._corners(info.in_channels, info.in_group is not None)
        o0, o1 = self._corners(info.out_channels, info.out_group is not None)
        ti = (cin - i0) / (i1 - i0) if i1 != i0 else 1.0
        to = (cout - o0) / (o1 - o0) if o1 != o0 else 1.0
        v11 = self._measured(info, i1, o1, bits)
        v01 = self._measured(info, i0, o1, bits) if i1 != i0 else v11
        v10 = self._measured(info, i1, o0, bits) if o1 != o0 else v11
        v00 = self._measured(info, i0, o0, bits) if (i1 != i0 and o1 != o0) else (v01 if o1 == o0 else v10)
        value = (1 - ti) * ((1 - to) * v00 + to * v01) + ti * ((1 - to) * v10 + to * v11)
        return max(value, 0.0)

    def warm(self, units: ModelUnits, bits: Sequence[int], progress: Callable[[int, int], None] | None = None) -> int:
        """Measure every corner the search can ask for now (with progress), instead of on first use."""
        todo = []
        for info in units.layers:
            ins = sorted(set(self._corners(info.in_channels, info.in_group is not None)))
            outs = sorted(set(self._corners(info.out_channels, info.out_group is not None)))
            todo += [(info, i, o, int(b)) for i in ins for o in outs for b in bits]
        for n, (info, i, o, b) in enumerate(todo):
            self._measured(info, i, o, b)
            if progress:
                progress(n + 1, len(todo))
        return len(todo)


def kept_channels(units: ModelUnits, ratios: Mapping[str, float]) -> list[int]:
    """Channels each group keeps under ``ratios`` (root -> ratio)."""
    return [g.channels - pruned_count(g.channels, ratios.get(g.root, 0.0)) for g in units.groups]


def layer_shape(units: ModelUnits, info: LayerInfo, kept: list[int]) -> tuple[int, int]:
    """(input, output) channels of a layer once its groups are pruned."""
    cin, cout = info.in_channels, info.out_channels
    if info.out_group is not None:
        g = units.groups[info.out_group]
        cout = kept[info.out_group] * info.out_channels // g.channels
    if info.in_group is not None:
        g = units.groups[info.in_group]
        cin = max(1, int(round(info.in_channels * kept[info.in_group] / g.channels)))
    elif info.groups > 1 and info.groups == info.in_channels and info.out_group is not None:
        cin = cout  # depthwise conv: its inputs follow its outputs
    return cin, cout


def policy_layer_costs(
    units: ModelUnits, cost: CostModel, ratios: Mapping[str, float], bits: Mapping[str, int]
) -> dict[str, float]:
    kept = kept_channels(units, ratios)
    out = {}
    for info in units.layers:
        cin, cout = layer_shape(units, info, kept)
        out[info.name] = cost.layer_cost(info, cin, cout, int(bits.get(info.name, FLOAT_BITS)))
    return out


def policy_cost(units: ModelUnits, cost: CostModel, ratios: Mapping[str, float], bits: Mapping[str, int]) -> float:
    return cost.overhead + math.fsum(policy_layer_costs(units, cost, ratios, bits).values())


def describe(metric: str) -> dict[str, Any]:
    return {"metric": metric, "unit": UNITS[metric]}
