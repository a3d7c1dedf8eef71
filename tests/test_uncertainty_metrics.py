"""Metric classes against their functional forms and torchmetrics; the plot; the ensemble module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC, MulticlassCalibrationError

from lightning_relief.models import MLP
from lightning_relief.uncertainty import (
    OODAUPR,
    OODAUROC,
    AdaptiveCalibrationError,
    BrierScore,
    Disagreement,
    EnsembleModel,
    ExpectedCalibrationError,
    FPRAt95TPR,
    MutualInformation,
    NegativeLogLikelihood,
    PredictiveEntropy,
    plot_reliability_diagram,
)
from lightning_relief.uncertainty import functional as U


def _data(seed=0, n=300, c=10, m=4):
    rng = np.random.default_rng(seed)
    member = torch.tensor(rng.dirichlet(np.full(c, 0.4), size=(m, n)), dtype=torch.float32)
    target = torch.tensor(rng.integers(0, c, n))
    target = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7, member.mean(0).argmax(-1), target)
    return member, target


@pytest.mark.parametrize(
    "metric, function",
    [
        (NegativeLogLikelihood(), U.negative_log_likelihood),
        (BrierScore(), U.brier_score),
        (ExpectedCalibrationError(), U.expected_calibration_error),
        (AdaptiveCalibrationError(n_bins=10), lambda p, y: U.adaptive_calibration_error(p, y, 10)),
    ],
    ids=["nll", "brier", "ece", "ace"],
)
def test_batched_metric_equals_functional_on_all_data(metric, function):
    member, target = _data()
    probs = member.mean(0)
    for chunk in torch.split(torch.arange(len(target)), 64):  # uneven last batch
        metric.update(probs[chunk], target[chunk])
    assert metric.compute().item() == pytest.approx(function(probs.double(), target).item(), abs=1e-6)
    metric.reset()
    metric.update(probs[:10], target[:10])
    assert metric.compute().item() == pytest.approx(function(probs[:10].double(), target[:10]).item(), abs=1e-6)


def test_ece_class_matches_torchmetrics():
    member, target = _data(1)
    ours, theirs = ExpectedCalibrationError(n_bins=15), MulticlassCalibrationError(num_classes=10, n_bins=15)
    for chunk in torch.split(torch.arange(len(target)), 50):
        ours.update(member[0][chunk], target[chunk])
        theirs.update(member[0][chunk], target[chunk])
    assert ours.compute().item() == pytest.approx(theirs.compute().item(), abs=1e-5)


def test_member_metrics_equal_functional():
    member, _ = _data(2)
    entropy, mi, dis = PredictiveEntropy(), MutualInformation(), Disagreement()
    for chunk in torch.split(torch.arange(member.shape[1]), 70):
        entropy.update(member.mean(0)[chunk])
        mi.update(member[:, chunk])
        dis.update(member[:, chunk])
    assert entropy.compute().item() == pytest.approx(U.predictive_entropy(member.mean(0).double()).mean().item(), rel=1e-5)
    assert mi.compute().item() == pytest.approx(U.mutual_information(member.double()).mean().item(), rel=1e-4)
    assert dis.compute().item() == pytest.approx(U.disagreement(member).item(), rel=1e-6)


def test_ood_metric_classes_accept_mixed_batches_and_match_torchmetrics():
    gen = torch.Generator().manual_seed(3)
    s_in, s_out = torch.randn(200, generator=gen), torch.randn(80, generator=gen) + 1.5
    scores = torch.cat([s_in, s_out])
    labels = torch.cat([torch.zeros(200, dtype=torch.bool), torch.ones(80, dtype=torch.bool)])
    perm = torch.randperm(280, generator=gen)
    auroc, aupr, fpr = OODAUROC(), OODAUPR(), FPRAt95TPR()
    reference = BinaryAUROC()
    for chunk in torch.split(perm, 60):
        for metric in (auroc, aupr, fpr):
            metric.update(scores[chunk], labels[chunk])
        reference.update(scores[chunk], labels[chunk].long())
    assert auroc.compute().item() == pytest.approx(reference.compute().item(), abs=1e-5)
    assert aupr.compute().item() == pytest.approx(U.ood_aupr(s_in, s_out).item(), abs=1e-6)
    assert fpr.compute().item() == pytest.approx(U.fpr_at_95_tpr(s_in, s_out).item(), abs=1e-6)
    whole = OODAUROC()
    whole.update(s_in, is_ood=False)
    whole.update(s_out, is_ood=True)
    assert whole.compute().item() == pytest.approx(auroc.compute().item(), abs=1e-7)
    with pytest.raises(ValueError, match="is_ood"):
        whole.update(s_in, torch.ones(3, dtype=torch.bool))


def test_reliability_diagram_writes_png(tmp_path):
    member, target = _data(4)
    out = plot_reliability_diagram(member.mean(0), target, tmp_path / "sub" / "rel.png", title="test")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=".png"):
        plot_reliability_diagram(member.mean(0), target, tmp_path / "rel.jpg")


def test_ensemble_model_is_the_mean_of_member_softmax_and_exports():
    torch.manual_seed(0)
    members = [MLP(in_features=6, hidden=(8,), num_classes=4, dropout=0.0) for _ in range(3)]
    ensemble = EnsembleModel(members).eval()
    x = torch.randn(5, 6)
    expected = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(ensemble(x), expected)
    torch.testing.assert_close(ensemble.member_probs(x).mean(0), expected)
    exported = torch.export.export(ensemble, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    with pytest.raises(ValueError, match="at least one"):
        EnsembleModel([])


def _two_rank_metrics(rank: int, init_file: str, out: str) -> None:
    """One gloo rank: update every metric class with this rank's (unequal) share, compute (which syncs)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        member, target, s_in, s_out = _ranked_data()
        rows = slice(0, 70) if rank == 0 else slice(70, None)  # 70 and 230 rows: a mean of means would differ
        probs = member.mean(0)
        values = {}
        for name, metric, args in [
            ("nll", NegativeLogLikelihood(), (probs[rows], target[rows])),
            ("brier", BrierScore(), (probs[rows], target[rows])),
            ("ece", ExpectedCalibrationError(), (probs[rows], target[rows])),
            ("aece", AdaptiveCalibrationError(), (probs[rows], target[rows])),
            ("entropy", PredictiveEntropy(), (probs[rows],)),
            ("mutual_info", MutualInformation(), (member[:, rows],)),
            ("disagreement", Disagreement(), (member[:, rows],)),
        ]:
            metric.update(*args)
            values[name] = metric.compute().item()
        ood_in = s_in[:30] if rank == 0 else s_in[30:]
        ood_out = s_out[:50] if rank == 0 else s_out[50:]
        for name, metric in (("auroc", OODAUROC()), ("aupr", OODAUPR()), ("fpr95", FPRAt95TPR())):
            metric.update(ood_in, is_ood=False)
            metric.update(ood_out, is_ood=True)
            values[name] = metric.compute().item()
        gathered = [None, None]
        dist.all_gather_object(gathered, values)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _ranked_data():
    member, target = _data(5)
    gen = torch.Generator().manual_seed(5)
    return member, target, torch.randn(200, generator=gen), torch.randn(90, generator=gen) + 1.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_reduce_across_two_ranks_to_the_value_on_all_data(tmp_path):
    """2 gloo processes, each with an unequal share: every metric class gives, on both ranks, the
    functional form applied to the gathered data (sums and scores reduced, not per-rank values averaged)."""
    import multiprocessing

    import torch.multiprocessing as tmp

    multiprocessing.set_forkserver_preload(["torch", "torchmetrics"])
    out = tmp_path / "values.pt"
    tmp.start_processes(_two_rank_metrics, args=(str(tmp_path / "pg"), str(out)), nprocs=2, start_method="forkserver")
    per_rank = torch.load(out, weights_only=True)
    member, target, s_in, s_out = _ranked_data()
    probs = member.mean(0).double()
    expected = {
        "nll": U.negative_log_likelihood(probs, target),
        "brier": U.brier_score(probs, target),
        "ece": U.expected_calibration_error(probs, target),
        "aece": U.adaptive_calibration_error(probs, target),
        "entropy": U.predictive_entropy(probs).mean(),
        "mutual_info": U.mutual_information(member.double()).mean(),
        "disagreement": U.disagreement(member),
        "auroc": U.ood_auroc(s_in, s_out),
        "aupr": U.ood_aupr(s_in, s_out),
        "fpr95": U.fpr_at_95_tpr(s_in, s_out),
    }
    for values in per_rank:
        for name, value in expected.items():
            assert values[name] == pytest.approx(value.item(), abs=1e-6), name
