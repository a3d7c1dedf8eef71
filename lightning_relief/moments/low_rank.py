"""Tensor functions of the shared noise sources (``covariance="low_rank"``), swept back from the logits.

Some noise sources are shared by many units: the mask of a dropout unit reaches every unit
the next layers compute from it, the one weight draw of a Gaussian-weight convolution is
shared by all positions of an output channel. Units that share sources are correlated, and a
layer that sums them (the classifier) has more variance than the per-unit rules give.

To first order the logits ``y`` depend on the sources ``eps`` through the Jacobian of the
mean propagation: linear and convolution layers map exactly, an elementwise function scales
by its expected slope (exact for jointly Gaussian inputs, Stein's lemma: it is the derivative
of the output mean by the input mean), a max pool mixes a window by the probability of each
unit being its maximum (the derivative of Clark's mean). The logits' factor ``M`` (``[N, K,
C]``, ``Cov(y) = M^T M`` from these sources) is the product of those maps with the sources'
scales. It is computed *backwards* from the ``C`` logits (an adjoint sweep: ``G = I``, then
``G <- G J_layer`` layer by layer): the cost is ``C`` times the transposed layers, however
many sources there are (a Gaussian convolution has ``C_out * C_in * k`` of them), instead of
the sources' count times the forward layers.

Each layer records a :data:`Step` while the graph is built forward; at the output the steps
are swept in reverse. The per-unit variance that the diagonal rules propagate from the sources
is tracked alongside (``share``: the same maps applied to variances, units independent); the
logits' variance is corrected once, at the end: ``var - share + sum_k M_k^2``. Intermediate
variances stay the per-unit ones (what a ReLU or max pool in between sees).

Sources:

- ``"diag"``: one source per unit with std ``[N, *shape]`` (the masks of ``Dropout``/``F.dropout``,
  which also scale the noise already there, on an activation of any shape);
- ``"channels"``: a Gaussian-weight convolution's weights, ``R = C_in * prod(kernel) (+ 1)``
  per output channel ``c``, shared by all positions: noise ``sum_r sd[r, c] patch_r(mean)``,
  kept as ``(patches [N, R, *spatial], sd [R, C])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_relief.moments.functional import _tuple, _window_cov, _window_slices

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CONV_T = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}
_AVG_POOL = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}


def _to_size(x: Tensor, like: Tensor) -> Tensor:
    """``x`` zero-padded at the end of its trailing dims to ``like``'s (a transposed strided op can fall short)."""
    dims = like.dim() - 2
    missing = [like.shape[-1 - i] - x.shape[-1 - i] for i in range(dims)]
    return F.pad(x, [v for m in missing for v in (0, m)]) if any(missing) else x


# ---- the forward bookkeeping: the sources' per-unit share of the variance ------------------------


def conv_share(share: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int] | int, dilation: Sequence[int], groups: int) -> Tensor:  # fmt: skip
    """The sources' per-unit variance after a convolution with (mean) weight ``W``, units independent."""
    return _CONV[share.dim()](share, weight * weight, None, stride, padding, dilation, groups)


def scale_share(share: Tensor, scale: Tensor) -> Tensor:
    """The sources' per-unit variance after an elementwise map with slope ``scale``."""
    return share * scale * scale


def pool_share(
    share: Tensor, wins: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    var: Tensor | None = None, covariances: dict[tuple[int, ...], Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """The sources' per-unit variance after a max pool whose output is ``sum_i wins_i x_i`` to first order.

    With ``covariances`` (the neighbour covariance the correlated max rule used, of units with
    variance ``var``) the sources' part of two units is taken to be as correlated as the whole:
    the rule counted that much of the sources' covariance already.
    """
    dims = wins.dim() - 3
    slices = _window_slices(share, dims, kernel, stride, dilation)
    out = sum(wins[:, i] * wins[:, i] * s for i, s in enumerate(slices))
    if covariances and var is not None:
        cov = _window_cov(covariances, dims, kernel, stride, dilation)
        # sqrt(share / var) per unit: the sources' fraction of its std
        fraction = [(s / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(0.0, 1.0).sqrt()
                    for s, v in zip(slices, _window_slices(var, dims, kernel, stride, dilation))]  # fmt: skip
        for a in range(len(slices)):
            for b in range(a + 1, len(slices)):
                out = out + 2.0 * wins[:, a] * wins[:, b] * cov(a, b) * fraction[a] * fraction[b]
    return out  # type: ignore[return-value]


def dropout_std(out_var: Tensor, var: Tensor | None) -> Tensor:
    """The std of a dropout layer's own, per-unit noise (its output variance less its input's)."""
    return (out_var - var).clamp_min(0.0).sqrt() if var is not None else out_var.sqrt()


def gaussian_conv_sources(
    mean: Tensor, weight_var: Tensor, bias_var: Tensor | None, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A Gaussian-weight convolution's own sources: ``(patches [N, R, *S], sd [R, C_out], share [N, C_out, *S])``.

    Output channel ``c`` at every position draws the same ``R = C_in * prod(kernel) (+ 1)``
    weights (and bias): its noise is ``sum_r sd[r, c] patch_r(mean)``. The input's own
    variance enters the per-unit rule only (a second-order term here). ``share`` is that
    noise's per-unit variance.
    """
    dims = mean.dim() - 2
    if any(padding):
        mean = F.pad(mean, [p for p in reversed(padding) for _ in range(2)])
    # strided slices rather than unfold/im2col, which TVM's frontend lacks
    patches = torch.stack(_window_slices(mean, dims, weight_var.shape[2:], stride, dilation), dim=2).flatten(1, 2)
    var = weight_var.reshape(weight_var.shape[0], -1)
    if bias_var is not None:  # the bias as one more tap that always reads 1
        patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
        var = torch.cat([var, bias_var.unsqueeze(1)], dim=1)
    share = torch.einsum("nr...,cr->nc...", patches * patches, var)
    return patches, var.sqrt().t(), share


# ---- the adjoint sweep: G [N, C, *shape], the logits' sensitivity to each unit ---------------------


def sweep_start(mean: Tensor) -> Tensor:
    """``G = I``: each logit's sensitivity to the logits, ``[N, C, C]``.

    Logits that are not ``[N, C]`` (per token) get no classes to sweep (``[N, 0, *shape]``): no
    correction and no factor.
    """
    if mean.dim() != 2:
        return mean.new_zeros(mean.shape[0], 0, *mean.shape[1:])
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    return eye.expand(mean.shape[0], -1, -1)


def linear_start(mean: Tensor, weight: Tensor) -> Tensor:
    """``G W`` for ``G = I``, the sweep's first step when the network ends in a linear layer: the weight's rows
    for every input, expanded (no product, no copy); ``[N, 0, ...]`` for logits that are not ``[N, C]``."""
    if mean.dim() != 2:
        return mean.new_zeros(mean.shape[0], 0, *mean.shape[1:-1], weight.shape[1])
    return weight.unsqueeze(0).expand(mean.shape[0], -1, -1)


def linear_back(g: Tensor, weight: Tensor) -> Tensor:
    """Through ``x W^T``: ``G W``."""
    return torch.matmul(g, weight)


def conv_back(
    g: Tensor, weight: Tensor, like: Tensor, stride: Sequence[int] | int, padding: Sequence[int] | int,
    dilation: Sequence[int] | int, groups: int,
) -> Tensor:  # fmt: skip
    """Through a convolution (zero padding): the transposed convolution, to the input's size (``like``)."""
    n, c = g.shape[:2]
    flat, dims = g.flatten(0, 1), weight.dim() - 2
    stride, pad, dilation = _tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims)
    if all(s == 1 for s in stride) and all(d * (k - 1) >= p for d, k, p in zip(dilation, weight.shape[2:], pad)):
        # at stride 1 a convolution with the flipped, transposed kernel: CPU backends run it far faster
        out_c, in_c = weight.shape[:2]
        per_group = weight.reshape(groups, out_c // groups, in_c, *weight.shape[2:]).transpose(1, 2)
        kernel = per_group.reshape(groups * in_c, out_c // groups, *weight.shape[2:]).flip(list(range(2, dims + 2)))
        full = [d * (k - 1) - p for d, k, p in zip(dilation, weight.shape[2:], pad)]
        back = _CONV[weight.dim()](flat, kernel, None, 1, full, dilation, groups)
    else:  # the input units past the last window get no sensitivity: output padding up to the input's size
        sizes = zip(g.shape[3:], like.shape[2:], stride, pad, dilation, weight.shape[2:])
        extra = [size - ((out - 1) * st - 2 * p + d * (k - 1) + 1) for out, size, st, p, d, k in sizes]
        back = _CONV_T[weight.dim()](flat, weight, None, stride, pad, extra, groups, dilation)
    return _to_size(back, like).reshape(n, c, *like.shape[1:])


def scale_back(g: Tensor, scale: Tensor) -> Tensor:
    """Through an elementwise map with slope ``scale``."""
    return g * scale.unsqueeze(1)


def flatten_back(g: Tensor, like: Tensor) -> Tensor:
    """Through a flatten of ``like``."""
    return g.reshape(g.shape[0], g.shape[1], *like.shape[1:])


def pool_back(g: Tensor, wins: Tensor, like: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:  # fmt: skip
    """Through a max pool (no padding) whose output is ``sum_i wins_i x_i`` (``wins`` ``[N, k, C, *out]``).

    Each window element's share is put back where it came from: by interleaving when the windows
    tile the input, otherwise by a transposed convolution with a one-hot kernel per element (the
    window's ``k`` elements as its input channels).
    """
    n, c = g.shape[:2]
    k, channels, out = wins.shape[1], wins.shape[2], wins.shape[3:]
    dims = len(out)
    mixed = wins.unsqueeze(1) * g.unsqueeze(2)  # [N, C, k, C_in, *out]
    if tuple(stride) == tuple(kernel) and all(d == 1 for d in dilation):
        tiles = mixed.reshape(n, c, *kernel, channels, *out).movedim(list(range(2, 2 + dims)), [4 + 2 * i for i in range(dims)])
        back = tiles.reshape(n * c, channels, *(o * kk for o, kk in zip(out, kernel)))  # [.., C_in, T0, k0, T1, k1]
    else:
        onehot = torch.eye(k, dtype=g.dtype, device=g.device).reshape(k, 1, *kernel)
        flat = mixed.transpose(2, 3).reshape(n * c * channels, k, *out)
        back = _CONV_T[dims + 2](flat, onehot, None, stride, 0, 0, 1, dilation)
        back = back.reshape(n * c, channels, *back.shape[2:])
    return _to_size(back, like).reshape(n, c, *like.shape[1:])


def conv_transpose_back(
    g: Tensor, weight: Tensor, stride: Sequence[int] | int, padding: Sequence[int] | int, dilation: Sequence[int] | int,
    groups: int,
) -> Tensor:  # fmt: skip
    """Through a transposed convolution: the convolution with the same kernel."""
    n, c = g.shape[:2]
    back = _CONV[weight.dim()](g.flatten(0, 1), weight, None, stride, padding, dilation, groups)
    return back.reshape(n, c, *back.shape[1:])


def batch_norm_scale(running_var: Tensor, weight: Tensor | None, eps: float, like: Tensor) -> Tensor:
    """Eval-mode batch norm's per-channel slope, shaped to broadcast over ``like``."""
    scale = torch.rsqrt(running_var + eps)
    scale = scale * weight if weight is not None else scale
    return scale.reshape([1, -1] + [1] * (like.dim() - 2))


def _blocks(small: Tensor, large: Tensor) -> list[int]:
    dims = small.dim() - 2
    return [large.shape[-dims + i] // small.shape[-dims + i] for i in range(dims)]


def copies_back(g: Tensor, like: Tensor) -> Tensor:
    """Through nearest upsampling of ``like`` by integer factors: each unit's copies' sensitivities summed."""
    n, c = g.shape[:2]
    flat = g.flatten(0, 1)
    block = _blocks(like, flat)
    summed = _AVG_POOL[like.dim()](flat, block) * math.prod(block)
    return summed.reshape(n, c, *like.shape[1:])


def average_back(g: Tensor, like: Tensor) -> Tensor:
    """Through average pooling of ``like`` over equal, non-overlapping blocks: each unit gets its block's share."""
    n, c = g.shape[:2]
    flat = g.flatten(0, 1)
    block = _blocks(flat, like)
    spread = F.interpolate(flat, size=like.shape[2:], mode="nearest") / math.prod(block)
    return spread.reshape(n, c, *like.shape[1:])


def copies_share(share: Tensor, out: Tensor) -> Tensor:
    """The sources' per-unit variance after nearest upsampling to ``out``'s size (copied)."""
    return F.interpolate(share, size=out.shape[2:], mode="nearest")


def average_share(share: Tensor, out: Tensor) -> Tensor:
    """The sources' per-unit variance after average pooling to ``out``'s size, units independent."""
    block = _blocks(out, share)
    return _AVG_POOL[share.dim()](share, block) / math.prod(block)


def diag_sources(g: Tensor, std: Tensor) -> Tensor:
    """The logits' factor ``[N, C, K]`` (transposed) of one source per unit with std ``std``."""
    return (g * std.unsqueeze(1)).flatten(2)


def channel_sources(g: Tensor, patches: Tensor, sd: Tensor) -> Tensor:
    """The logits' factor ``[N, C, C_out * R]`` (transposed) of a Gaussian convolution's weights: ``sd[r, c] sum_s P[r, s] G[c, s]``."""
    n, classes, channels = g.shape[:3]
    r, positions = patches.shape[1], patches[0, 0].numel()
    out = torch.bmm(g.reshape(n, classes * channels, positions), patches.reshape(n, r, positions).transpose(1, 2))
    return (out.reshape(n, classes, channels, r) * sd.t()).reshape(n, classes, channels * r)


def factor_variance(factor: Tensor) -> Tensor:
    """``sum_k M_k^2`` of a factor ``[N, C, K]``: the variance its sources give each logit (a norm: one pass, no
    squared copy of the factor)."""
    return torch.linalg.vector_norm(factor, dim=2).square()


def corrected_var(mean: Tensor, var: Tensor, share: Tensor, terms: Sequence[Tensor]) -> Tensor:
    """The logits' variance with the sources' covariance: ``var - share + sum_k M_k^2`` (``terms``: each source
    kind's ``sum_k M_k^2`` ``[N, C]``)."""
    if mean.dim() != 2 or not terms:
        return var
    return (var - share).clamp_min(0.0) + sum(terms)


def logit_factor(mean: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """The logits' factor ``[N, K, C]`` (``Cov = M^T M`` from the shared sources; ``K = 0`` without any)."""
    if mean.dim() != 2 or not factors:
        return no_sources(mean)
    m = torch.cat(list(factors), dim=2)
    if m.shape[2] <= m.shape[1]:
        return m.transpose(1, 2)
    # more sources than classes: the same covariance from C of them, its Cholesky factor (which, unlike
    # eigenvectors, changes smoothly from input to input, so the fixed logit draws stay comparable)
    cov = m @ m.transpose(1, 2)
    jitter = 1e-6 * cov.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.linalg.cholesky(cov + jitter[:, None, None] * eye).transpose(1, 2)


def no_sources(mean: Tensor) -> Tensor:
    """The empty factor ``[N, 0, C]``."""
    return mean.new_zeros(mean.shape[0], 0, mean.shape[-1])


__all__ = [
    "average_back", "average_share", "batch_norm_scale", "channel_sources", "conv_back", "conv_transpose_back", "copies_back", "copies_share", "conv_share", "corrected_var", "diag_sources",
    "dropout_std", "factor_variance", "flatten_back", "gaussian_conv_sources", "linear_back", "linear_start", "logit_factor", "no_sources", "pool_back", "pool_share", "scale_back",
    "scale_share",
    "sweep_start",
]  # fmt: skip
