"""A compression policy: a pruning ratio per channel group and a bit width per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOAT_BITS = 32  # "not quantized"


@dataclass
class CompressionPolicy:
    """``prune`` maps a group's root layer to its ratio; ``bits`` maps a layer to its weight bits."""

    prune: dict[str, float] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)

    def pruned_groups(self) -> dict[str, float]:
        return {k: v for k, v in self.prune.items() if v > 0}

    def quantized_layers(self) -> dict[str, int]:
        return {k: v for k, v in self.bits.items() if v < FLOAT_BITS}

    def is_identity(self) -> bool:
        return not self.pruned_groups() and not self.quantized_layers()

    def key(self) -> tuple:
        return (tuple(sorted(self.pruned_groups().items())), tuple(sorted(self.quantized_layers().items())))

    def to_dict(self) -> dict[str, Any]:
        return {"prune": dict(self.prune), "bits": dict(self.bits)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPolicy:
        return cls(
            prune={k: float(v) for k, v in data.get("prune", {}).items()},
            bits={k: int(v) for k, v in data.get("bits", {}).items()},
        )
