"""Kills, truncated files and concurrent writers: the next run recovers and nothing saved is lost.

Processes are killed with SIGKILL (no cleanup handler runs) while they write;
concurrent writers are real threads and processes sharing one folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lightning_relief.atomic import atomic_write_bytes, clean_stale_temps
from lightning_relief.compress.sensitivity import SensitivityTable, cached_sensitivity
from lightning_relief.deploy.cache import JsonCache

ROOT = Path(__file__).resolve().parents[1]


def _table(n: int = 4, scale: float = 1.0) -> SensitivityTable:
    return SensitivityTable(
        prune={f"layer{i}": {0.25: scale * i, 0.5: scale * 2 * i} for i in range(n)},
        quant={f"layer{i}": {4: scale * 0.1 * i, 8: scale * 0.01 * i} for i in range(n)},
        order={f"layer{i}": list(range(8)) for i in range(n)},
        seconds=1.5,
    )


def _python(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _no_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert not caught, [str(w.message) for w in caught]
    return result


# --- sensitivity cache ---------------------------------------------------------------------------------------


def test_sensitivity_cache_kill_during_write_loses_nothing_and_next_run_recovers(tmp_path):
    saved = _table(scale=2.0)
    cached_sensitivity(tmp_path, "saved", lambda: saved)
    # a table large enough that pickling it takes a while, so the kill lands mid-write
    writer = _python(f"""
        from lightning_relief.compress.sensitivity import SensitivityTable, cached_sensitivity
        big = SensitivityTable(prune={{f"l{{i}}": {{0.5: float(i)}} for i in range(400_000)}})
        cached_sensitivity({str(tmp_path)!r}, "new", lambda: big)
    """)
    _wait_for(lambda: any(p.name.startswith(".sensitivity-new.pt.") for p in tmp_path.iterdir()), proc=writer)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert not (tmp_path / "sensitivity-new.pt").exists()  # no half entry under the real name
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert temps  # the killed writer's temp file is left behind...
    for temp in temps:
        os.utime(temp, (time.time() - 3600,) * 2)
    table, hit = _no_warnings(lambda: cached_sensitivity(tmp_path, "new", lambda: _table()))
    assert not hit and table == _table()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # ...and removed by the next writer
    assert cached_sensitivity(tmp_path, "new", lambda: pytest.fail("recomputed")) == (_table(), True)
    assert cached_sensitivity(tmp_path, "saved", lambda: pytest.fail("lost")) == (saved, True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated (killed copy, full disk)
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(os.urandom(300)),
        lambda p: torch.save({"not": "a table"}, p),  # readable, wrong content
    ],
    ids=["truncated", "empty", "garbage", "wrong-content"],
)
def test_unreadable_sensitivity_entry_is_reported_once_and_recomputed(tmp_path, damage):
    cached_sensitivity(tmp_path, "k", lambda: _table())
    damage(tmp_path / "sensitivity-k.pt")
    calls = []

    def compute():
        calls.append(1)
        return _table(scale=3.0)

    with pytest.warns(UserWarning, match=r"sensitivity-k\.pt is unreadable .*recomputing it"):
        table, hit = cached_sensitivity(tmp_path, "k", compute)
    assert (table, hit, len(calls)) == (_table(scale=3.0), False, 1)
    assert _no_warnings(lambda: cached_sensitivity(tmp_path, "k", compute)) == (_table(scale=3.0), True)
    assert len(calls) == 1


def _cached_big_table(args: tuple[str, int]) -> str:
    folder, i = args
    big = SensitivityTable(prune={f"l{j}": {0.5: float(j)} for j in range(2000)})
    try:
        table, _ = cached_sensitivity(folder, f"k{i % 2}", lambda: big)
    except Exception as err:  # reported to the parent, which counts them
        return type(err).__name__
    return "ok" if table == big else "wrong table"


def test_sensitivity_cache_forty_concurrent_writers_in_eight_processes(tmp_path):
    """With one fixed temp name, 5 of these 40 calls failed (FileNotFoundError, EOFError)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(8) as pool:
        results = pool.map(_cached_big_table, [(str(tmp_path), i) for i in range(40)], chunksize=1)
    assert results == ["ok"] * 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity-k0.pt", "sensitivity-k1.pt"]


# --- JSON cache (latency, layer tables) ----------------------------------------------------------------------


def test_json_cache_concurrent_writers_and_corrupt_entries(tmp_path):
    cache = JsonCache(tmp_path)

    def work(i):
        cache.put({"k": i % 5}, {"ms": float(i % 5)})
        got = cache.get({"k": i % 5})
        assert got == {"ms": float(i % 5)}, got

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(200)))
    assert len(cache) == 5 and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    path = cache._path({"k": 0})
    for damage in (b'{"key": {"k": 0}, "val', b"[1, 2]", b"\xff\xfe"):
        path.write_bytes(damage)
        assert cache.get({"k": 0}) is None  # a miss, not a crash
        cache.put({"k": 0}, {"ms": 0.0})
        assert cache.get({"k": 0}) == {"ms": 0.0}


