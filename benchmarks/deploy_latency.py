"""Latency of the reference models through TVM, against PyTorch eager and ONNX Runtime.

For LeNet-5 (32 px, the reference CNN), ResNet-20 (32 px) and the MLP (8 px),
at batch 1 and 64, in one run and on the same threads: PyTorch eager, ONNX
Runtime, TVM untuned, TVM tuned (MetaSchedule) and int8 TVM tuned (the model
quantized with brevitas through ``lightning_relief.compress.quantize``, lowered
to integer arithmetic by ``lower_quantized``). Prints a table of medians and
ratios and writes ``benchmarks/results/deploy_latency.json``.

The tuning database lives in ``benchmarks/tuning_db`` and is reused: a second
run only applies it (operators already tuned are not tuned again).

    python benchmarks/deploy_latency.py            # full run (budgets below)
    python benchmarks/deploy_latency.py --quick    # MLP, batch 1, 4 trials: a smoke run
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
    p.add_argument("--population", type=int, default=64, help="evolutionary search population per round (TVM default 512)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--number", type=int, default=20, help="runs per repeat (fewer for slow cases, see --max-repeat-ms)")
    p.add_argument("--max-repeat-ms", type=float, default=500.0, help="cap on one repeat: slow cases run fewer times")
    p.add_argument("--tuning-db", default=str(HERE / "tuning_db"))
    p.add_argument("--out", default=None, help="default results/deploy_latency.json (--quick: results/quick/)")
    p.add_argument("--models", default="lenet5,resnet20,mlp")
    p.add_argument("--batches", default="1,64")
    return p.parse_args()


ARGS = parse()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM's thread pool starts

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_relief.data import DigitsDataModule  # noqa: E402
from lightning_relief.deploy import TuningConfig, compile_for_target, lower_quantized, measure_latency  # noqa: E402
from lightning_relief.deploy.targets import host_target_dict  # noqa: E402
from lightning_relief.models import MLP, LeNet5, resnet20  # noqa: E402
from _machine import machine_info  # noqa: E402
from _results import result_path  # noqa: E402

torch.set_num_threads(ARGS.threads)


def build(name: str) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    if name == "lenet5":
        return LeNet5(input_size=32).eval(), 32
    if name == "resnet20":
        return resnet20().eval(), 32
    if name == "mlp":
        return MLP().eval(), 8
    raise ValueError(f"unknown model {name!r}")


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


def onnxruntime_ms(model, x, workdir: Path) -> list[float]:
    import onnxruntime as ort

    path = workdir / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ARGS.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    out = session.run(None, feed)[0]
    with torch.inference_mode():
        assert np.allclose(out, model(x).numpy(), atol=1e-4), "ONNX Runtime output differs from PyTorch"
    return time_callable(lambda: session.run(None, feed), ARGS.repeat, ARGS.number)


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
            model, size = build(name)
            dm = DigitsDataModule(batch_size=64, size=size, seed=0)
            dm.setup()
            data = next(iter(dm.test_dataloader()))[0]
            qmodel = quantized_copy(model, size, next(iter(dm.train_dataloader()))[0])
            for batch in batches:
                x = data[:batch].contiguous()
                budget = trials_ref if (name == "lenet5" and batch == 1) else trials
                tuning = TuningConfig(trials=budget, work_dir=ARGS.tuning_db, population_size=ARGS.population, genetic_iters=2)
                row = {"model": name, "batch": batch, "input": list(x.shape), "trials": budget}
                print(f"[{time.time() - started:6.0f}s] {name} batch {batch}: eager, onnxruntime", flush=True)
                row["eager_ms"] = statistics.median(eager_ms(model, x))
                row["onnxruntime_ms"] = statistics.median(onnxruntime_ms(model, x, workdir))
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
                row["fp32_artifact_bytes"] = artifact_bytes(tuned, workdir, f"{name}{batch}fp32")
                row["int8_artifact_bytes"] = artifact_bytes(int8, workdir, f"{name}{batch}int8")
                for key in ("onnxruntime_ms", "tvm_untuned_ms", "tvm_tuned_ms", "tvm_int8_tuned_ms"):
                    row[key.replace("_ms", "_vs_eager")] = row[key] / row["eager_ms"]
                row["tvm_tuned_vs_onnxruntime"] = row["tvm_tuned_ms"] / row["onnxruntime_ms"]
                row["int8_vs_fp32_tuned"] = row["tvm_int8_tuned_ms"] / row["tvm_tuned_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, target, time.time() - started, trials_ref, trials)
    return 0


def report(rows: list[dict], target: dict, seconds: float, trials_ref: int, trials: int) -> None:
    header = f"{'model':<9}{'batch':>6}{'eager':>10}{'ORT':>10}{'TVM':>10}{'TVM tuned':>11}{'int8 tuned':>11}" \
             f"{'tuned/eager':>12}{'tuned/ORT':>10}{'int8/fp32':>10}"
    print("\nmedian latency in ms (threads=%d)\n" % ARGS.threads + header)
    for r in rows:
        print(f"{r['model']:<9}{r['batch']:>6}{r['eager_ms']:>10.4f}{r['onnxruntime_ms']:>10.4f}{r['tvm_untuned_ms']:>10.4f}"
              f"{r['tvm_tuned_ms']:>11.4f}{r['tvm_int8_tuned_ms']:>11.4f}{r['tvm_tuned_vs_eager']:>12.2f}"
              f"{r['tvm_tuned_vs_onnxruntime']:>10.2f}{r['int8_vs_fp32_tuned']:>10.2f}")
    ref = next((r for r in rows if r["model"] == "lenet5" and r["batch"] == 1), None)
    goals = {}
    if ref is not None:
        goals = {
            "lenet5_b1_tvm_tuned_vs_eager_le_0.5": ref["tvm_tuned_vs_eager"] <= 0.5,
            "lenet5_b1_tvm_tuned_vs_onnxruntime_le_1.0": ref["tvm_tuned_vs_onnxruntime"] <= 1.0,
            "lenet5_b1_int8_faster_than_fp32_tuned": ref["tvm_int8_tuned_ms"] < ref["tvm_tuned_ms"],
        }
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
        "settings": {"threads": ARGS.threads, "repeat": ARGS.repeat, "number": ARGS.number, "max_repeat_ms": ARGS.max_repeat_ms,
                     "trials_lenet5_batch1": trials_ref, "trials_other": trials, "target": target,
                     "search": {"population_size": ARGS.population, "genetic_iters": 2, "only_compute_heavy": True},
                     "tuning_db": os.path.relpath(ARGS.tuning_db, Path.cwd()), "wall_seconds": round(seconds)},
        "goals": goals,
        "rows": rows,
    }
    out = Path(ARGS.out) if ARGS.out else result_path("deploy_latency.json", ARGS.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
