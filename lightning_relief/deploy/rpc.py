"""Remote targets through TVM's own RPC (a server on the board, optionally a tracker).

Cross-compile for the board's target, upload the library, and run or time it
there::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090            # on the board
    remote = RemoteDevice("192.168.1.20", 9090,
                          target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
                          cross_compiler="aarch64-linux-gnu-g++")
    measure_latency(model, x, remote=remote)

With a tracker (``python -m tvm.exec.rpc_tracker``) pass its address and the
board's ``key``. :func:`local_rpc_server` starts a server on loopback for tests
and local runs; it stops when the ``with`` block ends or after ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, rpc

from lightning_relief.deploy.artifact import CompiledModel, _flatten_tvm, _to_numpy
from lightning_relief.deploy.errors import DeployError
from lightning_relief.deploy.targets import TargetLike, device_for, target_dict


@dataclass
class RemoteDevice:
    """A board reached over TVM RPC: a server at ``host:port``, or a tracker there with ``key``.

    Args:
        host, port: the RPC server (or the tracker when ``key`` is given).
        key: the device key registered with the tracker; ``None`` connects to a server directly.
        target: what to compile for (the board's CPU), e.g. ``{"kind": "llvm", "mtriple": ...}``.
        cross_compiler: a C++ cross compiler (``"aarch64-linux-gnu-g++"``) to link the library
            for the board; ``None`` links with the host's compiler.
        session_timeout: seconds a session may last (0: no limit).
    """

    host: str = "127.0.0.1"
    port: int = 9090
    key: str | None = None
    target: TargetLike = "llvm"
    cross_compiler: str | None = None
    session_timeout: int = 0
    priority: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        target_dict(self.target)  # fail early on a bad target

    def cache_id(self) -> str:
        via = f"tracker:{self.key}" if self.key else "server"
        return f"{via}@{self.host}:{self.port}"

    def connect(self, retries: int = 5) -> rpc.RPCSession:
        """A new session; retried briefly because a server finishing the last session refuses new ones."""
        for attempt in range(retries):
            try:
                if self.key:
                    tracker = rpc.connect_tracker(self.host, self.port)
                    return tracker.request(self.key, priority=self.priority, session_timeout=self.session_timeout)
                return rpc.connect(self.host, self.port, session_timeout=self.session_timeout)
            except Exception as err:  # TVM raises plain RuntimeErrors/TVMErrors
                if attempt == retries - 1:
                    raise DeployError(f"cannot reach the RPC {self.cache_id()}: {str(err).splitlines()[-1]}") from err
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _load(self, compiled: CompiledModel) -> tuple[rpc.RPCSession, Any, relax.VirtualMachine, list[Any]]:
        session = self.connect()
        fcompile = None
        if self.cross_compiler:
            from tvm.contrib import cc

            fcompile = cc.cross_compiler(self.cross_compiler)
        with tempfile.TemporaryDirectory() as tmp:
            library = Path(tmp) / "relief_model.so"
            compiled.export_library(library, cross_compiler=fcompile)
            session.upload(str(library))
        remote_module = session.load_module("relief_model.so")
        device = device_for(self.target, session)
        vm = relax.VirtualMachine(remote_module, device)
        if compiled.metadata.get("transform_params"):
            # pre-packing runs on the host (it needs the same CPU family); boards of another
            # architecture need TuningConfig(weight_prepack=False)
            host_params = [p.numpy() for p in compiled.device_params()]
        else:
            host_params = compiled.params
        params = [tvm.runtime.tensor(p, device) for p in host_params]
        return session, device, vm, params

    def run(self, compiled: CompiledModel, *inputs: Any) -> list[np.ndarray]:
        """Run on the board; returns the outputs as numpy arrays."""
        arrays = [np.ascontiguousarray(_to_numpy(x)[0]) for x in inputs]
        compiled.check_inputs(arrays)
        _session, device, vm, params = self._load(compiled)
        vm.set_input("main", *[tvm.runtime.tensor(a, device) for a in arrays], *params)
        vm.invoke_stateful("main")
        outputs = [o.numpy() for o in _flatten_tvm(vm.get_outputs("main"))]
        del vm, params, _session  # end the session now: a server serves one at a time
        gc.collect()
        return outputs

    def time(self, compiled: CompiledModel, inputs: Any, repeat: int = 10, number: int = 10) -> list[float]:
        """Seconds per run on the board (``repeat`` means of ``number`` runs)."""
        arrays = [np.ascontiguousarray(_to_numpy(x)[0]) for x in inputs]
        compiled.check_inputs(arrays)
        _session, device, vm, params = self._load(compiled)
        vm.set_input("main", *[tvm.runtime.tensor(a, device) for a in arrays], *params)
        timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
        seconds = [float(t) for t in timer("main").results]
        del timer, vm, params, _session
        gc.collect()
        return seconds


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_rpc_server(
    host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 300.0, target: TargetLike = "llvm"
) -> Iterator[RemoteDevice]:
    """Start ``python -m tvm.exec.rpc_server`` on ``host`` and yield a :class:`RemoteDevice` for it.

    The server is stopped when the block ends, and in any case after ``timeout_s``::

        with local_rpc_server(timeout_s=120) as remote:
            print(measure_latency(model, x, remote=remote))
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"local_rpc_server binds to loopback only, got host={host!r}")
    port = port or _free_port(host)
    command = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port), "--port-end", str(port + 1)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ready = threading.Event()
    log: list[str] = []

    def read_log() -> None:  # the server logs "bind to host:port" once it listens
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if "bind to" in line:
                ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()

    def stop() -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the server's own group: it forks a child per session
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    watchdog = threading.Timer(timeout_s, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if proc.poll() is not None:
                raise DeployError(f"the RPC server exited with code {proc.returncode}: {' | '.join(log[-3:])}")
            if time.monotonic() > deadline:
                raise DeployError(f"the RPC server did not listen on {host}:{port} within 60 s")
        yield RemoteDevice(host, port, target=target)
    finally:
        watchdog.cancel()
        stop()
        reader.join(timeout=5)
