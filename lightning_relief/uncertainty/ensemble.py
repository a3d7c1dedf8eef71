"""An ensemble of classifiers as one exportable ``nn.Module``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class EnsembleModel(nn.Module):
    """Mixture of ``members``: ``forward(x)`` is the mean of the members' softmax probabilities.

    Members are called in a plain loop, so ``torch.export`` traces the whole
    ensemble as one graph (the TVM export callback compiles it that way).
    Each member maps ``x`` to logits ``[N, C]``.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> ensemble = EnsembleModel([MLP(in_features=4, hidden=(8,), num_classes=3) for _ in range(3)]).eval()
        >>> probs = ensemble(torch.randn(5, 4))
        >>> tuple(probs.shape), torch.allclose(probs.sum(-1), torch.ones(5))
        ((5, 3), True)
        >>> tuple(ensemble.member_probs(torch.randn(5, 4)).shape)
        (3, 5, 3)
    """

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("members must hold at least one nn.Module, got none")

    @property
    def num_members(self) -> int:
        return len(self.members)

    def member_probs(self, x: Tensor) -> Tensor:
        """Softmax probabilities of each member: ``[M, N, C]``."""
        return torch.stack([member(x).softmax(-1) for member in self.members])

    def forward(self, x: Tensor) -> Tensor:
        total = self.members[0](x).softmax(-1)
        for member in self.members[1:]:
            total = total + member(x).softmax(-1)
        return total / len(self.members)
