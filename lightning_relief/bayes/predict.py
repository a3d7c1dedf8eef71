"""Monte-Carlo and deterministic mean-weight prediction for stochastic models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_relief.bayes.convert import bayesian_layers

_RHO = ("rho_weight", "rho_kernel", "rho_bias")


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def mean_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every variational layer uses its posterior mean weights.

    The posterior standard deviation ``softplus(rho)`` is set to exactly 0 by
    setting ``rho = -inf``; the original values come back afterwards, also on
    error.
    """
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for layer in bayesian_layers(model):
                for name in _RHO:
                    rho = getattr(layer, name, None)
                    if isinstance(rho, Tensor):
                        saved.append((rho, rho.detach().clone()))
                        rho.fill_(float("-inf"))
        yield model
    finally:
        with torch.no_grad():
            for rho, value in saved:
                rho.copy_(value)


@contextmanager
def _dropout_active(model: nn.Module, active: bool) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] if active else []
    states = [m.training for m in modules]
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


@torch.no_grad()
def mc_predict(
    model: nn.Module,
    x: Tensor,
    num_samples: int = 30,
    mc_dropout: bool = False,
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo prediction: ``(mean probs [N, C], sample probs [S, N, C])``.

    Each of ``num_samples`` forward passes draws new weights in variational
    layers; ``mc_dropout=True`` also keeps dropout active (MC dropout) while
    BatchNorm and the rest stay in eval mode. ``(out, kl)`` outputs are
    unwrapped.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> model = MLP(in_features=4, hidden=(8,), num_classes=3, dropout=0.5).eval()
        >>> mean, samples = mc_predict(model, torch.randn(2, 4), num_samples=5, mc_dropout=True)
        >>> tuple(mean.shape), tuple(samples.shape)
        ((2, 3), (5, 2, 3))
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    with _dropout_active(model, mc_dropout):
        samples = torch.stack([_logits(model, x).softmax(-1) for _ in range(num_samples)])
    return samples.mean(0), samples


@torch.no_grad()
def predict_mean(model: nn.Module, x: Tensor) -> Tensor:
    """Deterministic prediction with the posterior mean weights: probabilities ``[N, C]``."""
    with mean_weights(model):
        return _logits(model, x).softmax(-1)
