"""SensitivityPruningCallback inside real `fit` runs: apply, optimizer, checkpoints, resume, report."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging, WeightAveraging
from torch import nn

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, SensitivityPruningCallback
from lightning_relief.compress import load_compressed, quantized_bits
from lightning_relief.errors import UnsupportedCallbackError
from lightning_relief.models import LeNet5


class UserNet(L.LightningModule):
    """A user's own module: no mixin, residual sum, concatenation, functional calls, its own optimizer."""

    def __init__(self, width: int = 8, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.mix = nn.Conv2d(2 * width, width, 1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        r = F.relu(self.a(h))
        h = F.relu(h + self.b(r))
        h = F.relu(self.mix(torch.cat([h, r], dim=1)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def _optimizer_params(trainer):
    return {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}


def _trainable(module):
    return {id(p) for p in module.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"metric": "flops"}, "metric"),
        ({"methods": ("prune", "distill")}, "methods"),
        ({"methods": ()}, "methods"),
        ({"prune_ratios": (0.5, 1.0)}, "prune_ratios"),
        ({"bit_widths": (1, 4)}, "bit_widths"),
        ({"importance": "random"}, "importance"),
        ({"search": "rl"}, "search"),
        ({"search": "uniform", "methods": ("prune", "quantize")}, "uniform"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"finetune_epochs": -2}, "finetune_epochs"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"candidates": 0}, "candidates"),
    ],
)
def test_bad_arguments_are_refused_up_front(kwargs, match):
    kwargs.setdefault("metric", "macs")
    with pytest.raises(ValueError, match=match):
        SensitivityPruningCallback(**kwargs)


def test_start_epoch_must_leave_room(digits, seed):
    cb = SensitivityPruningCallback(metric="macs", start_epoch=2, verbose=False)
    with pytest.raises(ValueError, match="start_epoch=2"):
        quiet_trainer(max_epochs=2, callbacks=[cb]).fit(ClassifierModule(LeNet5(input_size=8)), digits)


def test_fit_compresses_trains_and_reloads(digits, seed, tmp_path):
    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
    original_params = sum(p.numel() for p in module.parameters())
    # at a tenth of the bytes 4-bit weights alone are not enough: the search must prune too
    cb = SensitivityPruningCallback(
        target=0.1,
        metric="size",
        start_epoch=1,
        calibration_batches=2,
        prune_ratios=(0.25, 0.5, 0.75),
        bit_widths=(4, 8),
        verbose=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_acc", mode="max", filename="{epoch}")
    snapshot, rng = {}, {}

    class Before(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            rng["before"] = torch.get_rng_state()

    trainer = quiet_trainer(
        max_epochs=3, callbacks=[Before(), cb, ckpt, best], enable_checkpointing=True, default_root_dir=tmp_path
    )

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                # the search drew from its own random stream: fine-tuning does not depend on how many
                # candidates it measured
                assert torch.equal(torch.get_rng_state(), rng["before"])
                # runs after the pruning callback: the optimizer must now hold exactly the new parameters
                assert _optimizer_params(trainer) == _trainable(pl_module)
                # the rebuilt cosine schedule carries on from epoch 1 of 3 instead of restarting
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                assert lr == pytest.approx(1e-2 * (1 + math.cos(math.pi / 3)) / 2)
                snapshot.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Spy())
    trainer.fit(module, digits)

    assert cb.phase == "compressed" and cb.chosen is not None
    assert cb.chosen.measured_cost <= 0.1 * cb.original_cost
    assert cb.policy.pruned_groups() and cb.policy.quantized_layers()
    assert sum(p.numel() for p in module.parameters()) < original_params  # channels really removed
    assert quantized_bits(module) == cb.policy.quantized_layers()
    assert _optimizer_params(trainer) == _trainable(module)
    # fine-tuning moved the compressed model's weights
    moved = [
        k
        for k, v in module.state_dict().items()
        if k in snapshot and v.dtype.is_floating_point and v.shape == snapshot[k].shape and not torch.equal(v, snapshot[k])
    ]
    assert any(k.endswith("weight") for k in moved)
    # report: per-layer table, every candidate, Pareto plot
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert len(report["candidates"]) == len(cb.evaluated) >= 1
    assert sum(c["chosen"] for c in report["candidates"]) == 1
    assert {r["layer"] for r in report["layers"]} >= {"model.features.0.0", "model.classifier.7"}
    assert (tmp_path / "compression_pareto.png").stat().st_size > 1000

    reloaded = ClassifierModule.load_from_checkpoint(ckpt.last_model_path).eval()
    module.eval()
    x = digits.dataset("val").tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), module(x))
    validated = quiet_trainer().validate(reloaded, digits, verbose=False)[0]["val_acc"]
    assert validated > 0.5
    # the uncompressed epoch 0 may have the best accuracy, but "best" now ranks compressed epochs only
    assert "epoch=0" not in best.best_model_path
    assert trainer.test(module, digits, ckpt_path="best", verbose=False)[0]["test_acc"] > 0.5


