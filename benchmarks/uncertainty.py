"""Uncertainty baselines on the digits with held-out classes as OOD.

Rows: single model, MC dropout (x30), deep ensemble x5 trained vectorized, the
same ensemble trained sequentially (a loop over members in each step), the same
members trained as 5 separate fits, and a bayesian-torch BNN (MC x30 and mean
weights); the single model and the vectorized ensemble also temperature-scaled
(``..._ts``: T fitted on the validation set). Then the same calibration and
fit-time comparison on MNIST-1D with its CNN (``mnist1d_...`` rows). Columns: accuracy, NLL, ECE (15 bins), Brier, OOD AUROC/AUPR/FPR@95
(predictive entropy as the score), training seconds per epoch and inference
latency. Training times are taken side by side in this one run (same process,
same threads) and compared as ratios.

    python benchmarks/uncertainty.py            # full run (15 epochs)
    python benchmarks/uncertainty.py --quick    # smoke run (2 epochs, fewer samples)
    python benchmarks/uncertainty.py --device cuda   # training on the GPU, timed in wall seconds (uncertainty_cuda.json)

Writes benchmarks/results/uncertainty.json and reliability diagrams (PNG) next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import add_device_argument, check_device, device_info, machine_info, synchronize  # noqa: E402
from _results import result_path  # noqa: E402

from lightning_relief import ClassifierModule, DeepEnsembleStrategy, DigitsDataModule, MNIST1DDataModule  # noqa: E402
from lightning_relief.bayes import BayesianModel, mc_predict, predict_mean  # noqa: E402
from lightning_relief.models import MLP, MNIST1DCNN, LeNet5  # noqa: E402
from lightning_relief.uncertainty import EnsembleModel, plot_reliability_diagram  # noqa: E402
from lightning_relief.uncertainty import functional as U  # noqa: E402
from lightning_relief.uncertainty.sampling import MemberBatchSampler  # noqa: E402
from lightning_relief.uncertainty.stacking import reinitialize  # noqa: E402
from lightning_relief.uncertainty.temperature import NotIdentifiableError, fit_temperature  # noqa: E402

DEVICE = "cpu"  # --device: where the models train


class EpochTimer(L.Callback):
    """Wall and process CPU time of each training epoch (validation is off in these runs).

    On a shared machine other processes stretch wall time unevenly between the
    runs being compared; the process's CPU time counts only our own work, so the
    ratios use it (torch runs one thread, see --threads) and wall time is reported
    beside it.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(DEVICE)
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(DEVICE)  # the epoch's kernels are its time too
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    @staticmethod
    def _typical(times: list[float]) -> float:
        # the first epoch pays for warm-up (allocations, caches): leave it out when we can
        return statistics.median(times[1:] if len(times) > 1 else times)

    def per_epoch(self) -> float:
        """Median CPU seconds per epoch; on a GPU wall seconds (CPU time there counts only the kernel launches)."""
        return self._typical(self.cpu if DEVICE == "cpu" else self.wall)

    def per_epoch_wall(self) -> float:
        return self._typical(self.wall)


