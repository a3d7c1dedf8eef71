"""``relief export --ckpt PATH --target T --out DIR``: a checkpoint → a TVM artifact.

Loads the checkpoint with its LightningModule class (``ClassifierModule`` unless
``--module-class`` names another), compiles it for the target, checks parity
on a real batch (the checkpoint's datamodule, rebuilt from its saved
hyperparameters with ``--data``; else random inputs), saves the artifact and
prints its latency. The checkpoint file is only read.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_relief.cli.errors import fail
from lightning_relief.errors import UntrustedClassPathError
from lightning_relief.trust import resolve_class

_DEFAULT_MODULE = "lightning_relief.models.classifier.ClassifierModule"


class _Defaults:  # ExportConfig's defaults, read without importing torch for `--help`
    def __getattr__(self, name: str) -> Any:
        import dataclasses

        from lightning_relief.deploy.config import ExportConfig

        defaults = {f.name: f.default for f in dataclasses.fields(ExportConfig)}
        if name not in defaults:
            raise AttributeError(name)  # a KeyError here breaks inspect/doctest, which probe attributes
        return defaults[name]


_DEFAULTS = _Defaults()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relief export", description="Compile a checkpoint for a target with Apache TVM.")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint to export")
    p.add_argument(
        "--target",
        default=_DEFAULTS.target,
        help='TVM target: "llvm" (this CPU), a board (rpi4, x86-avx2, x86-avx512), a JSON dict, or "llvm -mtriple=... -mcpu=..."',
    )
    p.add_argument("--backend", default=_DEFAULTS.backend, help='"tvm", "onnxruntime", or a Backend class path')
    p.add_argument("--out", required=True, help="artifact folder (model.so, params.npz, metadata.json)")
    p.add_argument("--module-class", default=_DEFAULT_MODULE, help="LightningModule class path to load the checkpoint with")
    p.add_argument(
        "--input-shape", default=None, help="compile for this input shape, e.g. 1,1,8,8 (default: from the data or model)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="datamodule class path, rebuilt from the checkpoint's hyperparameters, for a real parity batch (e.g. lightning_relief.DigitsDataModule)",
    )
    p.add_argument("--tuning-trials", type=int, default=0, help="MetaSchedule trials (0: untuned code)")
    p.add_argument("--tuning-dir", default=None, help="tuning database folder, reused across runs (default .relief_cache/tuning)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--atol", type=float, default=_DEFAULTS.atol)
    p.add_argument("--rtol", type=float, default=_DEFAULTS.rtol)
    p.add_argument("--min-top1", type=float, default=_DEFAULTS.min_top1_agreement, help="minimum top-1 agreement with PyTorch")
    p.add_argument("--repeat", type=int, default=_DEFAULTS.repeat)
    p.add_argument("--number", type=int, default=_DEFAULTS.number)
    p.add_argument(
        "--time-batch",
        type=int,
        default=_DEFAULTS.time_batch,
        help="batch size to time (default %(default)s; 0: the batch of the data or --input-shape)",
    )
    return p


def _import(path: str, option: str, base: type) -> Any:
    try:
        return resolve_class(path, base, key=f"--{option}", typed_by_user=True)
    except UntrustedClassPathError as err:
        fail(err.reason, key=option)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        fail(f"--input-shape must be comma-separated integers, got {text!r}", key="input-shape")
    if not shape or min(shape) < 1:
        fail(f"--input-shape must be positive integers, got {text!r}", key="input-shape")
    return shape


def _data_batch(data_class: str, checkpoint: dict[str, Any]) -> Any:
    import lightning as L

    cls = _import(data_class, "data", L.LightningDataModule)
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    try:
        dm = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
        dm.setup("validate")
        batch = next(iter(dm.val_dataloader()))
    except Exception as err:  # any datamodule error: report it as one line
        fail(f"cannot build {data_class} from the checkpoint's hyperparameters: {err}", key="data")
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    import torch

    from lightning_relief.deploy import DeployError, ExportConfig, TuningConfig
    from lightning_relief.deploy.export import export_model
    from lightning_relief.deploy.quantized import default_example_input

    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        fail("checkpoint file not found", source=str(ckpt))
    if args.tuning_trials < 0:
        fail(f"--tuning-trials must be >= 0, got {args.tuning_trials}", key="tuning-trials")
    tuning = TuningConfig(trials=args.tuning_trials, work_dir=args.tuning_dir) if args.tuning_trials else None
    try:
        config = ExportConfig(
            target=args.target,
            tuning=tuning,
            verify=not args.no_verify,
            atol=args.atol,
            rtol=args.rtol,
            min_top1_agreement=args.min_top1,
            repeat=args.repeat,
            number=args.number,
            time_batch=args.time_batch or None,
            backend=args.backend,
        )
    except (ValueError, TypeError) as err:
        fail(str(err), key="target" if "target" in str(err) else "options")
    import lightning as L

    module_class = _import(args.module_class, "module-class", L.LightningModule)
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        module = module_class.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, refused pickle or class path, wrong class, missing hyperparameters
        fail(f"cannot load the checkpoint with {args.module_class}: {type(err).__name__}: {err}", source=str(ckpt))
    module.eval()
    batch = _data_batch(args.data, checkpoint) if args.data else None
    if args.input_shape:
        example = torch.randn(_shape(args.input_shape), generator=torch.Generator().manual_seed(0))
    elif batch is not None:
        example = batch
    else:
        try:
            example = torch.randn_like(default_example_input(getattr(module, "model", module)))
        except ValueError as err:
            fail(str(err) + " (use --input-shape)", key="input-shape")
    verify = batch if batch is not None else torch.randn((16, *example.shape[1:]), generator=torch.Generator().manual_seed(1))
    try:
        summary = export_model(module, example, args.out, config, verify_batch=verify, source_checkpoint=ckpt)
    except (DeployError, ValueError) as err:
        fail(str(err), source=str(ckpt))
    print(json.dumps(summary, indent=2, default=str))
    return 0
