"""Uncertainty metrics as plain functions of probabilities (no state, no module).

Conventions shared by every function here:

- ``probs`` is ``[N, C]`` class probabilities (rows sum to 1), ``target`` is
  ``[N]`` integer labels; logarithms are natural.
- ``member_probs`` is ``[M, N, C]``: the probabilities of each of ``M``
  ensemble members (or Monte-Carlo samples).
- OOD scores: a HIGHER score means MORE likely out-of-distribution (for
  example :func:`predictive_entropy`); OOD samples are the positive class.

Example::

    >>> import torch
    >>> from lightning_relief.uncertainty import functional as U
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    >>> target = torch.tensor([0, 0])
    >>> round(U.negative_log_likelihood(probs, target).item(), 4)
    0.8574
    >>> U.ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])).item()
    1.0
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "disagreement",
    "expected_calibration_error",
    "fpr_at_95_tpr",
    "mutual_information",
    "negative_log_likelihood",
    "ood_aupr",
    "ood_auroc",
    "predictive_entropy",
]

# probabilities below this are clamped before a log: a member that is certain
# and wrong gives a large, finite NLL instead of inf
_EPS = 1e-12
# rows of probabilities must sum to 1 within this (float16 softmax outputs stay well inside it)
_SUM_TOLERANCE = 1e-2


def _check_distribution(probs: Tensor, name: str) -> None:
    """Finite, in [0, 1], rows summing to 1: otherwise a clear error (logits are the usual mistake)."""
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}")
    if probs.numel() == 0:
        return
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or inf")
    sums = probs.sum(-1)
    low, high = float(probs.min()), float(probs.max())
    if low < 0 or high > 1 + _SUM_TOLERANCE or (sums - 1).abs().max() > _SUM_TOLERANCE:
        raise ValueError(
            f"{name} must be probabilities (in [0, 1], each row summing to 1); got values in [{low:.4g}, {high:.4g}] "
            f"and row sums in [{float(sums.min()):.4g}, {float(sums.max()):.4g}]: this looks like logits, "
            "apply softmax first"
        )


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if probs.ndim != 2:
        raise ValueError(f"{name} must be [N, C] probabilities, got shape {tuple(probs.shape)}")
    _check_distribution(probs, name)


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")


def _check_target(probs: Tensor, target: Tensor) -> None:
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(f"target must be [N] with N={probs.shape[0]}, got shape {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= probs.shape[1]):
        raise ValueError(f"target labels must lie in [0, {probs.shape[1] - 1}], got {target.min()}..{target.max()}")


def _check_members(member_probs: Tensor) -> None:
    if member_probs.ndim != 3:
        raise ValueError(f"member_probs must be [M, N, C], got shape {tuple(member_probs.shape)}")
    _check_distribution(member_probs, "member_probs")


def _entropy(probs: Tensor) -> Tensor:
    # 0 * log 0 = 0: xlogy gives exactly that
    return -torch.special.xlogy(probs, probs).sum(-1)


def negative_log_likelihood(probs: Tensor, target: Tensor) -> Tensor:
    """Mean of ``-log p(target)`` over the ``N`` samples."""
    _check_probs(probs)
    _check_target(probs, target)
    picked = probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -picked.clamp_min(_EPS).log().mean()


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """Mean over samples of ``sum_c (p_c - onehot_c)^2`` (0 is perfect, 2 the worst)."""
    _check_probs(probs)
    _check_target(probs, target)
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(-1).mean()


def calibration_bins(probs: Tensor, target: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin ``(count, mean confidence, accuracy)`` over ``n_bins`` equal-width bins.

    Bin ``b`` holds top-1 confidences in ``(b/n_bins, (b+1)/n_bins]`` (bin 0 also
    holds 0). Empty bins report 0 confidence and 0 accuracy.
    """
    _check_probs(probs)
    _check_target(probs, target)
    _check_n_bins(n_bins)
    confidence, prediction = probs.max(-1)
    correct = (prediction == target).to(probs.dtype)
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, index, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return count, conf_sum / safe, acc_sum / safe


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """ECE: ``sum_b (n_b / N) |acc_b - conf_b|`` over equal-width confidence bins."""
    count, confidence, accuracy = calibration_bins(probs, target, n_bins)
    total = count.sum()
    if total == 0:
        return probs.new_zeros(())
    return ((count / total) * (accuracy - confidence).abs()).sum()


