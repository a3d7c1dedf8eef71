"""Moment-propagation rules: each maps an input's per-unit mean and variance to the output's.

Every unit is treated as an independent Gaussian (Brach, Sick & Dürr 2020), so a
rule only needs the elementwise ``mean`` and ``var`` of its input; the one exception
is max pooling after a convolution, which takes the covariance of neighbouring
outputs from :func:`conv_neighbour_cov`. Rules are plain
tensor code without data-dependent Python branches, so a network built from them
traces with ``torch.export`` into one graph.

``var`` may be ``None`` in :func:`dropout_moments` (a deterministic input); every
other rule needs a tensor (zeros for a deterministic input).

Example::

    >>> import torch
    >>> from lightning_relief.moments import functional as MF
    >>> mean, var = MF.relu_moments(torch.tensor([0.0]), torch.tensor([1.0]))
    >>> round(mean.item(), 4), round(var.item(), 4)  # E[max(Z, 0)] = 1/sqrt(2 pi)
    (0.3989, 0.3408)
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "activation_moments",
    "adaptive_avg_pool_moments",
    "adaptive_max_pool_moments",
    "alpha_dropout_moments",
    "avg_pool_moments",
    "batch_norm_moments",
    "batch_norm_scale_squared",
    "clamp_moments",
    "conv_moments",
    "conv_neighbour_cov",
    "conv_transpose_moments",
    "dropout_moments",
    "elementwise_moments",
    "gaussian_conv_moments",
    "gaussian_linear_moments",
    "gaussian_weight_moments",
    "group_norm_moments",
    "layer_norm_moments",
    "leaky_relu_moments",
    "linear_moments",
    "logit_uncertainty",
    "max_moments",
    "max_pool_moments",
    "max_reduce_moments",
    "mean_moments",
    "normalized_moments",
    "pool_offsets",
    "prelu_moments",
    "product_moments",
    "rectified_moments_slope",
    "relu_moments",
    "sampled_attention_moments",
    "sigmoid_moments",
    "softmax_log_probs",
    "softmax_probs",
    "tanh_moments",
    "weight_moments",
]

SoftmaxMethod = Literal["daunizeau", "mean_field", "logit_samples"]
SOFTMAX_METHODS = ("daunizeau", "mean_field", "logit_samples")
LOGIT_SAMPLES = 256  # fixed draws of the "logit_samples" softmax (antithetic pairs)
# fixed draws of logit_uncertainty: mutual information is a small difference of two entropies, and with
# 256 draws its sampling noise moved OOD AUROCs by 0.01-0.03 (MNIST-1D models); 2048 cost C x 2048 per input
UNCERTAINTY_SAMPLES = 2048
_rule = np.polynomial.hermite.hermgauss(24)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Daunizeau (arXiv 1703.00091): E[sigmoid(x)] ~ sigmoid(mu / sqrt(1 + a v)), a = 3 / pi^2.
# Unlike the probit form Phi(mu / sqrt(1/lambda + v)) it is exact at v = 0.
_SIGMOID_A = 3.0 / math.pi**2
# Gauss-Hermite rule for E[f(x)], x ~ N(m, v): sum_i w_i f(m + sqrt(2 v) t_i), weights / sqrt(pi)
_GH_NODES, _GH_WEIGHTS = (
    [float(t) for t in _rule[0]],
    [float(w) / math.sqrt(math.pi) for w in _rule[1]],
)
# beyond |alpha| = 10, Phi is exactly 0 or 1 and std * phi < 1e-22 * std: clamping changes
# nothing there and bounds the cancellation in the variance (see _rectified)
_ALPHA_MAX = 10.0


def _cdf(x: Tensor) -> Tensor:
    # erf, not ndtr/erfc: erf is in every export/TVM operator set
    return 0.5 * (1.0 + torch.erf(x * _SQRT_HALF))


def _pdf(x: Tensor) -> Tensor:
    return _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _std(var: Tensor) -> Tensor:
    # a strictly positive std so that mean / std is +-inf-free after clamping, also at var = 0
    return var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


def _rectified(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``E[relu(x)]``, ``Var[relu(x)]`` and ``P(x > 0)`` for ``x ~ N(mean, var)``."""
    # every rule with a ReLU or a max runs this: few operations, in place on temporaries that autograd does
    # not keep (each elementwise operation on 16k-40k units costs 3-10 us on one CPU core)
    std = _std(var)
    alpha = (mean / std).clamp_(-_ALPHA_MAX, _ALPHA_MAX)
    p = torch.erf(alpha * _SQRT_HALF).mul_(0.5).add_(0.5)
    pdf = torch.exp(alpha * alpha * -0.5) * _INV_SQRT_2PI  # not in place: exp's gradient reads its output
    out_mean = mean * p + std * pdf
    # Var = var * g(alpha) with g = (a^2 + 1) P + a phi - (a P + phi)^2 = P + t (a - t), t = a P + phi:
    # E[y^2] - E[y]^2 in units of var, whose cancellation is bounded by (a^2 + 1) * eps because
    # |a| <= 10, so a mean far above its std costs no precision (absolute units would lose it all)
    t = alpha * p + pdf
    g = ((alpha - t) * t).add_(p).clamp_min_(0.0)
    return out_mean, var * g, p


