"""The MNIST-1D generator (Greydanus 2020, "Scaling down deep learning"), run locally.

Ten hand-made 12-point templates, one per digit, are padded, dilated, scaled,
translated, filled with correlated noise where padded, given white noise,
sheared and resampled to ``length`` points. With the published arguments
(:data:`PAPER`) and seed 42 this reproduces the published data set: the random
draws are taken from one ``numpy.random.RandomState`` in the paper's order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

# 12-point templates of the digits 0..9, as in the paper
_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)


@dataclass(frozen=True)
class MNIST1DArgs:
    """The generator's arguments; the defaults are the paper's."""

    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    length: int = 40
    seed: int = 42


PAPER = MNIST1DArgs()


def templates() -> np.ndarray:
    """The templates whitened, shifted to start at 0 and scaled by 1/6, shape ``(10, 12)``."""
    x = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _transform(x: np.ndarray, args: MNIST1DArgs, rng: np.random.RandomState) -> np.ndarray:
    low, high = args.padding
    pad = low + int(rng.rand() * (high - low + 1))
    x = np.concatenate([x + 1e-8, np.zeros(pad)])  # +1e-8 keeps template points apart from padding
    x = _resample(x, args.template_len + high)
    x = x * (1 + args.scale_coeff * (rng.rand() - 0.5))
    shift = rng.choice(args.max_translation)
    x = np.concatenate([x[-shift:], x[:-shift]])
    padded = x == 0
    corr = gaussian_filter(args.corr_noise_scale * rng.randn(*x.shape), 2)
    x = np.where(padded, corr, x) + args.iid_noise_scale * rng.randn(*x.shape)
    x = x - args.shear_scale * (rng.rand() - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return _resample(x, args.length)


@functools.lru_cache(maxsize=4)
def generate(args: MNIST1DArgs = PAPER) -> dict[str, np.ndarray]:
    """The data set: ``x``, ``y`` (train) and ``x_test``, ``y_test``, standardised over all samples.

    Arrays are returned read-only, since they are cached and shared.

    >>> data = generate()
    >>> data["x"].shape, data["x_test"].shape, data["y"][:5].tolist()
    ((4000, 40), (1000, 40), [2, 6, 4, 5, 6])
    """
    if args.num_samples < 10 or not 0 < args.train_split < 1:
        raise ValueError(f"num_samples must be >= 10 and train_split in (0, 1), got {args.num_samples}, {args.train_split}")
    if args.length < 2 or args.max_translation < 1 or args.padding[0] > args.padding[1]:
        raise ValueError(
            f"bad MNIST-1D sizes: length={args.length}, max_translation={args.max_translation}, padding={args.padding}"
        )
    rng = np.random.RandomState(args.seed)
    shapes = templates()
    per_class = args.num_samples // len(shapes)
    xs = np.stack([_transform(shapes[label], args, rng) for label in range(len(shapes)) for _ in range(per_class)])
    ys = np.repeat(np.arange(len(shapes)), per_class)
    order = rng.permutation(len(ys))
    xs, ys = xs[order], ys[order]
    xs = (xs - xs.mean()) / xs.std()
    split = int(len(ys) * args.train_split)
    out = {"x": xs[:split], "y": ys[:split], "x_test": xs[split:], "y_test": ys[split:]}
    for array in out.values():
        array.setflags(write=False)
    return out
