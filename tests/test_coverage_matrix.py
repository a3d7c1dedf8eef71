"""Every plugin × every zoo model: works and is verified, or raises a typed error naming the layer (see tests/matrix/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrix import WORKS, Raises, cell_modules
from matrix.render import render
from zoo import ZOO

MODULES = cell_modules()


def _cases():
    for module in MODULES:
        for name in ZOO:
            marks = []
            if name in getattr(module, "SLOW", ()):
                marks.append(pytest.mark.slow)
            if name in getattr(module, "PENDING", {}):
                marks.append(pytest.mark.xfail(reason=module.PENDING[name], strict=True))
            yield pytest.param(module, name, marks=marks, id=f"{module.__name__.split('.cells_')[-1]}-{name}")


@pytest.mark.parametrize(("cells", "name"), list(_cases()))
def test_cell(cells, name, tmp_path, seed):
    expected = cells.EXPECTED[name]
    if expected is WORKS:
        cells.check(ZOO[name], tmp_path)
        return
    assert isinstance(expected, Raises)
    with pytest.raises(expected.error) as info:
        cells.check(ZOO[name], tmp_path)
    message = str(info.value)
    assert f"'{expected.module_path}'" in message or f"`{expected.module_path}`" in message, message
    assert expected.layer_type in message, message


@pytest.mark.parametrize("cells", MODULES, ids=lambda m: m.__name__.split(".cells_")[-1])
def test_every_zoo_model_has_a_cell(cells):
    assert set(cells.EXPECTED) == set(ZOO), f"{cells.__name__}: cells for {sorted(set(ZOO) ^ set(cells.EXPECTED))}"
    assert set(getattr(cells, "PENDING", {})) <= set(ZOO)


def test_docs_coverage_page_is_generated_from_these_tables():
    page = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"
    assert page.read_text() == render(), "docs/coverage.md is stale: run python tests/matrix/render.py > docs/coverage.md"
