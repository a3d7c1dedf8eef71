"""The on-disk cache shared by latency measurements, layer tables and tuning.

Default location: ``$RELIEF_CACHE_DIR``, else ``./.relief_cache``. Entries are
small JSON files named by a hash of their key, written atomically, so several
processes (a search and a benchmark) can share one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
        except (OSError, json.JSONDecodeError):
            return None
        # a hash collision or an edited file must not return someone else's figure
        return entry.get("value") if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: Any, value: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "value": value}, f, default=str, indent=1)
        os.replace(tmp, self._path(key))

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0
