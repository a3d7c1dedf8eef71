"""Compression benchmark: SensitivityPruningCallback against the usual alternatives, side by side.

On the digits data at 32 px, for LeNet-5 and ResNet-20, at measured TVM latency
targets of 0.5 and 0.2 of the original (batch 1, untuned ``llvm`` on this CPU):

* ours: ``SensitivityPruningCallback`` (pruning + quantization, Lagrangian search, measured candidates);
* uniform: the same callback with ``search="uniform"`` (one torch-pruning ratio for every group,
  the smallest that meets the same latency budget);
* ModelPruning: Lightning's own callback (unstructured L1 masks, ``amount = 1 - target``);
* quantization alone: every conv/linear at 8-bit weights and activations (no target: it is what it is).

Every method starts from the same pretrained weights and fine-tunes for the same
number of epochs. Columns: test accuracy, measured latency ratio, model size,
search and fine-tune wall time. Writes ``benchmarks/results/compression.json``
and ``compression.png`` (latency ratio vs test accuracy; our evaluated
candidates in light colour, the chosen points marked).

    .venv/bin/python benchmarks/compression.py            # full run (about 30-60 min on 2 busy cores)
    .venv/bin/python benchmarks/compression.py --quick    # LeNet, target 0.5, short training
    # one model and target in runs that each fit the benchmark lock: pretrain unlocked, then the methods in parts
    .venv/bin/python benchmarks/compression.py --models resnet20 --targets 0.2 --pretrain-only
    flock /tmp/bench.lock .venv/bin/python benchmarks/compression.py --models resnet20 --targets 0.2 --methods ours
    flock /tmp/bench.lock .venv/bin/python benchmarks/compression.py --models resnet20 --targets 0.2 \
        --methods uniform ModelPruning quant-8bit   # rows merged into results/compression_resnet20_0.2.json
    .venv/bin/python benchmarks/compression.py --suite mnist1d [--seeds 0 1 2]   # issue #13's search-quality goal
    .venv/bin/python benchmarks/compression.py --suite resnet18   # a foreign model: torchvision resnet18 at 32 px

``--suite mnist1d``: the MNIST-1D CNN (``MNIST1DCNN``, batch norm) pretrained, then compressed to measured
latency targets 0.5, 0.35 and 0.25 by ours (accuracy-scored candidates incl. the uniform, 8-bit and joint
baselines) and by uniform pruning alone, each fine-tuned alike; test accuracy at the latency each measured,
time per phase, the chosen policies. Writes ``results/compression_mnist1d.json``.

``--suite resnet18``: torchvision's ``resnet18`` as it is (3-channel digits at 32 px) to a measured latency
target of 0.5: the callback's figure, a fresh re-timing after fine-tuning (goal: within ±5 %), and the
checkpoint reloaded into a new ``resnet18``. Writes ``results/compression_resnet18.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import lightning as L
import torch
from _machine import machine_info
from _results import result_path
from lightning.pytorch.callbacks import ModelPruning

from lightning_relief import ClassifierModule, DigitsDataModule, SensitivityPruningCallback
from lightning_relief.compress import analyze, apply_quantization, quantized_bits
from lightning_relief.compress.latency import LatencyMeter
from lightning_relief.data import MNIST1DDataModule
from lightning_relief.models import MNIST1DCNN, LeNet5, ResNet

METHODS = ("ours", "uniform", "ModelPruning", "quant-8bit")


def trainer(max_epochs: int, callbacks=(), root: str = "runs/bench_compression") -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
        callbacks=list(callbacks),
        default_root_dir=root,
    )


def model_size_kb(module: torch.nn.Module) -> float:
    """Bytes to store the weights: quantized conv/linear at their bit width, everything else float32."""
    bits = quantized_bits(module)
    total = 0.0
    for name, param in module.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in bits and name.endswith(".weight"):
            total += param.numel() * bits[layer] / 8
        else:
            total += param.numel() * 4
    return total / 1e3


def test_acc(module: ClassifierModule, dm: DigitsDataModule) -> float:
    return float(trainer(1).test(module, dm, verbose=False)[0]["test_acc"])


def build(name: str) -> torch.nn.Module:
    if name == "lenet":
        return LeNet5(input_size=32)
    return ResNet(depth=20, width=8)


def run_model(name: str, args, meter_cache: Path) -> dict:
    dm = DigitsDataModule(batch_size=64, size=32, seed=0)
    dm.setup()
    L.seed_everything(0, verbose=False)
    base = ClassifierModule(build(name), lr=args.lr)
    # pretraining is seeded and deterministic: a split run (--methods) trains once, outside the benchmark lock
    saved = meter_cache / "pretrained" / f"{name}_{args.pretrain_epochs[name]}ep_seed0.pt"
    t = time.perf_counter()
    if saved.exists():
        base.load_state_dict(torch.load(saved, weights_only=True))
    else:
        trainer(args.pretrain_epochs[name]).fit(base, dm)
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), saved)
    pretrain_s = time.perf_counter() - t
    if args.pretrain_only:
        print(f"[{name}] pretrained weights in {saved}", flush=True)
        return {"rows": [], "candidates": {}, "pretrain_s": pretrain_s}
    pretrained = copy.deepcopy(base.state_dict())
    base_acc = test_acc(base, dm)
    example = dm.dataset("val").tensors[0][:1]
    # uncached: the table's figures are taken afresh, beside the callback's own measurements
    meter = LatencyMeter("llvm", cache_dir=meter_cache, repeat=args.repeat, number=args.number, cache=False)
    meter.cost_model(analyze(base, example))
    base_ms = meter.set_reference(base)  # every row is timed in alternation with this compiled original
    print(
        f"[{name}] pretrained {args.pretrain_epochs[name]} epochs in {pretrain_s:.0f} s: test acc {base_acc:.4f}, "
        f"latency {base_ms:.3f} ms",
        flush=True,
    )
    rows = [
        {
            "model": name,
            "method": "original",
            "target": 1.0,
            "test_acc": base_acc,
            "latency_ms": base_ms,
            "latency_ratio": 1.0,
            "size_kb": model_size_kb(base),
            "params": sum(p.numel() for p in base.parameters()),
            "search_s": 0.0,
            "finetune_s": 0.0,
        }
    ]
    candidates: dict = {}

    def fresh() -> ClassifierModule:
        module = ClassifierModule(build(name), lr=args.finetune_lr)
        module.load_state_dict(pretrained)
        return module

    def finish(method: str, target: float, module: ClassifierModule, search_s: float, fit_s: float, extra=None):
        ms = meter.measure(module)
        row = {
            "model": name,
            "method": method,
            "target": target,
            "test_acc": test_acc(module, dm),
            "latency_ms": ms,
            "latency_ratio": ms / base_ms,
            "size_kb": model_size_kb(module),
            "params": sum(p.numel() for p in module.parameters()),
            "search_s": search_s,
            "finetune_s": fit_s - search_s,
            **(extra or {}),
        }
        rows.append(row)
        print(
            f"[{name}] {method:<13} target {target:<4} acc {row['test_acc']:.4f} latency x{row['latency_ratio']:.3f} "
            f"size {row['size_kb']:.1f} kB search {search_s:.0f} s fine-tune {row['finetune_s']:.0f} s",
            flush=True,
        )

    for target in args.targets:
        for method, kwargs in (("ours", {}), ("uniform", {"search": "uniform", "methods": ("prune",)})):
            if method not in args.methods:
                continue
            L.seed_everything(0, verbose=False)
            module = fresh()
            cb = SensitivityPruningCallback(
                target=target,
                metric="latency",
                start_epoch=0,
                calibration_batches=4,
                candidates=args.candidates,
                cache_dir=str(meter_cache),
                verbose=False,
                **kwargs,
            )
            t = time.perf_counter()
            try:
                trainer(args.finetune_epochs[name], [cb]).fit(module, dm)
            except ValueError as err:  # the budget is out of this method's reach
                print(f"[{name}] {method} target {target}: {err}", flush=True)
                rows.append({"model": name, "method": method, "target": target, "error": str(err)})
                continue
            fit_s = time.perf_counter() - t
            candidates[f"{method}@{target}"] = [
                {"measured_ratio": c.measured_cost / cb.original_cost, "val_acc_before_finetune": c.val_acc, "chosen": c.chosen}
                for c in cb.evaluated
            ]
            finish(
                method,
                target,
                module,
                cb.timings["plan_s"],
                fit_s,
                {
                    "candidates": len(cb.evaluated),
                    "callback_latency_ratio": cb.chosen.measured_cost / cb.original_cost,
                    "policy": cb.policy.to_dict(),
                },
            )
        if "ModelPruning" not in args.methods:
            continue
        # Lightning's unstructured pruning: masks, no structural change
        L.seed_everything(0, verbose=False)
        module = fresh()
        # masks after the first epoch only (a fixed amount every epoch would compound)
        pruning = ModelPruning(
            "l1_unstructured",
            amount=1 - target,
            use_global_unstructured=True,
            apply_pruning=lambda epoch: epoch == 0,
            make_pruning_permanent=True,
            verbose=0,
        )
        t = time.perf_counter()
        trainer(args.finetune_epochs[name], [pruning]).fit(module, dm)
        fit_s = time.perf_counter() - t
        zeros = sum(int((p == 0).sum()) for p in module.parameters())
        finish("ModelPruning", target, module, 0.0, fit_s, {"zero_weights": zeros})

    if "quant-8bit" not in args.methods:
        return {"rows": rows, "candidates": candidates, "pretrain_s": pretrain_s}
    # quantization alone: 8-bit weights and activations everywhere, same fine-tuning
    L.seed_everything(0, verbose=False)
    module = fresh()
    layers = [info.name for info in analyze(module, example).layers]
    t = time.perf_counter()
    calib = [x for x, _ in list(dm.train_dataloader())[:4]]
    apply_quantization(module, {n: 8 for n in layers}, calib)
    quant_s = time.perf_counter() - t
    trainer(args.finetune_epochs[name]).fit(module, dm)
    finish("quant-8bit", 1.0, module, quant_s, time.perf_counter() - t)
    return {"rows": rows, "candidates": candidates, "pretrain_s": pretrain_s}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {
        "original": "black",
        "ours": "tab:red",
        "uniform": "tab:blue",
        "ModelPruning": "tab:green",
        "quant-8bit": "tab:purple",
    }
    markers = {0.5: "o", 0.2: "s", 1.0: "*"}
    for ax, name in zip(axes[0], models):
        for key, cands in results[name]["candidates"].items():
            method = key.split("@")[0]
            ax.scatter(
                [c["measured_ratio"] for c in cands],
                [c["val_acc_before_finetune"] for c in cands],
                color=colors[method],
                alpha=0.25,
                s=18,
            )
        for row in results[name]["rows"]:
            if "error" in row:
                continue
            ax.scatter(
                [row["latency_ratio"]],
                [row["test_acc"]],
                color=colors[row["method"]],
                marker=markers.get(row["target"], "o"),
                s=70,
                edgecolors="black",
                label=f"{row['method']} @{row['target']:g}",
            )
        for t in (0.5, 0.2):
            ax.axvline(t, color="gray", ls="--", lw=0.8)
        ax.set_title(f"{name}, digits 32 px, TVM llvm batch 1")
        ax.set_xlabel("measured latency / original")
        ax.set_ylabel("test accuracy (light: val acc of candidates before fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_mnist1d(args) -> dict:
    """Ours against uniform pruning on the MNIST-1D CNN at equal measured latency, per seed."""
    dm = MNIST1DDataModule(batch_size=100)
    dm.setup()
    runs = []
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        base = ClassifierModule(MNIST1DCNN(), lr=1e-2, scheduler="none")
        t = time.perf_counter()
        trainer(args.pretrain_epochs).fit(base, dm)
        pretrain_s = time.perf_counter() - t
        pretrained = copy.deepcopy(base.state_dict())
        base_acc = test_acc(base, dm)
        print(
            f"[mnist1d seed {seed}] pretrained {args.pretrain_epochs} epochs in {pretrain_s:.0f} s: test acc {base_acc:.4f}",
            flush=True,
        )
        for target in args.targets:
            for method, kwargs in (("ours", {}), ("uniform", {"search": "uniform", "methods": ("prune",)})):
                L.seed_everything(seed, verbose=False)
                module = ClassifierModule(MNIST1DCNN(), lr=args.finetune_lr, scheduler="none")
                module.load_state_dict(pretrained)
                meter = LatencyMeter(
                    "llvm", cache_dir=args.cache_dir, repeat=args.repeat, number=args.number, compare_seconds=args.compare_seconds
                )
                cb = SensitivityPruningCallback(
                    target=target,
                    meter=meter,
                    start_epoch=0,
                    calibration_batches=4,
                    candidates=args.candidates,
                    max_rounds=args.max_rounds,
                    recovery_steps=args.recovery_steps,
                    seed=seed,
                    verbose=False,
                    **kwargs,
                )
                t = time.perf_counter()
                try:
                    trainer(args.finetune_epochs, [cb]).fit(module, dm)
                except ValueError as err:
                    print(f"[mnist1d seed {seed}] {method} {target}: {err}", flush=True)
                    runs.append({"seed": seed, "method": method, "target": target, "error": str(err)})
                    continue
                fit_s = time.perf_counter() - t
                chosen = cb.chosen
                row = {
                    "seed": seed,
                    "method": method,
                    "target": target,
                    "original_acc": base_acc,
                    "test_acc": test_acc(module, dm),
                    "latency_ratio": chosen.measured_cost / cb.original_cost,
                    "val_acc_cut": chosen.val_acc,
                    "val_acc_recovered": chosen.extra.get("recovered_acc"),
                    "kind": chosen.extra.get("kind", "search"),
                    "policy": cb.policy.to_dict(),
                    "quantized": bool(cb.policy.quantized_layers()),
                    "candidates": len(cb.evaluated),
                    "timings": cb.timings,
                    "finetune_s": fit_s - cb.timings["plan_s"],
                    "evaluated": [
                        {
                            "kind": c.extra.get("kind", "search"),
                            "ratio": c.measured_cost / cb.original_cost,
                            "first_ratio": c.extra.get("first_measured_cost", c.measured_cost) / cb.original_cost,
                            "recovered_acc": c.extra.get("recovered_acc"),
                            "chosen": c.chosen,
                        }
                        for c in cb.evaluated
                    ],
                }
                runs.append(row)
                print(
                    f"[mnist1d seed {seed}] {method:<8} target {target:<4} acc {row['test_acc']:.4f} latency "
                    f"x{row['latency_ratio']:.3f} chosen {row['kind']} quantized {row['quantized']} "
                    f"plan {cb.timings['plan_s']:.0f} s fine-tune {row['finetune_s']:.0f} s",
                    flush=True,
                )
    return {"runs": runs, "summary": mnist1d_summary(runs)}


def mnist1d_summary(runs: list[dict]) -> dict:
    """Mean ± std over seeds of test accuracy and latency ratio, ours minus uniform, per target."""
    import statistics

    out = {}
    for target in sorted({r["target"] for r in runs}, reverse=True):
        entry = {}
        for method in ("ours", "uniform"):
            rows = [r for r in runs if r["target"] == target and r["method"] == method and "error" not in r]
            if not rows:
                continue
            accs = [100 * r["test_acc"] for r in rows]
            ratios = [r["latency_ratio"] for r in rows]
            entry[method] = {
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.pstdev(accs),
                "ratio_mean": statistics.fmean(ratios),
                "seeds": len(rows),
                "drop_vs_original": statistics.fmean(100 * (r["original_acc"] - r["test_acc"]) for r in rows),
            }
        if "ours" in entry and "uniform" in entry:
            entry["ours_minus_uniform_points"] = entry["ours"]["acc_mean"] - entry["uniform"]["acc_mean"]
            ours = [r for r in runs if r["target"] == target and r["method"] == "ours" and "error" not in r]
            entry["ours_chosen_kinds"] = {k: sum(r["kind"] == k for r in ours) for k in sorted({r["kind"] for r in ours})}
            entry["quantized_share"] = statistics.fmean(
                float(r["quantized"]) for r in runs if r["target"] == target and r["method"] == "ours" and "error" not in r
            )
        out[str(target)] = entry
    return out


def main_mnist1d(args) -> int:
    args.cache_dir = Path(args.cache_dir)
    args.finetune_lr = 3e-3
    started = time.perf_counter()
    result = run_mnist1d(args)
    payload = {
        "benchmark": "compression_mnist1d",
        "wall_s": time.perf_counter() - started,
        "machine": {**machine_info(), "torch_threads": args.threads, "tvm_threads": os.environ.get("TVM_NUM_THREADS")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }
    out = result_path("compression_mnist1d.json", args.quick)
    out.write_text(json.dumps(payload, indent=2, default=float))
    print(json.dumps(result["summary"], indent=1, default=float))
    print(f"wrote {out} in {payload['wall_s']:.0f} s")
    return 0


def run_resnet18(args) -> dict:
    """torchvision's resnet18, unchanged (3-channel digits at 32 px), to a measured latency target: the
    callback's own figure, a fresh re-timing after fine-tuning, and the checkpoint reloaded on a new resnet18."""
    import torchvision

    def make() -> torch.nn.Module:
        return torchvision.models.resnet18(num_classes=10)

    dm = DigitsDataModule(batch_size=64, size=32, channels=3, seed=0)
    dm.setup()
    L.seed_everything(0, verbose=False)
    base = ClassifierModule(make(), lr=1e-3, scheduler="none")
    t = time.perf_counter()
    trainer(args.pretrain_epochs).fit(base, dm)
    pretrain_s = time.perf_counter() - t
    base_acc = test_acc(base, dm)
    example = dm.dataset("val").tensors[0][:1]
    retimer = LatencyMeter(
        "llvm",
        cache_dir=args.cache_dir,
        repeat=args.repeat,
        number=args.number,
        cache=False,
        compare_seconds=args.compare_seconds,
    )
    retimer.cost_model(analyze(base, example))
    base_ms = retimer.set_reference(base)
    print(
        f"[resnet18] pretrained {args.pretrain_epochs} epochs in {pretrain_s:.0f} s: test acc {base_acc:.4f}, "
        f"latency {base_ms:.3f} ms",
        flush=True,
    )
    rows = []
    for target in args.targets:
        L.seed_everything(0, verbose=False)
        module = ClassifierModule(make(), lr=args.finetune_lr, scheduler="none")
        module.load_state_dict(base.state_dict())
        meter = LatencyMeter(
            "llvm", cache_dir=args.cache_dir, repeat=args.repeat, number=args.number, compare_seconds=args.compare_seconds
        )
        cb = SensitivityPruningCallback(
            target=target,
            meter=meter,
            start_epoch=0,
            calibration_batches=4,
            prune_ratios=(0.25, 0.5, 0.75),
            bit_widths=(8,),
            candidates=args.candidates,
            max_rounds=args.max_rounds,
            grow=args.grow,
            recovery_steps=args.recovery_steps,
            verbose=False,
        )
        fit = trainer(args.finetune_epochs, [cb])
        t = time.perf_counter()
        fit.fit(module, dm)
        fit_s = time.perf_counter() - t
        ratio = retimer.measure(module) / base_ms
        path = Path(args.cache_dir) / f"resnet18_{target}.ckpt"
        fit.save_checkpoint(path)
        reloaded = ClassifierModule.load_from_checkpoint(path, model=make(), weights_only=True).eval()
        x = dm.dataset("val").tensors[0][:16]
        with torch.no_grad():
            reload_error = float((reloaded(x) - module.eval()(x)).abs().max())
        row = {
            "target": target,
            "original_acc": base_acc,
            "test_acc": test_acc(module, dm),
            "callback_latency_ratio": cb.chosen.measured_cost / cb.original_cost,
            "retimed_latency_ratio": ratio,
            "within_5pct": abs(ratio / target - 1) <= 0.05,
            "reload_max_abs_error": reload_error,
            "kind": cb.chosen.extra.get("kind", "search"),
            "policy": cb.policy.to_dict(),
            "candidates": len(cb.evaluated),
            "timings": cb.timings,
            "finetune_s": fit_s - cb.timings["plan_s"],
        }
        rows.append(row)
        print(
            f"[resnet18] target {target}: acc {row['test_acc']:.4f} (original {base_acc:.4f}), callback "
            f"x{row['callback_latency_ratio']:.3f}, re-timed x{ratio:.3f}, reload error {reload_error:.2e}, "
            f"chosen {row['kind']}, plan {cb.timings['plan_s']:.0f} s",
            flush=True,
        )
    return {"rows": rows, "pretrain_s": pretrain_s, "original_ms": base_ms}


