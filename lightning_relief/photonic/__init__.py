"""Probabilistic photonic computing: the physical model, conversion of existing
networks to photonic sampler layers, and sampling-based prediction helpers.

Names load lazily, so :mod:`lightning_relief.nn.photonic` and this package can
import each other's modules without a cycle.

>>> from lightning_relief.photonic import convert_to_photonic, sample_logits, predictive
"""

from __future__ import annotations

from lightning_relief._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ChipModel": "lightning_relief.photonic.chip",
    "crossbar_passes": "lightning_relief.photonic.chip",
    "PhotonicNetwork": "lightning_relief.photonic.network",
    "convert_to_photonic": "lightning_relief.photonic.convert",
    "photonic_layers": "lightning_relief.photonic.convert",
    "rebuild_photonic": "lightning_relief.photonic.convert",
    "PhotonicPrediction": "lightning_relief.photonic.sampling",
    "photonic_samples": "lightning_relief.photonic.sampling",
    "predictive": "lightning_relief.photonic.sampling",
    "sample_logits": "lightning_relief.photonic.sampling",
    "summarize_samples": "lightning_relief.photonic.sampling",
    "ar1_noise": "lightning_relief.photonic.physics",
    "correlation_from_rates": "lightning_relief.photonic.physics",
    "quantize_readout": "lightning_relief.photonic.physics",
    "rank_normal": "lightning_relief.photonic.physics",
    "relative_spread": "lightning_relief.photonic.physics",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
