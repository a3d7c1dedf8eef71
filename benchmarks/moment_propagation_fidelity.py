"""Moment propagation, round 2: fidelity against 2000-sample Monte-Carlo on MNIST-1D models, and cost.

The issue's goals (#14), measured on models trained briefly on MNIST-1D (OOD: the
test signals with white noise of std 1 added):

- ``cnn``: the project's ``MNIST1DCNN`` with batch norm and dropout 0.2 before its classifier;
- ``bayes_cnn``: a Bayesian CNN with max pooling made of bayesian-torch layers
  (``Conv1dReparameterization`` -> ReLU -> ``MaxPool1d`` twice, ``LinearReparameterization``);
- ``mlp``: three linear layers with ReLU and dropout 0.2 after each hidden layer;
- ``*_low_rank``: the same trained networks propagated with ``covariance="low_rank"``;
- ``zoo_conv1d_cnn``, ``zoo_transformer``: the test zoo's MNIST-1D models (``tests/zoo.py``).

Against MC with 2000 samples on the same weights: logit mean rel. L2 error (goal <= 3 %),
MP/MC variance ratio per logit (median in [0.8, 1.25], 5-95 % in [0.5, 2]); against
MC-100: NLL (within 5 %), OOD AUROC by predictive entropy and by mutual information
(within 0.02; also against the AUROC of the 2000-sample MC, "mc_full", whose own
sampling error is smaller). Cost: process CPU time per call, one thread, methods interleaved round by
round; ratios MP / deterministic (goal <= 2.5x) and MC-30 / MP (goal >= 10x at batch >= 32;
batch 1 reported). Per layer type: the error at the output of every layer of the
Sequential models, grouped by the layer's type (and covariance mode).

    python benchmarks/moment_propagation_fidelity.py --part fidelity    # accuracy (~20 min on one busy core)
    flock /tmp/bench.lock python benchmarks/moment_propagation_fidelity.py --part cost   # then the costs (~3 min)
    python benchmarks/moment_propagation_fidelity.py --quick   # smoke run (both)

Writes benchmarks/results/moment_propagation_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _machine import machine_info  # noqa: E402
from _results import result_path  # noqa: E402
from moment_propagation import cpu_time_per_call  # noqa: E402

from lightning_relief import ClassifierModule, MomentPropagationWrapper  # noqa: E402
from lightning_relief.data import MNIST1DDataModule  # noqa: E402
from lightning_relief.models import MNIST1DCNN  # noqa: E402
from lightning_relief.moments import functional as MF  # noqa: E402
from lightning_relief.moments import mc_bayesian_logits, mc_dropout_logits  # noqa: E402
from lightning_relief.uncertainty import functional as U  # noqa: E402

GOALS = {"mean_rel": 0.03, "median": (0.8, 1.25), "quantiles": (0.5, 2.0), "nll_rel": 0.05, "auroc": 0.02}


class NoKL(nn.Module):
    """A bayesian-torch layer that returns its output only (so that it fits in ``nn.Sequential``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, return_kl=False)


