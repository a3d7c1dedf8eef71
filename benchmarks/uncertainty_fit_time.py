"""Where the fit time of a deep ensemble goes, next to one model's, and the floor it cannot go under.

For each case (digits MLP, digits LeNet-5, MNIST-1D CNN) four fits run side by side, in one process
on one torch thread:

- ``single``: one model, the data module's own loader (batch ``B``);
- ``floor``: one model fed the ``M`` members' concatenated batches (``M·B`` rows a step, the same
  number of steps as the ensemble, through the strategy's own member data path): the same arithmetic
  as ``M`` members in one network, and one model's fixed per-step costs. No way of running ``M``
  members can beat it by much: they compute at least this much, and the Lightning loop, logging and
  data loading of a step are already paid once here;
- ``vectorized`` and ``sequential``: ``DeepEnsembleStrategy(num_members=M, mode=...)``;
- ``vectorized_unfused`` and ``sequential_unfused`` (``--unfused``): the same with the module's Adam
  built with ``foreach=False``, which the strategy keeps as it is: the single-tensor optimizer step
  the strategy used before it switched an unset Adam to the fused one.

Each step's process CPU time is split by Lightning hooks into forward (hooks on the network), the
rest of ``training_step`` (loss, metrics, ``self.log``), backward, optimizer step and the loop
between steps (data fetch, callbacks, progress); the first epoch (warm-up) is left out. Fits are
repeated ``--repeats`` times, interleaved, and the median is reported.

    flock /tmp/bench.lock python benchmarks/uncertainty_fit_time.py            # 4 epochs, 2 repeats
    flock /tmp/bench.lock python benchmarks/uncertainty_fit_time.py --unfused  # with the unfused rows
    python benchmarks/uncertainty_fit_time.py --quick                          # smoke run

Writes benchmarks/results/uncertainty_fit_time.json.
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import machine_info  # noqa: E402
from _results import result_path  # noqa: E402

from lightning_relief import ClassifierModule, DeepEnsembleStrategy, DigitsDataModule, MNIST1DDataModule  # noqa: E402
from lightning_relief.models import MLP, MNIST1DCNN, LeNet5  # noqa: E402
from lightning_relief.uncertainty.sampling import member_dataloader  # noqa: E402

SEGMENTS = ("forward", "step_rest", "backward", "optimizer", "loop")


class StepSplit(L.Callback):
    """Process CPU seconds of each part of a training step, summed over the epochs after the first."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(SEGMENTS, 0.0)
        self.steps = 0
        self._marks: dict[str, float] = {}
        self._forward = 0.0
        self._forward_start = 0.0

    def _counting(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch > 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = pl_module.model
        assert isinstance(network, torch.nn.Module)

        def before(*_: Any) -> None:
            self._forward_start = time.process_time()

        def after(*_: Any) -> None:
            self._forward += time.process_time() - self._forward_start

        network.register_forward_pre_hook(before)
        network.register_forward_hook(after)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.process_time()
        if "end" in self._marks and self._counting(trainer) and batch_idx > 0:
            self.total["loop"] += now - self._marks["end"]
        self._marks = {"start": now}
        self._forward = 0.0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._marks["before_backward"] = time.process_time()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._marks["after_backward"] = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        marks = self._marks
        marks["end"] = time.process_time()
        if not self._counting(trainer):
            return
        self.steps += 1
        self.total["forward"] += self._forward
        self.total["step_rest"] += marks["before_backward"] - marks["start"] - self._forward
        self.total["backward"] += marks["after_backward"] - marks["before_backward"]
        self.total["optimizer"] += marks["end"] - marks["after_backward"]

    def per_step_ms(self) -> dict[str, float]:
        out = {k: v / max(self.steps, 1) * 1e3 for k, v in self.total.items()}
        out["total"] = sum(out.values())
        return out


class FitTimer(L.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.cpu = time.process_time() - self.start


def _cases() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], L.LightningDataModule]]]:
    return {
        "digits_mlp": (
            lambda: MLP(in_features=64, hidden=(128, 64), dropout=0.2),
            lambda: DigitsDataModule(batch_size=64, size=8, seed=0, ood="heldout", heldout_classes=(8, 9)),
        ),
        "digits_lenet": (
            lambda: LeNet5(input_size=8, dropout=0.25),
            lambda: DigitsDataModule(batch_size=64, size=8, seed=0, ood="heldout", heldout_classes=(8, 9)),
        ),
        "mnist1d_cnn": (
            lambda: MNIST1DCNN(dropout=0.1),
            lambda: MNIST1DDataModule(batch_size=100, seed=0, ood="heldout", heldout_classes=(8, 9)),
        ),
    }