def test_atomic_files_keep_normal_permissions_and_clean_only_dead_writers(tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.json.{int(dead.stdout)}.0123abcd.tmp"
    live = tmp_path / f".a.json.{os.getpid()}.0123abcd.tmp"
    for p in (stale, live):
        p.write_bytes(b"partial")
    assert clean_stale_temps(tmp_path, min_age_s=0) == [stale]
    assert live.exists()


# --- MetaSchedule tuning database ----------------------------------------------------------------------------

TUNE = """
    import sys, torch
    torch.set_num_threads(1)
    from torch import nn
    from lightning_relief.deploy import compile_for_target, TuningConfig
    work, hidden, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(hidden)
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8)).eval()
    x = torch.randn(1, 16)
    compiled = compile_for_target(model, x, tuning=TuningConfig(trials=trials, work_dir=work, population_size=8, genetic_iters=1))
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    print("ok")
"""


def _tune(work: Path, hidden: int, trials: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(TUNE), str(work), str(hidden), str(trials)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "ok" in out, err[-3000:]
    return err


@pytest.mark.slow
def test_tuning_database_two_concurrent_tuners_then_kill_and_partial_line(tmp_path):
    """Unlocked, two tuners of different models in one folder crashed both and broke the folder for good."""
    work = tmp_path / "tuning"
    first, second = _tune(work, 32, 4), _tune(work, 64, 4)
    _finish(first), _finish(second)
    assert "unreadable or orphaned" not in _finish(_tune(work, 64, 0))  # the database opens and applies

    records = work / "database_tuning_record.json"
    before = records.read_text()
    killed = _tune(work, 96, 8)
    _wait_for(lambda: records.read_text() != before, timeout=600, proc=killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with records.open("a") as f:  # what a kill in the middle of an append leaves
        f.write('[0, [[["GetSBlock", [], ["mat')
    err = _finish(_tune(work, 96, 0))
    assert "unreadable or orphaned" in err  # reported, repaired, and the compile succeeds
    assert all(json.loads(line) for line in records.read_text().splitlines())
    assert "unreadable or orphaned" not in _finish(_tune(work, 32, 0))


# --- compiled artifacts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    from lightning_relief.deploy import compile_for_target

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    return model, compile_for_target(model, torch.zeros(1, 4))


def test_artifact_kill_between_the_two_renames_keeps_the_old_version(compiled, tmp_path):
    from lightning_relief.deploy import load_compiled
    from lightning_relief.deploy.artifact_files import old_path

    model, artifact = compiled
    target = artifact.save(tmp_path / "art")
    before = (target / "metadata.json").read_text()
    # the state a SIGKILL right after `target.rename(old)` leaves: the old folder aside, a complete staging one
    target.rename(old_path(target))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = tmp_path / f".art.{int(dead.stdout)}.0123abcd.staging"
    staging.mkdir()
    (staging / "model.so").write_bytes(b"half a library")
    with pytest.warns(UserWarning, match="restored the previous version"):
        loaded = load_compiled(target)
    assert (target / "metadata.json").read_text() == before
    assert not old_path(target).exists() and not staging.exists()
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model(x).detach(), atol=1e-5, rtol=1e-5)


def test_artifact_save_killed_midway_leaves_the_previous_artifact(compiled, tmp_path):
    model, artifact = compiled
    target = artifact.save(tmp_path / "art")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    writer = _python(f"""
        import numpy as np, time
        from lightning_relief.deploy import load_compiled
        import lightning_relief.deploy.artifact as artifact_module
        compiled = load_compiled({str(target)!r})
        def slow_savez(path, **arrays):  # the params are being written when the kill comes
            open(path, "wb").write(b"PK partial")
            print("writing", flush=True)
            time.sleep(60)
        artifact_module.np.savez = slow_savez
        compiled.save({str(target)!r})
    """)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    from lightning_relief.deploy import load_compiled

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    load_compiled(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the killed writer's staging folder is gone
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda d: (d / "model.so").write_bytes((d / "model.so").read_bytes()[:-16] + b"\0" * 16),
            "model.so does not match the SHA-256",
        ),
        (lambda d: np_save_wrong_shape(d), "params.npz does not match the SHA-256"),
        (lambda d: (d / "metadata.json").write_text('{"inputs": [{"na'), "metadata.json is unreadable"),
        (lambda d: (d / "metadata.json").write_text('{"target": "llvm"}'), "'inputs' must be a list"),
    ],
    ids=["swapped-library", "wrong-params", "truncated-metadata", "metadata-without-fields"],
)
def test_damaged_artifact_is_refused_before_the_library_loads(compiled, tmp_path, damage, words):
    from lightning_relief.deploy import load_compiled
    from lightning_relief.deploy.artifact_files import ArtifactError

    target = compiled[1].save(tmp_path / "art")
    damage(target)
    with pytest.raises(ArtifactError, match=words):
        load_compiled(target)


def np_save_wrong_shape(directory: Path) -> None:
    import numpy as np

    np.savez(directory / "params.npz", p0000=np.zeros((5, 5), "float32"), p0001=np.zeros(3, "float32"))
