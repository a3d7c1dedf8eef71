"""Untrusted recipes and checkpoints run no code.

Every payload below would create a marker file if anything it names were
imported and called, or if its pickle were unpickled with ``weights_only=False``;
each test checks the marker is absent and the error is the typed or one-line one.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_relief.cli import main as relief
from lightning_relief.cli.bounded_yaml import YAMLBoundsError, check
from lightning_relief.compress import load_compressed
from lightning_relief.errors import UntrustedClassPathError
from lightning_relief.models import MLP, ClassifierModule, build_model
from lightning_relief.nn.structure import REBUILD_STEPS, STRUCTURE_KEY
from lightning_relief.trust import resolve_class, trust_modules

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


class RunsCommand:
    """A pickle payload: unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a payload ran"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    """A real ClassifierModule checkpoint (MLP on 8x8 digits)."""
    from lightning_relief.data import DigitsDataModule

    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(ClassifierModule(MLP(hidden=(8,))), DigitsDataModule(size=8, batch_size=16))
    trainer.save_checkpoint(path)
    return path


def _tampered(good: Path, out: Path, change) -> Path:
    checkpoint = torch.load(good, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, out)
    return out


def _popen_spec(marker: Path) -> dict:
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


def _one_line_exit_2(capsys, call) -> str:
    with pytest.raises(SystemExit) as info:
        call()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- class paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, words",
    [
        ("subprocess.Popen", "not in a trusted package"),
        ("os.system", "not in a trusted package"),
        ("builtins.exec", "not in a trusted package"),
        ("lightning_relief.cli.export.fail", "not a subclass of torch.nn.modules.module.Module"),
        ("lightning_relief.errors.ReliefError", "not a subclass"),
        ("torch.nn.Module.__subclasses__", "not a 'package.module.Name' path"),
        ("lightning_relief.models.NoSuchNet", "cannot be imported"),
        (["lightning_relief.models.MLP"], "expected a dotted path string"),
    ],
)
def test_model_spec_refuses_everything_but_trusted_modules(path, words, marker):
    with pytest.raises(UntrustedClassPathError, match=re.escape(words)) as info:
        build_model({"class_path": path, "init_args": {"args": ["touch", str(marker)]}})
    assert info.value.key == "model.class_path"


def test_trusting_a_package_still_checks_the_type_before_calling(monkeypatch, marker):
    monkeypatch.setenv("RELIEF_TRUSTED_MODULES", "subprocess")
    with pytest.raises(UntrustedClassPathError, match="not a subclass of torch.nn"):
        build_model(_popen_spec(marker))
    # and a nested spec is checked with its own key
    with pytest.raises(UntrustedClassPathError, match=r"model\.init_args\.model\.class_path"):
        build_model({"class_path": "lightning_relief.BayesianModel", "init_args": {"model": _popen_spec(marker)}})


def test_user_packages_resolve_once_trusted(monkeypatch):
    with pytest.raises(UntrustedClassPathError, match="RELIEF_TRUSTED_MODULES=tests"):
        resolve_class("tests.zoo.Conv1dCNN", torch.nn.Module, key="k")
    monkeypatch.setenv("RELIEF_TRUSTED_MODULES", "tests.zoo, other")
    cls = resolve_class("tests.zoo.Conv1dCNN", torch.nn.Module, key="k")
    assert issubclass(cls, torch.nn.Module)
    with pytest.raises(ValueError, match="dotted identifiers"):
        trust_modules("not a package")


def test_every_recorded_structure_step_is_known():
    """A plugin that records a new kind of step must add it to REBUILD_STEPS, or its checkpoints won't load."""
    recorded = set()
    for source in (ROOT / "lightning_relief").rglob("*.py"):
        recorded.update(re.findall(r'^\s*_?(?:REBUILD|REPLAY)\w*\s*=\s*"([\w.]+:\w+)"', source.read_text(), re.M))
    assert recorded and recorded <= REBUILD_STEPS, recorded - REBUILD_STEPS
    for path in REBUILD_STEPS:  # and each resolves
        from lightning_relief.trust import resolve_function

        assert callable(resolve_function(path, "k", REBUILD_STEPS))


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoint_naming_popen_as_model_runs_nothing(good_ckpt, tmp_path, marker):
    def change(ckpt):
        ckpt["hyper_parameters"]["model"] = _popen_spec(marker)

    evil = _tampered(good_ckpt, tmp_path / "evil.ckpt", change)
    with pytest.raises(UntrustedClassPathError, match="subprocess.Popen"):
        ClassifierModule.load_from_checkpoint(evil)
    with pytest.raises(UntrustedClassPathError, match="subprocess.Popen"):
        load_compressed(ClassifierModule, evil)


