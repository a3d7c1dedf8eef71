"""Hardware-aware compression: sensitivity, cost, search and application of pruning + quantization.

The engine behind :class:`lightning_relief.callbacks.sensitivity_pruning.SensitivityPruningCallback`,
usable without a Trainer: :func:`compress` (or :func:`plan` then :func:`apply_plan`) a model for a
:class:`CompressionConfig` with a :class:`Meter` (:class:`AnalyticMeter`, :class:`LatencyMeter`).
Its pieces: :func:`analyze` a model, :func:`compute_sensitivity`, price policies with a
:class:`CostModel`, :func:`lagrangian_search` a policy and :func:`apply_policy` it.
"""

from lightning_relief.compress.apply import apply_policy, apply_pruning, recalibrate_batchnorm
from lightning_relief.compress.bracket import BudgetBracket
from lightning_relief.compress.checkpoint import load_compressed
from lightning_relief.compress.compiled import uncompiled
from lightning_relief.compress.cost import CostModel, LatencyCostModel, policy_cost
from lightning_relief.compress.engine import (
    CompressionConfig,
    CompressionResult,
    UnreachableTargetError,
    apply_plan,
    compress,
    plan,
)
from lightning_relief.compress.meter import AnalyticMeter, Meter
from lightning_relief.compress.policy import CompressionPolicy
from lightning_relief.compress.quantize import apply_quantization, quantized_bits
from lightning_relief.compress.search import (
    Candidate,
    lagrangian_search,
    nearby_candidates,
    propose_candidates,
    search_candidates,
    uniform_search,
)
from lightning_relief.compress.sensitivity import SensitivityTable, compute_sensitivity
from lightning_relief.compress.units import ModelUnits, analyze

__all__ = [
    "AnalyticMeter",
    "BudgetBracket",
    "Candidate",
    "CompressionConfig",
    "CompressionPolicy",
    "CompressionResult",
    "CostModel",
    "LatencyCostModel",
    "LatencyMeter",
    "Meter",
    "ModelUnits",
    "UnreachableTargetError",
    "apply_plan",
    "compress",
    "plan",
    "uncompiled",
    "SensitivityTable",
    "analyze",
    "apply_policy",
    "apply_pruning",
    "apply_quantization",
    "compute_sensitivity",
    "lagrangian_search",
    "load_compressed",
    "nearby_candidates",
    "policy_cost",
    "propose_candidates",
    "quantized_bits",
    "recalibrate_batchnorm",
    "search_candidates",
    "uniform_search",
]


def __getattr__(name: str):
    if name == "LatencyMeter":  # imports TVM: only when asked for
        from lightning_relief.compress.latency import LatencyMeter

        return LatencyMeter
    raise AttributeError(name)