class UnfusedClassifier(ClassifierModule):
    """``ClassifierModule`` whose Adam is built with ``foreach=False``: a choice the strategy keeps."""

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        for group in config["optimizer"].param_groups:
            group["foreach"] = False
        return config


def _fit(case: str, mode: str, members: int, epochs: int) -> dict[str, Any]:
    network, data = _cases()[case]
    L.seed_everything(0, verbose=False)
    unfused = mode.endswith("_unfused")
    mode = mode.removesuffix("_unfused")
    module = (UnfusedClassifier if unfused else ClassifierModule)(network(), lr=1e-2, optimizer="adam", scheduler="cosine")
    dm = data()
    split, timer = StepSplit(), FitTimer()
    strategy: Any = "auto"
    loaders: dict[str, Any] = {"datamodule": dm}
    if mode in ("vectorized", "sequential"):
        strategy = DeepEnsembleStrategy(num_members=members, mode=mode)
    elif mode == "floor":
        dm.setup("fit")
        plain = DataLoader(dm.dataset("train"), batch_size=dm.batch_size)  # type: ignore[attr-defined]
        loaders = {"train_dataloaders": member_dataloader(plain, list(range(members)), seed=0, bootstrap=False)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[split, timer],
        strategy=strategy,
    )
    trainer.fit(module, **loaders)
    return {"fit_cpu_s": timer.cpu, "steps_per_epoch": trainer.num_training_batches, "step_cpu_ms": split.per_step_ms()}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "fit_cpu_s": statistics.median(r["fit_cpu_s"] for r in runs),
        "fit_cpu_s_runs": [r["fit_cpu_s"] for r in runs],
        "steps_per_epoch": runs[0]["steps_per_epoch"],
        "step_cpu_ms": {k: statistics.median(r["step_cpu_ms"][k] for r in runs) for k in (*SEGMENTS, "total")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 repeat")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(_cases()), choices=list(_cases()))
    parser.add_argument("--unfused", action="store_true", help="also the ensembles with an unfused Adam step")
    parser.add_argument("--out", default="uncertainty_fit_time.json", help="JSON name in benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 2, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    modes: tuple[str, ...] = ("single", "floor", "vectorized", "sequential")
    if args.unfused:
        modes += ("vectorized_unfused", "sequential_unfused")
    results: dict[str, dict[str, Any]] = {}
    for case in args.cases:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(_fit(case, mode, args.members, args.epochs))
        results[case] = {m: _median(r) for m, r in runs.items()}
        one = results[case]["single"]["fit_cpu_s"]
        results[case]["ratios"] = {
            "fit_vectorized_vs_single": results[case]["vectorized"]["fit_cpu_s"] / one,
            "fit_floor_vs_single": results[case]["floor"]["fit_cpu_s"] / one,
            "fit_vectorized_vs_floor": results[case]["vectorized"]["fit_cpu_s"] / results[case]["floor"]["fit_cpu_s"],
            "fit_speedup_vectorized_vs_sequential": results[case]["sequential"]["fit_cpu_s"]
            / results[case]["vectorized"]["fit_cpu_s"],
        }
        if args.unfused:
            results[case]["ratios"]["fit_speedup_vectorized_vs_sequential_unfused"] = (
                results[case]["sequential_unfused"]["fit_cpu_s"] / results[case]["vectorized_unfused"]["fit_cpu_s"]
            )
        print(f"\n{case} ({args.members} members, {args.epochs} epochs, median of {args.repeats}): CPU ms per step")
        print("mode".ljust(20) + "".join(s.rjust(11) for s in (*SEGMENTS, "total", "fit_s")))
        for mode in modes:
            row = results[case][mode]
            cells = [row["step_cpu_ms"][s] for s in (*SEGMENTS, "total")] + [row["fit_cpu_s"]]
            print(mode.ljust(20) + "".join(f"{v:11.2f}" for v in cells))
        for key, value in results[case]["ratios"].items():
            print(f"  {key}: {value:.2f}x")

    out = result_path(args.out, args.quick)
    payload = {
        "benchmark": "uncertainty_fit_time",
        "command": "python " + " ".join(["benchmarks/uncertainty_fit_time.py", *sys.argv[1:]]),
        "machine": {**machine_info(), "load_average_1m_at_end": os.getloadavg()[0]},
        "config": {
            "members": args.members,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "timing": "process CPU time, one torch thread; per-step parts exclude the first epoch",
            "optimizer": "Adam lr 1e-2, cosine; validation off; the ensembles' Adam fused by the strategy "
            "(the _unfused rows: foreach=False, kept as built)",
        },
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