class FitTimer(L.Callback):
    """CPU and wall seconds of the whole ``fit`` (data set-up, loops, optimizer steps), as a user sees it."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(DEVICE)
        self.wall = time.perf_counter() - self._start[0]
        self.cpu = time.process_time() - self._start[1]


def _temperature_scaled(module: torch.nn.Module, x_val: Tensor, y_val: Tensor) -> tuple[Callable[[Tensor], Tensor], float | None]:
    """``softmax(module(x) / T)`` with T fitted on the validation set (what ``TemperatureScaling`` does);
    T is None, and the module left unscaled, when it gets every validation sample right."""
    with torch.no_grad():
        try:
            temperature = float(fit_temperature(module(x_val), y_val))
        except NotIdentifiableError:
            return (lambda x: module(x).softmax(-1)), None
    return (lambda x: (module(x) / temperature).softmax(-1)), temperature


def _scaled_note(what: str, temperature: float | None) -> str:
    if temperature is None:
        return f"{what}: no validation errors, T not identifiable, left unscaled (as TemperatureScaling does)"
    return f"{what}, temperature-scaled (T={temperature:.3f})"


def _step_profile(
    module: ClassifierModule, x: Tensor, y: Tensor, members: int, steps: int, vmap: bool = False
) -> dict[str, float]:
    """Median CPU ms of forward, backward and Adam step of one training step as the strategy runs it
    (``members`` batches concatenated, member forward in "members" mode; 0 members: the plain module).
    ``vmap``: the members run through torch.func.vmap rather than folded into the batch."""
    from lightning_relief.uncertainty.stacking import member_forward

    module.train()
    if vmap:
        member_forward(module).folding = {(False, x.dtype): False}
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    copies = max(members, 1)
    xb, yb = torch.cat([x] * copies), torch.cat([y] * copies)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(steps):
        start = time.process_time()
        if members:
            with member_forward(module).using("members"):
                loss = torch.nn.functional.cross_entropy(module(xb), yb) * members
        else:
            loss = torch.nn.functional.cross_entropy(module(xb), yb)
        forward = time.process_time()
        optimizer.zero_grad()
        loss.backward()
        backward = time.process_time()
        optimizer.step()
        times["forward"].append(forward - start)
        times["backward"].append(backward - forward)
        times["optimizer"].append(time.process_time() - backward)
    return {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}


def _trainer(epochs: int, timer: EpochTimer, **kwargs: Any) -> L.Trainer:
    # with --device cuda only training runs there: Lightning's teardown moves the module back to the CPU,
    # where its predictions, latencies and step profile are measured as in a CPU run
    return L.Trainer(
        accelerator=DEVICE,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, *kwargs.pop("callbacks", [])],
        **kwargs,
    )


def _lenet(size: int) -> LeNet5:
    return LeNet5(input_size=size, dropout=0.25)


def _classifier(model: torch.nn.Module, lr: float) -> ClassifierModule:
    return ClassifierModule(model, lr=lr, optimizer="adam", scheduler="cosine")


def _latency_ms(fn: Callable[[Tensor], Tensor], x: Tensor, repeat: int) -> float:
    """Median CPU milliseconds of one call (see EpochTimer for why CPU time)."""
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeat):
            start = time.process_time()
            fn(x)
            times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def _scores(probs_in: Tensor, target: Tensor, probs_out: Tensor) -> dict[str, float]:
    probs_in, probs_out = probs_in.double(), probs_out.double()
    score_in, score_out = U.predictive_entropy(probs_in), U.predictive_entropy(probs_out)
    return {
        "accuracy": float((probs_in.argmax(-1) == target).double().mean()),
        "nll": float(U.negative_log_likelihood(probs_in, target)),
        "ece": float(U.expected_calibration_error(probs_in, target)),
        "brier": float(U.brier_score(probs_in, target)),
        "ood_auroc": float(U.ood_auroc(score_in, score_out)),
        "ood_aupr": float(U.ood_aupr(score_in, score_out)),
        "fpr95": float(U.fpr_at_95_tpr(score_in, score_out)),
    }


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def _calibration_over_seeds(
    args: argparse.Namespace,
    m1d: MNIST1DDataModule,
    rows: dict[str, dict[str, Any]],
    probs: dict[str, Tensor],
    seeds: int,
) -> dict[str, Any]:
    """ECE and NLL of the single model and the ensemble, raw and temperature-scaled, over training seeds
    (seed 0 is the main run), and the test-set bootstrap spread of seed 0's ECE gap."""
    x_test, y_test = m1d.dataset("test").tensors
    x_val, y_val = m1d.dataset("val").tensors
    names = ("single", "single_ts", "vectorized", "vectorized_ts")
    values = {name: {"ece": [rows[name]["ece"]], "nll": [rows[name]["nll"]]} for name in names}
    for seed in range(1, seeds):
        for mode in ("single", "vectorized"):
            L.seed_everything(seed, verbose=False)
            module = _classifier(MNIST1DCNN(dropout=0.1), args.lr)
            # member g of this run starts from seed*members + g: no member init is shared between runs
            strategy = "auto" if mode == "single" else DeepEnsembleStrategy(num_members=args.members, seed=seed * args.members)
            _trainer(args.epochs, EpochTimer(), strategy=strategy).fit(module, m1d)
            module.eval()
            with torch.no_grad():  # the ensemble returns its mixture's log-probabilities: softmax gives the mixture
                logits = module(x_test)
                temperature = fit_temperature(module(x_val), y_val)
            for name, p in ((mode, logits.softmax(-1)), (f"{mode}_ts", (logits / temperature).softmax(-1))):
                values[name]["ece"].append(float(U.expected_calibration_error(p.double(), y_test)))
                values[name]["nll"].append(float(U.negative_log_likelihood(p.double(), y_test)))
    out: dict[str, Any] = {name: {k: _mean_std(v) for k, v in row.items()} for name, row in values.items()}
    for name, other in (
        ("ece_gap_scaled_ensemble_minus_single", "single"),
        ("ece_gap_scaled_ensemble_minus_scaled_single", "single_ts"),
    ):
        out[name] = _mean_std([a - b for a, b in zip(values["vectorized_ts"]["ece"], values[other]["ece"])])
    out["seed0_gap_bootstrap_std"] = _ece_gap_bootstrap_std(probs["vectorized_ts"], probs["single"], y_test)
    return out


