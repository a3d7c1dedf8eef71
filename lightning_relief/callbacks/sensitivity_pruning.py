"""Hardware-aware pruning and quantization inside ``trainer.fit``: the hooks around :mod:`lightning_relief.compress.engine`."""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from typing_extensions import override

from lightning_relief._rng import isolated_seed
from lightning_relief.compress.compiled import uncompiled
from lightning_relief.compress.cost import METRICS
from lightning_relief.compress.engine import DEFAULT_RATIOS, CompressionConfig, CompressionResult, apply_plan, plan
from lightning_relief.compress.fit import exempt_quantizers, fit_batches, rebuild_training
from lightning_relief.compress.meter import AnalyticMeter, Meter
from lightning_relief.compress.report import Progress, pareto_plot, print_report, write_json
from lightning_relief.compress.units import check_supported
from lightning_relief.errors import UnsupportedCallbackError
from lightning_relief.nn.structure import RestorableStructureMixin, rebuild_structure, save_structure


class SensitivityPruningCallback(Callback):
    """Prune channels and quantize layers to meet a cost budget, then fine-tune, in one ``fit``.

    At the start of epoch ``start_epoch`` the engine (:func:`lightning_relief.compress.engine.plan`)
    measures every unit's sensitivity (KL divergence of the outputs with one channel group pruned or
    one layer quantized) on a few calibration batches, prices policies with the meter's cost model,
    proposes candidates (its Lagrangian search's policies and the uniform, 8-bit-only and joint
    baselines), measures each one whole, and scores those within the budget by validation accuracy
    after ``recovery_steps`` of fine-tuning on a copy. The best is applied (channels really removed
    with torch-pruning, brevitas layers for quantization-aware training), the optimizer, LR schedulers
    and, under DDP, the ``DistributedDataParallel`` wrapper are rebuilt, and training fine-tunes the
    compressed model. Under DDP rank 0 plans and broadcasts the plan; every rank applies the same.
    A ``torch.compile``-d model is compressed underneath and recompiles on its next call.

    The plan is recorded on the module, so checkpoints replay it: modules with
    :class:`~lightning_relief.nn.structure.RestorableStructureMixin` (such as
    :class:`~lightning_relief.ClassifierModule`) reload with ``load_from_checkpoint``; any other module
    with :func:`lightning_relief.compress.load_compressed`, or resumes ``fit(ckpt_path=...)`` with this callback.

    Assumes batches ``(x, y, ...)`` and that ``pl_module(x)`` returns class logits.

    Example::

        >>> import tempfile
        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule, SensitivityPruningCallback
        >>> from lightning_relief.models import LeNet5
        >>> module = ClassifierModule(LeNet5(input_size=8))
        >>> prune = SensitivityPruningCallback(target=0.5, metric="macs", start_epoch=1, verbose=False)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[prune], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     default_root_dir=tempfile.mkdtemp())  # the report goes there
        >>> trainer.fit(module, DigitsDataModule())
        >>> prune.chosen.measured_cost <= 0.5 * prune.original_cost
        True

    Args:
        target: budget as a fraction of the original model's cost, in (0, 1].
        metric: ``"latency"`` (TVM on ``target_device``), ``"macs"``, ``"params"`` or ``"size"``; ignored with ``meter``.
        meter: any :class:`~lightning_relief.compress.meter.Meter` (e.g. by ``class_path`` in YAML) instead of ``metric``.
        methods: any of ``"prune"`` and ``"quantize"``.
        target_device: TVM target for latency (string, dict or ``tvm.target.Target``).
        calibration_batches: training batches for sensitivity, BN re-estimation and quantizer scales.
        start_epoch: epoch at whose start the model is compressed (default: ``max_epochs - finetune_epochs``,
            or ``max_epochs // 2`` when the run is not longer than ``finetune_epochs``, or 0 without ``finetune_epochs``).
        finetune_epochs: epochs of fine-tuning after compression; training stops after them. Default: all remaining.
        prune_ratios, bit_widths, importance, ignored_layers, search, candidates, tolerance, max_rounds,
        recovery_steps, recovery_lr, grow, seed: see :class:`~lightning_relief.compress.engine.CompressionConfig`.
        val_batches: validation batches per candidate (``None``: all).
        cache_dir: directory for the sensitivity table and TVM latency caches (reused across runs).
        latency_batch, tuning_trials: latency batch size and MetaSchedule trials (0: untuned).
        verbose: print the report table.
    """

    def __init__(
        self,
        target: float = 0.25,
        metric: Literal["latency", "macs", "params", "size"] = "latency",
        meter: Meter | None = None,
        methods: Sequence[str] = ("prune", "quantize"),
        target_device: str | dict = "llvm",
        calibration_batches: int = 4,
        start_epoch: int | None = None,
        finetune_epochs: int | None = None,
        prune_ratios: Sequence[float] = DEFAULT_RATIOS,
        bit_widths: Sequence[int] = (2, 4, 8),
        importance: Literal["magnitude", "taylor", "bn_scale", "lamp", "fpgm"] = "magnitude",
        ignored_layers: Sequence[str] = (),
        search: Literal["lagrangian", "uniform"] = "lagrangian",
        candidates: int = 4,
        tolerance: float = 0.05,
        max_rounds: int = 5,
        recovery_steps: int = 50,
        recovery_lr: float = 1e-3,
        grow: int = 12,
        val_batches: int | None = None,
        cache_dir: str | None = None,
        latency_batch: int = 1,
        tuning_trials: int = 0,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.config = CompressionConfig(
            target,
            tuple(methods) if not isinstance(methods, str) else methods,
            tuple(prune_ratios),
            tuple(bit_widths),
            importance,
            tuple(ignored_layers),
            search,
            candidates,
            tolerance,
            max_rounds,
            recovery_steps,
            recovery_lr,
            grow=grow,
            seed=seed,
        )
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if start_epoch is not None and start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if finetune_epochs is not None and finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        if meter is None:
            if metric not in METRICS:
                raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
            if metric == "latency":
                from lightning_relief.compress.latency import LatencyMeter

                meter = LatencyMeter(target_device, cache_dir=cache_dir, batch=latency_batch, tuning_trials=tuning_trials)
            else:
                meter = AnalyticMeter(metric)
        if not isinstance(meter, Meter):
            raise TypeError(f"meter must be a lightning_relief.compress.meter.Meter, got {type(meter).__name__}")
        if not meter.exact and "quantize" in self.config.methods and any(b > 8 for b in self.config.bit_widths):
            raise ValueError(
                f"with a measured meter, bit_widths must be <= 8 (integer layers store int8), got {list(self.config.bit_widths)}"
            )
        self.meter = meter
        self.metric = meter.metric
        self.calibration_batches = int(calibration_batches)
        self.start_epoch = start_epoch
        self.finetune_epochs = finetune_epochs
        self.val_batches = val_batches
        self.cache_dir = cache_dir
        self.verbose = verbose
        self.phase = "waiting"
        self.result: CompressionResult | None = None
        self.report: dict[str, Any] = {}
        self._compress_epoch: int | None = None

    # the figures of the chosen plan, as attributes
    policy = property(lambda self: None if self.result is None else self.result.policy)
    chosen = property(lambda self: None if self.result is None else self.result.chosen)
    evaluated = property(lambda self: [] if self.result is None else self.result.evaluated)
    sensitivity = property(lambda self: None if self.result is None else self.result.sensitivity)
    original_cost = property(lambda self: None if self.result is None else self.result.original_cost)
    original_acc = property(lambda self: None if self.result is None else self.result.original_acc)
    timings = property(lambda self: {} if self.result is None else self.result.timings)
    calibration = property(lambda self: {} if self.result is None else self.result.calibration)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_weight_averaging(trainer)
            self._compress_epoch = self._resolve_start(trainer)
            if self.phase == "waiting":
                with uncompiled(pl_module):  # a layer it cannot handle fails the run now, not epochs later
                    check_supported(pl_module, self.config.ignored_layers)
        if not isinstance(pl_module, RestorableStructureMixin) and "on_load_checkpoint" not in pl_module.__dict__:
            # replay the recorded structure before the weights load, for modules without the mixin
            pl_module.__dict__["on_load_checkpoint"] = types.MethodType(_replaying_on_load_checkpoint, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module.__dict__.get("on_load_checkpoint"), "__func__", None) is _replaying_on_load_checkpoint:
            del pl_module.__dict__["on_load_checkpoint"]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "compressed":  # resumed: the optimizer state to load has the groups compress() made
            exempt_quantizers(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting" and self._compress_epoch is not None and trainer.current_epoch >= self._compress_epoch:
            self.compress(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.phase == "compressed"
            and self.finetune_epochs is not None
            and self._compress_epoch is not None
            and trainer.current_epoch + 1 >= self._compress_epoch + self.finetune_epochs
        ):
            trainer.should_stop = True

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        save_structure(pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "compress_epoch": self._compress_epoch,
            "result": None if self.result is None else self.result.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", "waiting")
        self._compress_epoch = state_dict.get("compress_epoch", self._compress_epoch)
        result = state_dict.get("result")
        self.result = None if result is None else CompressionResult.from_state_dict(result)

    def _resolve_start(self, trainer: L.Trainer) -> int:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        start = self.start_epoch
        if start is None:
            if not (self.finetune_epochs is not None and max_epochs):
                return 0
            # a run too short for finetune_epochs (a quick `--trainer.max_epochs 2` override of a recipe)
            # still compresses, halfway, instead of failing
            return max_epochs - self.finetune_epochs if max_epochs > self.finetune_epochs else max_epochs // 2
        if max_epochs is not None and start >= max_epochs:
            raise ValueError(f"start_epoch={start} leaves no epoch to compress in: Trainer(max_epochs={max_epochs})")
        if max_epochs is not None and self.finetune_epochs is not None and start + self.finetune_epochs > max_epochs:
            raise ValueError(
                f"start_epoch={start} + finetune_epochs={self.finetune_epochs} exceeds Trainer(max_epochs={max_epochs})"
            )
        return start

    def compress(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CompressionResult:
        """Plan (rank 0), broadcast, apply on every rank, rebuild the wrappers and optimizers."""
        # how many candidates get measured depends on timings; the fine-tuning that follows must not
        with isolated_seed(self.config.seed), uncompiled(pl_module):
            calibration, val, train, self.report["accuracy_on"] = fit_batches(
                trainer, pl_module.device, self.calibration_batches, min(self.config.recovery_steps, 64), self.val_batches
            )
            payload: Any = None
            if trainer.is_global_zero:
                with Progress(self.verbose) as progress:
                    try:
                        payload = plan(
                            pl_module, calibration, self.config, self.meter, val, train, progress.task, self.cache_dir
                        ).state_dict()
                    except Exception as err:  # the other ranks wait in the broadcast: tell them, then raise
                        trainer.strategy.broadcast(("error", f"{type(err).__name__}: {err}"), src=0)
                        raise
            payload = trainer.strategy.broadcast(payload, src=0)
            if isinstance(payload, tuple):
                raise RuntimeError(f"SensitivityPruningCallback failed on rank 0: {payload[1]}")
            self.result = CompressionResult.from_state_dict(payload)
            apply_plan(pl_module, self.result, [x for x, _ in calibration])
            pl_module.to(calibration[0][0].device)
        rebuild_training(trainer, pl_module)
        self.phase = "compressed"
        self._report(trainer, pl_module)
        return self.result

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.result
        assert result is not None
        self.report.update(
            {
                "metric": result.metric,
                "unit": result.unit,
                "target": self.config.target,
                **{k: v for k, v in result.state_dict().items() if k not in ("sensitivity", "evaluated")},
                "chosen": result.chosen.to_dict(),
                "candidates": [c.to_dict() for c in result.evaluated],
            }
        )
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: on every rank
        if trainer.is_global_zero:
            if self.verbose:
                print_report(result.layers, result.evaluated, result.metric, unit=result.unit)
            write_json(log_dir / "compression_report.json", self.report)
            pareto_plot(
                result.evaluated,
                result.original_cost,
                result.original_acc,
                self.config.target,
                result.metric,
                log_dir / "compression_pareto.png",
            )
        metrics = {
            "compress/cost_ratio": result.chosen.measured_cost / result.original_cost,
            "compress/candidates": float(len(result.evaluated)),
            "compress/plan_s": result.timings["plan_s"],
            "compress/params": float(sum(p.numel() for p in pl_module.parameters())),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _replaying_on_load_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    rebuild_structure(self, checkpoint)
    type(self).on_load_checkpoint(self, checkpoint)


def _refuse_weight_averaging(trainer: L.Trainer) -> None:
    """Lightning's averaging callbacks copy the module at setup: after compression their average has the
    old layer shapes, and the first update fails with a shape error (after the whole search)."""
    for callback in trainer.callbacks:
        if isinstance(callback, (StochasticWeightAveraging, WeightAveraging)):
            raise UnsupportedCallbackError(
                "SensitivityPruningCallback",
                callback,
                "its averaged copy keeps the uncompressed layer shapes; compress in one fit, then average in a "
                "second fit of the compressed model loaded from its checkpoint",
            )
