"""Moment propagation vs MC dropout: cost and uncertainty quality on the digits.

LeNet-5 and ResNet-20 with dropout (in their classifiers; in ResNet-20 only
before the last layer) and a LeNet-5 with one more dropout before its second
conv block are trained on the digits with classes 8 and 9 held out (they are
the OOD set). For each: the deterministic network (dropout
off), MC dropout with 10, 30 and 100 samples in its fastest form (the samples
batched into one forward, no Python loop), and moment propagation
(``MomentPropagationWrapper``, one pass; its probabilities with each softmax
approximation: Daunizeau, mean field, and 256 fixed draws of the logits). Quality: accuracy, NLL, ECE (15 bins)
and OOD AUROC (predictive entropy as the score) on the test set. Cost: time per
call at batch 1 and 128, in PyTorch eager and compiled by TVM (untuned: the
default pipeline, no MetaSchedule; MC dropout is not compiled since TVM's
frontend has no random operators). All timings of one backend are taken side
by side in this run, interleaved round by round, as process CPU time with one
thread (the machine is shared: CPU time counts only our own work), and
reported as ratios to the deterministic forward of the same backend. Timed
outputs are raw: logits (deterministic, MC samples) and logit mean and
variance (moment propagation).

    python benchmarks/moment_propagation.py           # full run
    python benchmarks/moment_propagation.py --quick   # smoke run (1 epoch, few repeats)

Writes benchmarks/results/moment_propagation.json.
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

os.environ.setdefault("TVM_NUM_THREADS", "1")

import lightning as L
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import add_device_argument, check_device, device_info, machine_info, synchronize  # noqa: E402
from _results import result_path  # noqa: E402

from lightning_relief import ClassifierModule, DigitsDataModule, MomentPropagationWrapper  # noqa: E402
from lightning_relief.models import LeNet5, resnet20  # noqa: E402
from lightning_relief.moments import mc_dropout_logits  # noqa: E402
from lightning_relief.moments.functional import SOFTMAX_METHODS  # noqa: E402
from lightning_relief.moments.sampling import dropout_active  # noqa: E402
from lightning_relief.uncertainty import functional as U  # noqa: E402

SAMPLES = (10, 30, 100)
BATCHES = (1, 128)


def train(model: nn.Module, data: DigitsDataModule, epochs: int) -> nn.Module:
    module = ClassifierModule(model, lr=3e-3)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=True, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    return module.model.eval()


@torch.no_grad()
def quality(net: nn.Module, data: DigitsDataModule) -> dict[str, dict[str, float]]:
    x, y = data.dataset("test").tensors
    x_ood = data.dataset("ood").tensors[0]
    predictors: dict[str, Callable[[Tensor], Tensor]] = {"deterministic": lambda v: net(v).softmax(-1)}
    for s in SAMPLES:
        predictors[f"mc{s}"] = lambda v, s=s: mc_dropout_logits(net, v, s).softmax(-1).mean(0)
    for method in SOFTMAX_METHODS:  # the same logit moments, three softmax approximations
        predictors[f"mp_{method}"] = MomentPropagationWrapper(net, softmax=method).predict_proba
    rows = {}
    for name, predict in predictors.items():
        torch.manual_seed(0)
        probs, probs_ood = predict(x), predict(x_ood)
        rows[name] = {
            "acc": float((probs.argmax(-1) == y).float().mean()),
            "nll": float(U.negative_log_likelihood(probs, y)),
            "ece": float(U.expected_calibration_error(probs, y, n_bins=15)),
            "ood_auroc": float(U.ood_auroc(U.predictive_entropy(probs), U.predictive_entropy(probs_ood))),
        }
    return rows


def cpu_time_per_call(fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float, device: str = "cpu") -> dict[str, float]:
    """Median process CPU seconds per call (on a GPU: wall seconds up to the last kernel); methods interleaved round by round."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    calls = {}
    for name, fn in fns.items():  # warm up, and size each measurement to ~budget_s
        fn()
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        one = max(clock() - start, 1e-6)
        calls[name] = max(1, int(budget_s / one))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = clock()
            for _ in range(calls[name]):
                fn()
            synchronize(device)
            samples[name].append((clock() - start) / calls[name])
    return {name: statistics.median(v) for name, v in samples.items()}


