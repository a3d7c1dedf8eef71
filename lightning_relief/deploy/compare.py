"""Latency of one model relative to another, timed in alternation.

A shared or throttled CPU runs the same compiled code at different speeds from
one second to the next (seen here on an idle 2-core VM: one ResNet-20 build
timed 5.3 ms, then 3.9 ms a second later). A budget that is a fraction of the
original model's latency only needs the *ratio*, and a ratio taken side by side
is steadier: ``compare_latency`` alternates ``rounds`` short timings of the
candidate and the reference and reports the ratio of their fastest rounds.
Interference only ever adds time, and it does not slow two different programs
alike (an int8 and a float32 build drifted apart by 20 % here), so the fastest
round of each, both taken in the same stretch of time, is the figure that
repeats. Ratios are cached by the two graphs' structure, target and tuning.

>>> import torch
>>> from lightning_relief.deploy import compare_latency
>>> small, large = torch.nn.Linear(64, 64), torch.nn.Linear(64, 2048)
>>> result = compare_latency(large, small, torch.zeros(1, 64), rounds=5, number=20, cache=False)
>>> result.ratio == min(result.candidate_rounds_ms) / min(result.reference_rounds_ms)
True
>>> len(result.ratios)
5
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_relief.deploy.artifact import CompiledModel
from lightning_relief.deploy.backend import Artifact
from lightning_relief.deploy.cache import JsonCache, default_cache_dir
from lightning_relief.deploy.frontend import as_input_tuple, to_relax
from lightning_relief.deploy.latency import latency_key
from lightning_relief.deploy.targets import TargetLike
from lightning_relief.deploy.tuning import TuningConfig


@dataclass(frozen=True)
class LatencyRatio:
    """``ratio``: fastest candidate round over fastest reference round; every round kept (ms)."""

    ratio: float
    candidate_rounds_ms: tuple[float, ...]
    reference_rounds_ms: tuple[float, ...]
    cached: bool

    @property
    def ratios(self) -> tuple[float, ...]:
        """Per-round ratios: their spread shows how much the machine drifted."""
        return tuple(c / r for c, r in zip(self.candidate_rounds_ms, self.reference_rounds_ms))

    @property
    def candidate_ms(self) -> float:
        return min(self.candidate_rounds_ms)

    @property
    def reference_ms(self) -> float:
        return min(self.reference_rounds_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "candidate_rounds_ms": list(self.candidate_rounds_ms),
            "reference_rounds_ms": list(self.reference_rounds_ms),
        }


def _prepare(model: Any, inputs: tuple, target: TargetLike, tuning: TuningConfig | None):
    """(graph, compiled-or-None, key part) of a module or an already compiled model; another
    backend's artifact has no TVM graph hash to key a cache with (key ``None``)."""
    if isinstance(model, Artifact) and not isinstance(model, (CompiledModel, nn.Module)):
        return None, model, None
    if isinstance(model, CompiledModel):
        meta = model.metadata
        specs = [{"shape": list(x.shape), "dtype": str(x.numpy().dtype)} for x in inputs]
        return None, model, latency_key(meta["graph_hash"], specs, meta["target"], TuningConfig.coerce(meta.get("tuning")), None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, a CompiledModel or a backend's Artifact, got {type(model).__name__}")
    graph = to_relax(model, inputs, dynamic_batch=False)
    return graph, None, latency_key(graph.graph_hash, graph.inputs, target, tuning, None)


def compare_latency(
    candidate: nn.Module | CompiledModel | Artifact,
    reference: nn.Module | CompiledModel | Artifact,
    example_inputs: Any,
    target: TargetLike = "llvm",
    rounds: int = 10,
    number: int = 10,
    tuning: TuningConfig | int | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    cache: bool = True,
    min_round_ms: int = 20,
    min_seconds: float = 0.0,
) -> LatencyRatio:
    """Time ``candidate`` against ``reference`` in ``rounds`` alternating rounds of ``number`` runs.

    A round runs for at least ``min_round_ms`` (more runs for fast models), so that a timer tick
    or a single interruption does not decide it. Rounds go on until ``min_seconds`` have passed:
    slow spells of a shared machine last seconds, and the fastest round must fall outside one.

    Modules are compiled (static batch, tuned if ``tuning``); pass a :class:`CompiledModel` as
    ``reference`` to compile it once for many candidates; an artifact of another backend
    (:class:`~lightning_relief.deploy.backend.Artifact`) is timed by its own ``time``. The ratio is
    cached under ``cache_dir`` (default ``<cache dir>/latency_ratio``) unless ``cache=False`` or an
    artifact of another backend is in it.
    """
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(number, int) or number < 1:
        raise ValueError(f"rounds and number must be integers >= 1, got {rounds!r} and {number!r}")
    inputs = as_input_tuple(example_inputs)
    config = TuningConfig.coerce(tuning)
    cand_graph, cand_compiled, cand_key = _prepare(candidate, inputs, target, config)
    ref_graph, ref_compiled, ref_key = _prepare(reference, inputs, target, config)
    keyed = cand_key is not None and ref_key is not None
    key = {"candidate": cand_key, "reference": ref_key["graph"]} if keyed else {}
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latency_ratio"
    store = JsonCache(folder) if cache and keyed else None
    hit = store.get(key) if store is not None else None
    if hit is not None and len(hit["candidate_rounds_ms"]) >= rounds:  # min_seconds only ever adds rounds
        return LatencyRatio(hit["ratio"], tuple(hit["candidate_rounds_ms"]), tuple(hit["reference_rounds_ms"]), cached=True)
    from lightning_relief.deploy.compile import build_graph

    cand_compiled = cand_compiled or build_graph(cand_graph, target, config)
    ref_compiled = ref_compiled or build_graph(ref_graph, target, config)
    cand_ms: list[float] = []
    ref_ms: list[float] = []
    start = time.perf_counter()
    while len(cand_ms) < rounds or time.perf_counter() - start < min_seconds:
        # one timing each, back to back: both see the same state of the machine
        cand_ms.append(statistics.fmean(cand_compiled.time(*inputs, repeat=1, number=number, min_repeat_ms=min_round_ms)) * 1e3)
        ref_ms.append(statistics.fmean(ref_compiled.time(*inputs, repeat=1, number=number, min_repeat_ms=min_round_ms)) * 1e3)
    result = LatencyRatio(min(cand_ms) / min(ref_ms), tuple(cand_ms), tuple(ref_ms), cached=False)
    if store is not None:
        store.put(key, result.as_dict())
    return result
