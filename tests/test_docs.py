"""README's commands name real things and the public API re-exports what it lists.

Docstring examples run under ``--doctest-modules`` (pyproject); tests/conftest.py fails a run
over the package when a module's examples were not collected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
