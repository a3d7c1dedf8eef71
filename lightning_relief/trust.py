"""Which class and function paths read from data may be imported and called.

Checkpoints and recipes name classes by dotted path (``{"class_path": ...}``
model specs, structure steps that replay pruning or quantization). Importing a
module runs its top-level code and calling a class runs its constructor, so a
path taken from a file is resolved only when

1. its module lies in a trusted package: ``lightning_relief``, ``torch.nn``,
   ``torchvision.models``, ``bayesian_torch``, ``brevitas.nn``, ``aihwkit.nn``, or
   one the user opted into with :func:`trust_modules` or the environment variable
   ``RELIEF_TRUSTED_MODULES`` (comma-separated package names); and
2. the object found there is a class deriving from the expected base
   (``nn.Module`` for a model, ``LightningDataModule`` for data...), checked
   before it is called.

Anything else raises :class:`~lightning_relief.errors.UntrustedClassPathError`
naming the key it was read from, before any import.

>>> from torch import nn
>>> resolve_class("lightning_relief.models.LeNet5", nn.Module, key="model.class_path").__name__
'LeNet5'
>>> resolve_class("subprocess.Popen", nn.Module, key="model.class_path")
Traceback (most recent call last):
...
lightning_relief.errors.UntrustedClassPathError: model.class_path: 'subprocess.Popen' is refused: module 'subprocess' is not in a trusted package (...); if it is your own code, allow it with lightning_relief.trust.trust_modules('subprocess') or RELIEF_TRUSTED_MODULES=subprocess
>>> resolve_class("torch.nn.modules.module.Module.__init__", nn.Module, key="model.class_path")
Traceback (most recent call last):
...
lightning_relief.errors.UntrustedClassPathError: model.class_path: 'torch.nn.modules.module.Module.__init__' is refused: ...
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any

from lightning_relief.errors import UntrustedClassPathError

_ENV = "RELIEF_TRUSTED_MODULES"
DEFAULT_TRUSTED: tuple[str, ...] = (
    "lightning_relief",
    "torch.nn",
    "torchvision.models",
    "bayesian_torch",
    "brevitas.nn",
    "aihwkit.nn",
)
_user_trusted: set[str] = set()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def trust_modules(*packages: str) -> None:
    """Allow class paths (and structure steps) from the user's own ``packages``, process-wide."""
    for package in packages:
        if not isinstance(package, str) or not all(_NAME.match(p) for p in package.split(".")):
            raise ValueError(f"a package name is dotted identifiers, got {package!r}")
        _user_trusted.add(package)


def user_trusted() -> tuple[str, ...]:
    """Packages the user opted into: :func:`trust_modules` and ``$RELIEF_TRUSTED_MODULES``."""
    from_env = [p.strip() for p in os.environ.get(_ENV, "").split(",") if p.strip()]
    return tuple(sorted(_user_trusted.union(from_env)))


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _split(path: Any, key: str, separator: str) -> tuple[str, str]:
    if not isinstance(path, str):
        raise UntrustedClassPathError(key, path, f"expected a dotted path string, got {type(path).__name__}")
    if separator == ":":
        module, _, name = path.partition(":")
    else:
        module, _, name = path.rpartition(".")
    parts = [*module.split("."), name]
    if not module or not all(_NAME.match(p) and not p.startswith("__") for p in parts):
        raise UntrustedClassPathError(key, path, f"not a 'package.module{separator}Name' path")
    return module, name


def _import(module: str, name: str, key: str, path: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UntrustedClassPathError(key, path, f"cannot be imported: {err}") from err


def _refuse_untrusted(module: str, key: str, path: str, trusted: tuple[str, ...]) -> None:
    if not _within(module, trusted):
        top = module.split(".")[0]
        raise UntrustedClassPathError(
            key,
            path,
            f"module {module!r} is not in a trusted package ({', '.join(trusted)}); if it is your own code, "
            f"allow it with lightning_relief.trust.trust_modules({top!r}) or {_ENV}={top}",
        )


def resolve_class(path: Any, base: type | tuple[type, ...], key: str, typed_by_user: bool = False) -> type:
    """The class at ``path`` if its module is trusted and it derives from ``base``; never calls it.

    ``typed_by_user``: the path was typed on the command line by the user, not read
    from a file, so any importable module is accepted (the base-class check stays).
    """
    module, name = _split(path, key, ".")
    if not typed_by_user:
        _refuse_untrusted(module, key, path, DEFAULT_TRUSTED + user_trusted())
    obj = _import(module, name, key, path)
    bases = base if isinstance(base, tuple) else (base,)
    if not (inspect.isclass(obj) and issubclass(obj, bases)):
        expected = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
        raise UntrustedClassPathError(key, path, f"not a subclass of {expected} (found {type(obj).__name__} {obj!r:.80})")
    return obj


def resolve_function(path: Any, key: str, allowed: frozenset[str] | set[str] = frozenset()) -> Any:
    """The function at ``'package.module:function'`` if ``path`` is in ``allowed`` or its module is
    one the user trusts; it must be defined in that module (not re-exported there)."""
    module, name = _split(path, key, ":")
    if path not in allowed and not _within(module, user_trusted()):
        top = module.split(".")[0]
        raise UntrustedClassPathError(
            key,
            path,
            f"not a known step (known: {', '.join(sorted(allowed)) or 'none'}); if it is your own code, allow it "
            f"with lightning_relief.trust.trust_modules({top!r}) or {_ENV}={top}",
        )
    obj = _import(module, name, key, path)
    if not inspect.isfunction(obj) or obj.__module__ != module:
        raise UntrustedClassPathError(key, path, f"not a function defined in {module!r}")
    return obj
