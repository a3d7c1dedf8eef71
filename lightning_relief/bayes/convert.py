"""Turn a deterministic model into a Bayesian one with bayesian-torch's ``dnn_to_bnn``."""

from __future__ import annotations

import copy
from typing import Any, Literal

from torch import Tensor, nn

from lightning_relief.nn.structure import record_structure

_REBUILD = "lightning_relief.bayes.convert:rebuild_bayesian"
_TYPES = ("Reparameterization", "Flipout")


def bayesian_layers(model: nn.Module) -> list[nn.Module]:
    """The bayesian-torch variational layers inside ``model`` (they define ``kl_loss``)."""
    return [m for m in model.modules() if callable(getattr(m, "kl_loss", None)) and hasattr(m, "prior_weight_mu")]


def _prior(
    prior_mu: float,
    prior_sigma: float,
    posterior_mu_init: float,
    posterior_rho_init: float,
    type: str,
    moped_enable: bool,
    moped_delta: float,
) -> dict[str, Any]:
    if prior_sigma <= 0:
        raise ValueError(f"prior_sigma must be > 0, got {prior_sigma}")
    if type not in _TYPES:
        raise ValueError(f"type must be one of {_TYPES}, got {type!r}")
    if moped_enable and not 0 < moped_delta < 1:
        raise ValueError(f"moped_delta must be in (0, 1), got {moped_delta}")
    return {
        "prior_mu": float(prior_mu),
        # bayesian-torch names it prior_sigma here but stores it as the prior's standard deviation
        "prior_sigma": float(prior_sigma),
        "posterior_mu_init": float(posterior_mu_init),
        "posterior_rho_init": float(posterior_rho_init),
        "type": type,
        "moped_enable": bool(moped_enable),
        "moped_delta": float(moped_delta),
    }


def to_bayesian(
    model: nn.Module,
    prior_mu: float = 0.0,
    prior_sigma: float = 1.0,
    posterior_mu_init: float = 0.0,
    posterior_rho_init: float = -3.0,
    type: Literal["Reparameterization", "Flipout"] = "Reparameterization",
    moped_enable: bool = False,
    moped_delta: float = 0.5,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv layers are bayesian-torch variational layers.

    Gaussian posteriors ``N(mu, softplus(rho)^2)`` start at ``mu ~ N(posterior_mu_init,
    0.1)`` and ``rho ~ N(posterior_rho_init, 0.1)``, or, with ``moped_enable``, at the
    model's trained weights (``mu = w``, ``sigma = moped_delta * |w|``). The prior is
    ``N(prior_mu, prior_sigma^2)``. The converted layers return plain outputs.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> bnn = to_bayesian(MLP(in_features=4, hidden=(8,), num_classes=3))
        >>> len(bayesian_layers(bnn)), tuple(bnn(torch.randn(2, 4)).shape)
        (2, (2, 3))
    """
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    params = _prior(prior_mu, prior_sigma, posterior_mu_init, posterior_rho_init, type, moped_enable, moped_delta)
    if bayesian_layers(model):
        raise ValueError(f"{type_name(model)} already holds bayesian-torch layers")
    target = model if inplace else copy.deepcopy(model)
    dnn_to_bnn(target, params)
    if not bayesian_layers(target):
        raise ValueError(f"{type_name(model)} has no Linear or Conv layer to make Bayesian")
    return target


def type_name(model: nn.Module) -> str:
    return type(model).__name__


def make_bayesian(module: nn.Module, attribute: str = "model", **prior: Any) -> nn.Module:
    """Convert ``module.<attribute>`` (e.g. a ``ClassifierModule``'s model) and record the
    step so ``load_from_checkpoint`` rebuilds the Bayesian layers before loading weights.

    Validates everything before it changes ``module``; returns ``module``.
    """
    if not isinstance(getattr(module, attribute, None), nn.Module):
        raise ValueError(f"{type_name(module)} has no nn.Module attribute {attribute!r}")
    converted = to_bayesian(getattr(module, attribute), **prior)
    setattr(module, attribute, converted)
    record_structure(module, _REBUILD, {"attribute": attribute, "prior": prior})
    return module


def rebuild_bayesian(module: nn.Module, spec: dict[str, Any]) -> None:
    """Structure replay for :func:`make_bayesian` (see :mod:`lightning_relief.nn.structure`)."""
    setattr(module, spec["attribute"], to_bayesian(getattr(module, spec["attribute"]), **spec["prior"]))


class OutputOnly(nn.Module):
    """Wraps a model whose forward returns ``(out, kl)`` and returns ``out`` alone.

    The KL term is recomputed from the layers by
    :func:`~lightning_relief.bayes.kl.kl_divergence`, so nothing is lost.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
