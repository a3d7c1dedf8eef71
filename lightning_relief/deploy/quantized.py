"""Lowering brevitas-quantized models to real integer arithmetic in plain tensor ops.

brevitas trains with fake quantization: weights and activations are rounded to
a b-bit grid but kept as floats, so exported graphs stay float and gain no
speed. :func:`lower_quantized` returns a copy in which

* ``QuantConv1d``/``QuantConv2d``/``QuantLinear`` become :class:`IntegerConv1d`/:class:`IntegerConv2d`/:class:`IntegerLinear`:
  the weights are stored as int8 tensors (any width up to 8 bits), the input is
  quantized to its b-bit grid (int8, or uint8 after a ReLU), the product is
  accumulated in int32, and the result is requantized with one float multiplier
  per output channel (``s_in * s_w``) plus the (already quantized) bias;
* ``QuantIdentity``/``QuantReLU`` become :class:`FakeQuantize` with the scale
  brevitas had in eval mode.

Written this way, ``torch.export`` → Relax → TVM sees ``conv2d(int8, int8) →
int32`` (see :mod:`lightning_relief.deploy.int_rewrite`) and generates integer
code; the weights take a quarter of the float32 storage.

Activation scales are read from one calibration forward pass (they are fixed
in eval mode), so the lowering needs an example input; for this package's
reference models (``LeNet5``, ``MLP``, ``ResNet``) it is derived from the
model's ``init_args``. Asymmetric quantizers (non-zero zero point), output
quantizers on conv/linear and other brevitas layers raise an error that names
the module.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FakeQuantize", "IntegerConv1d", "IntegerConv2d", "IntegerLinear", "integer_layer_from_float", "lower_quantized"]


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """The integer grid ``[qmin, qmax]`` of a b-bit quantizer."""
    if signed:
        return (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1)
    return (0, 2**bits - 1 - int(narrow))


def _storage_dtype(bits: int, signed: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int32


class FakeQuantize(nn.Module):
    """``clamp(round(relu?(x) / s), qmin, qmax) * s``: brevitas' eval-mode activation quantizer."""

    def __init__(self, scale: float, bits: int, signed: bool, narrow: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.bits, self.signed, self.narrow, self.relu = int(bits), bool(signed), bool(narrow), bool(relu)
        self.qmin, self.qmax = int_range(self.bits, self.signed, self.narrow)

    def forward(self, x: Tensor) -> Tensor:
        if self.relu:
            x = torch.relu(x)
        return torch.clamp(torch.round(x / self.scale), self.qmin, self.qmax) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.4g}, bits={self.bits}, signed={self.signed}, relu={self.relu}"


