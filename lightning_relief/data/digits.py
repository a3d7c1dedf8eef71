"""scikit-learn's digits as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_relief.data import shifts
from lightning_relief.data.splits import SplitDataModule

DigitsOOD = Literal["heldout", "rotate", "noise", "invert"]
OOD_KINDS: tuple[str, ...] = get_args(DigitsOOD)
_SIZES = (8, 16, 32)


class DigitsDataModule(SplitDataModule):
    """The 1797 8×8 handwritten digits that ship inside scikit-learn.

    Splits are stratified and fixed by ``seed``; images are scaled to [0, 1],
    optionally resized (bilinear) to 16 or 32 px and replicated to
    ``channels`` channels, then standardised with the training mean and std.

    ``ood`` selects the out-of-distribution set served by :meth:`ood_dataloader`:
    ``"heldout"`` removes ``heldout_classes`` from train/val/test and serves
    them as OOD; ``"rotate"``, ``"noise"`` and ``"invert"`` serve shifted copies
    of the test split (``ood_severity``: degrees, noise std, unused).

    Example::

        >>> dm = DigitsDataModule(size=16, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((32, 1, 16, 16), 10)
    """

    num_classes = 10
    ood_kinds = OOD_KINDS

    def __init__(
        self,
        batch_size: int = 64,
        size: int = 8,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        ood: DigitsOOD | None = None,
        heldout_classes: Sequence[int] = (8, 9),
        ood_severity: float | None = None,
        num_workers: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if size not in _SIZES:
            raise ValueError(f"size must be one of {_SIZES}, got {size}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction}, {test_fraction}"
            )
        if ood is not None and ood not in OOD_KINDS:
            raise ValueError(f"ood must be one of {OOD_KINDS} or None, got {ood!r}")
        bad = [c for c in heldout_classes if not 0 <= int(c) < 10]
        if bad or (ood == "heldout" and not heldout_classes):
            raise ValueError(f"heldout_classes must be a non-empty subset of 0..9, got {list(heldout_classes)}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.size = size
        self.channels = channels
        self.seed = seed
        self.ood = ood
        self.heldout_classes = tuple(int(c) for c in heldout_classes)
        self.ood_severity = ood_severity
        self.num_workers = num_workers
        self.normalize = normalize
        self._splits: dict[str, TensorDataset] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def split_indices(self) -> dict[str, np.ndarray]:
        """Indices into ``load_digits()`` of each split (disjoint, seeded)."""
        targets = load_digits().target
        indices = np.arange(len(targets))
        in_dist = indices
        ood_idx = np.array([], dtype=int)
        if self.ood == "heldout":
            mask = np.isin(targets, self.heldout_classes)
            in_dist, ood_idx = indices[~mask], indices[mask]
        holdout = self.hparams["val_fraction"] + self.hparams["test_fraction"]
        train, rest = train_test_split(in_dist, test_size=holdout, random_state=self.seed, stratify=targets[in_dist])
        val, test = train_test_split(
            rest,
            test_size=self.hparams["test_fraction"] / holdout,
            random_state=self.seed,
            stratify=targets[rest],
        )
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test), "ood": np.sort(ood_idx)}

    def _images(self, raw: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(raw.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        if self.size != 8:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.repeat(1, self.channels, 1, 1)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        digits = load_digits()
        images = self._images(digits.data)
        targets = torch.from_numpy(digits.target).long()
        idx = self.split_indices()
        ood_images = images[idx["ood"]] if self.ood == "heldout" else self._shifted(images[idx["test"]])
        ood_targets = targets[idx["ood"]] if self.ood == "heldout" else targets[idx["test"]]
        mean, std = (images[idx["train"]].mean(), images[idx["train"]].std()) if self.normalize else (0.0, 1.0)
        self._splits = {
            name: TensorDataset((images[idx[name]] - mean) / std, targets[idx[name]]) for name in ("train", "val", "test")
        }
        if self.ood is not None:
            self._splits["ood"] = TensorDataset((ood_images - mean) / std, ood_targets)

    def _shifted(self, images: torch.Tensor) -> torch.Tensor:
        if self.ood == "rotate":
            return shifts.rotate(images, self.ood_severity if self.ood_severity is not None else 90.0)
        if self.ood == "noise":
            generator = torch.Generator().manual_seed(self.seed)
            return shifts.gaussian_noise(images, self.ood_severity if self.ood_severity is not None else 0.5, generator)
        if self.ood == "invert":
            return shifts.invert(images)
        return images
