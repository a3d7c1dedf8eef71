"""ONNX Runtime as a :class:`~lightning_relief.deploy.backend.Backend` (the extra ``lightning-relief[onnx]``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_relief.deploy.extras import require
from lightning_relief.deploy.frontend import _MAX_BATCH, BATCH_DIM, _trace_inputs, as_input_tuple, frozen_copy
from lightning_relief.deploy.onnx_artifact import OnnxArtifact


class OnnxRuntimeBackend:
    """``torch.onnx.export`` (the dynamo exporter, dynamic batch) → an ONNX Runtime session on this CPU.

    Args:
        threads: intra-op threads of the session (``None``: ONNX Runtime's default).

    >>> import torch
    >>> from lightning_relief.deploy import ExportConfig
    >>> artifact = OnnxRuntimeBackend().compile(torch.nn.Linear(4, 2), torch.zeros(1, 4), ExportConfig())
    >>> artifact(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    name = "onnxruntime"

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        self.threads = threads

    def compile(self, model: Any, example: Any, config: Any) -> OnnxArtifact:
        from lightning_relief.deploy.errors import DeployError
        from lightning_relief.deploy.targets import is_foreign

        require("onnxscript", "the ONNX Runtime backend")
        require("onnxruntime", "the ONNX Runtime backend")
        if is_foreign(config.target):
            raise DeployError(f"the ONNX Runtime backend runs on this CPU only, not on {config.target!r}")
        inputs = as_input_tuple(example)
        clone = frozen_copy(model)
        traced, dynamic = _trace_inputs(inputs, config.dynamic_batch is not False)
        batch = torch.export.Dim(BATCH_DIM, min=1, max=_MAX_BATCH)
        names = [f"input{i}" for i in range(len(inputs))]
        try:
            program = torch.onnx.export(
                clone,
                traced,
                None,
                input_names=names,
                dynamo=True,
                verbose=False,
                dynamic_shapes=tuple({0: batch} for _ in traced) if dynamic else None,
            )
        except Exception as err:
            raise DeployError(f"torch.onnx.export failed for {type(model).__name__}: {str(err).splitlines()[0]}") from err
        with torch.no_grad():
            out = clone(*inputs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        metadata = {
            "backend": self.name,
            "inputs": [_spec(n, x, dynamic) for n, x in zip(names, inputs)],
            "outputs": [_spec(f"output{i}", o, dynamic) for i, o in enumerate(outs)],
            "single_output": not isinstance(out, (tuple, list)),
            "dynamic_batch": dynamic,
            "target": "onnxruntime-cpu",
            "versions": {
                "onnxruntime": require("onnxruntime", "the ONNX Runtime backend").__version__,
                "torch": torch.__version__,
            },
        }
        return OnnxArtifact(program.model_proto.SerializeToString(), metadata, self.threads)

    def load(self, dirpath: str | os.PathLike) -> OnnxArtifact:
        return OnnxArtifact.load(dirpath, self.threads)


def _spec(name: str, tensor: torch.Tensor, dynamic: bool) -> dict[str, Any]:
    shape = [None if dynamic else tensor.shape[0], *tensor.shape[1:]]
    return {"name": name, "shape": shape, "dtype": str(tensor.dtype).replace("torch.", "")}
