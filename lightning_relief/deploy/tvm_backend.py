"""TVM as a :class:`~lightning_relief.deploy.backend.Backend`: the default one."""

from __future__ import annotations

import os
from typing import Any

from lightning_relief.deploy.extras import require


class TVMBackend:
    """``torch.export`` → Relax → ``tvm.compile`` (tuned when ``config.tuning`` says so).

    >>> import torch
    >>> from lightning_relief.deploy import ExportConfig
    >>> artifact = TVMBackend().compile(torch.nn.Linear(4, 2), torch.zeros(1, 4), ExportConfig())
    >>> artifact(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    name = "tvm"

    def compile(self, model: Any, example: Any, config: Any) -> Any:
        require("tvm", "the TVM backend")
        from lightning_relief.deploy.compile import compile_for_target

        return compile_for_target(model, example, config.target, config.tuning, dynamic_batch=config.dynamic_batch)

    def load(self, dirpath: str | os.PathLike) -> Any:
        require("tvm", "the TVM backend")
        from lightning_relief.deploy.artifact import load_compiled

        return load_compiled(dirpath)
