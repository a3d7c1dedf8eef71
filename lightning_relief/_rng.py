"""A seed for one block of work that leaves every generator of the caller as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def isolated_seed(seed: int) -> Iterator[None]:
    """Seed the CPU generator, and every CUDA one already in use, inside the block; restore them after.

    ``torch.manual_seed`` in ``fork_rng(devices=[...])`` reseeds the GPUs left out of the fork for
    good, and on a process whose CUDA is not initialised yet it queues a seed for every GPU that
    later replaces the user's ``seed_everything``; here neither happens.

    >>> torch.manual_seed(1) and None
    >>> before = torch.get_rng_state()
    >>> with isolated_seed(0):
    ...     a = torch.rand(2)
    >>> with isolated_seed(0):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), before)
    (True, True)
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield
