"""``MomentUncertainty``: a torchmetrics ``Metric`` of the uncertainty scores of moment-propagated logits."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_relief.moments.functional import logit_uncertainty

_SCORES = ("mutual_information", "predictive_entropy", "expected_entropy")


class MomentUncertainty(Metric):
    """Mean mutual information (or predictive / expected entropy) of Gaussian logits; ``update(mean, var, factor=None)``.

    ``mean``/``var`` are ``[N, C]`` logit moments and ``factor`` (``[N, K, C]``) their shared
    sources, e.g. from :meth:`~lightning_relief.moments.MomentPropagationWrapper.logit_moments`
    (without it the classes are independent, which overstates the mutual information); the score is
    :func:`~lightning_relief.moments.functional.logit_uncertainty`'s, averaged over all
    samples seen (synchronised across processes by torchmetrics).

    Args:
        score: ``"mutual_information"`` (epistemic), ``"predictive_entropy"`` (total) or
            ``"expected_entropy"`` (aleatoric).

    Example::

        >>> import torch
        >>> metric = MomentUncertainty()
        >>> metric.update(torch.zeros(2, 3), torch.zeros(2, 3))  # certain logits: no epistemic part
        >>> round(metric.compute().item(), 5)  # up to the rounding of a mean over 2048 logit draws
        0.0
        >>> metric.update(torch.zeros(2, 3), torch.full((2, 3), 4.0))
        >>> metric.compute().item() > 0
        True
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    total: Tensor
    count: Tensor

    def __init__(
        self, score: Literal["mutual_information", "predictive_entropy", "expected_entropy"] = "mutual_information", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
        self.score = score
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: Tensor, var: Tensor, factor: Tensor | None = None) -> None:
        if mean.shape != var.shape or mean.dim() != 2:
            raise ValueError(f"mean and var must both be [N, C], got {tuple(mean.shape)} and {tuple(var.shape)}")
        if not torch.isfinite(var).all() or (var < 0).any():
            raise ValueError("var must be finite and non-negative")
        if factor is not None and (factor.dim() != 3 or factor.shape[0] != mean.shape[0] or factor.shape[2] != mean.shape[1]):
            raise ValueError(f"factor must be [N, K, C] for [N, C] logits, got {tuple(factor.shape)}")
        if factor is not None:
            factor = factor.detach()
        total, expected, mutual = logit_uncertainty(mean.detach(), var.detach(), factor=factor)
        value = {"mutual_information": mutual, "predictive_entropy": total, "expected_entropy": expected}[self.score]
        self.total += value.double().sum()
        self.count += value.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()
