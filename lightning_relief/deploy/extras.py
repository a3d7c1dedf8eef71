"""Optional dependencies: a backend imports its runtime through :func:`require`, which names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# which ``pip install 'lightning-relief[EXTRA]'`` brings each optional module
EXTRAS = {"tvm": "tvm", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, needed_for: str) -> None:
        self.module, self.extra = module, extra
        super().__init__(f"{needed_for} needs the package '{module}': pip install 'lightning-relief[{extra}]'")


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra.

    >>> require("numpy", "tests").__name__
    'numpy'
    >>> require("no_such_module", "the X backend")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    MissingExtraError: the X backend needs the package 'no_such_module': pip install 'lightning-relief[no_such_module]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        root = module.split(".")[0]
        raise MissingExtraError(root, EXTRAS.get(root, root), needed_for) from err
