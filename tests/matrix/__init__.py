"""The plugin × zoo-model coverage matrix: one ``cells_<plugin>.py`` per plugin.

Each cells module defines
- ``PLUGIN``: the plugin's name as a user knows it;
- ``EXPECTED``: for every model of ``tests/zoo.py``, either ``WORKS`` or
  ``Raises(error_type, module_path, layer_type)``;
- ``check(zoo_model, tmp_path)``: apply the plugin and verify the result against a
  reference, raising the plugin's typed error where it does not apply;
- optionally ``SLOW``: the models whose cell is marked ``slow``, and
  ``PENDING``: models whose cell is known to fail today, with the reason (run as strict xfail,
  so fixing it flips the test red until the entry is removed).

``tests/test_coverage_matrix.py`` runs every cell; ``python tests/matrix/render.py``
writes ``docs/coverage.md`` from the same tables (a test keeps the two equal).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Works:
    """The plugin applies and its result is verified against a reference."""

    def __str__(self) -> str:
        return "works"


WORKS = Works()


@dataclass(frozen=True)
class Raises:
    """The plugin raises ``error`` at construction or setup, naming ``module_path`` and ``layer_type``."""

    error: type[Exception]
    module_path: str
    layer_type: str

    def __str__(self) -> str:
        return f"{self.error.__name__}: `{self.module_path}` ({self.layer_type})"


def cell_modules() -> list[ModuleType]:
    """Every ``cells_*`` module of this package, sorted by name."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name.startswith("cells_"))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