@torch.no_grad()
def eager_costs(net: nn.Module, batch: int, rounds: int, budget_s: float, device: str = "cpu") -> dict[str, float]:
    net = copy.deepcopy(net).to(device)
    x = torch.randn(batch, *net_input_shape, device=device)
    wrapper = MomentPropagationWrapper(net)
    fns: dict[str, Callable[[], Any]] = {"deterministic": lambda: net(x), "moment_propagation": lambda: wrapper(x)}
    for s in SAMPLES:
        xs = x.repeat(s, 1, 1, 1)

        def mc(xs=xs) -> Tensor:
            return net(xs)

        fns[f"mc{s}"] = mc
    with dropout_active(net):  # MC rows sample; the deterministic and MP rows ignore the mode
        costs = cpu_time_per_call({k: v for k, v in fns.items() if k.startswith("mc")}, rounds, budget_s, device)
    net.eval()
    costs.update(cpu_time_per_call({k: v for k, v in fns.items() if not k.startswith("mc")}, rounds, budget_s, device))
    return costs


def tvm_costs(net: nn.Module, rounds: int, budget_s: float) -> dict[str, dict[str, float]]:
    import tvm

    from lightning_relief.deploy import compile_for_target

    example = torch.randn(4, *net_input_shape)
    compiled = {}
    compile_s = {}
    for name, model in (("deterministic", net), ("moment_propagation", MomentPropagationWrapper(net))):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled[name] = compile_for_target(model, example)
        compile_s[name] = time.perf_counter() - start
        mean_or_out = compiled[name](example)
        reference = model(example)
        first = mean_or_out[0] if isinstance(mean_or_out, tuple) else mean_or_out
        expected = reference[0] if isinstance(reference, tuple) else reference
        torch.testing.assert_close(first, expected.detach(), rtol=1e-4, atol=1e-5)
    out: dict[str, dict[str, float]] = {"compile_s": compile_s}
    for batch in BATCHES:
        x = torch.randn(batch, *net_input_shape).numpy()
        fns = {}
        for name, c in compiled.items():
            main, params = c.vm["main"], c.device_params()
            args = [tvm.runtime.tensor(x, c.device)]
            fns[name] = lambda main=main, args=args, params=params: main(*args, *params)
        out[f"batch{batch}"] = cpu_time_per_call(fns, rounds, budget_s)
    return out


net_input_shape: tuple[int, ...] = (1, 8, 8)


