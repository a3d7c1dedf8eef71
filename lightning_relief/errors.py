"""Errors every plugin raises when it meets a model it cannot handle.

A drop-in plugin is judged on the user's model: when it meets a layer, a rank
or a setting it does not support, it says so with one of these (naming the
module path, the layer type and what is supported) instead of passing the
model through unchanged or counting a wrong cost.

>>> from torch import nn
>>> err = UnsupportedLayerError("compression", "features.0", nn.LSTM(2, 2), supported=("Conv1d", "Linear"))
>>> print(err)
compression does not support layer 'features.0' (LSTM); supported: Conv1d, Linear
>>> isinstance(err, TypeError), err.module_path, err.layer_type
(True, 'features.0', 'LSTM')
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class ReliefError(Exception):
    """Base of the errors that name what a plugin could not handle."""


class UnsupportedLayerError(ReliefError, TypeError):
    """A plugin met a layer type it does not handle.

    Args:
        plugin: who raises it, as the user knows it (``"SensitivityPruningCallback"``, ``"to_bayesian"``...).
        module_path: the layer's dotted name in the model (``""`` for the root).
        layer: the module itself, or its type name.
        supported: the layer types the plugin does handle.
        hint: one sentence on what to do instead.
    """

    def __init__(
        self,
        plugin: str,
        module_path: str,
        layer: nn.Module | str,
        supported: Iterable[str] = (),
        hint: str = "",
    ) -> None:
        self.plugin = plugin
        self.module_path = module_path
        self.layer_type = layer if isinstance(layer, str) else type(layer).__name__
        self.supported = tuple(supported)
        message = f"{plugin} does not support layer '{module_path or '<root>'}' ({self.layer_type})"
        if self.supported:
            message += "; supported: " + ", ".join(self.supported)
        if hint:
            message += f". {hint}"
        super().__init__(message)


class UnsupportedModelError(ReliefError, ValueError):
    """A plugin cannot work on a model as a whole (nothing it can act on, not traceable, wrong input shape).

    Args:
        plugin: who raises it.
        model: the model, or its class name.
        reason: why, in one sentence that says what to change.
    """

    def __init__(self, plugin: str, model: nn.Module | str, reason: str) -> None:
        self.plugin = plugin
        self.model_type = model if isinstance(model, str) else type(model).__name__
        self.reason = reason
        super().__init__(f"{plugin} cannot handle model {self.model_type}: {reason}")


class UntrustedClassPathError(ReliefError, ValueError):
    """A class or function path read from data (a recipe, a checkpoint) that may not be loaded.

    Raised before anything at that path is imported or called: the module is not
    in a trusted package, or the object is not of the expected kind.

    Args:
        key: where the path was read (``"hyper_parameters.model.class_path"``...).
        path: the dotted path as given.
        reason: why it is refused, and how to allow it when it is the user's own code.
    """

    def __init__(self, key: str, path: object, reason: str) -> None:
        self.key = key
        self.path = path
        self.reason = reason
        super().__init__(f"{key}: {path!r} is refused: {reason}")


class UnsupportedStrategyError(ReliefError, TypeError):
    """A plugin cannot run under a training strategy (the way it shards or wraps the model).

    Args:
        plugin: who raises it.
        strategy: the strategy, or its class name.
        reason: why, in one sentence that says what works instead.

    >>> print(UnsupportedStrategyError("AnalogNoise", "FSDPStrategy", "its weights are flat shards"))
    AnalogNoise does not support strategy FSDPStrategy: its weights are flat shards
    """

    def __init__(self, plugin: str, strategy: object, reason: str) -> None:
        self.plugin = plugin
        self.strategy_type = strategy if isinstance(strategy, str) else type(strategy).__name__
        self.reason = reason
        super().__init__(f"{plugin} does not support strategy {self.strategy_type}: {reason}")


class UnsupportedCallbackError(ReliefError, TypeError):
    """A plugin cannot run beside another callback of the same ``Trainer``.

    Args:
        plugin: who raises it.
        callback: the callback, or its class name.
        reason: why, in one sentence that says what works instead.

    >>> print(UnsupportedCallbackError("compression", "WeightAveraging", "its average keeps the old shapes"))
    compression does not support callback WeightAveraging: its average keeps the old shapes
    """

    def __init__(self, plugin: str, callback: object, reason: str) -> None:
        self.plugin = plugin
        self.callback_type = callback if isinstance(callback, str) else type(callback).__name__
        self.reason = reason
        super().__init__(f"{plugin} does not support callback {self.callback_type}: {reason}")
