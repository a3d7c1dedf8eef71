"""``MomentPropagationWrapper``: one analytic pass instead of Monte-Carlo sampling."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, fx, nn

from lightning_relief.models.spec import model_spec
from lightning_relief.moments import functional as MF
from lightning_relief.moments.convert import (
    Output,
    build_moment_graph,
    unreached_random_layers,
)

_OUTPUTS = ("moments", "probs", "log_probs")
_COVARIANCES = ("diagonal", "low_rank")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's network inside Fabric's ``_FabricModule``, ``torch.compile`` or ``DistributedDataParallel``.

    Those wrappers cannot be traced by ``torch.fx`` (they dispatch in Python at call time); the
    moments are the network's own. Precision casts that Fabric applies to inputs are not reproduced.
    """
    from lightning.fabric.wrappers import _FabricModule
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, _FabricModule):
            model = model.module
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


class MomentPropagationWrapper(nn.Module):
    """Propagate each activation's mean and variance through a network with dropout or Gaussian weights.

    The network is traced with ``torch.fx`` (so ``F.dropout``, ``F.relu``,
    ``torch.flatten`` and ``+`` in a ``forward`` are found, not only modules) and
    rebuilt as a graph that carries, per unit, a mean and a variance under the
    assumption that units are independent Gaussians (Brach et al. 2020). Dropout
    is modelled as it acts in MC dropout (active at test time, whatever the
    ``training`` flag); batch norm uses its running statistics. Layers before the
    first random operation run unchanged, once.

    Supported: ``Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (and their functional
    forms), ``BatchNorm1d/2d/3d`` (eval), ``LayerNorm``, ``GroupNorm`` (delta method), ReLU,
    LeakyReLU, PReLU (exact), Hardtanh/ReLU6/Hardsigmoid/``clamp`` (exact), Sigmoid, Tanh, GELU,
    SiLU, Mish, Softplus, ELU, CELU, SELU, Hardswish, Softsign, LogSigmoid (Gauss-Hermite
    quadrature; any other elementwise module through ``elementwise=``), ``Dropout`` (also
    ``1d/2d/3d``, alpha dropout and functional), ``MaxPool1d/2d`` (also ``ceil_mode``),
    ``AdaptiveMaxPool1d/2d`` and ``AdaptiveAvgPool1d/2d`` (equal windows), ``AvgPool1d/2d``,
    nearest ``Upsample``/``interpolate``, ``amax``, ``Flatten``, reshapes, ``+``/``-``/``*``/``/``,
    ``mean``/``sum``, ``cat``, softmax/log-softmax at the output (the logits' moments are
    returned, with a warning), ``MultiheadAttention`` (sampled from 64 fixed draws of its
    inputs, with a warning naming it; ``TransformerEncoderLayer`` is traced into), and
    bayesian-torch's ``LinearReparameterization``/``Conv*dReparameterization`` and flipout
    layers (weights ``N(mu, log1p(exp(rho))^2)``; their ``(out, kl)`` output is handled).
    A max pool after a convolution uses the covariance of neighbouring outputs (Clark's
    correlated maximum). Anything else raises
    :class:`~lightning_relief.moments.UnsupportedOperationError` naming the operation, its
    module path (``module_path``), type (``layer_type``), node and source line, and the
    supported modules. A dropout or Gaussian-weight layer that the trace does not reach
    (e.g. guarded by ``if self.training:``) is named in a warning.

    **Extension protocol.** A module that defines
    ``propagate_moments(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]``
    is not traced into: the wrapper calls that method with its input's moments
    (zero variance for a deterministic input) and uses the result. Its body must be
    plain tensor code (no branches on tensor values) to stay exportable. The
    wrapper itself implements the protocol, so wrapped networks nest.

    Args:
        model: the trained network (shared, not copied; it is put in eval mode). A network set
            up by Fabric, compiled or in ``DistributedDataParallel`` is unwrapped (:func:`unwrap`).
        output: what ``forward`` returns: ``"moments"`` the logits' ``(mean, var)``;
            ``"probs"`` class probabilities by a softmax approximation (``softmax``);
            ``"log_probs"`` their logarithm, which can stand in for logits (e.g. as the
            model of a ``ClassifierModule`` for test/predict: its softmax gives the
            probabilities, its cross-entropy their NLL).
        leaf_types: extra module classes not to trace into (they need a rule or
            ``propagate_moments``).
        softmax: the approximation of the expected softmax: ``"daunizeau"`` (pairwise
            sigmoids), ``"mean_field"`` (each logit scaled by ``1/sqrt(1 + pi v/8)``) or
            ``"logit_samples"``; see :func:`~lightning_relief.moments.functional.softmax_log_probs`.
        elementwise: module classes that act elementwise (custom activations): not traced
            into; their moments by Gauss-Hermite quadrature of the module itself.
        covariance: ``"diagonal"`` (per-unit variances), or ``"low_rank"``: noise sources that
            many units share (the masks of ``Dropout``/``F.dropout``, the weight draw of
            bayesian-torch convolutions) are followed through linear/conv/(leaky) ReLU/max-pool/
            flatten layers, and the logits get the covariance they induce, to first order: an
            adjoint sweep back from the C logits at the output
            (:mod:`~lightning_relief.moments.low_rank`). Fixes the variance where later layers sum
            units that share sources (an MLP with two dropout layers, a Bayesian CNN's classifier);
            costs about C transposed passes through the layers between the first source and the
            logits. Intermediate variances stay per unit.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> from lightning_relief import MomentPropagationWrapper
        >>> wrapper = MomentPropagationWrapper(MLP(in_features=64, dropout=0.2))
        >>> mean, var = wrapper(torch.randn(4, 1, 8, 8))
        >>> mean.shape, bool((var > 0).all())
        (torch.Size([4, 10]), True)
        >>> probs = wrapper.predict_proba(torch.randn(4, 1, 8, 8))  # Daunizeau's softmax approximation
        >>> torch.allclose(probs.sum(-1), torch.ones(4))
        True
        >>> sorted(wrapper.uncertainty(torch.randn(4, 1, 8, 8)))  # per-sample scores from the logit moments
        ['expected_entropy', 'mutual_information', 'predictive_entropy']
    """

    def __init__(
        self,
        model: nn.Module,
        output: Output = "moments",
        leaf_types: Sequence[type] = (),
        softmax: MF.SoftmaxMethod = "daunizeau",
        elementwise: Sequence[type] = (),
        covariance: Literal["diagonal", "low_rank"] = "diagonal",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = unwrap(model)
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        if softmax not in MF.SOFTMAX_METHODS:
            raise ValueError(f"softmax must be one of {MF.SOFTMAX_METHODS}, got {softmax!r}")
        bad = [t for t in leaf_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"leaf_types must be nn.Module subclasses, got {bad}")
        if covariance not in _COVARIANCES:
            raise ValueError(f"covariance must be one of {_COVARIANCES}, got {covariance!r}")
        bad = [t for t in elementwise if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"elementwise must be nn.Module subclasses, got {bad}")
        self.model = model.eval()
        self.output = output
        self.leaf_types = tuple(leaf_types)
        self.softmax = softmax
        self.elementwise = tuple(elementwise)
        self.covariance = covariance
        # constants created inside the traced forward: buffers so that .to() moves them, not saved
        self.constants = nn.Module()
        self._graphs: dict[tuple[bool, str], fx.GraphModule] = {}
        self._graph(random_input=False, output=output)  # trace now: unsupported operations fail here
        missed = unreached_random_layers(model, self.leaf_types + self.elementwise)
        if missed:
            warnings.warn(
                "moment propagation does not reach " + "; ".join(missed) + ": the trace (eval mode) skips them, "
                "so they contribute no variance (e.g. a dropout guarded by `if self.training:`)",
                stacklevel=2,
            )
        spec = model_spec(model)
        if spec is not None:  # lets ClassifierModule.load_from_checkpoint rebuild the wrapper
            self.init_args = {"model": spec, "output": output, "softmax": softmax, "covariance": covariance}

    def _graph(self, random_input: bool, output: Output) -> fx.GraphModule:
        key = (random_input, output)
        if key not in self._graphs:
            graph, constants = build_moment_graph(
                self.model, random_input=random_input, output=output, leaf_types=self.leaf_types, softmax=self.softmax,
                elementwise=self.elementwise, covariance=self.covariance,
            )  # fmt: skip
            for name, value in constants.items():
                if not hasattr(self.constants, name):
                    self.constants.register_buffer(name, value, persistent=False)
            graph.constants = self.constants
            self._graphs[key] = graph
        return self._graphs[key]

    @property
    def code(self) -> str:
        """The Python source of the generated ``forward`` (for inspection)."""
        return self._graph(False, self.output).code

    def forward(self, x: Tensor) -> Any:
        """``(mean, var)`` of the logits, or probabilities / log-probabilities (see ``output``)."""
        return self._graph(False, self.output)(x)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the logits for a deterministic input."""
        return self._graph(False, "moments")(x)

    def logit_moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and the shared noise sources ``[N, K, C]`` of the logits (``Cov = L^T L + diag(rest)``).

        With ``covariance="low_rank"`` the shared sources swept back from the logits; otherwise
        those of the last layer, when it is a linear one, from its inputs' per-unit variances (the
        classes' correlation that the per-unit modes imply). More sources than classes are
        compressed to ``K = C`` with the same covariance (a Cholesky factor); ``K = 0`` without any.
        """
        return self._graph(False, "factor")(x)

    def predict_proba(self, x: Tensor) -> Tensor:
        """Predictive class probabilities (the ``softmax`` approximation)."""
        return self._graph(False, "probs")(x)

    def uncertainty(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample ``predictive_entropy``, ``expected_entropy`` and ``mutual_information`` from the logit moments.

        See :func:`~lightning_relief.moments.functional.logit_uncertainty` (the C logits
        are sampled, with their correlation from :meth:`logit_moments`, after the one analytic
        pass; the network is not).
        """
        mean, var, factor = self.logit_moments(x)
        total, expected, mutual = MF.logit_uncertainty(mean, var, factor=factor)
        return {"predictive_entropy": total, "expected_entropy": expected, "mutual_information": mutual}

    def propagate_moments(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """The protocol: moments of the logits for a Gaussian input ``N(mean, var)``."""
        return self._graph(True, "moments")(mean, var)

    def probs_from_moments(self, mean: Tensor, var: Tensor) -> Tensor:
        """Class probabilities from logit moments (the wrapper's ``softmax`` approximation)."""
        return MF.softmax_probs(mean, var, method=self.softmax)

    def train(self, mode: bool = True) -> MomentPropagationWrapper:
        # the wrapped layers always run in eval mode: batch norm must use its running statistics,
        # and dropout is modelled analytically rather than sampled
        super().train(mode)
        self.model.eval()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_graphs"] = {}  # derived from the model; rebuilt on first use
        return state

    def extra_repr(self) -> str:
        return f"output={self.output!r}, softmax={self.softmax!r}"
