"""Per-unit sensitivity: how far one compressed unit moves the model's predictions.

For every prunable group × ratio and every quantizable layer × bit width, the
unit is compressed alone and the KL divergence ``KL(p_original || p_compressed)``
of the output distributions is averaged over calibration inputs (Galen's
measure, see ``shared/reference.md`` §1).

Pruning is evaluated without copying or re-tracing the model: removing a
channel is exactly the same as zeroing the input slices of every conv/linear
that consumes it (the group from torch-pruning lists them, with the index
mapping through flatten, concatenation and residual sums), so each evaluation
is a temporary in-place edit. Quantization fakes brevitas' per-channel
narrow-range integer weights (``Int8WeightPerChannelFloat`` at ``bits``).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from lightning_relief.atomic import atomic_save
from lightning_relief.compress.units import PRUNABLE_TYPES, ModelUnits, pruning_group

IMPORTANCES = ("magnitude", "taylor", "bn_scale", "lamp", "fpgm")


@dataclass
class SensitivityTable:
    """KL divergences per unit and option, and the channel order used for pruning."""

    prune: dict[str, dict[float, float]] = field(default_factory=dict)  # group root -> ratio -> KL
    quant: dict[str, dict[int, float]] = field(default_factory=dict)  # layer -> bits -> KL
    order: dict[str, list[int]] = field(default_factory=dict)  # group root -> channels, least important first
    seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"prune": self.prune, "quant": self.quant, "order": self.order, "seconds": self.seconds}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SensitivityTable:
        return cls(
            prune={k: {float(r): float(v) for r, v in d.items()} for k, d in state["prune"].items()},
            quant={k: {int(b): float(v) for b, v in d.items()} for k, d in state["quant"].items()},
            order={k: [int(i) for i in v] for k, v in state["order"].items()},
            seconds=float(state.get("seconds", 0.0)),
        )


def pruned_count(channels: int, ratio: float) -> int:
    """Channels removed at ``ratio``: rounded, and never all of them."""
    return min(int(round(ratio * channels)), channels - 1)


def fake_quantize_weight(weight: Tensor, bits: int) -> Tensor:
    """Symmetric narrow-range per-output-channel integer quantization (brevitas' formula)."""
    levels = 2 ** (bits - 1) - 1
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / levels
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return torch.clamp(torch.round(weight / scale), -levels, levels) * scale


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}")


def channel_order(
    model: nn.Module,
    units: ModelUnits,
    importance: str,
    batches: Sequence[tuple[Tensor, Tensor]],
    forward: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, list[int]]:
    """Each group's channels sorted by torch-pruning's importance, least important first."""
    forward = forward or model
    scorer = _importance(importance)
    fallback = tp.importance.MagnitudeImportance(p=2)
    if importance == "taylor":
        # Taylor importance reads weight × gradient: accumulate the calibration loss gradient
        model.zero_grad(set_to_none=True)
        was_training = model.training
        model.eval()
        with torch.enable_grad():
            for x, y in batches:
                F.cross_entropy(forward(x), y).backward()
        model.train(was_training)
    order: dict[str, list[int]] = {}
    try:
        for group in units.groups:
            tp_group = pruning_group(units, model, group.root, range(group.channels))
            scores = scorer(tp_group)
            if scores is None:  # e.g. bn_scale on a group without batch norm
                scores = fallback(tp_group)
            order[group.root] = [int(i) for i in torch.argsort(scores.detach().cpu(), stable=True)]
    finally:
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
    return order


def _masked_consumers(units: ModelUnits, model: nn.Module, root: str, idxs: Sequence[int]) -> list[tuple[nn.Module, list[int]]]:
    """(layer, input indices) that stop receiving the removed channels."""
    group = pruning_group(units, model, root, idxs)
    out = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, PRUNABLE_TYPES) and units.graph.is_in_channel_pruning_fn(item.dep.handler):
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                continue  # depthwise convs follow their producer's output pruning in torch-pruning
            out.append((module, list(item.idxs)))
    return out


