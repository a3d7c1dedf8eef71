"""Tensor functions of the low-rank noise factors (``covariance="low_rank"``).

A factor ``L`` of shape ``[N, K, *shape]`` says that an activation ``x`` of shape
``[N, *shape]`` contains the noise ``sum_k L[:, k] eps_k`` from ``K`` independent unit
sources ``eps_k``, on top of the per-unit variance that the diagonal rules track. The
per-unit variance stays exact; the factor carries the covariance *between* units that
those sources induce, propagated to first order (a linear layer maps it exactly, an
elementwise function scales it by its expected slope, which is exact for the
cross-covariance of jointly Gaussian inputs by Stein's lemma). A later linear layer that
sums correlated units adds ``sum_k (W L_k)^2 - (W * W) sum_k L_k^2`` to the variance the
per-unit rule gives.

Three kinds of sources (``FactorKind``):

- ``"units"``: ``K`` sources shared by all units (``[N, K, *shape]``);
- ``"diag"``: one source per unit, e.g. the masks of a dropout layer; stored as the
  sources' std ``[N, *shape]``;
- ``"mapped"``: such sources after a linear layer ``W`` and elementwise slopes ``s``, kept as
  ``(std, W, s)`` (the factor ``diag(std) W^T diag(s)``, ``[N, D, D']``, is never formed: the
  next linear layer ``V`` evaluates ``diag(std) (W^T (s V^T))`` right to left, which costs
  ``D D' D''`` per input, with ``D''`` the next layer's, often small, width);
- ``"channels"``: ``R`` sources per channel (``[N, R, C, *spatial]``, source ``(r, c)`` only
  in channel ``c``), e.g. the weights of one output channel of a Gaussian-weight
  convolution, which one draw shares across all positions; once flattened, each
  channel is a block of the flat dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_relief.moments.functional import _window_slices

FactorKind = Literal["units", "diag", "mapped", "channels"]
MAX_RANK = 4096  # a factor with more sources costs more than the covariance it carries is worth
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _sum_sq(factor: Any, kind: FactorKind) -> Tensor:
    """The per-unit variance the factor explains, ``[N, *shape]``."""
    if kind == "diag":
        return factor * factor
    if kind == "mapped":
        std, weight, slope = factor
        out = F.linear(std * std, weight * weight)
        return out if slope is None else out * slope * slope
    return (factor * factor).sum(1)


def linear_factor(
    factor: Any, kind: FactorKind, blocks: int, weight: Tensor, out_var: Tensor
) -> tuple[Any, Tensor]:
    """A linear layer ``x W^T`` with (mean) weight ``W``: the factor of its output and its variance.

    ``out_var`` is the per-unit rule's variance (units independent); the factor's
    off-diagonal covariance is added to it. ``blocks`` is the channel count of a
    ``"channels"`` factor (flattened). A ``"diag"`` factor becomes ``"mapped"``, any other ``"units"``.
    """
    if kind == "diag":  # independent sources: nothing to add yet
        return (factor, weight, None), out_var
    if kind == "mapped" and factor[0].dim() != 2:
        # sources per unit of a [N, T, D] activation (tokens) are sources per token as well, which the
        # [N, K, *shape] layout cannot say: no covariance from them (a zero source keeps the layout)
        return out_var.new_zeros(out_var.shape[0], 1, *out_var.shape[1:]), out_var
    if kind == "channels":
        n, r, d = factor.shape
        per_channel = factor.reshape(n, r, blocks, d // blocks)
        out = torch.einsum("nrcs,jcs->nrcj", per_channel, weight.reshape(weight.shape[0], blocks, d // blocks))
        out = out.reshape(n, r * blocks, weight.shape[0])
    elif kind == "mapped":
        out = _evaluate(factor, weight.t())
    else:
        out = torch.matmul(factor, weight.t())
    extra = (out * out).sum(1) - F.linear(_sum_sq(factor, kind), weight * weight)
    return out, (out_var + extra).clamp_min(0.0)


def _evaluate(factor: tuple[Tensor, Tensor, Tensor | None], right: Tensor) -> Tensor:
    """``diag(std) W^T diag(s) right`` of a ``"mapped"`` factor, ``[N, D, J]`` (``right``: ``[D', J]`` or ``[N, D', J]``)."""
    std, weight, slope = factor
    if slope is not None:
        right = slope.unsqueeze(-1) * right  # [N, D', J]
    if right.dim() == 2:
        return std.unsqueeze(-1) * (weight.t() @ right)
    n, d_mid, j = right.shape
    # one matrix product for the whole batch: [D, D'] @ [D', N * J]
    out = (weight.t() @ right.permute(1, 0, 2).reshape(d_mid, n * j)).reshape(-1, n, j).permute(1, 0, 2)
    return std.unsqueeze(-1) * out


def materialize(factor: Any, kind: FactorKind) -> Tensor:
    """A ``"mapped"`` factor as ``[N, K, D']`` (others unchanged)."""
    if kind != "mapped":
        return factor
    if factor[0].dim() != 2:  # per-token sources (see linear_factor): none
        return factor[0].new_zeros(factor[0].shape[0], 1, *factor[0].shape[1:-1], factor[1].shape[0])
    return _evaluate(factor, torch.eye(factor[1].shape[0], dtype=factor[0].dtype, device=factor[0].device))


def conv_factor(
    factor: Tensor, kind: FactorKind, weight: Tensor, out_var: Tensor, stride: Sequence[int], padding: Sequence[int] | int,
    dilation: Sequence[int], groups: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A convolution with (mean) weight ``W`` (zero padding): the ``"units"`` factor of its output and its variance.

    A ``"channels"`` factor (``groups=1``) becomes ``R * C`` shared sources: each
    channel's sources convolved with that input channel's slice of the kernel (a grouped
    convolution).
    """
    conv = _CONV[factor.dim() - 1]
    n, k = factor.shape[:2]
    if kind == "channels":
        c = factor.shape[2]
        kernel = weight.transpose(0, 1).reshape(c * weight.shape[0], 1, *weight.shape[2:])
        out = conv(factor.reshape(n * k, *factor.shape[2:]), kernel, None, stride, padding, dilation, c)
        out = out.reshape(n, k * c, weight.shape[0], *out.shape[2:])
    else:
        out = conv(factor.reshape(n * k, *factor.shape[2:]), weight, None, stride, padding, dilation, groups)
        out = out.reshape(n, k, *out.shape[1:])
    before = conv(_sum_sq(factor, kind), weight * weight, None, stride, padding, dilation, groups)
    return out, (out_var + (out * out).sum(1) - before).clamp_min(0.0)


def _patches(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``[N, C_in * prod(kernel), *out_spatial]``: the input under each kernel tap, in the weight's order."""
    dims = x.dim() - 2
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    # strided slices rather than unfold/im2col, which TVM's frontend lacks
    taps = _window_slices(x, dims, kernel, stride, dilation)
    return torch.stack(taps, dim=2).flatten(1, 2)


def gaussian_conv_factor(
    mean: Tensor, weight_var: Tensor, bias_var: Tensor | None, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:  # fmt: skip
    """The ``"channels"`` factor of a Gaussian-weight convolution's own weight noise ``[N, R, C_out, *spatial]``.

    Output channel ``c`` at every position draws the same ``R = C_in * prod(kernel) (+ 1)``
    weights (and bias): its noise is ``sum_r sd_W[c, r] patch_r(mean)``. The input's
    own variance enters the per-unit rule only (a second-order term here).
    """
    patches = _patches(mean, weight_var.shape[2:], stride, padding, dilation)  # [N, R, *S]
    sd = weight_var.reshape(weight_var.shape[0], -1)
    if bias_var is not None:  # the bias as one more tap that always reads 1
        patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
        sd = torch.cat([sd, bias_var.unsqueeze(1)], dim=1)
    sd = sd.sqrt().t()  # [R, C_out]
    return patches.unsqueeze(2) * sd.reshape(*sd.shape, *(1,) * (patches.dim() - 2))


def rectified_slope(mean: Tensor, var: Tensor, negative_slope: float = 0.0) -> Tensor:
    """``E f'(x)`` of a (leaky) ReLU for ``x ~ N(mean, var)``: what a factor is scaled by."""
    std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    p = 0.5 * (1.0 + torch.erf(mean / std * math.sqrt(0.5)))
    p = torch.where(var > 0, p, (mean > 0).to(mean.dtype))
    return negative_slope + (1.0 - negative_slope) * p


def scale_factor(factor: Any, kind: FactorKind, scale: Tensor) -> Any:
    """An elementwise map with slope ``scale`` (``[N, *shape]``) applied to a factor."""
    if kind == "mapped":
        std, weight, slope = factor
        return std, weight, scale if slope is None else slope * scale
    return factor * scale if kind == "diag" else factor * scale.unsqueeze(1)


def dropout_std(out_var: Tensor, var: Tensor | None) -> Tensor:
    """The std of a dropout layer's own, per-unit noise (its output variance less its input's)."""
    return (out_var - var).clamp_min(0.0).sqrt() if var is not None else out_var.sqrt()


def logit_factor(mean: Tensor, factors: Sequence[Any], kinds: Sequence[FactorKind]) -> Tensor:
    """The logits' shared sources ``[N, K, C]`` (``K = 0`` without any, and for logits that are not ``[N, C]``)."""
    if not factors or mean.dim() != 2:
        return mean.new_zeros(mean.shape[0], 0, mean.shape[-1])
    return torch.cat([materialize(f, k) for f, k in zip(factors, kinds)], dim=1)


__all__ = [
    "MAX_RANK", "FactorKind", "conv_factor", "dropout_std", "gaussian_conv_factor", "linear_factor", "logit_factor", "materialize",
    "rectified_slope", "scale_factor",
]  # fmt: skip