def main_resnet18(args) -> int:
    args.cache_dir = Path(args.cache_dir)
    started = time.perf_counter()
    result = run_resnet18(args)
    payload = {
        "benchmark": "compression_resnet18",
        "wall_s": time.perf_counter() - started,
        "machine": {**machine_info(), "torch_threads": args.threads, "tvm_threads": os.environ.get("TVM_NUM_THREADS")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }
    out = result_path("compression_resnet18.json", args.quick)
    out.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {out} in {payload['wall_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="LeNet only, target 0.5, short training")
    parser.add_argument("--suite", choices=("digits", "mnist1d", "resnet18"), default="digits")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="mnist1d suite: seeds")
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="digits: the rows to run; a run of some methods merges its rows into the file",
    )
    parser.add_argument("--pretrain-only", action="store_true", help="digits: pretrain and save the weights, then stop")
    parser.add_argument(
        "--targets", nargs="+", type=float, default=None, help="digits: 0.5 0.2; mnist1d: 0.5 0.35 0.25 unless given"
    )
    parser.add_argument("--cache-dir", default="runs/cache/bench_compression")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suite == "mnist1d":
        args.targets = args.targets or [0.5, 0.35, 0.25]
        args.pretrain_epochs, args.finetune_epochs = (3, 1) if args.quick else (20, 5)
        args.repeat, args.number, args.compare_seconds = 5, 10, 2.0
        args.candidates, args.max_rounds, args.recovery_steps = 2, 3, (10 if args.quick else 100)
        return main_mnist1d(args)
    if args.suite == "resnet18":
        args.targets = args.targets or [0.5]
        args.pretrain_epochs, args.finetune_epochs = (1, 1) if args.quick else (3, 2)
        args.repeat, args.number, args.compare_seconds = 5, 10, 2.0
        args.candidates, args.max_rounds, args.grow, args.recovery_steps = 2, 3, 6, (5 if args.quick else 20)
        args.finetune_lr = 1e-3
        return main_resnet18(args)
    args.lr, args.finetune_lr = 1e-2, 3e-3
    args.repeat, args.number = 10, 10
    args.candidates = 3
    # a run of other models or targets than the defaults writes beside the full results, not over them
    parts = [] if args.models == ["lenet", "resnet20"] else list(args.models)
    parts += [] if args.targets in (None, [0.5, 0.2]) else [str(t) for t in args.targets]
    name = "_".join(["compression", *parts])
    args.targets = args.targets or [0.5, 0.2]
    if args.quick:
        args.models, args.targets = ["lenet"], [0.5]
        args.pretrain_epochs = {"lenet": 3, "resnet20": 2}
        args.finetune_epochs = {"lenet": 1, "resnet20": 1}
        args.candidates = 2
    else:
        args.pretrain_epochs = {"lenet": 15, "resnet20": 8}
        args.finetune_epochs = {"lenet": 5, "resnet20": 3}
    started = time.perf_counter()
    import tvm

    results: dict = {}
    for model_name in args.models:
        results[model_name] = run_model(model_name, args, Path(args.cache_dir))
        if args.pretrain_only:
            continue
        if set(args.methods) != set(METHODS):
            results[model_name] = merged(result_path(f"{name}.json", args.quick), model_name, results[model_name])
        # written after every model, so a long run that is cut short keeps what it measured
        result_path(f"{name}.json", args.quick).write_text(
            json.dumps(payload_of(args, results, started, tvm.__version__), indent=2, default=float)
        )
    if args.pretrain_only:
        return 0
    payload = payload_of(args, results, started, tvm.__version__)
    print_table(results)
    print(json.dumps(payload["goals"], indent=1))
    out = result_path(f"{name}.json", args.quick)
    out.write_text(json.dumps(payload, indent=2, default=float))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name} in {payload['wall_s']:.0f} s")
    return 0


