"""What the embedded data modules share: fixed splits served by epoch-seeded loaders."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset
from typing_extensions import override


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on ``seed`` and the epoch.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed
    from a checkpoint sees the same order as an uninterrupted one (a sampler
    driven by one long-lived generator would restart from the first epoch's).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SplitDataModule(L.LightningDataModule):
    """A data module whose ``setup`` fills ``self._splits`` (``train``, ``val``, ``test`` and maybe ``ood``).

    Subclasses set ``batch_size``, ``seed``, ``num_workers`` and ``ood_kinds`` and implement ``setup``;
    the training order depends only on ``seed`` and the epoch, so resumed runs replay it.
    """

    ood_kinds: tuple[str, ...] = ()
    batch_size: int
    seed: int
    num_workers: int = 0
    _splits: dict[str, TensorDataset] | None = None

    def dataset(self, split: str) -> TensorDataset:
        """The tensors of ``split`` (``train``, ``val``, ``test`` or ``ood``)."""
        self.setup("fit")
        assert self._splits is not None
        if split not in self._splits:
            if split == "ood":
                raise ValueError(f"no OOD split: construct {type(self).__name__} with ood=one of {self.ood_kinds}")
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self._splits)}")
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def ood_dataloader(self) -> DataLoader:
        """The OOD inputs selected by ``ood`` (labels are the true classes)."""
        return self._loader("ood", shuffle=False)
