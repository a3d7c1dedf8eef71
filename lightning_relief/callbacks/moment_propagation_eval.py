"""Evaluate a trained module by moment propagation and log its uncertainty metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, Metric
from typing_extensions import override

from lightning_relief.moments.functional import SOFTMAX_METHODS, SoftmaxMethod, logit_uncertainty, softmax_probs
from lightning_relief.moments.metrics import MomentUncertainty
from lightning_relief.moments.wrapper import MomentPropagationWrapper
from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.metrics import (
    OODAUROC,
    ExpectedCalibrationError,
    NegativeLogLikelihood,
    PredictiveEntropy,
)

_STAGES = ("validate", "test")
_SCORES = ("entropy", "variance", "mutual_information")


class MomentPropagationEvalCallback(Callback):
    """Run every validation/test batch once more through moment propagation and log the metrics.

    The module's network (``pl_module.model`` when it exists, else ``pl_module``)
    is wrapped in a :class:`~lightning_relief.moments.MomentPropagationWrapper`,
    sharing its weights, at the start of each evaluation epoch; each batch gets
    the predictive probabilities of the moment-propagated logits (one pass, no
    sampling). At epoch end it logs ``{prefix}{stage}_acc``, ``_nll``, ``_ece``
    (15 bins), ``_entropy``, ``_mutual_information`` (the epistemic part, from the logit
    moments and the classes' correlation that a final linear layer gives them:
    :meth:`~lightning_relief.moments.MomentPropagationWrapper.logit_moments`,
    :class:`~lightning_relief.moments.MomentUncertainty`) and, with OOD data,
    ``{prefix}{stage}_ood_auroc`` (OOD = positive; score: predictive entropy, the mutual
    information, or the summed logit variance).
    OOD data is ``ood_dataloader`` or else the datamodule's ``ood_dataloader()``
    when it was configured with ``ood=...``.

    Under DDP the metrics are reduced from every rank's raw state (bin sums,
    scores) before they are computed, so they equal the one-process values on
    the same data (not a mean of per-rank values); each rank takes every
    ``world_size``-th OOD batch.

    Args:
        stages: when to evaluate: ``"validate"`` (every validation epoch of ``fit``
            and ``trainer.validate``) and/or ``"test"``.
        ood_dataloader: batches of out-of-distribution inputs (``x`` or ``(x, y)``).
        ood_score: ``"entropy"``, ``"mutual_information"`` or ``"variance"``.
        prefix: prefix of the logged names.
        softmax: ``"daunizeau"`` or ``"mean_field"`` (see ``MomentPropagationWrapper``).

    Example::

        >>> import lightning as L
        >>> from lightning_relief import ClassifierModule, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> from lightning_relief.callbacks.moment_propagation_eval import MomentPropagationEvalCallback
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[MomentPropagationEvalCallback()])
        >>> module, data = ClassifierModule(LeNet5(input_size=8)), DigitsDataModule(ood="rotate")
        >>> trainer.fit(module, data)
        >>> sorted(trainer.test(module, data, verbose=False)[0])[:3]
        ['mp_test_acc', 'mp_test_ece', 'mp_test_entropy']
    """

    def __init__(
        self,
        stages: Sequence[Literal["validate", "test"]] = ("test",),
        ood_dataloader: DataLoader | None = None,
        ood_score: Literal["entropy", "variance", "mutual_information"] = "entropy",
        prefix: str = "mp_",
        softmax: SoftmaxMethod = "daunizeau",
    ) -> None:
        super().__init__()
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        bad = [s for s in stages if s not in _STAGES]
        if bad or not stages:
            raise ValueError(f"stages must be a non-empty subset of {_STAGES}, got {stages!r}")
        if ood_score not in _SCORES:
            raise ValueError(f"ood_score must be one of {_SCORES}, got {ood_score!r}")
        if softmax not in SOFTMAX_METHODS:
            raise ValueError(f"softmax must be one of {SOFTMAX_METHODS}, got {softmax!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        self.stages = stages
        self.ood_dataloader = ood_dataloader
        self.ood_score = ood_score
        self.prefix = prefix
        self.softmax = softmax
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._wrapper: MomentPropagationWrapper | None = None
        self._metrics: dict[str, Metric] = {}

    # ---- collecting ----------------------------------------------------------------------------
    def _active(self, trainer: L.Trainer, stage: str) -> bool:
        return stage in self.stages and not trainer.sanity_checking

    def _start(self, pl_module: L.LightningModule) -> None:
        network = getattr(pl_module, "model", None)
        network = network if isinstance(network, nn.Module) else pl_module
        if isinstance(network, MomentPropagationWrapper):
            network = network.model
        self._wrapper = MomentPropagationWrapper(network)  # traced per epoch: follows structural changes
        # torchmetrics states reduce across ranks (sums, concatenated scores) when computed
        metrics: dict[str, Metric] = {
            "acc": MeanMetric(),
            "nll": NegativeLogLikelihood(),
            "ece": ExpectedCalibrationError(n_bins=15),
            "entropy": PredictiveEntropy(),
            "mutual_information": MomentUncertainty("mutual_information"),
            "ood_auroc": OODAUROC(),
        }
        self._metrics = {k: m.to(pl_module.device) for k, m in metrics.items()}

    @torch.no_grad()
    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self._wrapper is not None
        mean, var, factor = self._wrapper.logit_moments(x)  # the classes' correlation: for the mutual information
        return mean.float(), var.float(), factor.float()

    def _collect(self, batch: Any) -> None:
        x, y = batch[0], batch[1]
        mean, var, factor = self._moments(x)
        probs = softmax_probs(mean, var, method=self.softmax)
        self._metrics["acc"].update((probs.argmax(-1) == y).float())
        self._metrics["nll"].update(probs, y)
        self._metrics["ece"].update(probs, y)
        self._metrics["entropy"].update(probs)
        self._metrics["mutual_information"].update(mean, var, factor)
        self._metrics["ood_auroc"].update(self._score(probs, mean, var, factor), is_ood=False)

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer, "validate"):
            self._start(pl_module)

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer, "test"):
            self._start(pl_module)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer, "validate"):
            self._collect(batch)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer, "test"):
            self._collect(batch)

    # ---- metrics -------------------------------------------------------------------------------
    def _ood_loader(self, trainer: L.Trainer) -> Any:
        if self.ood_dataloader is not None:
            return self.ood_dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "ood", None) is not None and hasattr(datamodule, "ood_dataloader"):
            return datamodule.ood_dataloader()
        return None

    def _score(self, probs: Tensor, mean: Tensor, var: Tensor, factor: Tensor) -> Tensor:
        if self.ood_score == "entropy":
            return U.predictive_entropy(probs)
        return logit_uncertainty(mean, var, factor=factor)[2] if self.ood_score == "mutual_information" else var.sum(-1)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._metrics:
            return
        loader = self._ood_loader(trainer)
        if loader is not None:
            for index, batch in enumerate(loader):
                if index % trainer.world_size != trainer.global_rank:
                    continue
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                mean, var, factor = self._moments(x.to(pl_module.device))
                probs = softmax_probs(mean, var, method=self.softmax)
                self._metrics["ood_auroc"].update(self._score(probs, mean, var, factor), is_ood=True)
        short = "val" if stage == "validate" else "test"
        # every rank computes every metric (compute() is a collective), in the same order
        names = ["acc", "nll", "ece", "entropy", "mutual_information"] + (["ood_auroc"] if loader is not None else [])
        named = {f"{self.prefix}{short}_{k}": float(self._metrics[k].compute()) for k in names}
        for name, value in named.items():
            # already reduced over ranks: the mean over ranks of equal values is that value
            pl_module.log(name, value, sync_dist=True)
        self.last_metrics = named
        self.history.append({"epoch": float(trainer.current_epoch), **named})
        self._metrics, self._wrapper = {}, None

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer, "validate"):
            self._finish(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer, "test"):
            self._finish(trainer, pl_module, "test")

    # ---- state ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stages": list(self.stages),
            "ood_score": self.ood_score,
            "prefix": self.prefix,
            "softmax": self.softmax,
            "last_metrics": dict(self.last_metrics),
            "history": [dict(h) for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]
