"""Functional uncertainty metrics against direct numpy loops, scikit-learn and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_calibration_error,
)

from lightning_relief.uncertainty import functional as U


def _random_probs(n: int, c: int, seed: int, concentration: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, concentration), size=n)
    # labels agree with the top class 60 % of the time so calibration is non-trivial
    target = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, c, n))
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(target)


# ---------------------------------------------------------------- numpy references
def np_nll(p, y):
    return float(np.mean([-math.log(p[i, y[i]]) for i in range(len(y))]))


def np_brier(p, y):
    total = 0.0
    for i in range(len(y)):
        for c in range(p.shape[1]):
            total += (p[i, c] - (1.0 if c == y[i] else 0.0)) ** 2
    return total / len(y)


def np_ece(p, y, n_bins):
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return ece


def np_ace(p, y, n_bins):
    conf, pred = p.max(1), p.argmax(1)
    order = np.argsort(conf, kind="stable")
    ace = 0.0
    for chunk in np.array_split(order, n_bins):
        ace += len(chunk) / len(y) * abs((pred[chunk] == y[chunk]).mean() - conf[chunk].mean())
    return ace


def np_entropy(p):
    return np.array([-sum(v * math.log(v) for v in row if v > 0) for row in p])


def np_disagreement(mp):
    m, n, _ = mp.shape
    top = mp.argmax(-1)
    per = [np.mean([top[a, i] != top[b, i] for a in range(m) for b in range(m) if a != b]) for i in range(n)]
    return np.array(per)


def np_fpr95(s_in, s_out):
    # the largest threshold t with mean(s_out >= t) >= 0.95, scanned over every observed score
    best = None
    for t in sorted(np.concatenate([s_in, s_out]), reverse=True):
        if np.mean(s_out >= t) >= 0.95:
            best = t
            break
    return float(np.mean(s_in >= best))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1])
def test_nll_and_brier_match_numpy(seed):
    probs, target = _random_probs(200, 7, seed)
    p, y = probs.numpy(), target.numpy()
    assert U.negative_log_likelihood(probs, target).item() == pytest.approx(np_nll(p, y), rel=1e-10)
    assert U.brier_score(probs, target).item() == pytest.approx(np_brier(p, y), rel=1e-10)
    # cross-entropy of log-probabilities is the same quantity
    ce = torch.nn.functional.nll_loss(probs.log(), target)
    assert U.negative_log_likelihood(probs, target).item() == pytest.approx(ce.item(), rel=1e-10)


def test_nll_is_finite_when_certain_and_wrong():
    probs = torch.tensor([[1.0, 0.0]])
    assert math.isfinite(U.negative_log_likelihood(probs, torch.tensor([1])).item())


@pytest.mark.parametrize("n_bins", [15, 4])
def test_ece_matches_numpy_and_torchmetrics(n_bins):
    probs, target = _random_probs(500, 10, 2)
    p, y = probs.numpy(), target.numpy()
    ece = U.expected_calibration_error(probs, target, n_bins=n_bins).item()
    assert ece == pytest.approx(np_ece(p, y, n_bins), abs=1e-12)
    # torchmetrics bins [lo, hi) instead of (lo, hi]: equal unless a confidence sits on an edge
    tm = multiclass_calibration_error(probs.float(), target, num_classes=10, n_bins=n_bins).item()
    assert ece == pytest.approx(tm, abs=1e-5)
    assert ece > 0.01  # the labels were made miscalibrated on purpose


def test_adaptive_ece_matches_numpy_and_differs_from_ece():
    probs, target = _random_probs(203, 5, 3)  # 203 samples: bins of unequal size
    p, y = probs.numpy(), target.numpy()
    ace = U.adaptive_calibration_error(probs, target, n_bins=15).item()
    assert ace == pytest.approx(np_ace(p, y, 15), abs=1e-12)
    assert ace != pytest.approx(U.expected_calibration_error(probs, target).item(), abs=1e-6)


def test_calibration_of_a_perfectly_calibrated_predictor_is_near_zero():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(20000, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    correct = torch.rand(20000, generator=gen, dtype=torch.float64) < conf
    probs = torch.stack([conf, 1 - conf], 1)
    target = torch.where(correct, 0, 1)
    assert U.expected_calibration_error(probs, target).item() < 0.02
    assert U.adaptive_calibration_error(probs, target).item() < 0.02


def test_entropy_mutual_information_and_disagreement_match_numpy():
    rng = np.random.default_rng(4)
    mp = rng.dirichlet(np.full(6, 0.7), size=(5, 40))  # [M, N, C]
    member_probs = torch.tensor(mp)
    mean = mp.mean(0)
    np.testing.assert_allclose(U.predictive_entropy(member_probs.mean(0)).numpy(), np_entropy(mean), rtol=1e-10)
    mi_ref = np_entropy(mean) - np.mean([np_entropy(mp[m]) for m in range(5)], axis=0)
    np.testing.assert_allclose(U.mutual_information(member_probs).numpy(), mi_ref, rtol=1e-9, atol=1e-12)
    per = U.disagreement(member_probs, reduction="none").numpy()
    np.testing.assert_allclose(per, np_disagreement(mp))
    assert U.disagreement(member_probs).item() == pytest.approx(per.mean())


def test_entropy_edge_cases():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    ent = U.predictive_entropy(probs)
    assert ent[0].item() == 0.0
    assert ent[1].item() == pytest.approx(math.log(3), rel=1e-6)
    same = probs.unsqueeze(0).repeat(4, 1, 1)
    assert torch.all(U.mutual_information(same) == 0)
    assert U.disagreement(same).item() == 0.0
    assert U.disagreement(same[:1]).item() == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_ood_scores_match_sklearn_torchmetrics_and_numpy(ties):
    rng = np.random.default_rng(5)
    s_in = rng.normal(0.0, 1.0, 300)
    s_out = rng.normal(1.0, 1.0, 120)
    if ties:  # coarse scores: many tied values across the two sets
        s_in, s_out = np.round(s_in), np.round(s_out)
    t_in, t_out = torch.tensor(s_in), torch.tensor(s_out)
    scores = np.concatenate([s_in, s_out])
    labels = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])

    auroc = U.ood_auroc(t_in, t_out).item()
    assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    pairs = (s_out[:, None] > s_in[None, :]).mean() + 0.5 * (s_out[:, None] == s_in[None, :]).mean()
    assert auroc == pytest.approx(pairs, abs=1e-6)
    tm_auroc = binary_auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels).long())
    assert auroc == pytest.approx(tm_auroc.item(), abs=1e-5)

    aupr = U.ood_aupr(t_in, t_out).item()
    assert aupr == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    tm_ap = binary_average_precision(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels).long())
    assert aupr == pytest.approx(tm_ap.item(), abs=1e-5)

    fpr95 = U.fpr_at_95_tpr(t_in, t_out).item()
    assert fpr95 == pytest.approx(np_fpr95(s_in, s_out), abs=1e-6)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert fpr95 == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-6)


def test_ood_extremes():
    low, high = torch.arange(10.0), torch.arange(10.0) + 100
    assert U.ood_auroc(low, high).item() == 1.0
    assert U.ood_aupr(low, high).item() == 1.0
    assert U.fpr_at_95_tpr(low, high).item() == 0.0
    assert U.ood_auroc(high, low).item() == 0.0
    assert U.fpr_at_95_tpr(high, low).item() == 1.0


def test_bad_input_names_the_problem():
    probs = torch.rand(4, 3).softmax(-1)
    with pytest.raises(ValueError, match="probs must be"):
        U.negative_log_likelihood(probs[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target labels"):
        U.brier_score(probs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="n_bins"):
        U.expected_calibration_error(probs, torch.zeros(4, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="member_probs"):
        U.mutual_information(probs)
    with pytest.raises(ValueError, match="at least one"):
        U.ood_auroc(torch.tensor([]), torch.tensor([1.0]))


def test_bad_inputs_are_refused_with_a_clear_error():
    from lightning_relief.uncertainty import OODAUROC, ExpectedCalibrationError

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20, 4, generator=gen)
    target = torch.randint(0, 4, (20,), generator=gen)
    for function in (U.expected_calibration_error, U.negative_log_likelihood, U.brier_score, U.adaptive_calibration_error):
        with pytest.raises(ValueError, match="looks like logits"):
            function(logits, target)
    with pytest.raises(ValueError, match="looks like logits"):
        ExpectedCalibrationError().update(logits, target)
    with pytest.raises(ValueError, match="looks like logits"):
        U.mutual_information(logits.unsqueeze(0))
    probs = logits.softmax(-1)
    probs[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        U.expected_calibration_error(probs, target)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        U.expected_calibration_error(probs[0], target)
    # NaN OOD scores: scikit-learn raises too, rather than giving a number
    scores = torch.tensor([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="NaN"):
        U.ood_auroc(scores, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="NaN"):
        OODAUROC().update(scores, is_ood=False)
    # float16 softmax outputs are accepted (rows sum to 1 within rounding)
    half = logits.half().softmax(-1)
    assert U.expected_calibration_error(half.float(), target) >= 0
