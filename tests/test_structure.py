"""Checkpoints replay recorded structural changes before loading weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_relief.errors import UntrustedClassPathError
from lightning_relief.models import MLP, ClassifierModule
from lightning_relief.nn.structure import STRUCTURE_KEY, record_structure, structure_of


def shrink_last_layer(module: nn.Module, spec: dict) -> None:
    """A structural change, as a plugin would make it: the output layer narrows."""
    old = module.model.net[-1]
    module.model.net[-1] = nn.Linear(old.in_features, spec["out_features"])


@pytest.fixture
def trust_this_module(monkeypatch):
    """The steps above are the user's own code: opt in, as a user would."""
    monkeypatch.setenv("RELIEF_TRUSTED_MODULES", __name__)


def test_recorded_change_is_replayed_by_load_from_checkpoint(tmp_path, digits, trainer_factory, trust_this_module):
    module = ClassifierModule(MLP(hidden=(16,)), num_classes=10)
    shrink_last_layer(module, {"out_features": 10})
    record_structure(module, f"{__name__}:shrink_last_layer", {"out_features": 10})
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, digits)
    path = tmp_path / "s.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[STRUCTURE_KEY] == structure_of(module)
    reloaded = ClassifierModule.load_from_checkpoint(path)
    assert len(structure_of(reloaded)) == 1
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(reloaded.eval()(x), module.eval()(x))


def test_shape_changing_step_is_needed_to_load(tmp_path, trust_this_module):
    module = ClassifierModule(MLP(hidden=(16,)), num_classes=10)
    shrink_last_layer(module, {"out_features": 4})
    record_structure(module, f"{__name__}:shrink_last_layer", {"out_features": 4})
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = ClassifierModule(MLP(hidden=(16,)), num_classes=10)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.model.net[-1].out_features == 4


def test_bad_rebuild_path_is_a_clear_error():
    module = ClassifierModule(MLP())
    with pytest.raises(ValueError, match="package.module:function"):
        record_structure(module, "no_colon_here", {})
    with pytest.raises(
        UntrustedClassPathError, match=r"relief_structure\[0\].rebuild: 'nowhere.at_all:fn' is refused: not a known step"
    ):
        module.on_load_checkpoint({STRUCTURE_KEY: [{"rebuild": "nowhere.at_all:fn", "spec": {}}]})


def test_user_step_is_refused_until_its_package_is_trusted(monkeypatch):
    checkpoint = {STRUCTURE_KEY: [{"rebuild": f"{__name__}:shrink_last_layer", "spec": {"out_features": 4}}]}
    module = ClassifierModule(MLP(hidden=(16,)), num_classes=10)
    with pytest.raises(UntrustedClassPathError, match="RELIEF_TRUSTED_MODULES"):
        module.on_load_checkpoint(checkpoint)
    assert module.model.net[-1].out_features == 10 and not structure_of(module)
    monkeypatch.setenv("RELIEF_TRUSTED_MODULES", __name__)
    module.on_load_checkpoint(checkpoint)
    assert module.model.net[-1].out_features == 4
