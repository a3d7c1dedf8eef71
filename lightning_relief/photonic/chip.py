"""How fast a modelled photonic chip would deliver samples of a network.

The chip is a crossbar of ``rows × cols`` (inputs × outputs) fed by ``channels``
wavelength channels; each channel delivers ``channel_rate_hz`` independent
samples of one crossbar pass (one matrix–vector product with freshly
fluctuating weights) per second. The defaults give 8 × 8.8 GS/s = 70.4 GS/s,
the aggregate rate reported for the chaotic-light processor (reference notes
§4); the split into channels and per-channel rate, and the tile size, are
illustrative, not the published device's parameters.

A network sample needs, per photonic layer, one pass per output vector
(per position for a convolution) and per ``rows × cols`` tile of its weight
matrix; :func:`crossbar_passes` counts them with forward hooks.

>>> from lightning_relief.models import MLP
>>> from lightning_relief.photonic import convert_to_photonic
>>> passes = crossbar_passes(convert_to_photonic(MLP(in_features=64)), (1, 8, 8), ChipModel(rows=64, cols=64))
>>> passes  # 64x128 -> 2 tiles, 128x64 -> 2 tiles, 64x10 -> 1 tile
5
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_relief.nn.photonic import PhotonicConv2d, PhotonicLinear, PhotonicSamplerLayer

__all__ = ["ChipModel", "crossbar_passes"]


@dataclass(frozen=True)
class ChipModel:
    """A photonic crossbar processor: tile size and sampling rates."""

    channels: int = 8
    channel_rate_hz: float = 8.8e9
    rows: int = 16
    cols: int = 16

    def __post_init__(self) -> None:
        if self.channels < 1 or self.rows < 1 or self.cols < 1 or not self.channel_rate_hz > 0:
            raise ValueError(
                f"bad ChipModel: channels={self.channels}, channel_rate_hz={self.channel_rate_hz}, "
                f"rows={self.rows}, cols={self.cols}"
            )

    @property
    def sample_rate_hz(self) -> float:
        """Crossbar-pass samples per second over all wavelength channels."""
        return self.channels * self.channel_rate_hz

    def network_samples_per_second(self, passes_per_sample: int) -> float:
        """Full-network samples per second when one sample needs ``passes_per_sample`` passes."""
        if passes_per_sample < 1:
            raise ValueError(f"passes_per_sample must be >= 1, got {passes_per_sample}")
        return self.sample_rate_hz / passes_per_sample


def _tiles(fan_in: int, fan_out: int, chip: ChipModel) -> int:
    return math.ceil(fan_in / chip.rows) * math.ceil(fan_out / chip.cols)


def crossbar_passes(model: nn.Module, input_shape: tuple[int, ...], chip: ChipModel = ChipModel()) -> int:
    """Crossbar passes one sample of ``model`` needs for one input of ``input_shape`` (no batch axis)."""
    counts: list[int] = []

    def count(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(layer, PhotonicLinear):
            vectors = output[0].numel() // layer.out_features
            counts.append(vectors * _tiles(layer.in_features, layer.out_features, chip))
        elif isinstance(layer, PhotonicConv2d):
            kh, kw = layer.kernel_size
            positions = output.shape[-2] * output.shape[-1]
            per_group = _tiles(layer.in_channels // layer.groups * kh * kw, layer.out_channels // layer.groups, chip)
            counts.append(positions * layer.groups * per_group)

    layers = [m for m in model.modules() if isinstance(m, PhotonicSamplerLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PhotonicSamplerLayer")
    handles = [m.register_forward_hook(count) for m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sum(counts)