@pytest.mark.parametrize("rebuild", ["os:system", "builtins:exec", "subprocess:run", "lightning_relief.cli.export:torch"])
def test_checkpoint_structure_step_outside_the_known_ones_runs_nothing(good_ckpt, tmp_path, marker, rebuild):
    def change(ckpt):
        ckpt[STRUCTURE_KEY] = [{"rebuild": rebuild, "spec": f"touch {marker}"}]

    evil = _tampered(good_ckpt, tmp_path / "evil.ckpt", change)
    with pytest.raises(UntrustedClassPathError, match="is refused"):
        ClassifierModule.load_from_checkpoint(evil)
    with pytest.raises(UntrustedClassPathError, match="is refused"):
        load_compressed(ClassifierModule, evil)


def test_pickle_payload_in_checkpoint_is_not_unpickled(good_ckpt, tmp_path, marker, capsys):
    def change(ckpt):
        ckpt["payload"] = RunsCommand(marker)

    evil = _tampered(good_ckpt, tmp_path / "evil.ckpt", change)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_compressed(ClassifierModule, evil)
    with pytest.raises(Exception, match="Weights only load failed"):
        ClassifierModule.load_from_checkpoint(evil)
    err = _one_line_exit_2(capsys, lambda: relief(["export", "--ckpt", str(evil), "--out", str(tmp_path / "art")]))
    assert "Weights only load failed" in err
    assert not (tmp_path / "art").exists()


def test_relief_export_refuses_popen_model_in_one_line(good_ckpt, tmp_path, marker, capsys):
    evil = _tampered(good_ckpt, tmp_path / "evil.ckpt", lambda c: c["hyper_parameters"].update(model=_popen_spec(marker)))
    err = _one_line_exit_2(capsys, lambda: relief(["export", "--ckpt", str(evil), "--out", str(tmp_path / "art")]))
    assert "subprocess.Popen" in err and "is refused" in err
    err = _one_line_exit_2(
        capsys,
        lambda: relief(
            ["export", "--ckpt", str(good_ckpt), "--out", str(tmp_path / "art"), "--module-class", "subprocess.Popen"]
        ),
    )
    assert "module-class" in err and "not a subclass of lightning" in err


def test_relief_robustness_refuses_popen_model_in_checkpoint(good_ckpt, tmp_path, marker, capsys):
    evil = _tampered(good_ckpt, tmp_path / "evil.ckpt", lambda c: c["hyper_parameters"].update(model=_popen_spec(marker)))
    err = _one_line_exit_2(
        capsys,
        lambda: relief(
            [
                "robustness",
                "--ckpt",
                str(evil),
                "--config",
                str(RECIPES / "vant_digits.yaml"),
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "rob"),
            ]
        ),
    )
    assert "subprocess.Popen" in err