def test_user_module_with_residuals_reloads_and_resumes(digits, seed, tmp_path):
    module = UserNet()
    cb = SensitivityPruningCallback(
        target=0.5,
        metric="params",
        methods=("prune", "quantize"),
        start_epoch=1,
        calibration_batches=2,
        prune_ratios=(0.25, 0.5),
        bit_widths=(4, 8),
        verbose=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(max_epochs=3, callbacks=[cb, ckpt], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, digits)
    assert cb.chosen.measured_cost <= 0.5 * cb.original_cost
    assert module.stem.out_channels == module.b.out_channels  # the residual stays consistent
    assert _optimizer_params(trainer) == _trainable(module)
    assert "on_load_checkpoint" not in module.__dict__  # the temporary hook is gone after fit

    # no mixin on the user's module: load_compressed rebuilds the structure first
    epoch1 = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    reloaded = load_compressed(UserNet, epoch1)
    state = torch.load(epoch1, weights_only=False)
    assert "relief_structure" in state
    x = digits.dataset("val").tensors[0][:16]
    fresh = UserNet()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state["state_dict"])  # without the replay the shapes differ

    # resume the fine-tuning from the epoch-1 checkpoint with a fresh, uncompressed module
    resumed_cb = SensitivityPruningCallback(
        target=0.5, metric="params", start_epoch=1, prune_ratios=(0.25, 0.5), bit_widths=(4, 8), verbose=False
    )
    resumed = UserNet()
    trainer2 = quiet_trainer(max_epochs=3, callbacks=[resumed_cb], default_root_dir=tmp_path)
    trainer2.fit(resumed, digits, ckpt_path=epoch1)
    assert resumed_cb.phase == "compressed"
    assert resumed_cb.policy == cb.policy
    assert [e.chosen for e in resumed_cb.evaluated] == [e.chosen for e in cb.evaluated]
    assert trainer2.current_epoch == 3
    assert resumed.stem.out_channels == module.stem.out_channels
    assert _optimizer_params(trainer2) == _trainable(resumed)
    reloaded.eval()
    resumed.eval()
    assert resumed(x).shape == reloaded(x).shape == (16, 10)


def test_finetune_epochs_stop_training_and_uniform_search(digits, seed, tmp_path):
    module = ClassifierModule(LeNet5(input_size=8))
    cb = SensitivityPruningCallback(
        target=0.5,
        metric="macs",
        methods=("prune",),
        search="uniform",
        start_epoch=1,
        finetune_epochs=1,
        calibration_batches=1,
        verbose=False,
    )
    trainer = quiet_trainer(max_epochs=5, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, digits)
    assert trainer.current_epoch == 2  # 1 epoch before, 1 of fine-tuning
    ratios = set(cb.policy.prune.values())
    assert len(ratios) == 1 and 0 < ratios.pop() < 1
    assert cb.chosen.measured_cost <= 0.5 * cb.original_cost