class _IntegerLayer(nn.Module):
    """Shared parts: int weights, input quantizer, requantization multiplier, bias."""

    def __init__(
        self,
        weight_int: Tensor,
        weight_scale: Tensor,
        weight_bits: int,
        bias: Tensor | None,
        input_scale: float | None,
        input_bits: int = 8,
        input_signed: bool = True,
        input_narrow: bool = False,
    ) -> None:
        super().__init__()
        if weight_bits > 8:
            raise ValueError(f"weight_bits must be <= 8 for int8 storage, got {weight_bits}")
        lo, hi = int_range(weight_bits, True)
        if int(weight_int.min()) < lo or int(weight_int.max()) > hi:
            raise ValueError(f"weights outside the {weight_bits}-bit range [{lo}, {hi}]")
        self.register_buffer("weight_int", weight_int.to(torch.int8).contiguous())
        out = weight_int.shape[0]
        channel_shape = (1, out) + (1,) * (weight_int.dim() - 2)
        weight_scale = weight_scale.detach().float().reshape(-1)
        if weight_scale.numel() not in (1, out):
            raise ValueError(f"weight scale must be per tensor or per output channel, got {weight_scale.numel()} values")
        self.register_buffer("weight_scale", weight_scale.expand(out).reshape(channel_shape).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(channel_shape).clone())
        self.weight_bits = int(weight_bits)
        self.integer_input = input_scale is not None
        self.input_bits, self.input_signed, self.input_narrow = int(input_bits), bool(input_signed), bool(input_narrow)
        self.qmin, self.qmax = int_range(self.input_bits, self.input_signed, self.input_narrow)
        self.register_buffer("input_scale", torch.tensor(float(input_scale if input_scale is not None else 1.0)))
        # requantization: one float multiplier per output channel
        self.register_buffer("multiplier", (self.input_scale * self.weight_scale).clone())

    @property
    def out_dim(self) -> int:
        return self.weight_int.shape[0]

    def quantize_input(self, x: Tensor) -> Tensor:
        q = torch.clamp(torch.round(x / self.input_scale), self.qmin, self.qmax)
        return q.to(_storage_dtype(self.input_bits, self.input_signed))

    def float_weight(self) -> Tensor:
        """The dequantized weight ``w_int * s_w`` (what brevitas' fake quantization computes with)."""
        return self.weight_int.to(torch.float32) * self.weight_scale.reshape((-1,) + (1,) * (self.weight_int.dim() - 1))

    def _product(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.integer_input:
            # int32 accumulation of integer operands; TVM receives them as int8 (see int_rewrite)
            acc = self._product(self.quantize_input(x).to(torch.int32), self.weight_int.to(torch.int32))
            y = acc.to(torch.float32) * self.multiplier  # requantization
        else:  # weight-only quantization: float input, dequantized weights
            y = self._product(x, self.float_weight())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        act = f"A{self.input_bits}{'s' if self.input_signed else 'u'}" if self.integer_input else "float input"
        return f"W{self.weight_bits} {act}, per-channel scale={self.weight_scale.numel() > 1}"


class IntegerConv2d(_IntegerLayer):
    """A conv2d on an integer grid: int8 weights, int32 accumulation, float requantization."""

    def __init__(
        self,
        weight_int: Tensor,
        weight_scale: Tensor,
        weight_bits: int,
        bias: Tensor | None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        **input_quant: Any,
    ) -> None:
        super().__init__(weight_int, weight_scale, weight_bits, bias, **input_quant)
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), groups
        self.in_channels = weight_int.shape[1] * groups
        self.out_channels = weight_int.shape[0]
        self.kernel_size = tuple(weight_int.shape[2:])

    def _product(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class IntegerConv1d(_IntegerLayer):
    """A conv1d on an integer grid: int8 weights, int32 accumulation, float requantization."""

    def __init__(
        self,
        weight_int: Tensor,
        weight_scale: Tensor,
        weight_bits: int,
        bias: Tensor | None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        **input_quant: Any,
    ) -> None:
        if weight_int.dim() != 3:
            raise ValueError(f"IntegerConv1d expects (out, in/groups, k) weights, got shape {tuple(weight_int.shape)}")
        super().__init__(weight_int, weight_scale, weight_bits, bias, **input_quant)
        self.stride, self.padding, self.dilation = (_single(stride),), (_single(padding),), (_single(dilation),)
        self.groups = groups
        self.in_channels = weight_int.shape[1] * groups
        self.out_channels = weight_int.shape[0]
        self.kernel_size = (weight_int.shape[2],)

    def _product(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv1d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class IntegerLinear(_IntegerLayer):
    """A linear layer on an integer grid: int8 weights, int32 accumulation, float requantization."""

    def __init__(
        self, weight_int: Tensor, weight_scale: Tensor, weight_bits: int, bias: Tensor | None, **input_quant: Any
    ) -> None:
        super().__init__(weight_int, weight_scale, weight_bits, bias, **input_quant)
        self.in_features, self.out_features = weight_int.shape[1], weight_int.shape[0]

    def _product(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)


def _single(v: Any) -> int:
    return int(v) if isinstance(v, int) else int(tuple(v)[0])


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(i) for i in v)  # type: ignore[return-value]


def integer_layer_from_float(
    layer: nn.Conv1d | nn.Conv2d | nn.Linear,
    weight_bits: int = 8,
    input_bits: int = 8,
    input_signed: bool = False,
    input_scale: float | None = 0.05,
) -> IntegerConv1d | IntegerConv2d | IntegerLinear:
    """Quantize a float layer's weights symmetrically (per tensor) into an integer layer."""
    w = layer.weight.detach().float()
    _, qmax = int_range(weight_bits, True, narrow=True)
    scale = w.abs().max().clamp_min(1e-12) / qmax
    w_int = torch.clamp(torch.round(w / scale), -qmax, qmax)
    quant = dict(input_scale=input_scale, input_bits=input_bits, input_signed=input_signed)
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        cls = IntegerConv1d if isinstance(layer, nn.Conv1d) else IntegerConv2d
        return cls(w_int, scale, weight_bits, bias, layer.stride, layer.padding, layer.dilation, layer.groups, **quant)
    if isinstance(layer, nn.Linear):
        return IntegerLinear(w_int, scale, weight_bits, bias, **quant)
    raise TypeError(f"expected nn.Conv1d, nn.Conv2d or nn.Linear, got {type(layer).__name__}")


# -- brevitas ------------------------------------------------------------------


def _value(x: Any) -> float:
    return float(torch.as_tensor(x).detach().reshape(-1)[0])


def _quant_info(qt: Any, proxy: Any, where: str) -> dict[str, Any]:
    """Scale/bits/sign of a captured brevitas QuantTensor (per-tensor, zero point 0)."""
    scale = torch.as_tensor(qt.scale).detach()
    if scale.numel() != 1:
        raise ValueError(f"{where}: per-channel activation scales are not supported by the integer lowering")
    if torch.as_tensor(qt.zero_point).detach().abs().max() > 0:
        raise ValueError(f"{where}: asymmetric quantization (non-zero zero point) is not supported by the integer lowering")
    narrow = bool(getattr(proxy, "is_narrow_range", False)) if proxy is not None else False
    return {"scale": _value(scale), "bits": int(_value(qt.bit_width)), "signed": bool(qt.signed), "narrow": narrow}


def default_example_input(model: nn.Module) -> Tensor:
    """An input for this package's reference models, from their ``init_args``."""
    args = getattr(model, "init_args", None)
    if isinstance(args, dict):
        if "in_features" in args:
            return torch.zeros(1, args["in_features"])
        if "input_size" in args:
            return torch.zeros(1, args.get("in_channels", 1), args["input_size"], args["input_size"])
        if "in_channels" in args:
            return torch.zeros(1, args["in_channels"], 16, 16)
        if "length" in args:  # a 1-D signal of one channel (MNIST1DCNN)
            return torch.zeros(1, 1, args["length"])
    raise ValueError(f"cannot tell the input shape of {type(model).__name__}: pass example_inputs to lower_quantized")


def _calibrate(model: nn.Module, example_inputs: Any) -> dict[str, dict[str, Any]]:
    import brevitas.nn as qnn

    captured: dict[str, dict[str, Any]] = {}
    handles = []

    def keep(name: str, field: str):
        def hook(_module, _inputs, output):
            captured.setdefault(name, {})[field] = output

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _weight_layers()):
            handles.append(module.input_quant.register_forward_hook(keep(name, "input")))
            handles.append(module.bias_quant.register_forward_hook(keep(name, "bias")))
        elif isinstance(module, (qnn.QuantIdentity, qnn.QuantReLU)):
            handles.append(module.register_forward_hook(keep(name, "output")))
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _lower_layer(name: str, module: nn.Module, seen: dict[str, Any]) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant_tensor import QuantTensor

    kind = type(module).__name__
    if name not in seen or "input" not in seen[name]:
        raise ValueError(f"module '{name}' ({kind}) was not called in the calibration pass")
    if module.output_quant.is_quant_enabled:
        raise ValueError(f"module '{name}' ({kind}): output quantizers on conv/linear layers are not supported")
    weight = module.quant_weight()
    if not isinstance(weight, QuantTensor):
        raise ValueError(f"module '{name}' ({kind}) has no weight quantizer: nothing to lower")
    where = f"module '{name}' ({kind}) weight"
    if torch.as_tensor(weight.zero_point).detach().abs().max() > 0:
        raise ValueError(f"{where}: asymmetric quantization (non-zero zero point) is not supported")
    bits = int(_value(weight.bit_width))
    if bits > 8:
        raise ValueError(f"{where}: {bits}-bit weights do not fit int8 storage")
    w_int = weight.int().detach()
    scale = torch.as_tensor(weight.scale).detach()
    quant_in = seen[name]["input"]
    input_quant: dict[str, Any] = {"input_scale": None}
    if isinstance(quant_in, QuantTensor):
        info = _quant_info(
            quant_in, module.input_quant if module.input_quant.is_quant_enabled else None, f"module '{name}' ({kind}) input"
        )
        input_quant = {
            "input_scale": info["scale"],
            "input_bits": info["bits"],
            "input_signed": info["signed"],
            "input_narrow": info["narrow"],
        }
    bias_value = seen[name].get("bias")
    bias = None
    if module.bias is not None:
        bias = (
            bias_value.value if isinstance(bias_value, QuantTensor) else (bias_value if bias_value is not None else module.bias)
        )
    if isinstance(module, (qnn.QuantConv1d, qnn.QuantConv2d)):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"module '{name}' ({kind}): padding {module.padding_mode!r}/{module.padding!r} is not "
                "supported (zero padding given in numbers is)"
            )
        cls = IntegerConv1d if isinstance(module, qnn.QuantConv1d) else IntegerConv2d
        return cls(w_int, scale, bits, bias, module.stride, module.padding, module.dilation, module.groups, **input_quant)
    return IntegerLinear(w_int, scale, bits, bias, **input_quant)


