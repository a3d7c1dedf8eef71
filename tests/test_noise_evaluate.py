"""evaluate_robustness and `relief robustness`: accuracy vs a direct computation, files, clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.cli import main as relief
from lightning_relief.models import LeNet5
from lightning_relief.noise import AdditiveGaussian, PCMNoise, evaluate_robustness


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    from lightning_relief.data import DigitsDataModule

    digits = DigitsDataModule(batch_size=128)
    module = ClassifierModule(LeNet5(dropout=0.0), lr=1e-2)
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(module, digits)
    return module.eval(), digits


def test_sweep_matches_direct_accuracy_and_leaves_the_model_alone(trained, tmp_path):
    module, digits = trained
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = evaluate_robustness(
        module, digits, AdditiveGaussian(), levels=[0.0, 0.3, 3.0], repeats=3, out_dir=tmp_path, show=False, progress=False
    )
    x, y = digits.dataset("test").tensors
    with torch.no_grad():
        direct = float(multiclass_accuracy(module(x), y, num_classes=10, average="micro"))
    assert result.clean_accuracy == pytest.approx(direct, abs=1e-6)
    assert result.accuracy_mean[0] == pytest.approx(direct, abs=1e-6) and result.accuracy_std[0] == pytest.approx(0.0, abs=1e-12)
    assert result.accuracy_mean[2] < 0.5 * direct  # σ = 3 on every layer output destroys the model
    assert result.robustness[1] == pytest.approx(result.accuracy_mean[1] / direct)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert not any(m._forward_hooks for m in module.modules())
    saved = json.loads((tmp_path / "additivegaussian.json").read_text())
    assert saved["levels"] == [0.0, 0.3, 3.0] and (tmp_path / "additivegaussian.png").stat().st_size > 1000


def test_time_sweep_reports_drift_compensation(trained, tmp_path):
    module, digits = trained
    result = evaluate_robustness(module, digits, PCMNoise(), times=[1.0, 3.15e7], repeats=2, show=False, progress=False)
    assert result.kind == "time" and result.uncompensated_mean is not None
    assert result.accuracy_mean[1] > result.uncompensated_mean[1] - 0.02  # compensation never costs accuracy much
    table = result.table()
    assert table.row_count == 2 and len(table.columns) == 5
    with pytest.raises(ValueError, match="times="):
        evaluate_robustness(module, digits, PCMNoise(), levels=[0.1], show=False, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        evaluate_robustness(module, digits, AdditiveGaussian(), repeats=0, show=False, progress=False)


def test_recipe_trains_and_relief_robustness_reads_it(tmp_path, capsys):
    root = tmp_path / "run"
    code = relief(
        [
            "fit",
            "--config",
            "recipes/vant_digits.yaml",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    ckpt = next(root.rglob("last.ckpt"))
    metrics = (next(root.rglob("metrics.csv"))).read_text().splitlines()
    assert "noise_sigma" in metrics[0]
    out = tmp_path / "rob"
    assert (
        relief(
            [
                "robustness",
                "--ckpt",
                str(ckpt),
                "--config",
                "vant_digits",
                "--levels",
                "0",
                "0.2",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "robustness_additivegaussian.json").read_text())
    assert data["levels"] == [0.0, 0.2] and data["accuracy_mean"][0] == pytest.approx(data["clean_accuracy"])
    assert (out / "robustness_additivegaussian.png").exists()

    with pytest.raises(SystemExit) as err:
        relief(["robustness", "--ckpt", str(tmp_path / "missing.ckpt"), "--config", "vant_digits"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        relief(["robustness", "--ckpt", str(ckpt), "--config", "vant_digits", "--repeats", "0"])
    assert err.value.code == 2
    assert "repeats" in capsys.readouterr().err


def test_pcm_recipe_parses():
    with pytest.raises(SystemExit) as err:
        relief(["fit", "--config", "recipes/analog_pcm_digits.yaml", "--print_config"])
    assert err.value.code == 0
