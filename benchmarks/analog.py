"""Analog-noise benchmark: naive vs noise-aware training, checked on aihwkit.

Trains four models (``--data digits``: LeNet-5 on the embedded digits, 8 px;
``--data mnist1d``: the MNIST-1D Conv1d CNN): naive, constant additive noise,
the VANT schedule (warm-up then per-sample σ) and PCM-drift-aware
(``PCMNoise()`` over 1 s-10 y). Then measures

(a) our noise sweep: accuracy under additive noise on every conv/linear output
    and ReLU, σ = 0 ... 1 (robustness = noisy / clean accuracy);
(b) aihwkit's PCM model (convert_to_analog, PCMLikeNoiseModel, global drift
    compensation) at 1 h, 1 d, 1 y, next to our ``PCMNoise()`` with its
    defaults (the prediction out of the box) at the same times;
(c) the training-step overhead of noise injection against plain training,
    timed side by side (interleaved steps, medians).

    .venv/bin/python benchmarks/analog.py                  # digits, full run (about 10 min on 2 busy cores)
    .venv/bin/python benchmarks/analog.py --data mnist1d   # MNIST-1D
    .venv/bin/python benchmarks/analog.py --data mnist1d --skip-timing --repeats 30 --aihwkit-repeats 30
                                                           # the MNIST-1D figures in docs/analog.md
    .venv/bin/python benchmarks/analog.py --quick          # smoke run
    .venv/bin/python benchmarks/analog.py --device cuda    # trained and timed on the GPU (analog_cuda.json)
    .venv/bin/python benchmarks/analog.py --timing-only    # (c) alone, merged into the file an accuracy run wrote
    .venv/bin/python benchmarks/analog.py --timing-only --against 5925b4a  # and an older revision's noise code beside it

Writes benchmarks/results/analog.json (``analog_mnist1d.json``) and analog_*.png
(``--quick``: under results/quick/).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from _machine import add_device_argument, check_device, device_info, machine_info, synchronize
from _results import result_path

from lightning_relief import AnalogNoiseStrategy, ClassifierModule
from lightning_relief.data import DigitsDataModule, MNIST1DDataModule
from lightning_relief.models import MNIST1DCNN, LeNet5
from lightning_relief.noise import (
    AdditiveGaussian,
    Constant,
    DeploymentTime,
    LinearWarmup,
    PCMNoise,
    PerSampleVariance,
    SequentialSchedule,
    evaluate_robustness,
)
from lightning_relief.noise.pcm import ONE_YEAR

SIGMA_TRAIN = 0.5
LEVELS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]
TIMES = [3600.0, 86400.0, ONE_YEAR]
SITES = ["outputs", "activations"]  # Walking Noise / VANT: after every conv/linear and every ReLU
PCM_SITES = ["weights", "outputs"]  # PCM conductances and the tile's output noise (PCMNoise's defaults)
DATA = {
    "digits": (lambda: DigitsDataModule(batch_size=64, size=8, seed=0), lambda: LeNet5(input_size=8, dropout=0.0)),
    "mnist1d": (lambda: MNIST1DDataModule(batch_size=100, seed=0), lambda: MNIST1DCNN()),
}


def strategies(steps_per_epoch: int, epochs: int) -> dict[str, AnalogNoiseStrategy | None]:
    warmup = max(1, int(0.3 * steps_per_epoch * epochs))
    vant = SequentialSchedule(
        [LinearWarmup(SIGMA_TRAIN, warmup_steps=warmup), PerSampleVariance(SIGMA_TRAIN, alpha=0.45, theta=0.33)],
        milestones=[warmup],
    )
    return {
        "naive": None,
        "constant": AnalogNoiseStrategy(AdditiveGaussian(), Constant(SIGMA_TRAIN), placement=SITES, log_level=False),
        "vant": AnalogNoiseStrategy(AdditiveGaussian(), vant, placement=SITES, log_level=False),
        "pcm_aware": AnalogNoiseStrategy(PCMNoise(), DeploymentTime(), placement=PCM_SITES, log_level=False),
    }


def train(name: str, strategy, epochs: int, digits, make_model, device: str = "cpu") -> tuple[ClassifierModule, float]:
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(make_model(), lr=1e-2)
    kwargs = {"strategy": strategy} if strategy is not None else {}
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        # CUDA's max-pool backward has no deterministic kernel: warn there instead of raising
        enable_model_summary=False,
        enable_progress_bar=True,
        deterministic=True if device == "cpu" else "warn",
        **kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, digits)
    return module.eval(), time.perf_counter() - start


def noise_at(rev: str):
    """``lightning_relief.noise`` as of git revision ``rev``, importable beside the current one (under
    another name), so old and new code are timed side by side in one process."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "lightning_relief/noise"], cwd=root, capture_output=True, check=True)
    name = "noise_at_" + re.sub(r"\W", "_", rev)
    tmp = Path(tempfile.mkdtemp())
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp, filter="data")
    package = (tmp / "lightning_relief" / "noise").rename(tmp / name)
    for source in package.glob("*.py"):
        source.write_text(source.read_text().replace("lightning_relief.noise", name))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def step_overhead(size: int, width: int, steps: int, device: str = "cpu", against=None) -> dict[str, dict[str, float]]:
    """Median time of one optimisation step of LeNet5(size px, width), configurations interleaved step by step;
    ``against``: the noise package of another revision (:func:`noise_at`), its configurations named ``*@rev``."""
    digits = DigitsDataModule(size=size, seed=0)
    x_all, y_all = digits.dataset("train").tensors
    batches = [(x_all[i : i + 64].to(device), y_all[i : i + 64].to(device)) for i in range(0, len(x_all) - 63, 64)]

    def specs(m) -> dict:
        vant = m.SequentialSchedule([m.LinearWarmup(SIGMA_TRAIN, 10), m.PerSampleVariance(SIGMA_TRAIN, 0.45, 0.33)], [10])
        return {
            "constant": (m.AdditiveGaussian(), m.Constant(SIGMA_TRAIN), SITES),
            "vant": (m.AdditiveGaussian(), vant, SITES),
            "pcm_aware": (m.PCMNoise(), m.DeploymentTime(), PCM_SITES),
        }

    import lightning_relief.noise as current

    configs = {"plain": None, **{name: (current, spec) for name, spec in specs(current).items()}}
    # the same with a fresh Gaussian per element (draws="fresh"): what the noise pool saves
    configs.update({f"{name}_fresh": (current, specs(current)[name]) for name in ("constant", "pcm_aware")})
    if against is not None:
        configs.update({f"{name}@{against.__name__[9:]}": (against, spec) for name, spec in specs(against).items()})
    runners = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = LeNet5(input_size=size, width=width, dropout=0.0).train().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        draws = "fresh" if name.endswith("_fresh") else "auto"
        injector = config[0].NoiseInjector(*config[1], draws=draws).attach(model) if config else None
        runners[name] = (model, optimizer, injector)
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for i in range(steps + 5):
        x, y = batches[i % len(batches)]
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            model, optimizer, injector = runners[name]
            synchronize(device)
            start = time.perf_counter()
            if injector is not None:
                injector.begin_training_step(len(x))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            if injector is not None:
                injector.deactivate()
            loss.backward()
            if injector is not None:
                injector.restore_weights()
            optimizer.step()
            synchronize(device)
            if i >= 5:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "overhead_pct": 100 * (statistics.median(t) / base - 1)}
        for name, t in times.items()
    }


