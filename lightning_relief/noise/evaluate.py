"""Robustness sweeps: accuracy of a trained model under noise levels or deployment times.

Each repeat is one "chip": weights are perturbed once and kept for the whole
evaluation set, output/activation noise is drawn fresh per batch. The model is
deep-copied first, so the caller's model is never touched.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_relief.noise.injector import NoiseInjector, step_seed
from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.pcm import ONE_YEAR, PCMNoise
from lightning_relief.noise.placement import Placement
from lightning_relief.noise.schedules import Constant

DEFAULT_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
DEFAULT_TIMES = (1.0, 3600.0, 86400.0, 30 * 86400.0, ONE_YEAR, 10 * ONE_YEAR)


def format_time(seconds: float) -> str:
    for unit, size in (("y", ONE_YEAR), ("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


@dataclass
class RobustnessResult:
    """Accuracy per level (σ) or time, mean and std over repeats."""

    kind: str  # "sigma" or "time"
    noise: str
    clean_accuracy: float
    levels: list[float]
    accuracy_mean: list[float]
    accuracy_std: list[float]
    repeats: int
    # time sweeps of PCMNoise: the same without global drift compensation
    uncompensated_mean: list[float] | None = None
    uncompensated_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def robustness(self) -> list[float]:
        """Noisy accuracy / clean accuracy per level."""
        return [a / self.clean_accuracy if self.clean_accuracy > 0 else float("nan") for a in self.accuracy_mean]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, level in enumerate(self.levels):
            row = {
                "level": level,
                "accuracy": self.accuracy_mean[i],
                "std": self.accuracy_std[i],
                "robustness": self.robustness[i],
            }
            if self.uncompensated_mean is not None and self.uncompensated_std is not None:
                row["accuracy_uncompensated"] = self.uncompensated_mean[i]
                row["std_uncompensated"] = self.uncompensated_std[i]
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["robustness"] = self.robustness
        return data

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` of the sweep."""
        from rich.table import Table

        table = Table(title=title or f"{self.noise}: accuracy under noise (clean {100 * self.clean_accuracy:.2f} %)")
        table.add_column("t since programming" if self.kind == "time" else "σ", justify="right")
        table.add_column("accuracy %", justify="right")
        table.add_column("± std", justify="right")
        table.add_column("noisy/clean %", justify="right")
        if self.uncompensated_mean is not None:
            table.add_column("no drift comp. %", justify="right")
        for row in self.rows():
            cells = [
                format_time(row["level"]) if self.kind == "time" else f"{row['level']:g}",
                f"{100 * row['accuracy']:.2f}",
                f"{100 * row['std']:.2f}",
                f"{100 * row['robustness']:.1f}",
            ]
            if "accuracy_uncompensated" in row:
                cells.append(f"{100 * row['accuracy_uncompensated']:.2f}")
            table.add_row(*cells)
        return table

    def print(self, title: str | None = None) -> None:
        from rich.console import Console

        Console().print(self.table(title))

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG of accuracy vs σ (or vs deployment time, log scale)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        x = self.levels
        curves = [("with drift compensation" if self.uncompensated_mean else "noisy", self.accuracy_mean, self.accuracy_std)]
        if self.uncompensated_mean is not None and self.uncompensated_std is not None:
            curves.append(("without drift compensation", self.uncompensated_mean, self.uncompensated_std))
        for label, mean, std in curves:
            m = [100 * v for v in mean]
            s = [100 * v for v in std]
            ax.plot(x, m, marker="o", label=label)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
        ax.axhline(100 * self.clean_accuracy, color="grey", linestyle="--", label="clean")
        if self.kind == "time":
            ax.set_xscale("log")
            ax.set_xlabel("time since programming (s)")
        else:
            ax.set_xlabel("noise level σ")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title or self.noise)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _loader(datamodule: Any, split: str):
    if hasattr(datamodule, "setup"):
        datamodule.setup("test" if split == "test" else "fit")
    getter = getattr(datamodule, f"{split}_dataloader", None)
    if getter is None:
        raise ValueError(f"datamodule {type(datamodule).__name__} has no {split}_dataloader()")
    return getter()


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Any, device: torch.device) -> float:
    correct = total = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        correct += int((logits.argmax(-1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the evaluation split is empty")
    return correct / total


def _sweep(
    model, loader, device, injector: NoiseInjector, levels, repeats, seed, progress, task
) -> tuple[list[float], list[float]]:
    means, stds = [], []
    for i, level in enumerate(levels):
        accs = []
        for r in range(repeats):
            generator = torch.Generator(device=device).manual_seed(step_seed(seed, r, i))
            injector.begin(torch.tensor(float(level)), generator)
            try:
                accs.append(_accuracy(model, loader, device))
            finally:
                injector.end()
            if progress is not None:
                progress.advance(task)
        t = torch.tensor(accs, dtype=torch.float64)
        means.append(float(t.mean()))
        stds.append(float(t.std(unbiased=True)) if repeats > 1 else 0.0)
    return means, stds


def evaluate_robustness(
    model: nn.Module,
    datamodule: Any,
    noise: NoiseModel,
    levels: Sequence[float] | None = None,
    times: Sequence[float] | None = None,
    repeats: int = 5,
    placement: Placement | str | Sequence[Placement | str] | None = None,
    split: str = "test",
    seed: int = 0,
    out_dir: str | Path | None = None,
    name: str | None = None,
    show: bool = True,
    progress: bool = True,
) -> RobustnessResult:
    """Accuracy of ``model`` under ``noise`` at each σ in ``levels`` or each time in ``times``.

    ``times`` (seconds since programming) is for time-based models (``PCMNoise``);
    it evaluates with and without global drift compensation. With ``out_dir``
    the table is also written as JSON and the curve as ``<name>.png`` there.

    Example (``module`` a trained ``ClassifierModule``)::

        from lightning_relief.noise import AdditiveGaussian, evaluate_robustness
        result = evaluate_robustness(module, DigitsDataModule(), AdditiveGaussian(),
                                     levels=[0.0, 0.1, 0.3], repeats=3, out_dir="runs/robustness")
        result.robustness  # noisy / clean accuracy per level
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a NoiseModel, got {type(noise).__name__}")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    kind = noise.level_kind
    if kind == "time":
        if levels is not None:
            raise ValueError(f"{type(noise).__name__} is swept over times=, not levels=")
        values = list(DEFAULT_TIMES if times is None else times)
    else:
        if times is not None:
            raise ValueError(f"{type(noise).__name__} is swept over levels=, not times=")
        values = list(DEFAULT_LEVELS if levels is None else levels)
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(
            f"{'times' if kind == 'time' else 'levels'} must be a non-empty list of finite values >= 0, got {values}"
        )

    model = copy.deepcopy(model).eval()  # never touch the caller's weights or hooks
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    loader = _loader(datamodule, split)
    clean = _accuracy(model, loader, device)

    variants = [noise]
    if kind == "time" and isinstance(noise, PCMNoise):
        variants.append(copy.copy(noise))
        variants[0].drift_compensation, variants[1].drift_compensation = True, False

    progress_bar = None
    if progress:
        from rich.progress import Progress

        progress_bar = Progress(transient=True)
        progress_bar.start()
    try:
        task = progress_bar.add_task("robustness sweep", total=len(values) * repeats * len(variants)) if progress_bar else None
        curves = []
        for variant in variants:
            # the sweep sets each level itself: the schedule is never asked
            injector = NoiseInjector(variant, Constant(1.0), placement, seed=seed).attach(model)
            try:
                curves.append(_sweep(model, loader, device, injector, values, int(repeats), seed, progress_bar, task))
            finally:
                injector.detach()
    finally:
        if progress_bar is not None:
            progress_bar.stop()

    result = RobustnessResult(
        kind="time" if kind == "time" else "sigma",
        noise=repr(noise),
        clean_accuracy=clean,
        levels=[float(v) for v in values],
        accuracy_mean=curves[0][0],
        accuracy_std=curves[0][1],
        repeats=int(repeats),
        uncompensated_mean=curves[1][0] if len(curves) > 1 else None,
        uncompensated_std=curves[1][1] if len(curves) > 1 else None,
    )
    if show:
        result.print()
    if out_dir is not None:
        stem = name or type(noise).__name__.lower()
        result.save_json(Path(out_dir) / f"{stem}.json")
        result.extra["plot"] = str(result.plot(Path(out_dir) / f"{stem}.png"))
    return result