def lower_quantized(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """A copy of a brevitas-quantized ``model`` computing with integer tensors.

    The given model is not changed. ``example_inputs`` (any real or zero input of the
    right shape) drives one calibration pass that reads the activation scales;
    it is derived for the package's reference models when omitted.

    >>> import torch, brevitas.nn as qnn
    >>> net = torch.nn.Sequential(qnn.QuantIdentity(return_quant_tensor=True), qnn.QuantLinear(4, 2, bias=True))
    >>> lowered = lower_quantized(net.eval(), torch.zeros(1, 4))
    >>> type(lowered[1]).__name__, lowered[1].weight_int.dtype
    ('IntegerLinear', torch.int8)
    """
    import brevitas.nn as qnn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    clone = copy.deepcopy(model).eval()
    unsupported = [
        (n, type(m).__name__)
        for n, m in clone.named_modules()
        if type(m).__module__.startswith("brevitas.nn")
        and not isinstance(m, (*_weight_layers(), qnn.QuantIdentity, qnn.QuantReLU))
        and n
        and not any(n.startswith(p + ".") for p, _ in _brevitas_layers(clone))
    ]
    if unsupported:
        name, kind = unsupported[0]
        raise ValueError(
            f"module '{name}' ({kind}) has no integer lowering (supported: QuantConv1d, QuantConv2d, QuantLinear, QuantIdentity, QuantReLU)"
        )
    seen = _calibrate(clone, example_inputs if example_inputs is not None else default_example_input(clone))
    replacements: dict[str, nn.Module] = {}
    for name, module in _brevitas_layers(clone):
        if isinstance(module, _weight_layers()):
            replacements[name] = _lower_layer(name, module, seen)
        else:
            out = seen.get(name, {}).get("output")
            if out is None or not hasattr(out, "scale"):
                raise ValueError(f"module '{name}' ({type(module).__name__}) did not return a QuantTensor in calibration")
            info = _quant_info(out, module.act_quant, f"module '{name}' ({type(module).__name__})")
            replacements[name] = FakeQuantize(
                info["scale"], info["bits"], info["signed"], info["narrow"], relu=isinstance(module, qnn.QuantReLU)
            )
    if not replacements:
        raise ValueError(
            f"{type(model).__name__} has no brevitas QuantConv1d/QuantConv2d/QuantLinear/QuantIdentity/QuantReLU layers to lower"
        )
    for name, new in replacements.items():
        if name == "":
            return new
        clone.set_submodule(name, new)
    return clone


def _weight_layers() -> tuple[type[nn.Module], ...]:
    import brevitas.nn as qnn  # lazily: brevitas is an optional dependency

    return (qnn.QuantConv1d, qnn.QuantConv2d, qnn.QuantLinear)


def _brevitas_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    import brevitas.nn as qnn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (*_weight_layers(), qnn.QuantIdentity, qnn.QuantReLU))]
