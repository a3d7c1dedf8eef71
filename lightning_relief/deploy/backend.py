"""The backend seam: ``Backend.compile(model, example, config) -> Artifact``.

A backend turns a PyTorch model into an artifact that runs without PyTorch: call it, time it,
save it, load it back. TVM (:class:`~lightning_relief.deploy.tvm_backend.TVMBackend`) is the
default; ONNX Runtime (:class:`~lightning_relief.deploy.onnx_backend.OnnxRuntimeBackend`) is the
comparison every user makes and serves targets TVM does not. :func:`get_backend` picks one by
name (``"tvm"``, ``"onnxruntime"``) or by class path (``"my_package.MyBackend"``), so a new
backend needs no change here.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BACKENDS = {
    "tvm": "lightning_relief.deploy.tvm_backend.TVMBackend",
    "onnxruntime": "lightning_relief.deploy.onnx_backend.OnnxRuntimeBackend",
}
BACKENDS["onnx"] = BACKENDS["onnxruntime"]


@runtime_checkable
class Artifact(Protocol):
    """A compiled model: call it on numpy arrays or torch tensors (same kind back)."""

    metadata: dict[str, Any]

    def __call__(self, *inputs: Any) -> Any: ...

    def time(self, *inputs: Any, repeat: int = 10, number: int = 10, min_repeat_ms: float = 0) -> list[float]:
        """Seconds per call, one entry per repeat (each the mean of ``number`` calls, or of more
        calls when ``number`` take less than ``min_repeat_ms``)."""
        ...

    def save(self, dirpath: str | os.PathLike) -> Path: ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def compile(self, model: Any, example: Any, config: Any) -> Artifact:
        """``model`` (left untouched) → an artifact for ``config.target`` (an ``ExportConfig``)."""
        ...

    def load(self, dirpath: str | os.PathLike) -> Artifact: ...


def get_backend(spec: str | Backend) -> Backend:
    """A backend by name or class path (instantiated without arguments), or ``spec`` itself.

    >>> get_backend("tvm").name, get_backend("lightning_relief.deploy.onnx_backend.OnnxRuntimeBackend").name
    ('tvm', 'onnxruntime')
    """
    if not isinstance(spec, str):
        if not isinstance(spec, Backend):
            raise TypeError(f"backend must be a name, a class path or a Backend, got {type(spec).__name__}")
        return spec
    path = BACKENDS.get(spec, spec)
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"unknown backend {spec!r}: use one of {sorted(BACKENDS)} or a class path 'package.module.Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        if isinstance(err, ImportError) and getattr(err, "extra", None):
            raise
        raise ValueError(f"cannot load backend {spec!r}: {err}") from err
    backend = cls()
    if not isinstance(backend, Backend):
        raise TypeError(f"{path} is not a Backend: it needs name, compile(model, example, config) and load(dirpath)")
    return backend
