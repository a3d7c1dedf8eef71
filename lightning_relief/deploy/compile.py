"""``compile_for_target``: PyTorch model → Relax → TVM executable (tuned or not)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from typing import Any

import tvm
from torch import nn

from lightning_relief.deploy.artifact import CompiledModel
from lightning_relief.deploy.artifact_files import sha256
from lightning_relief.deploy.errors import DeployError
from lightning_relief.deploy.frontend import RelaxGraph, to_relax
from lightning_relief.deploy.targets import TargetLike, resolve_target, target_dict, target_key
from lightning_relief.deploy.tuning import TuningConfig, tune_module


def _versions() -> dict[str, str]:
    import torch

    from lightning_relief import __version__

    return {"lightning_relief": __version__, "tvm": tvm.__version__, "torch": torch.__version__}


def build_graph(
    graph: RelaxGraph,
    target: TargetLike = "llvm",
    tuning: TuningConfig | int | dict | None = None,
    source_checkpoint: str | os.PathLike | None = None,
) -> CompiledModel:
    """Compile an imported graph (see :func:`~lightning_relief.deploy.frontend.to_relax`)."""
    tvm_target = resolve_target(target)
    config = TuningConfig.coerce(tuning)
    mod = graph.mod
    if config is not None:
        if graph.dynamic_batch:
            raise DeployError("tuning needs static shapes: import the model with dynamic_batch=False")
        mod = tune_module(mod, tvm_target, config)
    try:
        executable = tvm.compile(mod, target=tvm_target)
    except Exception as err:
        raise DeployError(f"TVM compilation for {target_key(tvm_target)} failed: {str(err).splitlines()[-1]}") from err
    transform = (
        config is not None and config.weight_prepack and "main_transform_params" in {g.name_hint for g in mod.get_global_vars()}
    )
    metadata: dict[str, Any] = {
        "format": 1,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "single_output": graph.single_output,
        "dynamic_batch": graph.dynamic_batch,
        "param_names": graph.param_names,
        "target": target_dict(tvm_target),
        "target_key": target_key(tvm_target),
        "graph_hash": graph.graph_hash,
        "tuned": config is not None,
        "tuning": config.as_dict() if config is not None else None,
        "transform_params": bool(transform),
        "source_checkpoint": str(source_checkpoint) if source_checkpoint else None,
        "source_checkpoint_sha256": sha256(source_checkpoint) if source_checkpoint else None,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return CompiledModel(executable, graph.params, metadata)


def compile_for_target(
    model: nn.Module,
    example_inputs: Any,
    target: TargetLike = "llvm",
    tuning: TuningConfig | int | dict | None = None,
    *,
    dynamic_batch: bool | None = None,
    custom_convert_map: dict[str, Callable] | None = None,
    source_checkpoint: str | os.PathLike | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``target`` with TVM; the model itself is not changed.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can trace; it may return a
            tensor or a tuple of tensors (e.g. mean and variance).
        example_inputs: a tensor/array or a tuple of them (a real batch is best).
        target: ``"llvm"`` (this CPU), a TVM target dict, or a string like
            ``"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72"``.
        tuning: ``None`` for untuned code, else a :class:`TuningConfig` (or an int:
            its trial budget). Tuned code has a fixed batch size.
        dynamic_batch: accept any batch size at run time (default: when untuned).
        custom_convert_map: extra Relax converters for operators TVM lacks,
            keyed like ``"erfinv.default"``.
        source_checkpoint: a checkpoint path whose SHA-256 goes into the metadata.

    Raises:
        UnsupportedOperatorError: an operator has no converter (names it and its module).
        TargetError: the target names a CPU or triple LLVM does not know (checked first).
        DeployError: export or compilation failed.

    >>> import torch
    >>> from lightning_relief.models import LeNet5
    >>> compiled = compile_for_target(LeNet5(input_size=8), torch.zeros(1, 1, 8, 8))
    >>> compiled(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    """
    resolve_target(target)  # a bad target fails here, not after the export
    config = TuningConfig.coerce(tuning)
    dynamic = (config is None) if dynamic_batch is None else dynamic_batch
    if dynamic and config is not None:
        raise ValueError("dynamic_batch=True cannot be tuned: MetaSchedule tunes static shapes")
    graph = to_relax(model, example_inputs, dynamic_batch=dynamic, custom_convert_map=custom_convert_map)
    compiled = build_graph(graph, target, config, source_checkpoint)
    # kept in memory for diagnosis (parity layer search); not part of the saved artifact
    compiled.compile_options = {"tuning": config, "custom_convert_map": custom_convert_map}
    return compiled
