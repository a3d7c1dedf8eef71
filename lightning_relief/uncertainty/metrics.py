"""torchmetrics ``Metric`` classes for the functions in :mod:`.functional`.

Each class accumulates over batches (and processes, through torchmetrics'
synchronisation) and gives the same value as its functional form applied to
all the data at once.

Example::

    >>> import torch
    >>> from lightning_relief.uncertainty.metrics import NegativeLogLikelihood, OODAUROC
    >>> nll = NegativeLogLikelihood()
    >>> nll.update(torch.tensor([[0.9, 0.1]]), torch.tensor([0]))
    >>> nll.update(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))
    >>> round(nll.compute().item(), 4)
    0.8574
    >>> auroc = OODAUROC()
    >>> auroc.update(torch.tensor([0.1, 0.2]), is_ood=False)
    >>> auroc.update(torch.tensor([0.3, 0.4]), is_ood=True)
    >>> auroc.compute().item()
    1.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_relief.uncertainty import functional as F

__all__ = [
    "OODAUPR",
    "OODAUROC",
    "AdaptiveCalibrationError",
    "BrierScore",
    "Disagreement",
    "ExpectedCalibrationError",
    "FPRAt95TPR",
    "MutualInformation",
    "NegativeLogLikelihood",
    "PredictiveEntropy",
]


class _SampleMean(Metric):
    """Mean over samples of a per-sample quantity."""

    full_state_update = False
    is_differentiable = False
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, mean: Tensor, n: int) -> None:
        self.total += mean.double() * n
        self.count += n

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class NegativeLogLikelihood(_SampleMean):
    """Mean negative log-likelihood of the targets; ``update(probs [N, C], target [N])``."""

    higher_is_better = False

    def update(self, probs: Tensor, target: Tensor) -> None:
        self._add(F.negative_log_likelihood(probs, target), target.numel())


class BrierScore(_SampleMean):
    """Multi-class Brier score; ``update(probs [N, C], target [N])``."""

    higher_is_better = False

    def update(self, probs: Tensor, target: Tensor) -> None:
        self._add(F.brier_score(probs, target), target.numel())


class PredictiveEntropy(_SampleMean):
    """Mean predictive entropy; ``update(probs [N, C])``."""

    def update(self, probs: Tensor) -> None:
        self._add(F.predictive_entropy(probs).mean(), probs.shape[0])


class MutualInformation(_SampleMean):
    """Mean mutual information between prediction and member; ``update(member_probs [M, N, C])``."""

    def update(self, member_probs: Tensor) -> None:
        self._add(F.mutual_information(member_probs).mean(), member_probs.shape[1])


class Disagreement(_SampleMean):
    """Mean pairwise top-1 disagreement of members; ``update(member_probs [M, N, C])``."""

    def update(self, member_probs: Tensor) -> None:
        self._add(F.disagreement(member_probs), member_probs.shape[1])


class ExpectedCalibrationError(Metric):
    """Equal-width-bin ECE (15 bins by default); ``update(probs [N, C], target [N])``.

    Keeps only per-bin sums, so memory does not grow with the data.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    bin_count: Tensor
    bin_confidence: Tensor
    bin_correct: Tensor

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        F._check_n_bins(n_bins)
        self.n_bins = n_bins
        for name in ("bin_count", "bin_confidence", "bin_correct"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        count, confidence, accuracy = F.calibration_bins(probs.double(), target, self.n_bins)
        self.bin_count += count
        self.bin_confidence += confidence * count
        self.bin_correct += accuracy * count

    def compute(self) -> Tensor:
        total = self.bin_count.sum().clamp_min(1)
        safe = self.bin_count.clamp_min(1)
        gap = (self.bin_correct / safe - self.bin_confidence / safe).abs()
        return ((self.bin_count / total) * gap).sum().float()


class _Concatenating(Metric):
    full_state_update = False
    is_differentiable = False


class AdaptiveCalibrationError(_Concatenating):
    """Equal-mass-bin ECE; ``update(probs [N, C], target [N])`` (keeps one row per sample)."""

    higher_is_better = False
    probs: list[Tensor]
    target: list[Tensor]

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        F._check_n_bins(n_bins)
        self.n_bins = n_bins
        self.add_state("probs", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        F._check_probs(probs)
        F._check_target(probs, target)
        self.probs.append(probs.detach())
        self.target.append(target.detach())

    def compute(self) -> Tensor:
        return F.adaptive_calibration_error(dim_zero_cat(self.probs), dim_zero_cat(self.target), self.n_bins)


class _OODScore(_Concatenating):
    """OOD detection from a score where higher means more likely OOD.

    ``update(score [N], is_ood)`` with ``is_ood`` a bool for the whole batch or a
    bool tensor ``[N]``.
    """

    higher_is_better = True
    _function: Callable[[Tensor, Tensor], Tensor]
    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, score: Tensor, is_ood: bool | Tensor) -> None:
        if score.ndim != 1:
            raise ValueError(f"score must be 1-D [N], got shape {tuple(score.shape)}")
        if not torch.isfinite(score).all():
            raise ValueError("score holds NaN or infinite values; OOD metrics need finite scores")
        label = torch.as_tensor(is_ood, dtype=torch.bool, device=score.device)
        if label.ndim == 0:
            label = label.expand(score.shape[0])
        if label.shape != score.shape:
            raise ValueError(f"is_ood must be a bool or shaped like score {tuple(score.shape)}, got {tuple(label.shape)}")
        self.scores.append(score.detach())
        self.labels.append(label)

    def compute(self) -> Tensor:
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        return type(self)._function(scores[~labels], scores[labels])


class OODAUROC(_OODScore):
    """Area under the ROC curve of OOD detection."""

    _function = staticmethod(F.ood_auroc)


class OODAUPR(_OODScore):
    """Area under the precision-recall curve of OOD detection (OOD positive)."""

    _function = staticmethod(F.ood_aupr)


class FPRAt95TPR(_OODScore):
    """False-positive rate at 95 % true-positive rate of OOD detection."""

    higher_is_better = False
    _function = staticmethod(F.fpr_at_95_tpr)
