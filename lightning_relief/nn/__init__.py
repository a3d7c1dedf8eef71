"""Layers and structural tools shared by the plugins."""

from lightning_relief.nn.structure import (
    STRUCTURE_KEY,
    RestorableStructureMixin,
    rebuild_structure,
    record_structure,
    structure_of,
)

__all__ = ["STRUCTURE_KEY", "RestorableStructureMixin", "rebuild_structure", "record_structure", "structure_of"]
