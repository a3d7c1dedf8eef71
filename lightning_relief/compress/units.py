"""What in a model can be compressed: prunable channel groups and quantizable layers.

Pruning works on torch-pruning's dependency groups: channels that must be
removed together (a residual sum couples the channels of every branch that
feeds it; a concatenation maps channels to slices). Quantization works per
``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` layer. :func:`analyze` traces the
model once and describes both, with the shapes the cost model needs.

A layer with weights that is neither compressible nor a normalisation that
follows its channels (a GRU, attention, a transposed conv, a bare
``nn.Parameter``) is refused with :class:`~lightning_relief.errors.UnsupportedLayerError`
naming it, unless it is listed in ``ignored_layers``: then it is left as it is
and no channel it touches is pruned. Nothing is skipped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_relief.errors import UnsupportedLayerError, UnsupportedModelError

PLUGIN = "SensitivityPruningCallback"
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
# layers with weights whose channels torch-pruning follows when a neighbour is pruned
FOLLOWER_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
SUPPORTED = ("Conv1d", "Conv2d", "Linear", "BatchNorm", "LayerNorm", "GroupNorm", "PReLU")


@dataclass
class LayerInfo:
    """A conv/linear layer as the cost model sees it (channels before compression)."""

    name: str
    kind: str  # "conv1d" | "conv2d" | "linear" (a Conv1d's pairs have a unit first axis: kernel (1, k))
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    bias: bool = True
    # the groups whose pruning shrinks this layer's output / input channels
    out_group: int | None = None
    in_group: int | None = None


@dataclass
class PruneGroup:
    """Channels removed together; ``root`` names the conv/linear whose outputs index them."""

    root: str
    channels: int
    out_layers: list[str] = field(default_factory=list)
    in_layers: list[str] = field(default_factory=list)


@dataclass
class ModelUnits:
    layers: list[LayerInfo]
    groups: list[PruneGroup]
    graph: tp.DependencyGraph
    example_inputs: Tensor

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def group(self, root: str) -> PruneGroup:
        for g in self.groups:
            if g.root == root:
                return g
        raise KeyError(root)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _layer_shapes(model: nn.Module, example_inputs: Tensor) -> dict[str, tuple[list[int], list[int]]]:
    """Input and output shapes of every conv/linear, in execution order."""
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):

            def hook(mod, inputs, output, name=name):
                shapes.setdefault(name, (list(inputs[0].shape), list(output.shape)))

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def build_graph(model: nn.Module, example_inputs: Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()  # dropout must not randomise the trace; BN statistics must not move
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was_training)


def _is_ignored(name: str, ignored_layers: Sequence[str]) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignored_layers)


def unsupported_layers(model: nn.Module, ignored_layers: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Modules holding weights of their own that compression can neither compress nor follow.

    Standard ``torch.nn`` layers (GRU, attention, transposed convs) come before user modules with a
    bare ``nn.Parameter``, so the error names the layer a user recognises first.
    """
    found, custom = [], []
    handled: list[str] = []  # a quantized layer's quantizers are inside it and are its own business
    for name, module in model.named_modules():
        if _is_ignored(name, ignored_layers) or _is_ignored(name, handled):
            continue
        if isinstance(module, PRUNABLE_TYPES + FOLLOWER_TYPES):
            handled.append(name)
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if type(module).__module__.startswith("torch.nn"):
            found.append((name, module))
        else:
            custom.append((name, module))
    # an attention's output projection is a Linear inside it: the attention itself is what is refused
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    return found + custom


def check_supported(model: nn.Module, ignored_layers: Sequence[str] = ()) -> None:
    """Raise :class:`UnsupportedLayerError` for the first layer compression cannot handle."""
    bad = unsupported_layers(model, ignored_layers)
    if bad:
        name, module = bad[0]
        raise UnsupportedLayerError(
            PLUGIN,
            name,
            module,
            SUPPORTED,
            "list it (or its parent) in ignored_layers to leave it uncompressed and prune nothing it touches",
        )


