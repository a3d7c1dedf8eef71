"""Reload a compressed checkpoint into a LightningModule that lacks ``RestorableStructureMixin``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_relief.nn.structure import rebuild_structure


def load_compressed(
    cls: type[L.LightningModule], checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> L.LightningModule:
    """Like ``cls.load_from_checkpoint``: build ``cls(**hparams, **kwargs)``, replay the recorded
    structure (pruning, quantized layers), then load the weights strictly. In eval mode.

    The file is unpickled with ``weights_only=True`` and structure steps resolve only
    to known functions (see :mod:`lightning_relief.trust`): loading runs no code from it."""
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(kwargs)
    module = cls(**hparams)
    rebuild_structure(module, checkpoint)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return module
