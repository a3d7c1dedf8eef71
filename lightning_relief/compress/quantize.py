"""Quantization-aware layers: swap ``nn.Conv2d``/``nn.Linear`` for brevitas ones.

Each chosen layer becomes a ``QuantConv1d``/``QuantConv2d``/``QuantLinear`` with per-channel
symmetric integer weights at its bit width and an 8-bit per-tensor input
quantizer, so every layer has the integer scales that the deploy package's
integer lowering (``lightning_relief.deploy.lower_quantized``) needs. The swap
is recorded with :func:`~lightning_relief.nn.structure.record_structure` and
replayed by :func:`replay_quantization` when a checkpoint loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_relief.nn.structure import record_structure

REPLAY = "lightning_relief.compress.quantize:replay_quantization"
ACT_BITS = 8


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def quant_layer(layer: nn.Module, bits: int, act_bits: int = ACT_BITS) -> nn.Module:
    """A brevitas copy of ``layer`` (same weights) with ``bits``-bit weights and ``act_bits`` inputs."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    if not 2 <= bits <= 16:
        raise ValueError(f"weight bit width must be in [2, 16], got {bits}")
    common = dict(
        weight_quant=Int8WeightPerChannelFloat,
        weight_bit_width=int(bits),
        input_quant=Int8ActPerTensorFloat,
        input_bit_width=int(act_bits),
        return_quant_tensor=False,
    )
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        cls = QuantConv1d if isinstance(layer, nn.Conv1d) else QuantConv2d
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **common,
        )
    elif isinstance(layer, nn.Linear):
        new = QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, **common)
    else:
        raise TypeError(f"only nn.Conv1d, nn.Conv2d and nn.Linear can be quantized, got {type(layer).__name__}")
    new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    new.train(layer.training)
    return new


def quantize_layers(model: nn.Module, bits: Mapping[str, int], act_bits: int = ACT_BITS) -> list[str]:
    """Swap the named layers in place; returns the names swapped."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear

    swapped = []
    for name, b in bits.items():
        layer = model.get_submodule(name)
        if isinstance(layer, (QuantConv1d, QuantConv2d, QuantLinear)):
            raise ValueError(f"layer {name!r} is already quantized")
        parent, child = _parent(model, name)
        setattr(parent, child, quant_layer(layer, int(b), act_bits))
        swapped.append(name)
    return swapped


@torch.no_grad()
def calibrate_activations(model: nn.Module, inputs: Iterable[Tensor]) -> None:
    """Initialise the input quantizers' scales from calibration inputs (brevitas calibration mode)."""
    from brevitas.graph.calibrate import calibration_mode

    was_training = model.training
    model.eval()
    with calibration_mode(model):
        for x in inputs:
            model(x)
    model.train(was_training)


def apply_quantization(
    module: nn.Module, bits: Mapping[str, int], calibration: Iterable[Tensor] | None = None, act_bits: int = ACT_BITS
) -> None:
    """Quantize ``module``'s named layers, calibrate, and record the step for checkpoints."""
    if not bits:
        return
    spec = {"layers": {k: int(v) for k, v in bits.items()}, "act_bits": int(act_bits)}
    quantize_layers(module, spec["layers"], act_bits)
    if calibration is not None:
        calibrate_activations(module, calibration)
    record_structure(module, REPLAY, spec)


def replay_quantization(module: nn.Module, spec: dict[str, Any]) -> None:
    """Structure replay: the same swap on a freshly built module (weights come from the checkpoint)."""
    from lightning_relief.compress.compiled import uncompiled

    with uncompiled(module):
        quantize_layers(module, spec["layers"], spec.get("act_bits", ACT_BITS))


def quantized_bits(model: nn.Module) -> dict[str, int]:
    """The weight bit width of every brevitas layer in ``model``."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear

    return {
        name: int(m.weight_quant.bit_width().item())
        for name, m in model.named_modules()
        if isinstance(m, (QuantConv1d, QuantConv2d, QuantLinear))
    }


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned parameters of brevitas' quantizers (scales, zero points) in ``model``."""
    try:
        from brevitas.proxy.quant_proxy import QuantProxyFromInjector
    except ImportError:  # without brevitas nothing is quantized
        return []

    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, QuantProxyFromInjector):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


# per-group lists that LR schedulers keep in step with ``optimizer.param_groups``
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs")


def exempt_quantizers_from_weight_decay(
    optimizer: torch.optim.Optimizer, model: nn.Module, schedulers: Iterable[Any] = ()
) -> int:
    """Move quantizer parameters out of decayed param groups into copies with ``weight_decay=0``.

    Weight decay pulls a learned scale towards zero, and under Adam it moves it by about the learning
    rate every step whatever the scale's size (its own gradient is small), so a long fine-tune clips
    the activations more and more. Schedulers of ``optimizer`` get an entry for each new group, copied
    from the group it was split off. Returns the number of parameters moved.
    """
    quant = {id(p) for p in quantizer_parameters(model)}
    if not quant:
        return 0
    moved = 0
    schedulers = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
    for index, group in enumerate(list(optimizer.param_groups)):
        if not group.get("weight_decay"):
            continue
        scales = [p for p in group["params"] if id(p) in quant]
        if not scales:
            continue
        count = len(optimizer.param_groups)
        group["params"] = [p for p in group["params"] if id(p) not in quant]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": scales, "weight_decay": 0.0})
        for scheduler in schedulers:
            for attr in _PER_GROUP:
                values = getattr(scheduler, attr, None)
                if isinstance(values, list) and len(values) == count:
                    values.append(values[index])
        moved += len(scales)
    return moved
