"""``ExportConfig``: the export settings shared by ``TVMExportCallback``, ``export_model`` and ``relief export``.

One place for the defaults and tolerances, validated when the config is made (not when an
export that ran for minutes reaches them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lightning_relief.deploy.errors import TargetError
from lightning_relief.deploy.targets import TargetLike, resolve_target
from lightning_relief.deploy.tuning import TuningConfig


@dataclass(frozen=True)
class ExportConfig:
    """How to compile, check and time an exported model.

    Args:
        target: where the code runs: ``"llvm"`` (this CPU), a board preset (``"rpi4"``,
            ``"x86-avx2"``, ``"x86-avx512"``), a TVM target dict or ``"llvm -mtriple=..."`` string.
        tuning: ``None`` (untuned), a :class:`~lightning_relief.deploy.TuningConfig` or an int
            trial budget; tuned code has the example's fixed batch size.
        verify: compare with PyTorch on a real batch; a failure raises ``ParityError``.
        atol, rtol, min_top1_agreement: parity tolerances (max abs error ``<= atol + rtol * max|ref|``).
        measure: time the artifact with TVM's time evaluator.
        repeat, number: time evaluator settings.
        backend: ``"tvm"`` (default), ``"onnxruntime"``, or the class path of a
            :class:`~lightning_relief.deploy.backend.Backend`.
        time_batch: the batch size timed (default 1, the latency of one request); ``None`` times
            the example's batch. Code compiled for a fixed batch is timed at that batch.
        dynamic_batch: compile for any batch size (``None``: the backend's default; TVM's is
            dynamic when untuned, and a static batch gives it faster code).

    >>> config = ExportConfig(atol=1e-5)
    >>> config.rtol, config.time_batch, config.replace(measure=False).measure
    (0.0001, 1, False)
    """

    target: TargetLike = "llvm"
    tuning: TuningConfig | int | dict | None = None
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-4
    min_top1_agreement: float = 0.99
    measure: bool = True
    repeat: int = 10
    number: int = 10
    time_batch: int | None = 1
    backend: str = "tvm"
    dynamic_batch: bool | None = None

    def __post_init__(self) -> None:
        try:
            resolve_target(self.target)
        except (ValueError, TypeError) as err:
            raise TargetError(f"ExportConfig: target {self.target!r} is invalid: {err}") from err
        object.__setattr__(self, "tuning", TuningConfig.coerce(self.tuning))
        if not (self.atol >= 0 and self.rtol >= 0 and 0 <= self.min_top1_agreement <= 1):
            raise ValueError(f"bad tolerances: atol={self.atol}, rtol={self.rtol}, min_top1_agreement={self.min_top1_agreement}")
        for name in ("repeat", "number"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be a name or a class path, got {self.backend!r}")
        if self.time_batch is not None and (not isinstance(self.time_batch, int) or self.time_batch < 1):
            raise ValueError(f"time_batch must be an integer >= 1 or None, got {self.time_batch!r}")

    def replace(self, **changes: Any) -> ExportConfig:
        """A copy with ``changes`` (validated); unknown names raise ``TypeError`` naming the fields."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown export option(s) {sorted(unknown)}; ExportConfig has: {names}")
        return dataclasses.replace(self, **changes)
