"""Convert the linear and conv layers of an existing network to photonic sampler layers.

Example::

    >>> from lightning_relief.models import ClassifierModule, LeNet5
    >>> from lightning_relief.photonic import convert_to_photonic, photonic_layers
    >>> module = convert_to_photonic(ClassifierModule(LeNet5(input_size=8)), bandwidth_ratio=0.01)
    >>> sorted(photonic_layers(module))[:2]
    ['model.classifier.1', 'model.classifier.4']

Converting a LightningModule that uses
:class:`~lightning_relief.nn.structure.RestorableStructureMixin` (as
``ClassifierModule`` does) records the step, so ``load_from_checkpoint`` rebuilds
the photonic layers before the weights load. Convert before ``fit``: an
optimizer made earlier still holds the replaced layers' parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from lightning_relief.errors import UnsupportedLayerError, UnsupportedModelError
from lightning_relief.nn.photonic import PhotonicSamplerLayer
from lightning_relief.nn.structure import RestorableStructureMixin, record_structure

__all__ = ["convert_to_photonic", "photonic_layers", "rebuild_photonic"]

REBUILD = "lightning_relief.photonic.convert:rebuild_photonic"
_CONVERTIBLE = (nn.Linear, nn.Conv2d)
_SUPPORTED = ("Linear", "Conv2d")
# layers with weights that stay electronic (digital) next to the photonic crossbars
_KEPT = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_HINT = "Pass layers=[...] to convert the supported layers you choose"
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def photonic_layers(model: nn.Module) -> dict[str, PhotonicSamplerLayer]:
    """The photonic sampler layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PhotonicSamplerLayer)}


def _check_all_convertible(modules: dict[str, nn.Module]) -> None:
    """Converting "every layer" must not leave a compute layer deterministic without saying so."""
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            # its projections are read as raw tensors by F.multi_head_attention_forward
            raise UnsupportedLayerError("convert_to_photonic", name, module, _SUPPORTED, _HINT)
        if isinstance(module, (*_CONVERTIBLE, *_KEPT)) or any(True for _ in module.children()):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise UnsupportedLayerError("convert_to_photonic", name, module, _SUPPORTED, _HINT)


def _select(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        _check_all_convertible(modules)
        names = [name for name, m in modules.items() if isinstance(m, _CONVERTIBLE) and not isinstance(m, PhotonicSamplerLayer)]
        if not names:
            raise UnsupportedModelError("convert_to_photonic", model, "it has no nn.Linear or nn.Conv2d layer to convert")
        return names
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    names = list(layers)
    if not names:
        raise ValueError("layers is empty: give layer names, or None for every Linear and Conv2d")
    for name in names:
        if name not in modules or name == "":
            convertible = [n for n, m in modules.items() if isinstance(m, _CONVERTIBLE)]
            raise ValueError(f"layers: {name!r} is not a submodule of {type(model).__name__}; convertible: {convertible}")
        if not isinstance(modules[name], _CONVERTIBLE) or isinstance(modules[name], PhotonicSamplerLayer):
            raise ValueError(f"layers: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear or nn.Conv2d")
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a name twice: {names}")
    return names


def _replace(model: nn.Module, names: list[str], options: dict[str, Any], copy_weights: bool) -> None:
    # every replacement is built (and its options validated) before the first swap
    replacements = {
        name: PhotonicSamplerLayer.from_module(model.get_submodule(name), copy_weights=copy_weights, **options) for name in names
    }
    for name, layer in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def convert_to_photonic(model: ModuleT, layers: Sequence[str] | None = None, *, inplace: bool = False, **options: Any) -> ModuleT:
    """Replace ``layers`` (qualified names; ``None``: every Linear and Conv2d) by photonic layers.

    The photonic layers start with mean weights equal to the old weights and
    the same biases; ``options`` are the keyword arguments of
    :class:`~lightning_relief.nn.photonic.PhotonicSamplerLayer` (``bandwidth_ratio``,
    ``bandwidth``, ``correlation``, ``max_intensity``, ``noise_floor``, ``adc_bits``, ...).
    Works on a deep copy unless ``inplace``; a bad name or option raises before
    anything changes.
    """
    names = _select(model, layers)
    target = model if inplace else copy.deepcopy(model)
    _replace(target, names, options, copy_weights=True)
    if isinstance(target, RestorableStructureMixin):
        record_structure(target, REBUILD, {"layers": names, "options": {k: _plain(v) for k, v in options.items()}})
    return target


def rebuild_photonic(module: nn.Module, spec: dict[str, Any]) -> None:
    """Replay a recorded conversion on a freshly built module (weights load afterwards)."""
    options = dict(spec.get("options", {}))
    if "bandwidth_bounds" in options:
        options["bandwidth_bounds"] = tuple(options["bandwidth_bounds"])
    _replace(module, list(spec["layers"]), options, copy_weights=False)
