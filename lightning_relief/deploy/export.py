"""One export step shared by ``TVMExportCallback`` and ``relief export``.

Lower brevitas layers, compile, check parity on a real batch, save the
artifact (atomically) and time it. The source model is never modified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_relief.deploy.targets import TargetLike
from lightning_relief.deploy.tuning import TuningConfig


def has_brevitas_layers(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("brevitas.nn") for m in model.modules())


def export_model(
    model: nn.Module,
    example: Tensor,
    dirpath: str | os.PathLike,
    target: TargetLike = "llvm",
    tuning: TuningConfig | int | dict | None = None,
    verify_batch: Tensor | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    min_top1_agreement: float = 0.99,
    measure: bool = True,
    repeat: int = 10,
    number: int = 10,
    source_checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compile ``model`` and write the artifact to ``dirpath``; returns a summary.

    ``verify_batch`` (a real batch) is compared with PyTorch; pass ``None`` to skip
    the check. Raises :class:`~lightning_relief.deploy.ParityError` or
    :class:`~lightning_relief.deploy.UnsupportedOperatorError` before anything is written.
    """
    from lightning_relief.deploy.compile import compile_for_target
    from lightning_relief.deploy.latency import measure_latency
    from lightning_relief.deploy.parity import check_parity
    from lightning_relief.deploy.quantized import lower_quantized

    integer = has_brevitas_layers(model)
    if integer:
        model = lower_quantized(model, example)
    compiled = compile_for_target(model, example, target, tuning, source_checkpoint=source_checkpoint)
    summary: dict[str, Any] = {
        "dirpath": str(dirpath),
        "source_checkpoint": str(source_checkpoint) if source_checkpoint else None,
        "integer_lowered": integer,
        "tuned": compiled.metadata["tuned"],
    }
    if verify_batch is not None:
        report = check_parity(model, compiled, verify_batch, atol=atol, rtol=rtol, min_top1_agreement=min_top1_agreement)
        compiled.metadata["parity"] = report.as_dict()
        summary.update(max_abs_error=report.max_abs_error, top1_agreement=report.top1_agreement)
    path = compiled.save(dirpath)
    summary["artifact_bytes"] = sum(p.stat().st_size for p in Path(path).iterdir())
    if measure:
        result = measure_latency(compiled, example, repeat=repeat, number=number, cache=False)
        summary.update(latency_ms=result.median_ms, latency_iqr_ms=result.iqr_ms)
    return summary
