"""Every documented example runs: each ```python block of README.md and docs/*.md, and every recipe.

Blocks run as written, each on its own (a block must carry its imports), in a
scratch folder, with short settings: ``max_epochs=N`` becomes 1, MetaSchedule
``trials=N`` becomes 0 (the database is applied, nothing is tuned), ``repeats=N``
becomes 1, and Lightning's ``PL_TRAINER_*`` environment defaults limit every
Trainer to 2 batches per loop. Recipes run through the ``relief`` command with
``--trainer.max_epochs 1`` and 2 batches per loop. (``>>>`` examples in
docstrings are run by pytest's ``--doctest-modules``.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

SHORT = [
    (re.compile(r"\bmax_epochs=\d+"), "max_epochs=1"),
    (re.compile(r"\btrials=\d+"), "trials=0"),
    (re.compile(r"\brepeats=\d+"), "repeats=1"),
]
TRAINER_ENV = {
    "PL_TRAINER_LIMIT_TRAIN_BATCHES": "2",
    "PL_TRAINER_LIMIT_VAL_BATCHES": "2",
    "PL_TRAINER_LIMIT_TEST_BATCHES": "2",
    "PL_TRAINER_LIMIT_PREDICT_BATCHES": "2",
    "PL_TRAINER_ENABLE_PROGRESS_BAR": "False",
}
# blocks that compile with TVM, run aihwkit or search a compression take minutes even when short
SLOW_BLOCKS = {"docs/compression.md#1", "docs/deploy.md#1", "docs/analog.md#1", "docs/moment_propagation.md#1"}
# compression in a documented block or recipe searches small and times briefly: the fit is under test here (the
# recipes' settings are checked as shipped in test_sensitivity_pruning, the search's budget and timing in
# test_compress_engine); as written, the block and each compression recipe took 80-140 s, mostly the 6 s of
# side-by-side timing per candidate
SHORT_SEARCH = {"grow": 0, "candidates": 1, "max_rounds": 1, "recovery_steps": 5, "calibration_batches": 1}
QUICK_TIMING = {"repeat": 2, "number": 5, "compare_seconds": 0.0}
# blocks whose short form needs one more override to stay valid: (pattern, replacement)
EXTRA = {
    "README.md#3": [(re.compile(r"\bstart_epoch=\d+"), "start_epoch=0")],
    "docs/compression.md#1": [
        (re.compile(r"\bstart_epoch=\d+"), "start_epoch=0, " + ", ".join(f"{k}={v}" for k, v in SHORT_SEARCH.items())),
        # the callback built its LatencyMeter from metric="latency" as documented: only its timing is shortened
        (
            re.compile(r"^(compress = SensitivityPruningCallback\(.*?\)\n)", re.S | re.M),
            r"\1" + "".join(f"compress.meter.{k} = {v}\n" for k, v in QUICK_TIMING.items()),
        ),
    ],
}


def python_blocks() -> list:
    params = []
    for path in DOCS:
        blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)
        for i, code in enumerate(blocks, 1):
            name = f"{path.relative_to(ROOT)}#{i}"
            marks = [pytest.mark.slow] if name in SLOW_BLOCKS else []
            params.append(pytest.param(name, code, id=name, marks=marks))
    return params


def shorten(name: str, code: str) -> str:
    for pattern, replacement in SHORT + EXTRA.get(name, []):
        code = pattern.sub(replacement, code)
    return code


def test_every_doc_has_been_found():
    names = {p.values[0].split("#")[0] for p in python_blocks()}
    assert {"README.md", "docs/analog.md", "docs/compression.md", "docs/deploy.md"} <= names
    assert set(EXTRA) | SLOW_BLOCKS <= {p.values[0] for p in python_blocks()}, "a listed block no longer exists"


@pytest.mark.parametrize("name, code", python_blocks())
def test_doc_block_runs(name, code, tmp_path, monkeypatch):
    if "aihwkit" in code:  # built by `make install` (the analog extra); a venv without it cannot run the block
        pytest.importorskip("aihwkit")
    monkeypatch.chdir(tmp_path)
    for key, value in TRAINER_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RELIEF_CACHE_DIR", str(tmp_path / "cache"))
    exec(compile(shorten(name, code), name, "exec"), {"__name__": "__doc_example__"})


def _short_search(recipe: Path, dirpath: Path) -> Path:
    """The recipe with a small search; latency measured by a briefly timing meter given by ``class_path``."""
    config = yaml.safe_load(recipe.read_text())
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("SensitivityPruningCallback"):
            args = callback.setdefault("init_args", {})
            args.update(SHORT_SEARCH)
            if args.get("metric", "latency") == "latency":
                args["meter"] = {
                    "class_path": "lightning_relief.compress.latency.LatencyMeter",
                    "init_args": {
                        "target": args.get("target_device", "llvm"),
                        "cache_dir": args.get("cache_dir"),
                        **QUICK_TIMING,
                    },
                }
    short = dirpath / recipe.name
    short.write_text(yaml.safe_dump(config, sort_keys=False))
    return short


def recipes() -> list:
    params = []
    for recipe in RECIPES:
        marks = [] if recipe.stem == "quickstart" else [pytest.mark.slow]
        params.append(pytest.param(recipe, id=recipe.stem, marks=marks))
    return params


@pytest.mark.parametrize("recipe", recipes())
def test_recipe_runs_with_one_short_epoch(recipe, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RELIEF_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-c",
        "import sys; from lightning_relief.cli import main; sys.exit(main())",
        "fit",
        "--config",
        str(_short_search(recipe, tmp_path)),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.rglob("*.ckpt")), "the recipe saved no checkpoint"
