"""A multilayer perceptron with dropout."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_relief.models.spec import records_init_args


@records_init_args
class MLP(nn.Module):
    """Flatten → (Linear → ReLU → Dropout) × len(hidden) → Linear.

    >>> import torch
    >>> MLP(in_features=64)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 64),
        num_classes: int = 10,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"bad MLP sizes: in_features={in_features}, hidden={list(hidden)}, num_classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
