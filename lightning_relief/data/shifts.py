"""Distribution shifts that turn in-distribution images into OOD inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch ``(N, C, H, W)`` about the centre, zero fill outside."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def gaussian_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add white noise of ``std`` (images are in [0, 1]) and clip back to range."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype) * std
    return (images + noise).clamp_(0.0, 1.0)


def invert(images: torch.Tensor) -> torch.Tensor:
    """Swap ink and background (images are in [0, 1])."""
    return 1.0 - images
