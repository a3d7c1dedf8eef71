"""Structural changes that a checkpoint must replay before its weights load.

Plugins that change a model's structure (pruning removes channels, quantization
swaps layers, conversion to photonic or analog layers) record each change on
the LightningModule with :func:`record_structure`. The record travels in the
checkpoint under ``"relief_structure"``, and :func:`rebuild_structure` replays
it on a freshly built module, so ``load_from_checkpoint`` sees matching shapes.

A step is ``{"rebuild": "package.module:function", "spec": {...}}``; the
function is called as ``function(lightning_module, spec)`` and must change the
module in place, exactly as the plugin did. Since the step is read from a
checkpoint, only the functions in :data:`REBUILD_STEPS` (and those of packages
the user trusts, see :mod:`lightning_relief.trust`) are called; a plugin that
records a new kind of step adds it there.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_relief.trust import resolve_function

STRUCTURE_KEY = "relief_structure"
REBUILD_STEPS: frozenset[str] = frozenset(
    {
        "lightning_relief.bayes.convert:rebuild_bayesian",
        "lightning_relief.compress.apply:replay_pruning",
        "lightning_relief.compress.quantize:replay_quantization",
        "lightning_relief.photonic.convert:rebuild_photonic",
        "lightning_relief.uncertainty.stacking:stack_members",
        "lightning_relief.uncertainty.temperature:rebuild_temperature",
    }
)
_ATTR = "_relief_structure"


def record_structure(module: nn.Module, rebuild: str, spec: dict[str, Any]) -> None:
    """Append a replayable step to ``module``'s structure record."""
    if ":" not in rebuild:
        raise ValueError(f"rebuild must be 'package.module:function', got {rebuild!r}")
    steps = module.__dict__.setdefault(_ATTR, [])
    steps.append({"rebuild": rebuild, "spec": spec})


def structure_of(module: nn.Module) -> list[dict[str, Any]]:
    """The recorded steps, oldest first (empty for an unchanged model)."""
    return list(module.__dict__.get(_ATTR, []))


def save_structure(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    steps = structure_of(module)
    if steps:
        checkpoint[STRUCTURE_KEY] = steps


def rebuild_structure(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Replay the steps stored in ``checkpoint`` that ``module`` has not had yet."""
    done = len(structure_of(module))
    steps = checkpoint.get(STRUCTURE_KEY, [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) and {"rebuild", "spec"} <= s.keys() for s in steps):
        raise ValueError(f"checkpoint {STRUCTURE_KEY!r} must be a list of {{'rebuild', 'spec'}} steps")
    # resolve every step before replaying any, so a refused one leaves the module unchanged
    functions = [resolve_function(s["rebuild"], f"{STRUCTURE_KEY}[{i}].rebuild", REBUILD_STEPS) for i, s in enumerate(steps)]
    for step, function in list(zip(steps, functions, strict=True))[done:]:
        function(module, step["spec"])
        record_structure(module, step["rebuild"], step["spec"])


class RestorableStructureMixin:
    """LightningModule mixin: save the structure record and replay it on load."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_structure(self, checkpoint)  # type: ignore[arg-type]
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rebuild_structure(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
