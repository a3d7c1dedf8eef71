"""Integer lowering of brevitas models: parity with brevitas' fake quantization, integer code in TVM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("brevitas")
import brevitas.nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int32Bias

from lightning_relief.deploy import (
    FakeQuantize,
    IntegerConv1d,
    IntegerConv2d,
    IntegerLinear,
    compile_for_target,
    lower_quantized,
)
from lightning_relief.deploy.frontend import to_relax
from lightning_relief.deploy.layer_table import LayerSpec


def brevitas_cnn() -> nn.Module:
    """W4/W2/W8 weights, signed 8-bit input, unsigned 8- and 4-bit ReLU outputs, Int32 bias."""
    return nn.Sequential(
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        qnn.QuantConv2d(1, 8, 3, padding=1, weight_bit_width=4, bias=True, bias_quant=Int32Bias),
        qnn.QuantReLU(bit_width=8, return_quant_tensor=True),
        nn.MaxPool2d(2),
        qnn.QuantConv2d(8, 8, 3, padding=1, weight_bit_width=2, bias=False),
        qnn.QuantReLU(bit_width=4, return_quant_tensor=True),
        nn.Flatten(),
        qnn.QuantLinear(8 * 4 * 4, 10, bias=True, weight_quant=Int8WeightPerChannelFloat),
    )


@pytest.fixture(scope="module")
def trained():
    """A brevitas CNN after a few steps of quantization-aware training on the digits."""
    from lightning_relief.data import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, size=8, seed=0)
    dm.setup()
    model = brevitas_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(dm.train_dataloader()):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 10:
            break
    x_test = next(iter(dm.test_dataloader()))[0]
    return model.eval(), x_test


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.value if hasattr(out, "value") else out


def test_lowered_layers_store_integers(trained):
    model, x = trained
    lowered = lower_quantized(model, x[:1])
    assert isinstance(lowered[0], FakeQuantize) and isinstance(lowered[2], FakeQuantize) and lowered[2].relu
    conv, conv2, linear = lowered[1], lowered[4], lowered[7]
    assert isinstance(conv, IntegerConv2d) and isinstance(linear, IntegerLinear)
    for layer, bits in ((conv, 4), (conv2, 2), (linear, 8)):
        assert layer.weight_int.dtype == torch.int8 and layer.weight_bits == bits
        assert layer.weight_int.abs().max() <= 2 ** (bits - 1) - 1
        # the integers times the scale are brevitas' fake-quantized weights, exactly
        brevitas_layer = model[{4: 1, 2: 4, 8: 7}[bits]]
        torch.testing.assert_close(layer.float_weight(), brevitas_layer.quant_weight().value.detach(), atol=0, rtol=0)
    assert conv.input_signed and not conv2.input_signed and linear.input_bits == 4
    assert isinstance(model[1], qnn.QuantConv2d)  # the source model is not changed


def test_lowered_model_matches_brevitas_in_pytorch_and_tvm(trained):
    model, x = trained
    lowered = lower_quantized(model, x[:1])
    ref = reference(model, x)
    with torch.no_grad():
        eager = lowered(x)
    # integer arithmetic vs brevitas' float fake quantization: equal up to float32 rounding
    # (the rescale s_in * s_w is applied once to the int32 sum instead of to each operand)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(eager.argmax(1), ref.argmax(1))
    compiled = compile_for_target(lowered, x[:1])
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99


def test_tvm_graph_computes_in_int8_with_int32_accumulation(trained):
    model, x = trained
    script = to_relax(lower_quantized(model, x[:1]), x[:2]).mod.script(show_meta=False)
    convs = [line for line in script.splitlines() if "R.nn.conv2d(" in line]
    matmuls = [line for line in script.splitlines() if "R.matmul(" in line]
    assert len(convs) == 2 and len(matmuls) == 1
    assert all('out_dtype="int32"' in line and 'dtype="int32") =' in line for line in convs + matmuls)
    assert "R.Tensor((s" in script  # dynamic batch kept
    assert script.count('dtype="int8") = R.astype') == 1 and script.count('dtype="uint8") = R.astype') == 2


def test_compress_quantizer_output_lowers(digits):
    """Models made by lightning_relief.compress (per-channel weights, own 8-bit input quantizer)."""
    quantize = pytest.importorskip("lightning_relief.compress.quantize")
    from lightning_relief.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5(input_size=8)
    x = next(iter(digits.val_dataloader()))[0]
    quantize.quantize_layers(model, {"features.0.0": 4, "features.1.0": 8, "classifier.1": 2})
    quantize.calibrate_activations(model, [x])
    model.eval()
    lowered = lower_quantized(model)  # input shape derived from LeNet5's init_args
    assert isinstance(lowered.features[0][0], IntegerConv2d) and lowered.classifier[1].weight_bits == 2
    ref = reference(model, x)
    compiled = compile_for_target(lowered, x[:1])
    out = compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_unsupported_brevitas_layers_are_named():
    model = nn.Sequential(
        qnn.QuantIdentity(return_quant_tensor=True),
        qnn.QuantLinear(4, 4, bias=False),
        qnn.QuantSigmoid(return_quant_tensor=False),
    )
    with pytest.raises(ValueError, match=r"module '2' \(QuantSigmoid\) has no integer lowering"):
        lower_quantized(model.eval(), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="cannot tell the input shape"):
        lower_quantized(nn.Sequential(qnn.QuantLinear(4, 4, bias=False)).eval())


def test_graph_hash_ignores_quantizer_scales_but_not_structure(trained):
    """Latency is cached by graph hash: retrained scales must hit the cache, a new shape must not."""
    model, x = trained
    retrained = copy.deepcopy(model).train()
    with torch.no_grad():
        retrained(x * 3)  # a training step's statistics move the activation scales, written inline
    retrained.eval()
    first, second = to_relax(lower_quantized(model, x[:1]), x[:1]), to_relax(lower_quantized(retrained, x[:1]), x[:1])
    assert first.mod.script(show_meta=False) != second.mod.script(show_meta=False)
    assert first.graph_hash == second.graph_hash
    wider = brevitas_cnn()
    wider[7] = qnn.QuantLinear(8 * 4 * 4, 12, bias=True, weight_quant=Int8WeightPerChannelFloat)
    assert to_relax(lower_quantized(wider.eval(), x[:1]), x[:1]).graph_hash != first.graph_hash


def test_quantized_conv1d_lowers_to_an_int8_conv_matching_brevitas():
    """QuantConv1d (strided, grouped, W4/W8, Int32 bias) runs as an int8 conv1d in TVM."""
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        qnn.QuantConv1d(2, 8, 5, stride=2, padding=2, weight_bit_width=4, bias=True, bias_quant=Int32Bias),
        qnn.QuantReLU(bit_width=8, return_quant_tensor=True),
        qnn.QuantConv1d(8, 8, 3, padding=1, groups=2, weight_bit_width=8, bias=False),
        nn.Flatten(),
        qnn.QuantLinear(8 * 20, 10, bias=True, weight_quant=Int8WeightPerChannelFloat),
    )
    x = torch.randn(32, 2, 40)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # a few QAT steps, so scales and weights are not at their initial values
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    lowered = lower_quantized(model, x[:1])
    first, second = lowered[1], lowered[3]
    assert isinstance(first, IntegerConv1d) and isinstance(second, IntegerConv1d)
    assert first.weight_bits == 4 and second.groups == 2 and second.kernel_size == (3,)
    torch.testing.assert_close(first.float_weight(), model[1].quant_weight().value.detach(), atol=0, rtol=0)
    ref = reference(model, x)
    with torch.no_grad():
        eager = lowered(x)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)
    out = compile_for_target(lowered, x[:1])(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    script = to_relax(lowered, x[:2]).mod.script(show_meta=False)
    convs = [line for line in script.splitlines() if "R.nn.conv1d(" in line]
    assert len(convs) == 2 and all('out_dtype="int32"' in line and 'dtype="int32") =' in line for line in convs)
    assert script.count('dtype="int8") = R.astype') == 1 and script.count('dtype="uint8") = R.astype') == 1
    # the latency table times a Conv1d (float or integer) as a conv1d of the same shape
    spec = LayerSpec.make("conv1d", 2, 8, 5, 2, 2, 1, 40, bits=4)
    assert LayerSpec.of(nn.Conv1d(2, 8, 5, stride=2, padding=2), 40, bits=4) == spec
    assert LayerSpec.of(first, 40, bits=4) == spec and spec.build()(torch.zeros(spec.input_shape(2))).shape == (2, 8, 20)


def test_compressed_mnist1d_cnn_lowers_with_its_derived_input():
    """MNIST1DCNN quantized by lightning_relief.compress: input shape from init_args, TVM equals brevitas."""
    from lightning_relief.compress.quantize import calibrate_activations, quantize_layers
    from lightning_relief.models import MNIST1DCNN

    torch.manual_seed(0)
    model = MNIST1DCNN()
    x = torch.randn(64, 1, 40)
    quantize_layers(model, {"features.0": 8, "features.3": 4, "features.6": 2, "classifier": 8})
    calibrate_activations(model, [x])
    model.eval()
    lowered = lower_quantized(model)
    assert [type(lowered.features[i]).__name__ for i in (0, 3, 6)] == ["IntegerConv1d"] * 3
    ref = reference(model, x)
    out = compile_for_target(lowered, x[:1])(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))