def bayes_cnn() -> nn.Sequential:
    from bayesian_torch.layers import Conv1dReparameterization, LinearReparameterization

    return nn.Sequential(
        NoKL(Conv1dReparameterization(1, 16, 5, padding=2)), nn.ReLU(), nn.MaxPool1d(2),
        NoKL(Conv1dReparameterization(16, 32, 3, padding=1)), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), NoKL(LinearReparameterization(32 * 10, 10)),
    )  # fmt: skip


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(40, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Sequential:
    model = MNIST1DCNN(dropout=0.2)
    return nn.Sequential(*model.features, model.classifier)  # the same layers, as one Sequential


def zoo(name: str) -> nn.Module:
    from zoo import ZOO

    return ZOO[name].make()


MODELS = {  # name: (build, Bayesian, the wrapper's covariance mode)
    "cnn": (cnn, False, "diagonal"),
    "cnn_low_rank": (cnn, False, "low_rank"),  # dropout right before the classifier: a one-layer sweep
    "bayes_cnn": (bayes_cnn, True, "diagonal"),
    "bayes_cnn_low_rank": (bayes_cnn, True, "low_rank"),  # the same trained network (same seed)
    "mlp": (mlp, False, "diagonal"),
    "mlp_low_rank": (mlp, False, "low_rank"),
    "zoo_conv1d_cnn": (lambda: zoo("conv1d_cnn"), False, "diagonal"),
    "zoo_transformer": (lambda: zoo("transformer"), False, "diagonal"),
}


def train(model: nn.Module, data: MNIST1DDataModule, epochs: int, bayesian: bool) -> nn.Module:
    module = ClassifierModule(model, lr=3e-3, kl_weight=1.0 if bayesian else 0.0)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    return module.model.eval()


@torch.no_grad()
def sample(net: nn.Module, x: Tensor, n: int, bayesian: bool) -> Tensor:
    torch.manual_seed(0)
    if bayesian:
        return mc_bayesian_logits(net, x, n)
    if any(isinstance(m, nn.MultiheadAttention) for m in net.modules()):  # attention dropout is functional
        modes = {m: m.training for m in net.modules()}
        net.train()
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.eval()
        try:
            return torch.stack([net(x) for _ in range(n)])
        finally:
            for m, mode in modes.items():
                m.train(mode)
    return mc_dropout_logits(net, x, n, chunk=100)


def scores(probs: Tensor) -> dict[str, Tensor]:
    return {"entropy": U.predictive_entropy(probs.mean(0)), "mutual_information": U.mutual_information(probs)}


@torch.no_grad()
def fidelity(
    net: nn.Module, bayesian: bool, x: Tensor, y: Tensor, x_ood: Tensor, mc_samples: int, covariance: str
) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = MomentPropagationWrapper(net, softmax="logit_samples", covariance=covariance)
        mean, var = wrapper.moments(x)
        mean_ood, var_ood = wrapper.moments(x_ood)
    reference = sample(net, x, mc_samples, bayesian)
    mc_mean, mc_var = reference.mean(0), reference.var(0)
    ratio = (var / mc_var).flatten()
    mc100, mc100_ood = sample(net, x, 100, bayesian).softmax(-1), sample(net, x_ood, 100, bayesian).softmax(-1)
    probs = MF.softmax_probs(mean, var, method="logit_samples")
    row: dict[str, Any] = {
        "logit_mean_rel_l2": float((mean - mc_mean).norm() / mc_mean.norm()),
        "var_ratio_median": float(ratio.median()),
        "var_ratio_q05": float(ratio.quantile(0.05)),
        "var_ratio_q95": float(ratio.quantile(0.95)),
        "acc_mp": float((probs.argmax(-1) == y).float().mean()),
        "nll_mp": float(U.negative_log_likelihood(probs, y)),
        "nll_mc100": float(U.negative_log_likelihood(mc100.mean(0), y)),
    }
    row["nll_rel_diff"] = row["nll_mp"] / row["nll_mc100"] - 1.0
    mp_in, mp_out = wrapper.uncertainty(x), wrapper.uncertainty(x_ood)
    mc_in, mc_out = scores(mc100), scores(mc100_ood)
    # the converged reference: MC-100's AUROC has its own sampling error (the MI of a model with little
    # epistemic variance is a small difference of entropies), which the gap to MC-100 includes
    full_in, full_out = scores(reference.softmax(-1)), scores(sample(net, x_ood, mc_samples, bayesian).softmax(-1))
    # per input, the fidelity the AUROC (a ranking of two heavily overlapping sets) reflects only indirectly
    for split, mp, mc in (("in", mp_in, full_in), ("ood", mp_out, full_out)):
        row[f"mi_ratio_median_{split}"] = float((mp["mutual_information"] / mc["mutual_information"]).median())
    for name, key in (("entropy", "predictive_entropy"), ("mutual_information", "mutual_information")):
        row[f"auroc_{name}_mp"] = float(U.ood_auroc(mp_in[key], mp_out[key]))
        row[f"auroc_{name}_mc100"] = float(U.ood_auroc(mc_in[name], mc_out[name]))
        row[f"auroc_{name}_mc_full"] = float(U.ood_auroc(full_in[name], full_out[name]))
        row[f"auroc_{name}_gap"] = abs(row[f"auroc_{name}_mp"] - row[f"auroc_{name}_mc100"])
        row[f"auroc_{name}_gap_full"] = abs(row[f"auroc_{name}_mp"] - row[f"auroc_{name}_mc_full"])
    return row


@torch.no_grad()
def per_layer(net: nn.Sequential, bayesian: bool, x: Tensor, mc_samples: int, covariance: str) -> list[dict[str, Any]]:
    """Error at the output of every layer: the prefix network ``net[:k]`` against its own MC."""
    rows = []
    for k in range(1, len(net) + 1):
        prefix = net[:k]
        layer = net[k - 1]
        kind = type(layer.layer if isinstance(layer, NoKL) else layer).__name__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mean, var = MomentPropagationWrapper(prefix, covariance=covariance).moments(x)
        reference = sample(prefix, x, mc_samples, bayesian)
        mc_std, mc_var = reference.std(0), reference.var(0)
        keep = mc_var > 1e-8 * mc_var.max()  # units that never vary (e.g. always-zero ReLUs)
        if not keep.any():
            continue
        rows.append({
            "layer": k - 1, "type": kind,
            "mean_err_std_median": float(((mean - reference.mean(0)).abs() / mc_std)[keep].median()),
            "var_ratio_median": float((var / mc_var)[keep].median()),
            "var_ratio_q05": float((var / mc_var)[keep].quantile(0.05)),
            "var_ratio_q95": float((var / mc_var)[keep].quantile(0.95)),
        })  # fmt: skip
    return rows


@torch.no_grad()
def costs(net: nn.Module, bayesian: bool, batch: int, rounds: int, budget_s: float, covariance: str) -> dict[str, float]:
    x = torch.randn(batch, 1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = MomentPropagationWrapper(net, covariance=covariance)
    fns = {
        "deterministic": lambda: net(x),
        "moment_propagation": lambda: wrapper(x),
        "mc30": (lambda: mc_bayesian_logits(net, x, 30)) if bayesian else (lambda: mc_dropout_logits(net, x, 30)),
    }
    return cpu_time_per_call(fns, rounds, budget_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--part", choices=("all", "fidelity", "cost"), default="all",
        help="fidelity only, or cost only (run it under the timing lock; it updates the fidelity run's JSON)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, n_test, mc_samples, rounds, budget = (1, 64, 200, 2, 0.02) if args.quick else (10, 300, 2000, 3, 0.1)
    out = Path(args.out) if args.out else result_path("moment_propagation_fidelity.json", args.quick)
    if args.part == "cost":  # costs do not depend on the trained weights: untrained networks
        report = json.loads(out.read_text())
        for name, (build, bayesian, covariance) in MODELS.items():
            torch.manual_seed(0)
            report["models"][name].update(cost_entry(build().eval(), bayesian, rounds, budget, covariance))
        report["machine"] = machine_info()
        print_tables(report["models"], report["layer_types"])
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    data = MNIST1DDataModule(batch_size=100, ood="noise")
    data.setup()
    x, y = (t[:n_test] for t in data.dataset("test").tensors)
    x_ood = data.dataset("ood").tensors[0][:n_test]
    results: dict[str, Any] = {}
    layer_rows: list[dict[str, Any]] = []
    for name, (build, bayesian, covariance) in MODELS.items():
        torch.manual_seed(0)
        print(f"== {name}: training {epochs} epochs", flush=True)
        net = train(build(), data, epochs, bayesian)
        entry = fidelity(net, bayesian, x, y, x_ood, mc_samples, covariance)
        if args.part == "all":
            entry.update(cost_entry(net, bayesian, rounds, budget, covariance))
        if isinstance(net, nn.Sequential) and covariance in ("diagonal", "low_rank"):
            layers = per_layer(net, bayesian, x[:100], mc_samples // 4, covariance)
            entry["per_layer"] = layers
            suffix = "" if covariance == "diagonal" else f" ({covariance})"
            layer_rows += [{"model": name, **row, "type": row["type"] + suffix} for row in layers]
        results[name] = entry
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in layer_rows:
        by_type[row["type"]].append(row)
    layer_types = {
        kind: {
            "stages": len(rows),
            "mean_err_std_median": max(r["mean_err_std_median"] for r in rows),
            "var_ratio_median_min": min(r["var_ratio_median"] for r in rows),
            "var_ratio_median_max": max(r["var_ratio_median"] for r in rows),
        }
        for kind, rows in sorted(by_type.items())
    }
    print_tables(results, layer_types)
    report = {"goals": GOALS, "models": results, "layer_types": layer_types, "machine": machine_info(),
              "settings": {"epochs": epochs, "test_inputs": n_test, "mc_samples": mc_samples, "quick": args.quick}}  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def cost_entry(net: nn.Module, bayesian: bool, rounds: int, budget: float, covariance: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"cost_s": {f"batch{b}": costs(net, bayesian, b, rounds, budget, covariance) for b in (1, 128)}}
    for b, c in entry["cost_s"].items():
        entry[f"mp_over_det_{b}"] = c["moment_propagation"] / c["deterministic"]
        entry[f"mc30_over_mp_{b}"] = c["mc30"] / c["moment_propagation"]
    return entry


def print_tables(results: dict[str, Any], layer_types: dict[str, Any]) -> None:
    print("\nfidelity against MC (logit moments: 2000 samples; NLL and AUROC: MC-100)")
    print(f"{'model':<18}{'mean err':>9}{'var med':>9}{'var 5-95 %':>14}{'NLL MP':>8}{'NLL MC':>8}{'dNLL':>7}"
          f"{'AUROC H MP/MC':>15}{'AUROC MI MP/MC':>16}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<18}{r['logit_mean_rel_l2']:>8.1%} {r['var_ratio_median']:>8.2f}"
            f"{r['var_ratio_q05']:>7.2f}-{r['var_ratio_q95']:<5.2f}{r['nll_mp']:>9.3f}{r['nll_mc100']:>8.3f}"
            f"{r['nll_rel_diff']:>+7.1%}{r['auroc_entropy_mp']:>9.3f}/{r['auroc_entropy_mc100']:.3f}"
            f"{r['auroc_mutual_information_mp']:>10.3f}/{r['auroc_mutual_information_mc100']:.3f}"
            f"  (MC-full H {r['auroc_entropy_mc_full']:.3f}, MI {r['auroc_mutual_information_mc_full']:.3f}; "
            f"MI MP/MC {r['mi_ratio_median_in']:.2f} in, {r['mi_ratio_median_ood']:.2f} OOD)"
        )
    print("\ncost per call (ms) and ratios, eager, one thread")
    print(f"{'model':<18}{'batch':>6}{'det':>9}{'MP':>9}{'MC-30':>9}{'MP/det':>8}{'MC-30/MP':>10}")
    for name, r in results.items():
        for b, c in r.get("cost_s", {}).items():
            print(
                f"{name:<18}{b[5:]:>6}{c['deterministic'] * 1e3:>9.2f}{c['moment_propagation'] * 1e3:>9.2f}"
                f"{c['mc30'] * 1e3:>9.2f}{r[f'mp_over_det_{b}']:>7.1f}x{r[f'mc30_over_mp_{b}']:>9.1f}x"
            )
    print("\nper layer type (Sequential models): worst median |mean error| / MC std, range of variance-ratio medians")
    for kind, t in layer_types.items():
        print(f"{kind:<28}{t['stages']:>3} stages  {t['mean_err_std_median']:>6.3f}  "
              f"{t['var_ratio_median_min']:.2f}..{t['var_ratio_median_max']:.2f}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
