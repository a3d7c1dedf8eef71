"""Random data of any shape, for shape-only tests and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override


class SyntheticDataModule(L.LightningDataModule):
    """Gaussian inputs labelled by a fixed random linear teacher (so they are learnable).

    Example::

        >>> dm = SyntheticDataModule(input_shape=(3, 16, 16), num_samples=64, batch_size=16)
        >>> dm.setup("fit")
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)
        (16, 3, 16, 16)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        num_samples: int = 256,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_samples < 4 or batch_size < 1:
            raise ValueError(f"num_samples must be >= 4 and batch_size >= 1, got {num_samples}, {batch_size}")
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise ValueError(f"input_shape must be positive dimensions, got {list(input_shape)}")
        self.save_hyperparameters()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self._splits: dict[str, TensorDataset] | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn((self.num_samples, *self.input_shape), generator=g)
        teacher = torch.randn(x[0].numel(), self.num_classes, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        n_val = n_test = max(1, self.num_samples // 8)
        n_train = self.num_samples - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, self.num_samples)}
        self._splits = {k: TensorDataset(x[a:b], y[a:b]) for k, (a, b) in bounds.items()}

    def dataset(self, split: str) -> TensorDataset:
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset("train"), batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
