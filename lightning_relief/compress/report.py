"""The compression report: a per-layer table and a Pareto plot of the evaluated candidates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_relief.compress.cost import UNITS, CostModel, kept_channels, layer_shape
from lightning_relief.compress.policy import FLOAT_BITS, CompressionPolicy
from lightning_relief.compress.search import Candidate
from lightning_relief.compress.sensitivity import SensitivityTable
from lightning_relief.compress.units import ModelUnits


def layer_rows(units: ModelUnits, table: SensitivityTable, cost: CostModel, policy: CompressionPolicy) -> list[dict[str, Any]]:
    """One row per conv/linear layer: shapes, sensitivity and cost before and after ``policy``."""
    kept_before = kept_channels(units, {})
    kept_after = kept_channels(units, policy.prune)
    rows = []
    for info in units.layers:
        group = units.groups[info.out_group].root if info.out_group is not None else None
        ratio = policy.prune.get(group, 0.0) if group else 0.0
        bits = int(policy.bits.get(info.name, FLOAT_BITS))
        cin0, cout0 = layer_shape(units, info, kept_before)
        cin1, cout1 = layer_shape(units, info, kept_after)
        kl = 0.0
        if group and ratio > 0:
            kl += table.prune.get(group, {}).get(ratio, float("nan"))
        if bits < FLOAT_BITS:
            kl += table.quant.get(info.name, {}).get(bits, float("nan"))
        rows.append(
            {
                "layer": info.name,
                "kind": info.kind,
                "group": group,
                "ratio": ratio,
                "bits": bits,
                "in": [cin0, cin1],
                "out": [cout0, cout1],
                "sensitivity": kl,
                "cost_before": cost.layer_cost(info, cin0, cout0, FLOAT_BITS),
                "cost_after": cost.layer_cost(info, cin1, cout1, bits),
            }
        )
    return rows


def print_report(
    rows: Sequence[dict[str, Any]], candidates: Sequence[Candidate], metric: str, console=None, unit: str | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 132))
    unit = unit if unit is not None else UNITS.get(metric, "")
    layers = Table(title=f"SensitivityPruningCallback: chosen policy ({metric} in {unit})")
    for col in ("layer", "channels in", "channels out", "pruned", "bits", "KL", f"{metric} before", f"{metric} after"):
        layers.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        layers.add_row(
            r["layer"],
            f"{r['in'][0]}→{r['in'][1]}",
            f"{r['out'][0]}→{r['out'][1]}",
            f"{r['ratio']:.0%}",
            "float" if r["bits"] >= FLOAT_BITS else str(r["bits"]),
            f"{r['sensitivity']:.2e}",
            f"{r['cost_before']:.4g}",
            f"{r['cost_after']:.4g}",
        )
    console.print(layers)
    cands = Table(title="evaluated candidates")
    for col in ("round", "kind", "budget", "predicted", "measured", "KL sum", "val acc", "recovered", ""):
        cands.add_column(col, justify="right")
    for c in candidates:
        recovered = c.extra.get("recovered_acc")
        cands.add_row(
            str(c.round),
            str(c.extra.get("kind", "search")),
            f"{c.budget:.4g}",
            f"{c.predicted_cost:.4g}",
            "-" if c.measured_cost is None else f"{c.measured_cost:.4g}",
            f"{c.sensitivity:.2e}",
            "-" if c.val_acc is None else f"{c.val_acc:.4f}",
            "-" if recovered is None else f"{recovered:.4f}",
            "chosen" if c.chosen else "",
        )
    console.print(cands)


def pareto_plot(
    candidates: Sequence[Candidate],
    original_cost: float,
    original_acc: float | None,
    target: float,
    metric: str,
    path: str | Path,
) -> Path:
    """Measured cost ratio vs validation accuracy of every candidate, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [(c.measured_cost if c.measured_cost is not None else c.predicted_cost) / original_cost for c in candidates]
    ys = [c.val_acc if c.val_acc is not None else float("nan") for c in candidates]
    ax.scatter(xs, ys, c="tab:blue", label="candidates", zorder=2)
    for c, x, y in zip(candidates, xs, ys):
        if c.chosen:
            ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, label="chosen", zorder=3)
    if original_acc is not None:
        ax.scatter([1.0], [original_acc], marker="*", s=140, c="black", label="original", zorder=3)
    ax.axvline(target, color="gray", ls="--", lw=1, label=f"target {target:g}×")
    ax.set_xlabel(f"measured {metric} / original")
    ax.set_ylabel("validation accuracy (before fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


class Progress:
    """A rich progress display for the compression step (silent when disabled); ``task(description)``
    gives the ``(done, total)`` callback of one bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str):
        if self._progress is None:
            return lambda done, total: None
        task_id = self._progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task_id, completed=done, total=total)

        return update
