"""Per-layer latency table: one conv2d or linear layer compiled alone and timed.

``"conv1d"`` layers are timed as conv1d (float, or the int8
:class:`~lightning_relief.deploy.quantized.IntegerConv1d`); their spec keeps the
pair fields with a unit first axis (kernel ``(1, k)``, input ``(1, length)``).

This is the hardware-in-the-loop cost model of the compression search: the
latency of each layer at each channel count and bit width, measured on the
target, tuned when a :class:`~lightning_relief.deploy.tuning.TuningConfig` is
given (its database is shared by all layers, so a layer shape met again is not
tuned again), and cached on disk by (layer, batch, target, tuning, remote).

``bits=None`` is the float32 layer; ``bits=8|4|2`` is the integer lowering of
:mod:`lightning_relief.deploy.quantized` (weights of that many bits stored as
int8, 8-bit unsigned activations, int32 accumulation). On CPUs there is no
narrower arithmetic than int8, so 4 and 2 bits measure like 8 bits: the table
reports what the hardware does, and the search should see that.

>>> import tempfile
>>> from lightning_relief.deploy import LayerLatencyTable
>>> table = LayerLatencyTable(target="llvm", cache_dir=tempfile.mkdtemp(), repeat=3, number=5)
>>> table.latency_ms("conv2d", 8, 16, kernel_size=3, padding=1, input_size=8) > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_relief.deploy.cache import JsonCache, default_cache_dir
from lightning_relief.deploy.latency import LatencyResult, measure_latency
from lightning_relief.deploy.targets import TargetLike, target_key
from lightning_relief.deploy.tuning import TuningConfig

_BITS = (None, 8, 4, 2)


def _last(v: int | Sequence[int]) -> int:
    return int(v) if isinstance(v, int) else int(tuple(v)[-1])


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, int) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerSpec:
    """One layer: ``kind`` "conv1d"/"conv2d" (in/out channels) or "linear" (in/out features)."""

    kind: Literal["conv1d", "conv2d", "linear"]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    input_size: tuple[int, int] = (1, 1)
    bits: int | None = None
    bias: bool = True

    @classmethod
    def make(
        cls,
        kind: str,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        groups: int = 1,
        input_size: int | Sequence[int] = 1,
        bits: int | None = None,
        bias: bool = True,
    ) -> LayerSpec:
        if kind not in ("conv1d", "conv2d", "linear"):
            raise ValueError(f"kind must be 'conv1d', 'conv2d' or 'linear', got {kind!r}")
        if not isinstance(in_channels, int) or in_channels < 1 or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"in/out channels must be positive ints, got {in_channels!r}, {out_channels!r}")
        if bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {bits!r}")
        if kind == "linear":
            return cls("linear", in_channels, out_channels, bits=bits, bias=bias)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if kind == "conv1d":  # a unit first axis: (1, k), (1, stride), (0, padding), (1, length)
            spec = cls(
                "conv1d",
                in_channels,
                out_channels,
                (1, _last(kernel_size)),
                (1, _last(stride)),
                (0, _last(padding)),
                groups,
                (1, _last(input_size)),
                bits,
                bias,
            )
        else:
            spec = cls(
                "conv2d",
                in_channels,
                out_channels,
                _pair(kernel_size, "kernel_size"),
                _pair(stride, "stride"),
                _pair(padding, "padding"),
                groups,
                _pair(input_size, "input_size"),
                bits,
                bias,
            )
        out = [(i + 2 * p - k) // s + 1 for i, p, k, s in zip(spec.input_size, spec.padding, spec.kernel_size, spec.stride)]
        if min(out) < 1:
            raise ValueError(f"input_size={spec.input_size} is too small for kernel {spec.kernel_size}, padding {spec.padding}")
        return spec

    @classmethod
    def of(cls, module: nn.Module, input_size: int | Sequence[int] = 1, bits: int | None = None) -> LayerSpec:
        """The spec of an existing ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Linear`` (or their integer versions).

        For a Conv1d, ``input_size`` is its input length.
        """
        if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
            return cls.make("linear", module.in_features, module.out_features, bits=bits, bias=module.bias is not None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) or hasattr(module, "kernel_size"):
            one_d = isinstance(module, nn.Conv1d) or len(getattr(module, "kernel_size", ())) == 1
            return cls.make(
                "conv1d" if one_d else "conv2d",
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.groups,
                input_size,
                bits,
                getattr(module, "bias", None) is not None,
            )
        raise TypeError(f"expected an nn.Conv2d or nn.Linear, got {type(module).__name__}")

    def input_shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (batch, self.in_channels)
        if self.kind == "conv1d":
            return (batch, self.in_channels, self.input_size[1])
        return (batch, self.in_channels, *self.input_size)

    def build(self) -> nn.Module:
        """The layer alone, with random weights (latency does not depend on their values)."""
        generator = torch.Generator().manual_seed(0)
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        elif self.kind == "conv1d":
            layer = nn.Conv1d(
                self.in_channels,
                self.out_channels,
                self.kernel_size[1],
                self.stride[1],
                self.padding[1],
                groups=self.groups,
                bias=self.bias,
            )
        else:
            layer = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                groups=self.groups,
                bias=self.bias,
            )
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        if self.bits is None:
            return layer
        from lightning_relief.deploy.quantized import integer_layer_from_float

        return integer_layer_from_float(layer, weight_bits=self.bits, input_bits=8, input_signed=False, input_scale=0.05)


class LayerLatencyTable:
    """Measured latency (ms) of single conv2d/linear layers on a target, cached on disk.

    Args:
        target: TVM target (``"llvm"``: this CPU).
        cache_dir: cache folder (default ``<cache dir>/layers``).
        tuning: ``None`` (untuned), a :class:`TuningConfig` or an int trial budget per layer.
        batch: batch size the layers are timed at.
        repeat, number: time evaluator settings.
        remote: a :class:`~lightning_relief.deploy.rpc.RemoteDevice` to time on.
    """

    def __init__(
        self,
        target: TargetLike = "llvm",
        cache_dir: str | os.PathLike | None = None,
        tuning: TuningConfig | int | dict | None = None,
        batch: int = 1,
        repeat: int = 10,
        number: int = 20,
        remote: Any = None,
    ) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.target = remote.target if remote is not None else target
        self.tuning = TuningConfig.coerce(tuning)
        self.batch = batch
        self.repeat = repeat
        self.number = number
        self.remote = remote
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "layers"
        self._index = JsonCache(self.cache_dir / "index")
        self._target_key = target_key(self.target)
        self.hits = 0
        self.misses = 0

    def _key(self, spec: LayerSpec) -> dict[str, Any]:
        return {
            "layer": asdict(spec),
            "batch": self.batch,
            "target": self._target_key,
            "tuning": self.tuning.signature() if self.tuning is not None else None,
            "remote": self.remote.cache_id() if self.remote is not None else None,
        }

    def measure(self, spec: LayerSpec) -> LatencyResult:
        """The full latency result of one layer (cached)."""
        key = self._key(spec)
        hit = self._index.get(key)
        if hit is not None:
            self.hits += 1
            return LatencyResult.from_dict(hit, cached=True)
        self.misses += 1
        layer = spec.build()
        example = torch.randn(spec.input_shape(self.batch), generator=torch.Generator().manual_seed(1))
        result = measure_latency(
            layer,
            example,
            self.target,
            repeat=self.repeat,
            number=self.number,
            cache_dir=self.cache_dir / "graphs",
            tuning=self.tuning,
            remote=self.remote,
        )
        self._index.put(key, result.as_dict())
        return result

    def latency_ms(
        self,
        kind: Literal["conv1d", "conv2d", "linear"],
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        groups: int = 1,
        input_size: int | Sequence[int] = 1,
        bits: int | None = None,
        bias: bool = True,
    ) -> float:
        """Median latency (ms) of one layer; ``in/out_channels`` are features for ``"linear"``."""
        spec = LayerSpec.make(kind, in_channels, out_channels, kernel_size, stride, padding, groups, input_size, bits, bias)
        return self.measure(spec).median_ms

    def module_latency_ms(self, module: nn.Module, input_size: int | Sequence[int] = 1, bits: int | None = None) -> float:
        """Latency of an existing ``nn.Conv2d``/``nn.Linear`` at ``input_size`` (H, W of its input)."""
        return self.measure(LayerSpec.of(module, input_size, bits)).median_ms

    def grid(
        self,
        kind: Literal["conv1d", "conv2d", "linear"],
        in_channels: Iterable[int],
        out_channels: Iterable[int],
        bits: Iterable[int | None] = (None, 8),
        progress: bool = True,
        **fixed: Any,
    ) -> list[dict[str, Any]]:
        """Measure every (in, out, bits) combination; rows of spec fields plus ``median_ms``."""
        specs = [LayerSpec.make(kind, i, o, bits=b, **fixed) for i in in_channels for o in out_channels for b in bits]
        rows = []
        iterator: Iterable[LayerSpec] = specs
        if progress:
            from rich.progress import track

            iterator = track(specs, description=f"timing {len(specs)} {kind} layers")
        for spec in iterator:
            result = self.measure(spec)
            rows.append({**asdict(spec), "median_ms": result.median_ms, "iqr_ms": result.iqr_ms, "cached": result.cached})
        return rows
