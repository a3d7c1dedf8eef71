"""Latency of models through TVM, against PyTorch eager and ONNX Runtime.

Our reference models (LeNet-5 32 px, ResNet-20 32 px, the MLP 8 px) and models the project did
not write (torchvision ``resnet18`` and ``mobilenet_v3_small`` at 32 px, the MNIST-1D CNN), at
the batch sizes asked, in one run and on the same threads: PyTorch eager, ONNX Runtime (through
the backend seam, ``OnnxRuntimeBackend``), TVM untuned, TVM tuned (MetaSchedule) and, for our
models, int8 TVM tuned (quantized with brevitas through ``lightning_relief.compress.quantize``,
lowered to integer arithmetic by ``lower_quantized``). Also the cost of a Python call of the
tuned model above TVM's own timer. Prints a table of medians and ratios and writes
``benchmarks/results/deploy_latency.json``.

    python benchmarks/deploy_latency.py --models resnet18,mobilenet_v3_small,mnist1d_cnn,lenet5 --batches 1

The tuning database lives in ``benchmarks/tuning_db`` and is reused: a second
run only applies it (operators already tuned are not tuned again).

    python benchmarks/deploy_latency.py            # full run (budgets below)
    python benchmarks/deploy_latency.py --quick    # MLP, batch 1, 4 trials: a smoke run
    python benchmarks/deploy_latency.py --curve lenet5   # latency versus tuning time (JSON and PNG)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MLP at batch 1 only, 4 tuning trials")
    p.add_argument("--threads", type=int, default=1, help="threads for every framework (default 1)")
    p.add_argument("--trials-reference", type=int, default=64, help="MetaSchedule trials for LeNet-5 at batch 1")
    p.add_argument("--trials", type=int, default=16, help="MetaSchedule trials for every other tuned compile")
    p.add_argument(
        "--trials-per-round",
        type=int,
        default=4,
        help="candidates per round of one operator; after a round each, rounds go where latency x weight is",
    )
    p.add_argument("--population", type=int, default=64, help="evolutionary search population per round (TVM default 512)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--number", type=int, default=20, help="runs per repeat (fewer for slow cases, see --max-repeat-ms)")
    p.add_argument("--max-repeat-ms", type=float, default=500.0, help="cap on one repeat: slow cases run fewer times")
    p.add_argument("--tuning-db", default=str(HERE / "tuning_db"))
    p.add_argument("--out", default=None, help="default results/deploy_latency.json (--quick: results/quick/)")
    p.add_argument(
        "--models", default="lenet5,resnet20,mlp", help="any of lenet5, resnet20, mlp, resnet18, mobilenet_v3_small, mnist1d_cnn"
    )
    p.add_argument("--int8-models", default="lenet5,resnet20,mlp", help="models also timed int8 (brevitas lowering)")
    p.add_argument("--batches", default="1,64")
    p.add_argument(
        "--curve",
        default=None,
        metavar="MODEL",
        help="instead of the table: latency versus tuning time for MODEL at batch 1, from a fresh database",
    )
    p.add_argument(
        "--curve-from-log",
        default=None,
        metavar="DB",
        help="instead of the table: MetaSchedule's own latency estimate after each round of the tuning run "
        "logged in DB/logs (one run, any model), against tuning time",
    )
    p.add_argument(
        "--curve-steps",
        default="8,8,16,32,64",
        help="trials added per step (each step tunes every task again, seeded by the database)",
    )
    return p.parse_args()


ARGS = parse()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM's thread pool starts

import torch  # noqa: E402
from _machine import machine_info  # noqa: E402
from _results import result_path  # noqa: E402

from lightning_relief.data import DigitsDataModule  # noqa: E402
from lightning_relief.deploy import (  # noqa: E402
    ExportConfig,
    OnnxRuntimeBackend,
    TuningConfig,
    compile_for_target,
    lower_quantized,
    measure_latency,
)
from lightning_relief.deploy.targets import host_target_dict  # noqa: E402
from lightning_relief.models import MLP, LeNet5, resnet20  # noqa: E402

torch.set_num_threads(ARGS.threads)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (random weights, eval mode), 64 real test inputs and 64 training inputs for calibration."""
    import torchvision

    from lightning_relief.data import MNIST1DDataModule
    from lightning_relief.models import MNIST1DCNN

    torch.manual_seed(0)
    builders = {
        "lenet5": (lambda: LeNet5(input_size=32), 32, 1),
        "resnet20": (resnet20, 32, 1),
        "mlp": (MLP, 8, 1),
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32, 3),
        "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32, 3),
        "mnist1d_cnn": (MNIST1DCNN, None, None),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(builders)}")
    make, size, channels = builders[name]
    model = make().eval()
    if size is None:
        dm = MNIST1DDataModule(batch_size=64)
    else:
        dm = DigitsDataModule(batch_size=64, size=size, channels=channels, seed=0)
    dm.setup()
    return model, next(iter(dm.test_dataloader()))[0], next(iter(dm.train_dataloader()))[0]