@pytest.mark.parametrize("averaging", [WeightAveraging(), StochasticWeightAveraging(swa_lrs=1e-3)], ids=["ema", "swa"])
def test_weight_averaging_is_refused_before_training_and_works_in_a_second_fit(digits, seed, tmp_path, averaging):
    """Lightning's averaging callbacks copy the module at setup; after compression the first update failed
    with a bare shape error, after the whole search. Now: a named error before any training step, and the
    way the message gives (average the compressed model in a second fit) works."""
    cb = SensitivityPruningCallback(
        target=0.5, metric="macs", methods=("prune",), search="uniform", start_epoch=1, calibration_batches=1, verbose=False
    )
    module = ClassifierModule(LeNet5(input_size=8))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(UnsupportedCallbackError, match=type(averaging).__name__):
        quiet_trainer(max_epochs=2, callbacks=[cb, averaging]).fit(module, digits)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # nothing trained

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = SensitivityPruningCallback(
        target=0.5, metric="macs", methods=("prune",), search="uniform", start_epoch=1, calibration_batches=1, verbose=False
    )
    quiet_trainer(
        max_epochs=2, limit_train_batches=3, callbacks=[cb, ckpt], enable_checkpointing=True, default_root_dir=tmp_path
    ).fit(module, digits)
    compressed = ClassifierModule.load_from_checkpoint(ckpt.last_model_path)
    shapes = {k: v.shape for k, v in compressed.state_dict().items()}
    quiet_trainer(max_epochs=2, limit_train_batches=3, callbacks=[averaging], default_root_dir=tmp_path).fit(compressed, digits)
    assert {k: v.shape for k, v in compressed.state_dict().items()} == shapes
    assert sum(p.numel() for p in compressed.parameters()) < sum(v.numel() for v in before.values() if v.dtype.is_floating_point)


@pytest.mark.parametrize("recipe", ["compress_lenet_digits", "compress_resnet20_digits"])
def test_the_compression_recipes_validate_and_build_their_callback_as_shipped(recipe, capsys):
    """The recipes run with a small search in test_docs_examples; here their shipped settings, unchanged:
    the CLI validates them, and the callback they describe builds its TVM latency meter from them."""
    import yaml

    from lightning_relief.cli import main as relief
    from lightning_relief.compress.latency import LatencyMeter

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml"
    with pytest.raises(SystemExit) as done:
        relief(["fit", "--config", str(path), "--print_config"])
    assert done.value.code == 0
    shipped = yaml.safe_load(path.read_text())
    printed = yaml.safe_load(capsys.readouterr().out)
    args = next(c["init_args"] for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("PruningCallback"))
    parsed = next(c["init_args"] for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("PruningCallback"))
    assert {k: parsed[k] for k in args} == args
    cb = SensitivityPruningCallback(**args)
    assert isinstance(cb.meter, LatencyMeter) and cb.meter.target == args["target_device"]
    assert cb.config.prune_ratios == tuple(args["prune_ratios"]) and cb.config.grow > 0


@pytest.mark.slow
def test_latency_metric_measures_candidates_with_tvm(digits, seed, tmp_path):
    """Untuned TVM, a two-layer MLP: per-layer table, whole-model measurement, integer lowering."""
    from lightning_relief.compress.latency import LatencyMeter
    from lightning_relief.deploy import LayerLatencyTable
    from lightning_relief.models import MLP

    module = ClassifierModule(MLP(in_features=64, hidden=(256,), dropout=0.0))
    cb = SensitivityPruningCallback(
        target=0.6,
        metric="latency",
        start_epoch=0,
        calibration_batches=1,
        prune_ratios=(0.5, 0.75),
        bit_widths=(8,),
        candidates=1,
        max_rounds=2,
        grow=2,
        recovery_steps=0,
        cache_dir=str(tmp_path / "cache"),
        verbose=False,
    )
    assert isinstance(cb.meter, LatencyMeter) and cb.meter.target == "llvm"
    cb.meter.compare_seconds = 0.0  # each candidate timed in 10 alternating rounds, not for 6 s
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, digits)
    assert cb.original_cost > 0 and cb.evaluated
    assert all(c.measured_cost > 0 for c in cb.evaluated)
    assert cb.chosen.measured_cost < cb.original_cost
    assert _optimizer_params(trainer) == _trainable(module)
    # the cost table's corners are the deploy table's measurements (same cache, no new compile),
    # scaled by the fit to the two whole-model measurements (original, uniformly half-pruned)
    assert len(cb.calibration["measured"]) == 2 and cb.calibration["scale"] > 0
    table = LayerLatencyTable("llvm", cache_dir=tmp_path / "cache" / "layers", repeat=10, number=10)
    full = table.latency_ms("linear", 64, 256)
    row = next(r for r in cb.report["layers"] if r["layer"] == "model.net.1")
    assert row["cost_before"] == pytest.approx(cb.calibration["scale"] * full)
    assert table.misses == 0
    # a quantized candidate is measured through the integer lowering
    meter = LatencyMeter("llvm", cache_dir=tmp_path / "cache", repeat=3, number=3)
    from lightning_relief.compress import analyze, apply_quantization

    x = digits.dataset("val").tensors[0][:4]
    meter.cost_model(analyze(module, x[:1]))
    quantized = copy.deepcopy(module)
    todo = {n: 8 for n in ("model.net.1", "model.net.4") if n not in quantized_bits(quantized)}
    apply_quantization(quantized, todo, [x])
    assert set(quantized_bits(quantized)) == {"model.net.1", "model.net.4"}
    assert meter.measure(quantized) > 0


