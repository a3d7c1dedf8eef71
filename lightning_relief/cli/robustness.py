"""``relief robustness --ckpt CKPT --config RECIPE``: a trained model under analog noise and drift.

The recipe supplies the model class and the data (its ``model`` and ``data``
sections) and, when it trains with ``AnalogNoiseStrategy``, the noise model
and placement; ``--noise`` overrides them. Gaussian noise is swept over σ
(``--levels``), PCM over time since programming (``--times``, with and without
global drift compensation). A rich table is printed; JSON and PNG go to ``--out``.

    relief robustness --ckpt runs/vant/last.ckpt --config recipes/vant_digits.yaml --levels 0 0.1 0.3 0.5
    relief robustness --ckpt runs/pcm/last.ckpt --config analog_pcm_digits --noise pcm --times 1 3600 86400 31536000
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_relief.cli import recipes
from lightning_relief.cli.errors import fail

NOISES = {
    "additive": "lightning_relief.noise.models:AdditiveGaussian",
    "multiplicative": "lightning_relief.noise.models:MultiplicativeGaussian",
    "combined": "lightning_relief.noise.models:CombinedGaussian",
    "weight": "lightning_relief.noise.models:WeightNoise",
    "pcm": "lightning_relief.noise.pcm:PCMNoise",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relief robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the trained model")
    parser.add_argument("--config", required=True, help="the recipe it was trained with (path or shipped name)")
    parser.add_argument("--noise", choices=sorted(NOISES), help="noise model (default: the recipe's strategy noise, else additive)")
    parser.add_argument("--levels", type=float, nargs="+", help="σ values for Gaussian noise")
    parser.add_argument("--times", type=float, nargs="+", help="seconds since programming for --noise pcm")
    parser.add_argument("--repeats", type=int, default=5, help="noisy evaluations per level (default 5)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="data split (default test)")
    parser.add_argument("--placement", nargs="+", choices=("weights", "outputs", "activations"), help="noise sites (default: the recipe's or the noise model's)")
    parser.add_argument("--out", default=None, help="directory for the JSON and PNG (default: next to the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _import(path: str, source: str, key: str) -> Any:
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        fail(f"cannot import {path!r}: {err}", source=source, key=key)


def _instantiate(spec: Any, source: str, key: str) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested specs too)."""
    if isinstance(spec, list):
        return [_instantiate(s, source, key) for s in spec]
    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    cls = _import(spec["class_path"], source, key)
    args = {k: _instantiate(v, source, f"{key}.init_args.{k}") for k, v in (spec.get("init_args") or {}).items()}
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        fail(f"{type(err).__name__}: {err}", source=source, key=key)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    config_path = recipes.resolve(args.config)
    if config_path is None:
        fail(f"recipe file not found (shipped recipes: {', '.join(recipes.available()) or 'none'})", source=args.config)
    source = str(config_path)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        fail("checkpoint file not found", source=str(ckpt))
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        fail(f"not valid YAML: {err}", source=source)
    for key in ("model", "data"):
        if not isinstance(config.get(key), dict) or "class_path" not in config[key]:
            fail(f"the recipe needs a '{key}' section with a class_path", source=source, key=key)
    if args.repeats < 1:
        fail(f"--repeats must be >= 1, got {args.repeats}", key="repeats")

    strategy = (config.get("trainer") or {}).get("strategy")
    strategy_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    if args.noise is not None:
        noise = _import(NOISES[args.noise], source, "noise")()
    elif "noise" in strategy_args:
        noise = _instantiate(strategy_args["noise"], source, "trainer.strategy.init_args.noise")
    else:
        noise = _import(NOISES["additive"], source, "noise")()
    placement = args.placement
    if placement is None and args.noise is None and "placement" in strategy_args:
        placement = _instantiate(strategy_args["placement"], source, "trainer.strategy.init_args.placement")

    from lightning_relief.noise.evaluate import evaluate_robustness

    model_cls = _import(config["model"]["class_path"], source, "model.class_path")
    try:
        module = model_cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any load failure is the user's checkpoint/recipe mismatch
        fail(f"cannot load the checkpoint as {model_cls.__name__}: {type(err).__name__}: {err}", source=str(ckpt))
    datamodule = _instantiate(config["data"], source, "data")
    out = Path(args.out) if args.out else ckpt.parent / "robustness"
    try:
        evaluate_robustness(
            module,
            datamodule,
            noise,
            levels=args.levels if noise.level_kind != "time" else None,
            times=args.times if noise.level_kind == "time" else None,
            repeats=args.repeats,
            placement=placement,
            split=args.split,
            seed=args.seed,
            out_dir=out,
            name=f"robustness_{type(noise).__name__.lower()}",
        )
    except (ValueError, TypeError) as err:
        fail(f"{type(err).__name__}: {err}", source=source)
    if (args.levels and noise.level_kind == "time") or (args.times and noise.level_kind != "time"):
        print(f"relief: note: {type(noise).__name__} is swept over {'--times' if noise.level_kind == 'time' else '--levels'}; the other option was ignored")
    print(f"wrote {out}/robustness_{type(noise).__name__.lower()}.json and .png")
    return 0
