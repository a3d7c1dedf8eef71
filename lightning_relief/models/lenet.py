"""A LeNet-5-style CNN with batch norm and dropout."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_relief.models.spec import records_init_args


@records_init_args
class LeNet5(nn.Module):
    """Two 5×5 conv blocks (conv → BN → ReLU → max-pool) and three linear layers.

    Convolutions are padded so 8, 16 and 32 px inputs all work.

    >>> import torch
    >>> LeNet5(input_size=16)(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        width: int = 1,
        dropout: float = 0.25,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if input_size % 4 or input_size < 4:
            raise ValueError(f"input_size must be a multiple of 4, got {input_size}")
        if width < 1 or in_channels < 1 or num_classes < 2:
            raise ValueError(f"bad LeNet5 sizes: in_channels={in_channels}, num_classes={num_classes}, width={width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        c1, c2 = 6 * width, 16 * width

        def block(cin: int, cout: int) -> nn.Sequential:
            norm = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
            return nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2), norm, nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, c1), block(c1, c2))
        flat = c2 * (input_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120 * width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(120 * width, 84 * width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(84 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
