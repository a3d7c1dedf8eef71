"""The reusable core of noise-aware training: hooks and weight perturbation on a model.

:class:`NoiseInjector` knows nothing about Lightning. It attaches forward hooks
(output/activation noise) and perturbs weights in place for the span of one
step, and it can be driven by any loop: the Lightning callback
:class:`lightning_relief.noise.callback.AnalogNoise` (and through it
``AnalogNoiseStrategy``) uses it, and so can plain PyTorch.

Weight noise is applied by overwriting the weights with a noisy copy before the
forward pass and writing the saved clean values back after the backward pass
(aihwkit's semantics: the forward and the input gradient see the noisy
weights, the weight gradient updates the clean ones). The copy is bit-exact.

Noise draws are a pure function of ``(seed, rank, batch)``: the noise
generator is re-seeded for each training batch (and for each evaluation batch
from its own counters), so a resumed run draws the same noise and every
data-parallel rank draws its own. Schedule draws (per-sample σ, random walk,
deployment times) use one generator seeded by ``seed`` alone, so every rank
gets the same level; its state is part of :meth:`NoiseInjector.state_dict`.
On CPU, training draws come from a :class:`~lightning_relief.noise.pool.NormalPool`
(``draws="auto"``), itself a function of ``(seed, rank, batch)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_relief.errors import UnsupportedLayerError
from lightning_relief.noise.models import NoiseModel
from lightning_relief.noise.placement import COMPUTE_LAYERS, Placement, as_placements, unsupported_layers
from lightning_relief.noise.pool import NormalPool
from lightning_relief.noise.schedules import Constant, Schedule

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, rank, step) over seed space
_POOL = 0x2545F4914F6CDD1D  # keeps the pool's seeds apart from the batches' seeds
DRAWS = ("auto", "fresh", "pool")
_OWN_OUTPUT = frozenset((nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * _MIX) ^ (rank * 0xBF58476D1CE4E5B9) ^ (step * 0x94D049BB133111EB)) % (2**63 - 1)


class NoiseInjector:
    """Injects ``noise`` at ``placement``, at the level ``schedule`` gives for each step.

    Example (plain PyTorch)::

        >>> import torch
        >>> from lightning_relief.models import MLP
        >>> from lightning_relief.noise import AdditiveGaussian, Constant, NoiseInjector
        >>> model = MLP()
        >>> injector = NoiseInjector(AdditiveGaussian(), Constant(0.1), "outputs").attach(model)
        >>> x = torch.randn(8, 1, 8, 8)
        >>> with injector.step(batch_size=8):
        ...     noisy = model(x)
        >>> clean = model(x)  # outside a step: no noise
        >>> injector.detach()
    """

    def __init__(
        self,
        noise: NoiseModel,
        schedule: Schedule | float | None = None,
        placement: Placement | str | Sequence[Placement | str] | None = None,
        seed: int = 0,
        draws: str = "auto",
    ) -> None:
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
        if not isinstance(noise, NoiseModel):
            raise TypeError(f"noise must be a NoiseModel (e.g. AdditiveGaussian()), got {type(noise).__name__}")
        if schedule is None:
            if noise.default_level is None:
                raise ValueError(f"a time-based noise model ({type(noise).__name__}) needs a schedule, e.g. DeploymentTime()")
            schedule = Constant(noise.default_level)
        elif isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
            try:
                schedule = Constant(float(schedule))
            except ValueError as err:
                raise ValueError(f"schedule: {err}") from None
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule or a number, got {type(schedule).__name__}")
        if schedule.kind is not None and schedule.kind != noise.level_kind:
            raise ValueError(
                f"schedule {type(schedule).__name__} gives a {schedule.kind} level but {type(noise).__name__} "
                f"needs a {noise.level_kind} level"
            )
        if noise.level_kind == "time" and isinstance(schedule, Constant) and not schedule.value > 0:
            raise ValueError(f"schedule: a drift time must be > 0 seconds, got {schedule.value}")
        placements = as_placements(placement, noise.default_sites)
        for p in placements:
            if p.site not in noise.supported_sites:
                raise ValueError(f"{type(noise).__name__} supports sites {noise.supported_sites}, got placement site {p.site!r}")
        if isinstance(seed, bool) or int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.noise = noise
        self.schedule = schedule
        self.placements = placements
        self.seed = int(seed)
        self.draws = draws
        self.pool = NormalPool(self._pool_seed)
        self.rank = 0
        self.batches_done = 0  # training batches drawn so far: the next batch's noise seed
        self.current_level: Tensor | None = None
        self.level_step: int | None = None  # the schedule step current_level was drawn for
        self.schedule_generator = torch.Generator().manual_seed(self.seed)
        self._generator: torch.Generator | None = None  # re-seeded for every batch, so it holds no state
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._weights: list[tuple[str, nn.Module]] = []
        self._saved: list[tuple[nn.Parameter, Tensor]] = []
        self._clean: list[Tensor] = []  # where _saved's clean weights live between steps
        self._level: Tensor | None = None  # set while a step is active
        self._step_generator: torch.Generator | NormalPool | None = None
        self.selected: dict[str, list[str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # spawn launchers pickle the trainer and its callbacks; generators travel as their state
        state = self.__dict__.copy()
        state["schedule_generator"] = self.schedule_generator.get_state()
        state["_generator"] = state["_step_generator"] = None
        state["_clean"] = []  # scratch memory
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng = state["schedule_generator"]
        self.__dict__.update(state)
        self.schedule_generator = torch.Generator()
        self.schedule_generator.set_state(rng)

    # -- attaching
    @property
    def attached(self) -> bool:
        return bool(self._handles or self._weights)

    def attach(self, model: nn.Module, rank: int = 0, plugin: str = "NoiseInjector") -> NoiseInjector:
        """Register the hooks on ``model`` (idempotent: re-attaching detaches first).

        Raises :class:`~lightning_relief.errors.UnsupportedLayerError` for a
        compute layer the placement covers but noise cannot reach (recurrent
        layers, attention), and ``ValueError`` for a placement that selects
        no layer: training never goes on silently without noise.
        """
        self.detach()
        self.rank = int(rank)
        for placement in self.placements:
            if placement.site != "activations":
                for name, module in unsupported_layers(model, placement):
                    raise UnsupportedLayerError(
                        plugin,
                        name,
                        module,
                        supported=COMPUTE_LAYERS,
                        hint=f"Its matrix products happen inside its own forward, out of reach of {placement.site} noise; "
                        f"leave it noise-free with Placement({placement.site!r}, exclude=[{name!r}])",
                    )
        selected: dict[str, list[str]] = {}
        seen: set[int] = set()
        for placement in self.placements:
            names = []
            for name, module in placement.select(model):
                names.append(name)
                if placement.site == "weights":
                    if id(module) not in seen:
                        seen.add(id(module))
                        self._weights.append((name, module))
                else:
                    self._handles.append(module.register_forward_hook(self._make_hook(placement.site)))
            if not names:
                self.detach()
                raise ValueError(
                    f"placement {placement!r} selects no layer of {type(model).__name__}: "
                    "fix its layers/names/exclude (noise would silently be off there)"
                )
            selected[placement.site] = selected.get(placement.site, []) + names
        self.selected = selected
        self._model = model
        return self

    def detach(self) -> None:
        """Remove all hooks and restore any perturbed weights."""
        self.restore_weights()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._weights = []
        self._clean = []
        self._level = None
        self._model = None

    def _make_hook(self, site: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._level is None or not isinstance(output, Tensor):
                return None
            # torch's own conv/linear layers keep no reference to their output for backward: the noise
            # goes into it in place (an activation-sized allocation costs more than the noise itself);
            # a subclass, or a nonlinearity whose backward reads its output (ReLU), gets a noisy copy
            inplace = site == "outputs" and type(module) in _OWN_OUTPUT
            return self.noise.apply(output, self._level, self._step_generator, site, module, args, inplace=inplace)

        return hook

    def _pool_seed(self, step: int) -> int:
        return step_seed(self.seed ^ _POOL, self.rank, step)

    def _device(self) -> torch.device:
        param = next(self._model.parameters(), None) if self._model is not None else None
        return param.device if param is not None else torch.device("cpu")

    def _pooled(self, device: torch.device) -> bool:
        # a CPU draws a Gaussian in 3-10 ns, more than the layer it perturbs; accelerators draw at memory speed
        return self.draws == "pool" or (self.draws == "auto" and device.type == "cpu")

    def _seeded(self, seed: int) -> torch.Generator:
        """The one noise generator, on the model's device, seeded with ``seed``."""
        device = self._device()
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(seed)

    def _placed(self, level: Tensor, generator: torch.Generator | NormalPool) -> Tensor:
        """A σ level moves to the noise's device once per step (every hook would otherwise copy it host
        -> device); a drift time stays on the host, where the drift model reads it as a number."""
        return level if self.noise.level_kind == "time" else level.to(generator.device)

    # -- a step
    def begin(self, level: Tensor, generator: torch.Generator | NormalPool) -> None:
        """Turn noise on at ``level``: perturb the weights and arm the hooks."""
        self.end()
        level = self._placed(level, generator)
        self._step_generator = generator
        self._level = level
        if self._weights:
            weight_level = level.reshape(-1)[0] if level.dim() else level  # one weight draw per batch
            # the weight is looked up now: a strategy may have replaced the parameter since attach
            # (DeepEnsembleStrategy stacks the members' weights at setup); tied weights are perturbed once
            params = list({id(m.weight): (m.weight, m) for _, m in self._weights}.values())
            tensors = [param for param, _ in params]
            with torch.no_grad():
                clean = self._clean_copies(tensors)
                torch._foreach_copy_(clean, tensors)  # one dispatch for all layers
                noisy = self.noise.apply_weights(clean, weight_level, generator, [m for _, m in params])
                torch._foreach_copy_(tensors, noisy)
            self._saved = list(zip(tensors, clean))

    def _clean_copies(self, tensors: list[Tensor]) -> list[Tensor]:
        """Memory for the clean weights, kept across steps while the weights keep their shapes (fresh
        memory costs a page fault per 4 KiB on a CPU, and five clones five dispatches)."""
        copies = self._clean
        if len(copies) != len(tensors) or any(
            c.shape != t.shape or c.dtype != t.dtype or c.device != t.device for c, t in zip(copies, tensors)
        ):
            copies = self._clean = [torch.empty_like(t) for t in tensors]
        return copies

    def deactivate(self) -> None:
        """Stop output/activation noise (weights stay perturbed until :meth:`restore_weights`)."""
        self._level = None

    def restore_weights(self) -> None:
        if self._saved:
            with torch.no_grad():
                torch._foreach_copy_([param for param, _ in self._saved], [clean for _, clean in self._saved])
        self._saved = []

    def end(self) -> None:
        self.deactivate()
        self.restore_weights()

    def begin_training_step(self, batch_size: int, step: int | None = None) -> Tensor:
        """Draw this batch's level, seed the noise and turn it on; returns the level.

        ``step`` is the schedule's step (the optimizer step: micro-batches of one
        accumulated step share it, and share one level, random or not; per-sample
        levels are drawn for each micro-batch's samples); default: the number of batches so far.
        """
        if self._model is None:
            raise RuntimeError("NoiseInjector.attach(model) must be called before a step")
        step = self.batches_done if step is None else int(step)
        if step == self.level_step and self.current_level is not None and self.current_level.dim() == 0:
            # another micro-batch of the same optimizer step: the same level (a random one is drawn once);
            # a per-sample level is drawn for each micro-batch's own samples
            level = self.current_level
        else:
            level = self.schedule.level(step, batch_size, self.schedule_generator)
        self.level_step = step
        seed = step_seed(self.seed, self.rank, self.batches_done)
        device = self._device()
        generator: torch.Generator | NormalPool
        if self._pooled(device):
            self.pool.begin(self.batches_done, seed, device)
            generator = self.pool
        else:
            generator = self._seeded(seed)
        level = self._placed(level, generator)  # the schedule's generator is on the CPU
        self.current_level = level
        self.batches_done += 1
        self.begin(level, generator)
        return level

    def eval_level(self, level: float | Tensor | None = None) -> Tensor:
        """``level``, or by default the mean of the last training level."""
        if level is None:
            if self.current_level is None:
                level = self.schedule.level(self.batches_done, 1, torch.Generator().manual_seed(self.seed))
            else:
                level = self.current_level
            level = level.float().mean()
        return torch.as_tensor(level, dtype=torch.float32)

    def begin_eval_step(self, key: int, level: float | Tensor | None = None) -> Tensor:
        """Turn noise on for an evaluation batch; its draws are a function of ``(seed, rank, key)``.

        ``key`` >= 0 names the batch (the caller builds it from the global step
        and batch index), so evaluation noise never depends on how many
        evaluations ran before, and a resumed run logs the same metrics.
        """
        if self._model is None:
            raise RuntimeError("NoiseInjector.attach(model) must be called before a step")
        level = self.eval_level(level)
        self.begin(level, self._seeded(step_seed(self.seed, self.rank, -1 - int(key))))
        return level

    @contextlib.contextmanager
    def step(self, batch_size: int = 1) -> Iterator[Tensor]:
        """A training step (plain PyTorch): noise on inside, weights restored on exit.

        Run the backward pass inside the block so gradients see the noisy weights.
        """
        level = self.begin_training_step(batch_size)
        try:
            yield level
        finally:
            self.end()

    # -- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_done": self.batches_done,
            "schedule": self.schedule.state_dict(),
            "schedule_rng": self.schedule_generator.get_state(),
            "current_level": None if self.current_level is None else self.current_level.detach().cpu(),
            "seed": self.seed,
            "level_step": self.level_step,
            "pool_size": self.pool.size,  # the pool is a function of its size and the step: resumed runs read the same
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_done = int(state["batches_done"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.schedule_generator.set_state(state["schedule_rng"])
        self.current_level = state.get("current_level")
        self.level_step = state.get("level_step")
        self.pool.size = int(state.get("pool_size", 0))
