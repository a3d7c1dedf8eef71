"""Hardware-aware pruning and quantization inside ``trainer.fit``."""

from __future__ import annotations

import copy
import time
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_relief.compress.apply import apply_policy
from lightning_relief.compress.bracket import BudgetBracket
from lightning_relief.compress.cost import METRICS, CostModel, policy_cost
from lightning_relief.compress.policy import FLOAT_BITS, CompressionPolicy
from lightning_relief.compress.report import layer_rows, pareto_plot, print_report, write_json
from lightning_relief.compress.search import SEARCHES, Candidate, propose_candidates
from lightning_relief.compress.sensitivity import (
    IMPORTANCES, SensitivityTable, cached_sensitivity, compute_sensitivity, fingerprint,
)
from lightning_relief.compress.units import ModelUnits, analyze
from lightning_relief.nn.structure import RestorableStructureMixin, rebuild_structure, save_structure

METHODS = ("prune", "quantize")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SENSITIVITY_MEMO: dict[str, SensitivityTable] = {}


class SensitivityPruningCallback(Callback):
    """Prune channels and quantize layers to meet a cost budget, then fine-tune, in one ``fit``.

    At the start of epoch ``start_epoch`` the callback measures every unit's
    sensitivity (KL divergence of the output distribution when one channel group
    is pruned at a ratio, or one layer quantized at a bit width) on a few
    calibration batches, prices every option with the cost model (measured TVM
    latency per layer, or MACs/parameters/bytes), solves the Lagrangian of the
    multiple-choice knapsack for a budget of ``target`` × the original cost,
    measures a few candidate policies whole (latency and validation accuracy,
    all recorded), applies the best one that meets the budget (channels really
    removed with torch-pruning, brevitas layers for quantization-aware training),
    rebuilds the optimizer and LR scheduler, and lets training fine-tune the
    compressed model for the remaining epochs.

    The policy is recorded on the module, so checkpoints replay it: modules
    with :class:`~lightning_relief.nn.structure.RestorableStructureMixin` (such as
    :class:`~lightning_relief.ClassifierModule`) reload with ``load_from_checkpoint``;
    any other module reloads with :func:`lightning_relief.compress.load_compressed`,
    and resumes ``fit(ckpt_path=...)`` with this callback in the Trainer.

    Assumes batches ``(x, y, ...)`` and that ``pl_module(x)`` returns class logits.

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule, SensitivityPruningCallback
        >>> from lightning_relief.models import LeNet5
        >>> module = ClassifierModule(LeNet5(input_size=8))
        >>> prune = SensitivityPruningCallback(target=0.5, metric="macs", start_epoch=1, verbose=False)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[prune], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, DigitsDataModule())
        >>> prune.chosen.measured_cost <= 0.5 * prune.original_cost
        True

    Args:
        target: budget as a fraction of the original model's cost, in (0, 1].
        metric: ``"latency"`` (measured with TVM on ``target_device``), ``"macs"``, ``"params"`` or ``"size"``.
        methods: any of ``"prune"`` and ``"quantize"``.
        target_device: TVM target for latency (string, dict or ``tvm.target.Target``).
        calibration_batches: training batches used for sensitivity, BN re-estimation and quantizer scales.
        start_epoch: epoch at whose start the model is compressed (default: ``max_epochs - finetune_epochs``,
            or ``max_epochs // 2`` when the run is not longer than ``finetune_epochs``, or 0 without ``finetune_epochs``).
        finetune_epochs: epochs of fine-tuning after compression; training stops after them. Default: all remaining.
        prune_ratios: pruning ratios tried per channel group.
        bit_widths: weight bit widths tried per layer (activations use 8 bits).
        importance: channel ranking: ``"magnitude"``, ``"taylor"``, ``"bn_scale"``, ``"lamp"`` or ``"fpgm"``.
        ignored_layers: module names (as in ``pl_module.named_modules()``) never pruned or quantized.
        search: ``"lagrangian"`` (ours) or ``"uniform"`` (same ratio for every group: the usual baseline).
        candidates: policies measured whole per search round.
        tolerance: the target window: measured cost within ``budget · (1 ± tolerance)`` (for ``"latency"``;
            analytic metrics are exact, so their candidates stay at or under the budget).
        max_rounds: measurement rounds; each steers the predicted budget by the candidates measured so far
            (:class:`~lightning_relief.compress.bracket.BudgetBracket`) until one lands in the window.
        val_batches: validation batches per candidate (``None``: all).
        cache_dir: directory for the sensitivity table and TVM latency caches (reused across runs).
        latency_batch: batch size at which latency is measured.
        tuning_trials: MetaSchedule trials for latency measurement (0: untuned, fast).
        seed: seed for the choice of calibration batches.
        verbose: print the report table.
    """

    def __init__(
        self,
        target: float = 0.25,
        metric: Literal["latency", "macs", "params", "size"] = "latency",
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
        val_batches: int | None = None,
        cache_dir: str | None = None,
        latency_batch: int = 1,
        tuning_trials: int = 0,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(methods)
        if not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ValueError(f"target must be a fraction of the original cost in (0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if start_epoch is not None and start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if finetune_epochs is not None and finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        ratios = tuple(float(r) for r in prune_ratios)
        if "prune" in methods and (not ratios or any(not 0 < r < 1 for r in ratios)):
            raise ValueError(f"prune_ratios must be non-empty, each in (0, 1), got {list(prune_ratios)}")
        bits = tuple(int(b) for b in bit_widths)
        if "quantize" in methods and (not bits or any(not 2 <= b <= 16 for b in bits)):
            raise ValueError(f"bit_widths must be non-empty, each in [2, 16], got {list(bit_widths)}")
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if search == "uniform" and methods != ("prune",):
            raise ValueError(f"search='uniform' prunes every group alike and needs methods=('prune',), got {methods!r}")
        if candidates < 1 or max_rounds < 1:
            raise ValueError(f"candidates and max_rounds must be >= 1, got {candidates} and {max_rounds}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        if latency_batch < 1 or tuning_trials < 0:
            raise ValueError(f"latency_batch must be >= 1 and tuning_trials >= 0, got {latency_batch}, {tuning_trials}")
        if metric == "latency" and "quantize" in methods and any(b > 8 for b in bits):
            raise ValueError(f"with metric='latency', bit_widths must be <= 8 (integer layers store int8), got {list(bits)}")
        if metric == "latency":
            from lightning_relief.compress.latency import check_target

            check_target(target_device)
        self.target = float(target)
        self.metric = metric
        self.methods = methods
        self.target_device = target_device
        self.calibration_batches = int(calibration_batches)
        self.start_epoch = start_epoch
        self.finetune_epochs = finetune_epochs
        self.prune_ratios = ratios if "prune" in methods else ()
        self.bit_widths = bits if "quantize" in methods else ()
        self.importance = importance
        self.ignored_layers = tuple(ignored_layers)
        self.search = search
        self.candidates = int(candidates)
        self.tolerance = float(tolerance)
        self.max_rounds = int(max_rounds)
        self.val_batches = val_batches
        self.cache_dir = cache_dir
        self.latency_batch = int(latency_batch)
        self.tuning_trials = int(tuning_trials)
        self.seed = int(seed)
        self.verbose = verbose
        # results (also in state_dict)
        self.phase = "waiting"
        self.policy: CompressionPolicy | None = None
        self.sensitivity: SensitivityTable | None = None
        self.evaluated: list[Candidate] = []
        self.chosen: Candidate | None = None
        self.original_cost: float | None = None
        self.original_acc: float | None = None
        self.report: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self._compress_epoch: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._compress_epoch = self._resolve_start(trainer)
        if not isinstance(pl_module, RestorableStructureMixin) and "on_load_checkpoint" not in pl_module.__dict__:
            # replay the recorded structure before the weights load, for modules without the mixin
            pl_module.__dict__["on_load_checkpoint"] = types.MethodType(_replaying_on_load_checkpoint, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module.__dict__.get("on_load_checkpoint"), "__func__", None) is _replaying_on_load_checkpoint:
            del pl_module.__dict__["on_load_checkpoint"]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting" and self._compress_epoch is not None and trainer.current_epoch >= self._compress_epoch:
            self.compress(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.phase == "compressed" and self.finetune_epochs is not None and self._compress_epoch is not None
                and trainer.current_epoch + 1 >= self._compress_epoch + self.finetune_epochs):
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        save_structure(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "compress_epoch": self._compress_epoch,
            "policy": None if self.policy is None else self.policy.to_dict(),
            "sensitivity": None if self.sensitivity is None else self.sensitivity.state_dict(),
            "evaluated": [c.to_dict() for c in self.evaluated],
            "original_cost": self.original_cost,
            "original_acc": self.original_acc,
            "timings": dict(self.timings),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", "waiting")
        self._compress_epoch = state_dict.get("compress_epoch", self._compress_epoch)
        policy = state_dict.get("policy")
        self.policy = None if policy is None else CompressionPolicy.from_dict(policy)
        sens = state_dict.get("sensitivity")
        self.sensitivity = None if sens is None else SensitivityTable.from_state_dict(sens)
        self.evaluated = [Candidate.from_dict(c) for c in state_dict.get("evaluated", [])]
        self.chosen = next((c for c in self.evaluated if c.chosen), None)
        self.original_cost = state_dict.get("original_cost")
        self.original_acc = state_dict.get("original_acc")
        self.timings = dict(state_dict.get("timings", {}))

    # ------------------------------------------------------------- the work
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

    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[Tensor, Tensor]]:
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("SensitivityPruningCallback needs the training dataloader for calibration")
        batches = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for batch in loader:
                batches.append(_xy(batch, pl_module.device))
                if len(batches) >= self.calibration_batches:
                    break
        return batches

    def _validation(self, trainer: L.Trainer, pl_module: L.LightningModule, fallback: list) -> tuple[list, str]:
        loader = None
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            try:
                loader = trainer.datamodule.val_dataloader()
            except Exception:  # a datamodule without validation data
                loader = None
        if loader is None:
            loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            return fallback, "calibration"
        batches = []
        for batch in loader:
            batches.append(_xy(batch, pl_module.device))
            if self.val_batches is not None and len(batches) >= self.val_batches:
                break
        return batches, "validation"

    def _cost_model(self, units: ModelUnits, module: torch.nn.Module) -> tuple[CostModel, Any]:
        if self.metric != "latency":
            return CostModel(self.metric), None
        from lightning_relief.compress.latency import LatencyMeter

        meter = LatencyMeter(self.target_device, cache_dir=self.cache_dir, batch=self.latency_batch,
                             tuning_trials=self.tuning_trials)
        return meter.cost_model(units, module), meter

    def compress(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CompressionPolicy:
        """Measure, search, evaluate and apply; called at the start of the compression epoch."""
        # how many candidates get measured depends on timings; the fine-tuning that follows must not
        # (calibration passes through dropout draw random numbers): the search gets its own RNG stream
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _Progress(self.verbose and trainer.is_global_zero) as progress:
            return self._compress(trainer, pl_module, progress)

    def _compress(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: _Progress) -> CompressionPolicy:
        t0 = time.perf_counter()
        calibration = self._calibration(trainer, pl_module)
        inputs = [x for x, _ in calibration]
        units = analyze(pl_module, inputs[0][:1], self.ignored_layers)
        quant_layers = [info.name for info in units.layers if info.name not in self.ignored_layers]
        key = fingerprint(pl_module, calibration, (self.prune_ratios, self.bit_widths, self.importance,
                                                   self.ignored_layers, quant_layers))
        # cached by weights + calibration data + settings: in memory, and on disk under cache_dir
        if key in _SENSITIVITY_MEMO:
            self.sensitivity = _SENSITIVITY_MEMO[key]
        else:
            self.sensitivity, _ = cached_sensitivity(
                self.cache_dir, key,
                lambda: compute_sensitivity(pl_module, units, calibration, self.prune_ratios, self.bit_widths,
                                            self.importance, quant_layers, progress=progress.task("sensitivity")),
            )
            _SENSITIVITY_MEMO[key] = self.sensitivity
        table = self.sensitivity
        t1 = time.perf_counter()
        cost, meter = self._cost_model(units, pl_module)
        if meter is not None:
            cost.warm(units, [FLOAT_BITS, *self.bit_widths[:1]], progress.task("layer latency table"))
        # candidates are timed against the compiled original, side by side (steady on a drifting machine)
        self.original_cost = meter.set_reference(pl_module) if meter is not None else policy_cost(units, cost, {}, {})
        if meter is not None:
            self._calibrate_latency(pl_module, units, table, cost, meter, inputs)
        val, val_kind = self._validation(trainer, pl_module, calibration)
        self.original_acc = _accuracy(pl_module, val)
        budget = self.target * self.original_cost
        predicted_original = policy_cost(units, cost, {}, {})
        t2 = time.perf_counter()

        self.evaluated = []
        seen: set = set()
        bracket = BudgetBracket(budget, self.tolerance, ceiling=0.999 * predicted_original)
        predicted_budget = budget
        for round_ in range(self.max_rounds):
            anchors = [self.evaluated[i].policy for i in bracket.anchors()]
            fresh = propose_candidates(units, table, cost, predicted_budget, self.search, self.prune_ratios,
                                       self.bit_widths, quant_layers, self.candidates, seen, anchors,
                                       spread=max(self.tolerance, 0.01), centered=meter is not None, round_=round_)
            advance = progress.task(f"measuring candidates (round {round_ + 1})")
            for i, cand in enumerate(fresh):
                advance(i, len(fresh))
                seen.add(cand.policy.key())
                trial = copy.deepcopy(pl_module)  # candidates never touch the model being trained
                apply_policy(trial, units, table.order, cand.policy, inputs)
                cand.measured_cost = meter.measure(trial) if meter is not None else cand.predicted_cost
                cand.val_acc = _accuracy(trial, val)
                cand.extra["params"] = sum(p.numel() for p in trial.parameters())
                bracket.add(cand.predicted_cost, cand.measured_cost)
                self.evaluated.append(cand)
                advance(i + 1, len(fresh))
                del trial
            if meter is None or bracket.hit() or not fresh:
                break  # in the window, exact costs, or nothing left to try near it
            predicted_budget = bracket.next()
        low, high = bracket.low, bracket.high
        # the target window first, then anything under budget; best accuracy, then closest to the budget
        in_window = [c for c in self.evaluated if low <= c.measured_cost <= high]
        feasible = in_window or [c for c in self.evaluated if c.measured_cost <= high]
        if feasible:
            chosen = max(feasible, key=lambda c: (round(c.val_acc, 4), c.measured_cost))
        else:
            chosen = min(self.evaluated, key=lambda c: c.measured_cost)
        if not in_window and meter is not None:
            warnings.warn(
                f"SensitivityPruningCallback: no candidate measured within {self.tolerance:.0%} of the {self.metric} "
                f"budget {budget:.4g} after {len(self.evaluated)} candidates; using {chosen.measured_cost:.4g}",
                stacklevel=2,
            )
        chosen.chosen = True
        self.chosen = chosen
        self.policy = chosen.policy
        t3 = time.perf_counter()

        apply_policy(pl_module, units, table.order, chosen.policy, inputs)
        pl_module.to(inputs[0].device)
        # the optimizer and scheduler still hold the removed tensors: build them again for the new ones
        trainer.strategy.setup_optimizers(trainer)
        _resume_schedules(trainer)
        _forget_uncompressed_best(trainer)
        self.phase = "compressed"
        self.timings = {"sensitivity_s": t1 - t0, "baseline_s": t2 - t1, "search_s": t3 - t2,
                        "apply_s": time.perf_counter() - t3, "total_s": time.perf_counter() - t0,
                        "sensitivity_table_s": table.seconds}
        self._report(trainer, pl_module, units, cost, val_kind)
        return chosen.policy

    def _calibrate_latency(self, pl_module, units, table, cost, meter, inputs) -> None:
        """Whole-model measurements that the layer table cannot see: element-wise ops and call overhead."""
        points = [({}, {}, self.original_cost)]
        if table.order:
            # a second, uniformly pruned model separates the per-channel part from the fixed overhead
            half = CompressionPolicy(prune={g.root: 0.5 for g in units.groups})
            trial = copy.deepcopy(pl_module)
            apply_policy(trial, units, table.order, half, inputs)
            points.append((half.prune, {}, meter.measure(trial)))
            del trial
        cost.calibrate(units, points)
        self.calibration = {"measured_ms": [p[2] for p in points], "scale": cost.scale,
                            "overhead_ms": cost.overhead}

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, units: ModelUnits, cost: CostModel,
                val_kind: str) -> None:
        assert self.chosen is not None and self.sensitivity is not None and self.original_cost is not None
        rows = layer_rows(units, self.sensitivity, cost, self.chosen.policy)
        self.report = {
            "metric": self.metric, "target": self.target, "original_cost": self.original_cost,
            "original_acc": self.original_acc, "accuracy_on": val_kind,
            "chosen": self.chosen.to_dict(), "candidates": [c.to_dict() for c in self.evaluated],
            "layers": rows, "timings": self.timings, "latency_calibration": self.calibration,
        }
        if self.verbose and trainer.is_global_zero:
            print_report(rows, self.evaluated, self.metric)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            write_json(log_dir / "compression_report.json", self.report)
            pareto_plot(self.evaluated, self.original_cost, self.original_acc, self.target, self.metric,
                        log_dir / "compression_pareto.png")
        metrics = {
            "compress/cost_ratio": self.chosen.measured_cost / self.original_cost,
            "compress/candidates": float(len(self.evaluated)),
            "compress/search_s": self.timings["search_s"],
            "compress/params": float(sum(p.numel() for p in pl_module.parameters())),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _resume_schedules(trainer: L.Trainer) -> None:
    """New schedulers start at step 0; advance them to where the old ones were, so the learning rate
    carries on along the user's schedule instead of jumping back to its start for the fine-tuning."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, ReduceLROnPlateau):
            continue  # driven by a monitored metric, not by a step count
        done = trainer.current_epoch if config.interval == "epoch" else trainer.global_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            for _ in range(done // max(config.frequency, 1)):
                config.scheduler.step()


def _forget_uncompressed_best(trainer: L.Trainer) -> None:
    """Monitored checkpoints from before compression cannot load into the compressed model (and would
    win on accuracy): restart the ranking so ``ckpt_path="best"`` means the best compressed epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for ckpt in trainer.checkpoint_callbacks:
        if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor is not None:
            ckpt.best_k_models = {}
            ckpt.kth_best_model_path = ""
            ckpt.best_model_path = ""
            ckpt.best_model_score = None
            ckpt.kth_value = torch.tensor(torch.inf if ckpt.mode == "min" else -torch.inf)


class _Progress:
    """A rich progress display for the compression step (silent when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str):
        """A ``(done, total)`` callback that advances one bar."""
        if self._progress is None:
            return lambda done, total: None
        task_id = self._progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task_id, completed=done, total=total)

        return update


def _xy(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        batch = tuple(batch.values())
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("SensitivityPruningCallback expects batches (x, y, ...)")
    return batch[0].to(device), batch[1].to(device)


@torch.no_grad()
def _accuracy(module: torch.nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    was_training = module.training
    module.eval()
    correct = total = 0
    for x, y in batches:
        correct += (module(x).argmax(-1) == y).sum().item()
        total += y.numel()
    module.train(was_training)
    return correct / max(total, 1)


def _replaying_on_load_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    rebuild_structure(self, checkpoint)
    type(self).on_load_checkpoint(self, checkpoint)