def relu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ``relu(x)``, ``x ~ N(mean, var)``."""
    out_mean, out_var, _ = _rectified(mean, var)
    return out_mean, out_var


def leaky_relu_moments(mean: Tensor, var: Tensor, negative_slope: float | Tensor = 0.01) -> tuple[Tensor, Tensor]:
    """Exact moments of ``leaky_relu(x) = a x + (1 - a) relu(x)``.

    ``Cov(x, relu(x)) = var * P(x > 0)`` (Stein's lemma) gives the cross term.
    """
    out_mean, out_var, _ = rectified_moments_slope(mean, var, negative_slope)
    return out_mean, out_var


def rectified_moments_slope(
    mean: Tensor, var: Tensor, negative_slope: float | Tensor = 0.0
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Moments of a (leaky) ReLU and its expected slope ``E f'(x) = a + (1 - a) P(x > 0)``.

    The slope is the first-order map of shared noise sources through the unit (Stein's lemma:
    the derivative of the output mean by the input mean), so ``covariance="low_rank"`` gets it
    from the same pass.
    """
    a = negative_slope
    r_mean, r_var, p = _rectified(mean, var)
    if isinstance(a, (int, float)) and a == 0.0:
        return r_mean, r_var, p
    out_mean = a * mean + (1.0 - a) * r_mean
    out_var = a * a * var + (1.0 - a) ** 2 * r_var + 2.0 * a * (1.0 - a) * var * p
    return out_mean, out_var.clamp_min_(0.0), a + (1.0 - a) * p


def _logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    # torch.logsumexp exports as aten.amax, which TVM's Relax frontend lacks; max(dim) it has
    top = x.max(dim=dim, keepdim=True)[0].detach()
    out = (x - top).exp().sum(dim=dim, keepdim=True).log() + top
    return out if keepdim else out.squeeze(dim)


def _gaussian_expectation(fn: Callable[[Tensor], Tensor], mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``fn(x)``, ``x ~ N(mean, var)``, by Gauss-Hermite quadrature."""
    nodes = torch.tensor(_GH_NODES, dtype=mean.dtype, device=mean.device)
    weights = torch.tensor(_GH_WEIGHTS, dtype=mean.dtype, device=mean.device)
    values = fn(mean.unsqueeze(-1) + (2.0 * var).sqrt().unsqueeze(-1) * nodes)
    out_mean = (values * weights).sum(-1)
    # the centred form: non-negative, and exactly 0 at var = 0
    centred = values - out_mean.unsqueeze(-1)
    return out_mean, (centred * centred * weights).sum(-1)


def sigmoid_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of ``sigmoid(x)`` by 24-point Gauss-Hermite quadrature (exact at ``var = 0``).

    The closed forms (probit, Daunizeau) get the mean within about 0.02 but the
    variance of a saturated unit wrong by orders of magnitude; sigmoid is smooth,
    so quadrature is accurate to ~1e-4 at the cost of 24 evaluations per unit.
    """
    return _gaussian_expectation(torch.sigmoid, mean, var)


def tanh_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of ``tanh(x)`` by Gauss-Hermite quadrature (see :func:`sigmoid_moments`)."""
    return _gaussian_expectation(torch.tanh, mean, var)


def _check_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p must be in [0, 1), got {p}")


def _dropout_input(mean: Tensor, var: Tensor | None, p: float) -> Tensor:
    """Checks the rate; the input variance, zeros for a deterministic input (``var=None``)."""
    _check_rate(p)
    return torch.zeros_like(mean) if var is None else var


def dropout_moments(mean: Tensor, var: Tensor | None, p: float) -> tuple[Tensor, Tensor]:
    """Inverted dropout with rate ``p``: ``mean`` is kept, ``var' = (var + p mean^2) / (1 - p)``.

    ``var=None`` stands for a deterministic input. ``p = 0`` returns the input unchanged.
    """
    if p == 0.0:
        return mean, _dropout_input(mean, var, p)
    _check_rate(p)
    # in place on the fresh square (the rule runs at every dropout layer); a deterministic input has no var term
    if var is None:
        return mean, (mean * mean).mul_(p / (1.0 - p))
    return mean, (mean * mean).mul_(p).add_(var).mul_(1.0 / (1.0 - p))


def weight_moments(
    op: Callable[..., Tensor], mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None, *args, **kwargs
) -> tuple[Tensor, Tensor]:
    """A layer linear in its input with fixed weights (``F.linear``, ``F.conv2d``, ...).

    ``mean' = op(mean, W, b)``, ``var' = op(var, W * W)``; ``args``/``kwargs`` are the
    op's remaining arguments (stride, padding, ...).
    """
    out_mean = op(mean, weight, bias, *args, **kwargs)
    out_var = op(var, weight * weight, None, *args, **kwargs)
    return out_mean, out_var


def _channel_cat(first: Tensor, second: Tensor, groups: int) -> Tensor:
    """``first`` and ``second`` side by side along the input channels of each of ``groups`` groups (dim 1;
    the last dim of a linear layer's input)."""
    if first.dim() == 2 or groups == 1:
        return torch.cat([first, second], dim=-1 if first.dim() == 2 else 1)
    return torch.cat([first.unflatten(1, (groups, -1)), second.unflatten(1, (groups, -1))], dim=2).flatten(1, 2)


def _two_weight_sum(
    op: Callable[..., Tensor], x1: Tensor | None, w1: Tensor, x2: Tensor, w2: Tensor, groups: int, *args, **kwargs
) -> Tensor:  # fmt: skip
    """``op(x1, w1) + op(x2, w2)`` (no bias) as one call on inputs and weights stacked along the input channels.

    One convolution with twice the input channels costs ~1.4 of one on CPU, two cost 2 and an addition;
    ``x1 = None`` (a deterministic input's zero variance) drops the first term.
    """
    if x1 is None:
        return op(x2, w2, None, *args, **kwargs)
    return op(_channel_cat(x1, x2, groups), torch.cat([w1, w2], dim=1), None, *args, **kwargs)


def gaussian_weight_moments(
    op: Callable[..., Tensor],
    mean: Tensor,
    var: Tensor | None,
    weight_mean: Tensor,
    weight_var: Tensor,
    bias_mean: Tensor | None,
    bias_var: Tensor | None,
    *args,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """A layer with independent Gaussian weights ``N(weight_mean, weight_var)``.

    ``var' = sum[(mu^2 + v)(mw^2 + vw) - mu^2 mw^2] + vb``, computed as
    ``op(v, mw^2 + vw) + op(mu^2, vw) + vb``, which has no cancellation (``var=None``: a
    deterministic input, the first term vanishes).
    """
    out_mean = op(mean, weight_mean, bias_mean, *args, **kwargs)
    groups = kwargs.get("groups", args[3] if len(args) > 3 else 1)
    second = weight_mean * weight_mean + weight_var
    out_var = _two_weight_sum(op, var, second, mean * mean, weight_var, groups, *args, **kwargs)
    if bias_var is not None:
        shape = [1, -1] + [1] * (out_var.dim() - 2) if out_var.dim() > 2 else [-1]
        out_var = out_var + bias_var.reshape(shape)
    return out_mean, out_var


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def linear_moments(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``F.linear`` with fixed weights: ``mean' = W mean + b``, ``var' = (W * W) var``."""
    return weight_moments(F.linear, mean, var, weight, bias)


def conv_moments(
    mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
    dilation: Any = 1, groups: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``F.conv1d/2d/3d`` (chosen by ``weight.dim()``) with fixed weights."""
    return weight_moments(_CONV[weight.dim()], mean, var, weight, bias, stride, padding, dilation, groups)


def gaussian_linear_moments(
    mean: Tensor, var: Tensor | None, weight_mean: Tensor, weight_var: Tensor, bias_mean: Tensor | None = None,
    bias_var: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A linear layer with independent Gaussian weights (see :func:`gaussian_weight_moments`)."""
    return gaussian_weight_moments(F.linear, mean, var, weight_mean, weight_var, bias_mean, bias_var)


def gaussian_conv_moments(
    mean: Tensor, var: Tensor | None, weight_mean: Tensor, weight_var: Tensor, bias_mean: Tensor | None = None,
    bias_var: Tensor | None = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A convolution with independent Gaussian weights (see :func:`gaussian_weight_moments`)."""
    op = _CONV[weight_mean.dim()]
    return gaussian_weight_moments(op, mean, var, weight_mean, weight_var, bias_mean, bias_var, stride, padding, dilation, groups)


def batch_norm_moments(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Batch norm in eval mode: a per-channel affine map ``y = scale x + shift`` (channels on dim 1)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1, -1] + [1] * (mean.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    return mean * scale + shift, var * (scale * scale)


def _larger_first(mean1: Tensor, mean2: Tensor) -> Tensor:
    """1 where ``mean1 > mean2``, 0 where smaller, 1/2 at ties: blends the operands as ``torch.where`` would pick.

    Arithmetic rather than ``torch.where``, which is ~30x slower on CPU here; at a tie
    ``P(d > 0) = 1/2`` and Clark's formulas are symmetric, so the half-half blend is exact.
    """
    return torch.sign(mean1 - mean2).mul_(0.5).add_(0.5)


def max_moments(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of ``max(x1, x2)`` for independent Gaussians (Clark 1961), in a stable form.

    With ``h`` the input of larger mean and ``l`` the other, ``max = h + relu(l - h)``
    and ``d = l - h ~ N(mu_l - mu_h, v1 + v2)``:
    ``E = mu_h + E[relu(d)]``, ``Var = v_h + Var[relu(d)] - 2 v_h P(d > 0)``
    (``Cov(h, relu(d)) = -v_h P(d > 0)`` by Stein's lemma). Taking ``h`` as the base
    keeps the correction small, so very large or very different means lose no precision.
    """
    first = _larger_first(mean1, mean2)
    var_h = var2 + first * (var1 - var2)
    r_mean, r_var, p = _rectified(-(mean1 - mean2).abs(), var1 + var2)
    return torch.maximum(mean1, mean2) + r_mean, (var_h + r_var - 2.0 * var_h * p).clamp_min_(0.0)


def _window_slices(x: Tensor, dims: int, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> list[Tensor]:
    """The ``prod(kernel)`` strided views whose elementwise reduction is the pooling."""
    sizes = x.shape[-dims:]
    out = [(sizes[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    views = [x]
    for i in range(dims):
        lead = (slice(None),) * (x.dim() - dims + i)
        span = stride[i] * (out[i] - 1) + 1
        views = [v[lead + (slice(k * dilation[i], k * dilation[i] + span, stride[i]),)] for v in views for k in range(kernel[i])]
    return views


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def max_pool_moments(
    mean: Tensor,
    var: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    dims: int = 2,
    ceil_mode: bool = False,
    covariances: dict[tuple[int, ...], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Max pooling as a chain of pairwise :func:`max_moments` over each window.

    Each intermediate maximum is re-approximated by a Gaussian, so windows of more
    than two units are an approximation. Padding units are certain and very negative;
    ``ceil_mode`` adds such units on the right for the last, partial window.

    ``covariances`` maps each offset of :func:`pool_offsets` to ``Cov(x_p, x_{p + offset})``
    (e.g. from :func:`conv_neighbour_cov`); the chain then uses Clark's formulas for
    correlated maxima (:func:`_correlated_max`). Without it units are independent, which
    is far off for the outputs of a convolution with Gaussian weights.
    """
    kernel = _tuple(kernel_size, dims)
    step = _tuple(stride if stride is not None and stride != [] else kernel, dims)
    pad = _tuple(padding, dims)
    dil = _tuple(dilation, dims)
    extra = [0] * dims
    if ceil_mode:  # PyTorch's rule: one more window if it starts inside the input or left padding
        for i in range(dims):
            size, span = mean.shape[-dims + i] + 2 * pad[i], dil[i] * (kernel[i] - 1) + 1
            out = -(-(size - span) // step[i]) + 1
            if (out - 1) * step[i] >= mean.shape[-dims + i] + pad[i]:
                out -= 1
            extra[i] = max(0, (out - 1) * step[i] + span - size)
    if any(pad) or any(extra):
        flat = [v for p, e in zip(reversed(pad), reversed(extra)) for v in (p, p + e)]
        # finite, so that mean * P(...) stays 0 instead of -inf * 0 = nan; its square is still finite
        low = -1e15 if mean.dtype != torch.float16 else -6e4
        mean = F.pad(mean, flat, value=low)
        var = F.pad(var, flat, value=0.0)
    means = _window_slices(mean, dims, kernel, step, dil)
    variances = _window_slices(var, dims, kernel, step, dil)
    if covariances:
        flat = [v for p, e in zip(reversed(pad), reversed(extra)) for v in (p, p + e)]
        padded = {d: F.pad(c, flat) if any(flat) else c for d, c in covariances.items()}
        return _correlated_max(means, variances, _window_cov(padded, dims, kernel, step, dil))[:2]
    out_mean, out_var = means[0], variances[0]
    for m, v in zip(means[1:], variances[1:]):
        out_mean, out_var = max_moments(out_mean, out_var, m, v)
    return out_mean, out_var


def _window_cov(
    covariances: dict[tuple[int, ...], Tensor], dims: int, kernel: Sequence[int], step: Sequence[int], dil: Sequence[int]
) -> Callable[[int, int], Tensor]:
    """``cov(a, b)``: ``Cov(unit a, unit b)`` of every window (``a < b``), from the covariance at each offset."""
    windows = {d: _window_slices(c, dims, kernel, step, dil) for d, c in covariances.items()}
    offsets = window_offsets(kernel, dil)

    def cov(a: int, b: int) -> Tensor:
        delta = tuple(ob - oa for oa, ob in zip(offsets[a], offsets[b]))
        return windows[delta][a] if delta in windows else windows[tuple(-d for d in delta)][b]

    return cov


def window_offsets(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, ...]]:
    """Offsets of a pooling window's units, in the order of :func:`_window_slices`."""
    return [tuple(k * d for k, d in zip(ks, dilation)) for ks in itertools.product(*(range(k) for k in kernel))]


def canonical_offset(delta: Sequence[int]) -> tuple[int, ...]:
    """``delta`` or ``-delta``, whichever has its first non-zero component positive."""
    first = next((d for d in delta if d != 0), 0)
    return tuple(delta) if first >= 0 else tuple(-d for d in delta)


def pool_offsets(kernel_size: Any, dilation: Any, dims: int) -> list[tuple[int, ...]]:
    """The unit offsets between two units of one pooling window (one of each +-pair)."""
    offsets = window_offsets(_tuple(kernel_size, dims), _tuple(dilation, dims))
    return sorted({canonical_offset([b - a for a, b in zip(oa, ob)]) for i, oa in enumerate(offsets) for ob in offsets[i + 1 :]})


def _correlated_max(
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    cov: Callable[[int, int], Tensor],
    factors: Sequence[Sequence[Tensor]] = (),
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Clark's maximum of correlated Gaussians, chained over a window, in the stable form of :func:`max_moments`.

    With ``h`` the larger-mean operand, ``max = h + relu(l - h)``, ``d = l - h``,
    ``Var d = v_h + v_l - 2 c``: ``Var max = v_h + Var relu(d) + 2 (c - v_h) P(d > 0)`` and,
    for a later unit ``j``, ``Cov(max, x_j) = c_hj + (c_lj - c_hj) P(d > 0)`` (Stein's lemma).
    ``factors`` (each as the window's slices ``[N, K, ...]``) are mixed the same way: the
    maximum's factor is ``sum_i P(x_i is the maximum) L_i``.
    """
    n = len(means)
    out_mean, out_var = means[0], variances[0]
    out_factors = [f[0] for f in factors]
    running = [None] + [cov(0, j) for j in range(1, n)]  # Cov(running max, unit j)
    for i in range(1, n):
        c = running[i]
        first = _larger_first(out_mean, means[i])
        var_h = variances[i] + first * (out_var - variances[i])
        d_var = (out_var + variances[i] - 2.0 * c).clamp_min_(0.0)
        r_mean, r_var, p = _rectified(-(out_mean - means[i]).abs(), d_var)
        if i + 1 < n or factors:
            # P(x_i > running max); either way round Cov(max, x_j) = c_mj + (c_ij - c_mj) wins
            wins = (1.0 - p) + first * (2.0 * p - 1.0)
            for j in range(i + 1, n):
                running[j] = running[j] + (cov(i, j) - running[j]) * wins
            out_factors = [m + wins.unsqueeze(1) * (f[i] - m) for m, f in zip(out_factors, factors)]
        out_mean = torch.maximum(out_mean, means[i]) + r_mean
        out_var = (var_h + r_var + 2.0 * (c - var_h) * p).clamp_min_(0.0)
    return out_mean, out_var, out_factors


def max_pool_wins(
    mean: Tensor,
    var: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    dims: int = 2,
    covariances: dict[tuple[int, ...], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Max pooling (no padding) as :func:`max_pool_moments`, with ``wins`` ``[N, k, C, *out]``.

    ``wins[:, i]`` is the probability that window element ``i`` is the maximum, the
    derivative of the output mean by that element's mean: the pool's map of shared noise
    sources to first order (see :mod:`~lightning_relief.moments.low_rank`). Units are
    independent unless ``covariances`` are given.
    """
    kernel = _tuple(kernel_size, dims)
    step = _tuple(stride if stride is not None and stride != [] else kernel, dims)
    dil = _tuple(dilation, dims)
    means = _window_slices(mean, dims, kernel, step, dil)
    if covariances:
        cov = _window_cov(covariances, dims, kernel, step, dil)
    else:
        zero = torch.zeros_like(means[0])

        def cov(a: int, b: int) -> Tensor:
            return zero

    k = len(means)
    # one-hot factors, one per window element: mixed like a factor, they come out as the win probabilities
    eye = torch.eye(k, dtype=mean.dtype, device=mean.device).reshape(k, 1, k, *(1,) * (dims + 1))
    out_mean, out_var, wins = _correlated_max(means, _window_slices(var, dims, kernel, step, dil), cov, [list(eye)])
    return out_mean, out_var, wins[0].expand(mean.shape[0], k, *out_mean.shape[1:])


def _shift(x: Tensor, axis: int, s: int) -> Tensor:
    """``y[i] = x[i - s]`` along ``axis``, zero where ``i - s`` falls outside."""
    size = x.shape[axis]
    if abs(s) >= size:
        return torch.zeros_like(x)
    y = x.movedim(axis, -1)
    y = F.pad(y[..., : size - s], (s, 0)) if s >= 0 else F.pad(y[..., -s:], (0, -s))
    return y.movedim(-1, axis)


def _conv_padding(padding: Any, weight: Tensor, dilation: Sequence[int], dims: int) -> list[int]:
    """``F.pad`` widths (last dim first) of a convolution's zero padding, ``"same"``/``"valid"`` included."""
    if padding == "valid":
        return [0] * (2 * dims)
    if padding == "same":
        flat = []
        for i in reversed(range(dims)):
            total = dilation[i] * (weight.shape[2 + i] - 1)
            flat += [total // 2, total - total // 2]
        return flat
    return [v for p in reversed(_tuple(padding, dims)) for v in (p, p)]


def conv_neighbour_cov(
    mean: Tensor, var: Tensor | None, weight_mean: Tensor, weight_var: Tensor | None, bias_var: Tensor | None,
    stride: Any, padding: Any, dilation: Any, groups: int, offset: Sequence[int],
) -> Tensor:  # fmt: skip
    """``Cov(y_p, y_{p + offset})`` of a convolution's outputs ``y`` (same channel), at every ``p``.

    Inputs independent with moments ``(mean, var)`` (``var=None``: deterministic); weights fixed, or
    Gaussian ``N(weight_mean, weight_var)`` drawn once for all positions (bayesian-torch). Two
    outputs share input units through different weights, and (Gaussian weights) the same
    weights through different inputs, which makes neighbours strongly correlated:
    ``conv(var, W (.) shift_j(W)) + conv(mean (.) shift_{-delta}(mean), weight_var) + bias_var``,
    ``delta = offset * stride`` in input units, ``j = delta / dilation``.
    Values where ``p + offset`` lies outside the output are meaningless (never used).
    """
    dims = weight_mean.dim() - 2
    step, dil = _tuple(stride, dims), _tuple(dilation, dims)
    flat = _conv_padding(padding, weight_mean, dil, dims)
    op = _CONV[weight_mean.dim()]
    delta = [o * s for o, s in zip(offset, step)]
    # the variance term exists when the offset is a whole number of kernel taps
    if var is not None and not all(d % k == 0 for d, k in zip(delta, dil)):
        var = None
    shared = None
    if var is not None:
        shared = weight_mean
        for i, d in enumerate(delta):
            shared = _shift(shared, 2 + i, d // dil[i])
        shared = weight_mean * shared
    out = None
    if weight_var is not None:
        shifted = mean
        for i, d in enumerate(delta):
            shifted = _shift(shifted, mean.dim() - dims + i, -d)
        pairs = F.pad(mean * shifted, flat) if any(flat) else mean * shifted
        first = (F.pad(var, flat) if any(flat) else var) if var is not None else None
        out = _two_weight_sum(op, first, shared, pairs, weight_var, groups, step, 0, dil, groups)
    elif var is not None:
        out = op(F.pad(var, flat) if any(flat) else var, shared, None, step, 0, dil, groups)
    else:
        out = torch.zeros_like(op(F.pad(mean, flat) if any(flat) else mean, weight_mean, None, step, 0, dil, groups))
    if bias_var is not None:
        out = out + bias_var.reshape([1, -1] + [1] * dims)
    return out


def batch_norm_scale_squared(running_var: Tensor, weight: Tensor | None, eps: float, ndim: int) -> Tensor:
    """The squared per-channel scale of eval-mode batch norm, shaped to broadcast over ``ndim``-d inputs."""
    scale = 1.0 / (running_var + eps)
    if weight is not None:
        scale = scale * weight * weight
    return scale.reshape([1, -1] + [1] * (ndim - 2))


def avg_pool_moments(
    mean: Tensor,
    var: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    dims: int = 2,
) -> tuple[Tensor, Tensor]:
    """Average pooling over ``m`` units: ``var' = sum(var) / m^2``.

    (The TensorFlow reference divides by ``m^3``.) Padding, ``ceil_mode`` and
    ``count_include_pad`` change the divisor per position; it is recovered from
    pooling a tensor of ones, so every PyTorch option is matched.
    """
    kernel = _tuple(kernel_size, dims)
    step = _tuple(stride if stride is not None and stride != [] else kernel, dims)
    pool = F.avg_pool2d if dims == 2 else F.avg_pool1d
    options = {"kernel_size": kernel, "stride": step, "padding": padding, "ceil_mode": ceil_mode}
    if dims == 2:
        out_mean = pool(mean, count_include_pad=count_include_pad, divisor_override=divisor_override, **options)
    elif divisor_override is None:
        out_mean = pool(mean, count_include_pad=count_include_pad, **options)
    else:
        raise ValueError(f"avg_pool1d has no divisor_override, got {divisor_override}")
    plain = divisor_override is None and not ceil_mode and (not any(_tuple(padding, dims)) or count_include_pad)
    if plain:
        # the divisor is the window size everywhere: avg(var) / m = sum(var) / m^2
        return out_mean, pool(var, **options) / math.prod(kernel)
    if dims != 2:
        raise ValueError("avg_pool1d with ceil_mode or count_include_pad=False is not supported")
    ones = torch.ones_like(var[:1, :1])
    total = pool(var, divisor_override=1, **options)
    count = pool(ones, divisor_override=1, **options)
    inv_divisor = pool(ones, count_include_pad=count_include_pad, divisor_override=divisor_override, **options) / count
    return out_mean, total * inv_divisor * inv_divisor


def adaptive_avg_pool_moments(
    mean: Tensor, var: Tensor, output_size: int | Sequence[int | None], dims: int = 2
) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling where every output averages an equal, non-overlapping block.

    This holds when each input size is a multiple of its output size (global
    pooling always); other sizes have unequal overlapping windows and raise.
    """
    kernel = _equal_windows(mean, output_size, dims, "average")
    return avg_pool_moments(mean, var, kernel, kernel, dims=dims)


def _equal_windows(mean: Tensor, output_size: Any, dims: int, kind: str) -> tuple[int, ...]:
    """The window of an adaptive pooling whose windows are equal and disjoint; other sizes raise."""
    sizes = mean.shape[-dims:]
    target = _tuple(output_size, dims) if output_size is not None else sizes
    target = tuple(s if t is None else t for s, t in zip(sizes, target))
    if any(s % t for s, t in zip(sizes, target)):
        raise ValueError(
            f"adaptive {kind} pooling from {tuple(sizes)} to {target} has unequal windows; "
            "moment propagation needs input sizes that are multiples of the output size"
        )
    return tuple(s // t for s, t in zip(sizes, target))


def mean_moments(
    mean: Tensor, var: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False
) -> tuple[Tensor, Tensor]:
    """``x.mean(dim)``: the mean of ``n`` independent units has variance ``sum(var) / n^2``."""
    if dim is None:
        out_mean = mean.mean()
        return out_mean, var.mean() / mean.numel()
    out_mean = mean.mean(dim, keepdim=keepdim)
    n = mean.numel() // max(out_mean.numel(), 1)
    return out_mean, var.mean(dim, keepdim=keepdim) / n


def product_moments(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """Exact moments of the product of two independent variables."""
    out_mean = mean1 * mean2
    return out_mean, var1 * var2 + var1 * mean2 * mean2 + var2 * mean1 * mean1


def softmax_log_probs(mean: Tensor, var: Tensor, dim: int = -1, method: SoftmaxMethod = "daunizeau") -> Tensor:
    """Log of the expected softmax of independent Gaussian logits.

    ``method="daunizeau"`` (arXiv 1703.00091): ``softmax_k(x) = 1 / (1 + sum_{l != k} exp(x_l - x_k))``
    is rewritten with the sigmoids ``s(x_k - x_l)``; each is replaced by its
    expectation under ``x_k - x_l ~ N(mu_k - mu_l, v_k + v_l)``, i.e. ``s(z_kl)`` with
    ``z_kl = (mu_k - mu_l) / sqrt(1 + a (v_k + v_l))``, ``a = 3 / pi^2``. That gives
    ``p_k = 1 / sum_l exp(-z_kl)`` (``z_kk = 0``), computed with a log-sum-exp.

    ``method="mean_field"`` (Lu, Ie & Sha 2020, their ``mf0``): ``softmax(mu / sqrt(1 + pi v / 8))``,
    each logit shrunk by its own variance. One softmax instead of ``C^2`` pairs; on
    the digits benchmark its NLL is closer to MC dropout's.

    ``method="logit_samples"``: the average softmax over 256 fixed draws (antithetic
    pairs) of the logits from ``N(mean, var)``: Monte-Carlo over the C logits only,
    after the one analytic pass through the network. Deterministic (the draws are
    a constant), exportable, and as accurate as the logit moments themselves.

    All are normalised to sum to one and are exactly ``log_softmax`` at ``var = 0``.
    """
    if method == "mean_field":
        return torch.log_softmax(mean * torch.rsqrt(1.0 + (math.pi / 8.0) * var), dim=dim)
    if method == "logit_samples":
        return _logit_sample_log_probs(mean, var, dim)
    if method != "daunizeau":
        raise ValueError(f"method must be one of {SOFTMAX_METHODS}, got {method!r}")
    mean = mean.movedim(dim, -1)
    var = var.movedim(dim, -1)
    diff = mean.unsqueeze(-1) - mean.unsqueeze(-2)  # [..., k, l] = mu_k - mu_l
    spread = var.unsqueeze(-1) + var.unsqueeze(-2)
    z = diff * torch.rsqrt(1.0 + _SIGMOID_A * spread)
    log_p = -_logsumexp(-z, dim=-1)
    log_p = log_p - _logsumexp(log_p, dim=-1, keepdim=True)
    return log_p.movedim(-1, dim)


@functools.lru_cache(maxsize=8)
def _logit_draws(num_classes: int, samples: int = LOGIT_SAMPLES) -> np.ndarray:
    # numpy, not torch.randn: under torch.export a torch draw would become a random op in the graph;
    # and the cache holds an array, not a tensor, which would be a fake tensor if made while exporting
    half = np.random.default_rng(0).standard_normal((samples // 2, num_classes)).astype(np.float32)
    draws = np.concatenate([half, -half])  # antithetic: the draws average to exactly zero
    draws.flags.writeable = False
    return draws


def _logit_sample_log_probs(mean: Tensor, var: Tensor, dim: int) -> Tensor:
    mean, var = mean.movedim(dim, -1), var.movedim(dim, -1)
    draws = torch.tensor(_logit_draws(mean.shape[-1]), dtype=mean.dtype, device=mean.device)
    logits = mean.unsqueeze(-2) + var.sqrt().unsqueeze(-2) * draws  # [..., K, C]
    log_p = _logsumexp(torch.log_softmax(logits, dim=-1), dim=-2) - math.log(LOGIT_SAMPLES)
    return log_p.movedim(-1, dim)


def softmax_probs(mean: Tensor, var: Tensor, dim: int = -1, method: SoftmaxMethod = "daunizeau") -> Tensor:
    """Expected class probabilities of Gaussian logits: ``softmax_log_probs(...).exp()``."""
    return softmax_log_probs(mean, var, dim, method).exp()


# ---- round 2: any elementwise nonlinearity, clipped activations, normalisation, upsampling ----------


def elementwise_moments(fn: Callable[[Tensor], Tensor], mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``fn(x)``, ``x ~ N(mean, var)``, for any elementwise ``fn``.

    24-point Gauss-Hermite quadrature: exact at ``var = 0``, accurate to ~1e-4 for
    smooth functions (GELU, SiLU, Softplus, Mish, ELU) and ~1e-3 relative for
    functions with a kink in their slope (Hardswish). A new activation needs no
    hand-written rule.
    """
    return _gaussian_expectation(fn, mean, var)


_CLIP_Z = 12.0  # Phi(-12) ~ 2e-33: moving a clipping bound further out than 12 std changes nothing


def clamp_moments(mean: Tensor, var: Tensor, low: float | None, high: float | None) -> tuple[Tensor, Tensor]:
    """Exact moments of ``clamp(x, low, high)`` (Hardtanh, ReLU6, Hardsigmoid after its affine map).

    With ``u ~ N(0, 1)``, ``a = (low - mean) / std``, ``b = (high - mean) / std``:
    ``clamp(x) = mean + std clamp(u, a, b)`` and
    ``E clamp(u, a, b) = a Phi(a) + b (1 - Phi(b)) + phi(a) - phi(b)``,
    ``E clamp^2 = a^2 Phi(a) + b^2 (1 - Phi(b)) + Phi(b) - Phi(a) + a phi(a) - b phi(b)``.
    The mean is written relative to ``clamp(mean)`` so that bounds many std away
    (clipped to 12 std) lose no precision.
    """
    std = _std(var)
    inf = torch.full_like(mean, _CLIP_Z)
    a = ((low - mean) / std).clamp(-_CLIP_Z, _CLIP_Z) if low is not None else -inf
    b = ((high - mean) / std).clamp(-_CLIP_Z, _CLIP_Z) if high is not None else inf
    pa, pb, fa, fb = _cdf(a), _cdf(b), _pdf(a), _pdf(b)
    e1 = a * pa + b * (1.0 - pb) + fa - fb
    e2 = a * a * pa + b * b * (1.0 - pb) + (pb - pa) + a * fa - b * fb
    centre = torch.clamp(mean, low, high)
    out_mean = centre + std * (e1 - torch.minimum(torch.maximum(torch.zeros_like(a), a), b))
    return out_mean, var * (e2 - e1 * e1).clamp_min(0.0)


def prelu_moments(mean: Tensor, var: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``PReLU``: :func:`leaky_relu_moments` with one learned slope per channel (dim 1), or one for all."""
    slope = weight.reshape([1, -1] + [1] * (mean.dim() - 2)) if weight.numel() > 1 else weight.reshape(())
    return leaky_relu_moments(mean, var, slope)


def alpha_dropout_moments(mean: Tensor, var: Tensor | None, p: float) -> tuple[Tensor, Tensor]:
    """Exact moments of PyTorch's alpha dropout ``y = a m x + a alpha (m - 1 + p)``, ``m ~ Bernoulli(1 - p)``.

    ``alpha = 1.7580993408473766``, ``a = ((alpha^2 p + 1)(1 - p))^(-1/2)`` (ATen's constants):
    ``E y = a q mean``, ``Var y = a^2 q (var + p (mean + alpha)^2)``, ``q = 1 - p``.
    """
    var = _dropout_input(mean, var, p)
    if p == 0.0:
        return mean, var
    alpha, q = 1.7580993408473766, 1.0 - p
    a = 1.0 / math.sqrt((alpha * alpha * p + 1.0) * q)
    shifted = mean + alpha
    return a * q * mean, a * a * q * (var + p * shifted * shifted)


def normalized_moments(mean: Tensor, var: Tensor, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """``(x - avg(x)) / sqrt(S + eps)``, ``S = avg((x - avg x)^2)`` over ``dims`` (LayerNorm, GroupNorm).

    Delta method around the means: ``c = mean - avg(mean)``, ``s = E S + eps`` with
    ``E S = avg(c^2) + avg(var) (1 - 1/d)``. The output mean is ``c / sqrt(s)``; a unit's
    output depends on input ``j`` through ``a_ij = [i = j] - 1/d - c_i c_j / (d s)`` (the centring
    and the normaliser's own fluctuation), so with independent inputs
    ``var_i' = (1/s) [var_i (1 - 2/d - 2 c_i^2 / (d s)) + avg(var)/d + 2 c_i avg(var c) / (d s)
    + c_i^2 avg(var c^2) / (d s^2)]``. Dropping the normaliser's fluctuation under-estimates
    units far from the centre several-fold.
    """
    dims = tuple(dims)
    d = math.prod(mean.shape[i] for i in dims)
    c = mean - mean.mean(dims, keepdim=True)
    avg_var = var.mean(dims, keepdim=True)
    s = (c * c).mean(dims, keepdim=True) + avg_var * (1.0 - 1.0 / d) + eps
    vc = (var * c).mean(dims, keepdim=True)
    vcc = (var * c * c).mean(dims, keepdim=True)
    inner = var * (1.0 - 2.0 / d - 2.0 * c * c / (d * s)) + avg_var / d + 2.0 * c * vc / (d * s) + c * c * vcc / (d * s * s)
    return c * torch.rsqrt(s), inner.clamp_min(0.0) / s


def layer_norm_moments(
    mean: Tensor, var: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``F.layer_norm`` over the last ``len(normalized_shape)`` dims (see :func:`normalized_moments`)."""
    dims = tuple(range(-len(normalized_shape), 0))
    out_mean, out_var = normalized_moments(mean, var, dims, eps)
    if weight is not None:
        out_mean, out_var = out_mean * weight, out_var * (weight * weight)
    if bias is not None:
        out_mean = out_mean + bias
    return out_mean, out_var


def group_norm_moments(
    mean: Tensor, var: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``F.group_norm``: channels (dim 1) in ``num_groups`` groups (see :func:`normalized_moments`)."""
    n, c = mean.shape[:2]
    grouped = (n, num_groups, c // num_groups, *mean.shape[2:])
    dims = tuple(range(2, len(grouped)))
    out_mean, out_var = normalized_moments(mean.reshape(grouped), var.reshape(grouped), dims, eps)
    out_mean, out_var = out_mean.reshape(mean.shape), out_var.reshape(mean.shape)
    shape = [1, -1] + [1] * (mean.dim() - 2)
    if weight is not None:
        w = weight.reshape(shape)
        out_mean, out_var = out_mean * w, out_var * (w * w)
    if bias is not None:
        out_mean = out_mean + bias.reshape(shape)
    return out_mean, out_var


_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def conv_transpose_moments(
    mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
    output_padding: Any = 0, groups: int = 1, dilation: Any = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``F.conv_transpose1d/2d/3d`` with fixed weights: linear in the input, so ``var' = op(var, W * W)``."""
    op = _CONV_TRANSPOSE[weight.dim()]
    out_mean = op(mean, weight, bias, stride, padding, output_padding, groups, dilation)
    return out_mean, op(var, weight * weight, None, stride, padding, output_padding, groups, dilation)


def max_reduce_moments(mean: Tensor, var: Tensor, dim: int, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """``x.amax(dim)`` as a chain of pairwise Clark maxima along ``dim`` (independent units)."""
    means, variances = mean.unbind(dim), var.unbind(dim)
    out_mean, out_var = means[0], variances[0]
    for m, v in zip(means[1:], variances[1:]):
        out_mean, out_var = max_moments(out_mean, out_var, m, v)
    if keepdim:
        out_mean, out_var = out_mean.unsqueeze(dim), out_var.unsqueeze(dim)
    return out_mean, out_var


ACTIVATIONS: dict[str, Callable[..., Tensor]] = {
    "gelu": F.gelu, "silu": F.silu, "mish": F.mish, "softplus": F.softplus, "elu": F.elu, "celu": F.celu,
    "selu": F.selu, "hardswish": F.hardswish, "softsign": F.softsign, "logsigmoid": F.logsigmoid,
    "tanhshrink": F.tanhshrink,
}  # fmt: skip


def activation_moments(mean: Tensor, var: Tensor, name: str, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """:func:`elementwise_moments` of the activation ``ACTIVATIONS[name](x, *args, **kwargs)``.

    By name, so that a generated graph carries a string, not a function object.
    """
    fn = ACTIVATIONS[name]
    return _gaussian_expectation(lambda x: fn(x, *args, **kwargs), mean, var)


def adaptive_max_pool_moments(mean: Tensor, var: Tensor, output_size: Any, dims: int = 2) -> tuple[Tensor, Tensor]:
    """Adaptive max pooling where each output takes the max of an equal, non-overlapping block."""
    kernel = _equal_windows(mean, output_size, dims, "max")
    return max_pool_moments(mean, var, kernel, kernel, dims=dims)


BLOCK_SAMPLES = 64  # draws of a sampled block's inputs (antithetic pairs)


@functools.lru_cache(maxsize=32)
def _block_draws(shape: tuple[int, ...], index: int) -> np.ndarray:
    # fixed numpy draws (see _logit_draws): the graph stays deterministic and exportable
    half = np.random.default_rng(1000 + index).standard_normal((BLOCK_SAMPLES // 2, *shape)).astype(np.float32)
    draws = np.concatenate([half, -half])
    draws.flags.writeable = False
    return draws


def sampled_attention_moments(
    attention: torch.nn.MultiheadAttention,
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    layout: Sequence[int],
    need_weights: bool,
    options: dict[str, Any],
) -> tuple[Tensor, ...]:
    """Moments of a ``MultiheadAttention`` output by sampling its Gaussian inputs (``BLOCK_SAMPLES`` fixed draws).

    ``means``/``variances`` are the distinct inputs, ``layout`` says which one is the
    query, key and value (self-attention draws one input once). The samples run as
    one batch. Attention dropout is active, as in MC dropout; with ``dropout = 0``
    the result is a deterministic function of the input moments.
    Returns ``(mean, var)`` of the output, plus those of the weights when ``need_weights``.
    """
    batch_dim = 0 if attention.batch_first else 1
    samples = []
    for i, (mean, var) in enumerate(zip(means, variances)):
        eps = torch.tensor(_block_draws(tuple(mean.shape), i), dtype=mean.dtype, device=mean.device)
        draws = mean + var.sqrt() * eps  # [S, *shape]
        samples.append(draws.movedim(batch_dim + 1, 1).flatten(0, 1).movedim(0, batch_dim))  # S x batch
    q, k, v = (samples[i] for i in layout)
    masks = {}
    if options.get("key_padding_mask") is not None:  # [N, S]: one row per sample of the repeated batch
        masks["key_padding_mask"] = options["key_padding_mask"].repeat(BLOCK_SAMPLES, 1)
    if options.get("attn_mask") is not None:  # [L, S] is shared; [N * heads, L, S] follows the batch
        mask = options["attn_mask"]
        masks["attn_mask"] = mask.repeat(BLOCK_SAMPLES, 1, 1) if mask.dim() == 3 else mask
    rest = {key: value for key, value in options.items() if not key.endswith("mask")}
    mode = attention.training
    attention.train(attention.dropout > 0)
    try:
        out, weights = attention(q, k, v, need_weights=need_weights, **masks, **rest)
    finally:
        attention.train(mode)
    batch = means[layout[0]].shape[batch_dim]

    def moments(y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        y = y.movedim(dim, 0).unflatten(0, (BLOCK_SAMPLES, batch))
        m = y.mean(0)
        return m.movedim(0, dim), ((y - m) ** 2).mean(0).movedim(0, dim)

    result = moments(out, batch_dim)
    return (*result, *moments(weights, 0)) if need_weights else result


def logit_uncertainty(mean: Tensor, var: Tensor, dim: int = -1, factor: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Predictive entropy, expected entropy and mutual information of Gaussian logits ``N(mean, var)``.

    Over ``UNCERTAINTY_SAMPLES`` fixed antithetic draws (as :func:`softmax_log_probs`'s
    ``"logit_samples"``; sampling only the C logits, after the one analytic pass):
    ``H[E p]`` (total), ``E H[p]`` (aleatoric) and their difference, the mutual
    information between the prediction and the network's randomness (epistemic; the
    score MC dropout users rank OOD inputs by). Each has the shape of ``mean`` without ``dim``.

    ``factor`` (``[N, K, C]``, for ``[N, C]`` logits) are noise sources the logits share
    (``covariance="low_rank"``): the draws are ``mean + factor^T e + sqrt(var - sum factor^2) e'``,
    so that the classes' correlation is kept. Logits that move together change the
    softmax less than independent ones: without it the mutual information is overstated.
    """
    mean, var = mean.movedim(dim, -1), var.movedim(dim, -1)
    classes, shared = mean.shape[-1], (0 if factor is None else factor.shape[1])
    draws = torch.tensor(_logit_draws(classes + shared, UNCERTAINTY_SAMPLES), dtype=mean.dtype, device=mean.device)
    flat_mean, flat_var = mean.reshape(-1, classes), var.reshape(-1, classes)
    # inputs in chunks: the draws' logits are [chunk, S, C], at most 2^24 values however many classes
    step = max(1, 2**24 // (UNCERTAINTY_SAMPLES * classes))
    parts = [flat_mean.new_zeros(2, 0)]  # (an empty batch has no scores)
    for start in range(0, flat_mean.shape[0], step):
        m, v = flat_mean[start : start + step], flat_var[start : start + step]
        if factor is None or shared == 0:
            logits = m.unsqueeze(-2) + v.sqrt().unsqueeze(-2) * draws
        else:
            f = factor[start : start + step]
            rest = (v - (f * f).sum(1)).clamp_min(0.0)
            shared_part = torch.einsum("sk,nkc->nsc", draws[:, classes:], f)
            logits = m.unsqueeze(-2) + rest.sqrt().unsqueeze(-2) * draws[:, :classes] + shared_part
        log_p = torch.log_softmax(logits, dim=-1)  # [chunk, S, C]
        expected = -(log_p.exp() * log_p).sum(-1).mean(-1)
        log_mean = _logsumexp(log_p, dim=-2) - math.log(UNCERTAINTY_SAMPLES)
        parts.append(torch.stack([-(log_mean.exp() * log_mean).sum(-1), expected]))
    total, expected = torch.cat(parts, dim=1).reshape(2, *mean.shape[:-1]).unbind(0)
    return total, expected, (total - expected).clamp_min(0.0)
