"""The machine a benchmark ran on, for its results JSON (timings mean nothing without it)."""

from __future__ import annotations

import os
import platform
import sys

import torch


def machine_info() -> dict:
    """Processor, cores, threads and library versions; TVM and Lightning when importable."""
    info = {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for name in ("lightning", "tvm"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def add_device_argument(parser) -> None:
    """``--device cpu|cuda`` (default cpu): where the models run and are timed."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run and time the models on this device (results files get a _cuda suffix)",
    )


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``; exits with a message when CUDA is asked for and absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels, so that a timer around them measures them (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device | str) -> dict:
    """The accelerator a run used, for its results JSON."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": device.type}
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
