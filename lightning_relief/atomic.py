"""Files that survive a kill at any moment and several writers at once.

Every cache entry and store is written to a temp file with a unique name next
to its destination (``.NAME.PID.RANDOM.tmp``), flushed to disk, and moved over
the destination with ``os.replace``, which is atomic on POSIX and Windows: a
reader sees the old file or the new one, never half of one, and two writers
never share a temp file. Temp files left by a killed writer are removed by the
next writer in that folder once their process is gone. Stores that are updated
in place (MetaSchedule's tuning database) are guarded by :func:`file_lock`.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_bytes(folder / "entry.json", b'{"a": 1}')
>>> (folder / "entry.json").read_bytes(), sorted(p.name for p in folder.iterdir())
(b'{"a": 1}', ['entry.json'])
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: temp files must not stay 0600


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` through a binary file object; it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(write: Callable[[BinaryIO], Any], path: str | os.PathLike) -> None:
    """``write(file_object)`` into ``path`` atomically (e.g. ``lambda f: torch.save(obj, f)``)."""
    with atomic_open(path) as f:
        write(f)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (the writer of a temp file or staging folder)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, min_age_s: float = 1.0) -> list[Path]:
    """Remove temp files in ``folder`` whose writer process no longer exists; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime >= min_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


_locks: dict[str, tuple[threading.RLock, Any]] = {}
_locks_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` against other processes and threads (``timeout=-1`` waits).

    Re-entrant in one thread: a function that locks may call another that locks the same path.
    """
    from filelock import FileLock

    key = os.path.abspath(path)
    Path(key).parent.mkdir(parents=True, exist_ok=True)
    with _locks_guard:
        if key not in _locks:
            _locks[key] = (threading.RLock(), FileLock(key, thread_local=False))
        thread_lock, process_lock = _locks[key]
    if not thread_lock.acquire(timeout=timeout):
        raise TimeoutError(f"could not lock {key} within {timeout} s")
    try:
        with process_lock.acquire(timeout=timeout):
            yield
    finally:
        thread_lock.release()