def lenet_with_conv_dropout() -> nn.Module:
    """LeNet-5 with a dropout before the second conv block as well: moments flow through
    conv, batch norm, ReLU and max pooling there, not only through the classifier."""
    model = LeNet5(input_size=8, dropout=0.25)
    model.features[1] = nn.Sequential(nn.Dropout(0.1), *model.features[1])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, few timing rounds")
    parser.add_argument("--no-tvm", action="store_true", help="skip the TVM rows")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 20, quick 1)")
    parser.add_argument(
        "--models", nargs="+", default=["lenet5", "resnet20", "lenet5_conv_dropout"], help="which networks to run"
    )
    parser.add_argument("--out", default=None, help="default results/moment_propagation.json (--quick: results/quick/)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = check_device(args.device).type
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    epochs = args.epochs or (1 if args.quick else 20)
    rounds, budget = (3, 0.05) if args.quick else (7, 0.3)

    data = DigitsDataModule(batch_size=64, size=8, ood="heldout", seed=0)
    data.setup()
    builders = {
        "lenet5": lambda: LeNet5(input_size=8, dropout=0.25),
        "resnet20": lambda: resnet20(dropout=0.25),
        "lenet5_conv_dropout": lenet_with_conv_dropout,
    }
    unknown = set(args.models) - set(builders)
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from {sorted(builders)}")
    results: dict[str, Any] = {}
    for name, build in builders.items():
        if name not in args.models:
            continue
        print(f"== {name}: training {epochs} epochs", flush=True)
        net = train(build(), data, epochs)
        entry: dict[str, Any] = {"quality": quality(net, data), "eager_s": {}}
        for batch in BATCHES:
            entry["eager_s"][f"batch{batch}"] = eager_costs(net, batch, rounds, budget, device)
        if not args.no_tvm:
            entry["tvm_untuned_s"] = tvm_costs(net, rounds, budget)
        results[name] = entry

    goals = {}
    for name, entry in results.items():
        q = entry["quality"]
        ref = q["mc100"]
        goal: dict[str, Any] = {}
        for method in SOFTMAX_METHODS:
            row = q[f"mp_{method}"]
            goal[f"{method}_nll_over_mc100"] = round(row["nll"] / ref["nll"], 4)
            goal[f"{method}_nll_within_5pct_of_mc100"] = abs(row["nll"] / ref["nll"] - 1) <= 0.05
            goal[f"{method}_auroc_within_0.02_of_mc100"] = abs(row["ood_auroc"] - ref["ood_auroc"]) <= 0.02
        for backend in ("eager_s", "tvm_untuned_s"):
            for batch in BATCHES:
                costs = entry.get(backend, {}).get(f"batch{batch}")
                if not costs:
                    continue
                ratio = costs["moment_propagation"] / costs["deterministic"]
                goal[f"{backend[:-2]}_batch{batch}_mp_over_deterministic"] = round(ratio, 3)
                goal[f"{backend[:-2]}_batch{batch}_mp_at_most_2.5x"] = ratio <= 2.5
                if "mc30" in costs:
                    speedup = costs["mc30"] / costs["moment_propagation"]
                    goal[f"{backend[:-2]}_batch{batch}_mc30_over_mp"] = round(speedup, 2)
                    goal[f"{backend[:-2]}_batch{batch}_at_least_10x_faster_than_mc30"] = speedup >= 10
        goals[name] = goal

    report = {
        "benchmark": "moment_propagation",
        "quick": args.quick,
        "epochs": epochs,
        "timing": "median process CPU seconds per call, 1 torch/TVM thread, methods interleaved"
        + (
            ""
            if device == "cpu"
            else f"; eager rows: wall seconds on {device} up to the last kernel (training, quality, TVM: CPU)"
        ),
        "tvm": "untuned (default pipeline, no MetaSchedule); MC dropout not compiled (no random ops in TVM)",
        "machine": {**machine_info(), **device_info(device)},
        "results": results,
        "goals": goals,
    }
    print_tables(results, goals)
    out = (
        Path(args.out)
        if args.out
        else result_path("moment_propagation.json" if device == "cpu" else f"moment_propagation_{device}.json", args.quick)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def print_tables(results: dict[str, Any], goals: dict[str, Any]) -> None:
    for name, entry in results.items():
        print(f"\n{name}: quality on the test set (OOD: held-out classes 8, 9)")
        print(f"{'method':<20}{'acc':>8}{'NLL':>8}{'ECE':>8}{'AUROC':>8}")
        for method, q in entry["quality"].items():
            print(f"{method:<20}{q['acc']:>8.3f}{q['nll']:>8.3f}{q['ece']:>8.3f}{q['ood_auroc']:>8.3f}")
        print(f"\n{name}: time per call (ms) and ratio to the deterministic forward")
        print(f"{'backend':<8}{'batch':>6}  " + "".join(f"{m:>22}" for m in entry["eager_s"]["batch1"]))
        for backend in ("eager_s", "tvm_untuned_s"):
            for batch in BATCHES:
                costs = entry.get(backend, {}).get(f"batch{batch}")
                if not costs:
                    continue
                det = costs["deterministic"]
                cells = "".join(
                    f"{costs[m] * 1e3:>13.3f} ({costs[m] / det:>5.1f}x)" if m in costs else f"{'-':>22}"
                    for m in entry["eager_s"]["batch1"]
                )
                print(f"{backend.split('_')[0]:<8}{batch:>6}  {cells}")
        print(f"goals: {json.dumps(goals[name], indent=1)}")


if __name__ == "__main__":
    raise SystemExit(main())
