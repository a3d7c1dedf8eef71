"""MetaSchedule tuning with a database kept on disk and reused.

On a CPU, untuned TVM code is plain loops; speed comes from tuning. Tuning is
slow (about a minute per 32 candidates on two cores), so the database lives in
one folder (``TuningConfig.work_dir``) shared by every compile: the per-layer
latency table, whole-model measurements in a search, and the final export.
Operators whose workload already has a record in the database are not tuned
again (unless ``retune=True``); only new workloads spend the trial budget.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.relax import transform

from lightning_relief.deploy.cache import default_cache_dir
from lightning_relief.deploy.tuning_db import locked_database

log = logging.getLogger(__name__)


@dataclass
class TuningConfig:
    """How much MetaSchedule tuning a compile may spend.

    Args:
        trials: total measured candidates for one compile, for the operators not yet in the
            database; ``0`` only applies what the database has. Every operator gets one round
            first; later rounds go where they promise most, by MetaSchedule's gradient task
            scheduler: an operator's best latency so far times how often the model runs it
            (its task weight), and how fast that latency was still falling.
        trials_per_task: cap per operator (default: none but ``trials``).
        trials_per_round: candidates measured per round of one operator (fewer when ``trials``
            cannot give every operator one round of this size). Small rounds let the scheduler
            move the budget often; each round also pays for a search and a cost-model update
            (on 2 loaded cores a resnet18 round of 4 took ~25 s, ~15 s of it searching).
        work_dir: the tuning database folder (default ``<cache dir>/tuning``).
        weight_prepack: let tuned kernels use pre-packed weight layouts (faster on CPU).
        retune: tune workloads again even if the database already has them.
        builder: ``"in-process"`` compiles candidates in this process (no worker start-up,
            which costs tens of seconds per batch on a busy machine) or ``"local"``
            (TVM's pool of worker processes, parallel).
        builder_timeout_s, runner_timeout_s: per-candidate limits (generous: a loaded
            machine otherwise reports every candidate as a build error).
        only_compute_heavy: tune only conv/matmul operators; the cheap ones (transposes,
            reshapes, pooling, element-wise) keep their default loops.
        population_size, genetic_iters: MetaSchedule's evolutionary search per round
            (TVM's defaults 512 and 4; smaller is much faster on few cores, and coarser).

    >>> TuningConfig(trials=64).trials
    64
    """

    trials: int = 64
    trials_per_task: int | None = None
    trials_per_round: int = 4
    work_dir: str | os.PathLike | None = None
    weight_prepack: bool = True
    retune: bool = False
    builder: str = "in-process"
    builder_timeout_s: float = 300.0
    runner_timeout_s: float = 120.0
    only_compute_heavy: bool = True
    population_size: int = 512
    genetic_iters: int = 4
    tuned_tasks: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 0:
            raise ValueError(f"trials must be an integer >= 0, got {self.trials!r}")
        if self.trials_per_task is not None and (not isinstance(self.trials_per_task, int) or self.trials_per_task < 1):
            raise ValueError(f"trials_per_task must be an integer >= 1 or None, got {self.trials_per_task!r}")
        if not isinstance(self.trials_per_round, int) or self.trials_per_round < 1:
            raise ValueError(f"trials_per_round must be an integer >= 1, got {self.trials_per_round!r}")
        if self.population_size < 2 or self.genetic_iters < 0:
            raise ValueError(f"bad search settings: population_size={self.population_size}, genetic_iters={self.genetic_iters}")
        if self.builder not in ("in-process", "local"):
            raise ValueError(f"builder must be 'in-process' or 'local', got {self.builder!r}")
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else default_cache_dir() / "tuning"

    @classmethod
    def coerce(cls, tuning: TuningConfig | int | dict | None) -> TuningConfig | None:
        """``None``/``False`` → untuned; an int → that many trials; a dict → its fields."""
        if tuning is None or tuning is False:
            return None
        if isinstance(tuning, TuningConfig):
            return tuning
        if isinstance(tuning, bool):
            return cls()
        if isinstance(tuning, int):
            return cls(trials=tuning)
        if isinstance(tuning, dict):
            return cls(**tuning)
        raise TypeError(f"tuning must be a TuningConfig, an int (trials), a dict or None, got {type(tuning).__name__}")

    def signature(self) -> dict[str, Any]:  # budgets do not change which code the database yields
        """What identifies tuned code in cache keys: the database and the prepacking."""
        return {"work_dir": str(Path(self.work_dir).resolve()), "weight_prepack": self.weight_prepack}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tuned_tasks")
        d["work_dir"] = str(self.work_dir)
        return d


_HEAVY = ("conv", "matmul", "dense", "conv2d")


def _load_cpu_intrinsics(target: tvm.target.Target) -> None:
    """Import only the tensor intrinsics of ``target``'s CPU family.

    ``tvm.s_tir.tensor_intrin`` parses the TVMScript of every backend's intrinsics
    when imported (CUDA's alone take over a minute of CPU time); MetaSchedule imports
    it before tuning anything. For CPU targets we register the package without its
    ``__init__`` and import just the x86, ARM or RISC-V module, which is all CPU
    schedules use (VNNI/AVX-512 or dot-product instructions).
    """
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    from lightning_relief.deploy.targets import target_dict

    target_spec = target_dict(target)
    if target_spec.get("kind") != "llvm":
        return  # GPU targets need the full set
    triple = str(target_spec.get("mtriple", "x86_64"))
    family = "arm_cpu" if triple.startswith(("aarch64", "arm")) else "riscv_cpu" if triple.startswith("riscv") else "x86"
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        importlib.import_module(f"{name}.{family}")
    except Exception:  # fall back to TVM's own import of everything
        sys.modules.pop(name, None)


def _in_process_builder() -> Any:
    """A MetaSchedule builder that compiles candidates here instead of in fresh worker processes."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list) -> list:
            results = []
            for build_input in build_inputs:
                try:
                    module = default_build(build_input.mod, build_input.target, None)
                    results.append(BuilderResult(default_export(module), None))
                except Exception as err:  # a candidate that does not compile is a failed trial
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(err).__name__}: {err}"))
            return results

    return InProcessBuilder()


def _tune_missing(mod: tvm.IRModule, target: tvm.target.Target, config: TuningConfig) -> int:
    """Tune the operators of ``mod`` that the database lacks; returns how many were tuned."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts

    work_dir = str(config.work_dir)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    _load_cpu_intrinsics(target)
    database = ms.database.JSONDatabase(work_dir=work_dir)
    tasks = [t for t in extract_tasks(mod, target) if not t.mod.attrs.get("tirx.is_scheduled", False)]
    if config.only_compute_heavy:
        tasks = [t for t in tasks if any(k in t.task_name for k in _HEAVY)]
    if not config.retune:
        tasks = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, "main") is None]
    if tasks and config.trials == 0 and not config.retune:
        # records are filed per target: a database tuned on another CPU silently gives untuned code
        warnings.warn(
            f"TuningConfig(trials=0): {len(tasks)} operator(s) have no record for target {target.attrs.get('mcpu', target.kind.name)} "
            f"in the tuning database {work_dir}; they run with default schedules (tune here with trials > 0)",
            stacklevel=4,
        )
    if not tasks or config.trials == 0:
        return 0
    per_task = min(config.trials_per_task or config.trials, config.trials)
    per_round = max(1, min(config.trials_per_round, per_task, config.trials // len(tasks)))
    log.info(
        "tuning %d new operators, %d trials (rounds of %d, at most %d per operator), database %s",
        len(tasks),
        config.trials,
        per_round,
        per_task,
        work_dir,
    )
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=config.population_size,
        init_min_unmeasured=min(50, config.population_size),
        genetic_num_iters=config.genetic_iters,
    )
    # MetaSchedule's logging setup lists its logger's handlers by name and fails on an unnamed one
    # ('NoneType' object has no attribute 'format'), as the second tuning in a pytest process met
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)
    contexts, weights = extracted_tasks_to_tune_contexts(tasks, work_dir=work_dir, strategy=strategy)
    builder = (
        _in_process_builder() if config.builder == "in-process" else ms.builder.LocalBuilder(timeout_sec=config.builder_timeout_s)
    )
    ms.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=work_dir,
        max_trials_global=config.trials,
        max_trials_per_task=per_task,
        num_trials_per_iter=per_round,
        task_scheduler="gradient",
        builder=builder,
        runner=ms.runner.LocalRunner(timeout_sec=config.runner_timeout_s),
        database=database,
    )
    return len(tasks)


def tune_module(mod: tvm.IRModule, target: tvm.target.Target, config: TuningConfig) -> tvm.IRModule:
    """Legalize, tune what is new, and apply the database (static shapes only).

    The steps follow ``relax.get_pipeline("static_shape_tuning")``; only the tuning
    step is ours, so that workloads already in the database are skipped.
    """
    from lightning_relief.deploy.targets import with_num_cores

    target = with_num_cores(target)
    pre = [transform.AttachAttrLayoutFreeBuffers()] if config.weight_prepack else []
    post = (
        [transform.SplitLayoutRewritePreproc(), transform.LiftTransformParams(), transform.FoldConstant()]
        if config.weight_prepack
        else []
    )
    # one process at a time per database folder: records name workloads by line number (see tuning_db)
    with target, locked_database(config.work_dir):
        mod = tvm.transform.Sequential(
            [transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(), relax.get_pipeline("zero"), *pre]
        )(mod)
        config.tuned_tasks = _tune_missing(mod, target, config)
        mod = tvm.transform.Sequential([transform.MetaScheduleApplyDatabase(str(config.work_dir)), *post])(mod)
    return mod
