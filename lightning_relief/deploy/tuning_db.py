"""The MetaSchedule tuning database on disk: one user at a time, repaired after a crash.

MetaSchedule's ``JSONDatabase`` is two append-only files of JSON lines, and a
tuning record names its workload by line number in ``database_workload.json``.
Two processes appending at once interleave lines and numbers; a kill during an
append leaves a partial last line; either way TVM fails on every later load of
the folder (``Check failed: json_array->size() == 2``). So every use of a
database folder (tuning, then applying it) holds an exclusive lock on
``WORK_DIR/.relief.lock``, and before the files are opened they are checked
line by line: workloads are kept up to the first unreadable line (the line
numbers after it can no longer be trusted), records are kept when they parse
and name a kept workload; if TVM still cannot open the database (a record
filed under another process's workload number), each record is parsed by TVM
against its workload and those that fail are dropped. A repair rewrites the
files atomically and is reported as a warning; what was dropped is tuned again.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from lightning_relief.atomic import atomic_write_text, file_lock

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LOCK = ".relief.lock"


def _pair(line: str) -> list | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, list) and len(value) == 2 else None


def _opens(workloads: list[str], records: list[str]) -> bool:
    """Whether TVM's JSONDatabase loads these lines (it checks every record against its workload)."""
    import tempfile

    from tvm.s_tir.meta_schedule.database import JSONDatabase

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / WORKLOADS).write_text("".join(line + "\n" for line in workloads))
        (Path(scratch) / RECORDS).write_text("".join(line + "\n" for line in records))
        try:
            JSONDatabase(work_dir=scratch)
        except Exception:  # TVM raises RuntimeError/TVMError with its own message
            return False
    return True


def _records_tvm_accepts(workloads: list[str], records: list[str]) -> list[str]:
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    parsed = [Workload.from_json(json.loads(line)) for line in workloads]
    kept = []
    for line in records:
        index, record = json.loads(line)
        try:
            TuningRecord.from_json(record, parsed[index])
        except Exception:  # a record that does not fit its workload
            continue
        kept.append(line)
    return kept


def repair_database(work_dir: str | os.PathLike) -> int:
    """Drop the lines of a tuning database that TVM could not load; returns how many were dropped."""
    work_dir = Path(work_dir)
    workload_path, record_path = work_dir / WORKLOADS, work_dir / RECORDS
    workloads = workload_path.read_text().splitlines() if workload_path.exists() else []
    records = record_path.read_text().splitlines() if record_path.exists() else []
    kept_workloads: list[str] = []
    for line in workloads:
        pair = _pair(line)
        if pair is None or not all(isinstance(v, str) for v in pair):
            break
        kept_workloads.append(line)
    kept_records = []
    for line in records:
        pair = _pair(line)
        if pair is not None and isinstance(pair[0], int) and 0 <= pair[0] < len(kept_workloads) and isinstance(pair[1], list):
            kept_records.append(line)
    if kept_workloads and not _opens(kept_workloads, kept_records):
        kept_records = _records_tvm_accepts(kept_workloads, kept_records)
    dropped = len(workloads) - len(kept_workloads) + len(records) - len(kept_records)
    if dropped:
        warnings.warn(
            f"tuning database {work_dir} had {dropped} unreadable or orphaned line(s) (a crash or an unlocked "
            "concurrent writer); they were dropped and those operators will be tuned again",
            stacklevel=2,
        )
        atomic_write_text(workload_path, "".join(line + "\n" for line in kept_workloads))
        atomic_write_text(record_path, "".join(line + "\n" for line in kept_records))
    return dropped


@contextlib.contextmanager
def locked_database(work_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the database folder's lock, with the database repaired, for tuning or applying it."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(work_dir / LOCK):
        repair_database(work_dir)
        yield work_dir