def merged(path: Path, model: str, new: dict) -> dict:
    """``new`` rows of a run of some methods over the rows of earlier runs in ``path`` (a method's row at a
    target replaced; the original's row from this run). Each run times against its own compiled original,
    so every latency ratio stays a side-by-side figure."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())["results"].get(model)
    if old is None:
        return new
    fresh = {(r["method"], r["target"]) for r in new["rows"]}
    rows = new["rows"][:1] + [r for r in old["rows"][1:] if (r["method"], r["target"]) not in fresh] + new["rows"][1:]
    return {**old, **new, "rows": rows, "candidates": {**old["candidates"], **new["candidates"]}}


def payload_of(args, results: dict, started: float, tvm_version: str) -> dict:
    return {
        "benchmark": "compression",
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "machine": {
            **machine_info(),
            "tvm": tvm_version,
            "torch_threads": args.threads,
            "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
        },
        "settings": {
            "input_px": 32,
            "latency": "TVM llvm (this CPU), untuned, batch 1; ratios: median over 10 rounds of 10 runs "
            "timed in alternation with the original",
            "targets": args.targets,
            "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs,
            "candidates_per_round": args.candidates,
            "resnet20_width": 8,
        },
        "goals": goals(results),
        "results": results,
    }


def goals(results: dict, tolerance: float = 0.05) -> dict:
    """The issue's goals, per model and target, from the rows (ours against uniform pruning)."""
    out = {}
    for name, res in results.items():
        rows = [r for r in res["rows"] if "error" not in r]
        base = rows[0]["test_acc"]
        for r in rows:
            if r["method"] != "ours":
                continue
            uniform = next((u for u in rows if u["method"] == "uniform" and u["target"] == r["target"]), None)
            ratio = r["callback_latency_ratio"]
            out[f"{name}@{r['target']:g}"] = {
                "measured_within_5pct_of_target": abs(ratio / r["target"] - 1) <= tolerance,
                "retimed_within_5pct_of_target": abs(r["latency_ratio"] / r["target"] - 1) <= tolerance,
                "accuracy_drop_at_most_1_point": base - r["test_acc"] <= 0.01,
                "points_better_than_uniform": None if uniform is None else 100 * (r["test_acc"] - uniform["test_acc"]),
                "search_plus_finetune_s": r["search_s"] + r["finetune_s"],
            }
    return out


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compression on digits 32 px (latency: TVM llvm, batch 1, untuned)")
    # "latency ×": re-timed after fine-tuning; "search ×": what the callback measured for its choice
    for col in ("model", "method", "target", "test acc", "Δacc", "latency ×", "search ×", "size kB", "search s", "fine-tune s"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for name, res in results.items():
        base = res["rows"][0]["test_acc"]
        for r in res["rows"]:
            if "error" in r:
                table.add_row(name, r["method"], f"{r['target']:g}", "out of reach", "", "", "", "", "", "")
                continue
            table.add_row(
                name,
                r["method"],
                f"{r['target']:g}",
                f"{r['test_acc']:.4f}",
                f"{100 * (r['test_acc'] - base):+.1f}",
                f"{r['latency_ratio']:.3f}",
                f"{r['callback_latency_ratio']:.3f}" if "callback_latency_ratio" in r else "",
                f"{r['size_kb']:.1f}",
                f"{r['search_s']:.0f}",
                f"{r['finetune_s']:.0f}",
            )
    Console(width=140).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
