"""A Bayesian version of any model as one ``nn.Module`` (usable from recipes)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_relief.bayes.convert import BayesLayerType, to_bayesian
from lightning_relief.models.spec import model_spec


class BayesianModel(nn.Module):
    """``model`` with its Linear/Conv layers turned into bayesian-torch variational layers.

    A recipe can name it as a ``ClassifierModule``'s model; the ClassifierModule
    then adds the KL term (``kl_weight``) and rebuilds it from the checkpoint
    alone when ``model`` is one of our models. ``forward`` returns logits only.
    Arguments are those of :func:`~lightning_relief.bayes.convert.to_bayesian`.

    Example::

        >>> import torch
        >>> from lightning_relief.models import LeNet5
        >>> bnn = BayesianModel(LeNet5(input_size=8), prior_sigma=0.5)
        >>> tuple(bnn(torch.randn(2, 1, 8, 8)).shape)
        (2, 10)
        >>> bnn.init_args["model"]["class_path"]
        'lightning_relief.models.lenet.LeNet5'
    """

    def __init__(
        self,
        model: nn.Module,
        prior_mu: float = 0.0,
        prior_sigma: float = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -3.0,
        type: BayesLayerType = "Reparameterization",
        moped_enable: bool = False,
        moped_delta: float = 0.5,
    ) -> None:
        super().__init__()
        prior: dict[str, Any] = dict(
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            posterior_mu_init=posterior_mu_init,
            posterior_rho_init=posterior_rho_init,
            type=type,
            moped_enable=moped_enable,
            moped_delta=moped_delta,
        )
        spec = model_spec(model)
        self.model = to_bayesian(model, **prior)
        # rebuildable from a checkpoint only when the inner model is (see models.spec)
        self._init_args = {"model": spec, **prior} if spec is not None else None

    @property
    def init_args(self) -> dict[str, Any] | None:
        return self._init_args

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out
