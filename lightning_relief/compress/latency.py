"""Measured latency for the search, through the deploy package's backend seam (TVM by default).

Layers are priced with :class:`lightning_relief.deploy.LayerLatencyTable` (each
layer compiled alone by TVM, cached on disk); whole candidates are compiled by the
meter's backend (:func:`lightning_relief.deploy.get_backend`) and timed
against the compiled original with :func:`lightning_relief.deploy.compare_latency`
(alternating rounds, so the ratio holds on a machine whose speed drifts), quantized ones after
:func:`lightning_relief.deploy.lower_quantized` turned their brevitas layers
into integer arithmetic, which is what an export ships.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_relief.compress.cost import CostModel, LatencyCostModel
from lightning_relief.compress.meter import Meter
from lightning_relief.compress.policy import FLOAT_BITS
from lightning_relief.compress.units import LayerInfo, ModelUnits


def check_target(target: Any) -> None:
    """Fail early, naming the target, if TVM cannot build for it."""
    from lightning_relief.deploy import resolve_target

    try:
        resolve_target(target)
    except Exception as err:  # TVM raises its own error types
        raise ValueError(f"target_device {target!r} is not a valid TVM target: {err}") from err


def table_bits(bits: int) -> int | None:
    """Bits to time a layer at: ``None`` for float; every integer width is stored and computed as
    int8 on CPUs (no narrower arithmetic), so 2/4/8 bits share one measurement."""
    if bits >= FLOAT_BITS:
        return None
    if bits > 8:
        raise ValueError(f"integer layers store at most 8 bits, got {bits}")
    return 8


class _Forward(nn.Module):
    """Just the module's ``forward``: what gets exported (no metrics, no trainer)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class LatencyMeter(Meter):
    """Latency (ms) measured with TVM: a per-layer table for the search, whole candidates timed
    side by side with the original, on one target (``"llvm"``: this CPU), sharing a cache folder.

    Args:
        target: TVM target (string, dict or ``tvm.target.Target``).
        cache_dir: folder for the layer table, whole-model and tuning caches.
        batch: batch size timed.
        tuning_trials: MetaSchedule trials (0: untuned, fast).
        repeat, number: timing repeats and runs per repeat.
        cache: reuse whole-model measurements across runs.
        compare_seconds: a candidate is timed against the original for at least this long.
        backend: what compiles and times whole models: ``"tvm"``, ``"onnxruntime"`` or a
            :class:`~lightning_relief.deploy.backend.Backend`'s class path. TVM's figures are cached
            by graph hash, so a candidate met before is not compiled again; other backends'
            are measured afresh.
    """

    metric = "latency"
    unit = "ms"
    exact = False
    # the deploy package's integer lowering knows these
    quantizable_types = (nn.Conv1d, nn.Conv2d, nn.Linear)

    def __init__(
        self,
        target: Any = "llvm",
        cache_dir: str | Path | None = None,
        batch: int = 1,
        tuning_trials: int = 0,
        repeat: int = 10,
        number: int = 10,
        cache: bool = True,
        compare_seconds: float = 6.0,
        backend: str = "tvm",
    ) -> None:
        from lightning_relief.deploy import ExportConfig, LayerLatencyTable, TuningConfig, get_backend

        check_target(target)
        if batch < 1 or tuning_trials < 0:
            raise ValueError(f"batch must be >= 1 and tuning_trials >= 0, got {batch}, {tuning_trials}")

        self.target = target
        self.batch = batch
        self.repeat, self.number = repeat, number
        self.cache = cache  # False: every whole-model measurement is taken afresh (layers stay cached)
        # a candidate is timed against the original for at least this long: this VM's slow spells
        # last seconds and can hold a whole short comparison (×0.58 instead of ×0.50 seen)
        self.compare_seconds = compare_seconds
        root = Path(cache_dir) if cache_dir is not None else None
        self.tuning = TuningConfig(trials=tuning_trials, work_dir=(root / "tuning") if root else None) if tuning_trials else None
        self.cache_dir = root / "latency" if root else None
        self.ratio_dir = root / "latency_ratio" if root else None
        self.backend = get_backend(backend)
        # static batch: the search prices one shape, and TVM's static-shape code is the faster
        self.export_config = ExportConfig(target=target, tuning=self.tuning, verify=False, measure=False, dynamic_batch=False)
        self.table = LayerLatencyTable(
            target, cache_dir=(root / "layers") if root else None, tuning=self.tuning, batch=batch, repeat=repeat, number=number
        )
        self.example_shape: tuple[int, ...] | None = None
        self.compiled_reference: Any = None  # the compiled original, once set_reference is called
        self.reference_ms: float | None = None

    def layer_ms(self, info: LayerInfo, cin: int, cout: int, bits: int) -> float:
        groups = info.groups
        if groups > 1 and groups == info.in_channels:  # depthwise stays depthwise when pruned
            groups, cin = cout, cout
        if info.kind == "linear":
            rows = info.in_hw[0]
            return rows * self.table.latency_ms("linear", cin, cout, bits=table_bits(bits), bias=info.bias)
        return self.table.latency_ms(
            info.kind,
            cin,
            cout,
            info.kernel,
            info.stride,
            info.padding,
            groups,
            input_size=info.in_hw,
            bits=table_bits(bits),
            bias=info.bias,
        )

    def cost_model(self, units: ModelUnits, module: nn.Module | None = None) -> LatencyCostModel:
        self.example_shape = (self.batch, *units.example_inputs.shape[1:])
        return LatencyCostModel(self.layer_ms)

    def warm(self, cost: CostModel, units: ModelUnits, bits: list[int], progress=None) -> None:
        if isinstance(cost, LatencyCostModel):
            cost.warm(units, [FLOAT_BITS, *bits[:1]], progress)

    def reference(self, module: nn.Module) -> float:
        return self.set_reference(module)

    def _deployable(self, module: nn.Module) -> tuple[nn.Module, Tensor]:
        """What an export ships: ``forward`` alone, integer-lowered if it has quantized layers."""
        from lightning_relief.compress.quantize import quantized_bits
        from lightning_relief.deploy import lower_quantized

        if self.example_shape is None:
            raise RuntimeError("call cost_model(units) first: it fixes the input shape")
        example = torch.zeros(self.example_shape, dtype=next(module.parameters()).dtype)
        model: nn.Module = _Forward(copy.deepcopy(module).cpu().eval())
        if quantized_bits(model):
            model = lower_quantized(model, example)
        return model, example

    def remeasure(self, module: nn.Module) -> float:
        cache, self.cache = self.cache, False
        try:
            return self.measure(module)
        finally:
            self.cache = cache

    def set_reference(self, module: nn.Module) -> float:
        """Compile and time the original model (ms, fastest repeat); later measurements are taken against it."""
        model, example = self._deployable(module)
        self.compiled_reference = self.backend.compile(model, example, self.export_config)
        seconds = self.compiled_reference.time(example, repeat=self.repeat, number=self.number)
        self.reference_ms = min(seconds) * 1e3  # fastest repeat, as compare_latency takes fastest rounds
        return self.reference_ms

    def measure(self, module: nn.Module) -> float:
        """Latency (ms) of the whole model.

        With a reference set: the reference's latency times the ratio of the two timed in
        alternation (:func:`lightning_relief.deploy.compare_latency`), so that a drift in the
        machine's speed between measurements does not move the figure. Otherwise the median alone.
        """
        import statistics

        from lightning_relief.deploy import compare_latency, measure_latency

        model, example = self._deployable(module)
        tvm = self.backend.name == "tvm"  # compare_latency/measure_latency compile it on a cache miss only
        candidate: Any = model if tvm else self.backend.compile(model, example, self.export_config)
        if self.compiled_reference is not None:
            ratio = compare_latency(
                candidate,
                self.compiled_reference,
                example,
                self.target,
                rounds=self.repeat,
                number=self.number,
                tuning=self.tuning,
                cache_dir=self.ratio_dir,
                cache=self.cache,
                min_seconds=self.compare_seconds,
            )
            return self.reference_ms * ratio.ratio
        if not tvm:
            return statistics.median(candidate.time(example, repeat=self.repeat, number=self.number)) * 1e3
        return measure_latency(
            model,
            example,
            self.target,
            repeat=self.repeat,
            number=self.number,
            cache_dir=self.cache_dir,
            tuning=self.tuning,
            cache=self.cache,
        ).median_ms
