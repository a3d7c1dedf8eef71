"""The on-disk cache shared by latency measurements, layer tables and tuning.

Default location: ``$RELIEF_CACHE_DIR``, else ``./.relief_cache``. Entries are
small JSON files named by a hash of their key, written atomically (see
:mod:`lightning_relief.atomic`), so several processes (a search and a benchmark)
can share one cache; an unreadable entry counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning_relief.atomic import atomic_write_text

_ENV = "RELIEF_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(_ENV) or Path.cwd() / ".relief_cache")


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


class JsonCache:
    """``get``/``put`` of JSON-able values under ``directory``, keyed by any JSON-able key."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def _path(self, key: Any) -> Path:
        return self.directory / f"{key_hash(key)}.json"

    def get(self, key: Any) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):  # missing, or truncated/corrupt (then rewritten by the next put)
            return None
        if not isinstance(entry, dict):
            return None
        # a hash collision or an edited file must not return someone else's figure
        return entry.get("value") if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: Any, value: dict[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps({"key": key, "value": value}, default=str, indent=1))

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0