def number_for(single_ms: float) -> int:
    """Runs per repeat, so that a repeat stays under --max-repeat-ms (untuned code at batch 64 is slow)."""
    return max(1, min(ARGS.number, int(ARGS.max_repeat_ms / max(single_ms, 1e-6))))


def tvm_ms(compiled, x) -> float:
    single = compiled.time(x, repeat=1, number=1)[0] * 1e3
    return measure_latency(compiled, x, repeat=ARGS.repeat, number=number_for(single), cache=False).median_ms


def time_callable(fn, repeat: int, number: int) -> list[float]:
    start = time.perf_counter()
    fn()  # warm-up, as TVM's time evaluator does
    number = min(number, number_for((time.perf_counter() - start) * 1e3))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e3)
    return runs


def eager_ms(model, x) -> list[float]:
    with torch.inference_mode():
        return time_callable(lambda: model(x), ARGS.repeat, ARGS.number)


def onnxruntime_call(model, x) -> tuple[object, float]:
    """ONNX Runtime through the backend seam: a call of the session on ``x``, and its max abs error against PyTorch."""
    artifact = OnnxRuntimeBackend(threads=ARGS.threads).compile(model, x, ExportConfig(target="llvm"))
    with torch.inference_mode():
        error = float((artifact(x) - model(x)).abs().max())
    assert error <= 1e-4, f"ONNX Runtime output differs from PyTorch by {error}"
    feed = {artifact.session.get_inputs()[0].name: x.numpy()}
    return lambda: artifact.session.run(None, feed), error


