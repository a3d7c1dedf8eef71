"""Gaussian noise models of analog compute (Walking Noise, aihwkit-style weight noise).

A noise model turns a clean tensor into a noisy one at a given *level*. The
level comes from a schedule (:mod:`lightning_relief.noise.schedules`) and is a
0-d tensor (one level for the batch) or a ``(batch,)`` tensor (one level per
sample). Where the noise lands (weights, activations or layer outputs) is the
placement's business (:mod:`lightning_relief.noise.placement`); a model only
says which sites it supports.

All sampling goes through an explicit ``torch.Generator`` so that training
with noise is reproducible and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relief.noise.pool import NormalPool

SITES = ("weights", "activations", "outputs")


def _check_sigma(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def broadcast_level(level: Tensor, like: Tensor) -> Tensor:
    """Shape a 0-d or per-sample ``(B,)`` level so it broadcasts over ``like``."""
    if level.device != like.device or level.dtype != like.dtype:  # a no-op .to() still dispatches, once per hook
        level = level.to(device=like.device, dtype=like.dtype)
    if level.dim() == 0:
        return level
    if level.dim() != 1 or like.dim() == 0 or level.shape[0] != like.shape[0]:
        raise ValueError(f"a per-sample level of shape {tuple(level.shape)} does not fit a tensor of shape {tuple(like.shape)}")
    return level.reshape(-1, *([1] * (like.dim() - 1)))


Draws = torch.Generator | NormalPool | None  # where a noise model's N(0, 1) numbers come from


def randn_like(x: Tensor, generator: Draws) -> Tensor:
    """``N(0, 1)`` numbers shaped like ``x``: fresh from a generator, or a read-only slice of a
    :class:`~lightning_relief.noise.pool.NormalPool` (training); callers never modify the result."""
    return randn_like_shape(x, x.shape, generator)


def randn_like_shape(x: Tensor, shape: tuple[int, ...] | torch.Size, generator: Draws) -> Tensor:
    """:func:`randn_like` of ``shape``, on ``x``'s device and dtype."""
    if isinstance(generator, NormalPool):
        if not torch._C._functorch.is_batchedtensor(x):
            return generator.take(shape, x.dtype, x.device)
        generator = generator.fresh()  # inside vmap: each vectorized member draws its own
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def addcmul(x: Tensor, a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    """``x + a·b``, written into ``x`` when ``inplace`` (the caller knows autograd saved no copy of ``x``)."""
    return x.addcmul_(a, b) if inplace else torch.addcmul(x, a, b)


def add_noise(x: Tensor, a: Tensor, b: Tensor, inplace: bool = False, value: float = 1.0) -> Tensor:
    """``x + value·a·b`` for noise that carries no gradient: its gradient with respect to ``x`` is
    the identity, so in place it goes into ``x``'s data with no autograd node (recording one, and
    running it backward, cost about as much as the noise on a small layer)."""
    if not inplace:
        return torch.addcmul(x, a, b, value=value)
    x.detach().addcmul_(a, b, value=value)
    return x


def _window_max(
    x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """Max of non-negative ``x`` over every convolution window: separable, one spatial dim at a time.

    The max over a box is the max over each of its axes in turn; 1-d pooling
    is an order of magnitude cheaper on CPU than 2-d/3-d pooling of one channel.
    The last axis goes first (its lines are contiguous: no copy), and
    ``max_pool1d`` pads itself where it can (a pad op costs as much as the pooling on small inputs).
    """
    last = x.dim() - 1
    for axis in range(last, 1, -1):
        k, st, pad, dil = kernel[axis - 2], stride[axis - 2], padding[axis - 2], dilation[axis - 2]
        moved = x if axis == last else x.transpose(axis, last)
        shape = moved.shape
        line = moved.reshape(-1, 1, shape[-1])
        if 2 * pad > dil * (k - 1) + 1:  # more than max_pool1d pads: zeros by hand (|x| >= 0 never loses the max to them)
            line, pad = F.pad(line, (pad, pad)), 0
        pooled = F.max_pool1d(line, k, st, pad, dil)  # its own padding is -inf: no window is all padding
        x = pooled.view(*shape[:-1], pooled.shape[-1])
        if axis != last:
            x = x.transpose(axis, last)
    # the noise broadcasts this over every output channel: from a transposed view that op runs 3-5x slower
    return x.contiguous()


def input_abs_max(module: nn.Module | None, x_in: Tensor, y: Tensor) -> Tensor:
    """max|x| of the input vector behind each output of an analog MVM, shaped to broadcast over ``y``.

    aihwkit's noise management (``ABS_MAX``) scales each input vector of a tile
    by its own absolute max, and its output noise is relative to that scale: a
    ``Linear`` input vector is one row (one sample, or one token), a
    convolution's is one receptive field (its tile multiplies unfolded
    patches). Other layers fall back to the sample's max.
    """
    x = x_in.detach().abs()
    if isinstance(module, nn.Linear):
        return x.amax(-1, keepdim=True)
    if (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and module.groups == 1
        and not isinstance(module.padding, str)
        and x.dim() == module.weight.dim()
    ):
        return _window_max(x.amax(1, keepdim=True), module.kernel_size, module.stride, module.padding, module.dilation)
    per_sample = x.flatten(1).amax(1) if x.dim() > 1 else x.amax().reshape(1)
    return per_sample.reshape(-1, *([1] * (y.dim() - 1)))


class NoiseModel:
    """Base class. ``apply`` returns a noisy copy of ``x`` (modifies it only when asked: ``inplace=True``).

    ``level_kind`` names what the schedule's level means: ``"value"`` (a σ or a
    scale factor) or ``"time"`` (seconds since programming, for drift models).
    """

    level_kind: ClassVar[str] = "value"
    supported_sites: ClassVar[tuple[str, ...]] = SITES
    default_sites: ClassVar[tuple[str, ...]] = ("outputs",)
    default_level: ClassVar[float | None] = 0.1  # the level when no schedule is given

    def apply(
        self,
        x: Tensor,
        level: Tensor,
        generator: Draws = None,
        site: str = "outputs",
        module: nn.Module | None = None,
        inputs: tuple[Tensor, ...] = (),
        inplace: bool = False,
    ) -> Tensor:
        """``inplace=True`` may write the noise into ``x`` (the injector does so on conv/linear outputs,
        which their backward does not need: a fresh activation-sized tensor costs more than the noise)."""
        raise NotImplementedError

    def apply_weights(
        self,
        weights: list[Tensor],
        level: Tensor,
        generator: Draws = None,
        modules: list[nn.Module] | None = None,
    ) -> list[Tensor]:
        """Noisy copies of several weight tensors for one step (models may batch them)."""
        modules = modules or [None] * len(weights)  # type: ignore[list-item]
        return [self.apply(w, level, generator, "weights", m) for w, m in zip(weights, modules)]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class AdditiveGaussian(NoiseModel):
    """``y = x + σ·s·ε``, ε ~ N(0, 1); σ is the level.

    ``s`` is 1 (absolute σ, as in Walking Noise) or, with ``relative=True``,
    the tensor's max |x| (σ relative to the weight or signal range, as analog
    hardware specifies it).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = AdditiveGaussian().apply(torch.zeros(10000), torch.tensor(0.5), g)
    >>> round(float(y.std()), 1)
    0.5
    """

    def __init__(self, relative: bool = False) -> None:
        self.relative = bool(relative)

    def apply(self, x, level, generator=None, site="outputs", module=None, inputs=(), inplace=False):
        sigma = broadcast_level(level, x)
        if self.relative:
            sigma = sigma * x.detach().abs().amax().clamp(min=1e-12)
        return add_noise(x, sigma, randn_like(x, generator), inplace)


class MultiplicativeGaussian(NoiseModel):
    """``y = x·η``, η ~ N(1, σ²); σ is the level.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = MultiplicativeGaussian().apply(torch.full((10000,), 2.0), torch.tensor(0.1), g)
    >>> round(float(y.mean()), 1), round(float(y.std()), 1)
    (2.0, 0.2)
    """

    def apply(self, x, level, generator=None, site="outputs", module=None, inputs=(), inplace=False):
        sigma = broadcast_level(level, x)
        return addcmul(x, x * sigma, randn_like(x, generator), inplace)


class CombinedGaussian(NoiseModel):
    """Walking-Noise combined noise: ``y = x·η + ε`` with level ``A``.

    σ_add = A·r and σ_mul = A·(1 − r), ``r = ratio`` in [0, 1].

    >>> import torch
    >>> m = CombinedGaussian(ratio=0.25)
    >>> m.sigmas(torch.tensor(0.4))
    (tensor(0.1000), tensor(0.3000))
    """

    def __init__(self, ratio: float = 0.5) -> None:
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio

    def sigmas(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """(σ_add, σ_mul) for amplitude ``level``."""
        return level * self.ratio, level * (1.0 - self.ratio)

    def apply(self, x, level, generator=None, site="outputs", module=None, inputs=(), inplace=False):
        amplitude = broadcast_level(level, x)
        sigma_add, sigma_mul = self.sigmas(amplitude)
        multiplied = addcmul(x, x * sigma_mul, randn_like(x, generator), inplace)
        return multiplied.addcmul_(sigma_add, randn_like(x, generator))  # a fresh tensor, or x when inplace


class WeightNoise(NoiseModel):
    """aihwkit-preset-like noise of an analog matrix-vector multiply.

    On ``weights``: ``w + level·w_noise·max|w|·ε`` (aihwkit's additive weight
    modifier, relative to the layer's largest weight). On ``outputs`` of a
    conv/linear layer: ``y + level·out_noise·max|x|·max|w|·ε`` -- aihwkit adds
    ``out_noise`` to the normalised MVM result, where each input vector (a row,
    or a convolution's receptive field) is scaled by its own max and weights by
    their max (:func:`input_abs_max`). The level is a scale factor: 1.0
    is the preset (0.0175 weight noise, 0.04 output noise), 0 is clean.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> w = WeightNoise().apply(layer.weight, torch.tensor(1.0), site="weights")
    >>> w.shape
    torch.Size([3, 4])
    """

    default_sites: ClassVar[tuple[str, ...]] = ("weights", "outputs")
    supported_sites: ClassVar[tuple[str, ...]] = ("weights", "outputs")
    default_level: ClassVar[float | None] = 1.0

    def __init__(self, w_noise: float = 0.0175, out_noise: float = 0.04) -> None:
        self.w_noise = _check_sigma("w_noise", w_noise)
        self.out_noise = _check_sigma("out_noise", out_noise)

    def apply(self, x, level, generator=None, site="outputs", module=None, inputs=(), inplace=False):
        scale = broadcast_level(level, x)
        if site == "weights":
            return x + scale * self.w_noise * x.detach().abs().amax() * randn_like(x, generator)
        if site != "outputs":
            raise ValueError(f"WeightNoise supports sites {self.supported_sites}, got {site!r}")
        weight = getattr(module, "weight", None)
        if weight is None or not inputs:
            raise ValueError("WeightNoise on outputs needs a layer with a weight (Conv/Linear)")
        bound = input_abs_max(module, inputs[0], x) * (weight.detach().abs().amax() * self.out_noise) * scale
        return add_noise(x, randn_like(x, generator), bound, inplace)