def _ece_gap_bootstrap_std(probs_a: Tensor, probs_b: Tensor, target: Tensor, resamples: int = 200) -> float:
    """Standard deviation of ``ECE(a) - ECE(b)`` over bootstrap resamples of the test set."""
    generator = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(resamples):
        index = torch.randint(len(target), (len(target),), generator=generator)
        ece_a = U.expected_calibration_error(probs_a[index].double(), target[index])
        gaps.append(float(ece_a - U.expected_calibration_error(probs_b[index].double(), target[index])))
    return statistics.stdev(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 5 MC samples, few repeats")
    add_device_argument(parser)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="training seeds of the MNIST-1D calibration study")
    parser.add_argument("--mc-samples", type=int, default=30)
    parser.add_argument("--size", type=int, default=8, choices=(8, 16, 32), help="digit image size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/results; results/quick with --quick)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.mc_samples = 2, 5
    if args.out is None:
        args.out = result_path("", args.quick)
    repeat = 5 if args.quick else 30
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    global DEVICE
    DEVICE = check_device(args.device).type

    dm = DigitsDataModule(batch_size=64, size=args.size, seed=0, ood="heldout", heldout_classes=(8, 9))
    dm.setup()
    x_test, y_test = dm.dataset("test").tensors
    x_ood = dm.dataset("ood").tensors[0]
    x_one, x_batch = x_test[:1], x_test[:64]
    results: dict[str, dict[str, Any]] = {}
    probs_for_plot: dict[str, Tensor] = {}

    def record(name: str, predict: Callable[[Tensor], Tensor], train_s: float, note: str, wall_s: float = float("nan")) -> None:
        with torch.no_grad():
            p_in, p_out = predict(x_test), predict(x_ood)
        row = _scores(p_in, y_test, p_out)
        row["train_s_per_epoch"] = train_s
        row["train_wall_s_per_epoch"] = wall_s
        row["latency_ms_batch1"] = _latency_ms(predict, x_one, repeat)
        row["ms_per_example_batch64"] = _latency_ms(predict, x_batch, max(3, repeat // 3)) / len(x_batch)
        row["note"] = note
        results[name] = row
        probs_for_plot[name] = p_in
        print(f"  {name}: acc {row['accuracy']:.4f}  nll {row['nll']:.4f}  auroc {row['ood_auroc']:.4f}", flush=True)

    # -- single model, and MC dropout on the same weights
    print(f"[1/5] single LeNet-5, {args.epochs} epochs", flush=True)
    L.seed_everything(0, verbose=False)
    single = _classifier(_lenet(args.size), args.lr)
    timer, fit_timers = EpochTimer(), {"single": FitTimer()}
    _trainer(args.epochs, timer, callbacks=[fit_timers["single"]]).fit(single, dm)
    single.eval()
    single_epoch, single_wall = timer.per_epoch(), timer.per_epoch_wall()
    record("single", lambda x: single(x).softmax(-1), single_epoch, "one LeNet-5", single_wall)
    x_val, y_val = dm.dataset("val").tensors
    predict, temperature = _temperature_scaled(single, x_val, y_val)
    record("single_ts", predict, single_epoch, _scaled_note("the single model", temperature), single_wall)
    record(
        f"mc_dropout_x{args.mc_samples}",
        lambda x: mc_predict(single, x, args.mc_samples, mc_dropout=True)[0],
        single_epoch,
        "the single model's weights; dropout on at prediction",
        single_wall,
    )

    # -- deep ensembles: vectorized and sequential strategy modes
    ensembles: dict[str, ClassifierModule] = {}
    epoch_times: dict[str, float] = {}
    for step, mode in ((2, "vectorized"), (3, "sequential")):
        print(f"[{step}/5] deep ensemble x{args.members}, {mode}", flush=True)
        L.seed_everything(0, verbose=False)
        module = _classifier(_lenet(args.size), args.lr)
        timer, fit_timers[mode] = EpochTimer(), FitTimer()
        _trainer(
            args.epochs, timer, callbacks=[fit_timers[mode]], strategy=DeepEnsembleStrategy(num_members=args.members, mode=mode)
        ).fit(module, dm)
        module.eval()
        ensembles[mode] = module
        epoch_times[mode] = timer.per_epoch()
        record(
            f"ensemble_x{args.members}_{mode}",
            lambda x, m=module: m(x).exp(),
            epoch_times[mode],
            f"DeepEnsembleStrategy(mode={mode!r})",
            timer.per_epoch_wall(),
        )
        if mode == "vectorized":
            predict, temperature = _temperature_scaled(module, x_val, y_val)
            record(
                f"ensemble_x{args.members}_vectorized_ts",
                predict,
                epoch_times[mode],
                _scaled_note("the vectorized ensemble's mixture", temperature),
                timer.per_epoch_wall(),
            )

    # -- the same members trained as separate fits, one after another
    print(f"[4/5] the same {args.members} members as separate fits", flush=True)
    members, separate, separate_wall = [], 0.0, 0.0
    train_set = dm.dataset("train")
    for member in range(args.members):
        L.seed_everything(0, verbose=False)
        module = _classifier(_lenet(args.size), args.lr)
        reinitialize(module, member)  # the strategy's init of member g: reset_parameters under seed + g
        loader = DataLoader(train_set, batch_sampler=MemberBatchSampler(len(train_set), 64, [member], seed=0))
        timer = EpochTimer()
        _trainer(args.epochs, timer).fit(module, train_dataloaders=loader)
        separate += timer.per_epoch()
        separate_wall += timer.per_epoch_wall()
        members.append(module.model.eval())
    separate_ensemble = EnsembleModel(members).eval()
    epoch_times["separate"] = separate
    record(
        f"ensemble_x{args.members}_separate_fits",
        separate_ensemble,
        separate,
        "plain Trainer.fit per member, summed epoch time; EnsembleModel loop at inference",
        separate_wall,
    )

    # -- bayesian-torch BNN
    print("[5/5] bayesian-torch BNN (Reparameterization)", flush=True)
    L.seed_everything(0, verbose=False)
    bnn = _classifier(BayesianModel(_lenet(args.size), prior_sigma=1.0, posterior_rho_init=-4.0), args.lr)
    timer = EpochTimer()
    _trainer(args.epochs, timer).fit(bnn, dm)
    bnn.eval()
    record(
        f"bnn_mc_x{args.mc_samples}",
        lambda x: mc_predict(bnn, x, args.mc_samples)[0],
        timer.per_epoch(),
        "ELBO (KL / N), Monte-Carlo prediction",
        timer.per_epoch_wall(),
    )
    record(
        "bnn_mean_weights", lambda x: predict_mean(bnn, x), timer.per_epoch(), "same BNN, posterior means", timer.per_epoch_wall()
    )

    # -- training speed alone on a small MLP, where per-step overhead rather than conv arithmetic dominates
    speed_epochs = min(args.epochs, 5)
    print(f"[extra] training speed of {args.members} MLP members, {speed_epochs} epochs each way", flush=True)
    mlp_times: dict[str, float] = {}
    for mode in ("single", "vectorized", "sequential", "separate"):
        runs = args.members if mode == "separate" else 1
        total = 0.0
        for _ in range(runs):
            L.seed_everything(0, verbose=False)
            module = _classifier(MLP(in_features=args.size * args.size, hidden=(128, 64), dropout=0.2), args.lr)
            timer = EpochTimer()
            if mode in ("vectorized", "sequential"):
                _trainer(
                    speed_epochs,
                    timer,
                    strategy=DeepEnsembleStrategy(num_members=args.members, mode=mode),
                    enable_progress_bar=False,
                ).fit(module, dm)
            else:
                _trainer(speed_epochs, timer, enable_progress_bar=False).fit(module, dm)
            total += timer.per_epoch()
        mlp_times[mode] = total

    # -- MNIST-1D with its CNN: calibration with and without temperature scaling, fit time side by side
    print(f"[extra] MNIST-1D CNN: single and {args.members} members (vectorized, sequential), {args.epochs} epochs", flush=True)
    m1d = MNIST1DDataModule(batch_size=100, seed=0, ood="heldout", heldout_classes=(8, 9))
    m1d.setup()
    m1d_test, m1d_target = m1d.dataset("test").tensors
    m1d_ood = m1d.dataset("ood").tensors[0]
    m1d_val, m1d_val_target = m1d.dataset("val").tensors
    m1d_rows: dict[str, dict[str, Any]] = {}
    m1d_fit: dict[str, FitTimer] = {}
    m1d_probs: dict[str, Tensor] = {}
    step_profile: dict[str, dict[str, float]] = {}
    x_step, y_step = m1d.dataset("train").tensors[0][:100], m1d.dataset("train").tensors[1][:100]
    for mode in ("single", "vectorized", "sequential"):
        L.seed_everything(0, verbose=False)
        module = _classifier(MNIST1DCNN(dropout=0.1), args.lr)
        timer, m1d_fit[mode] = EpochTimer(), FitTimer()
        strategy = "auto" if mode == "single" else DeepEnsembleStrategy(num_members=args.members, mode=mode)
        _trainer(args.epochs, timer, callbacks=[m1d_fit[mode]], strategy=strategy).fit(module, m1d)
        # where a training step's time goes, on the trained module (one batch of 100 per member)
        profile_steps = 10 if args.quick else 40
        step_profile[mode] = _step_profile(
            copy.deepcopy(module), x_step, y_step, 0 if mode == "single" else args.members, profile_steps
        )
        if mode == "single":  # the arithmetic floor of an ensemble step: one model on all members' batches
            step_profile["single_on_members_batches"] = _step_profile(
                copy.deepcopy(module), torch.cat([x_step] * args.members), torch.cat([y_step] * args.members), 0, profile_steps
            )
        if mode == "vectorized":  # the members through torch.func.vmap, as before folding
            step_profile["vectorized_vmap"] = _step_profile(
                copy.deepcopy(module), x_step, y_step, args.members, profile_steps, vmap=True
            )
        module.eval()
        raw = (lambda x, m=module: m(x).softmax(-1)) if mode == "single" else (lambda x, m=module: m(x).exp())
        scaled, temperature = _temperature_scaled(module, m1d_val, m1d_val_target)
        for name, predict in ((mode, raw), (f"{mode}_ts", scaled)):
            with torch.no_grad():
                m1d_probs[name] = predict(m1d_test)
                row = _scores(m1d_probs[name], m1d_target, predict(m1d_ood))
            row.update(train_s_per_epoch=timer.per_epoch(), fit_cpu_s=m1d_fit[mode].cpu, fit_wall_s=m1d_fit[mode].wall)
            if name.endswith("_ts"):
                row["temperature"] = temperature
            m1d_rows[name] = row
            print(
                f"  mnist1d {name}: acc {row['accuracy']:.4f}  nll {row['nll']:.4f}  ece {row['ece']:.4f}  "
                f"auroc {row['ood_auroc']:.4f}  fit {row['fit_cpu_s']:.1f} s CPU",
                flush=True,
            )

    # -- MNIST-1D calibration over training seeds (same data split): is the ECE gap within seed and test-set noise?
    seeds = 2 if args.quick else args.seeds
    print(f"[extra] MNIST-1D calibration over {seeds} training seeds (single and {args.members} members)", flush=True)
    calibration = _calibration_over_seeds(args, m1d, m1d_rows, m1d_probs, seeds)

    # -- ratios, goals, plots, JSON
    vec, seq, sep = epoch_times["vectorized"], epoch_times["sequential"], epoch_times["separate"]
    ens = results[f"ensemble_x{args.members}_vectorized"]
    one = results["single"]
    ratios = {
        "train_speedup_vectorized_vs_sequential": seq / vec,
        "train_speedup_vectorized_vs_separate_fits": sep / vec,
        "train_time_vectorized_vs_single": vec / single_epoch,
        "mlp_train_speedup_vectorized_vs_sequential": mlp_times["sequential"] / mlp_times["vectorized"],
        "mlp_train_speedup_vectorized_vs_separate_fits": mlp_times["separate"] / mlp_times["vectorized"],
        "mlp_train_time_vectorized_vs_single": mlp_times["vectorized"] / mlp_times["single"],
        "fit_time_vectorized_vs_single_digits_lenet": fit_timers["vectorized"].cpu / fit_timers["single"].cpu,
        "fit_time_vectorized_vs_single_mnist1d_cnn": m1d_fit["vectorized"].cpu / m1d_fit["single"].cpu,
        "fit_speedup_vectorized_vs_sequential_mnist1d_cnn": m1d_fit["sequential"].cpu / m1d_fit["vectorized"].cpu,
    }
    ens_ts = results[f"ensemble_x{args.members}_vectorized_ts"]
    digits_gap = {  # is the digits ECE goal decided by more than test-set noise (217 samples)?
        "gap": ens_ts["ece"] - one["ece"],
        "bootstrap_std": _ece_gap_bootstrap_std(
            probs_for_plot[f"ensemble_x{args.members}_vectorized_ts"], probs_for_plot["single"], y_test
        ),
    }
    goals = {
        "vectorized_at_least_2.5x_faster_than_sequential": ratios["train_speedup_vectorized_vs_sequential"] >= 2.5,
        "vectorized_at_least_2.5x_faster_than_separate_fits": ratios["train_speedup_vectorized_vs_separate_fits"] >= 2.5,
        "ensemble_nll_better_than_single": ens["nll"] < one["nll"],
        "ensemble_ood_auroc_better_than_single": ens["ood_auroc"] > one["ood_auroc"],
        "digits_scaled_ensemble_ece_le_single": ens_ts["ece"] <= one["ece"],
        "digits_scaled_ensemble_nll_le_single": ens_ts["nll"] <= one["nll"],
        "mnist1d_scaled_ensemble_ece_le_single": m1d_rows["vectorized_ts"]["ece"] <= m1d_rows["single"]["ece"],
        "mnist1d_scaled_ensemble_nll_le_single": m1d_rows["vectorized_ts"]["nll"] <= m1d_rows["single"]["nll"],
        "mnist1d_scaled_ensemble_ece_le_single_mean_over_seeds": calibration["vectorized_ts"]["ece"]["mean"]
        <= calibration["single"]["ece"]["mean"],
        "fit_time_vectorized_le_1.5x_single_digits_lenet": ratios["fit_time_vectorized_vs_single_digits_lenet"] <= 1.5,
        "fit_time_vectorized_le_1.5x_single_mnist1d_cnn": ratios["fit_time_vectorized_vs_single_mnist1d_cnn"] <= 1.5,
        "mlp_vectorized_at_least_2x_faster_than_sequential": ratios["mlp_train_speedup_vectorized_vs_sequential"] >= 2.0,
    }
    plots = {}
    for name in (
        "single",
        f"mc_dropout_x{args.mc_samples}",
        f"ensemble_x{args.members}_vectorized",
        f"bnn_mc_x{args.mc_samples}",
    ):
        path = args.out / f"uncertainty_reliability_{name.split('_x')[0]}.png"
        plot_reliability_diagram(probs_for_plot[name], y_test, path, title=name)
        plots[name] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    columns = (
        "accuracy",
        "nll",
        "ece",
        "brier",
        "ood_auroc",
        "ood_aupr",
        "fpr95",
        "train_s_per_epoch",
        "train_wall_s_per_epoch",
        "latency_ms_batch1",
        "ms_per_example_batch64",
    )
    width = max(len(n) for n in results) + 2
    print("\n" + "method".ljust(width) + "".join(c[:12].rjust(13) for c in columns))
    for name, row in results.items():
        print(name.ljust(width) + "".join(f"{row[c]:13.4f}" for c in columns))
    m1d_columns = ("accuracy", "nll", "ece", "brier", "ood_auroc", "fit_cpu_s", "fit_wall_s")
    print("\nMNIST-1D CNN".ljust(width + 1) + "".join(c[:12].rjust(13) for c in m1d_columns))
    for name, row in m1d_rows.items():
        print(name.ljust(width) + "".join(f"{row[c]:13.4f}" for c in m1d_columns))
    print(f"\nMNIST-1D CNN over {seeds} training seeds: mean +- std")
    for name in ("single", "single_ts", "vectorized", "vectorized_ts"):
        row = calibration[name]
        print(
            f"  {name:<14} ece {row['ece']['mean']:.4f} +- {row['ece']['std']:.4f}   "
            f"nll {row['nll']['mean']:.4f} +- {row['nll']['std']:.4f}"
        )
    for name in ("ece_gap_scaled_ensemble_minus_single", "ece_gap_scaled_ensemble_minus_scaled_single"):
        print(f"  {name}: {calibration[name]['mean']:+.4f} +- {calibration[name]['std']:.4f} (over seeds)")
    print(f"  test-set bootstrap std of the seed-0 gap: {calibration['seed0_gap_bootstrap_std']:.4f}")
    print(
        f"\ndigits: ECE scaled ensemble - single {digits_gap['gap']:+.4f}, test-set bootstrap std {digits_gap['bootstrap_std']:.4f}"
    )
    print("\nMNIST-1D CNN training step, CPU ms (batch 100 per member)")
    for mode, row in step_profile.items():
        print(f"  {mode:<26}" + "  ".join(f"{k} {v:7.2f}" for k, v in row.items()))
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    for key, value in goals.items():
        print(f"goal {key}: {'met' if value else 'NOT met'}")

    import tvm  # noqa: F401  (version only)

    payload = {
        "benchmark": "uncertainty",
        "command": "python benchmarks/uncertainty.py"
        + (" --quick" if args.quick else "")
        + ("" if DEVICE == "cpu" else f" --device {DEVICE}"),
        "machine": {
            **machine_info(),
            **device_info(DEVICE),
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "config": {
            "data": f"sklearn digits {args.size}px, train classes 0-7, OOD = held-out classes 8 and 9",
            "test_samples": len(y_test),
            "ood_samples": len(x_ood),
            "model": f"LeNet5(dropout=0.25), Adam lr {args.lr:g}, cosine, batch 64",
            "epochs": args.epochs,
            "members": args.members,
            "mc_samples": args.mc_samples,
            "ood_score": "predictive entropy",
            "timing": "process CPU time (train_s_per_epoch, latency) on one torch thread; wall time beside it",
            "quick": args.quick,
        },
        "results": results,
        "mlp_train_s_per_epoch": mlp_times,
        "digits_fit_s": {k: {"cpu": t.cpu, "wall": t.wall} for k, t in fit_timers.items()},
        "mnist1d_cnn": {
            "config": "MNIST1DCNN(dropout=0.1), Adam, cosine, batch 100, OOD = held-out classes 8 and 9",
            "results": m1d_rows,
            "train_step_cpu_ms": step_profile,
            "calibration_over_seeds": calibration,
        },
        "ratios": ratios,
        "goals": goals,
        "digits_ece_gap_scaled_ensemble_minus_single": digits_gap,
        "reliability_diagrams": plots,
    }
    out = args.out / ("uncertainty.json" if DEVICE == "cpu" else f"uncertainty_{DEVICE}.json")
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
