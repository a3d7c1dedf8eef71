"""The KL term of the evidence lower bound, scaled by the training-set size."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_relief.bayes.convert import bayesian_layers

# (mean, rho, prior mean, prior std) attribute names of bayesian-torch layers
_GROUPS = (
    ("mu_weight", "rho_weight", "prior_weight_mu", "prior_weight_sigma"),
    ("mu_kernel", "rho_kernel", "prior_weight_mu", "prior_weight_sigma"),
    ("mu_bias", "rho_bias", "prior_bias_mu", "prior_bias_sigma"),
)


def kl_divergence(model: nn.Module) -> Tensor:
    """``KL(q || p)`` summed over every weight of every variational layer in ``model``.

    bayesian-torch's own ``kl_loss`` averages over the weights of each layer; the
    evidence lower bound needs the sum, which this returns (0 for a model
    without Bayesian layers).
    """
    total: Tensor | None = None
    for layer in bayesian_layers(model):
        for mu_name, rho_name, prior_mu_name, prior_sigma_name in _GROUPS:
            mu = getattr(layer, mu_name, None)
            if mu is None:
                continue
            sigma = nn.functional.softplus(getattr(layer, rho_name))
            prior_mu, prior_sigma = getattr(layer, prior_mu_name), getattr(layer, prior_sigma_name)
            kl = (
                torch.log(prior_sigma) - torch.log(sigma) + (sigma**2 + (mu - prior_mu) ** 2) / (2 * prior_sigma**2) - 0.5
            ).sum()
            total = kl if total is None else total + kl
    if total is None:  # on the model's device, to be added to that device's loss
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def kl_term(model: nn.Module, dataset_size: int, weight: float = 1.0) -> Tensor:
    """``weight * KL / dataset_size``: added to a per-sample mean loss it gives the
    negative ELBO per sample."""
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    return kl_divergence(model) * (weight / dataset_size)


def training_set_size(trainer: L.Trainer) -> int:
    """Number of training samples seen per epoch by ``trainer`` (its fit dataloader)."""
    loader: Any = trainer.train_dataloader
    if loader is None:
        raise ValueError("the trainer has no training dataloader yet")
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    batch_size = getattr(loader, "batch_size", None)
    if batch_size and trainer.num_training_batches != float("inf"):
        return int(trainer.num_training_batches * batch_size)
    raise ValueError("cannot infer the training-set size: pass dataset_size explicitly")


class KLDivergenceCallback(L.Callback):
    """Adds ``weight * KL / N`` to the training objective of ANY LightningModule.

    The user's module keeps its own loss; after its backward pass this callback
    back-propagates the KL term of the Bayesian layers of ``pl_module`` (or
    ``pl_module.<attribute>``), which adds exactly its gradient. ``N`` is
    ``dataset_size`` or the size of the training set. Logs ``train_kl`` (the
    unscaled summed KL).

    Outside Lightning's Trainer it needs ``dataset_size``, and keeps the KL in ``last_kl``
    instead of logging it. With Fabric, right after ``fabric.backward(loss)``: a plain model,
    ``fabric.call("on_after_backward", None, model)``; a LightningModule (Fabric would call its
    own ``on_after_backward()`` with these arguments too), ``callback.on_after_backward(None, module)``.

    Example::

        >>> from lightning_relief.bayes import KLDivergenceCallback
        >>> callback = KLDivergenceCallback(weight=1.0)
    """

    def __init__(self, dataset_size: int | None = None, weight: float = 1.0, attribute: str | None = None) -> None:
        if dataset_size is not None and dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1 or None, got {dataset_size}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.dataset_size = dataset_size
        self.weight = float(weight)
        self.attribute = attribute
        self._last_kl: Tensor | None = None

    @property
    def last_kl(self) -> float:
        """The KL of the last training step (0 before the first)."""
        return 0.0 if self._last_kl is None else float(self._last_kl)

    def _model(self, pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, self.attribute) if self.attribute else pl_module

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        if not bayesian_layers(model) or self.weight == 0:
            return
        with_trainer = isinstance(trainer, L.Trainer)
        if not with_trainer and self.dataset_size is None:
            raise ValueError(
                "KLDivergenceCallback outside Lightning's Trainer (e.g. through fabric.call) cannot find the "
                "training-set size: pass dataset_size=N"
            )
        size = self.dataset_size or training_set_size(trainer)
        kl = kl_divergence(model)
        # gradient accumulation divides each step's loss the same way (Fabric: the user's loop does its own)
        accumulate = trainer.accumulate_grad_batches if with_trainer else 1
        (kl * (self.weight / size / accumulate)).backward()
        self._last_kl = kl.detach()  # kept on the device: a float() here would wait for the GPU every step
        if with_trainer:
            pl_module.log("train_kl", kl.detach(), on_step=False, on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dataset_size": self.dataset_size, "weight": self.weight, "attribute": self.attribute}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset_size = state_dict["dataset_size"]
        self.weight = state_dict["weight"]
        self.attribute = state_dict["attribute"]
