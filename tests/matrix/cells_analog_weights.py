"""``AnalogNoise`` on weights: every conv/linear weight is perturbed by the configured σ for the step, restored bit-exactly, and PCM-aware training runs."""

from __future__ import annotations

import torch

from lightning_relief import AnalogNoise, ClassifierModule
from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.noise import DeploymentTime, NoiseInjector, PCMNoise, WeightNoise
from matrix import WORKS, Raises
from matrix.cells_analog import mvm_layers, std_close
from matrix.common import fit_briefly, parameters_changed, snapshot

PLUGIN = "analog noise on weights (`AnalogNoise`, PCM)"
W_NOISE = 0.0175  # aihwkit's HWA-training weight noise, relative to each layer's max |w|

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


def check(zoo_model, tmp_path) -> None:
    module = ClassifierModule(zoo_model.make(), lr=1e-3, scheduler="none")
    injector = NoiseInjector(WeightNoise(out_noise=0.0), 1.0, "weights").attach(module, plugin="AnalogNoise")
    expected = mvm_layers(module)
    assert sorted(injector.selected["weights"]) == expected
    clean = {name: module.get_submodule(name).weight.detach().clone() for name in expected}
    with injector.step():
        for name in expected:
            w = clean[name]
            noise = module.get_submodule(name).weight.detach() - w
            assert std_close(noise, W_NOISE * float(w.abs().max())), (name, float(noise.std()))
    injector.detach()
    for name in expected:
        assert torch.equal(module.get_submodule(name).weight, clean[name]), f"{name} not restored"

    before = snapshot(module)
    fit_briefly(module, zoo_model, callbacks=[AnalogNoise(PCMNoise(), DeploymentTime(), "weights")])
    assert parameters_changed(before, module), "no parameter trained"
    assert all(torch.isfinite(p).all() for p in module.parameters())
