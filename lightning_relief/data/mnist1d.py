"""MNIST-1D as a LightningDataModule: a small 1-D benchmark on which methods can be told apart."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_relief.data.mnist1d_generate import PAPER, generate
from lightning_relief.data.splits import SplitDataModule

MNIST1DOOD = Literal["heldout", "shuffle", "noise"]
MNIST1D_OOD_KINDS: tuple[str, ...] = get_args(MNIST1DOOD)


class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D (Greydanus 2020), generated locally: 10 classes of 1-D signals, inputs ``(N, 1, length)``.

    The data set is the paper's (5000 signals of 40 points, seed 42: 4000 train, 1000 test);
    ``val_fraction`` of the training signals (stratified, fixed by ``seed``) are held out for
    validation, and the paper's test set is the test split, so published accuracies apply
    (logistic regression ≈ 32 %, MLP ≈ 68 %, CNN ≈ 94 %, GRU ≈ 91 %). ``length`` resamples
    the signals to another number of points and ``num_samples`` draws a larger or smaller
    set (both change the data set, so published figures no longer apply).

    ``ood`` selects the out-of-distribution set served by :meth:`ood_dataloader`:
    ``"heldout"`` removes ``heldout_classes`` from train/val/test and serves them;
    ``"shuffle"`` serves the test signals with their positions permuted (one fixed
    permutation, seeded); ``"noise"`` adds white noise of std ``ood_severity`` (default 1.0,
    in units of the data's std).

    Example::

        >>> dm = MNIST1DDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes, len(dm.dataset("test"))
        ((32, 1, 40), 10, 1000)
    """

    num_classes = 10
    ood_kinds = MNIST1D_OOD_KINDS

    def __init__(
        self,
        batch_size: int = 100,
        length: int = 40,
        num_samples: int = 5000,
        val_fraction: float = 0.1,
        seed: int = 0,
        ood: MNIST1DOOD | None = None,
        heldout_classes: Sequence[int] = (8, 9),
        ood_severity: float | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if length < 8:
            raise ValueError(f"length must be >= 8, got {length}")
        if num_samples < 100:
            raise ValueError(f"num_samples must be >= 100, got {num_samples}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if ood is not None and ood not in MNIST1D_OOD_KINDS:
            raise ValueError(f"ood must be one of {MNIST1D_OOD_KINDS} or None, got {ood!r}")
        bad = [c for c in heldout_classes if not 0 <= int(c) < 10]
        if bad or (ood == "heldout" and not heldout_classes):
            raise ValueError(f"heldout_classes must be a non-empty subset of 0..9, got {list(heldout_classes)}")
        if ood_severity is not None and not ood_severity >= 0:
            raise ValueError(f"ood_severity must be >= 0, got {ood_severity}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.length = length
        self.seed = seed
        self.ood = ood
        self.heldout_classes = tuple(int(c) for c in heldout_classes)
        self.ood_severity = ood_severity
        self.num_workers = num_workers
        self.args = dataclasses.replace(PAPER, length=length, num_samples=num_samples)
        self._splits: dict[str, TensorDataset] | None = None

    @property
    def input_shape(self) -> tuple[int, int]:
        return (1, self.length)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        data = generate(self.args)
        x, y = data["x"], data["y"]
        x_test, y_test = data["x_test"], data["y_test"]
        ood_x: np.ndarray | None = None
        ood_y: np.ndarray | None = None
        if self.ood == "heldout":
            held = np.isin(y_test, self.heldout_classes)
            ood_x, ood_y = x_test[held], y_test[held]
            keep = ~np.isin(y, self.heldout_classes)
            x, y, x_test, y_test = x[keep], y[keep], x_test[~held], y_test[~held]
        train, val = train_test_split(
            np.arange(len(y)), test_size=self.hparams["val_fraction"], random_state=self.seed, stratify=y
        )
        train, val = np.sort(train), np.sort(val)
        if self.ood in ("shuffle", "noise"):
            ood_x, ood_y = self._shifted(x_test), y_test

        def tensors(signals: np.ndarray, labels: np.ndarray) -> TensorDataset:
            # copies: the generated arrays are cached read-only and shared between data modules
            inputs = torch.tensor(signals, dtype=torch.float32).unsqueeze(1)
            return TensorDataset(inputs, torch.tensor(labels, dtype=torch.long))

        self._splits = {"train": tensors(x[train], y[train]), "val": tensors(x[val], y[val]), "test": tensors(x_test, y_test)}
        if ood_x is not None and ood_y is not None:
            self._splits["ood"] = tensors(ood_x, ood_y)

    def _shifted(self, signals: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.ood == "shuffle":
            return signals[:, rng.permutation(signals.shape[1])]
        std = 1.0 if self.ood_severity is None else self.ood_severity
        return signals + std * rng.standard_normal(signals.shape)
