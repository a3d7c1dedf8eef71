"""Draw ``K`` samples of a network with photonic layers, and summarize them.

The ``K`` samples run as one batch: :func:`sample_logits` stacks ``K`` copies of
the input (sample-major) and :func:`photonic_samples` tells every
:class:`~lightning_relief.nn.photonic.PhotonicSamplerLayer` how the batch is laid
out, so ordinary modules in between (ReLU, pooling, eval-mode batch norm,
flatten) need no change. Sample ``k`` is wavelength channel ``k``.

Example::

    >>> import torch
    >>> from lightning_relief.models import MLP
    >>> from lightning_relief.photonic import convert_to_photonic, predictive
    >>> model = convert_to_photonic(MLP(in_features=64, dropout=0.0)).eval()
    >>> result = predictive(model, torch.randn(4, 1, 8, 8), num_samples=32, seed=0)
    >>> tuple(result.probs.shape), tuple(result.mean.shape), tuple(result.mutual_information.shape)
    ((32, 4, 10), (4, 10), (4,))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_relief.nn.photonic import PhotonicSamplerLayer
from lightning_relief.uncertainty.functional import mutual_information, predictive_entropy

__all__ = ["PhotonicPrediction", "photonic_samples", "predictive", "sample_logits", "summarize_samples"]

FanOut = Literal["auto", "layer", "input"]


def _layers(model: nn.Module) -> list[PhotonicSamplerLayer]:
    layers = [m for m in model.modules() if isinstance(m, PhotonicSamplerLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PhotonicSamplerLayer; convert it with convert_to_photonic first")
    return layers


@contextmanager
def photonic_samples(
    model: nn.Module,
    num_samples: int,
    generator: torch.Generator | None = None,
    raw_batch: int | None = None,
) -> Iterator[nn.Module]:
    """Within the block, ``model``'s photonic layers draw ``num_samples`` samples per input.

    The batch reaching a photonic layer holds ``num_samples`` stacked copies of
    the input (sample-major); with ``raw_batch`` given, a photonic layer that
    receives a batch of exactly that size takes it as the unstacked input and
    fans it out itself. ``generator`` (optional) supplies every random draw, so
    a seeded generator reproduces the samples exactly.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    layers = _layers(model)
    previous = [(layer._num_samples, layer._generator, layer._raw_batch) for layer in layers]
    for layer in layers:
        layer._num_samples, layer._generator, layer._raw_batch = num_samples, generator, raw_batch
    try:
        yield model
    finally:
        for layer, (count, gen, raw) in zip(layers, previous):
            layer._num_samples, layer._generator, layer._raw_batch = count, gen, raw


def _rng_state(generator: torch.Generator | None, device: torch.device) -> tuple:
    if generator is not None:
        return (generator.get_state(),)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return (torch.get_rng_state(), cuda)


def _set_rng_state(state: tuple, generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None:
        generator.set_state(state[0])
        return
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def sample_logits(
    model: nn.Module,
    x: Tensor,
    num_samples: int = 32,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    fan_out: FanOut = "auto",
) -> Tensor:
    """``num_samples`` forward samples of ``model`` on ``x``: ``[K, N, *out]``.

    Runs as one batch of ``K·N``. ``seed`` (or a ``generator``) makes the draw
    reproducible without touching the global RNG. Gradients flow if enabled.

    ``fan_out`` says where the ``K`` copies are made: ``"input"`` stacks them
    before the model; ``"layer"`` lets the first photonic layer make them, so
    the modules before it run once (a model where an unstacked branch meets a
    stacked one, e.g. a skip connection around a converted layer, then fails
    on a shape mismatch); ``"auto"`` tries ``"layer"`` and on such a failure
    reruns with ``"input"`` from the same random state.
    """
    if fan_out not in get_args(FanOut):
        raise ValueError(f"fan_out must be one of {get_args(FanOut)}, got {fan_out!r}")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    n = x.shape[0]
    if fan_out != "input" and num_samples > 1:
        state = _rng_state(generator, x.device) if fan_out == "auto" else None
        try:
            with photonic_samples(model, num_samples, generator, raw_batch=n):
                out = model(x)
            if out.shape[0] != num_samples * n:
                raise RuntimeError(f"expected a batch of {num_samples}x{n} samples at the output, got {out.shape[0]}")
            return out.reshape(num_samples, n, *out.shape[1:])
        except RuntimeError:
            if state is None:
                raise
            _set_rng_state(state, generator, x.device)
    stacked = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * n, *x.shape[1:])
    with photonic_samples(model, num_samples, generator):
        out = model(stacked)
    return out.reshape(num_samples, n, *out.shape[1:])


@dataclass(frozen=True)
class PhotonicPrediction:
    """Per-sample probabilities ``[K, N, C]``, their mean ``[N, C]``, and per-example
    predictive entropy and mutual information ``[N]`` (nats)."""

    probs: Tensor
    mean: Tensor
    entropy: Tensor
    mutual_information: Tensor


def summarize_samples(logits: Tensor) -> PhotonicPrediction:
    """Predictive mean, entropy and mutual information of ``[K, N, C]`` sampled logits."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [K, N, C], got shape {tuple(logits.shape)}")
    probs = logits.float().softmax(-1)
    mean = probs.mean(0)
    return PhotonicPrediction(probs, mean, predictive_entropy(mean), mutual_information(probs))


@torch.no_grad()
def predictive(
    model: nn.Module, x: Tensor, num_samples: int = 32, *, seed: int | None = None, batch_size: int | None = None
) -> PhotonicPrediction:
    """Sample ``model`` ``num_samples`` times on ``x`` (in chunks of ``batch_size`` inputs) and summarize."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    chunks = [x] if batch_size is None else list(x.split(batch_size))
    logits = torch.cat([sample_logits(model, chunk, num_samples, generator=generator) for chunk in chunks], dim=1)
    return summarize_samples(logits)