def side_by_side(calls: dict, rounds: int, min_round_ms: float = 20.0) -> dict[str, float]:
    """Fastest per-call ms of each call over ``rounds`` alternating rounds (each at least ``min_round_ms``).

    This machine's speed drifts from one second to the next (other jobs on its two cores):
    interference only adds time, so the fastest round of each, taken in alternation, is the
    steady figure, and ratios of them compare like with like (see ``deploy.compare_latency``).
    """
    numbers = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call(1)
        numbers[name] = max(1, int(min_round_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            best[name] = min(best[name], call(numbers[name]))
    return best


def per_call_ms(fn):
    """``fn`` as a call of ``n`` runs returning ms per run."""

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e3

    return run


def call_overhead_us(compiled, x, rounds: int = 60, round_ms: float = 10.0) -> dict[str, float]:
    """What a Python call (torch tensor in and out) costs above TVM's own timer, in microseconds.

    Each round is ``n`` Python calls in a loop and, right after, ``n`` runs timed by TVM's time
    evaluator in C++ (bound once: ``invoke_stateful`` on inputs set beforehand). This machine's speed
    drifts by more than the overhead itself on a model of milliseconds (1 % of resnet18 is 50 us),
    so only adjacent halves of a round are compared, and the median of the rounds' differences is
    the figure (``n`` makes a half about ``round_ms``; ``single_call`` is the same with ``n = 1``).
    ``fastest_us`` is the fastest call round less the fastest timer round (interference only adds time).
    """
    import tvm

    compiled(x)
    vm = compiled.vm
    vm.set_input("main", tvm.runtime.tensor(x.numpy(), compiled.device), *compiled.device_params())
    start = time.perf_counter()
    compiled(x)
    n = max(1, int(round_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    result = {"calls_per_round": n, "rounds": rounds}
    for label, number in (("median_us", n), ("single_call_us", 1)):
        timer = vm.time_evaluator("invoke_stateful", compiled.device, number=number, repeat=1)
        timer("main")
        diffs, calls, timers = [], [], []
        for _ in range(rounds if number > 1 else rounds * 4):
            start = time.perf_counter()
            for _ in range(number):
                compiled(x)
            calls.append((time.perf_counter() - start) / number)
            timers.append(float(timer("main").mean))
            diffs.append((calls[-1] - timers[-1]) * 1e6)
        result[label] = float(statistics.median(diffs))
        if number > 1:
            result["fastest_us"] = (min(calls) - min(timers)) * 1e6
    return result


def quantized_copy(model, size: int, calibration: torch.Tensor):
    """8-bit weights and activations on every conv/linear, calibrated on digits."""
    import copy

    from lightning_relief.compress.quantize import calibrate_activations, quantize_layers

    q = copy.deepcopy(model)
    layers = {n: 8 for n, m in q.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    quantize_layers(q, layers)
    calibrate_activations(q, [calibration])
    return q.eval()


def artifact_bytes(compiled, workdir: Path, name: str) -> int:
    path = compiled.save(workdir / name)
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> int:
    models = ["mlp"] if ARGS.quick else ARGS.models.split(",")
    batches = [1] if ARGS.quick else [int(b) for b in ARGS.batches.split(",")]
    trials_ref, trials = (4, 4) if ARGS.quick else (ARGS.trials_reference, ARGS.trials)
    target = {**host_target_dict(), "num-cores": ARGS.threads}
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in models:
            model, data, calibration = build(name)
            int8_too = name in ARGS.int8_models.split(",")
            qmodel = quantized_copy(model, 0, calibration) if int8_too else None
            for batch in batches:
                x = data[:batch].contiguous()
                budget = trials_ref if (name == "lenet5" and batch == 1) else trials
                tuning = TuningConfig(
                    trials=budget,
                    work_dir=ARGS.tuning_db,
                    population_size=ARGS.population,
                    genetic_iters=2,
                    trials_per_round=ARGS.trials_per_round,
                )
                row = {"model": name, "batch": batch, "input": list(x.shape), "trials": budget}
                print(f"[{time.time() - started:6.0f}s] {name} batch {batch}: eager, onnxruntime", flush=True)
                row["eager_ms"] = statistics.median(eager_ms(model, x))
                ort_call, row["onnxruntime_max_abs_error"] = onnxruntime_call(model, x)
                row["onnxruntime_ms"] = statistics.median(time_callable(ort_call, ARGS.repeat, ARGS.number))
                print(f"[{time.time() - started:6.0f}s] {name} batch {batch}: TVM untuned", flush=True)
                untuned = compile_for_target(model, x, target, dynamic_batch=False)
                row["tvm_untuned_ms"] = tvm_ms(untuned, x)
                print(f"[{time.time() - started:6.0f}s] {name} batch {batch}: TVM tuned ({budget} trials)", flush=True)
                t0 = time.time()
                tuned = compile_for_target(model, x, target, tuning)
                row["tune_s"] = round(time.time() - t0, 1)
                row["tvm_tuned_ms"] = tvm_ms(tuned, x)
                with torch.inference_mode():
                    row["tvm_tuned_max_abs_error"] = float((tuned(x) - model(x)).abs().max())
                    row["tvm_tuned_top1_agreement"] = float((tuned(x).argmax(1) == model(x).argmax(1)).float().mean())
                # Python calls (torch tensor in and out) of each, fastest rounds side by side
                with torch.inference_mode():
                    best = side_by_side(
                        {
                            "eager": per_call_ms(lambda model=model, x=x: model(x)),
                            "onnxruntime": per_call_ms(ort_call),
                            "tvm_tuned_call": per_call_ms(lambda tuned=tuned, x=x: tuned(x)),
                        },
                        rounds=ARGS.repeat,
                    )
                row["side_by_side_ms"] = best
                row["python_call_ms"] = best["tvm_tuned_call"]
                overhead = call_overhead_us(tuned, x)
                row["call_overhead"] = overhead
                row["call_overhead_us"] = overhead["median_us"]
                row["fp32_artifact_bytes"] = artifact_bytes(tuned, workdir, f"{name}{batch}fp32")
                for key in ("onnxruntime_ms", "tvm_untuned_ms"):
                    row[key.replace("_ms", "_vs_eager")] = row[key] / row["eager_ms"]
                # the goals' ratios: Python calls of each, timed side by side
                row["tvm_tuned_vs_eager"] = best["tvm_tuned_call"] / best["eager"]
                row["tvm_tuned_vs_onnxruntime"] = best["tvm_tuned_call"] / best["onnxruntime"]
                if not int8_too:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                print(f"[{time.time() - started:6.0f}s] {name} batch {batch}: int8 TVM tuned ({budget} trials)", flush=True)
                lowered = lower_quantized(qmodel, x[:1])
                t0 = time.time()
                int8 = compile_for_target(lowered, x, target, tuning)
                row["int8_tune_s"] = round(time.time() - t0, 1)
                row["tvm_int8_tuned_ms"] = tvm_ms(int8, x)
                with torch.inference_mode():
                    ref = qmodel(x)
                    ref = ref.value if hasattr(ref, "value") else ref
                    row["int8_max_abs_error_vs_brevitas"] = float((int8(x) - ref).abs().max())
                    row["int8_top1_agreement_vs_fp32"] = float((int8(x).argmax(1) == model(x).argmax(1)).float().mean())
                row["int8_artifact_bytes"] = artifact_bytes(int8, workdir, f"{name}{batch}int8")
                row["tvm_int8_tuned_vs_eager"] = row["tvm_int8_tuned_ms"] / row["eager_ms"]
                row["int8_vs_fp32_tuned"] = row["tvm_int8_tuned_ms"] / row["tvm_tuned_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, target, time.time() - started, trials_ref, trials)
    return 0


def curve(name: str) -> int:
    """Latency after N trials: an untuned point, then steps that tune every task again from the records so far."""
    target = {**host_target_dict(), "num-cores": ARGS.threads}
    model, data, _ = build(name)
    x = data[:1].contiguous()
    steps = [int(s) for s in ARGS.curve_steps.split(",")]
    points = [{"trials": 0, "tune_s": 0.0, "tvm_ms": tvm_ms(compile_for_target(model, x, target, dynamic_batch=False), x)}]
    eager = statistics.median(eager_ms(model, x))
    print(f"{name}: eager {eager:.4f} ms, untuned TVM {points[0]['tvm_ms']:.4f} ms", flush=True)
    trials = tune_s = 0
    with tempfile.TemporaryDirectory() as db:
        for i, step in enumerate(steps):
            tuning = TuningConfig(
                trials=step,
                work_dir=db,
                population_size=ARGS.population,
                genetic_iters=2,
                retune=i > 0,
                trials_per_round=ARGS.trials_per_round,
            )
            t0 = time.time()
            compiled = compile_for_target(model, x, target, tuning)
            trials, tune_s = trials + step, tune_s + time.time() - t0
            points.append(
                {"trials": trials, "tune_s": round(tune_s, 1), "tasks": tuning.tuned_tasks, "tvm_ms": tvm_ms(compiled, x)}
            )
            print(f"[{tune_s:6.0f}s] {trials} trials: {points[-1]['tvm_ms']:.4f} ms", flush=True)
    result = {
        "benchmark": "deploy_latency_curve",
        "model": name,
        "batch": 1,
        "eager_ms": eager,
        "points": points,
        "machine": {**machine_info(), "load_average_at_end": os.getloadavg()},
        "settings": {
            "threads": ARGS.threads,
            "population_size": ARGS.population,
            "genetic_iters": 2,
            "steps": steps,
            "trials_per_round": ARGS.trials_per_round,
            "target": target,
        },
    }
    out = Path(ARGS.out) if ARGS.out else result_path("deploy_latency_curve.json", False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["tune_s"] for p in points], [p["tvm_ms"] for p in points], "o-", label="TVM (MetaSchedule)")
    for p in points:
        ax.annotate(str(p["trials"]), (p["tune_s"], p["tvm_ms"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(eager, color="gray", linestyle="--", label="PyTorch eager")
    ax.set(
        xlabel="tuning time (s, 2 shared cores)",
        ylabel="latency (ms, batch 1)",
        yscale="log",
        title=f"{name}: latency after N trials",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def curve_from_log(db: str) -> int:
    """Latency versus tuning time of one tuning run, from MetaSchedule's task-scheduler log: after each round
    it prints every task's best latency and their weighted sum (its estimate of the model's kernels); a point
    is taken once every task has a measurement."""
    import re
    from datetime import datetime

    log = next(Path(db, "logs").glob("*task_scheduler.log"))
    points, start, stamp, trials, unmeasured = [], None, None, 0, False
    for line in log.read_text().splitlines():
        if m := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
            start = start or stamp
        elif line.startswith(" ID |"):
            unmeasured = False
        elif " N/A " in line:
            unmeasured = True
        elif line.startswith("Total trials:"):
            trials = int(line.split(":")[1])
        elif line.startswith("Total latency (us):") and not unmeasured and trials:
            points.append(
                {"trials": trials, "tune_s": (stamp - start).total_seconds(), "estimated_ms": float(line.split(":")[1]) / 1e3}
            )
    result = {
        "benchmark": "deploy_latency_tuning_log_curve",
        "log": str(log),
        "points": points,
        "note": "MetaSchedule's sum over tasks of weight x best latency (kernels only, no call path)",
    }
    out = Path(ARGS.out) if ARGS.out else result_path("deploy_latency_tuning_log_curve.json", False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for p in points:
        print(f"{p['tune_s']:7.0f} s {p['trials']:5d} trials {p['estimated_ms']:.3f} ms")
    print(f"wrote {out}")
    return 0


def report(rows: list[dict], target: dict, seconds: float, trials_ref: int, trials: int) -> None:
    header = (
        f"{'model':<19}{'batch':>6}{'eager':>10}{'ORT':>10}{'TVM':>10}{'TVM tuned':>11}{'tune s':>8}{'int8 tuned':>11}"
        f"{'tuned/eager':>12}{'tuned/ORT':>10}{'call-timer us':>14}"
    )
    print(
        f"\nmedian latency in ms (threads={ARGS.threads}); tuned/eager, tuned/ORT and call-timer: fastest rounds side by side\n"
        + header
    )
    for r in rows:
        int8 = f"{r['tvm_int8_tuned_ms']:>11.4f}" if "tvm_int8_tuned_ms" in r else f"{'-':>11}"
        print(
            f"{r['model']:<19}{r['batch']:>6}{r['eager_ms']:>10.4f}{r['onnxruntime_ms']:>10.4f}{r['tvm_untuned_ms']:>10.4f}"
            f"{r['tvm_tuned_ms']:>11.4f}{r['tune_s']:>8.0f}{int8}{r['tvm_tuned_vs_eager']:>12.2f}"
            f"{r['tvm_tuned_vs_onnxruntime']:>10.2f}{r['call_overhead_us']:>14.1f}"
        )
    goals = {}
    for r in rows:  # the goals: tuned TVM <= 0.5x eager and <= 1.0x ORT at batch 1, <= 1.0x ORT at larger batches
        tag = f"{r['model']}_b{r['batch']}"
        if r["batch"] == 1:
            goals[f"{tag}_tvm_tuned_vs_eager_le_0.5"] = bool(r["tvm_tuned_vs_eager"] <= 0.5)
            goals[f"{tag}_call_overhead_le_20us"] = bool(r["call_overhead_us"] <= 20)
        goals[f"{tag}_tvm_tuned_vs_onnxruntime_le_1.0"] = bool(r["tvm_tuned_vs_onnxruntime"] <= 1.0)
        goals[f"{tag}_parity_1e-4_top1"] = bool(r["tvm_tuned_max_abs_error"] <= 1e-4 and r["tvm_tuned_top1_agreement"] == 1.0)
    print("\ngoals:", json.dumps(goals, indent=1))
    result = {
        "benchmark": "deploy_latency",
        "quick": ARGS.quick,
        "machine": {
            **machine_info(),
            "llvm_cpu": target.get("mcpu"),
            "load_average_at_end": os.getloadavg(),
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "settings": {
            "threads": ARGS.threads,
            "repeat": ARGS.repeat,
            "number": ARGS.number,
            "max_repeat_ms": ARGS.max_repeat_ms,
            "trials_lenet5_batch1": trials_ref,
            "trials_other": trials,
            "target": target,
            "search": {
                "population_size": ARGS.population,
                "genetic_iters": 2,
                "only_compute_heavy": True,
                "trials_per_round": ARGS.trials_per_round,
                "task_scheduler": "gradient",
            },
            "tuning_db": os.path.relpath(ARGS.tuning_db, Path.cwd()),
            "wall_seconds": round(seconds),
        },
        "goals": goals,
        "rows": rows,
    }
    out = Path(ARGS.out) if ARGS.out else result_path("deploy_latency.json", ARGS.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(curve(ARGS.curve) if ARGS.curve else curve_from_log(ARGS.curve_from_log) if ARGS.curve_from_log else main())
