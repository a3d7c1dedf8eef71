"""The `relief` command: recipes, LightningCLI runs and one-line errors for bad recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_relief.cli import main
from lightning_relief.cli.errors import summarize
from lightning_relief.cli.lightning import run_lightning_cli
from lightning_relief.cli.recipes import available, describe
from lightning_relief.models import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _recipe(tmp_path: Path, **changes) -> Path:
    """The quickstart recipe with dotted keys replaced (value None deletes the key)."""
    config = yaml.safe_load(QUICKSTART.read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_every_shipped_recipe_has_a_description_and_parses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    recipes = available()
    assert "quickstart" in recipes
    for name, path in recipes.items():
        assert describe(path), f"{name} has no '# description' first line"
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in recipes)


def test_recipes_show_prints_the_file_and_rejects_unknown_names(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["recipes", "show", "quickstart"]) == 0
    assert capsys.readouterr().out == QUICKSTART.read_text()
    assert main(["recipes", "show", "no_such_recipe"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"trainer.max_epoch": 3}, "trainer.max_epoch", "does not accept"),
        ({"trainer.max_epochs": "three"}, "trainer.max_epochs", "int"),
        ({"model.init_args.lr": "fast"}, "model.init_args.lr", "float"),
        ({"model.class_path": "lightning_relief.NoSuchModule"}, "model", "NoSuchModule"),
        ({"data.init_args.size": 12}, "data", "size must be one of"),
    ],
)
def test_bad_recipe_exits_2_with_one_line_naming_file_and_key(tmp_path, monkeypatch, capsys, change, key, words):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, **change)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe)])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relief: error")]
    assert len(err_lines) == 1
    line = err_lines[0]
    assert str(recipe) in line and f"key '{key}'" in line and words in line
    assert "Traceback" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], "a bad recipe must write nothing"


def test_missing_recipe_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "nowhere.yaml"])
    assert exit_info.value.code == 2
    assert "nowhere.yaml: recipe file not found" in capsys.readouterr().err


def test_summarize_extracts_nested_key():
    message = (
        "Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class 'X'>]\n"
        "  Errors:\n    - Problem with given class_path 'a.B':\n        Parser key \"lr\": Expected a <class 'float'>."
    )
    assert summarize(message) == ("model.init_args.lr", "Expected a <class 'float'>.")


def test_fit_with_overrides_writes_a_checkpoint_that_reloads_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cli = run_lightning_cli(
        [
            "fit",
            "--config",
            "quickstart",
            "--trainer.max_epochs",
            "2",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.current_epoch == 2
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    reloaded = ClassifierModule.load_from_checkpoint(ckpt).eval()
    original = ClassifierModule.load_from_checkpoint(ckpt).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), original(x), rtol=0, atol=0)
    trained = cli.model.eval()
    best_state = torch.load(ckpt, weights_only=False)["state_dict"]
    trained.load_state_dict(best_state)
    torch.testing.assert_close(reloaded(x), trained(x), rtol=0, atol=0)


@pytest.mark.slow
def test_quickstart_reaches_95_percent_test_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cli = run_lightning_cli(
        [
            "fit",
            "--config",
            "recipes/quickstart.yaml",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.callback_metrics["test_acc"].item() >= 0.95


def test_console_script_runs(tmp_path):
    relief = shutil.which("relief", path=str(Path(sys.executable).parent))
    assert relief is not None, "the relief console script is not installed"
    result = subprocess.run([relief, "recipes"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "quickstart" in result.stdout
