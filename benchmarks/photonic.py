"""Photonic sampler layers: sampling throughput and uncertainty quality on the digits.

1. Throughput at K = 32 samples per input, LeNet-5 (8 px) with every conv and
   linear layer photonic, or only its three classifier layers (then the conv
   features run once per input in ``local``/``exact batched``, K times in the
   naive loop), side by side in one process:
   - ``local``: our default, local reparameterization, all K samples in one batch;
   - ``exact batched``: our exact path, K weight realizations in one grouped conv / bmm;
   - ``naive loop``: for each of the K samples, draw every layer's weights and
     run the plain network (the usual per-sample weight-sampling loop).
   Reported as probabilistic predictions (K samples each) per second, beside the
   rate the modelled chip would deliver (:class:`ChipModel`, 70.4 GS/s).
2. Quality: LeNet-5 trained on the digits as a photonic BNN (all layers or
   the classifier layers photonic, three bandwidth ratios), with MC dropout
   (K = 32, three rates) and a deep ensemble of 5; NLL, ECE,
   accuracy on the test split and OOD AUROC (rotated 90°, Gaussian noise,
   inverted test images) scored by predictive entropy and by mutual information.

Every photonic and MC-dropout configuration is trained with 3 seeds (OOD
AUROC varies a lot with the initialization on this small data set); each
family's configuration is chosen by its mean validation NLL. Run: ``.venv/bin/python benchmarks/photonic.py`` (about 5 min on 2 cores), or
``--quick`` for a smoke run. Writes ``benchmarks/results/photonic.json`` and
``photonic_entropy.png`` (entropy histograms in vs out of distribution).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import add_device_argument, check_device, device_info, machine_info, synchronize
from _results import result_path
from torch import nn

from lightning_relief.data import DigitsDataModule
from lightning_relief.models import LeNet5
from lightning_relief.nn.photonic import PhotonicSamplerLayer
from lightning_relief.photonic import ChipModel, PhotonicNetwork, convert_to_photonic, crossbar_passes, sample_logits
from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.ensemble import EnsembleModel

K = 32
OOD_KINDS = ("rotate", "noise", "invert")
CLASSIFIER = ["classifier.1", "classifier.4", "classifier.7"]  # LeNet5's linear layers


# ---------------------------------------------------------------- throughput


def _naive_sampler(photonic: nn.Module, plain: nn.Module):
    """K forward passes of ``plain``, each with freshly drawn weights for every photonic layer."""
    pairs = [
        (plain.get_submodule(name), layer) for name, layer in photonic.named_modules() if isinstance(layer, PhotonicSamplerLayer)
    ]
    for module, layer in pairs:
        module.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for _ in range(K):
            for module, layer in pairs:
                module.weight = nn.Parameter(layer.sample_weights(1)[0], requires_grad=False)
            outs.append(plain(x))
        return torch.stack(outs)

    return run


def _time(fn, x: torch.Tensor, repeats: int, min_time: float) -> float:
    """Median seconds per call over ``repeats`` rounds, each at least ``min_time`` long (up to x's device's last kernel)."""
    fn(x)  # warm up
    rounds = []
    for _ in range(repeats):
        synchronize(x.device)
        calls, start = 0, time.perf_counter()
        while True:
            fn(x)
            calls += 1
            synchronize(x.device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rounds.append(elapsed / calls)
    return statistics.median(rounds)


def throughput(batch_sizes: list[int], repeats: int, min_time: float, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    plain = LeNet5(input_size=8).eval().to(device)
    chip = ChipModel()
    rows, hardware = [], {}
    for where, layers in (("all layers", None), ("classifier", CLASSIFIER)):
        local = convert_to_photonic(plain, layers, bandwidth_ratio=0.02).eval()
        exact = convert_to_photonic(plain, layers, bandwidth_ratio=0.02, sampling="exact").eval()
        exact.load_state_dict(local.state_dict())
        naive = _naive_sampler(local, copy.deepcopy(plain))
        methods = {
            "local": lambda x, m=local: sample_logits(m, x, K),
            "exact batched": lambda x, m=exact: sample_logits(m, x, K),
            "naive loop": naive,
        }
        with torch.no_grad():
            for n in batch_sizes:
                x = torch.randn(n, 1, 8, 8, device=device)
                seconds = {name: _time(fn, x, repeats, min_time) for name, fn in methods.items()}
                for name, s in seconds.items():
                    rows.append(
                        {
                            "photonic_layers": where,
                            "batch": n,
                            "method": name,
                            "ms_per_batch": 1e3 * s,
                            "predictions_per_s": n / s,
                            "samples_per_s": n * K / s,
                            "speedup_vs_naive": seconds["naive loop"] / s,
                        }
                    )
        passes = crossbar_passes(local, (1, 8, 8), chip)
        hardware[where] = {
            "crossbar_passes_per_network_sample": passes,
            "network_samples_per_s": chip.network_samples_per_second(passes),
            "predictions_per_s": chip.network_samples_per_second(passes) / K,
        }
    return {
        "samples_per_prediction": K,
        "model": "LeNet5(input_size=8); photonic: all 5 layers, or the 3 classifier layers",
        "rows": rows,
        "chip": {
            "channels": chip.channels,
            "channel_rate_hz": chip.channel_rate_hz,
            "rows": chip.rows,
            "cols": chip.cols,
            "samples_per_s": chip.sample_rate_hz,
        },
        "hardware": hardware,
    }


# ------------------------------------------------------------------ quality


def _train(model: nn.Module, dm: DigitsDataModule, epochs: int, seed: int) -> nn.Module:
    """The ClassifierModule recipe in a plain loop: Adam 1e-2, weight decay 5e-4, cosine, cross-entropy."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    x_all, y_all = dm.dataset("train").tensors
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for idx in order.split(dm.batch_size):
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def _mc_dropout_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    with torch.no_grad():
        probs = torch.stack([model(x).softmax(-1) for _ in range(K)])
    model.eval()
    return probs


