"""``AnalogNoise`` on layer outputs: noise of the configured σ reaches the output of every conv/linear layer, and trains."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_relief import AnalogNoise, ClassifierModule
from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.noise import AdditiveGaussian, NoiseInjector
from matrix import WORKS, Raises
from matrix.common import batch, fit_briefly, parameters_changed, snapshot

PLUGIN = "analog noise on outputs (`AnalogNoise`)"
# every analog matrix-vector product: chosen here by isinstance, independently of Placement's own matching
MVM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SIGMA = 0.3

EXPECTED = {
    "resnet18": WORKS,
    "mobilenet_v3_small": WORKS,
    "conv1d_cnn": WORKS,
    "transformer": Raises(UnsupportedLayerError, "model.encoder.self_attn", "MultiheadAttention"),
    "gru": Raises(UnsupportedLayerError, "model.gru", "GRU"),
    "upsample": WORKS,
    "functional": WORKS,
}
SLOW = {"resnet18"}


def mvm_layers(module: nn.Module) -> list[str]:
    return sorted(name for name, m in module.named_modules() if isinstance(m, MVM_LAYERS))


def std_close(sample: Tensor, expected: float) -> bool:
    """The sample std is within 5 standard errors of ``expected`` (SE of a normal std: σ/sqrt(2n))."""
    return abs(float(sample.std()) - expected) <= 5 * expected / math.sqrt(2 * sample.numel()) + 1e-6


def check(zoo_model, tmp_path) -> None:
    module = ClassifierModule(zoo_model.make(), lr=1e-3, scheduler="none")
    injector = NoiseInjector(AdditiveGaussian(), SIGMA, "outputs").attach(module, plugin="AnalogNoise")
    expected = mvm_layers(module)
    assert sorted(injector.selected["outputs"]) == expected

    calls: dict[str, list[tuple[tuple, Tensor]]] = {name: [] for name in expected}
    # clone: an in-place activation after the layer (Hardswish(inplace=True)) would rewrite its output
    probes = [
        module.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: calls[name].append((args, out.clone())))
        for name in expected
    ]
    x, _ = batch(zoo_model, 16)
    module.eval()
    try:
        with torch.no_grad(), injector.step(batch_size=16):
            module(x)
    finally:
        for probe in probes:
            probe.remove()
        injector.detach()
    for name in expected:
        layer = module.get_submodule(name)
        assert calls[name], f"{name} never ran"
        with torch.no_grad():  # the layer's clean output from its own inputs, hooks bypassed
            noise = torch.cat([(out - layer.forward(*args)).flatten() for args, out in calls[name]])
        assert std_close(noise, SIGMA), (name, float(noise.std()))

    module.train()
    before = snapshot(module)
    fit_briefly(module, zoo_model, callbacks=[AnalogNoise(AdditiveGaussian(), SIGMA)])
    assert parameters_changed(before, module), "no parameter trained"
    assert not any(m._forward_hooks for m in module.modules()), "noise hooks outlived fit"
