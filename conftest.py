"""Doctests: every module of the package that shows a ``>>>`` example must have it collected and run.

``--doctest-modules`` (pyproject) collects the examples; this check makes a run over the
package fail when a module's examples would silently not run (an example outside a docstring,
a module pytest cannot import, a file left out of collection).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

PACKAGE = Path(__file__).resolve().parent / "lightning_relief"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
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
