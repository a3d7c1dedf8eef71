"""Moment propagation: a network's output mean and variance in one analytic pass.

- :class:`MomentPropagationWrapper` (``wrapper``): wraps a trained network with dropout or
  Gaussian-weight layers.
- :mod:`~lightning_relief.moments.functional`: the per-operation rules.
- :class:`MomentUncertainty` (``metrics``): mutual information / entropies of the logit moments.
- :func:`mc_dropout_logits`, :func:`mc_bayesian_logits` (``sampling``): the Monte-Carlo reference.
"""

from lightning_relief.moments.metrics import MomentUncertainty
from lightning_relief.moments.rules import UnsupportedOperationError
from lightning_relief.moments.sampling import mc_bayesian_logits, mc_dropout_logits
from lightning_relief.moments.wrapper import MomentPropagationWrapper

__all__ = [
    "MomentPropagationWrapper", "MomentUncertainty", "UnsupportedOperationError", "mc_bayesian_logits",
    "mc_dropout_logits",
]  # fmt: skip
