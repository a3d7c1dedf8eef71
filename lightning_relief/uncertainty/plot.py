"""Reliability diagrams (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_relief.uncertainty.functional import calibration_bins, expected_calibration_error


def plot_reliability_diagram(
    probs: Tensor,
    target: Tensor,
    path: str | Path,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Save a reliability diagram of ``probs [N, C]`` against ``target [N]`` as a PNG.

    Bars show the accuracy of each equal-width confidence bin, the diagonal is
    perfect calibration, red gaps are the miscalibration of each bin, and a lower
    panel shows how many samples fall into each bin. Returns the path written.

    Example::

        >>> import torch, tempfile, os
        >>> probs = torch.softmax(torch.randn(100, 10), -1)
        >>> target = torch.randint(0, 10, (100,))
        >>> out = plot_reliability_diagram(probs, target, os.path.join(tempfile.mkdtemp(), "rel.png"))
        >>> out.exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    probs = probs.detach().double().cpu()
    target = target.detach().cpu()
    count, confidence, accuracy = calibration_bins(probs, target, n_bins)
    ece = expected_calibration_error(probs, target, n_bins).item()
    edges = torch.linspace(0, 1, n_bins + 1)
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1.0 / n_bins
    filled = (count > 0).numpy()

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], accuracy.numpy()[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap_bottom = torch.minimum(accuracy, confidence).numpy()[filled]
    gap_height = (accuracy - confidence).abs().numpy()[filled]
    top.bar(
        centres[filled],
        gap_height,
        bottom=gap_bottom,
        width=width,
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.8,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title or 'reliability'}\nECE {ece:.4f}, N={len(target)}", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count.numpy(), width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("samples")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
