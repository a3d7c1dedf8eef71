"""Apply a policy: remove channels with torch-pruning, then swap in quantized layers.

Pruning really removes channels (parameters shrink), group by group, with the
channel indices recorded so that a checkpoint replays the very same removal on
a freshly built module (:func:`replay_pruning`). Quantization follows pruning,
so brevitas layers are created with their final shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_relief.compress.policy import CompressionPolicy
from lightning_relief.compress.quantize import apply_quantization
from lightning_relief.compress.sensitivity import pruned_count
from lightning_relief.compress.units import ModelUnits, build_graph
from lightning_relief.nn.structure import record_structure

REPLAY = "lightning_relief.compress.apply:replay_pruning"


def _example(module: nn.Module, shape: Sequence[int]) -> Tensor:
    param = next(module.parameters())
    return torch.zeros(*shape, device=param.device, dtype=param.dtype)


def prune_channels(module: nn.Module, example_inputs: Tensor, groups: Mapping[str, Sequence[int]]) -> None:
    """Remove output channels ``groups[root]`` of each root layer (and everything coupled to them)."""
    graph = build_graph(module, example_inputs)
    named = dict(module.named_modules())
    plans = []
    # validate everything before the first channel goes: a bad policy must leave the model intact
    for root, idxs in groups.items():
        if root not in named:
            raise ValueError(f"pruning root {root!r} is not a module of the model")
        layer = named[root]
        pruner = graph.get_pruner_of_module(layer)
        channels = pruner.get_out_channels(layer) if pruner is not None else None
        if channels is None:
            raise ValueError(f"pruning root {root!r} ({type(layer).__name__}) has no prunable output channels")
        idxs = sorted(int(i) for i in idxs)
        if len(set(idxs)) != len(idxs) or (idxs and (idxs[0] < 0 or idxs[-1] >= channels)) or len(idxs) >= channels:
            raise ValueError(f"bad channel indices for {root!r} with {channels} channels: {idxs}")
        plans.append((layer, pruner, idxs))
    was_training = module.training
    module.eval()
    try:
        for layer, pruner, idxs in plans:
            if idxs:
                graph.get_pruning_group(layer, pruner.prune_out_channels, idxs).prune()
    finally:
        module.train(was_training)


def apply_pruning(module: nn.Module, example_inputs: Tensor, groups: Mapping[str, Sequence[int]]) -> None:
    """Prune ``module`` in place and record the step (channel indices per group) for checkpoints."""
    groups = {k: [int(i) for i in v] for k, v in groups.items() if len(v)}
    if not groups:
        return
    prune_channels(module, example_inputs, groups)
    record_structure(module, REPLAY, {"input_shape": [1, *example_inputs.shape[1:]], "groups": groups})


def replay_pruning(module: nn.Module, spec: dict[str, Any]) -> None:
    """Structure replay: remove the recorded channels from a freshly built module (compiled or not)."""
    from lightning_relief.compress.compiled import uncompiled

    with uncompiled(module):
        prune_channels(module, _example(module, spec["input_shape"]), spec["groups"])


def channels_to_prune(units: ModelUnits, order: Mapping[str, Sequence[int]], policy: CompressionPolicy) -> dict[str, list[int]]:
    """The channel indices a policy removes: the least important ``ratio`` of each group."""
    out = {}
    for root, ratio in policy.pruned_groups().items():
        group = units.group(root)
        n = pruned_count(group.channels, ratio)
        if n:
            out[root] = sorted(int(i) for i in order[root][:n])
    return out


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: Iterable[Tensor], forward: Callable[[Tensor], Tensor] | None = None) -> None:
    """Re-estimate batch-norm running statistics after channels changed (cumulative average)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    forward = forward or module
    was_training = module.training
    saved = [(m, m.momentum) for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in inputs:
            forward(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        module.train(was_training)


def apply_policy(
    module: nn.Module,
    units: ModelUnits,
    order: Mapping[str, Sequence[int]],
    policy: CompressionPolicy,
    calibration: Sequence[Tensor] = (),
) -> None:
    """Prune then quantize ``module`` in place, recording both steps; re-estimate BN, calibrate quantizers."""
    apply_channels_and_bits(
        module, units.example_inputs[:1], channels_to_prune(units, order, policy), policy.quantized_layers(), calibration
    )


def apply_channels_and_bits(
    module: nn.Module,
    example: Tensor,
    groups: Mapping[str, Sequence[int]],
    bits: Mapping[str, int],
    calibration: Sequence[Tensor] = (),
) -> None:
    """Remove ``groups`` (root -> output channel indices), re-estimate BN, quantize ``bits`` (layer -> bits)."""
    named = dict(module.named_modules())
    missing = [n for n in (*groups, *bits) if n not in named]
    if missing:
        raise ValueError(f"the policy names layers the model does not have: {missing}")
    apply_pruning(module, example, groups)
    if groups and calibration:
        recalibrate_batchnorm(module, calibration)
    apply_quantization(module, bits, calibration if calibration else None)
