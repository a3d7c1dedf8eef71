"""PEP 562 lazy re-exports, so importing a package does not import TVM, brevitas or aihwkit."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public names live in the modules ``exports`` maps them to.

    Use as ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())``; a resolved name
    is cached in ``namespace`` so the module is imported once.
    """

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__
