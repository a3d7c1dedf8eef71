"""The embedded digits data: splits, determinism, resizing and OOD sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_relief.data import DigitsDataModule, SyntheticDataModule
from lightning_relief.data.shifts import rotate


def test_splits_are_disjoint_cover_the_data_and_are_stratified():
    dm = DigitsDataModule(seed=3)
    idx = dm.split_indices()
    train, val, test = (set(idx[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1797
    targets = load_digits().target
    for split in ("val", "test"):
        counts = np.bincount(targets[idx[split]], minlength=10)
        assert counts.min() >= 0.7 * counts.mean()


def test_splits_are_deterministic_by_seed_and_differ_across_seeds():
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for split in ("train", "val", "test"):
        assert np.array_equal(a.split_indices()[split], b.split_indices()[split])
    assert not np.array_equal(a.split_indices()["test"], c.split_indices()["test"])
    a.setup(), b.setup()
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_images_match_sklearn_after_standardisation(digits):
    x, y = digits.dataset("test").tensors
    raw = load_digits()
    idx = digits.split_indices()["test"]
    expected = torch.from_numpy(raw.data[idx].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    train_raw = torch.from_numpy(raw.data[digits.split_indices()["train"]].astype(np.float32) / 16.0)
    torch.testing.assert_close(x, (expected - train_raw.mean()) / train_raw.std())
    assert torch.equal(y, torch.from_numpy(raw.target[idx]))
    train_x = digits.dataset("train").tensors[0]
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (16, 3), (32, 1)])
def test_resize_and_channel_replication(size, channels):
    dm = DigitsDataModule(size=size, channels=channels, batch_size=16)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, channels, size, size) and dm.input_shape == (channels, size, size)
    if channels > 1:
        assert torch.equal(x[:, 0], x[:, 1])


def test_heldout_ood_removes_classes_from_in_distribution():
    dm = DigitsDataModule(ood="heldout", heldout_classes=(8, 9))
    dm.setup()
    for split in ("train", "val", "test"):
        assert dm.dataset(split).tensors[1].max() <= 7
    ood_y = dm.dataset("ood").tensors[1]
    assert set(ood_y.tolist()) == {8, 9} and len(ood_y) == int(np.isin(load_digits().target, (8, 9)).sum())
    assert len(next(iter(dm.ood_dataloader()))[0]) > 0


@pytest.mark.parametrize("kind", ["rotate", "noise", "invert"])
def test_shifted_ood_sets_are_shifted_copies_of_test(kind):
    clean = DigitsDataModule(normalize=False)
    shifted = DigitsDataModule(ood=kind, normalize=False)
    clean.setup(), shifted.setup()
    x_test, y_test = clean.dataset("test").tensors
    x_ood, y_ood = shifted.dataset("ood").tensors
    assert torch.equal(y_ood, y_test) and x_ood.shape == x_test.shape
    assert not torch.allclose(x_ood, x_test)
    if kind == "invert":
        torch.testing.assert_close(x_ood, 1 - x_test)


def test_rotation_by_90_degrees_matches_rot90():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 1, 2:6] = 1.0
    rotated = rotate(image, 90.0)
    assert torch.allclose(rotated, torch.rot90(image, 1, dims=(2, 3)), atol=1e-5) or torch.allclose(
        rotated, torch.rot90(image, -1, dims=(2, 3)), atol=1e-5
    )


def test_no_ood_split_unless_asked(digits):
    with pytest.raises(ValueError, match="ood="):
        digits.dataset("ood")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 12}, "size"),
        ({"ood": "blur"}, "ood"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
        ({"ood": "heldout", "heldout_classes": (11,)}, "heldout_classes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_synthetic_data_is_learnable_and_seeded():
    a = SyntheticDataModule(input_shape=(3, 4, 4), num_samples=64, seed=5)
    b = SyntheticDataModule(input_shape=(3, 4, 4), num_samples=64, seed=5)
    a.setup(), b.setup()
    assert torch.equal(a.dataset("train").tensors[0], b.dataset("train").tensors[0])
    x, y = a.dataset("train").tensors
    assert x.shape[1:] == (3, 4, 4) and y.max() < 10
    assert len(a.dataset("train")) + len(a.dataset("val")) + len(a.dataset("test")) == 64


def test_shuffle_order_depends_on_epoch_only_so_resumed_runs_match():
    dm = DigitsDataModule(seed=4)
    dm.setup()
    first, second = dm.train_dataloader(), dm.train_dataloader()
    orders = []
    for loader in (first, second):
        loader.sampler.set_epoch(3)
        orders.append(torch.cat([y for _, y in loader]))
    assert torch.equal(orders[0], orders[1])
    first.sampler.set_epoch(4)
    assert not torch.equal(torch.cat([y for _, y in first]), orders[0])
    assert sorted(first.sampler) == list(range(len(dm.dataset("train"))))
