"""A model exported to ONNX and run by ONNX Runtime (the artifact of ``OnnxRuntimeBackend``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time as _time
from pathlib import Path
from typing import Any

import numpy as np

from lightning_relief.deploy.extras import require

MODEL = "model.onnx"
METADATA = "metadata.json"


class OnnxArtifact:
    """Call it on numpy arrays or torch tensors (same kind back), time it, save it; needs onnxruntime only.

    Args:
        model_bytes: the serialized ONNX model.
        metadata: ``inputs``/``outputs`` (name, shape with ``None`` for the batch, dtype), ``single_output``.
        threads: ONNX Runtime's intra-op threads (``None``: its default).
    """

    def __init__(self, model_bytes: bytes, metadata: dict[str, Any], threads: int | None = None) -> None:
        ort = require("onnxruntime", "the ONNX Runtime backend")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.model_bytes = model_bytes
        self.metadata = dict(metadata)
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self._names = [i.name for i in self.session.get_inputs()]

    def run(self, *inputs: Any) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(_numpy(x)[0]) for name, x in zip(self._names, inputs, strict=True)}
        return self.session.run(None, feed)

    def __call__(self, *inputs: Any) -> Any:
        outputs = self.run(*inputs)
        if inputs and _numpy(inputs[0])[1]:
            import torch

            outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if self.metadata.get("single_output", len(outputs) == 1) else tuple(outputs)

    def time(self, *inputs: Any, repeat: int = 10, number: int = 10, min_repeat_ms: float = 0) -> list[float]:
        """Seconds per call, ``repeat`` means of ``number`` calls (inputs converted once, outside the timer);
        a repeat runs ``number`` calls more until it lasts ``min_repeat_ms``, as TVM's time evaluator does."""
        feed = {name: np.ascontiguousarray(_numpy(x)[0]) for name, x in zip(self._names, inputs, strict=True)}
        self.session.run(None, feed)
        results = []
        for _ in range(repeat):
            calls, start = 0, _time.perf_counter()
            while calls == 0 or (_time.perf_counter() - start) * 1e3 < min_repeat_ms:
                for _ in range(number):
                    self.session.run(None, feed)
                calls += number
            results.append((_time.perf_counter() - start) / calls)
        return results

    def save(self, dirpath: str | os.PathLike) -> Path:
        """Write ``model.onnx`` and ``metadata.json`` to ``dirpath`` (replacing an older artifact only when complete)."""
        target = Path(dirpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (staging / MODEL).write_bytes(self.model_bytes)
            (staging / METADATA).write_text(json.dumps(self.metadata, indent=2, default=str))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, dirpath: str | os.PathLike, threads: int | None = None) -> OnnxArtifact:
        directory = Path(dirpath)
        if not (directory / MODEL).is_file() or not (directory / METADATA).is_file():
            raise FileNotFoundError(f"{directory} is not an ONNX artifact folder: needs {MODEL} and {METADATA}")
        return cls((directory / MODEL).read_bytes(), json.loads((directory / METADATA).read_text()), threads)


def _numpy(x: Any) -> tuple[np.ndarray, bool]:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy(), True
    return np.asarray(x), False
