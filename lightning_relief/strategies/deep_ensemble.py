"""Train a deep ensemble of the user's own LightningModule with a Trainer strategy."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from typing_extensions import override

from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.nn.structure import record_structure
from lightning_relief.noise.injector import step_seed
from lightning_relief.strategies._private_tensors import privatize_shared_tensors
from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.sampling import member_dataloader
from lightning_relief.uncertainty.stacking import (
    detached_copy,
    member_forward,
    num_members,
    reinitialize,
    select_members,
    set_member_tensors,
    stack_members,
    stack_states,
)

MODES = ("vectorized", "sequential", "distributed")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_REBUILD = "lightning_relief.uncertainty.stacking:stack_members"
# checkpoint key of the per-rank random states (see ``save_checkpoint``)
_RNG_KEY = "deep_ensemble_rng_states"


class DeepEnsembleStrategy(DDPStrategy):
    """Train ``num_members`` independent copies of the user's LightningModule as a deep ensemble.

    The module's class is not changed. At setup its parameters and buffers are
    replaced by stacked ``[M, ...]`` tensors (member ``g`` re-initialised with
    ``reset_parameters`` under seed ``seed + g``), so the module's own
    ``configure_optimizers`` builds one optimizer that updates every member in
    one step (an ``Adam``, ``AdamW`` or ``SGD`` built without ``fused``/``foreach``
    is switched to torch's fused step: one kernel per stacked tensor), and its
    ``state_dict``/checkpoints hold every member.

    - ``mode="vectorized"``: all members run in one step on one device with
      ``torch.func.functional_call`` + ``vmap`` (dropout draws a different mask
      per member; BatchNorm keeps per-member running statistics, updated inside
      ``vmap``).
    - ``mode="sequential"``: the same step with a Python loop over members: the
      plain reference.
    - ``mode="distributed"``: Lightning's DDP launcher starts one process per
      device; each holds ``num_members / world_size`` members (vectorized) and
      trains them on the whole data set with NO gradient averaging (the module is
      not wrapped in ``DistributedDataParallel``). Evaluation gathers member
      outputs from every rank; at the end of each run every rank, and the main
      process, holds all members.

    Training: each member gets its own batch from its own seeded order of the
    data (``bootstrap=True``: sampled with replacement). The user's
    ``training_step`` receives the ``M`` batches concatenated along dim 0, calls
    ``self(x)`` as usual, and member ``m``'s prediction comes from chunk ``m``;
    the returned loss is multiplied by ``M`` so each member gets the gradient of
    its own mean loss. Logged training metrics are averages over members.

    Validation/test/predict: ``self(x)`` returns ``log(mean_m softmax(f_m(x)))``,
    so the module's own metrics (and ``predict_step``'s softmax) are those of
    the mixture. The strategy adds ``{val,test}_ensemble_{nll,acc,brier,
    entropy,mutual_info,disagreement}`` and ``..._member_{nll,acc}`` (mean over
    members) when batches are ``(inputs, integer targets, ...)``.
    ``return_member_outputs=True`` makes ``predict`` return
    ``{"prediction": ..., "member_probs": [M, N, C]}``.

    Arguments: ``num_members`` (M); ``mode``; ``seed`` (member ``g`` is initialised
    under ``seed + g`` and draws its data order from ``(seed, g, epoch)``);
    ``bootstrap`` (sample each member's epoch with replacement);
    ``reinitialize`` (``False``: every member starts from the module's current
    weights and members differ only by data order and dropout);
    ``return_member_outputs`` (predict also returns member probabilities);
    ``start_method`` (``"popen"`` as Lightning's DDP; processes started by
    torchrun/SLURM are used as they are), ``process_group_backend``, ``timeout``
    (distributed mode; members are split over the global ranks of all nodes).

    Checkpoints hold every member's weights and optimizer state and every
    rank's random states, so a distributed run resumed from an epoch-end
    checkpoint continues exactly as if it had not stopped. In distributed mode
    each rank reseeds its torch generators from ``(initial seed, rank)`` at
    setup, so members on different ranks draw their own dropout masks.

    Requirements: ``forward`` takes the input tensor first and returns logits;
    ``training_step`` gets its predictions through ``self(...)`` and returns a
    loss that is a mean over the batch; automatic optimization; no tied weights.
    Recurrent layers (``nn.RNNBase``) need ``mode="sequential"``: ``vmap`` has no
    batching rule for them (``UnsupportedLayerError`` at setup otherwise).
    Gradient clipping by norm sees all members together.

    Example::

        >>> import lightning as L
        >>> import torch
        >>> from lightning_relief import ClassifierModule, DeepEnsembleStrategy, DigitsDataModule
        >>> from lightning_relief.models import LeNet5
        >>> from lightning_relief.uncertainty import ensemble_model
        >>> module = ClassifierModule(LeNet5(input_size=8))
        >>> trainer = L.Trainer(strategy=DeepEnsembleStrategy(num_members=3), accelerator="cpu", devices=1,
        ...                     max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, DigitsDataModule())
        >>> probs = module.eval()(torch.randn(4, 1, 8, 8)).exp()  # the mixture's probabilities
        >>> tuple(probs.shape), torch.allclose(probs.sum(-1), torch.ones(4))
        ((4, 10), True)
        >>> ensemble_model(module, "model").num_members  # plain members, one exportable graph
        3
    """

    strategy_name = "deep_ensemble"

    def __init__(
        self,
        num_members: int = 5,
        mode: Literal["vectorized", "sequential", "distributed"] = "vectorized",
        seed: int = 0,
        bootstrap: bool = False,
        reinitialize: bool = True,
        return_member_outputs: bool = False,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.num_members = num_members
        self.mode = mode
        self.seed = seed
        self.bootstrap = bool(bootstrap)
        self.reinitialize = bool(reinitialize)
        self.return_member_outputs = bool(return_member_outputs)
        self._local_members: list[int] = list(range(num_members))
        self._sharded = False  # True while each rank holds only its own members

    # ------------------------------------------------------------------ processes
    @property
    def distributed(self) -> bool:
        return self.mode == "distributed"

    @property
    def local_members(self) -> list[int]:
        """Global indices of the members this process trains."""
        return list(self._local_members)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # the module must hold its stacked members before a checkpoint's tensors load
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank sees all the data: members differ by their own order, not by shards
        return {"num_replicas": 1, "rank": 0}

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.distributed:
            self._launcher = None
        elif self._start_method == "popen" or self.cluster_environment.creates_processes_externally:
            # torchrun/SLURM started the processes already: the script launcher then starts none
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _EnsembleLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        if self.distributed:
            super().setup_environment()
            return
        # without a process group every node (or externally started process) would train all members
        assert self.cluster_environment is not None
        external = int(os.environ.get("WORLD_SIZE", "1")) if self.cluster_environment.creates_processes_externally else 1
        if self.num_processes != 1 or self.num_nodes != 1 or external != 1:
            raise ValueError(
                f"mode={self.mode!r} trains every member in one process, got devices={self.num_processes}, "
                f"num_nodes={self.num_nodes}, WORLD_SIZE={external}; use devices=1 and num_nodes=1 in one "
                "process, or mode='distributed' to spread members over processes and nodes"
            )
        super(DDPStrategy, self).setup_environment()

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if not module.automatic_optimization:
            raise ValueError("DeepEnsembleStrategy needs automatic optimization (automatic_optimization=True)")
        if self.distributed:
            privatize_shared_tensors(module)  # fork/forkserver ranks would otherwise step one shared copy
        self._prepare_members(module)
        if self.distributed:
            # seed_everything (and Lightning's reset_seed) seed every rank alike: the k-th member of each
            # rank would draw the same dropout masks. A resumed run loads each rank's saved states over this.
            torch.manual_seed(step_seed(torch.initial_seed(), self.global_rank, 0))
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            for optimizer in self.optimizers:
                _fuse_step(optimizer)

    def _prepare_members(self, module: Any) -> None:
        world, rank = (self.world_size, self.global_rank) if self.distributed else (1, 0)
        if self.num_members % world:
            raise ValueError(f"num_members={self.num_members} must be divisible by the {world} processes")
        if self.mode != "sequential":
            _check_vmappable(module, self.mode)
        per_rank = self.num_members // world
        self._local_members = list(range(rank * per_rank, (rank + 1) * per_rank))
        held = num_members(module)
        if held == 0:
            self._stack_fresh(module)
            # a reloaded module runs its members the same way (recurrent layers cannot be vectorized)
            execution = "sequential" if self.mode == "sequential" else "vectorized"
            record_structure(module, _REBUILD, {"num_members": self.num_members, "execution": execution})
        elif held != self.num_members:
            raise ValueError(f"the module already holds {held} ensemble members, but num_members={self.num_members}")
        elif per_rank != held:
            select_members(module, self._local_members)
        forward = member_forward(module)
        forward.execution = "sequential" if self.mode == "sequential" else "vectorized"
        self._sharded = per_rank != self.num_members
        forward.gather = self._gather_members_dim if self._sharded else None

    def _stack_fresh(self, module: Any) -> None:
        states: list[dict[str, Tensor]] = []
        uncovered: list[str] = []
        # draw members on a private copy: the module's tensors may sit in memory shared with
        # the main process and the other ranks (forkserver/spawn launchers)
        template = detached_copy(module) if self.reinitialize else module
        for member in self._local_members:
            if self.reinitialize:
                uncovered = reinitialize(template, self.seed + member)
            states.append({n: t.detach().clone() for n, t in [*template.named_parameters(), *template.named_buffers()]})
        if uncovered:
            rank_zero_warn(
                f"DeepEnsembleStrategy: no reset_parameters covers {uncovered}; members start from the same "
                "values there and differ only through data order and dropout"
            )
        stack_states(module, states)

    # ------------------------------------------------------------------ gathering
    def _gather_members_dim(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``[k, ...]`` tensor along dim 0 in rank order."""
        if not (self._sharded and _distributed_is_initialized()):
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def _stacked_names(self) -> set[str]:
        module = self.lightning_module
        return {n for n, _ in [*module.named_parameters(), *module.named_buffers()]}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if not self._sharded:
            return state
        stacked = self._stacked_names()
        # every rank takes part in the gathers (Lightning dumps checkpoints on all ranks)
        return {k: self._gather_members_dim(v) if k in stacked else v for k, v in state.items()}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._sharded:
            stacked = self._stacked_names()
            lo, hi = self._local_members[0], self._local_members[-1] + 1
            state = {k: v[lo:hi] if k in stacked else v for k, v in checkpoint["state_dict"].items()}
            checkpoint = {**checkpoint, "state_dict": state}
        super().load_model_state_dict(checkpoint, strict=strict)

    def _gather_all_members(self) -> None:
        if not self._sharded:
            return
        module = self.lightning_module
        tensors = {n: self._gather_members_dim(t.detach()) for n, t in [*module.named_parameters(), *module.named_buffers()]}
        set_member_tensors(module, tensors)
        self._sharded = False
        self._local_members = list(range(self.num_members))
        member_forward(module).gather = None

    # ------------------------------------------------------------------ optimizer state and RNG in checkpoints
    def _member_params(self, optimizer: Optimizer) -> list[bool]:
        """For each parameter of ``optimizer`` in ``state_dict`` order: is it a stacked member tensor?"""
        stacked = {id(p) for p in self.lightning_module.parameters()}
        return [id(p) in stacked for group in optimizer.param_groups for p in group["params"]]

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if not self._sharded:
            return state
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        members = self._member_params(inner)
        params = [p for group in inner.param_groups for p in group["params"]]
        gathered: dict[int, dict[str, Any]] = {}
        # every rank takes part in the same gathers in the same order (sorted keys): each rank's
        # per-member state (momentum, Adam moments) goes into the checkpoint, not only rank 0's
        for index in sorted(state["state"]):
            entry = state["state"][index]
            gathered[index] = {
                key: self._gather_members_dim(value)
                if members[index] and isinstance(value, Tensor) and value.shape == params[index].shape
                else value
                for key, value in sorted(entry.items())
            }
        return {**state, "state": gathered}

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._sharded:
            lo, hi = self._local_members[0], self._local_members[-1] + 1
            states = []
            for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
                members = self._member_params(optimizer)
                local = {
                    index: {
                        key: value[lo:hi]
                        if members[index] and isinstance(value, Tensor) and value.ndim and value.shape[0] == self.num_members
                        else value
                        for key, value in entry.items()
                    }
                    for index, entry in opt_state["state"].items()
                }
                states.append({**opt_state, "state": local})
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)
        self._restore_rng(checkpoint.get(_RNG_KEY))

    def _restore_rng(self, states: list[dict[str, Any]] | None) -> None:
        # called while a fit resumes (with the optimizers): nothing draws from the generators between
        # here and the first training iterator, as nothing did after the save in the uninterrupted run
        if states is None:
            return
        world = self.world_size if self.distributed else 1
        if len(states) != world:
            rank_zero_warn(
                f"DeepEnsembleStrategy: the checkpoint holds random states of {len(states)} processes, this run has "
                f"{world}; weights and optimizer states resume exactly, dropout draws do not"
            )
            return
        _set_rng_states(states[self.global_rank if self.distributed else 0])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # dropout masks and the data loaders' base seeds come from each process's global generators:
        # keep every rank's, so a resumed run draws what the uninterrupted run would have drawn
        states = [_rng_states()]
        if self.distributed and _distributed_is_initialized():
            states = [None] * self.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(states, _rng_states())
        super().save_checkpoint({**checkpoint, _RNG_KEY: states}, filepath, storage_options=storage_options)

    @override
    def on_train_end(self) -> None:
        self._gather_all_members()

    @override
    def on_validation_end(self) -> None:
        if self.lightning_module.trainer.state.fn == TrainerFn.VALIDATING:
            self._gather_all_members()

    @override
    def on_test_end(self) -> None:
        self._gather_all_members()

    @override
    def on_predict_end(self) -> None:
        self._gather_all_members()

    # ------------------------------------------------------------------ data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage == RunningStage.TRAINING:
            return member_dataloader(dataloader, self._local_members, self.seed, self.bootstrap)  # type: ignore[arg-type]
        return dataloader

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        forward = member_forward(self.lightning_module)
        calls = forward.calls
        message = (
            "DeepEnsembleStrategy: training_step must get its predictions through the module's forward, "
            "self(x) (not self.model(x)), so that each member runs on its own batch"
        )
        try:
            with forward.using("members"):
                output = super().training_step(*args, **kwargs)
        except Exception as err:
            if forward.calls == calls:  # the stacked weights were used outside the member forward
                raise RuntimeError(message) from err
            raise
        if forward.calls == calls:
            raise RuntimeError(message)
        return _scale_loss(output, len(self._local_members))

    def _evaluate(self, hook: str, prefix: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        forward = member_forward(self.lightning_module)
        forward.last_member_log_probs = None
        with forward.using("mixture"):
            output = getattr(super(), hook)(*args, **kwargs)
        self._log_member_metrics(prefix, args[0] if args else kwargs.get("batch"), forward.last_member_log_probs)
        return output

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("validation_step", "val", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("test_step", "test", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        forward = member_forward(self.lightning_module)
        forward.last_member_log_probs = None
        with forward.using("mixture"):
            output = super().predict_step(*args, **kwargs)
        if not self.return_member_outputs:
            return output
        log_probs = forward.last_member_log_probs
        return {"prediction": output, "member_probs": None if log_probs is None else log_probs.exp()}

    def _log_member_metrics(self, prefix: str, batch: Any, log_probs: Tensor | None) -> None:
        if log_probs is None:
            return
        module = self.lightning_module
        member_probs = log_probs.exp()
        probs = member_probs.mean(0)
        n = probs.shape[0]
        values = {
            "entropy": U.predictive_entropy(probs).mean(),
            "mutual_info": U.mutual_information(member_probs).mean(),
            "disagreement": U.disagreement(member_probs),
        }
        target = batch[1] if isinstance(batch, Sequence) and len(batch) > 1 else None
        if isinstance(target, Tensor) and target.ndim == 1 and target.shape[0] == n and not target.is_floating_point():
            values["nll"] = U.negative_log_likelihood(probs, target)
            values["acc"] = (probs.argmax(-1) == target).float().mean()
            values["brier"] = U.brier_score(probs, target)
            values["member_nll"] = torch.stack([U.negative_log_likelihood(p, target) for p in member_probs]).mean()
            values["member_acc"] = (member_probs.argmax(-1) == target).float().mean()
        for name, value in values.items():
            key = f"{prefix}_{name}" if name.startswith("member") else f"{prefix}_ensemble_{name}"
            module.log(key, value, on_step=False, on_epoch=True, batch_size=n)


def _check_vmappable(module: Any, mode: str) -> None:
    # torch.func has no batching rule for the fused RNN kernels (aten::gru.input, aten::lstm.input...)
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.RNNBase):
            raise UnsupportedLayerError(
                f"DeepEnsembleStrategy(mode={mode!r})",
                name,
                sub,
                hint="torch.func.vmap has no batching rule for recurrent layers; use mode='sequential' "
                "(a loop over the members) for this model",
            )


# the optimizers whose __init__(fused=True) only sets these attributes besides the param groups' flag
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _fuse_step(optimizer: Optimizer) -> None:
    """Turn on ``fused`` for an Adam, AdamW or SGD built without ``fused``/``foreach``.

    The members make few, ``M`` times larger tensors: one fused kernel per tensor instead of a dozen
    element-wise ops (Adam on 5 stacked MLPs: 0.33 -> 0.11 ms a step on one CPU thread). The update is
    the same algorithm; an explicit ``fused``/``foreach`` of the user is kept.
    """
    if type(optimizer) not in _FUSABLE:  # a subclass may have its own step
        return
    groups = optimizer.param_groups
    supported = _get_fused_kernels_supported_devices()
    if any(g.get("fused") is not None or g.get("foreach") is not None or g.get("differentiable") for g in groups):
        return
    if not all(p.is_floating_point() and p.device.type in supported for g in groups for p in g["params"]):
        return
    for group in groups:
        group["fused"] = True
    optimizer.defaults["fused"] = True
    # what the constructor does for fused=True: GradScaler then hands the unscaling to the kernel
    optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
    if isinstance(optimizer, torch.optim.SGD):
        optimizer._need_device_dtype_check_for_fused = True  # type: ignore[attr-defined]


def _rng_states() -> dict[str, Any]:
    """This process's torch (CPU, CUDA), numpy and Python generator states, as tensors and plain
    Python values (so ``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # CUDA's generators only once CUDA is in use: reading them would initialise it
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = states["python"]
    random.setstate((version, tuple(internal), python_gauss))


def _scale_loss(output: Any, factor: int) -> Any:
    if factor == 1 or output is None:
        return output
    if isinstance(output, Tensor):
        return output * factor
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] * factor}
    return output


class _EnsembleLauncher(_MultiProcessingLauncher):
    """Spawn/fork launcher whose main process also ends up holding every member."""

    def _recover_results_in_main_process(self, worker_output: Any, trainer: Any) -> None:
        module = trainer.lightning_module
        strategy = self._strategy
        if worker_output.weights_path is not None and num_members(module) == 0:
            stack_members(module, {"num_members": strategy.num_members})
            record_structure(module, _REBUILD, {"num_members": strategy.num_members})
        super()._recover_results_in_main_process(worker_output, trainer)
