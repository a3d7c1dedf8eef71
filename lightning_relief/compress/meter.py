"""Meters: what a compression budget is counted in.

The engine (:mod:`lightning_relief.compress.engine`) never asks which metric it
optimises; it asks a :class:`Meter` for

* a predictive per-layer :class:`~lightning_relief.compress.cost.CostModel`
  that the search can price thousands of policies with,
* the cost of the original model (:meth:`Meter.reference`), and
* the cost of a whole candidate model (:meth:`Meter.measure`), which is what
  the budget is checked against.

:class:`AnalyticMeter` counts MACs (``torch.utils.flop_counter.FlopCounterMode``
over the whole forward), parameters or bytes; :class:`~lightning_relief.compress.latency.LatencyMeter`
compiles and times with TVM. An energy meter or a GPU-latency meter is one new
subclass; the callback picks one by ``class_path`` in YAML:

.. code-block:: yaml

    callbacks:
      - class_path: lightning_relief.SensitivityPruningCallback
        init_args:
          target: 0.5
          meter:
            class_path: lightning_relief.compress.meter.AnalyticMeter
            init_args: {metric: macs}

>>> import torch
>>> from torch import nn
>>> from lightning_relief.compress import analyze
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
>>> meter = AnalyticMeter("macs")
>>> cost = meter.cost_model(analyze(model, torch.zeros(1, 1, 8, 8)), model)
>>> meter.reference(model)  # (4·9·36 + 144·10) / 1e6 MACs
0.002736
"""

from __future__ import annotations

from torch import nn

from lightning_relief.compress.cost import UNITS, CostModel
from lightning_relief.compress.units import PRUNABLE_TYPES, ModelUnits


class Meter:
    """What the engine needs from a cost metric (subclass it for a new one).

    Attributes:
        metric: the metric's name (``"latency"``, ``"macs"``, ...), used in reports.
        unit: its unit, for reports.
        exact: ``measure`` is deterministic, so a candidate must be at or under the budget; a measured
            (noisy) meter has a window ``budget · (1 ± tolerance)`` instead.
        quantizable_types: the layer types whose quantized versions this meter can measure.
    """

    metric: str = "cost"
    unit: str = ""
    exact: bool = True
    quantizable_types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES

    def cost_model(self, units: ModelUnits, module: nn.Module) -> CostModel:
        """A per-layer predictive cost model of ``module`` (analysed as ``units``)."""
        raise NotImplementedError

    def reference(self, module: nn.Module) -> float:
        """The original model's cost; later measurements may be taken relative to it."""
        return self.measure(module)

    def measure(self, module: nn.Module) -> float:
        """The cost of a whole (compressed) model."""
        raise NotImplementedError

    def remeasure(self, module: nn.Module) -> float:
        """A second, independent measurement (a measured meter must not answer it from a cache)."""
        return self.measure(module)

    def warm(self, cost: CostModel, units: ModelUnits, bits: list[int], progress=None) -> None:
        """Measure ahead whatever the cost model would measure on first use (default: nothing)."""


class AnalyticMeter(Meter):
    """MACs (millions, counted by ``FlopCounterMode`` over the whole forward at batch 1), parameters
    (thousands) or bytes (kB, weights at their bit width). Exact.

    Args:
        metric: ``"macs"``, ``"params"`` or ``"size"``.
    """

    def __init__(self, metric: str = "macs") -> None:
        if metric not in ("macs", "params", "size"):
            raise ValueError(f"AnalyticMeter metric must be 'macs', 'params' or 'size', got {metric!r}")
        self.metric = metric
        self.unit = UNITS[metric]
        self.exact = True
        self._example_shape: tuple[int, ...] | None = None

    def cost_model(self, units: ModelUnits, module: nn.Module) -> CostModel:
        self._example_shape = (1, *units.example_inputs.shape[1:])
        return CostModel(self.metric)

    def measure(self, module: nn.Module) -> float:
        if self.metric == "macs":
            return model_macs(module, self._example_shape) / 1e6
        if self.metric == "params":
            return sum(p.numel() for _, p in _weights(module)) / 1e3
        return model_bytes(module) / 1e3


def _weights(module: nn.Module):
    """Parameters that are weights, not a quantizer's learned scales."""
    return [(n, p) for n, p in module.named_parameters() if "_quant." not in n]


def model_macs(module: nn.Module, example_shape: tuple[int, ...] | None) -> float:
    """Multiply-accumulates of one forward (every matmul and convolution, as ``FlopCounterMode`` counts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if example_shape is None:
        raise RuntimeError("call cost_model(units, module) first: it fixes the input shape")
    param = next(module.parameters())
    x = torch.zeros(example_shape, device=param.device, dtype=param.dtype)
    was_training = module.training
    module.eval()
    try:
        # no torch.no_grad(): the counter's module tracker hooks autograd, which brevitas layers trip without it
        with FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() / 2


def model_bytes(module: nn.Module) -> float:
    """Bytes of the weights: quantized layers' weights at their bit width plus a float scale per output
    channel, everything else as float32."""
    from lightning_relief.compress.quantize import quantized_bits

    bits = quantized_bits(module)
    total = 0.0
    for name, p in _weights(module):
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer in bits:
            total += p.numel() * bits[layer] / 8 + p.shape[0] * 4
        else:
            total += p.numel() * 4
    return total
