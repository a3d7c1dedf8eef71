"""Per-member data order for ensemble training.

:class:`MemberBatchSampler` yields, for each step, the concatenation of one
batch per member: member ``g`` shuffles (or bootstraps) the data with its own
seed, so members see different orders, and every member gets exactly the same
stream whether it is trained alone, next to others in one vectorized step, or
on another process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

# members' data streams are seeded far apart so neighbouring seeds never share an order
_SEED_STRIDE = 1_000_003


def member_data_seed(seed: int, member: int, epoch: int) -> int:
    return (seed * 7919 + member) * _SEED_STRIDE + epoch


class MemberBatchSampler(Sampler[list[int]]):
    """Batches of ``len(members) * batch_size`` indices: member ``members[j]``'s
    batch is the ``j``-th chunk.

    Each epoch member ``g`` draws a permutation (``bootstrap=False``) or ``size``
    indices with replacement (``bootstrap=True``) from a generator seeded by
    ``(seed, g, epoch)``. ``set_epoch`` is called by Lightning every epoch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        members: Sequence[int],
        seed: int = 0,
        bootstrap: bool = False,
        drop_last: bool = False,
    ) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be >= 1, got {size} and {batch_size}")
        if not members:
            raise ValueError("members must name at least one member index")
        self.size = size
        self.batch_size = batch_size
        self.members = list(members)
        self.seed = seed
        self.bootstrap = bootstrap
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def member_order(self, member: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(member_data_seed(self.seed, member, self.epoch))
        if self.bootstrap:
            return torch.randint(0, self.size, (self.size,), generator=generator)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        orders = [self.member_order(g) for g in self.members]
        for step in range(len(self)):
            chunk = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield torch.cat([order[chunk] for order in orders]).tolist()


class _RepeatedBatches:
    """Iterable-dataset fallback: every member gets the same batch (tensors repeated along dim 0)."""

    def __init__(self, loader: Any, copies: int) -> None:
        self.loader = loader
        self.copies = copies

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        from lightning.fabric.utilities.apply_func import apply_to_collection

        for batch in self.loader:
            yield apply_to_collection(batch, torch.Tensor, lambda t: torch.cat([t] * self.copies))


class _TensorBatches(Dataset):
    """A ``TensorDataset`` indexed by a whole list of indices at once."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [t[index] for t in self.dataset.tensors]


def member_dataloader(loader: DataLoader, members: Sequence[int], seed: int, bootstrap: bool) -> DataLoader | _RepeatedBatches:
    """``loader`` rebuilt to serve :class:`MemberBatchSampler` batches for ``members``.

    Keeps the loader's dataset, batch size, collate function and worker
    settings. A dataset without random access (``IterableDataset``) cannot be
    reordered per member: each batch is then repeated for every member.
    """
    dataset: Dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return _RepeatedBatches(loader, len(members))
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if batch_size is None:
        raise ValueError("the training dataloader needs a batch_size for per-member batches")
    drop_last = loader.drop_last if loader.batch_size else bool(getattr(loader.batch_sampler, "drop_last", False))
    sampler = MemberBatchSampler(len(dataset), batch_size, members, seed, bootstrap, drop_last)
    if isinstance(dataset, TensorDataset) and loader.collate_fn is default_collate and loader.num_workers == 0:
        # M batches a step: one tensor gather per step instead of M * batch_size __getitem__ calls
        return DataLoader(_TensorBatches(dataset), sampler=sampler, batch_size=None, pin_memory=loader.pin_memory)
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = dict(
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
            multiprocessing_context=loader.multiprocessing_context,
        )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        timeout=loader.timeout,
        **extra,
    )
