"""``convert_to_photonic``: every Linear/Conv2d becomes a photonic sampler layer that samples and trains."""

from __future__ import annotations

import torch
from torch import nn

from lightning_relief import ClassifierModule, convert_to_photonic
from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.photonic import photonic_layers
from matrix import WORKS, Raises
from matrix.common import batch, fit_briefly, parameters_changed, save_and_reload, snapshot

PLUGIN = "photonic (`convert_to_photonic`)"

EXPECTED = {
    "resnet18": WORKS,
    "mobilenet_v3_small": WORKS,
    "conv1d_cnn": Raises(UnsupportedLayerError, "model.features.0", "Conv1d"),
    "transformer": Raises(UnsupportedLayerError, "model.encoder.self_attn", "MultiheadAttention"),
    "gru": Raises(UnsupportedLayerError, "model.gru", "GRU"),
    "upsample": Raises(UnsupportedLayerError, "model.up", "ConvTranspose2d"),
    "functional": WORKS,
}
SLOW = {"resnet18"}


def check(zoo_model, tmp_path) -> None:
    model = zoo_model.make()
    expected = sorted(f"model.{name}" for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d))
    module = convert_to_photonic(ClassifierModule(model, lr=1e-3, scheduler="none"), bandwidth_ratio=0.01)
    assert sorted(photonic_layers(module)) == expected
    x, _ = batch(zoo_model)
    module.eval()
    with torch.no_grad():
        assert not torch.equal(module(x), module(x)), "two forwards drew the same photonic noise"
    before = snapshot(module)
    trainer = fit_briefly(module, zoo_model)
    assert parameters_changed(before, module), "no parameter trained"
    reloaded = save_and_reload(trainer, ClassifierModule, tmp_path / "photonic.ckpt", model=zoo_model.make())
    assert sorted(photonic_layers(reloaded)) == expected
    for name, value in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)
