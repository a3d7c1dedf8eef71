"""``lightning_relief.bayes.make_bayesian``: bayesian-torch layers replace every Linear/Conv/ConvTranspose and train."""

from __future__ import annotations

import torch
from torch import nn

from lightning_relief import ClassifierModule
from lightning_relief.bayes import bayesian_layers, make_bayesian
from lightning_relief.errors import UnsupportedLayerError
from matrix import WORKS, Raises
from matrix.common import batch, fit_briefly, parameters_changed, save_and_reload, snapshot

PLUGIN = "bayes (`make_bayesian`)"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

EXPECTED = {
    "resnet18": WORKS,
    "mobilenet_v3_small": WORKS,
    "conv1d_cnn": WORKS,
    "transformer": Raises(UnsupportedLayerError, "encoder.self_attn", "MultiheadAttention"),
    "gru": Raises(UnsupportedLayerError, "gru", "GRU"),
    "upsample": WORKS,
    "functional": WORKS,
}
SLOW = {"resnet18"}


def check(zoo_model, tmp_path) -> None:
    model = zoo_model.make()
    expected_layers = sum(type(m) in _LAYERS for m in model.modules())
    module = make_bayesian(ClassifierModule(model, lr=1e-3, scheduler="none"))
    assert len(bayesian_layers(module.model)) == expected_layers
    assert not any(type(m) in _LAYERS for m in module.model.modules()), "a deterministic layer was left behind"
    x, _ = batch(zoo_model)
    module.eval()
    with torch.no_grad():
        assert not torch.equal(module(x), module(x)), "two forwards drew the same weights"
    before = snapshot(module)
    trainer = fit_briefly(module, zoo_model)
    changed = parameters_changed(before, module)
    assert any(name.endswith(("mu_weight", "mu_kernel")) for name in changed)
    assert any(name.endswith(("rho_weight", "rho_kernel")) for name in changed)
    reloaded = save_and_reload(trainer, ClassifierModule, tmp_path / "bnn.ckpt", model=zoo_model.make())
    for name, value in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)
