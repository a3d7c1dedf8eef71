"""AnalogNoiseStrategy / AnalogNoise in real Lightning runs: where noise appears, logging, checkpoints, exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer
from lightning_relief import AnalogNoiseStrategy, ClassifierModule
from lightning_relief.models import MLP, LeNet5
from lightning_relief.noise import (
    AdditiveGaussian,
    DeploymentTime,
    LinearWarmup,
    PCMNoise,
    PerSampleVariance,
    RandomWalk,
    SequentialSchedule,
    WeightNoise,
)


class Probe(ClassifierModule):
    """A user module that looks at its own forward passes (the strategy never changes it)."""

    def __init__(self, sgd_lr: float | None = None, **kwargs):
        super().__init__(MLP(dropout=0.0), **kwargs)
        self.sgd_lr = sgd_lr
        self.train_spread: list[float] = []
        self.val_spread: list[float] = []
        self.weight_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.train_spread.append(float((self(x) - self(x)).abs().max()))
        self.weight_seen.append(self.model.net[1].weight.detach().clone())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.val_spread.append(float((self(x) - self(x)).abs().max()))
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        if self.sgd_lr is not None:
            return torch.optim.SGD(self.parameters(), lr=self.sgd_lr)
        return super().configure_optimizers()


class LevelRecorder(Callback):
    def __init__(self) -> None:
        self.levels: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.levels.append(float(trainer.callback_metrics["noise_sigma"]))


def small_digits(digits):
    digits.batch_size = 128
    return digits


def test_noise_in_training_only_and_logged_every_step(seed, digits):
    module = Probe()
    recorder = LevelRecorder()
    strategy = AnalogNoiseStrategy(AdditiveGaussian(), LinearWarmup(0.4, warmup_steps=8), placement=["outputs", "activations"])
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=10, limit_val_batches=2, callbacks=[recorder])
    trainer.fit(module, small_digits(digits))
    assert module.train_spread[0] == 0  # warm-up starts at σ = 0
    assert all(s > 0 for s in module.train_spread[1:])  # fresh noise on every forward while training
    assert module.val_spread and all(s == 0 for s in module.val_spread)  # validation is clean
    assert recorder.levels == pytest.approx([0.4 * min(k / 8, 1.0) for k in range(10)])
    assert not any(m._forward_hooks for m in module.modules())  # hooks removed at teardown


def test_eval_noise_reaches_validation_and_predict(seed, digits):
    module = Probe()
    strategy = AnalogNoiseStrategy(AdditiveGaussian(), 0.2, eval_noise=True)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(module, small_digits(digits))
    assert all(s > 0 for s in module.val_spread)
    module.eval()
    x = digits.dataset("test").tensors[0][:64]
    clean = module(x).softmax(-1)
    noisy = torch.cat(trainer.predict(module, dataloaders=torch.utils.data.DataLoader(x, batch_size=64)))
    assert not torch.allclose(noisy, clean)
    plain = torch.cat(quiet_trainer().predict(module, dataloaders=torch.utils.data.DataLoader(x, batch_size=64)))
    torch.testing.assert_close(plain, clean)


def test_weight_noise_is_seen_in_the_step_and_never_stored(seed, digits):
    """SGD with lr=0: whatever the noise did inside the steps, the weights end bit-identical."""
    module = Probe(sgd_lr=0.0)
    initial = {k: v.clone() for k, v in module.state_dict().items() if "running" not in k and "num_batches" not in k}
    strategy = AnalogNoiseStrategy(PCMNoise(), DeploymentTime(), placement="weights")
    trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, small_digits(digits))
    clean_w = initial["model.net.1.weight"]
    assert all(not torch.equal(w, clean_w) for w in module.weight_seen)  # the forward saw PCM weights
    assert all(s == 0 for s in module.train_spread)  # one chip per step: both forwards agree
    for key, value in initial.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_gradient_flows_through_noisy_forward_to_clean_weights(seed):
    """One SGD step under weight noise equals a hand-made step: grad at the noisy weights, applied to the clean ones."""
    model = MLP(in_features=4, hidden=(5,), num_classes=3, dropout=0.0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = AnalogNoiseStrategy(WeightNoise(out_noise=0.0), 1.0, placement="weights", seed=3, draws="fresh")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    quiet_trainer(strategy=strategy, max_steps=1, limit_val_batches=0).fit(Tiny(), loader)

    # reference: the same noise drawn by the injector's generator for step 0, by hand
    from lightning_relief.noise.injector import step_seed

    g = torch.Generator().manual_seed(step_seed(3, 0, 0))
    ref = MLP(in_features=4, hidden=(5,), num_classes=3, dropout=0.0)
    ref.load_state_dict(before)
    noisy = {}
    for name in ("net.1.weight", "net.4.weight"):
        w = before[name]
        noisy[name] = w + 0.0175 * w.abs().max() * torch.randn(w.shape, generator=g)
    with torch.no_grad():
        for name, value in noisy.items():
            ref.get_parameter(name).copy_(value)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    for name, param in ref.named_parameters():
        expected = before[name] - 0.1 * param.grad
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-6, atol=1e-7)


def _fit(tmp_path, max_epochs, ckpt_path=None, save_to=None, recorder=None):
    L.seed_everything(0, verbose=False)
    from lightning_relief.data import DigitsDataModule

    module = ClassifierModule(LeNet5(dropout=0.0), lr=5e-3, scheduler="none")  # cosine depends on max_epochs
    schedule = SequentialSchedule(
        [LinearWarmup(0.3, warmup_steps=15), PerSampleVariance(RandomWalk(0.3, 0.1, 0.5, 0.02), alpha=0.45, theta=0.2)],
        milestones=[15],
    )
    strategy = AnalogNoiseStrategy(AdditiveGaussian(), schedule, placement=["outputs", "activations"], seed=7)
    trainer = quiet_trainer(
        strategy=strategy,
        max_epochs=max_epochs,
        limit_val_batches=1,
        callbacks=[recorder] if recorder else None,
        default_root_dir=tmp_path,
    )
    digits = DigitsDataModule(batch_size=128, seed=0)
    digits.setup()
    # a fixed batch order: a shuffling loader restarts its generator on resume, which is not what is tested here
    train = torch.utils.data.DataLoader(digits.dataset("train"), batch_size=128, shuffle=False)
    trainer.fit(module, train, digits.val_dataloader(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module, strategy


def test_checkpoint_resume_is_exact(tmp_path):
    straight_levels = LevelRecorder()
    straight, _ = _fit(tmp_path, 2, recorder=straight_levels)

    ckpt = tmp_path / "epoch1.ckpt"
    _, first_half = _fit(tmp_path, 1, save_to=ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][first_half.noise.state_key]
    assert state["batches_done"] == 10 and "schedule_rng" in state
    assert state["schedule"]["schedules"][1]["sigma"]["step"] == first_half.injector.schedule.schedules[1].sigma._step

    resumed_levels = LevelRecorder()
    resumed, strategy = _fit(tmp_path, 2, ckpt_path=ckpt, recorder=resumed_levels)
    assert strategy.injector.batches_done == 20
    assert resumed_levels.levels == straight_levels.levels[10:]  # same σ every step after resume
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_noisy_model_saves_reloads_and_exports_clean(tmp_path, seed, digits):
    module = ClassifierModule(LeNet5(dropout=0.0))
    strategy = AnalogNoiseStrategy(WeightNoise())
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(module, small_digits(digits))
    path = tmp_path / "noisy.ckpt"
    trainer.save_checkpoint(path)
    module.eval()
    x = digits.dataset("test").tensors[0][:32]
    expected = module(x)
    reloaded = ClassifierModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    exported = torch.export.export(module.model, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("rand" in op or "normal" in op for op in ops), ops
    torch.testing.assert_close(exported.module()(x), expected)


def test_bad_arguments_fail_before_training():
    with pytest.raises(ValueError, match="needs a time level"):
        AnalogNoiseStrategy(PCMNoise(), LinearWarmup(0.1, 10))
    with pytest.raises(ValueError, match="time-based"):
        AnalogNoiseStrategy(PCMNoise())
    with pytest.raises(TypeError, match="noise must be a NoiseModel"):
        AnalogNoiseStrategy("gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_level"):
        AnalogNoiseStrategy(AdditiveGaussian(), 0.1, eval_level=-1.0)
    with pytest.raises(ValueError, match="supports sites"):
        AnalogNoiseStrategy(WeightNoise(), placement="activations")
