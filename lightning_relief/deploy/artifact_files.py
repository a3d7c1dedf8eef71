"""An artifact folder on disk: replaced atomically, recovered after a kill, checked before loading.

:meth:`CompiledModel.save` writes a complete new folder under a staging name,
then swaps it in with two renames (the old folder to ``.NAME.old``, the new one
to ``NAME``). A kill between them leaves only ``.NAME.old``; :func:`recover`
(run by ``load_compiled`` and by the next save) renames it back, and removes
staging folders whose writer process is gone. So a complete artifact is always
there, old or new.

``model.so`` is native code: loading it runs its initialisers. ``metadata.json``
records the SHA-256 of the library and of ``params.npz``, and :func:`verify`
checks them *before* the library is loaded, so a swapped or corrupt file is
refused instead of run. (This guards the folder's integrity; it cannot make an
artifact from an untrusted source safe, since whoever wrote the ``.so`` also
wrote its hash. See ``docs/security.md``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

from lightning_relief.atomic import pid_alive
from lightning_relief.deploy.errors import DeployError

HASHED = ("model.so", "params.npz")
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.staging$")


class ArtifactError(DeployError, ValueError):
    """An artifact folder that cannot be loaded: missing or corrupt files, bad metadata, hash mismatch."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    return {name: sha256(directory / name) for name in HASHED}


def old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def new_staging(target: Path) -> Path:
    """An empty folder next to ``target`` (normal permissions), named after this process."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.staging")
    staging.mkdir()
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Make the complete folder ``staging`` the artifact at ``target``; there is one at every instant."""
    old = old_path(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def recover(target: Path) -> None:
    """Undo what a killed :func:`swap_in` or save left: restore ``.NAME.old``, drop dead writers' staging."""
    old = old_path(target)
    if not target.exists() and old.is_dir():
        with contextlib.suppress(OSError):  # another process may be recovering it at the same moment
            old.rename(target)
            warnings.warn(f"artifact {target}: restored the previous version left by an interrupted save", stacklevel=3)
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = _STAGING.match(entry.name)
            if match and match["name"] == target.name and not pid_alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)


def read_metadata(directory: Path) -> dict[str, Any]:
    """``metadata.json``, checked for the fields loading needs."""
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{directory}/metadata.json is unreadable: {type(err).__name__}: {err}") from None
    problems = []
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{directory}/metadata.json must hold an object, got {type(metadata).__name__}")
    for key in ("inputs", "outputs"):
        specs = metadata.get(key)
        if not isinstance(specs, list) or not all(isinstance(s, dict) and {"name", "shape", "dtype"} <= s.keys() for s in specs):
            problems.append(f"'{key}' must be a list of {{name, shape, dtype}}")
    if not isinstance(metadata.get("target"), (str, dict)):
        problems.append("'target' is missing")
    if problems:
        raise ArtifactError(f"{directory}/metadata.json: " + "; ".join(problems))
    return metadata


def verify(directory: Path, metadata: dict[str, Any]) -> None:
    """Check the files against the hashes in the metadata before anything is loaded."""
    recorded = metadata.get("files")
    if recorded is None:
        warnings.warn(f"artifact {directory} has no file hashes (saved by an older version); loading it unchecked", stacklevel=3)
        return
    for name in HASHED:
        if not isinstance(recorded, dict) or recorded.get(name) != sha256(directory / name):
            raise ArtifactError(
                f"{directory}/{name} does not match the SHA-256 recorded in metadata.json; refusing to load it "
                "(the library is native code: re-export the artifact)"
            )
