"""Compile the trained model with TVM at the end of fit, verify it, save it, time it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_relief.deploy.config import ExportConfig
from lightning_relief.deploy.targets import TargetLike, resolve_target, target_key

_EXPORT_ON = ("fit_end", "best")


class TVMExportCallback(L.Callback):
    """At the end of ``fit``, compile the model for ``target``, check it against PyTorch, save it.

    The model is copied to the CPU in eval mode first (``torch.compile`` wrappers removed, so
    models trained compiled or on a GPU export alike). A failed export (unsupported operator,
    parity failure) leaves the trained module and its checkpoints untouched and the artifact
    folder as it was; it is logged as a warning and kept in ``last_export["error"]``, and fails
    ``fit`` only with ``strict=True``. Brevitas-quantized models are lowered to integer
    arithmetic (:func:`~lightning_relief.deploy.lower_quantized`) before export.

    Args:
        target: where the code runs (``"llvm"``: this CPU; a board preset such as ``"rpi4"``; a
            TVM target dict or ``"llvm -mtriple=..."`` string); overrides ``config.target``.
        dirpath: artifact folder (default ``<log dir>/tvm_export``; another target than this
            CPU gets ``tvm_export_<hash of the target>``).
        example_input_shape: input shape to compile for, e.g. ``(1, 1, 8, 8)``; default:
            the shape of the first validation batch.
        export_on: ``"fit_end"`` (the final weights) or ``"best"`` (the best checkpoint
            of the ``ModelCheckpoint`` callback).
        strict: re-raise a failed export from ``fit`` (default: warn, ``fit`` succeeds).
        config: an :class:`~lightning_relief.deploy.ExportConfig` (tuning, parity tolerances,
            timing), shared with ``export_model`` and ``relief export``.
        **options: ExportConfig fields that override ``config``'s: ``verify``, ``atol``, ``rtol``,
            ``min_top1_agreement``, ``tuning``, ``measure``, ``repeat``, ``number``, ``time_batch``.

    Several instances (one per target) keep separate state in checkpoints: the state key
    names the target and the folder.

    >>> export = TVMExportCallback("rpi4", example_input_shape=(1, 1, 8, 8), measure=False)
    >>> export.config.target, export.config.measure, export.config.atol
    ('rpi4', False, 0.0001)

    In a fit (``tests/test_tvm_export.py`` runs the same)::

        import lightning as L
        from lightning_relief import ClassifierModule, DigitsDataModule, TVMExportCallback
        from lightning_relief.models import LeNet5

        export = TVMExportCallback(target="llvm", dirpath="artifacts/lenet", example_input_shape=(1, 1, 8, 8))
        trainer = L.Trainer(max_epochs=1, callbacks=[export])
        trainer.fit(ClassifierModule(LeNet5(input_size=8)), DigitsDataModule())
        print(export.last_export)   # latency_ms (batch 1), max_abs_error, top1_agreement, dirpath
        # later, without PyTorch: lightning_relief.deploy.load_compiled("artifacts/lenet")(x)
    """

    def __init__(
        self,
        target: TargetLike | None = None,
        dirpath: str | os.PathLike | None = None,
        example_input_shape: Sequence[int] | None = None,
        export_on: Literal["fit_end", "best"] = "fit_end",
        strict: bool = False,
        config: ExportConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if target is not None:
            options["target"] = target
        try:
            self.config = (config or ExportConfig()).replace(**options)
        except ValueError as err:
            raise type(err)(f"TVMExportCallback: {err}") from err
        if example_input_shape is not None:
            shape = tuple(example_input_shape)
            if not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
                raise ValueError(f"example_input_shape must be positive ints, got {example_input_shape!r}")
            example_input_shape = shape
        if export_on not in _EXPORT_ON:
            raise ValueError(f"export_on must be one of {_EXPORT_ON}, got {export_on!r}")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.example_input_shape = example_input_shape
        self.export_on = export_on
        self.strict = strict
        self.last_export: dict[str, Any] = {}

    # -- Lightning hooks -------------------------------------------------------
    @property
    def target(self) -> TargetLike:
        return self.config.target

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target=target_key(self.target), dirpath=str(self.dirpath) if self.dirpath else None)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.export(trainer, pl_module)
        except Exception as err:
            if self.strict:
                raise
            self.last_export = {"error": f"{type(err).__name__}: {err}"}
            rank_zero_warn(
                f"TVM export failed (the trained model and its checkpoints are unchanged): {self.last_export['error']}"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_export": dict(self.last_export)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_export = dict(state_dict.get("last_export", {}))

    # -- the work ----------------------------------------------------------------
    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Compile, verify, save and time; returns (and keeps) a summary dict."""
        from lightning_relief.deploy.export import export_model

        checkpoint = self._checkpoint_path(trainer)
        model = self._source_model(pl_module, checkpoint)
        batch = self._real_batch(trainer)
        if self.example_input_shape is not None:
            example = torch.randn(self.example_input_shape, generator=torch.Generator().manual_seed(0))
        elif batch is not None:
            example = batch
        else:
            raise ValueError("TVMExportCallback: example_input_shape is None and the trainer has no validation or training data")
        dirpath = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / self._default_folder()
        tuned = "tuned" if self.config.tuning else "untuned"
        rank_zero_info(f"TVM export: compiling for {resolve_target(self.target)} ({tuned})")
        summary = export_model(model, example, dirpath, self.config, verify_batch=batch, source_checkpoint=checkpoint)
        self.last_export = summary
        metrics = {f"tvm_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if trainer.loggers and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info("TVM export: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return summary

    def _default_folder(self) -> str:
        """``tvm_export`` for this CPU; other targets get their own folder, so two callbacks never share one."""
        key = target_key(self.target)
        if key == target_key("llvm"):
            return "tvm_export"
        return f"tvm_export_{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def _checkpoint_path(self, trainer: L.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        if self.export_on == "best" and not path:
            raise ValueError("TVMExportCallback(export_on='best') needs a ModelCheckpoint that saved a best checkpoint")
        return Path(path) if path else None

    def _source_model(self, pl_module: L.LightningModule, checkpoint: Path | None) -> nn.Module:
        from lightning_relief.deploy.frontend import frozen_copy

        model = frozen_copy(pl_module)
        if self.export_on == "best" and checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if hasattr(model, "on_load_checkpoint"):
                model.on_load_checkpoint(state)  # replays structural steps the checkpoint recorded
            # the copy has no torch.compile wrappers: their "_orig_mod." prefix is not in its keys
            weights = {k.replace("_orig_mod.", ""): v for k, v in state["state_dict"].items()}
            model.load_state_dict(weights, strict=True)
            model.eval()
        return model

    @staticmethod
    def _real_batch(trainer: L.Trainer) -> Tensor | None:
        loaders: list[Any] = []
        for getter in (
            lambda: trainer.val_dataloaders,
            lambda: trainer.datamodule.val_dataloader(),
            lambda: trainer.train_dataloader,
        ):
            try:
                value = getter()
            except Exception:  # no datamodule / loader of that kind
                continue
            if value is not None:
                loaders.extend(value if isinstance(value, (list, tuple)) else [value])
        for loader in loaders:
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                if isinstance(x, Tensor):
                    return x.detach().cpu()
                break
        return None