@pytest.mark.slow
def test_export_callback_compiles_the_compressed_integer_model(digits, seed, tmp_path):
    """Pruned + quantized inside fit, then TVMExportCallback compiles it with integer layers and checks parity."""
    from lightning_relief import TVMExportCallback

    module = ClassifierModule(LeNet5(input_size=8))
    cb = SensitivityPruningCallback(
        target=0.1,
        metric="size",
        start_epoch=0,
        calibration_batches=1,
        candidates=1,
        prune_ratios=(0.5, 0.75),
        bit_widths=(8,),
        verbose=False,
    )
    export = TVMExportCallback(target="llvm", dirpath=tmp_path / "tvm", example_input_shape=(1, 1, 8, 8), measure=False)
    quiet_trainer(max_epochs=1, callbacks=[cb, export], default_root_dir=tmp_path).fit(module, digits)
    assert cb.policy.quantized_layers() and cb.policy.pruned_groups()
    assert export.last_export, "the export ran"
    assert export.last_export.get("top1_agreement", 1.0) >= 0.99
    assert (tmp_path / "tvm").exists()


def test_quantizer_scales_get_no_weight_decay_and_the_split_optimizer_resumes(digits, seed, tmp_path):
    """Decay would pull learned activation scales to zero (under Adam by ~lr a step): they are exempt."""
    from lightning_relief.compress.quantize import quantizer_parameters

    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2, weight_decay=1e-3)
    cb = SensitivityPruningCallback(
        target=0.5,
        metric="size",
        methods=("quantize",),
        bit_widths=(8,),
        start_epoch=1,
        calibration_batches=2,
        recovery_steps=0,
        verbose=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    seen = {}

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            groups = trainer.optimizers[0].param_groups
            seen[trainer.current_epoch] = [(g["weight_decay"], g["lr"], {id(p) for p in g["params"]}) for g in groups]

    trainer = quiet_trainer(max_epochs=3, callbacks=[cb, ckpt, Spy()], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, digits)
    scales = {id(p) for p in quantizer_parameters(module)}
    assert cb.policy.quantized_layers() and len(scales) == len(cb.policy.quantized_layers())
    assert len(seen[0]) == 1  # before compression: the module's own single group
    for epoch in (1, 2):
        decayed = set().union(*(ids for wd, _, ids in seen[epoch] if wd > 0))
        exempt = set().union(*(ids for wd, _, ids in seen[epoch] if wd == 0))
        assert exempt == scales and decayed == _trainable(module) - scales
        # the split-off group follows the same (resumed) cosine schedule as the one it came from
        assert len({lr for _, lr, _ in seen[epoch]}) == 1
    assert seen[1][0][1] == pytest.approx(1e-2 * (1 + math.cos(2 * math.pi / 3)) / 2)

    # resuming after compression loads the two-group optimizer state into the rebuilt optimizer
    epoch1 = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    resumed = ClassifierModule(LeNet5(input_size=8), lr=1e-2, weight_decay=1e-3)
    resumed_cb = SensitivityPruningCallback(
        target=0.5, metric="size", methods=("quantize",), bit_widths=(8,), start_epoch=1, verbose=False
    )
    trainer2 = quiet_trainer(max_epochs=3, callbacks=[resumed_cb], default_root_dir=tmp_path)
    trainer2.fit(resumed, digits, ckpt_path=epoch1)
    assert trainer2.current_epoch == 3
    groups = trainer2.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in quantizer_parameters(resumed)}