@torch.no_grad()
def _log_probs(forward: Callable[[Tensor], Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    return [F.log_softmax(forward(x).float(), dim=-1) for x in inputs]


def _kl(reference: Sequence[Tensor], current: Sequence[Tensor]) -> float:
    total, count = 0.0, 0
    for ref, cur in zip(reference, current):
        total += F.kl_div(cur, ref, log_target=True, reduction="sum").item()
        count += ref.shape[0]
    return max(total / max(count, 1), 0.0)


def compute_sensitivity(
    model: nn.Module,
    units: ModelUnits,
    batches: Sequence[tuple[Tensor, Tensor]],
    prune_ratios: Sequence[float] = (),
    bit_widths: Sequence[int] = (),
    importance: str = "magnitude",
    quant_layers: Sequence[str] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityTable:
    """Measure the sensitivity table on ``batches`` (pairs ``(x, y)``); ``model`` is left unchanged."""
    start = time.perf_counter()
    forward = forward or model
    was_training = model.training
    model.eval()
    table = SensitivityTable()
    inputs = [x for x, _ in batches]
    named = dict(model.named_modules())
    quant_layers = [info.name for info in units.layers] if quant_layers is None else list(quant_layers)
    total = len(units.groups) * len(prune_ratios) + len(quant_layers) * len(bit_widths)
    done = 0
    try:
        reference = _log_probs(forward, inputs)
        if prune_ratios:
            table.order = channel_order(model, units, importance, batches, forward)
        for group in units.groups if prune_ratios else ():
            table.prune[group.root] = {}
            for ratio in prune_ratios:
                n = pruned_count(group.channels, ratio)
                idxs = table.order[group.root][:n]
                consumers = _masked_consumers(units, model, group.root, idxs) if n else []
                saved = [(m, m.weight.data[:, ix].clone(), ix) for m, ix in consumers]
                try:
                    for m, _, ix in saved:
                        m.weight.data[:, ix] = 0
                    table.prune[group.root][float(ratio)] = _kl(reference, _log_probs(forward, inputs))
                finally:
                    for m, original, ix in saved:
                        m.weight.data[:, ix] = original
                done += 1
                if progress:
                    progress(done, total)
        for name in quant_layers:
            layer = named[name]
            table.quant[name] = {}
            original = layer.weight.data.clone()
            try:
                for bits in bit_widths:
                    layer.weight.data = fake_quantize_weight(original, bits)
                    table.quant[name][int(bits)] = _kl(reference, _log_probs(forward, inputs))
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                layer.weight.data = original
    finally:
        model.train(was_training)
    table.seconds = time.perf_counter() - start
    return table


def fingerprint(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], settings: Any) -> str:
    """A key for the sensitivity cache: weights, calibration data and settings."""
    digest = hashlib.sha1(repr(settings).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16 else b"")
    for x, _ in batches:
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_sensitivity(
    cache_dir: str | Path | None, key: str, compute: Callable[[], SensitivityTable]
) -> tuple[SensitivityTable, bool]:
    """Load the table for ``key`` from ``cache_dir`` or compute and store it; returns (table, hit).

    Entries are written atomically (concurrent searches may share the folder); an entry
    that cannot be read (truncated, corrupt) is reported once, recomputed and replaced.
    """
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"sensitivity-{key}.pt"
    try:
        return SensitivityTable.from_state_dict(torch.load(path, weights_only=True)), True
    except FileNotFoundError:
        pass
    except Exception as err:  # any unreadable entry is recomputed, never fatal
        cause = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"sensitivity cache entry {path} is unreadable ({type(err).__name__}: {cause}); recomputing it", stacklevel=2
        )
    table = compute()
    atomic_save(lambda f: torch.save(table.state_dict(), f), path)
    return table, False
