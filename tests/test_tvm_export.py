"""TVMExportCallback and `relief export`: artifacts, parity, and failures that change nothing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from tvm import relax

from lightning_relief import ClassifierModule, DigitsDataModule
from lightning_relief.callbacks.tvm_export import TVMExportCallback
from lightning_relief.cli.export import main as export_main
from lightning_relief.deploy import ParityError, UnsupportedOperatorError, check_parity, compile_for_target, load_compiled
from lightning_relief.models import LeNet5


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_callback_exports_verifies_and_logs(tmp_path, trainer_factory, seed):
    export = TVMExportCallback(dirpath=tmp_path / "artifact", example_input_shape=(1, 1, 8, 8), repeat=3, number=3)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = trainer_factory(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[export], logger=logger)
    module = ClassifierModule(LeNet5(input_size=8))
    dm = DigitsDataModule(size=8)
    trainer.fit(module, dm)
    summary = export.last_export
    assert summary["max_abs_error"] < 1e-5 and summary["top1_agreement"] == 1.0 and summary["latency_ms"] > 0
    meta = json.loads((tmp_path / "artifact" / "metadata.json").read_text())
    assert meta["parity"]["ok"] and meta["inputs"][0]["shape"] == [None, 1, 8, 8]
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "tvm_latency_ms" in metrics and "tvm_max_abs_error" in metrics
    # the artifact reproduces the trained module on real data
    x = next(iter(dm.test_dataloader()))[0]
    module.eval()
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(load_compiled(tmp_path / "artifact")(x), expected, atol=1e-5, rtol=1e-5)
    restored = TVMExportCallback()
    restored.load_state_dict(export.state_dict())
    assert restored.last_export == summary


class ErfInv(nn.Module):
    """Differentiable, so it trains, but TVM's frontend has no erfinv."""

    def forward(self, x):
        return torch.erfinv(torch.tanh(x) * 0.5)


def test_failed_export_changes_neither_model_nor_checkpoint(tmp_path, trainer_factory, seed):
    net = nn.Sequential(LeNet5(input_size=8), ErfInv())
    module = ClassifierModule(net)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    export = TVMExportCallback(dirpath=tmp_path / "artifact", measure=False, strict=True)
    trainer = trainer_factory(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[checkpoint, export], enable_checkpointing=True
    )
    snapshot: dict = {}

    class Snapshot(TVMExportCallback):  # runs just before the export, in the same hook
        def on_fit_end(self, trainer, pl_module):
            snapshot["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            snapshot["training"] = pl_module.training
            snapshot["ckpt"] = sha(checkpoint.last_model_path)

    trainer.callbacks.insert(trainer.callbacks.index(export), Snapshot())
    with pytest.raises(UnsupportedOperatorError, match=r"'erfinv.default' used in module 'model.1' \(ErfInv\)"):
        trainer.fit(module, DigitsDataModule(size=8))
    assert module.training == snapshot["training"]
    assert all(torch.equal(snapshot["state"][k], v) for k, v in module.state_dict().items())
    assert sha(checkpoint.last_model_path) == snapshot["ckpt"]
    assert not (tmp_path / "artifact").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")]


def test_failed_export_warns_and_fit_succeeds_unless_strict(tmp_path, trainer_factory, seed):
    export = TVMExportCallback(dirpath=tmp_path / "artifact", measure=False)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[export])
    with pytest.warns(UserWarning, match="TVM export failed.*erfinv"):
        trainer.fit(ClassifierModule(nn.Sequential(LeNet5(input_size=8), ErfInv())), DigitsDataModule(size=8))
    assert trainer.state.finished
    assert export.last_export["error"].startswith("UnsupportedOperatorError: operator 'erfinv.default'")
    assert not (tmp_path / "artifact").exists()


def test_parity_failure_names_first_diverging_layer(digits):
    torch.manual_seed(0)
    model = LeNet5(input_size=8).eval()
    x = next(iter(digits.val_dataloader()))[0][:16]

    def wrong_relu(node, importer):  # a converter bug: ReLU becomes a sigmoid
        return importer.block_builder.emit(relax.op.sigmoid(importer.env[node.args[0]]))

    compiled = compile_for_target(model, x, custom_convert_map={"relu.default": wrong_relu})
    with pytest.raises(ParityError, match=r"first diverging layer: 'features.0.2'") as info:
        check_parity(model, compiled, x)
    errors = dict(info.value.report.layer_errors)
    assert errors["features.0.0"] < 1e-5 and errors["features.0.1"] < 1e-5 and errors["features.0.2"] > 0.1


def test_relief_export_from_checkpoint(tmp_path, trainer_factory, seed, capsys):
    module = ClassifierModule(LeNet5(input_size=8))
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(size=8))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    before = sha(ckpt)
    code = export_main(
        [
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path / "out"),
            "--data",
            "lightning_relief.DigitsDataModule",
            "--input-shape",
            "1,1,8,8",
            "--repeat",
            "2",
            "--number",
            "2",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["top1_agreement"] == 1.0 and summary["latency_ms"] > 0
    assert summary["latency_batch_size"] == 1 and summary["latency_input_shape"] == [1, 1, 8, 8]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["source_checkpoint_sha256"] == before == sha(ckpt)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_compiled(tmp_path / "out")(x), expected, atol=1e-5, rtol=1e-5)


def test_relief_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "missing.ckpt: checkpoint file not found" in capsys.readouterr().err
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "out"), "--target", "nonsense"])
    assert "key 'target'" in capsys.readouterr().err


def test_callback_validates_arguments():
    with pytest.raises(ValueError, match="target 'nonsense'"):
        TVMExportCallback(target="nonsense")
    with pytest.raises(ValueError, match="example_input_shape"):
        TVMExportCallback(example_input_shape=(1, 0, 8))
    with pytest.raises(ValueError, match="export_on"):
        TVMExportCallback(export_on="sometimes")
