"""Hold ``M`` ensemble members inside one module as stacked parameters.

:func:`stack_members` replaces every parameter and buffer of a module by a
tensor with a leading member dimension (``[M, *shape]``) under the same name,
so ``module.parameters()`` yields the stacked tensors: the user's own
``configure_optimizers`` then builds ONE optimizer that updates every member,
``state_dict`` holds every member, and checkpoints reload through the
structure record (:mod:`lightning_relief.nn.structure`).

The module's ``forward`` is replaced (on the instance only; the class is not
touched) by a function that calls a :class:`MemberForward` (see
:func:`member_forward`), which runs every member, either vectorized or in a plain loop ("sequential").
Vectorized, a model whose tensors all sit in ``Linear``, ``Conv1d``/``Conv2d``
and ``BatchNorm1d``/``BatchNorm2d`` layers runs its members folded into the
batch (:mod:`~lightning_relief.uncertainty.folded`: one plain forward, once it
matched vmap on a first batch); any other runs through ``torch.func.vmap``
over the stacked tensors. It has two modes:

- ``"members"``: the input holds one chunk per member along dim 0
  (``[M*N, ...]``); member ``m`` runs on chunk ``m`` and the outputs are
  concatenated the same way. Training uses it: each member sees its own batch,
  and BatchNorm statistics are computed per member.
- ``"mixture"`` (the default): every member runs on the same input and the
  forward returns ``log(mean_m softmax(f_m(x)))``. Anything that treats the
  output as logits (softmax, cross-entropy, accuracy) then sees the ensemble's
  mixture distribution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_relief._rng import isolated_seed
from lightning_relief.uncertainty.ensemble import EnsembleModel
from lightning_relief.uncertainty.folded import foldable, folded_forward

STACK_ATTR = "_relief_members"
RUNNER_ATTR = "_relief_member_forward"
_MODES = ("vectorized", "sequential")


class _ClassForward(nn.Module):
    """Calls the class's own ``forward`` of ``target``, bypassing the instance override."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.target).forward(self.target, *args, **kwargs)