def _scores(member_probs: torch.Tensor, y: torch.Tensor | None) -> dict:
    mean = member_probs.mean(0)
    out = {"entropy": U.predictive_entropy(mean), "mi": U.mutual_information(member_probs)}
    if y is not None:
        out["metrics"] = {
            "acc": float((mean.argmax(-1) == y).float().mean()),
            "nll": float(U.negative_log_likelihood(mean, y)),
            "ece": float(U.expected_calibration_error(mean, y)),
        }
    return out


def _photonic(layers: list[str] | None, ratio: float, dm: DigitsDataModule, epochs: int):
    def build(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        net = PhotonicNetwork(LeNet5(input_size=8, dropout=0.0), layers=layers, bandwidth_ratio=ratio, num_samples=K)
        net = _train(net, dm, epochs, seed)

        def probs(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sample_logits(net.model, x, K, seed=seed + 1000).softmax(-1)

        return probs

    return build


def _dropout(p: float, dm: DigitsDataModule, epochs: int):
    def build(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        net = _train(LeNet5(input_size=8, dropout=p), dm, epochs, seed)
        generator = torch.Generator().manual_seed(seed + 1000)

        def probs(x: torch.Tensor) -> torch.Tensor:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(generator.get_state())
                out = _mc_dropout_probs(net, x)
                generator.set_state(torch.get_rng_state())
            return out

        return probs

    return build


def _ensemble(members: int, dm: DigitsDataModule, epochs: int):
    def build(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        nets = []
        for member in range(members):
            torch.manual_seed(seed * members + member)
            nets.append(_train(LeNet5(input_size=8), dm, epochs, seed * members + member))
        ensemble = EnsembleModel(nets).eval()

        def probs(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return ensemble.member_probs(x)

        return probs

    return build


def quality(epochs: int, members: int, ratios: list[float], dropouts: list[float], seeds: int, plot_dir: Path | None) -> dict:
    """Train every configuration with ``seeds`` seeds (the ensemble once); per family pick the
    configuration with the lowest mean validation NLL."""
    dms = {kind: DigitsDataModule(batch_size=64, size=8, seed=0, ood=kind) for kind in OOD_KINDS}
    for dm in dms.values():
        dm.setup()
    dm = dms["rotate"]  # train/val/test are the same in every one of them
    x_val, y_val = dm.dataset("val").tensors
    x_test, y_test = dm.dataset("test").tensors
    ood = {kind: d.dataset("ood").tensors[0] for kind, d in dms.items()}

    # name -> (family, settings, build(seed) -> probability function giving [K, N, C])
    configs: dict[str, tuple[str, dict, Callable]] = {}
    for where, layers in (("all layers", None), ("classifier", CLASSIFIER)):
        for ratio in ratios:
            settings = {"photonic_layers": where, "bandwidth_ratio": ratio, "relative_spread": math.sqrt(2 * ratio)}
            configs[f"photonic {where}, f_e/f_o={ratio:g}"] = ("photonic", settings, _photonic(layers, ratio, dm, epochs))
    for p in dropouts:
        configs[f"MC dropout p={p:g}"] = ("mc_dropout", {"p": p}, _dropout(p, dm, epochs))
    configs[f"deep ensemble x{members}"] = ("ensemble", {"members": members}, _ensemble(members, dm, epochs))

    def evaluate(probs_fn: Callable) -> dict:
        val = _scores(probs_fn(x_val), y_val)["metrics"]
        in_dist = _scores(probs_fn(x_test), y_test)
        row = {**in_dist["metrics"], "val_nll": val["nll"], "ood_auroc": {}}
        for kind, x_ood in ood.items():
            out = _scores(probs_fn(x_ood), None)
            row["ood_auroc"][kind] = {score: float(U.ood_auroc(in_dist[score], out[score])) for score in ("entropy", "mi")}
            if kind == "rotate":
                row["_hist"] = (in_dist["entropy"], out["entropy"])
        row["ood_auroc_mean"] = {
            score: statistics.mean(v[score] for v in row["ood_auroc"].values()) for score in ("entropy", "mi")
        }
        return row

    results, histograms = {}, {}
    for name, (family, settings, build) in configs.items():
        runs = []
        for seed in range(1 if family == "ensemble" else seeds):
            start = time.perf_counter()
            probs_fn = build(seed)
            train_s = time.perf_counter() - start
            runs.append({**evaluate(probs_fn), "train_s": train_s})
        histograms[name] = runs[0].pop("_hist")
        for run in runs[1:]:
            del run["_hist"]
        results[name] = {"family": family, **settings, "seeds": len(runs), **_aggregate(runs), "runs": runs}
    selected = {
        family: min((n for n, r in results.items() if r["family"] == family), key=lambda n: results[n]["val_nll"])
        for family in ("photonic", "mc_dropout", "ensemble")
    }
    if plot_dir is not None:
        _plot({name: histograms[name] for name in selected.values()}, plot_dir / "photonic_entropy.png")
    return {
        "epochs": epochs,
        "samples": K,
        "model": "LeNet5(input_size=8)",
        "data": "digits 8 px; test split (270) vs OOD copies of it: " + ", ".join(OOD_KINDS),
        "seeds": seeds,
        "selection": f"per family, the configuration with the lowest validation NLL averaged over {seeds} seeds "
        "(the ensemble: one seed of its members)",
        "selected": selected,
        "methods": results,
    }


def _aggregate(runs: list[dict]) -> dict:
    """Means over seeds of every figure, and the spread of the OOD AUROC."""

    def mean(get):
        return statistics.mean(get(r) for r in runs)

    out = {key: mean(lambda r, key=key: r[key]) for key in ("acc", "nll", "ece", "val_nll", "train_s")}
    out["ood_auroc"] = {
        kind: {score: mean(lambda r, kind=kind, score=score: r["ood_auroc"][kind][score]) for score in ("entropy", "mi")}
        for kind in OOD_KINDS
    }
    out["ood_auroc_mean"] = {score: mean(lambda r, score=score: r["ood_auroc_mean"][score]) for score in ("entropy", "mi")}
    values = [r["ood_auroc_mean"]["entropy"] for r in runs]
    out["ood_auroc_mean_entropy_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _plot(histograms: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(3.2 * len(histograms), 2.8), sharey=True)
    bins = torch.linspace(0, math.log(10), 30).numpy()
    for ax, (name, (h_in, h_out)) in zip(axes, histograms.items()):
        ax.hist(h_in.numpy(), bins=bins, alpha=0.6, density=True, label="test")
        ax.hist(h_out.numpy(), bins=bins, alpha=0.6, density=True, label="rotated 90°")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("predictive entropy (nats)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- report


def _print(report: dict) -> None:
    tp = report["throughput"]
    print(f"\nThroughput at K={K} ({tp['model']}), CPU, {report['machine']['torch_threads']} thread(s)")
    print(
        f"{'photonic':<11} {'batch':>5}  {'method':<14} {'ms/batch':>10} {'predictions/s':>14} {'samples/s':>12} {'vs naive':>9}"
    )
    for r in tp["rows"]:
        print(
            f"{r['photonic_layers']:<11} {r['batch']:>5}  {r['method']:<14} {r['ms_per_batch']:>10.2f} "
            f"{r['predictions_per_s']:>14.1f} {r['samples_per_s']:>12.0f} {r['speedup_vs_naive']:>8.1f}x"
        )
    chip = tp["chip"]
    print(f"modelled chip: {chip['samples_per_s'] / 1e9:.1f} G crossbar samples/s ({chip['rows']}x{chip['cols']} tiles)")
    for where, hw in tp["hardware"].items():
        print(
            f"  {where}: {hw['crossbar_passes_per_network_sample']} passes per network sample -> "
            f"{hw['network_samples_per_s']:.3g} network samples/s = {hw['predictions_per_s']:.3g} predictions/s at K={K}"
        )
    q = report["quality"]
    print(
        f"\nQuality on digits ({q['epochs']} epochs, K={K}, means over {q['seeds']} seeds; "
        "OOD AUROC by entropy / mutual information; * = selected by val NLL)"
    )
    header = f"{'method':<40} {'valNLL':>7} {'acc':>6} {'NLL':>7} {'ECE':>7}" + "".join(f" {k:>13}" for k in OOD_KINDS)
    print(header + f" {'mean (± std over seeds)':>25}")
    chosen = set(q["selected"].values())
    for name, r in q["methods"].items():
        aurocs = "".join(f" {r['ood_auroc'][k]['entropy']:>6.3f}/{r['ood_auroc'][k]['mi']:<6.3f}" for k in OOD_KINDS)
        mean = r["ood_auroc_mean"]
        label = ("* " if name in chosen else "  ") + name
        print(
            f"{label:<40} {r['val_nll']:>7.4f} {r['acc']:>6.3f} {r['nll']:>7.4f} {r['ece']:>7.4f}{aurocs} "
            f"{mean['entropy']:>6.3f}/{mean['mi']:<6.3f} ±{r['ood_auroc_mean_entropy_std']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs, members, repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the numbers compare side by side)")
    parser.add_argument("--out", type=Path, default=None, help="default results/photonic.json (--quick: results/quick/)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = check_device(args.device).type
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.out = args.out or result_path("photonic.json" if device == "cpu" else f"photonic_{device}.json", quick)
    report = {
        "benchmark": "photonic",
        "quick": quick,
        "machine": {**machine_info(), **device_info(device)},  # --device: the throughput rows; quality is trained on the CPU
        "throughput": throughput(
            [1, 16] if quick else [1, 16, 256], repeats=3 if quick else 5, min_time=0.05 if quick else 0.3, device=device
        ),
        "quality": quality(
            epochs=2 if quick else 15,
            members=2 if quick else 5,
            ratios=[0.08] if quick else [0.02, 0.08, 0.167],
            dropouts=[0.25] if quick else [0.1, 0.25, 0.5],
            seeds=2 if quick else 3,
            plot_dir=args.out.parent,
        ),
    }
    rows = report["throughput"]["rows"]
    local_k32 = {f"{r['photonic_layers']}, batch {r['batch']}": r["speedup_vs_naive"] for r in rows if r["method"] == "local"}
    q = report["quality"]
    photonic, dropout = (q["methods"][q["selected"][f]]["ood_auroc_mean"]["entropy"] for f in ("photonic", "mc_dropout"))
    report["goals"] = {
        "throughput_10x_naive_at_K32": {key: s >= 10 for key, s in local_k32.items()},
        "ood_auroc_at_least_mc_dropout (selected configs, mean over OOD sets and seeds, entropy score)": photonic >= dropout,
    }
    _print(report)
    print("\ngoals:", json.dumps(report["goals"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
