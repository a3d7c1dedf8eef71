"""A zoo of models the project did not design, for testing every plugin as a user would.

Built from torchvision and plain ``torch.nn`` with random weights (nothing is
downloaded), each small enough for CPU tests. ``ZOO`` maps a name to a
:class:`ZooModel`; ``data`` names the embedded data set whose shape fits the
input (``"digits"``: ``DigitsDataModule(size, channels)``; ``"mnist1d"``:
``MNIST1DDataModule``, inputs ``(N, 1, 40)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    data: str  # "digits" or "mnist1d"
    num_classes: int = 10

    def example(self, batch: int = 2, seed: int = 0) -> Tensor:
        return torch.randn((batch, *self.input_shape), generator=torch.Generator().manual_seed(seed))

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()


class Conv1dCNN(nn.Module):
    """Conv1d → BN → ReLU blocks with a max-pool and dropout, for ``(N, 1, 40)`` signals."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(2 * channels * 10, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x).flatten(1)))


class TinyTransformer(nn.Module):
    """Patches of a ``(N, 1, 40)`` signal as 10 tokens through one ``nn.TransformerEncoderLayer`` (LayerNorm, GELU, MHA)."""

    def __init__(self, d_model: int = 32, num_classes: int = 10, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d_model)
        self.position = nn.Parameter(torch.randn(1, 40 // patch, d_model) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.1, activation="gelu", batch_first=True
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


class GRUClassifier(nn.Module):
    """A GRU over the 40 steps of a ``(N, 1, 40)`` signal; the last hidden state is classified."""

    def __init__(self, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x.transpose(1, 2))
        return self.head(h[-1])


class UpsampleNet(nn.Module):
    """Down by a strided conv, up by ``nn.ConvTranspose2d`` and ``nn.Upsample``, then a small head (``(N, 1, 8, 8)``)."""

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.mix = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(channels * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.down(x))
        h = torch.relu(self.up(h))
        h = torch.relu(self.mix(self.upsample(h)))
        return self.head(self.pool(h).flatten(1))


class FunctionalNet(nn.Module):
    """A CNN whose forward uses functional calls: ``F.relu``, ``F.max_pool2d``, ``F.dropout``, ``torch.flatten``, ``x.view``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.dropout(F.relu(self.fc1(x)), p=0.2, training=self.training)
        return self.fc2(x.view(x.shape[0], -1))


ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in (
        ZooModel("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), "digits"),
        ZooModel("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32), "digits"),
        ZooModel("conv1d_cnn", Conv1dCNN, (1, 40), "mnist1d"),
        ZooModel("transformer", TinyTransformer, (1, 40), "mnist1d"),
        ZooModel("gru", GRUClassifier, (1, 40), "mnist1d"),
        ZooModel("upsample", UpsampleNet, (1, 8, 8), "digits"),
        ZooModel("functional", FunctionalNet, (1, 8, 8), "digits"),
    )
}
