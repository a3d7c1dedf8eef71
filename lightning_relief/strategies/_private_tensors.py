"""Give a rank its own copy of tensors that a multiprocessing launcher left in shared memory."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric


def privatize_shared_tensors(module: nn.Module) -> int:
    """Replace every parameter, buffer and torchmetrics state of ``module`` that sits in shared memory by a
    private copy, in place; return how many were copied.

    Lightning's multiprocessing launcher pickles the module to its ranks, and torch moves pickled CPU tensors to
    shared memory. Lightning copies parameters and buffers out again only for ``start_method="spawn"``: under
    ``"fork"``/``"forkserver"`` every rank (and the main process) would step one shared set of weights, each
    update applied once per rank with racing in-place writes. Metric states stay shared under every start
    method until their first ``reset``. Under ``popen`` (Lightning's default) nothing is shared and nothing is
    copied.

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.share_memory()
        >>> privatize_shared_tensors(layer), layer.weight.is_shared()
        (2, False)
    """
    copied = 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_shared():
                tensor.data = tensor.data.clone()
                copied += 1
        for metric in module.modules():
            if isinstance(metric, Metric):
                for name, value in metric.metric_state.items():
                    if isinstance(value, torch.Tensor) and value.is_shared():
                        setattr(metric, name, value.clone())
                        copied += 1
    return copied
