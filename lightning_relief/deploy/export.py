"""One export step shared by ``TVMExportCallback`` and ``relief export``.

Lower brevitas layers, compile, check parity on a real batch, save the
artifact (atomically) and time it. The source model is never modified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_relief.deploy.config import ExportConfig


def has_brevitas_layers(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("brevitas.nn") for m in model.modules())


def export_model(
    model: nn.Module,
    example: Tensor,
    dirpath: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    verify_batch: Tensor | None = None,
    source_checkpoint: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Compile ``model`` and write the artifact to ``dirpath``; returns a summary.

    ``config`` (an :class:`~lightning_relief.deploy.ExportConfig`; ``options`` override its
    fields, e.g. ``measure=False``) says how. The parity check runs on ``verify_batch`` (a real
    batch; default ``example``). Raises :class:`~lightning_relief.deploy.ParityError` or
    :class:`~lightning_relief.deploy.UnsupportedOperatorError` before anything is written.
    Code for a board of another architecture is cross-compiled and neither checked nor timed
    here (``parity``/``latency`` say so): run those on the board through ``RemoteDevice``.
    """
    from lightning_relief.deploy.compile import compile_for_target
    from lightning_relief.deploy.latency import measure_latency
    from lightning_relief.deploy.parity import check_parity
    from lightning_relief.deploy.quantized import lower_quantized
    from lightning_relief.deploy.targets import is_foreign, target_arch

    config = config or ExportConfig()
    if options:
        config = config.replace(**options)
    if config.backend != "tvm":
        return _export_with(config, model, example, dirpath, verify_batch)
    integer = has_brevitas_layers(model)
    if integer:
        model = lower_quantized(model, example)
    compiled = compile_for_target(model, example, config.target, config.tuning, source_checkpoint=source_checkpoint)
    summary: dict[str, Any] = {
        "dirpath": str(dirpath),
        "source_checkpoint": str(source_checkpoint) if source_checkpoint else None,
        "integer_lowered": integer,
        "tuned": compiled.metadata["tuned"],
    }
    foreign = is_foreign(config.target)
    if foreign:
        summary["not_run_here"] = f"code for {target_arch(config.target)}: check parity and time it on the board (RemoteDevice)"
    if config.verify and not foreign:
        report = check_parity(
            model,
            compiled,
            verify_batch if verify_batch is not None else example,
            atol=config.atol,
            rtol=config.rtol,
            min_top1_agreement=config.min_top1_agreement,
        )
        compiled.metadata["parity"] = report.as_dict()
        summary.update(max_abs_error=report.max_abs_error, top1_agreement=report.top1_agreement)
    path = compiled.save(dirpath)
    summary["artifact_bytes"] = sum(p.stat().st_size for p in Path(path).iterdir())
    if config.measure and not foreign:
        timed = timing_input(compiled, example, config.time_batch)
        result = measure_latency(compiled, timed, repeat=config.repeat, number=config.number, cache=False)
        summary.update(
            latency_ms=result.median_ms,
            latency_iqr_ms=result.iqr_ms,
            latency_batch_size=int(timed.shape[0]),
            latency_input_shape=list(timed.shape),
        )
    return summary


def timing_input(compiled: Any, example: Tensor, time_batch: int | None) -> Tensor:
    """The input to time: ``time_batch`` rows of ``example`` (repeated if it has fewer), or the
    compiled batch size when the code has a fixed one."""
    fixed = None if compiled.metadata.get("dynamic_batch") else compiled.metadata["inputs"][0]["shape"][0]
    rows = fixed or time_batch or example.shape[0]
    if rows <= example.shape[0]:
        return example[:rows]
    return example.repeat((-(-rows // example.shape[0]),) + (1,) * (example.dim() - 1))[:rows]


def _export_with(
    config: ExportConfig, model: nn.Module, example: Tensor, dirpath: str | os.PathLike, verify_batch: Tensor | None
) -> dict[str, Any]:
    """The same steps through another :class:`~lightning_relief.deploy.backend.Backend`."""
    import statistics

    import torch

    from lightning_relief.deploy.backend import get_backend
    from lightning_relief.deploy.errors import ParityError
    from lightning_relief.deploy.frontend import frozen_copy
    from lightning_relief.deploy.parity import compare

    backend = get_backend(config.backend)
    artifact = backend.compile(model, example, config)
    summary: dict[str, Any] = {"dirpath": str(dirpath), "backend": backend.name}
    if config.verify:
        batch = verify_batch if verify_batch is not None else example
        with torch.no_grad():
            reference = frozen_copy(model)(batch)
        report = compare(reference, artifact(batch), config.atol, config.rtol, config.min_top1_agreement)
        if not report.ok:
            raise ParityError(f"{backend.name} output differs from PyTorch: {report.summary()}", report)
        artifact.metadata["parity"] = report.as_dict()
        summary.update(max_abs_error=report.max_abs_error, top1_agreement=report.top1_agreement)
    path = artifact.save(dirpath)
    summary["artifact_bytes"] = sum(p.stat().st_size for p in Path(path).iterdir())
    if config.measure:
        timed = timing_input(artifact, example, config.time_batch)
        seconds = artifact.time(timed, repeat=config.repeat, number=config.number)
        summary.update(
            latency_ms=statistics.median(seconds) * 1e3,
            latency_batch_size=int(timed.shape[0]),
            latency_input_shape=list(timed.shape),
        )
    return summary
