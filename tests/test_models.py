"""Reference models: shapes, specs, and the ClassifierModule checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_relief.models import MLP, ClassifierModule, LeNet5, ResNet, build_model, model_spec


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize(
    "factory",
    [
        lambda s: MLP(in_features=s * s),
        lambda s: LeNet5(input_size=s),
        lambda s: ResNet(depth=8, width=4),
        lambda s: ResNet(depth=20, width=8, in_channels=1, num_classes=7),
    ],
)
def test_output_shapes(size, factory):
    model = factory(size).eval()
    out = model(torch.randn(3, 1, size, size))
    assert out.shape[0] == 3 and out.shape[1] in (7, 10)


def test_resnet_depth_counts_layers_and_has_residual_adds():
    for depth in (8, 20):
        model = ResNet(depth=depth, width=4)
        weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
        assert len(weighted) - len(shortcuts) == depth
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=10)


def test_specs_rebuild_identical_architectures():
    for model in (MLP(hidden=(32,), dropout=0.1), LeNet5(input_size=16, width=2), ResNet(depth=8, width=4, dropout=0.1)):
        spec = model_spec(model)
        rebuilt = build_model(spec)
        assert type(rebuilt) is type(model)
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    assert model_spec(nn.Linear(2, 2)) is None


def test_classifier_checkpoint_round_trip_gives_identical_outputs(tmp_path, digits, trainer_factory, seed):
    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=5, limit_val_batches=2)
    trainer.fit(module, digits)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassifierModule.load_from_checkpoint(path)
    module.eval(), reloaded.eval()
    x = digits.dataset("test").tensors[0][:16]
    torch.testing.assert_close(reloaded(x), module(x), rtol=0, atol=0)
    assert reloaded.hparams.lr == 1e-2


def test_classifier_with_foreign_model_needs_model_on_reload(tmp_path, trainer_factory, digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    module = ClassifierModule(model)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, digits)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match="pass model="):
        ClassifierModule.load_from_checkpoint(path)
    reloaded = ClassifierModule.load_from_checkpoint(path, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(reloaded.eval()(x), module.eval()(x))


def test_classifier_metrics_match_direct_computation(digits, trainer_factory, seed):
    module = ClassifierModule(MLP(), lr=1e-2)
    trainer = trainer_factory(max_epochs=2)
    trainer.fit(module, digits)
    metrics = trainer.test(module, digits, verbose=False)[0]
    x, y = digits.dataset("test").tensors
    with torch.no_grad():
        logits = module.eval()(x)
    assert metrics["test_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    nll = torch.nn.functional.cross_entropy(logits, y).item()
    assert metrics["test_nll"] == pytest.approx(nll, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"optimizer": "rmsprop"}, "optimizer"), ({"scheduler": "step"}, "scheduler"), ({"lr": 0}, "lr")]
)
def test_classifier_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClassifierModule(MLP(), **kwargs)
