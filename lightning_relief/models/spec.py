"""Rebuildable model descriptions: ``{"class_path": ..., "init_args": {...}}``.

LightningCLI writes nested modules this way; we use the same form so that a
``ClassifierModule`` made in Python also reloads from its checkpoint alone.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from lightning_relief.trust import resolve_class


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
            # nn.Module.__setattr__ is typed for tensors and modules only
            self.init_args = {k: v for k, v in bound.arguments.items() if k != "self"}  # type: ignore[assignment]

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


def build_model(spec: dict[str, Any], key: str = "model") -> nn.Module:
    """Instantiate a spec (nested specs in ``init_args`` are built too).

    Specs come from checkpoints and recipes, so every ``class_path`` must be an
    ``nn.Module`` subclass in a trusted package (see :mod:`lightning_relief.trust`);
    it is checked before anything is imported or called.
    """
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"{key}: a model spec needs 'class_path', got {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}"
        )
    cls = resolve_class(spec["class_path"], nn.Module, key=f"{key}.class_path")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{key}.init_args must be a mapping, got {type(init_args).__name__}")
    init_args = {
        k: build_model(v, f"{key}.init_args.{k}") if isinstance(v, dict) and "class_path" in v else v
        for k, v in init_args.items()
    }
    return cls(**init_args)
