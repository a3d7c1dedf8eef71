"""A LightningModule that trains any ``nn.Module`` as a classifier."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from typing_extensions import override

from lightning_relief.models.spec import build_model, model_spec
from lightning_relief.nn.structure import RestorableStructureMixin

Optimizer = Literal["adam", "adamw", "sgd"]
Scheduler = Literal["cosine", "none"]
_OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
_SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


class ClassifierModule(RestorableStructureMixin, L.LightningModule):
    """Cross-entropy training of ``model``; logs accuracy, NLL and 15-bin ECE.

    ``model`` is an ``nn.Module`` or a spec ``{"class_path": ..., "init_args": ...}``.
    Models from :mod:`lightning_relief.models` (and any class decorated with
    :func:`~lightning_relief.models.spec.records_init_args`) are stored as a spec
    in the hyperparameters, so ``ClassifierModule.load_from_checkpoint(path)``
    rebuilds them; for other models pass ``model=`` to ``load_from_checkpoint``.
    Structural changes made by our plugins are replayed on load.

    Models with bayesian-torch layers (see :func:`lightning_relief.bayes.make_bayesian`)
    train on the negative ELBO per sample: cross-entropy plus ``kl_weight`` times the
    summed KL divergence divided by the training-set size; ``(out, kl)`` outputs are
    unwrapped in ``forward``.

    With more than one process (e.g. ``DDPStrategy``) and dropout or Bayesian layers,
    the module adds a :class:`~lightning_relief.callbacks.per_rank_noise.PerRankNoise`
    seeded with the ``seed_everything`` seed, so every rank draws its own noise and a
    resumed run draws what the straight run drew; a ``PerRankNoise`` of your own is kept,
    and ``DeepEnsembleStrategy`` seeds its ranks itself. ``train_acc`` is the
    accuracy over the epoch's training samples of all ranks.

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> module = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, DigitsDataModule())
    """

    def __init__(
        self,
        model: nn.Module | dict[str, Any] | None = None,
        num_classes: int = 10,
        lr: float = 1e-2,
        weight_decay: float = 5e-4,
        optimizer: Optimizer = "adam",
        momentum: float = 0.9,
        scheduler: Scheduler = "cosine",
        label_smoothing: float = 0.0,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be one of {_SCHEDULERS}, got {scheduler!r}")
        if lr <= 0 or weight_decay < 0 or num_classes < 2 or not 0 <= label_smoothing < 1:
            raise ValueError(
                f"bad hyperparameters: lr={lr}, weight_decay={weight_decay}, num_classes={num_classes}, "
                f"label_smoothing={label_smoothing}"
            )
        if model is None:
            raise TypeError(
                "ClassifierModule needs `model`; this checkpoint holds no rebuildable model spec, so pass "
                "model=<an nn.Module of the same architecture> to load_from_checkpoint"
            )
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        if isinstance(model, dict):
            model = build_model(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a class_path spec, got {type(model).__name__}")
        self.save_hyperparameters(ignore=["model"])
        spec = model_spec(model)
        if spec is None:  # a recipe's own model class: keep LightningCLI's class_path config
            given = _given_hyperparameters.get()
            spec = given.get("model") if isinstance(given, dict) and isinstance(given.get("model"), dict) else None
        if spec is not None:
            self.hparams["model"] = spec
        self.model = model
        self.num_classes = num_classes
        # training accuracy is counted by hand: logging a torchmetrics object walks it on every step,
        # which cost about as much as a small model's whole forward and backward
        self._train_counts: Tensor | None = None
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_ece = MulticlassCalibrationError(num_classes, n_bins=15)
        self.test_ece = MulticlassCalibrationError(num_classes, n_bins=15)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        # bayesian-torch layers may return (out, kl); the KL is recomputed in training_step
        return out[0] if isinstance(out, tuple) else out

    def _kl_loss(self) -> Tensor | None:
        """``kl_weight * KL / N`` of bayesian-torch layers in the model (None without them)."""
        if self.hparams["kl_weight"] == 0 or not any(callable(getattr(m, "kl_loss", None)) for m in self.model.modules()):
            return None
        from lightning_relief.bayes.kl import kl_term, training_set_size

        return kl_term(self.model, training_set_size(self.trainer), self.hparams["kl_weight"])

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"])
        kl = self._kl_loss()
        if kl is not None:
            self.log("train_kl_term", kl, on_step=False, on_epoch=True)
            loss = loss + kl
        counts = torch.stack([(logits.detach().argmax(1) == y).sum(), torch.tensor(y.numel(), device=y.device)])
        self._train_counts = counts if self._train_counts is None else self._train_counts + counts
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _draws_noise(self) -> bool:
        """Whether layers draw from the global generator as they train: dropout or bayesian-torch layers."""
        return any((isinstance(m, _DropoutNd) and m.p > 0) or callable(getattr(m, "kl_loss", None)) for m in self.model.modules())

    @override
    def configure_callbacks(self) -> list[Callback]:
        # seed_everything seeds every rank alike, so under plain DDP these layers would draw the same noise
        # on every rank; PerRankNoise gives each rank its own draws, and exact ones on resume
        from lightning_relief.callbacks.per_rank_noise import PerRankNoise
        from lightning_relief.strategies.deep_ensemble import DeepEnsembleStrategy

        trainer = self.trainer
        if (
            trainer.world_size < 2
            or isinstance(trainer.strategy, DeepEnsembleStrategy)  # it seeds each rank and checkpoints the states itself
            or any(isinstance(c, PerRankNoise) for c in trainer.callbacks)  # type: ignore[attr-defined]  # a returned one would replace the user's
            or not self._draws_noise()
        ):
            return []
        # the seed_everything seed, so that runs seeded differently draw differently and a resumed run finds its state
        return [PerRankNoise(seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))]

    @override
    def on_train_epoch_start(self) -> None:
        self._train_counts = None

    @override
    def on_train_epoch_end(self) -> None:
        # summed over the ranks before dividing: the micro accuracy of all samples, as the metric's sync gave
        counts = self._train_counts
        if counts is None:
            counts = torch.zeros(2, dtype=torch.long, device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self._train_counts = None
        if counts[1] > 0:
            # every rank holds the same value now; "max" keeps it exact and spares Lightning's unsynced-log warning
            self.log("train_acc", counts[0] / counts[1], sync_dist=True, reduce_fx="max")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        nll = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        ece = getattr(self, f"{stage}_ece")
        acc(logits, y)
        ece(logits.softmax(-1), y)
        self.log(f"{stage}_nll", nll, prog_bar=stage == "val")
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val")
        self.log(f"{stage}_ece", ece)
        return nll

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams  # an AttributeDict
        optimizer: torch.optim.Optimizer
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        max_epochs = self._trainer.max_epochs if self._trainer is not None else None
        if hp.scheduler == "none" or not max_epochs or max_epochs < 1:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