def lightning_overhead(digits: DigitsDataModule, rounds: int, batches: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Wall time of a Lightning fit over the same batches, plain vs the strategy, alternating rounds."""

    def fit(strategy) -> float:
        L.seed_everything(0, verbose=False)
        module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), scheduler="none")
        kwargs = {"strategy": strategy} if strategy is not None else {}
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            **kwargs,
        )
        start = time.perf_counter()
        trainer.fit(module, digits)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "constant": [], "pcm_aware": []}
    for r in range(rounds):
        for name in list(times) if r % 2 == 0 else list(reversed(list(times))):
            strategy = {
                "plain": None,
                "constant": AnalogNoiseStrategy(AdditiveGaussian(), SIGMA_TRAIN, placement=SITES),
                "pcm_aware": AnalogNoiseStrategy(PCMNoise(), DeploymentTime(), placement=PCM_SITES),
            }[name]
            times[name].append(fit(strategy))
    base = statistics.median(times["plain"])
    return {
        name: {"median_s": statistics.median(t), "overhead_pct": 100 * (statistics.median(t) / base - 1)}
        for name, t in times.items()
    }


def timings(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Training-step overhead (8 px; 32 px, width 2) and Lightning fit overhead, on the digits."""
    against = noise_at(args.against) if args.against else None
    overhead = step_overhead(8, 1, steps=60 if args.quick else 300, device=args.device, against=against)
    overhead_32 = step_overhead(32, 2, steps=30 if args.quick else 150, device=args.device, against=against)
    timing_digits = DigitsDataModule(batch_size=64, size=8, seed=0)
    timing_digits.setup()
    fit_overhead = lightning_overhead(
        timing_digits, rounds=2 if args.quick else 5, batches=len(timing_digits.train_dataloader()), device=args.device
    )
    return overhead, overhead_32, fit_overhead


def timing_table(overhead: dict, overhead_32: dict, fit_overhead: dict):
    from rich.table import Table

    table = Table(title="(c) training-step time, interleaved (median)")
    table.add_column("config")
    table.add_column("8 px step ms", justify="right")
    table.add_column("overhead %", justify="right")
    table.add_column("32 px w2 step ms", justify="right")
    table.add_column("overhead %", justify="right")
    table.add_column("Lightning epoch s", justify="right")
    table.add_column("overhead %", justify="right")
    for name, v in overhead.items():
        f = fit_overhead.get(name)
        v32 = overhead_32[name]
        table.add_row(
            name,
            f"{v['median_ms']:.3f}",
            f"{v['overhead_pct']:+.1f}",
            f"{v32['median_ms']:.3f}",
            f"{v32['overhead_pct']:+.1f}",
            f"{f['median_s']:.3f}" if f else "-",
            f"{f['overhead_pct']:+.1f}" if f else "-",
        )
    return table


def timing_only(args: argparse.Namespace, console) -> int:
    """``--timing-only``: time the steps and merge them into the results file an accuracy run wrote."""
    load_before = os.getloadavg()
    overhead, overhead_32, fit_overhead = timings(args)
    console.print(timing_table(overhead, overhead_32, fit_overhead))
    out = result_path(f"analog{'' if args.device == 'cpu' else '_' + args.device}.json", args.quick)
    payload = json.loads(out.read_text()) if out.exists() else {"benchmark": "analog", "goals": {}}
    payload["step_overhead"] = {"lenet5_8px": overhead, "lenet5_32px_width2": overhead_32}
    payload["lightning_fit_overhead"] = fit_overhead
    payload["goals"]["step_overhead_pct"] = {n: v["overhead_pct"] for n, v in overhead.items() if n != "plain" and "@" not in n}
    payload["goals"]["step_overhead_pct_32px_width2"] = {
        n: v["overhead_pct"] for n, v in overhead_32.items() if n != "plain" and "@" not in n
    }
    command = "benchmarks/analog.py --timing-only" + (f" --against {args.against}" if args.against else "")
    payload["timing_run"] = {
        "command": command,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before_after": [load_before, os.getloadavg()],
        "machine": {**machine_info(), **device_info(args.device)},
    }
    out.write_text(json.dumps(payload, indent=2))
    console.print(payload["goals"])
    console.print(f"wrote {out}")
    return 0


def plot_sweeps(sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in sweeps.items():
        ax.plot(result["levels"], [100 * r for r in result["robustness"]], marker="o", label=name)
    ax.axhline(97, color="grey", linestyle=":", label="97 % goal")
    ax.axhline(80, color="grey", linestyle="--", label="80 %")
    ax.set_xlabel("σ of additive noise (every conv/linear output and ReLU)")
    ax.set_ylabel("noisy / clean accuracy (%)")
    ax.set_title("Digits LeNet-5 under analog noise")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_drift(drift: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in drift.items():
        for source, style in (("aihwkit", "-"), ("ours", "--")):
            if source in entry:
                ax.plot(
                    entry[source]["levels"],
                    [100 * a for a in entry[source]["accuracy_mean"]],
                    style,
                    marker="o",
                    label=f"{name} ({source})",
                )
    ax.set_xscale("log")
    ax.set_xlabel("time since programming (s)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("PCM drift with global compensation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (few epochs, repeats and steps)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument(
        "--repeats", type=int, default=None, help="noisy evaluations per level/time, ours (default 10; --quick 2)"
    )
    parser.add_argument("--aihwkit-repeats", type=int, default=None, help="programmed aihwkit chips (default 5; --quick 1)")
    parser.add_argument("--skip-timing", action="store_true", help="accuracy only (the step timings do not depend on --data)")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="the step timings only, merged into the results file of an earlier (--skip-timing) run",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        default=None,
        help="also time the noise code of git revision REV side by side (rows 'config@REV')",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (2 if args.quick else 20)
    repeats = args.repeats or (2 if args.quick else 10)
    aihw_repeats = args.aihwkit_repeats or (1 if args.quick else 5)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    if args.timing_only:
        return timing_only(args, console)
    make_data, make_model = DATA[args.data]
    digits = make_data()
    digits.setup()
    steps_per_epoch = len(digits.train_dataloader())

    models, train_s = {}, {}
    for name, strategy in strategies(steps_per_epoch, epochs).items():
        console.print(f"[bold]training {name}[/] ({epochs} epochs)")
        models[name], train_s[name] = train(name, strategy, epochs, digits, make_model, args.device)

    sweeps = {}
    for name, module in models.items():
        result = evaluate_robustness(
            module, digits, AdditiveGaussian(), levels=LEVELS, repeats=repeats, placement=SITES, show=False
        )
        sweeps[name] = result.to_dict()

    drift: dict[str, dict] = {}
    aihwkit_error = None
    for name, module in models.items():
        ours = evaluate_robustness(module, digits, PCMNoise(), times=TIMES, repeats=repeats, show=False)
        drift[name] = {"ours": ours.to_dict()}
    try:
        from lightning_relief.noise.aihwkit_backend import evaluate_aihwkit

        for name, module in models.items():
            console.print(f"aihwkit PCM: {name}")
            drift[name]["aihwkit"] = evaluate_aihwkit(module, digits, times=TIMES, repeats=aihw_repeats).to_dict()
            drift[name]["aihwkit_ideal_periphery"] = evaluate_aihwkit(
                module, digits, times=TIMES, repeats=aihw_repeats, ideal_periphery=True
            ).to_dict()
            drift[name]["aihwkit_unscaled_weights"] = evaluate_aihwkit(
                module, digits, times=TIMES, repeats=aihw_repeats, weight_scaling_omega=0.0
            ).to_dict()
    except ImportError as err:
        aihwkit_error = str(err)
        console.print(f"[red]aihwkit unavailable:[/] {err}")

    if args.skip_timing:
        overhead = overhead_32 = fit_overhead = {}
    else:
        console.print("timing training steps (interleaved)")
        overhead, overhead_32, fit_overhead = timings(args)

    # goals
    naive_rob = sweeps["naive"]["robustness"]
    hard = [i for i, r in enumerate(naive_rob) if r <= 0.80]
    goal_sigma = LEVELS[hard[0]] if hard else None
    goals = {
        "sigma_where_naive_at_most_80pct": goal_sigma,
        "robustness_at_that_sigma": {n: (s["robustness"][hard[0]] if hard else None) for n, s in sweeps.items()},
    }
    if "aihwkit" in drift["naive"]:
        goals["aihwkit_1y_minus_clean_points"] = {
            n: 100 * (d["aihwkit"]["accuracy_mean"][-1] - d["aihwkit"]["clean_accuracy"]) for n, d in drift.items()
        }
        # the prediction goal: PCMNoise() defaults vs aihwkit's preset, within 3 points at 1 h, 1 d, 1 y
        goals["ours_minus_aihwkit_points"] = {
            n: [100 * (o - a) for o, a in zip(d["ours"]["accuracy_mean"], d["aihwkit"]["accuracy_mean"])]
            for n, d in drift.items()
        }
        goals["max_abs_gap_points"] = max(abs(g) for gaps in goals["ours_minus_aihwkit_points"].values() for g in gaps)
        # the gap's own uncertainty: standard error of the difference of the two means (chips vary a lot)
        goals["ours_minus_aihwkit_standard_error_points"] = {
            n: [
                100 * (so**2 / d["ours"]["repeats"] + sa**2 / d["aihwkit"]["repeats"]) ** 0.5
                for so, sa in zip(d["ours"]["accuracy_std"], d["aihwkit"]["accuracy_std"])
            ]
            for n, d in drift.items()
        }
    goals["step_overhead_pct"] = {
        n: v["overhead_pct"] for n, v in overhead.items() if n != "plain" and "@" not in n
    }  # empty with --skip-timing
    goals["step_overhead_pct_32px_width2"] = {
        n: v["overhead_pct"] for n, v in overhead_32.items() if n != "plain" and "@" not in n
    }

    # tables
    table = Table(title="(a) robustness = noisy/clean accuracy under additive noise (%)")
    table.add_column("σ", justify="right")
    for name in sweeps:
        table.add_column(name, justify="right")
    for i, level in enumerate(LEVELS):
        table.add_row(f"{level:g}", *[f"{100 * sweeps[n]['robustness'][i]:.1f}" for n in sweeps])
    table.add_row("clean acc", *[f"{100 * sweeps[n]['clean_accuracy']:.2f}" for n in sweeps])
    console.print(table)
    table = Table(
        title="(b) PCM accuracy (%) after drift, global drift compensation "
        "(aihw: standard periphery, weights scaled to max 1; ideal: exact MVM; ω=0: raw weights)"
    )
    table.add_column("model")
    table.add_column("clean", justify="right")
    sources = ("ours", "aihwkit", "aihwkit_ideal_periphery", "aihwkit_unscaled_weights")
    short = {"ours": "ours", "aihwkit": "aihw", "aihwkit_ideal_periphery": "aihw ideal", "aihwkit_unscaled_weights": "aihw ω=0"}
    for source in sources:
        for t in ("1 h", "1 d", "1 y"):
            table.add_column(f"{short[source]} {t}", justify="right")
    for name, entry in drift.items():
        cells = [name, f"{100 * entry['ours']['clean_accuracy']:.2f}"]
        for source in sources:
            cells += [f"{100 * a:.2f}" for a in entry[source]["accuracy_mean"]] if source in entry else ["-"] * 3
        table.add_row(*cells)
    console.print(table)
    if overhead:
        console.print(timing_table(overhead, overhead_32, fit_overhead))
    console.print(goals)

    suffix = "" if args.data == "digits" else f"_{args.data}"
    plot_sweeps(sweeps, result_path(f"analog{suffix}_noise_sweep.png", args.quick))
    plot_drift(drift, result_path(f"analog{suffix}_pcm_drift.png", args.quick))
    import lightning_relief

    try:
        import aihwkit

        aihwkit_version = aihwkit.__version__
    except ImportError:
        aihwkit_version = None
    from importlib import metadata

    try:
        tvm_version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        tvm_version = None
    payload = {
        "benchmark": "analog",
        "quick": args.quick,
        "machine": {**machine_info(), **device_info(args.device)},
        "versions": {
            "torch": torch.__version__,
            "lightning": L.__version__,
            "aihwkit": aihwkit_version,
            "tvm": tvm_version,
            "lightning_relief": lightning_relief.__version__,
        },
        "setup": {
            "model": type(make_model()).__name__,
            "data": args.data,
            "epochs": epochs,
            "sigma_train": SIGMA_TRAIN,
            "noise_sites": SITES,
            "pcm_sites": PCM_SITES,
            "pcm": repr(PCMNoise()),
            "sweep_repeats": repeats,
            "aihwkit_repeats": aihw_repeats,
        },
        "train_seconds": train_s,
        "noise_sweep": sweeps,
        "pcm_drift": drift,
        "aihwkit_error": aihwkit_error,
        "step_overhead": {"lenet5_8px": overhead, "lenet5_32px_width2": overhead_32},
        "lightning_fit_overhead": fit_overhead,
        "goals": goals,
    }
    out = result_path(f"analog{suffix}{'' if args.device == 'cpu' else '_' + args.device}.json", args.quick)
    out.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
