"""Rebuildable model descriptions: ``{"class_path": ..., "init_args": {...}}``.

LightningCLI writes nested modules this way; we use the same form so that a
``ClassifierModule`` made in Python also reloads from its checkpoint alone.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from torch import nn


def records_init_args(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: keep the bound constructor arguments as ``self.init_args``."""
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        original(self, *args, **kwargs)
        if type(self) is cls:  # the outermost class records, subclasses overwrite
            self.init_args = {k: v for k, v in bound.arguments.items() if k != "self"}

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of a model built by a ``records_init_args`` class, else ``None``."""
    init_args = getattr(model, "init_args", None)
    if init_args is None:
        return None
    cls = type(model)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(init_args)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a spec (nested specs in ``init_args`` are built too)."""
    if "class_path" not in spec:
        raise ValueError(f"a model spec needs 'class_path', got keys {sorted(spec)}")
    module_name, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model class_path {spec['class_path']!r} cannot be imported: {err}") from err
    init_args = {
        k: build_model(v) if isinstance(v, dict) and "class_path" in v else v
        for k, v in (spec.get("init_args") or {}).items()
    }
    return cls(**init_args)