# --- recipes -------------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, name: str, change) -> Path:
    config = yaml.safe_load((RECIPES / name).read_text())
    change(config)
    path = tmp_path / f"evil-{name}"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_recipe_with_popen_as_inner_model_runs_nothing(tmp_path, marker, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, "quickstart.yaml", lambda c: c["model"]["init_args"].update(model=_popen_spec(marker)))
    err = _one_line_exit_2(capsys, lambda: relief(["fit", "--config", str(recipe), "--trainer.max_epochs", "1"]))
    assert "subprocess.Popen" in err and "is refused" in err


@pytest.mark.parametrize(
    "where",
    [("data",), ("trainer", "strategy", "init_args", "noise"), ("trainer", "strategy", "init_args", "placement")],
)
def test_robustness_recipe_slots_are_typed_like_fit(tmp_path, marker, capsys, where, good_ckpt):
    def change(config):
        node = config
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = _popen_spec(marker)

    recipe = _recipe(tmp_path, "analog_pcm_digits.yaml", change)
    err = _one_line_exit_2(
        capsys, lambda: relief(["robustness", "--ckpt", str(good_ckpt), "--config", str(recipe), "--repeats", "1"])
    )
    assert ".".join(where) in err


class RejectsInSetup(L.Callback):
    """A callback that finds the configuration unusable when the run starts."""

    def setup(self, trainer, pl_module, stage):
        raise ValueError(f"needs max_epochs >= 5, got {trainer.max_epochs}")


def test_configuration_rejected_in_setup_is_one_line_and_leaves_no_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(
        tmp_path, "quickstart.yaml", lambda c: c["trainer"]["callbacks"].append({"class_path": f"{__name__}.RejectsInSetup"})
    )
    err = _one_line_exit_2(capsys, lambda: relief(["fit", "--config", str(recipe), "--trainer.max_epochs", "1"]))
    assert "ValueError: needs max_epochs >= 5, got 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [recipe.name]


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    "text, words",
    [
        (BOMB, "expands to more than"),
        ("a: &a [1, *a]\n", "recursive"),
        ("a: " + "[" * 80 + "]" * 80 + "\n", "nested deeper than 64"),
        ("a: " + "x" * (2 << 20) + "\n", "larger than"),
    ],
)
def test_bounded_yaml_rejects_bombs_depth_and_size_fast(tmp_path, capsys, text, words):
    assert len(BOMB) < 400
    start = time.perf_counter()
    with pytest.raises(YAMLBoundsError, match=words):
        check(text)
    assert time.perf_counter() - start < 0.5
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    err = _one_line_exit_2(capsys, lambda: relief(["fit", "--config", str(recipe)]))
    assert words in err and str(recipe) in err
    err = _one_line_exit_2(capsys, lambda: relief(["robustness", "--ckpt", str(recipe), "--config", str(recipe)]))
    assert words in err


def test_shipped_recipes_are_within_the_bounds():
    for recipe in RECIPES.glob("*.yaml"):
        check(recipe.read_text())


def test_no_load_in_the_package_unpickles_arbitrary_objects():
    offenders = []
    for source in (ROOT / "lightning_relief").rglob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if re.search(
                r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|(?<![\w.])pickle\.loads?\(|(?<![\w])yaml\.(unsafe_)?load\(",
                line,
            ):
                offenders.append(f"{source.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("noise, expected", [("pcm", "out_noise=0.06"), ("additive", "AdditiveGaussian")])
def test_robustness_noise_option_keeps_the_recipes_settings_of_that_noise(good_ckpt, tmp_path, noise, expected):
    """`--noise pcm` used to replace the recipe's PCMNoise(out_noise=0.06, ...) by a default PCMNoise()."""
    out = tmp_path / "rob"
    times_or_levels = ["--times", "1"] if noise == "pcm" else ["--levels", "0.1"]
    assert (
        relief(
            [
                "robustness",
                "--ckpt",
                str(good_ckpt),
                "--config",
                str(RECIPES / "analog_pcm_digits.yaml"),
                "--noise",
                noise,
                *times_or_levels,
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    [result] = out.glob("*.json")
    assert expected in json.loads(result.read_text())["noise"]
