"""Measured latency on the target: TVM's time evaluator, cached on disk.

``measure_latency`` compiles (tuned, if asked) and times a model, locally or on
a remote board over TVM RPC. Results are cached by (graph hash, input shapes,
target, tuning database, remote device), so a search that meets the same
candidate twice, or a later run, gets the figure without compiling. The graph
hash covers structure and shapes, not weight values: retrained weights of the
same architecture share an entry. The compression search
(``SensitivityPruningCallback``) uses this for whole candidate models and
:class:`~lightning_relief.deploy.layer_table.LayerLatencyTable` for layers.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_relief.deploy.artifact import CompiledModel
from lightning_relief.deploy.cache import JsonCache, default_cache_dir
from lightning_relief.deploy.frontend import as_input_tuple, to_relax
from lightning_relief.deploy.targets import TargetLike, target_key
from lightning_relief.deploy.tuning import TuningConfig

CACHE_VERSION = 1


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one call, in milliseconds, from ``repeat`` means of ``number`` runs each."""

    median_ms: float
    iqr_ms: float
    std_ms: float
    mean_ms: float
    min_ms: float
    repeat: int
    number: int
    cached: bool
    tuned: bool
    target: str
    key: str
    samples_ms: tuple[float, ...]

    @classmethod
    def from_seconds(cls, seconds: list[float], **fields: Any) -> LatencyResult:
        ms = [s * 1e3 for s in seconds]
        q1, q3 = np.percentile(ms, [25, 75]) if len(ms) > 1 else (ms[0], ms[0])
        return cls(
            median_ms=float(statistics.median(ms)),
            iqr_ms=float(q3 - q1),
            std_ms=float(statistics.pstdev(ms)),
            mean_ms=float(statistics.fmean(ms)),
            min_ms=float(min(ms)),
            samples_ms=tuple(float(m) for m in ms),
            **fields,
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], cached: bool) -> LatencyResult:
        d = dict(d, cached=cached)
        d["samples_ms"] = tuple(d["samples_ms"])
        return cls(**d)

    def __str__(self) -> str:
        flag = ", cached" if self.cached else ""
        return f"{self.median_ms:.4f} ms (IQR {self.iqr_ms:.4f}, {self.repeat}x{self.number}{flag})"


def _validate(repeat: int, number: int) -> None:
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"number must be an integer >= 1, got {number!r}")


def _cache(cache_dir: str | os.PathLike | None) -> JsonCache:
    return JsonCache(Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latency")


def latency_key(
    graph_hash: str, inputs: list[dict[str, Any]], target: TargetLike, tuning: TuningConfig | None, remote: Any
) -> dict[str, Any]:
    return {
        "v": CACHE_VERSION,
        "graph": graph_hash,
        "inputs": [(i["shape"], i["dtype"]) for i in inputs],
        "target": target_key(target),
        "tuning": tuning.signature() if tuning is not None else None,
        "remote": remote.cache_id() if remote is not None else None,
    }


def time_compiled(compiled: CompiledModel, inputs: tuple, repeat: int, number: int, remote: Any = None) -> list[float]:
    """Seconds per run (one entry per repeat), locally or on ``remote``."""
    if remote is not None:
        return remote.time(compiled, inputs, repeat=repeat, number=number)
    return compiled.time(*inputs, repeat=repeat, number=number)


def measure_latency(
    model_or_compiled: nn.Module | CompiledModel,
    example_inputs: Any,
    target: TargetLike = "llvm",
    repeat: int = 10,
    number: int = 10,
    cache_dir: str | os.PathLike | None = None,
    tuning: TuningConfig | int | dict | None = None,
    *,
    cache: bool = True,
    remote: Any = None,
) -> LatencyResult:
    """Median latency (ms) of ``model_or_compiled`` on ``example_inputs``' shapes.

    Args:
        model_or_compiled: an ``nn.Module`` (compiled here, with a static batch) or a
            :class:`CompiledModel` (its own target and tuning are used).
        example_inputs: a tensor/array or a tuple of them; their shapes are measured.
        target: where to compile for (ignored for a ``CompiledModel``).
        repeat, number: the time evaluator takes ``repeat`` means of ``number`` runs.
        cache_dir: cache folder (default ``<cache dir>/latency``); ``cache=False`` skips it.
        tuning: ``None`` (untuned), a :class:`TuningConfig`, or an int trial budget.
        remote: a :class:`~lightning_relief.deploy.rpc.RemoteDevice`: compile for its
            target, upload over RPC, and time there.

    >>> import torch
    >>> from lightning_relief.deploy import measure_latency
    >>> result = measure_latency(torch.nn.Linear(8, 4), torch.zeros(1, 8), repeat=3, number=5, cache=False)
    >>> result.median_ms > 0
    True
    """
    _validate(repeat, number)
    store = _cache(cache_dir) if cache else None
    inputs = as_input_tuple(example_inputs)
    if remote is not None:
        target = remote.target
    if isinstance(model_or_compiled, CompiledModel):
        compiled = model_or_compiled
        meta = compiled.metadata
        config = TuningConfig.coerce(meta.get("tuning"))
        specs = [{"shape": list(x.shape), "dtype": str(x.numpy().dtype)} for x in inputs]
        key = latency_key(meta["graph_hash"], specs, meta["target"], config, remote)
        target = meta["target"]
    elif isinstance(model_or_compiled, nn.Module):
        compiled = None
        config = TuningConfig.coerce(tuning)
        graph = to_relax(model_or_compiled, inputs, dynamic_batch=False)
        key = latency_key(graph.graph_hash, graph.inputs, target, config, remote)
    else:
        raise TypeError(f"model_or_compiled must be an nn.Module or a CompiledModel, got {type(model_or_compiled).__name__}")
    hit = store.get(key) if store is not None else None
    if hit is not None and hit.get("repeat", 0) >= repeat:
        return LatencyResult.from_dict(hit, cached=True)
    if compiled is None:
        from lightning_relief.deploy.compile import build_graph

        compiled = build_graph(graph, target, config)
    seconds = time_compiled(compiled, inputs, repeat, number, remote)
    result = LatencyResult.from_seconds(
        seconds,
        repeat=repeat,
        number=number,
        cached=False,
        tuned=config is not None,
        target=target_key(target),
        key=str(key["graph"]),
    )
    if store is not None:
        store.put(key, result.as_dict())
    return result
