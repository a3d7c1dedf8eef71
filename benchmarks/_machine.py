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
