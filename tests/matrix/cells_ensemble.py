"""``DeepEnsembleStrategy``: members stacked, trained in one vectorized step, the mixture against each member run alone."""

from __future__ import annotations

import torch
from torch import nn

from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.uncertainty.stacking import ensemble_model, num_members, reinitialize
from matrix import WORKS, Raises
from matrix.common import batch, fit_briefly, save_and_reload

PLUGIN = "deep ensemble (`DeepEnsembleStrategy`, vectorized)"

EXPECTED = {
    "resnet18": WORKS,
    "mobilenet_v3_small": WORKS,
    "conv1d_cnn": WORKS,
    "transformer": WORKS,
    # torch.func: "Batching rule not implemented for aten::gru.input"; mode="sequential" works (checked first)
    "gru": Raises(UnsupportedLayerError, "model.gru", "GRU"),
    "upsample": WORKS,
    "functional": WORKS,
}
SLOW = {"resnet18", "mobilenet_v3_small"}
_MEMBERS = 2


def _verify(zoo_model, tmp_path, mode: str) -> None:
    uncovered = {f"model.{n}" for n in reinitialize(zoo_model.make(), 0)}  # parameters no reset draws
    module = ClassifierModule(zoo_model.make(), lr=1e-3, scheduler="none")
    trainer = fit_briefly(module, zoo_model, strategy=DeepEnsembleStrategy(num_members=_MEMBERS, mode=mode))
    assert num_members(module) == _MEMBERS
    # every randomly drawn weight matrix differs between members (MultiheadAttention's in_proj included)
    same = [n for n, p in module.named_parameters() if p.ndim >= 3 and n not in uncovered and torch.equal(p[0], p[1])]
    assert not same, f"members share {same}"
    x, _ = batch(zoo_model)
    module.eval()
    members = ensemble_model(module, "model").eval()
    with torch.no_grad():
        mixture = module(x).exp()
        # reference: each member as a plain nn.Module of the zoo's class, run alone
        reference = torch.stack([m(x).softmax(-1) for m in members.members]).mean(0)
    torch.testing.assert_close(mixture, reference, rtol=1e-4, atol=1e-5)
    reloaded = save_and_reload(trainer, ClassifierModule, tmp_path / f"ensemble_{mode}.ckpt", model=zoo_model.make())
    assert num_members(reloaded) == _MEMBERS
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).exp(), mixture, rtol=1e-5, atol=1e-6)


def check(zoo_model, tmp_path) -> None:
    if any(isinstance(m, nn.RNNBase) for m in zoo_model.make().modules()):
        _verify(zoo_model, tmp_path, "sequential")
    _verify(zoo_model, tmp_path, "vectorized")
