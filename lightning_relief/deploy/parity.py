"""Numerical parity between a compiled model and its PyTorch source.

:func:`check_parity` runs both on a real batch and reports the largest
absolute error per output and the top-1 agreement of the first output. When
the check fails it locates the first layer that diverges: the model is wrapped
so that every submodule's output becomes an extra graph output (forward hooks
run while ``torch.export`` traces), compiled once with the same options, and
the intermediate values are compared with PyTorch's in execution order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_relief.deploy.artifact import CompiledModel
from lightning_relief.deploy.errors import ParityError
from lightning_relief.deploy.frontend import as_input_tuple, frozen_copy


@dataclass
class ParityReport:
    """Errors of a compiled model against PyTorch on one batch."""

    max_abs_error: float
    output_errors: list[float]
    top1_agreement: float | None
    atol: float
    rtol: float
    min_top1_agreement: float
    ok: bool
    first_divergent: str | None = None
    first_divergent_type: str | None = None
    layer_errors: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.4f}" if self.top1_agreement is not None else ""
        kind = f" ({self.first_divergent_type})" if self.first_divergent_type else ""
        where = f"; first diverging layer: '{self.first_divergent}'{kind}" if self.first_divergent else ""
        return f"max abs error {self.max_abs_error:.3g} (atol {self.atol:g}, rtol {self.rtol:g}){top1}{where}"


def _flat_outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _flat_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _flat_outputs(v)]
    raise TypeError(f"model output of type {type(value).__name__} cannot be compared")


def _exceeds(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[bool, float]:
    if ref.shape != got.shape:
        return True, float("inf")
    err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err > atol + rtol * scale or not np.isfinite(err), err


def compare(
    reference: Any, compiled_out: Any, atol: float = 1e-4, rtol: float = 1e-4, min_top1_agreement: float = 0.99
) -> ParityReport:
    """Compare two (possibly tuple) outputs; top-1 agreement on the first 2-D output."""
    refs, gots = _flat_outputs(reference), _flat_outputs(compiled_out)
    if len(refs) != len(gots):
        raise ParityError(f"PyTorch returned {len(refs)} output(s), the compiled model {len(gots)}")
    errors, ok = [], True
    for ref, got in zip(refs, gots):
        bad, err = _exceeds(ref, got, atol, rtol)
        errors.append(err)
        ok &= not bad
    top1 = None
    if refs[0].ndim == 2 and refs[0].shape[1] > 1 and refs[0].shape == gots[0].shape:
        top1 = float(np.mean(refs[0].argmax(1) == gots[0].argmax(1)))
        ok &= top1 >= min_top1_agreement
    return ParityReport(max(errors), errors, top1, atol, rtol, min_top1_agreement, bool(ok))


class _Probe(nn.Module):
    """Returns the model's outputs followed by every submodule's tensor output, in call order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.order: list[str] = []

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        captured: list[Tensor] = []
        self.order = []
        # looked up per call: export deep-copies the probe, so module ids change
        names = {id(m): n for n, m in self.model.named_modules() if n}

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            # tuple outputs too: a recurrent layer returns (sequence, state)
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            tensors = [o for o in outputs if isinstance(o, Tensor)]
            captured.extend(tensors)
            self.order.extend([names[id(module)]] * len(tensors))

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if id(m) in names]
        try:
            out = self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return (*outs, *captured)


def locate_divergence(
    model: nn.Module,
    inputs: Any,
    target: Any = "llvm",
    tuning: Any = None,
    custom_convert_map: dict | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> tuple[str | None, str | None, list[tuple[str, float]]]:
    """The first submodule whose compiled output differs from PyTorch's, its type, and all layer errors."""
    from lightning_relief.deploy.compile import compile_for_target
    from lightning_relief.deploy.tuning import TuningConfig

    xs = as_input_tuple(inputs)
    probe = _Probe(frozen_copy(model))
    with torch.no_grad():
        reference = probe(*xs)
    names = list(probe.order)
    types = {name: type(m).__name__ for name, m in probe.model.named_modules()}
    config = TuningConfig.coerce(tuning)
    if config is not None:  # reuse the database, never tune again for a diagnosis
        config = TuningConfig(trials=0, work_dir=config.work_dir, weight_prepack=config.weight_prepack)
    compiled = compile_for_target(probe, xs, target, config, dynamic_batch=False, custom_convert_map=custom_convert_map)
    got = compiled.run(*xs)
    n_out = len(reference) - len(names)
    layer_errors, first = [], None
    for name, ref, out in zip(names, reference[n_out:], got[n_out:]):
        bad, err = _exceeds(ref.numpy(), out, atol, rtol)
        layer_errors.append((name, err))
        if bad and first is None:
            first = name
    return first, types.get(first) if first else None, layer_errors


def check_parity(
    model: nn.Module,
    compiled: CompiledModel,
    inputs: Any,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    min_top1_agreement: float = 0.99,
    locate: bool = True,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ``compiled`` with ``model`` (a frozen copy, eval mode) on ``inputs``.

    On failure (any output beyond ``atol + rtol * max|ref|``, or top-1 agreement
    below ``min_top1_agreement``) the first diverging layer is located (one extra
    compile) and a :class:`ParityError` naming it is raised.

    >>> import torch
    >>> from lightning_relief.deploy import compile_for_target, check_parity
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> check_parity(net, compile_for_target(net, torch.zeros(1, 4)), torch.randn(8, 4)).ok
    True
    """
    xs = as_input_tuple(inputs)
    clone = frozen_copy(model)
    with torch.no_grad():
        reference = clone(*xs)
    report = compare(reference, compiled.run_batched(*xs), atol, rtol, min_top1_agreement)
    if report.ok:
        return report
    if locate:
        options = getattr(compiled, "compile_options", {}) or {}
        first, kind, layer_errors = locate_divergence(
            clone, xs, compiled.metadata["target"], options.get("tuning"), options.get("custom_convert_map"), atol, rtol
        )
        report.first_divergent, report.first_divergent_type, report.layer_errors = first, kind, layer_errors
    if raise_on_failure:
        hint = ""
        if not report.first_divergent:
            hint = "; no single layer diverges in a probe compile" if locate else "; layer not located (locate=False)"
        raise ParityError(
            f"TVM output differs from PyTorch: {report.summary()}{hint}",
            report,
            report.first_divergent,
            report.first_divergent_type,
        )
    return report