class MemberForward:
    """The instance-level ``forward`` of a module that holds stacked members."""

    def __init__(self, module: nn.Module, execution: Literal["vectorized", "sequential"] = "vectorized") -> None:
        if execution not in _MODES:
            raise ValueError(f"execution must be one of {_MODES}, got {execution!r}")
        self.proxy = _ClassForward(module)
        self.execution = execution
        self.mode: Literal["members", "mixture"] = "mixture"
        # set by a distributed strategy: gathers [k, N, C] log-probs into [M, N, C]
        self.gather: Callable[[Tensor], Tensor] | None = None
        self.last_member_log_probs: Tensor | None = None
        self.calls = 0
        # members folded into the batch instead of vmap? decided per (autocast, input dtype) (see _folds)
        self.folding: dict[tuple[bool, torch.dtype], bool] = {}

    @property
    def module(self) -> nn.Module:
        return self.proxy.target

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        module = self.module
        params = {f"target.{n}": p for n, p in module.named_parameters()}
        buffers = {f"target.{n}": b for n, b in module.named_buffers()}
        return params, buffers

    def _run(self, inputs_batched: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        k = num_members(self.module)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            out = functional_call(self.proxy, (p, b), (x, *args[1:]), kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"an ensemble member's forward must return a Tensor of logits, got {type(out).__name__}")
            return out

        x = args[0]
        if inputs_batched and x.shape[0] % k:
            raise ValueError(f"members mode needs a batch of {k} equal chunks, got {x.shape[0]} rows")
        if self.execution == "vectorized":
            if self._folds(args, kwargs, inputs_batched, one):
                return self._folded(x, k, inputs_batched)
            return self._vmapped(one, x, k, inputs_batched)
        if inputs_batched:
            x = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        params, buffers = self._state()
        outs = []
        for m in range(k):
            p = {n: t[m] for n, t in params.items()}
            b = {n: t[m] for n, t in buffers.items()}
            outs.append(one(p, b, x[m] if inputs_batched else x))
        return torch.stack(outs)

    def _vmapped(self, one: Callable, x: Tensor, k: int, inputs_batched: bool) -> Tensor:
        params, buffers = self._state()
        if inputs_batched:
            x = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        return vmap(one, in_dims=(0, 0, 0 if inputs_batched else None), randomness="different")(params, buffers, x)

    def _folded(self, x: Tensor, k: int, inputs_batched: bool) -> Tensor:
        if not inputs_batched:
            x = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        out = folded_forward(self.module, x, k)
        return out.reshape(k, out.shape[0] // k, *out.shape[1:])

    def _folds(self, args: tuple[Any, ...], kwargs: dict[str, Any], inputs_batched: bool, one: Callable) -> bool:
        """Fold the members into the batch (:mod:`~lightning_relief.uncertainty.folded`) rather than vmap?

        Decided once per autocast state and input dtype, by one folded forward against vmap in eval
        mode on this call's input; exports and traces keep vmap.
        """
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        if len(args) != 1 or kwargs or tracing:
            return False
        x = args[0]
        key = (torch.is_autocast_enabled(x.device.type), x.dtype)
        if key not in self.folding:
            self.folding[key] = foldable(self.module) and self._folding_matches_vmap(x, inputs_batched, one)
        return self.folding[key]

    def _folding_matches_vmap(self, x: Tensor, inputs_batched: bool, one: Callable) -> bool:
        module, k = self.module, num_members(self.module)
        modes = [(m, m.training) for m in module.modules()]
        try:
            module.eval()
            with torch.no_grad():
                reference = self._vmapped(one, x, k, inputs_batched)
                folded = self._folded(x, k, inputs_batched)
        except Exception:  # e.g. a forward that hard-codes the batch size
            return False
        finally:
            for m, training in modes:
                m.training = training
        if folded.shape != reference.shape or folded.dtype != reference.dtype:  # e.g. autocast casts bmm otherwise
            return False
        return torch.allclose(folded, reference, rtol=1e-4, atol=1e-5)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError("an ensemble's forward takes the input tensor as its first positional argument")
        self.calls += 1
        if self.mode == "members":
            out = self._run(True, args, kwargs)
            return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])
        out = self._run(False, args, kwargs)
        log_probs = out.log_softmax(-1)
        if self.gather is not None:
            log_probs = self.gather(log_probs)
        self.last_member_log_probs = log_probs.detach()
        # log(mean(exp)) rather than logsumexp: TVM's Relax frontend has no amax; the clamp
        # only matters when every member gives a class less than ~1e-38
        mixture = log_probs.exp().mean(0)
        return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self(x, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles leave out per-run state: the strategy's gather function and the
        # last outputs (which are fake tensors after torch.export traced the module)
        return {**self.__dict__, "gather": None, "last_member_log_probs": None}

    @contextmanager
    def using(self, mode: Literal["members", "mixture"]) -> Iterator[MemberForward]:
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous


def num_members(module: nn.Module) -> int:
    """Members stacked in ``module`` (0 when it holds a plain model)."""
    return int(module.__dict__.get(STACK_ATTR, 0))


def member_forward(module: nn.Module) -> MemberForward:
    """The :class:`MemberForward` that runs ``module``'s stacked members."""
    runner = module.__dict__.get(RUNNER_ATTR)
    if not isinstance(runner, MemberForward):
        raise ValueError(f"{type(module).__name__} holds no stacked ensemble members")
    return runner


def _install_forward(module: nn.Module, runner: MemberForward) -> None:
    # a bound method, not a callable object: torch.export reads forward's code, and
    # spawn-based launchers pickle the module (a bound method pickles, a closure does not)
    module.__dict__[RUNNER_ATTR] = runner
    module.__dict__["forward"] = runner.forward


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attr


def _replace_tensors(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Swap every parameter and buffer of ``module`` for ``tensors[name]`` (parameters keep ``requires_grad``)."""
    for name, param in list(module.named_parameters()):
        owner, attr = _owner(module, name)
        owner._parameters[attr] = nn.Parameter(tensors[name], requires_grad=param.requires_grad)
    for name, _ in list(module.named_buffers()):
        owner, attr = _owner(module, name)
        owner._buffers[attr] = tensors[name]


def _check_untied(module: nn.Module) -> None:
    seen: dict[int, str] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(tensor) in seen:
            raise ValueError(f"tied tensors ({seen[id(tensor)]!r} and {name!r}) cannot be stacked into ensemble members")
        seen[id(tensor)] = name


def reinitialize(module: nn.Module, seed: int) -> list[str]:
    """Draw fresh weights for ``module`` with ``reset_parameters`` (or ``_reset_parameters``) under ``seed``.

    Returns the names of parameters that no ``reset_parameters`` covers (they
    keep their values).
    """
    covered: set[str] = set()
    with isolated_seed(seed):
        for prefix, sub in module.named_modules():
            # nn.MultiheadAttention (and others) only have the private form
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False))
    return [n for n, _ in module.named_parameters() if n not in covered]


def stack_states(module: nn.Module, states: list[dict[str, Tensor]], execution: str = "vectorized") -> None:
    """Replace ``module``'s tensors by ``stack(states)`` and install :class:`MemberForward`.

    ``states`` are ``{name: tensor}`` dicts with every parameter and buffer
    name of ``module`` (as in ``named_parameters``/``named_buffers``).
    """
    if not states:
        raise ValueError("need at least one member state to stack")
    _check_untied(module)
    _replace_tensors(
        module,
        {
            name: torch.stack([s[name].detach().to(t.device, t.dtype) for s in states])
            for name, t in [*module.named_parameters(), *module.named_buffers()]
        },
    )
    module.__dict__[STACK_ATTR] = len(states)
    _install_forward(module, MemberForward(module, execution))  # type: ignore[arg-type]


def member_state(module: nn.Module, index: int) -> dict[str, Tensor]:
    """Member ``index``'s tensors (clones) from a module that holds stacked members."""
    return {n: t[index].detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def stack_members(module: nn.Module, spec: dict[str, Any]) -> None:
    """Structure replay (see :mod:`lightning_relief.nn.structure`): give ``module``
    ``spec["num_members"]`` stacked members so a checkpoint's tensors fit.

    The values are placeholders, overwritten by the checkpoint's state dict.
    """
    count = int(spec["num_members"])
    if num_members(module) == count:
        return
    if num_members(module):
        raise ValueError(f"module holds {num_members(module)} members, the checkpoint {count}")
    plain = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    stack_states(module, [plain] * count, spec.get("execution", "vectorized"))


def unstack_members(module: nn.Module) -> None:
    """Undo :func:`stack_members`, keeping member 0 (used to roll back a failed setup)."""
    if not num_members(module):
        return
    _replace_tensors(module, member_state(module, 0))
    for attr in (STACK_ATTR, RUNNER_ATTR, "forward"):
        module.__dict__.pop(attr, None)


@contextmanager
def _without_trainer(module: nn.Module) -> Iterator[None]:
    # a LightningModule points at its Trainer: never deep-copy that along
    saved = {k: module.__dict__[k] for k in ("_trainer", "_fabric") if k in module.__dict__}
    for k in saved:
        module.__dict__[k] = None
    try:
        yield
    finally:
        module.__dict__.update(saved)


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that owns its memory and leaves any Trainer behind."""
    with _without_trainer(module):
        return copy.deepcopy(module)


def ensemble_model(module: nn.Module, submodule: str | None = None) -> EnsembleModel:
    """An :class:`EnsembleModel` of independent copies of each member.

    ``submodule`` picks the part of ``module`` that maps inputs to logits (for
    :class:`~lightning_relief.models.ClassifierModule` that is ``"model"``);
    ``None`` copies the whole module. The copies own plain tensors, so the
    result exports with ``torch.export`` as one graph.
    """
    count = num_members(module)
    if not count:
        raise ValueError(f"{type(module).__name__} holds no stacked ensemble members")
    target = module.get_submodule(submodule) if submodule else module
    prefix = f"{submodule}." if submodule else ""
    members = []
    with _without_trainer(module):
        template = copy.deepcopy(target)
    for attr in (STACK_ATTR, RUNNER_ATTR, "forward"):
        template.__dict__.pop(attr, None)
    for index in range(count):
        state = {n[len(prefix) :]: t for n, t in member_state(module, index).items() if n.startswith(prefix)}
        member = copy.deepcopy(template)
        _replace_tensors(member, state)
        members.append(member)
    return EnsembleModel(members)


def set_member_tensors(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Replace stacked tensors by ``tensors`` (same names, any member count), in place."""
    names = [n for n, _ in [*module.named_parameters(), *module.named_buffers()]]
    _replace_tensors(module, tensors)
    if names:
        module.__dict__[STACK_ATTR] = int(tensors[names[0]].shape[0])


def select_members(module: nn.Module, indices: list[int]) -> None:
    """Keep only members ``indices`` (in that order) of a module with stacked members."""
    index = torch.tensor(indices, dtype=torch.long)
    set_member_tensors(
        module,
        {n: t.detach()[index.to(t.device)].clone() for n, t in [*module.named_parameters(), *module.named_buffers()]},
    )
