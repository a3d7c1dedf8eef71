"""Errors raised by :mod:`lightning_relief.deploy`; each message names what to fix."""

from __future__ import annotations


class DeployError(RuntimeError):
    """Export, compilation, measurement or parity failed; the source model is untouched."""


class TargetError(DeployError, ValueError):
    """A target names a CPU, triple or kind that TVM's LLVM does not know (a ``ValueError`` too)."""


class UnsupportedOperatorError(DeployError):
    """The TVM Relax frontend has no converter for an operator used by the model."""

    def __init__(self, operator: str, module_path: str, module_type: str | None = None, others: list[str] | None = None):
        self.operator = operator
        self.module_path = module_path
        self.module_type = module_type
        self.others = list(others or [])
        where = f"module '{module_path}'" + (f" ({module_type})" if module_type else "")
        more = f"; also unsupported: {', '.join(self.others)}" if self.others else ""
        super().__init__(
            f"operator '{operator}' used in {where} is not supported by TVM's Relax frontend{more}. "
            "Replace it with supported ops, or pass custom_convert_map={'" + operator + "': converter}."
        )


class ParityError(DeployError):
    """The compiled model's outputs differ from PyTorch's beyond the tolerance."""

    def __init__(
        self, message: str, report: object | None = None, first_divergent: str | None = None, layer_type: str | None = None
    ):
        super().__init__(message)
        self.report = report
        self.first_divergent = self.module_path = first_divergent
        self.layer_type = layer_type
