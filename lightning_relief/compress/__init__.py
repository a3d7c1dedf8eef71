"""Hardware-aware compression: sensitivity, cost, search and application of pruning + quantization.

The pieces behind :class:`lightning_relief.callbacks.sensitivity_pruning.SensitivityPruningCallback`,
usable on their own: :func:`analyze` a model, :func:`compute_sensitivity`,
price policies with a :class:`CostModel`, :func:`lagrangian_search` a policy and
:func:`apply_policy` it.
"""

from lightning_relief.compress.apply import apply_policy, apply_pruning, recalibrate_batchnorm
from lightning_relief.compress.checkpoint import load_compressed
from lightning_relief.compress.cost import CostModel, LatencyCostModel, policy_cost
from lightning_relief.compress.policy import CompressionPolicy
from lightning_relief.compress.quantize import apply_quantization, quantized_bits
from lightning_relief.compress.bracket import BudgetBracket
from lightning_relief.compress.search import (
    Candidate, lagrangian_search, nearby_candidates, propose_candidates, search_candidates, uniform_search,
)
from lightning_relief.compress.sensitivity import SensitivityTable, compute_sensitivity
from lightning_relief.compress.units import ModelUnits, analyze

__all__ = [
    "BudgetBracket", "Candidate", "CompressionPolicy", "CostModel", "LatencyCostModel", "ModelUnits",
    "SensitivityTable", "analyze", "apply_policy", "apply_pruning", "apply_quantization", "compute_sensitivity",
    "lagrangian_search", "load_compressed", "nearby_candidates", "policy_cost", "propose_candidates",
    "quantized_bits", "recalibrate_batchnorm", "search_candidates", "uniform_search",
]
