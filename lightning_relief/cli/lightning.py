"""LightningCLI with recipe lookup, one-line errors and ``test_after_fit``."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_relief.cli import bounded_yaml, recipes
from lightning_relief.cli.errors import fail, summarize

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_source: str | None = None  # the recipe being run, named in error messages


class ReliefArgumentParser(LightningArgumentParser):
    """Reports a bad recipe or option as one line naming the file and key, exit code 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        key, cause = summarize(message)
        fail(cause, source=_source, key=key)


class ReliefCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, test the best checkpoint on the datamodule's test split.",
        )

    def instantiate_classes(self) -> None:
        # Constructors validate their arguments; a ValueError/TypeError here is the recipe's fault.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError) as err:
            key, cause = summarize(str(err))
            fail(cause, source=_source, key=key or _section_of(err))

    def _run_subcommand(self, subcommand: str) -> None:
        # A callback or module that rejects the configuration in its `setup` hook (e.g. a compression
        # start epoch past max_epochs) is the recipe's fault too: one line, exit 2, no empty log folders.
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError) as err:
            hooks = {frame.name for frame in traceback.extract_tb(err.__traceback__)}
            if not hooks & {"_call_setup_hook", "_call_configure_model"}:
                raise
            _remove_empty_run_folders(self.trainer)
            key, cause = summarize(str(err))
            fail(f"{type(err).__name__}: {cause}", source=_source, key=key)

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", None)
            ckpt = "best" if best else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def _remove_empty_run_folders(trainer: L.Trainer) -> None:
    """Remove the log and checkpoint folders a failed start left empty (never above the working directory)."""
    cwd = Path.cwd().resolve()
    folders = [getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) for logger in trainer.loggers]
    folders += [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    for folder in filter(None, folders):
        path = Path(folder).resolve()
        while path != cwd and cwd in path.parents and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent


def _section_of(err: Exception) -> str | None:
    """Which top-level section (model, data, trainer) a constructor error came from."""
    text = str(err)
    for section, marker in (("model", "LightningModule"), ("data", "LightningDataModule"), ("trainer", "Trainer")):
        if marker in text:
            return section
    return None


def _resolve_configs(args: list[str]) -> list[str]:
    """Replace recipe names after ``--config``/``-c`` by their paths; fail on missing files."""
    global _source
    out = list(args)
    for i, arg in enumerate(args):
        value, prefix = None, ""
        if arg in ("--config", "-c") and i + 1 < len(args):
            value, index = args[i + 1], i + 1
        elif arg.startswith("--config="):
            value, index, prefix = arg.split("=", 1)[1], i, "--config="
        if value is None:
            continue
        path = recipes.resolve(value)
        if path is None:
            shipped = ", ".join(recipes.available()) or "none"
            fail(f"recipe file not found (shipped recipes: {shipped})", source=value)
        out[index] = prefix + str(path)
        _source = str(path)
    return out


def run_lightning_cli(args: Sequence[str], **kwargs: Any) -> ReliefCLI:
    """Parse ``args`` (recipe names resolved), instantiate and run the subcommand.

    Recipes and option values are read with :mod:`~lightning_relief.cli.bounded_yaml`
    (no alias bombs, bounded size and depth).
    """
    args = _resolve_configs(list(args))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    bounded_yaml.register()
    kwargs["parser_kwargs"] = {"parser_mode": bounded_yaml.MODE, **kwargs.get("parser_kwargs", {})}
    return ReliefCLI(
        model_class=None,
        datamodule_class=L.LightningDataModule,
        subclass_mode_data=True,
        parser_class=ReliefArgumentParser,
        save_config_kwargs={"overwrite": True},
        args=args,
        **kwargs,
    )
