"""lightning_relief: drop-in PyTorch Lightning plugins for compressed,
noise-robust and uncertainty-aware models that ship through Apache TVM.

Public classes are imported lazily (PEP 562): ``import lightning_relief`` stays
fast, and TVM, brevitas or aihwkit load only when their plugin is used.

>>> from lightning_relief import ClassifierModule, DigitsDataModule
>>> from lightning_relief.models import LeNet5
>>> module = ClassifierModule(model=LeNet5(input_size=8))
"""

from __future__ import annotations

from lightning_relief._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ClassifierModule": "lightning_relief.models.classifier",
    "DigitsDataModule": "lightning_relief.data.digits",
    "SyntheticDataModule": "lightning_relief.data.synthetic",
    "MNIST1DDataModule": "lightning_relief.data.mnist1d",
    "SensitivityPruningCallback": "lightning_relief.callbacks.sensitivity_pruning",
    "TVMExportCallback": "lightning_relief.callbacks.tvm_export",
    "AnalogNoiseStrategy": "lightning_relief.strategies.analog_noise",
    "DeepEnsembleStrategy": "lightning_relief.strategies.deep_ensemble",
    "MomentPropagationWrapper": "lightning_relief.moments.wrapper",
    "PhotonicSamplerLayer": "lightning_relief.nn.photonic",
    "PhotonicLinear": "lightning_relief.nn.photonic",
    "PhotonicConv2d": "lightning_relief.nn.photonic",
    "PhotonicNetwork": "lightning_relief.photonic.network",
    "convert_to_photonic": "lightning_relief.photonic.convert",
    "AnalogNoise": "lightning_relief.noise.callback",
    "EnsembleModel": "lightning_relief.uncertainty.ensemble",
    "BayesianModel": "lightning_relief.bayes.model",
    "KLDivergenceCallback": "lightning_relief.bayes.kl",
    "MomentPropagationEvalCallback": "lightning_relief.callbacks.moment_propagation_eval",
    "TemperatureScaling": "lightning_relief.callbacks.temperature_scaling",
    "PerRankNoise": "lightning_relief.callbacks.per_rank_noise",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