def analyze(model: nn.Module, example_inputs: Tensor, ignored_layers: Sequence[str] = ()) -> ModelUnits:
    """Trace ``model`` and list its layers and prunable groups.

    The last conv/linear executed (the classifier) never loses output channels;
    ``ignored_layers`` (module names; a name covers everything inside it) are
    neither pruned nor quantized, and no channel they touch is pruned.
    """
    named = dict(model.named_modules())
    unknown = [n for n in ignored_layers if n not in named]
    if unknown:
        raise ValueError(f"ignored_layers names no module of the model: {unknown}")
    check_supported(model, ignored_layers)
    shapes = _layer_shapes(model, example_inputs)
    if not shapes:
        raise UnsupportedModelError(
            PLUGIN,
            model,
            "no nn.Conv1d, nn.Conv2d or nn.Linear layer is reached by forward(): there is nothing to prune or quantize",
        )
    layers: list[LayerInfo] = []
    for name, (in_shape, out_shape) in shapes.items():
        module = named[name]
        if isinstance(module, nn.Conv2d):
            layers.append(
                LayerInfo(
                    name,
                    "conv2d",
                    module.in_channels,
                    module.out_channels,
                    _pair(module.kernel_size),
                    _pair(module.stride),
                    _pair(module.padding),
                    module.groups,
                    (in_shape[-2], in_shape[-1]),
                    (out_shape[-2], out_shape[-1]),
                    module.bias is not None,
                )
            )
        elif isinstance(module, nn.Conv1d):
            if not isinstance(module.padding, tuple):
                raise UnsupportedLayerError(
                    PLUGIN, name, module, SUPPORTED, f"padding={module.padding!r} is not supported; give it in numbers"
                )
            layers.append(
                LayerInfo(
                    name,
                    "conv1d",
                    module.in_channels,
                    module.out_channels,
                    (1, module.kernel_size[0]),
                    (1, module.stride[0]),
                    (0, module.padding[0]),
                    module.groups,
                    (1, in_shape[-1]),
                    (1, out_shape[-1]),
                    module.bias is not None,
                )
            )
        else:
            rows = 1
            for d in out_shape[1:-1]:
                rows *= d
            layers.append(
                LayerInfo(
                    name,
                    "linear",
                    module.in_features,
                    module.out_features,
                    in_hw=(rows, 1),
                    out_hw=(rows, 1),
                    bias=module.bias is not None,
                )
            )
    by_name = {info.name: info for info in layers}
    classifier = layers[-1].name
    graph = build_graph(model, example_inputs)
    ignored_modules = [m for n, m in named.items() if _is_ignored(n, (*ignored_layers, classifier))]
    frozen = set(ignored_modules) - {named[classifier]} | {m for _, m in unsupported_layers(model)}
    module_names = {m: n for n, m in model.named_modules()}
    groups: list[PruneGroup] = []
    for group in _all_groups(graph, ignored_modules):
        if _touches_frozen(graph, group, frozen):
            continue
        root_module = group[0].dep.target.module
        root = module_names[root_module]
        pg = PruneGroup(root=root, channels=len(group[0].idxs))
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, PRUNABLE_TYPES) or module not in module_names:
                continue
            name = module_names[module]
            if name not in by_name:
                continue
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                pg.out_layers.append(name)
            elif graph.is_in_channel_pruning_fn(item.dep.handler):
                pg.in_layers.append(name)
        if pg.channels < 2:
            continue
        index = len(groups)
        for name in pg.out_layers:
            by_name[name].out_group = index
        for name in pg.in_layers:
            by_name[name].in_group = index
        groups.append(pg)
    return ModelUnits(layers=layers, groups=groups, graph=graph, example_inputs=example_inputs)


def _all_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]):
    """torch-pruning's ``get_all_groups``, except that a root whose group torch-pruning cannot build
    (its channels run into a layer it does not model, such as a GRU) is skipped, not fatal."""
    visited: set[nn.Module] = set()
    ignored_set = set(ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
    for module in list(graph.module2node):
        if module in ignored_set or module in visited or not isinstance(module, PRUNABLE_TYPES):
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except (IndexError, KeyError, ValueError, RuntimeError):
            continue
        outs = [item.dep.target.module for item in group if graph.is_out_channel_pruning_fn(item.dep.handler)]
        visited.update(outs)
        if not any(m in ignored_set for m in outs):
            yield group


def _touches_frozen(graph: tp.DependencyGraph, group, frozen: set) -> bool:
    """The group would change a layer that must stay as it is (a conv/linear may still lose inputs)."""
    for item in group:
        module = item.dep.target.module
        if module in frozen and not (isinstance(module, PRUNABLE_TYPES) and graph.is_in_channel_pruning_fn(item.dep.handler)):
            return True
    return False


def pruning_group(units: ModelUnits, model: nn.Module, root: str, idxs: Sequence[int]):
    """torch-pruning's group that removes ``idxs`` of ``root``'s output channels."""
    module = dict(model.named_modules())[root]
    pruner = units.graph.get_pruner_of_module(module)
    return units.graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
