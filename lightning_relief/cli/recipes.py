"""Finding, listing and showing the recipes shipped in ``recipes/``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

_ENV = "RELIEF_RECIPES"


def recipes_dir() -> Path:
    """``$RELIEF_RECIPES``, else ``./recipes``, else the source tree's ``recipes/``."""
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    local = Path.cwd() / "recipes"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "recipes"


def available() -> dict[str, Path]:
    directory = recipes_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))} if directory.is_dir() else {}


def describe(path: Path) -> str:
    """A recipe's description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve(value: str) -> Path | None:
    """A recipe path as given, or a shipped recipe's name (with or without ``.yaml``)."""
    path = Path(value)
    if path.is_file():
        return path
    return available().get(path.stem if path.suffix in (".yaml", ".yml") and path.parent == Path(".") else value)


def main(argv: Sequence[str]) -> int:
    recipes = available()
    if not argv or argv[0] == "list":
        width = max((len(n) for n in recipes), default=0)
        for name, path in recipes.items():
            print(f"{name:<{width}}  {describe(path)}")
        return 0
    if argv[0] == "show" and len(argv) == 2:
        found = resolve(argv[1])
        if found is None:
            print(f"relief: error: no recipe {argv[1]!r}; shipped: {', '.join(recipes) or 'none'}", file=sys.stderr)
            return 2
        sys.stdout.write(found.read_text())
        return 0
    print("usage: relief recipes [list | show NAME]", file=sys.stderr)
    return 2
