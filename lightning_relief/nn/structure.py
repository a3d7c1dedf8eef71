"""Structural changes that a checkpoint must replay before its weights load.

Plugins that change a model's structure (pruning removes channels, quantization
swaps layers, conversion to photonic or analog layers) record each change on
the LightningModule with :func:`record_structure`. The record travels in the
checkpoint under ``"relief_structure"``, and :func:`rebuild_structure` replays
it on a freshly built module, so ``load_from_checkpoint`` sees matching shapes.

A step is ``{"rebuild": "package.module:function", "spec": {...}}``; the
function is called as ``function(lightning_module, spec)`` and must change the
module in place, exactly as the plugin did.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

STRUCTURE_KEY = "relief_structure"
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
    for step in checkpoint.get(STRUCTURE_KEY, [])[done:]:
        module_name, _, function_name = step["rebuild"].partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise RuntimeError(f"checkpoint structure step {step['rebuild']!r} cannot be imported: {err}") from err
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
