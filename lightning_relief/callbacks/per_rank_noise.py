"""``PerRankNoise``: every data-parallel rank draws its own sampling noise, as a pure function of the batch."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_relief._rng import isolated_seed
from lightning_relief.noise.injector import step_seed

__all__ = ["PerRankNoise"]

_STAGES = {"validate": 1, "test": 2, "predict": 3}


class PerRankNoise(Callback):
    """Seed the random draws of each batch from ``(seed, rank, batch)``: own noise per rank, exact resume.

    ``seed_everything`` gives every DDP rank the same seed, so dropout, Bayesian
    layers and any other sampler that draws from PyTorch's global generator draw
    the *same* noise on every rank: the ranks' gradients then carry correlated
    noise, and a resumed run draws other noise than a straight one (Lightning
    does not checkpoint the global generator). Photonic sampler layers draw per
    rank without this callback (:func:`~lightning_relief.photonic.rank_normal`);
    with it their draws are also exact on resume.

    This callback seeds the global generator (CPU and the CUDA devices in use)
    from ``(seed, global rank, training batch)`` for the span of each training
    batch (forward, backward and optimizer step) and from ``(seed, rank, stage,
    global step, dataloader, batch)`` for each evaluation batch, and restores the
    generator after, so draws outside the batches are untouched. DDP averages
    the gradients of the ranks' different draws, so the model stays the same on
    every rank. The batch count is the checkpoint state, so a resumed run draws
    exactly what the straight run drew.

    Args:
        seed: combined with the rank and the batch into each batch's seed.

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import MLP
        >>> from lightning_relief.photonic import PhotonicNetwork
        >>> net = PhotonicNetwork(MLP(in_features=64, dropout=0.0), num_samples=4)
        >>> noise = PerRankNoise(seed=3)
        >>> trainer = L.Trainer(callbacks=[noise], accelerator="cpu", max_steps=3, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassifierModule(net), DigitsDataModule())
        >>> noise.state_dict()
        {'seed': 3, 'batches_done': 3}
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.batches_done = 0
        self._scope: contextlib.ExitStack | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.seed)

    def _begin(self, batch_seed: int) -> None:
        self._end()
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(isolated_seed(batch_seed))

    def _end(self) -> None:
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.close()

    def _eval_seed(self, trainer: L.Trainer, stage: str, batch_idx: int, dataloader_idx: int) -> int:
        key = ((trainer.global_step * 64 + dataloader_idx) * 2**24 + batch_idx) * 4 + _STAGES[stage]
        # mixed once more, so that no evaluation key reuses the seed of a training batch with that number
        return step_seed(step_seed(self.seed, trainer.global_rank, key), 1, 0)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._begin(step_seed(self.seed, trainer.global_rank, self.batches_done))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end()
        self.batches_done += 1

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(self._eval_seed(trainer, "validate", batch_idx, dataloader_idx))

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end()

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(self._eval_seed(trainer, "test", batch_idx, dataloader_idx))

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end()

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(self._eval_seed(trainer, "predict", batch_idx, dataloader_idx))

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_done": self.batches_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_done = int(state_dict["batches_done"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"
