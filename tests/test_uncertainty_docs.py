"""The ensemble and BNN recipes train and reload (docstring examples run under --doctest-modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", ["ensemble_digits", "bnn_digits"])
def test_recipe_fits_tests_and_reloads(recipe, tmp_path, monkeypatch):
    from lightning_relief import ClassifierModule
    from lightning_relief.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / recipe
    main(
        [
            "fit",
            "--config",
            f"recipes/{recipe}.yaml",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
        ]
    )
    last = next(out.rglob("last.ckpt"))
    module = ClassifierModule.load_from_checkpoint(last).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        if recipe == "ensemble_digits":
            from lightning_relief.uncertainty.stacking import num_members

            assert num_members(module) == 5
            torch.testing.assert_close(module(x).exp().sum(-1), torch.ones(4))
        else:
            from lightning_relief.bayes import bayesian_layers, predict_mean

            assert len(bayesian_layers(module.model)) == 5
            torch.testing.assert_close(predict_mean(module, x), predict_mean(module, x))


def test_temperature_scaling_example_in_the_docs_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "uncertainty.md").read_text()
    section = text[text.index("## Temperature scaling") :]
    code = section[section.index("```python") + len("```python") :]
    code = code[: code.index("```")]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/uncertainty.md", "exec"), namespace)
    assert (tmp_path / "calibrated.ckpt").exists() and namespace["scaling"].temperature > 0
