"""Monte-Carlo references: MC dropout and sampled Gaussian weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@contextlib.contextmanager
def dropout_active(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode everywhere except dropout modules, which sample; modes are restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, _DROPOUT_TYPES):
            m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


@torch.no_grad()
def mc_dropout_logits(model: nn.Module, x: Tensor, samples: int, chunk: int | None = None) -> Tensor:
    """``[samples, N, ...]`` logits of MC dropout, samples batched into one forward.

    The input is repeated ``samples`` times along the batch (``chunk`` copies per
    forward when memory is short): the fastest form on one device, with no Python
    loop per sample. Only dropout *modules* are switched on; a functional
    ``F.dropout(x, p, self.training)`` stays off in eval mode.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    chunk = samples if chunk is None else max(1, min(chunk, samples))
    outs = []
    with dropout_active(model):
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            out = model(x.repeat(n, *([1] * (x.dim() - 1))))
            outs.append(out.reshape(n, x.shape[0], *out.shape[1:]))
    return torch.cat(outs)


@torch.no_grad()
def mc_bayesian_logits(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """``[samples, N, ...]`` logits with freshly sampled Gaussian weights per forward.

    bayesian-torch layers draw one weight sample per call for the whole batch, so
    samples cannot be batched along the batch dimension: this loops. A network
    returning ``(out, kl)`` gives ``out``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outs = []
    with dropout_active(model):
        for _ in range(samples):
            out = model(x)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.stack(outs)
