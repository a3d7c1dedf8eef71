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
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lightning_relief.cli import bounded_yaml, recipes
from lightning_relief.cli.errors import fail, summarize

NOISES = {
    "additive": "lightning_relief.noise.models:AdditiveGaussian",
    "multiplicative": "lightning_relief.noise.models:MultiplicativeGaussian",
    "combined": "lightning_relief.noise.models:CombinedGaussian",
    "weight": "lightning_relief.noise.models:WeightNoise",
    "pcm": "lightning_relief.noise.pcm:PCMNoise",
}


def _noise_class(name: str) -> type:
    module_name, _, class_name = NOISES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relief robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the trained model")
    parser.add_argument("--config", required=True, help="the recipe it was trained with (path or shipped name)")
    parser.add_argument(
        "--noise", choices=sorted(NOISES), help="noise model (default: the recipe's strategy noise, else additive)"
    )
    parser.add_argument("--levels", type=float, nargs="+", help="σ values for Gaussian noise")
    parser.add_argument("--times", type=float, nargs="+", help="seconds since programming for --noise pcm")
    parser.add_argument("--repeats", type=int, default=5, help="noisy evaluations per level (default 5)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="data split (default test)")
    parser.add_argument(
        "--placement",
        nargs="+",
        choices=("weights", "outputs", "activations"),
        help="noise sites (default: the recipe's or the noise model's)",
    )
    parser.add_argument("--out", default=None, help="directory for the JSON and PNG (default: next to the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _sections(config: dict[str, Any], source: str) -> Any:
    """The recipe's model class, datamodule, noise and placement, typed and built as ``relief fit``
    builds them (jsonargparse against the constructors' signatures): a class path of the
    wrong kind is refused before it is called."""
    import lightning as L
    from jsonargparse import ArgumentParser, Namespace
    from jsonargparse.typing import import_object

    from lightning_relief.noise.models import NoiseModel
    from lightning_relief.noise.placement import Placement

    bounded_yaml.register()
    parser = ArgumentParser(exit_on_error=False, parser_mode=bounded_yaml.MODE)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True, instantiate=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    # typing.Optional/Union: jsonargparse reads these types at run time
    parser.add_argument("--noise", type=Optional[NoiseModel], default=None)  # noqa: UP045
    parser.add_argument("--placement", type=Optional[Union[Placement, str, Sequence[Union[Placement, str]]]], default=None)  # noqa: UP007, UP045
    strategy = (config.get("trainer") or {}).get("strategy")
    strategy_args = (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}
    given = {
        "model": config["model"],
        "data": config["data"],
        "noise": strategy_args.get("noise"),
        "placement": strategy_args.get("placement"),
    }
    try:
        built = parser.instantiate_classes(parser.parse_object(given))
    except (ArgumentError, ValueError, TypeError, ImportError) as err:
        key, cause = summarize(str(err))
        if key in ("noise", "placement"):
            key = f"trainer.strategy.init_args.{key}"
        fail(cause, source=source, key=key)
    model = built.model
    model_cls = import_object(model.class_path if isinstance(model, Namespace) else model["class_path"])
    return model_cls, built.data, built.noise, built.placement


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
        config = bounded_yaml.load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        fail(f"not valid YAML: {err}", source=source)
    if not isinstance(config, dict):
        fail(f"a recipe is a mapping, got {type(config).__name__}", source=source)
    for key in ("model", "data"):
        if not isinstance(config.get(key), dict) or "class_path" not in config[key]:
            fail(f"the recipe needs a '{key}' section with a class_path", source=source, key=key)
    if args.repeats < 1:
        fail(f"--repeats must be >= 1, got {args.repeats}", key="repeats")

    model_cls, datamodule, recipe_noise, recipe_placement = _sections(config, source)
    noise_cls = _noise_class(args.noise or "additive")
    if recipe_noise is not None and (args.noise is None or type(recipe_noise) is noise_cls):
        noise = recipe_noise  # the recipe's settings (out_noise, g_max...) unless another model is asked for
    else:
        noise = noise_cls()
    placement = args.placement
    if placement is None and noise is recipe_noise:
        placement = recipe_placement

    from lightning_relief.noise.evaluate import evaluate_robustness

    try:
        module = model_cls.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    except Exception as err:
        fail(f"cannot load the checkpoint as {model_cls.__name__}: {type(err).__name__}: {err}", source=str(ckpt))
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
        print(
            f"relief: note: {type(noise).__name__} is swept over {'--times' if noise.level_kind == 'time' else '--levels'}; the other option was ignored"
        )
    print(f"wrote {out}/robustness_{type(noise).__name__.lower()}.json and .png")
    return 0
