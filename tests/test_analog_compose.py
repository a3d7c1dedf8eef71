"""AnalogNoise composes with Lightning: accumulation, eval-noise resume, bf16, compile, the registry, ensembles."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer
from lightning_relief import AnalogNoise, AnalogNoiseStrategy, ClassifierModule, DeepEnsembleStrategy
from lightning_relief.data import DigitsDataModule
from lightning_relief.models import MLP, LeNet5
from lightning_relief.noise import (
    AdditiveGaussian,
    DeploymentTime,
    LinearWarmup,
    PCMNoise,
    Placement,
    RandomWalk,
    WeightNoise,
)


class Levels(Callback):
    """The level the noise callback drew for each training batch (read after the batch)."""

    def __init__(self, noise: AnalogNoise) -> None:
        self.noise = noise
        self.levels: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.levels.append(float(self.noise.injector.current_level))


class Spread(ClassifierModule):
    """Records how far two forwards of one batch differ: > 0 exactly when noise is on."""

    def __init__(self, **kwargs):
        super().__init__(MLP(dropout=0.0), **kwargs)
        self.train_spread: list[float] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.train_spread.append(float((self(x).float() - self(x).float()).abs().max()))
        return super().training_step(batch, batch_idx)


def digits(batch_size: int = 64) -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=batch_size, seed=0)
    dm.setup()
    return dm


def test_schedule_follows_optimizer_steps_under_gradient_accumulation(seed):
    noise = AnalogNoise(AdditiveGaussian(), LinearWarmup(0.6, warmup_steps=6))
    levels = Levels(noise)
    trainer = quiet_trainer(
        callbacks=[noise, levels], accumulate_grad_batches=2, max_epochs=1, limit_train_batches=16, limit_val_batches=0
    )
    trainer.fit(Spread(), digits(32))
    # micro-batches 2k and 2k+1 belong to optimizer step k: LinearWarmup ends after 6 optimizer steps
    assert levels.levels == pytest.approx([0.1 * min(k // 2, 6) for k in range(16)])
    assert trainer.global_step == 8 and noise.injector.batches_done == 16


def test_random_schedule_draws_once_per_optimizer_step(seed):
    """A random level (a deployment time) is drawn per optimizer step: micro-batches of one step share it."""
    noise = AnalogNoise(PCMNoise(), DeploymentTime(), placement="weights")
    levels = Levels(noise)
    trainer = quiet_trainer(
        callbacks=[noise, levels], accumulate_grad_batches=2, max_epochs=1, limit_train_batches=12, limit_val_batches=0
    )
    trainer.fit(Spread(), digits(32))
    assert trainer.global_step == 6 and len(levels.levels) == 12
    assert all(levels.levels[2 * k] == levels.levels[2 * k + 1] for k in range(6))
    assert len(set(levels.levels)) == 6  # a fresh time at every optimizer step


def _fit_eval_noise(tmp_path, max_epochs, ckpt_path=None, save_to=None):
    L.seed_everything(0, verbose=False)
    dm = digits(128)
    module = ClassifierModule(LeNet5(dropout=0.0), lr=5e-3, scheduler="none")
    noise = AnalogNoise(WeightNoise(), 2.0, eval_noise=True, seed=5)
    metrics: list[dict[str, float]] = []

    class Record(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")})

    trainer = quiet_trainer(callbacks=[noise, Record()], max_epochs=max_epochs, default_root_dir=tmp_path)
    # a fixed batch order: a shuffling loader restarts its generator on resume (not the noise's business)
    train = torch.utils.data.DataLoader(dm.dataset("train"), batch_size=128, shuffle=False)
    trainer.fit(module, train, dm.val_dataloader(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module, metrics


def test_eval_noise_metrics_resume_exactly(tmp_path):
    """Validation under noise after a resume logs exactly what the straight run logged (ModelCheckpoint monitors these)."""
    straight, straight_metrics = _fit_eval_noise(tmp_path, 2)
    ckpt = tmp_path / "epoch1.ckpt"
    _, first_metrics = _fit_eval_noise(tmp_path, 1, save_to=ckpt)
    resumed, resumed_metrics = _fit_eval_noise(tmp_path, 2, ckpt_path=ckpt)
    assert first_metrics == straight_metrics[:1]
    assert resumed_metrics == straight_metrics[1:]  # bit-identical floats, not approx
    clean = quiet_trainer().validate(straight, digits(128), verbose=False)[0]
    assert clean["val_nll"] != straight_metrics[1]["val_nll"]  # the noise did reach the validation
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_bf16_mixed_precision(seed):
    noise = AnalogNoise(AdditiveGaussian(), 0.2, placement=["outputs", "activations"])
    module = Spread()
    trainer = quiet_trainer(callbacks=[noise], precision="bf16-mixed", max_steps=4, limit_val_batches=0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, digits())
    assert all(s > 0.05 for s in module.train_spread)  # noise of σ = 0.2 under autocast
    assert all(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k.endswith("weight"))
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torch_compile(seed):
    """A compiled module gets the same noise as the eager one (same seed, same draws)."""
    spreads, weights = {}, {}
    for compiled in (False, True):
        L.seed_everything(0, verbose=False)
        module = Spread(optimizer="sgd", lr=0.1, scheduler="none")
        strategy = AnalogNoiseStrategy(AdditiveGaussian(), 0.2, placement=["outputs", "activations"])
        trainer = quiet_trainer(strategy=strategy, max_steps=3, limit_val_batches=0)
        trainer.fit(torch.compile(module) if compiled else module, digits())
        spreads[compiled] = module.train_spread
        weights[compiled] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert all(s > 0 for s in spreads[True])
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_strategy_string_is_registered_and_single_device_runs_in_process(seed):
    trainer = quiet_trainer(strategy="analog_noise", max_steps=2, limit_val_batches=0)
    assert isinstance(trainer.strategy, AnalogNoiseStrategy)
    assert trainer.strategy.launcher is None  # one device: no subprocesses, no process group
    module = Spread()
    trainer.fit(module, digits())
    assert float(trainer.callback_metrics["noise_sigma"]) == pytest.approx(0.1)
    assert all(s > 0 for s in module.train_spread)
    assert not torch.distributed.is_initialized()


def test_deep_ensemble_with_noise_callback(seed):
    """Noise reaches every member of a vectorized ensemble: outputs (each member its own draw) and the stacked weights."""
    noise = AnalogNoise(WeightNoise(), 2.0)  # weights and outputs
    module = ClassifierModule(LeNet5(input_size=8, dropout=0.0), optimizer="sgd", lr=1e-3, scheduler="none")
    strategy = DeepEnsembleStrategy(num_members=2, mode="vectorized", reinitialize=False)
    outputs, noisy_w, clean_w = [], [], []

    class Capture(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            from lightning_relief.uncertainty.stacking import member_forward

            x = batch[0][:8]
            noisy_w.append(pl_module.model.classifier[1].weight.detach().clone())
            with member_forward(pl_module).using("members"):
                outputs.append(pl_module(torch.cat([x, x])).detach())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            clean_w.append(pl_module.model.classifier[1].weight.detach().clone())

    trainer = quiet_trainer(strategy=strategy, callbacks=[noise, Capture()], max_steps=2, limit_val_batches=0)
    trainer.fit(module, digits())
    assert noise.injector.batches_done == 2
    assert noisy_w[0].shape[0] == 2  # the stacked [members, out, in] weight is the one perturbed
    assert all(not torch.equal(n, c) for n, c in zip(noisy_w, clean_w))
    # before the first step the members hold the same weights (no re-initialisation): any difference is noise
    first, second = outputs[0].chunk(2)
    assert not torch.allclose(first, second)


def test_bad_input_is_named_before_training():
    with pytest.raises(ValueError, match="schedule.*>= 0"):
        AnalogNoise(AdditiveGaussian(), float("nan"))
    with pytest.raises(ValueError, match="schedule.*>= 0"):
        AnalogNoiseStrategy(AdditiveGaussian(), -0.1)
    with pytest.raises(ValueError, match="schedule: value must be a finite number"):
        AnalogNoise(AdditiveGaussian(), float("inf"))
    with pytest.raises(ValueError, match="w_noise must be a finite number"):
        WeightNoise(w_noise=float("inf"))
    with pytest.raises(ValueError, match="out_noise must be a finite number"):
        PCMNoise(out_noise=float("nan"))
    with pytest.raises(ValueError, match="high must be a finite number"):
        RandomWalk(0.1, 0.0, float("inf"), 0.01)
    with pytest.raises(ValueError, match="t_max"):
        DeploymentTime(t_max=float("inf"))
    with pytest.raises(ValueError, match="drift time"):
        AnalogNoise(PCMNoise(), 0.0)
    with pytest.raises(ValueError, match="t_min"):
        DeploymentTime(t_min=0.0)
    with pytest.raises(ValueError, match="eval_level"):
        AnalogNoise(PCMNoise(), DeploymentTime(), eval_level=0.0)
    noise = AnalogNoise(AdditiveGaussian(), 0.1, placement=Placement("outputs", names=["model.nothing_*"]))
    with pytest.raises(ValueError, match="placement .* selects no layer"):
        quiet_trainer(callbacks=[noise], max_steps=1).fit(Spread(), digits())


def test_level_is_logged_as_a_tensor_without_host_sync_in_the_hooks(seed):
    """The logged level is the schedule's own value (PCM: seconds since programming)."""
    noise = AnalogNoise(PCMNoise(), DeploymentTime(mode="sweep", total_steps=4), placement="weights")
    levels = Levels(noise)
    quiet_trainer(callbacks=[noise, levels], max_steps=5, limit_val_batches=0).fit(Spread(), digits())
    expected = [10 ** (math.log10(DeploymentTime.TEN_YEARS) * min(k / 4, 1.0)) for k in range(5)]
    assert levels.levels == pytest.approx(expected, rel=1e-5)


def test_weight_noise_under_a_sharding_strategy_is_a_typed_error():
    """FSDP keeps flat shards between steps (Lightning runs it on GPUs only, so the check is called directly)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_relief.errors import UnsupportedStrategyError

    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(
            UnsupportedStrategyError, match=f"AnalogNoise does not support strategy {type(strategy).__name__}: weight noise"
        ):
            AnalogNoise(PCMNoise(), DeploymentTime()).check_strategy(strategy)
        AnalogNoise(AdditiveGaussian(), 0.1, placement=["outputs", "activations"]).check_strategy(strategy)
    AnalogNoise(PCMNoise(), DeploymentTime()).check_strategy(DDPStrategy())
