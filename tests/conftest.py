"""Shared fixtures. Tests run with 2 xdist workers on 2 cores: one torch thread each."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import lightning as L
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    L.seed_everything(0, workers=True, verbose=False)
    return 0


@pytest.fixture
def digits():
    """The embedded digits at 8 px, set up."""
    from lightning_relief.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, size=8, seed=0)
    dm.setup()
    return dm


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, progress bar or summary (kwargs override)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def trainer_factory():
    return quiet_trainer


# -- devices: `pytest --device all` runs the device-dependent tests (those taking `device`) on every device
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="cpu",
        help="devices for tests that take the `device` fixture: cpu (default), cuda, or all (cpu, cuda, mps)",
    )


def _device_params(choice: str) -> list:
    names = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda", "mps"]}[choice]
    available = {
        "cpu": (True, ""),
        "cuda": (torch.cuda.is_available(), "CUDA is not available on this machine"),
        "mps": (torch.backends.mps.is_available(), "MPS is not available on this machine"),
    }
    params = []
    for name in names:
        ok, reason = available[name]
        if ok or name != "mps":  # a missing CUDA is reported as a skip; a missing MPS is not asked for
            params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=reason)))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _device_params(metafunc.config.getoption("--device")))


def device_trainer(device: str, **kwargs) -> L.Trainer:
    """:func:`quiet_trainer` on ``device`` (``deterministic`` only on the CPU: some CUDA kernels have no deterministic version and would raise)."""
    options: dict = dict(accelerator=device, devices=1)
    if device != "cpu":
        options["deterministic"] = False
    options.update(kwargs)
    return quiet_trainer(**options)


PACKAGE = Path(__file__).resolve().parents[1] / "lightning_relief"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """A run over the package fails when a module shows ``>>>`` examples that were not collected.

    ``--doctest-modules`` (pyproject) runs the examples; this catches the ones that would silently
    not run (an example outside a docstring, a module left out of collection).
    """
    from _pytest.doctest import DoctestItem

    if not config.getoption("doctestmodules"):
        return
    roots = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    if not any(root == PACKAGE or root in PACKAGE.parents for root in roots):
        return  # a run over some tests only
    collected = {Path(str(item.path)).resolve() for item in items if isinstance(item, DoctestItem)}
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if ">>> " in path.read_text() and path not in collected
    ]
    if missing:
        raise pytest.UsageError(f"these modules show >>> examples that --doctest-modules did not collect: {', '.join(missing)}")
