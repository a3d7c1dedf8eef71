"""The physical model of a chaotic-light photonic crossbar (reference notes §4).

Each weight is the difference of two detected intensities, ``w = I+ - I-``.
A detected intensity fluctuates around the mean set by its amplitude ``a`` with
a relative spread fixed by the ratio of detector bandwidth ``f_e`` to optical
bandwidth ``f_o`` (amplitude–bandwidth encoding)::

    I ~ N(a, (s·a)^2),   s = sqrt(2·f_e/f_o)

so ``E[w] = a+ - a-`` and ``Var[w] = s^2·(a+^2 + a-^2)``. Samples taken faster
than the detector bandwidth are correlated; we model consecutive samples as a
stationary AR(1) process with lag-1 correlation ``rho``; a first-order detector
of bandwidth ``f_e`` sampled at ``f_s`` gives ``rho = exp(-2·pi·f_e/f_s)``.

The readout adds detector noise (the noise floor, a standard deviation in
output units) and is quantized by an ADC of ``bits`` over ``[-range, range]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# longest chain mixed by one k x k matrix product
_MATRIX_CHAIN_MAX = 256

__all__ = [
    "ar1_noise",
    "correlation_from_rates",
    "quantize_readout",
    "rank_normal",
    "readout_step",
    "relative_spread",
]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_normal(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard-normal draws of ``shape``; from the global generator in a process group, this rank's own.

    ``seed_everything`` gives every DDP rank the same global generator, so plain
    draws would be the same noise on every rank and DDP would average gradients
    of one draw instead of ``world_size``. Here each rank draws the ``world_size``
    blocks one after the other and keeps block ``rank``: every rank advances its
    global generator alike (all other draws stay as they were, and the ranks stay
    in step), and the noise stays a function of the global generator's state, so
    whatever restores that state (``PerRankNoise``, ``DeepEnsembleStrategy``'s
    checkpoints) restores the draws. An explicit ``generator`` is the caller's
    stream and is used as it is. Cost: ``world_size`` draws of ``shape`` instead of one.
    """
    rank, world = _rank_and_world() if generator is None else (0, 1)
    kept = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    for other in range(1, world):
        # drawn in turn rather than as one [world, *shape] block: at most two blocks alive at once
        block = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if other == rank:
            kept = block
    return kept


def relative_spread(bandwidth_ratio: Tensor | float) -> Tensor:
    """``sigma/mu = sqrt(2·f_e/f_o)`` of a detected chaotic-light intensity."""
    ratio = torch.as_tensor(bandwidth_ratio, dtype=torch.get_default_dtype())
    if bool((ratio < 0).any()):
        raise ValueError(f"bandwidth_ratio f_e/f_o must be >= 0, got {bandwidth_ratio}")
    return (2.0 * ratio).sqrt()


def correlation_from_rates(detector_bandwidth_hz: float, sample_rate_hz: float) -> float:
    """Lag-1 correlation of a first-order detector of bandwidth ``f_e`` sampled at ``f_s``.

    The detector's impulse response decays as ``exp(-2·pi·f_e·t)``; samples
    ``1/f_s`` apart share that fraction of their fluctuation. Sampling well
    below the bandwidth gives nearly independent samples.

    >>> round(correlation_from_rates(1e9, 1e9), 4)
    0.0019
    >>> round(correlation_from_rates(1e9, 20e9), 3)
    0.73
    """
    if detector_bandwidth_hz <= 0 or sample_rate_hz <= 0:
        raise ValueError(f"detector_bandwidth_hz and sample_rate_hz must be > 0, got {detector_bandwidth_hz}, {sample_rate_hz}")
    return math.exp(-2.0 * math.pi * detector_bandwidth_hz / sample_rate_hz)


def ar1_noise(
    shape: tuple[int, ...],
    correlation: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard-normal noise of ``shape`` whose first axis is a stationary AR(1) chain.

    ``eps[0] = z[0]``, ``eps[k] = rho·eps[k-1] + sqrt(1 - rho^2)·z[k]``: every
    element has unit variance and ``corr(eps[k], eps[k+j]) = rho^j``. The chain
    is applied as one triangular matrix product (a loop for chains longer than
    256, where that matrix would outgrow the noise). ``z`` comes from
    :func:`rank_normal`: each DDP rank draws its own.
    """
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    z = rank_normal(shape, generator=generator, device=device, dtype=dtype)
    k = shape[0]
    if correlation == 0.0 or k == 1:
        return z
    innovation_scale = math.sqrt(1.0 - correlation**2)
    if k > _MATRIX_CHAIN_MAX:  # the mixing matrix would grow as k^2: run the recursion instead
        out = torch.empty_like(z)
        out[0] = z[0]
        for i in range(1, k):
            out[i] = correlation * out[i - 1] + innovation_scale * z[i]
        return out
    index = torch.arange(k, device=z.device)
    lag = (index[:, None] - index[None, :]).to(z.dtype)
    mixing = torch.where(lag >= 0, correlation ** lag.clamp_min(0), torch.zeros_like(lag))
    innovation = torch.full((k,), innovation_scale, dtype=z.dtype, device=z.device)
    innovation[0] = 1.0
    mixing = mixing * innovation[None, :]
    return (mixing @ z.reshape(k, -1)).reshape(shape)


def readout_step(bits: int, full_scale: float) -> float:
    """Spacing of the ``2**bits`` ADC levels spread evenly over ``[-full_scale, full_scale]``."""
    return 2.0 * full_scale / (2**bits - 1)


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def quantize_readout(y: Tensor, bits: int, full_scale: float) -> Tensor:
    """ADC readout: clip to ``[-full_scale, full_scale]`` and round to ``2**bits`` levels.

    Gradients pass the rounding unchanged (straight-through) and stop where
    the signal is clipped, as a saturated ADC would report no change.

    >>> quantize_readout(torch.tensor([-3.0, 0.2, 0.9]), bits=2, full_scale=1.5).tolist()
    [-1.5, 0.5, 0.5]
    """
    if bits < 1:
        raise ValueError(f"ADC bits must be >= 1, got {bits}")
    if full_scale <= 0:
        raise ValueError(f"ADC full_scale must be > 0, got {full_scale}")
    step = readout_step(bits, full_scale)
    clipped = y.clamp(-full_scale, full_scale)
    return _RoundStraightThrough.apply((clipped + full_scale) / step) * step - full_scale
