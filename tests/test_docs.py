"""The runnable examples in docstrings run, and README's commands name real things."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOCUMENTED_MODULES = [
    "lightning_relief",
    "lightning_relief.data.digits",
    "lightning_relief.data.synthetic",
    "lightning_relief.models.mlp",
    "lightning_relief.models.lenet",
    "lightning_relief.models.resnet",
    "lightning_relief.models.classifier",
    "lightning_relief.noise.models",
    "lightning_relief.noise.pcm",
    "lightning_relief.noise.schedules",
    "lightning_relief.noise.placement",
    "lightning_relief.noise.injector",
    "lightning_relief.noise.callback",
    "lightning_relief.strategies.analog_noise",
    "lightning_relief.deploy.compile",
    "lightning_relief.deploy.latency",
    "lightning_relief.deploy.quantized",
    "lightning_relief.deploy.parity",
    "lightning_relief.compress.bracket",
    "lightning_relief.deploy.compare",
]


@pytest.mark.parametrize("name", DOCUMENTED_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_one_of_them():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_public_api_reexports():
    import lightning_relief

    for name in lightning_relief.__all__[1:]:
        assert getattr(lightning_relief, name).__name__ == name
    with pytest.raises(AttributeError, match="NoSuchThing"):
        lightning_relief.NoSuchThing  # noqa: B018
