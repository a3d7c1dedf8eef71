"""Turn a deterministic model into a Bayesian one with bayesian-torch's ``dnn_to_bnn``."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal, get_args

from torch import Tensor, nn

from lightning_relief.errors import UnsupportedLayerError, UnsupportedModelError
from lightning_relief.nn.structure import record_structure

_REBUILD = "lightning_relief.bayes.convert:rebuild_bayesian"
BayesLayerType = Literal["Reparameterization", "Flipout"]
_TYPES: tuple[str, ...] = get_args(BayesLayerType)


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


# deterministic layer type -> (bayesian-torch class stem, whether its kernel size is a plain int)
_CONVERTIBLE: dict[type[nn.Module], tuple[str, bool]] = {
    nn.Linear: ("Linear", False),
    nn.Conv1d: ("Conv1d", True),
    nn.Conv2d: ("Conv2d", False),
    nn.Conv3d: ("Conv3d", False),
    nn.ConvTranspose1d: ("ConvTranspose1d", True),
    nn.ConvTranspose2d: ("ConvTranspose2d", False),
    nn.ConvTranspose3d: ("ConvTranspose3d", False),
}
# layers with weights that stay deterministic, as in bayesian-torch's own models
_KEPT = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
SUPPORTED = tuple(cls.__name__ for cls in _CONVERTIBLE)


def _unsupported(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first layer whose weights ``to_bayesian`` would have to leave deterministic without saying so."""
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            return name, module  # its projections are used as raw tensors by F.multi_head_attention_forward
        if module.__class__ in _CONVERTIBLE or isinstance(module, _KEPT):
            continue
        has_weights = any(True for _ in module.parameters(recurse=False))
        if has_weights and not any(True for _ in module.children()):
            return name, module
    return None


def _warn_kept_parameters(model: nn.Module) -> None:
    """Parameters held directly by container modules (a positional embedding, say) stay deterministic."""
    kept = [
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if any(True for _ in module.children()) and not isinstance(module, _KEPT)
        for p, _ in module.named_parameters(recurse=False)
    ]
    if kept:
        warnings.warn(f"to_bayesian: parameters {kept} are not in a layer it converts and stay deterministic", stacklevel=3)


def _variational(layer: Any, params: dict[str, Any]) -> nn.Module:
    import bayesian_torch.layers as bayesian

    stem, int_kernel = _CONVERTIBLE[layer.__class__]
    cls = getattr(bayesian, stem + params["type"])
    prior = dict(
        prior_mean=params["prior_mu"],
        prior_variance=params["prior_sigma"],
        posterior_mu_init=params["posterior_mu_init"],
        posterior_rho_init=params["posterior_rho_init"],
        bias=layer.bias is not None,
    )
    if isinstance(layer, nn.Linear):
        new = cls(in_features=layer.in_features, out_features=layer.out_features, **prior)
        mu_weight, rho_weight = "mu_weight", "rho_weight"
    else:
        shape = dict(
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            # the 1-d layers build their kernel as (out, in, kernel_size) and need an int
            kernel_size=layer.kernel_size[0] if int_kernel else layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            shape["output_padding"] = layer.output_padding
        new = cls(**shape, **prior)
        mu_weight, rho_weight = "mu_kernel", "rho_kernel"
    if params["moped_enable"]:
        from bayesian_torch.utils.util import get_rho

        getattr(new, mu_weight).data.copy_(layer.weight.data)
        getattr(new, rho_weight).data.copy_(get_rho(layer.weight.data, params["moped_delta"]))
        if layer.bias is not None:
            new.mu_bias.data.copy_(layer.bias.data)
            new.rho_bias.data.copy_(get_rho(layer.bias.data, params["moped_delta"]))
    new.dnn_to_bnn_flag = True  # return the output alone, not (out, kl)
    return new.to(layer.weight.device)


def to_bayesian(
    model: nn.Module,
    prior_mu: float = 0.0,
    prior_sigma: float = 1.0,
    posterior_mu_init: float = 0.0,
    posterior_rho_init: float = -3.0,
    type: BayesLayerType = "Reparameterization",
    moped_enable: bool = False,
    moped_delta: float = 0.5,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers are bayesian-torch variational layers.

    Gaussian posteriors ``N(mu, softplus(rho)^2)`` start at ``mu ~ N(posterior_mu_init,
    0.1)`` and ``rho ~ N(posterior_rho_init, 0.1)``, or, with ``moped_enable``, at the
    model's trained weights (``mu = w``, ``sigma = moped_delta * |w|``). The prior is
    ``N(prior_mu, prior_sigma^2)``. The converted layers return plain outputs.
    Normalization layers and PReLU stay deterministic; any other layer with weights
    (recurrent layers, attention, custom layers) raises
    :class:`~lightning_relief.errors.UnsupportedLayerError` naming it, since leaving it
    deterministic would give a model that is only partly Bayesian without saying so.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> bnn = to_bayesian(MLP(in_features=4, hidden=(8,), num_classes=3))
        >>> len(bayesian_layers(bnn)), tuple(bnn(torch.randn(2, 4)).shape)
        (2, (2, 3))
    """
    params = _prior(prior_mu, prior_sigma, posterior_mu_init, posterior_rho_init, type, moped_enable, moped_delta)
    if bayesian_layers(model):
        raise ValueError(f"{type_name(model)} already holds bayesian-torch layers")
    found = _unsupported(model)
    if found is not None:
        raise UnsupportedLayerError(
            "to_bayesian",
            found[0],
            found[1],
            supported=SUPPORTED,
            hint="Convert the supported parts yourself (to_bayesian(model.part)) or replace the layer",
        )
    names = [name for name, m in model.named_modules() if m.__class__ in _CONVERTIBLE]
    if not names:
        raise UnsupportedModelError(
            "to_bayesian", model, f"it has no Linear or Conv layer to make Bayesian (supported: {', '.join(SUPPORTED)})"
        )
    _warn_kept_parameters(model)
    target = model if inplace else copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name)
        setattr(parent, child, _variational(getattr(parent, child), params))
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
