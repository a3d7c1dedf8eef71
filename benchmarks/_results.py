"""Where a benchmark writes: ``results/`` (committed) for full runs, ``results/quick/`` (ignored) for smoke runs,
so that a ``--quick`` check never overwrites the figures a closing note cites."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(name: str, quick: bool) -> Path:
    """``results/<name>``, or ``results/quick/<name>`` for a smoke run; the folder is created."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