def adaptive_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """Adaptive ECE: like ECE, but each bin holds the same number of samples.

    Samples are sorted by top-1 confidence and split into ``n_bins`` contiguous
    groups whose sizes differ by at most one (``torch.tensor_split``); fewer
    samples than bins gives one sample per bin.
    """
    _check_probs(probs)
    _check_target(probs, target)
    _check_n_bins(n_bins)
    n = probs.shape[0]
    if n == 0:
        return probs.new_zeros(())
    confidence, prediction = probs.max(-1)
    correct = (prediction == target).to(probs.dtype)
    order = torch.argsort(confidence, stable=True)
    total = probs.new_zeros(())
    for chunk in torch.tensor_split(order, min(n_bins, n)):
        total = total + chunk.numel() * (correct[chunk].mean() - confidence[chunk].mean()).abs()
    return total / n


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of each row: ``[N]``."""
    _check_probs(probs)
    return _entropy(probs)


def mutual_information(member_probs: Tensor) -> Tensor:
    """Epistemic part of the entropy, ``H(mean_m p_m) - mean_m H(p_m)``: ``[N]``.

    Non-negative up to rounding (entropy is concave); zero when members agree exactly.
    """
    _check_members(member_probs)
    total = _entropy(member_probs.mean(0))
    expected = _entropy(member_probs).mean(0)
    return (total - expected).clamp_min(0)


def disagreement(member_probs: Tensor, reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Fraction of ordered member pairs ``(m, m')``, ``m != m'``, whose top-1 classes differ.

    ``reduction="none"`` gives it per sample (``[N]``); ``"mean"`` averages over
    samples. A single member has no pairs and gives 0.
    """
    _check_members(member_probs)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    m, n, c = member_probs.shape
    if m < 2:
        per_sample = member_probs.new_zeros(n)
    else:
        votes = torch.nn.functional.one_hot(member_probs.argmax(-1), c).sum(0).to(member_probs.dtype)  # [N, C]
        agreeing_pairs = (votes * (votes - 1)).sum(-1)
        per_sample = 1.0 - agreeing_pairs / (m * (m - 1))
    return per_sample.mean() if reduction == "mean" else per_sample


def _ood_labels(score_in: Tensor, score_out: Tensor) -> tuple[Tensor, Tensor]:
    if score_in.ndim != 1 or score_out.ndim != 1:
        raise ValueError(f"score_in and score_out must be 1-D, got shapes {tuple(score_in.shape)} and {tuple(score_out.shape)}")
    if score_in.numel() == 0 or score_out.numel() == 0:
        raise ValueError(f"need at least one in-distribution and one OOD score, got {score_in.numel()} and {score_out.numel()}")
    for name, scores in (("score_in", score_in), ("score_out", score_out)):
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).sum())
            raise ValueError(f"{name} holds {bad} NaN or infinite scores; OOD metrics need finite scores")
    scores = torch.cat([score_in, score_out]).double()
    labels = torch.cat([torch.zeros(score_in.numel()), torch.ones(score_out.numel())]).double()
    return scores, labels.to(scores.device)


def ood_auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Area under the ROC curve for telling OOD (positive) from in-distribution.

    Computed as the Mann-Whitney statistic ``P(s_out > s_in) + P(s_out = s_in)/2``.
    """
    scores, labels = _ood_labels(score_in, score_out)
    # average ranks of tied scores: ties count one half
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(scores.dtype)
    mean_rank = ends - (counts.to(scores.dtype) - 1) / 2
    ranks[order] = mean_rank[inverse]
    n_out = labels.sum()
    n_in = labels.numel() - n_out
    u = ranks[labels == 1].sum() - n_out * (n_out + 1) / 2
    return (u / (n_in * n_out)).float()


def _roc_points(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative true and false positives at each distinct threshold, highest first."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # a threshold sits after the last sample of each run of equal scores
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tp = labels.cumsum(0)[last]
    fp = (1 - labels).cumsum(0)[last]
    return tp, fp, scores[last]


def ood_aupr(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with OOD as the positive class.

    Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds (the
    step-wise estimator scikit-learn's ``average_precision_score`` uses).
    """
    scores, labels = _ood_labels(score_in, score_out)
    tp, fp, _ = _roc_points(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    previous = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - previous) * precision).sum().float()


def fpr_at_95_tpr(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Fraction of in-distribution samples flagged as OOD at the highest threshold
    that still flags at least 95 % of the OOD samples."""
    scores, labels = _ood_labels(score_in, score_out)
    tp, fp, _ = _roc_points(scores, labels)
    tpr = tp / labels.sum()
    fpr = fp / (labels.numel() - labels.sum())
    # tpr rises with each lower threshold; take the first point reaching 95 %
    reached = torch.nonzero(tpr >= 0.95 - 1e-12)[0, 0]
    return fpr[reached].float()
