"""Post-hoc temperature scaling (Guo et al., 2017): one scalar ``T`` fitted on held-out data.

``softmax(z / T)`` keeps every prediction's top class and only changes its
confidence; ``T`` minimises the negative log-likelihood of held-out labels.
``z`` may be logits or log-probabilities: a deep ensemble's mixture
(``log mean_m p_m``), Monte-Carlo dropout or BNN means (``log mean_s p_s``)
and moment-propagation probabilities (``log p``) all scale the same way,
``p_c^(1/T) / sum_k p_k^(1/T)``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_relief.uncertainty.temperature import apply_temperature, fit_temperature
    >>> gen = torch.Generator().manual_seed(0)
    >>> target = torch.randint(0, 5, (500,), generator=gen)
    >>> logits = 4 * torch.randn(500, 5, generator=gen) + 3 * nn.functional.one_hot(target, 5)  # overconfident
    >>> temperature = fit_temperature(logits, target)
    >>> temperature.item() > 1
    True
    >>> model = apply_temperature(nn.Linear(3, 5), temperature)  # its forward now returns z / T
    >>> model.relief_temperature == temperature.item()
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relief.nn.structure import record_structure, structure_of

__all__ = ["NotIdentifiableError", "apply_temperature", "fit_temperature", "temperature_of"]

_REBUILD = "lightning_relief.uncertainty.temperature:rebuild_temperature"
_ATTR = "relief_temperature"
_FORWARD = "_relief_temperature_forward"


class NotIdentifiableError(ValueError):
    """The held-out data cannot determine a temperature (every sample is classified correctly)."""


def _check_scores(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating-point [N, C], got {logits.dtype} of shape {tuple(logits.shape)}")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [N] with N={logits.shape[0]}, got shape {tuple(target.shape)}")
    if target.numel() == 0:
        raise ValueError("temperature scaling needs at least one sample")
    if int(target.min()) < 0 or int(target.max()) >= logits.shape[1]:
        raise ValueError(f"target labels must lie in [0, {logits.shape[1] - 1}], got {target.min()}..{target.max()}")
    # -inf is a valid log-probability (a class the mixture rules out); NaN and +inf are not
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf")


def fit_temperature(logits: Tensor, target: Tensor, max_iter: int = 200) -> Tensor:
    """The ``T > 0`` minimising ``mean NLL(softmax(logits / T), target)``, as a 0-d float tensor.

    Optimises ``log T`` with L-BFGS (strong-Wolfe line search) in float64, from ``T = 1``.
    Raises :class:`NotIdentifiableError` when every sample's label has the top score: the NLL
    then only falls as ``T -> 0`` (one wrong sample makes it grow without bound there) and no
    temperature minimises it; L-BFGS would stop at some small ``T`` and make the model almost
    one-hot on new data.
    """
    _check_scores(logits, target)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    z = logits.detach().double().cpu()
    y = target.detach().long().cpu()
    if bool((z.gather(1, y[:, None]).squeeze(1) >= z.amax(1)).all()):
        raise NotIdentifiableError(
            f"all {len(y)} samples are classified correctly: the NLL keeps falling as T -> 0, so no temperature "
            "minimises it; fit T on held-out data the model gets partly wrong (more or harder samples)"
        )
    # finite stand-in for -inf: dividing -inf by T stays -inf, but its gradient would be NaN
    z = torch.where(torch.isneginf(z), torch.full_like(z, -1e4), z)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise RuntimeError(f"temperature fit diverged (T={temperature}); are the labels and logits aligned?")
    return torch.tensor(temperature, dtype=torch.float32)


class _TemperatureForward:
    """Instance-level ``forward``: the module's own forward (or the one installed before), divided by ``T``.

    A bound method on the instance rather than a forward hook: ``torch.export`` (and so the TVM
    export) reads ``forward``, and copies and pickles of the module carry it along.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.__dict__.get("forward")  # e.g. a deep ensemble's member forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs) if self.inner is not None else type(self.module).forward(self.module, *args, **kwargs)
        return out / self.module.__dict__[_ATTR]


def temperature_of(module: nn.Module) -> float | None:
    """The temperature installed on ``module`` by :func:`apply_temperature` (None if there is none)."""
    value = module.__dict__.get(_ATTR)
    return None if value is None else float(value)


def apply_temperature(module: nn.Module, temperature: float | Tensor) -> nn.Module:
    """Make ``module``'s forward return its output divided by ``temperature`` (in place; returns ``module``).

    Applying again replaces the temperature (it does not compound). The step is recorded
    (:mod:`lightning_relief.nn.structure`), so ``load_from_checkpoint`` of a module saved
    afterwards restores it.
    """
    value = _install(module, temperature)
    previous = [s for s in structure_of(module) if s["rebuild"] == _REBUILD]
    if previous:
        previous[-1]["spec"]["temperature"] = value
    else:
        record_structure(module, _REBUILD, {"temperature": value})
    return module


def _install(module: nn.Module, temperature: float | Tensor) -> float:
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if _FORWARD not in module.__dict__:
        runner = _TemperatureForward(module)
        module.__dict__[_FORWARD] = runner
        module.__dict__["forward"] = runner.forward
    module.__dict__[_ATTR] = value
    return value


def rebuild_temperature(module: nn.Module, spec: dict[str, Any]) -> None:
    """Structure replay: reinstall the temperature saved in a checkpoint (the replay records the step)."""
    _install(module, spec["temperature"])
