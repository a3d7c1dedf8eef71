"""MNIST-1D: the locally generated data set against the paper's generator, the data module's
splits and OOD sets, and the published reference accuracies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from lightning_relief import ClassifierModule
from lightning_relief.data import MNIST1D_OOD_KINDS, MNIST1DDataModule
from lightning_relief.data.mnist1d_generate import PAPER, generate
from lightning_relief.models import MNIST1DCNN, MNIST1DGRU


def _tensors(dm: MNIST1DDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dm.dataset(split).tensors


@pytest.fixture(scope="module")
def paper() -> MNIST1DDataModule:
    dm = MNIST1DDataModule()
    dm.setup()
    return dm


@pytest.mark.parametrize("args", [PAPER, dataclasses.replace(PAPER, num_samples=300, length=64, seed=3)], ids=["paper", "other"])
def test_generator_is_bitwise_the_papers(args):
    from mnist1d import data as reference_data  # a dev dependency: the paper's own generator

    theirs = reference_data.get_dataset_args()
    theirs.__dict__.update(dataclasses.asdict(args), padding=list(args.padding), final_seq_length=args.length)
    reference = reference_data.make_dataset(theirs)
    ours = generate(args)
    for key in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def test_generated_arrays_are_cached_and_read_only():
    first, second = generate(PAPER), generate(PAPER)
    assert first["x"] is second["x"]
    with pytest.raises(ValueError, match="read-only"):
        first["x"][0, 0] = 1.0


def test_test_split_is_the_papers_and_validation_is_a_stratified_part_of_train(paper):
    data = generate(PAPER)
    x_test, y_test = _tensors(paper, "test")
    np.testing.assert_array_equal(x_test[:, 0].numpy(), data["x_test"].astype(np.float32))
    np.testing.assert_array_equal(y_test.numpy(), data["y_test"])
    x_train, _ = _tensors(paper, "train")
    x_val, y_val = _tensors(paper, "val")
    assert len(x_train) + len(x_val) == len(data["x"]) == 4000 and len(x_val) == 400
    rows = {row.tobytes() for row in data["x"].astype(np.float32)}
    seen = [row.tobytes() for row in torch.cat([x_train, x_val])[:, 0].numpy()]
    assert len(set(seen)) == len(seen) and set(seen) == rows  # disjoint and covering
    assert np.bincount(y_val.numpy(), minlength=10).min() >= 35  # stratified: ~40 per class


def test_splits_follow_the_seed():
    a, b, c = (MNIST1DDataModule(seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(_tensors(a, "val")[0], _tensors(b, "val")[0])
    assert not torch.equal(_tensors(a, "val")[0], _tensors(c, "val")[0])


def test_data_modules_do_not_share_writable_memory(paper):
    other = MNIST1DDataModule()
    other.setup()
    other.dataset("test").tensors[0].add_(1.0)
    assert not torch.equal(paper.dataset("test").tensors[0], other.dataset("test").tensors[0])


def test_heldout_classes_leave_train_val_test_and_form_the_ood_set():
    dm = MNIST1DDataModule(ood="heldout", heldout_classes=(3, 7))
    dm.setup()
    for split in ("train", "val", "test"):
        assert not np.isin(_tensors(dm, split)[1].numpy(), (3, 7)).any()
    _, y_ood = _tensors(dm, "ood")
    assert set(y_ood.tolist()) == {3, 7}
    assert len(y_ood) + len(_tensors(dm, "test")[1]) == 1000


def test_shuffled_ood_permutes_each_signal_with_one_fixed_permutation(paper):
    dm = MNIST1DDataModule(ood="shuffle")
    dm.setup()
    x_ood, y_ood = _tensors(dm, "ood")
    x_test, y_test = _tensors(paper, "test")
    assert torch.equal(y_ood, y_test)
    assert torch.equal(x_ood.sort(-1).values, x_test.sort(-1).values)
    assert not torch.equal(x_ood, x_test)
    # one permutation for all signals: the position of each test value's sort key is the same
    perm = (x_ood[0, 0].unsqueeze(1) == x_test[0, 0].unsqueeze(0)).float().argmax(1)
    assert torch.equal(x_test[:, :, perm], x_ood)


@pytest.mark.parametrize("severity", [None, 0.3])
def test_noise_ood_adds_white_noise_of_the_given_std(paper, severity):
    dm = MNIST1DDataModule(ood="noise", ood_severity=severity)
    dm.setup()
    noise = (_tensors(dm, "ood")[0] - _tensors(paper, "test")[0]).flatten()
    expected = 1.0 if severity is None else severity
    assert abs(noise.std().item() - expected) < 0.02 * expected
    assert abs(noise.mean().item()) < 0.01 * expected


def test_no_ood_split_unless_asked(paper):
    with pytest.raises(ValueError, match="no OOD split"):
        paper.dataset("ood")
    assert MNIST1D_OOD_KINDS == ("heldout", "shuffle", "noise")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"length": 4}, "length"),
        ({"num_samples": 10}, "num_samples"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"ood": "rotate"}, "ood"),
        ({"ood": "heldout", "heldout_classes": (11,)}, "heldout_classes"),
        ({"ood_severity": -1.0}, "ood_severity"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MNIST1DDataModule(**kwargs)


def _fit_plain(model: nn.Module, dm: MNIST1DDataModule, steps: int) -> float:
    """The paper's recipe (Adam, lr 1e-2, batches of 100 drawn with replacement); test accuracy."""
    x, y = _tensors(dm, "train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x), (100,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_test, y_test = _tensors(dm, "test")
    with torch.no_grad():
        return (model.eval()(x_test).argmax(-1) == y_test).float().mean().item()


def test_logistic_regression_reaches_the_published_32_percent(paper):
    from sklearn.linear_model import LogisticRegression

    x, y = _tensors(paper, "train")
    x_test, y_test = _tensors(paper, "test")
    model = LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())
    accuracy = model.score(x_test.flatten(1).numpy(), y_test.numpy())
    assert 0.28 <= accuracy <= 0.36, accuracy


@pytest.mark.slow
def test_mlp_reaches_the_published_68_percent_within_a_few_points(paper, seed):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    accuracy = _fit_plain(mlp, paper, steps=6000)
    assert 0.62 <= accuracy <= 0.74, accuracy


@pytest.mark.slow
@pytest.mark.parametrize(("factory", "epochs", "floor"), [(MNIST1DCNN, 20, 0.92), (MNIST1DGRU, 40, 0.89)], ids=["cnn", "gru"])
def test_reference_models_reach_the_published_accuracy_through_lightning(factory, epochs, floor, seed):
    dm = MNIST1DDataModule(seed=0)
    module = ClassifierModule(factory(), lr=1e-2, weight_decay=0.0)
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    accuracy = trainer.test(module, dm, verbose=False)[0]["test_acc"]
    assert accuracy >= floor, accuracy
