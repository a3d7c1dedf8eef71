"""Standard-normal numbers for training noise, drawn once and re-read at random offsets.

On a CPU a fresh Gaussian costs 3-10 ns per element, more than the layer it
perturbs: drawing one per activation made a noisy training step 40 % slower
than a plain one. :class:`NormalPool` draws a pool of ``N(0, 1)`` numbers and
hands out contiguous slices of it at random offsets; every step it redraws one
of its ``chunks`` parts, so a number lives for ``chunks`` steps.

Statistical trade-off (training only; evaluation draws stay fresh, as aihwkit's):
each element of a slice is exactly ``N(0, 1)`` and the elements of one slice
are independent (distinct pool entries). Two slices of one step, or of steps
less than ``chunks`` apart, may overlap, so the noise of two layers or of
nearby steps can repeat a few values at shifted positions. The pool holds at
least four times the largest slice, so a given pair of slices overlaps in at
most about a quarter of their elements on average. For a regulariser that is
invisible; do not use the pool where independent samples are measured
(evaluation, Monte-Carlo estimates).

The pool's content is a pure function of ``(seed, size, step)``: chunk ``j``
was last redrawn at the latest step ``s <= step`` with ``s % chunks == j``,
from ``seed_of(s)``. A run resumed at any step (with the size from the
checkpoint) rebuilds exactly the pool of the straight run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

MIN_SIZE = 1 << 16  # numbers: a small model keeps a small pool (its redrawn chunk is the upkeep per step)
SLACK = 4  # pool size >= SLACK x the largest slice
_MASK = (1 << 64) - 1


class NormalPool:
    """A pool of standard-normal numbers, refreshed chunk by chunk, read at random offsets.

    Args:
        seed_of: the generator seed of the chunk redrawn at a step.
        chunks: the pool is redrawn in this many parts, one per step.
        size: initial size (a checkpointed size, so a resumed run reads the same pool).

    >>> pool = NormalPool(lambda step: 1000 + step, chunks=4)
    >>> pool.begin(step=0, offset_seed=7)
    >>> eps = pool.take((64, 32), torch.float32, torch.device("cpu"))
    >>> eps.shape, round(float(eps.std()), 1)
    (torch.Size([64, 32]), 1.0)
    """

    def __init__(self, seed_of: Callable[[int], int], chunks: int = 64, size: int = 0) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.seed_of = seed_of
        self.chunks = int(chunks)
        self.size = int(size)
        self.step = 0
        self.device = torch.device("cpu")
        self._pool: Tensor | None = None
        self._fresh_at: int | None = None  # the step the chunks were last brought up to date for
        self._chunk_step: list[int | None] = []  # the step each chunk was drawn at
        self._offset_state = 0  # the offsets' generator (a counter hashed by _offset)
        self._generator: torch.Generator | None = None
        self._offset_seed = 0
        self._fresh: torch.Generator | None = None  # this step's generator for draws a slice cannot serve

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"] = state["_generator"] = state["_fresh"] = None  # redrawn on first use (spawned ranks, pickling)
        state["_chunk_step"] = []
        state["_fresh_at"] = None
        return state

    def begin(self, step: int, offset_seed: int, device: torch.device | None = None) -> None:
        """Start step ``step`` on ``device``: slice offsets come from ``offset_seed``; the chunk due is redrawn on first use."""
        self.step = int(step)
        self._offset_state = offset_seed & _MASK
        self._offset_seed = offset_seed
        self._fresh = None
        if device is not None:
            self.device = torch.device(device)

    def _bounds(self, j: int) -> tuple[int, int]:
        per = -(-self.size // self.chunks)
        return min(j * per, self.size), min((j + 1) * per, self.size)

    def _refresh(self) -> None:
        if self._pool is None or self._pool.device != self.device or self._pool.numel() != self.size:
            self._pool = torch.empty(self.size, device=self.device)
            self._chunk_step = [None] * self.chunks
            self._generator = torch.Generator(device=self.device)
            self._fresh_at = None
        elif self._fresh_at == self.step:
            return
        assert self._generator is not None
        # the step after the last one only changes the due step of its own chunk
        due_chunks = [self.step % self.chunks] if self._fresh_at == self.step - 1 else range(self.chunks)
        self._fresh_at = self.step
        for j in due_chunks:
            due = self.step - (self.step - j) % self.chunks  # the latest step <= self.step that redraws chunk j
            if self._chunk_step[j] != due:
                lo, hi = self._bounds(j)
                self._pool[lo:hi].normal_(generator=self._generator.manual_seed(self.seed_of(due)))
                self._chunk_step[j] = due

    def _offset(self, span: int) -> int:
        """The next offset in ``[0, span)``: a splitmix64 counter (re-seeding ``random.Random`` cost
        25 µs per step, a fifth of a Gaussian-noise step's fixed cost; this is a few integer ops)."""
        self._offset_state = z = (self._offset_state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return (z ^ (z >> 31)) % span

    def fresh(self) -> torch.Generator:
        """A generator seeded for this step, for draws that must be fresh (inside ``vmap``, where one
        unbatched slice would give every vectorized member the same noise)."""
        if self._fresh is None:
            self._fresh = torch.Generator(device=self.device).manual_seed(self._offset_seed)
        return self._fresh

    @torch.compiler.disable  # Python-side bookkeeping (offsets, refresh): a graph break, run eagerly
    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A read-only ``N(0, 1)`` tensor of ``shape``: a view into the pool, never to be modified."""
        n = math.prod(shape)
        if SLACK * n > self.size:
            self.size = max(MIN_SIZE, SLACK * n)
        self._refresh()
        assert self._pool is not None
        start = self._offset(self.size - n + 1)
        eps = self._pool.as_strided(shape, _contiguous_strides(tuple(shape)), start)  # one view op, not slice + view
        if eps.dtype == dtype and eps.device == device:  # a no-op .to() still dispatches, once per draw
            return eps
        # the pool is float32 on the model's device; other dtypes (autocast) and devices get a converted copy
        return eps.to(device=device, dtype=dtype)


@functools.cache
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(strides))
