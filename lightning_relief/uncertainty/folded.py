"""Run ``M`` stacked ensemble members as ONE plain forward, the members folded into the batch.

``torch.func.vmap`` runs every operator of a forward through its batching
rules: on small models that per-operator cost, not arithmetic, sets the time
of a vectorized training step. Most layers need no help: ReLU, dropout,
pooling, flatten and ``x.view(x.size(0), -1)`` treat every example alike, so a
batch ``[M*N, ...]`` that holds member ``m``'s examples in rows
``m*N .. m*N+N-1`` can pass through them unchanged. Only the layers that hold
(stacked ``[M, ...]``) parameters must know which rows are whose:

- ``nn.Linear``: one ``baddbmm`` over ``[M, N, in]``;
- ``nn.Conv1d``/``nn.Conv2d``: one grouped convolution on CUDA; on the CPU,
  where grouped convolutions of a few channels are slower than separate ones,
  one convolution per member on its rows;
- ``nn.BatchNorm1d``/``nn.BatchNorm2d``: per member, on its rows (training
  statistics per member, as in vmap; the running statistics updated in place).

:func:`foldable` says whether every module that holds tensors is one of those
layers. The rest of the model (its containers' ``forward`` code, parameter-free
modules) is assumed to treat examples alone: :class:`~lightning_relief.uncertainty.stacking.MemberForward`
compares one folded forward with vmap (in eval mode) before it relies on
folding, and keeps vmap when they differ. A parameter-free operation that mixes
examples only in training mode goes unnoticed by that check.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_relief.uncertainty.stacking import stack_states
    >>> members = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> stack_states(model, [dict(m.named_parameters()) for m in members])
    >>> x = torch.randn(5, 4)
    >>> out = folded_forward(model, torch.cat([x, x]), 2)
    >>> torch.allclose(out[5:], members[1](x), atol=1e-6), foldable(model)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["foldable", "folded_forward"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, *_BATCH_NORMS)


def foldable(module: nn.Module) -> bool:
    """Every module of ``module`` that holds parameters or buffers of its own is a layer
    :func:`folded_forward` handles (exactly that class, zero padding, tracked running statistics)."""
    for sub in module.modules():
        if isinstance(sub, _LAYERS) and type(sub) in _LAYERS:  # a subclass may have its own forward
            if isinstance(sub, (nn.Conv1d, nn.Conv2d)) and sub.padding_mode != "zeros":
                return False
            if isinstance(sub, _BATCH_NORMS) and (not sub.track_running_stats or sub.momentum is None):
                return False
        elif any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False)):
            return False
    return True


def _linear(layer: nn.Linear, members: int) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        rows = x.reshape(members, -1, x.shape[-1])
        weight = layer.weight.transpose(1, 2)
        y = torch.bmm(rows, weight) if layer.bias is None else torch.baddbmm(layer.bias.unsqueeze(1), rows, weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def _conv(layer: nn.Conv1d | nn.Conv2d, members: int, grouped: bool | None) -> Callable[[Tensor], Tensor]:
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    options = (layer.stride, layer.padding, layer.dilation)

    def forward(x: Tensor) -> Tensor:
        weight, bias = layer.weight, layer.bias
        if not (x.device.type != "cpu" if grouped is None else grouped):
            # unbind, not weight[m]: its backward stacks the members' gradients once instead of
            # scattering each into a zero tensor of all members
            biases = [None] * members if bias is None else bias.unbind(0)
            return torch.cat(
                [
                    conv(rows, w, b, *options, layer.groups)  # type: ignore[arg-type]
                    for rows, w, b in zip(x.chunk(members), weight.unbind(0), biases)
                ]
            )
        # [M*N, C, ...] -> [N, M*C, ...]: member m's channels are group block m of one grouped convolution
        n, spatial = x.shape[0] // members, x.shape[2:]
        channels = x.reshape(members, n, -1, *spatial).transpose(0, 1).reshape(n, -1, *spatial)
        y = conv(
            channels,
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            *options,  # type: ignore[arg-type]
            layer.groups * members,
        )
        return y.reshape(n, members, -1, *y.shape[2:]).transpose(0, 1).reshape(members * n, -1, *y.shape[2:])

    return forward


def _batch_norm(layer: nn.BatchNorm1d | nn.BatchNorm2d, members: int) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        mean, var, weight, bias = layer.running_mean, layer.running_var, layer.weight, layer.bias
        if layer.training and layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)
        assert mean is not None and var is not None  # foldable() admits tracked statistics only
        weights = [None] * members if weight is None else weight.unbind(0)
        biases = [None] * members if bias is None else bias.unbind(0)
        return torch.cat(
            [
                F.batch_norm(rows, mean[m], var[m], w, b, layer.training, layer.momentum, layer.eps)  # type: ignore[arg-type]
                for m, (rows, w, b) in enumerate(zip(x.chunk(members), weights, biases))
            ]
        )

    return forward


@contextmanager
def _folded_layers(module: nn.Module, members: int, grouped: bool | None) -> Iterator[None]:
    patched: list[nn.Module] = []
    try:
        for sub in module.modules():
            forward: Any = None
            if isinstance(sub, nn.Linear):
                forward = _linear(sub, members)
            elif isinstance(sub, (nn.Conv1d, nn.Conv2d)):
                forward = _conv(sub, members, grouped)
            elif isinstance(sub, _BATCH_NORMS):
                forward = _batch_norm(sub, members)
            if forward is not None:
                sub.__dict__["forward"] = forward  # the instance attribute wins over the class's forward
                patched.append(sub)
        yield
    finally:
        for sub in patched:
            del sub.__dict__["forward"]


def folded_forward(module: nn.Module, x: Tensor, members: int, *, grouped_conv: bool | None = None) -> Any:
    """The class's ``forward`` of ``module`` with its ``members`` stacked members on ``x``, which holds
    member ``m``'s batch in its ``m``-th chunk along dim 0 (so does the output).

    ``grouped_conv``: convolutions as one grouped convolution (``True``) or one per member
    (``False``); default: grouped except on the CPU.
    """
    if x.shape[0] % members:
        raise ValueError(f"a folded batch needs {members} equal chunks, got {x.shape[0]} rows")
    with _folded_layers(module, members, grouped_conv):
        return type(module).forward(module, x)
