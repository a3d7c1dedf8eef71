"""Phase-change-memory (PCM) weight noise in plain torch: programming, drift, 1/f read noise.

The formulas are the published PCM model that IBM aihwkit implements as
``PCMLikeNoiseModel`` (Nandakumar et al. 2019; see ``reference.md`` §3). A
weight tensor is mapped to a pair of conductances (positive part on one
device, negative part on the other, the tensor's max |w| at ``g_max``); each
device gets programming noise, a drift exponent ν of its own, drift
``(t/t0)^-ν`` and accumulated 1/f read noise; the weight is read back from the
difference. Global drift compensation rescales the drifted weights so their
mean |w| equals the programmed one, as aihwkit's ``GlobalDriftCompensation``
does with its one-hot read-out.

Being plain tensor ops that never modify their input, it runs on any device
inside the training step; the strategy uses it to train weights that
survive drift. :func:`pcm_drifted_weights` is the one-shot evaluation form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_relief.noise.models import NoiseModel, input_abs_max, randn_like

G_MAX = 25.0  # µS
T0 = 20.0  # s, first read after programming
T_READ = 250e-9  # s
PROG_COEFF = (0.26348, 1.9650, -1.1731)  # µS, fitted at g_max = 25 µS
ONE_YEAR = 365 * 24 * 3600.0


def prog_noise_std(g_target: Tensor, g_max: float = G_MAX) -> Tensor:
    """σ_prog (µS) of programming a device to ``g_target`` (µS)."""
    g = g_target / g_max
    sigma = g.mul(PROG_COEFF[2]).add_(PROG_COEFF[1]).mul_(g).add_(PROG_COEFF[0])  # Horner: c0 + c1·g + c2·g²
    return sigma.mul_(g_max / G_MAX) if g_max != G_MAX else sigma


def drift_nu_params(g_target: Tensor, g_max: float = G_MAX) -> tuple[Tensor, Tensor]:
    """(μ_ν, σ_ν) of the drift exponent of a device at ``g_target``."""
    log_g = (g_target / g_max).abs_().clamp_(min=1e-7).log_()
    mu = log_g.mul(-0.0155).add_(0.0244).clamp_(0.049, 0.1)
    sigma = log_g.mul_(-0.0125).sub_(0.0059).clamp_(0.008, 0.045)
    return mu, sigma


def read_noise_q(g_prog: Tensor, g_max: float = G_MAX) -> Tensor:
    """Q_s of the 1/f read noise of a device at ``g_prog``."""
    # exp(0.65·ln ĝ) is ĝ^0.65, at a fraction of pow's cost on CPU
    g_pow = (g_prog.abs() / g_max).log_().mul_(0.65).exp_()
    return g_pow.clamp_(min=1e-3).reciprocal_().mul_(0.0088).clamp_(max=0.2)


def read_noise_time_factor(t_inference: float, t0: float = T0, t_read: float = T_READ) -> float:
    """sqrt(ln((t + t_read) / (2 t_read))) with t counted from the start of programming."""
    t = t_inference + t0
    return math.sqrt(math.log((t + t_read) / (2 * t_read)))


class PCMNoise(NoiseModel):
    """PCM weights at ``t`` seconds after programming; the level is ``t``.

    Args:
        g_max: conductance (µS) that the largest |w| of a tensor maps to.
        drift_compensation: rescale drifted weights to the programmed mean |w|
            (aihwkit's global drift compensation); without it the weights shrink
            by about ``(t/t0)^-0.05``.
        prog_noise_scale, read_noise_scale, drift_scale: scale each noise source
            (1.0 = the measured device; aihwkit's arguments of the same name).
        out_noise: on ``"outputs"``, the analog periphery's output noise
            (aihwkit's ``forward.out_noise``, 0.06 there), relative to
            max|x| of each input vector times max|w| and amplified by the
            drift compensation, as aihwkit applies it after drift. 0 models
            an ideal periphery (aihwkit's ``forward.is_perfect``).

    The defaults mirror aihwkit's inference preset: ``InferenceRPUConfig()``
    with ``PCMLikeNoiseModel(g_max=25)``, ``GlobalDriftCompensation()`` and
    ``mapping.weight_scaling_omega=1`` (what
    :func:`~lightning_relief.noise.aihwkit_backend.pcm_rpu_config` builds),
    noise on the weights and on every conv/linear output. Not modelled: its
    7-bit input and 9-bit output quantisation and its bound management.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(64, 32)
    >>> noisy = PCMNoise().apply(w, torch.tensor(3600.0), g, site="weights")
    >>> noisy.shape == w.shape and not torch.equal(noisy, w)
    True
    """

    level_kind: ClassVar[str] = "time"
    supported_sites: ClassVar[tuple[str, ...]] = ("weights", "outputs")
    default_sites: ClassVar[tuple[str, ...]] = ("weights", "outputs")
    default_level: ClassVar[float | None] = None

    def __init__(
        self,
        g_max: float = G_MAX,
        drift_compensation: bool = True,
        prog_noise_scale: float = 1.0,
        read_noise_scale: float = 1.0,
        drift_scale: float = 1.0,
        out_noise: float = 0.06,
        t0: float = T0,
        t_read: float = T_READ,
    ) -> None:
        for name, value in (("g_max", g_max), ("t0", t0), ("t_read", t_read)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (
            ("prog_noise_scale", prog_noise_scale), ("read_noise_scale", read_noise_scale),
            ("drift_scale", drift_scale), ("out_noise", out_noise),
        ):
            if not float(value) >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.g_max = float(g_max)
        self.drift_compensation = bool(drift_compensation)
        self.prog_noise_scale = float(prog_noise_scale)
        self.read_noise_scale = float(read_noise_scale)
        self.drift_scale = float(drift_scale)
        self.out_noise = float(out_noise)
        self.t0 = float(t0)
        self.t_read = float(t_read)
        self._gain: dict[int, Tensor] = {}  # per layer: this step's digital drift-compensation factor

    # -- the device model on a tensor of conductances (µS), any shape
    def program(self, g_target: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Programmed conductances and drift exponents ν of devices targeted at ``g_target``."""
        # in-place on fresh tensors only: a PCM step is a few dozen ops over every weight twice
        g_prog = randn_like(g_target, generator).mul_(prog_noise_std(g_target, self.g_max))
        if self.prog_noise_scale != 1.0:
            g_prog.mul_(self.prog_noise_scale)
        g_prog.add_(g_target).clamp_(min=0.0)
        mu_nu, sigma_nu = drift_nu_params(g_target, self.g_max)
        nu = randn_like(g_target, generator).mul_(sigma_nu).add_(mu_nu).abs_()
        if self.drift_scale != 1.0:
            nu.mul_(self.drift_scale)
        return g_prog, nu

    def drift(self, g_prog: Tensor, nu: Tensor, t_inference: float, generator: torch.Generator | None = None) -> Tensor:
        """Conductances ``t_inference`` seconds after programming (drift and 1/f noise)."""
        if t_inference < 0:
            raise ValueError(f"t_inference must be >= 0 seconds, got {t_inference}")
        t = t_inference + self.t0
        # (t/t0)^-ν; g_prog >= 0, so the drifted conductance is too
        g_drift = torch.mul(nu, -math.log(t / self.t0)).exp_().mul_(g_prog) if t_inference > 0 else g_prog
        sigma = read_noise_q(g_prog, self.g_max).mul_(self.read_noise_scale * read_noise_time_factor(t_inference, self.t0, self.t_read))
        return randn_like(g_prog, generator).mul_(sigma).mul_(g_drift).add_(g_drift).clamp_(min=0.0)

    def weights_at(self, w: Tensor, t_inference: float, generator: torch.Generator | None = None) -> Tensor:
        """``w`` programmed onto PCM pairs and read ``t_inference`` seconds later."""
        return self.weights_at_many([w], t_inference, generator)[0]

    def weights_at_many(self, weights: Sequence[Tensor], t_inference: float, generator: torch.Generator | None = None) -> list[Tensor]:
        """:meth:`weights_at` for several tensors (one chip, each tensor its own ``max|w| -> g_max`` scale).

        All tensors go through the device model as one flat batch: a training
        step costs the same few dozen tensor ops whatever the number of layers.
        """
        if not weights:
            return []
        sizes = [w.numel() for w in weights]
        flat = torch.cat([w.detach().reshape(-1) for w in weights])
        w_max = torch.stack([w.detach().abs().amax() for w in weights]).to(flat.dtype).clamp_(min=1e-7)
        scaled = flat  # cat's fresh copy: scaled in place, tensor by tensor (views: no gather)
        for part, factor in zip(torch.split(scaled, sizes), (self.g_max / w_max).unbind()):
            part.mul_(factor)
        g_target = torch.stack([scaled, -scaled]).clamp_(0.0, self.g_max)  # the pair: (g+, g-)
        g_prog, nu = self.program(g_target, generator)
        g_final = self.drift(g_prog, nu, t_inference, generator)
        inv_scales = (w_max / self.g_max).unbind()
        w_drift = torch.sub(g_final[0], g_final[1])
        w_prog = torch.sub(g_prog[0], g_prog[1]).split(sizes) if self.drift_compensation else [None] * len(sizes)
        gains = []
        for part, prog_part, inv_scale in zip(torch.split(w_drift, sizes), w_prog, inv_scales):
            part.mul_(inv_scale)
            if prog_part is not None:
                # global drift compensation: the programmed mean |w| over the drifted one, per tensor
                gain = prog_part.abs().mean().mul_(inv_scale).clamp_(min=1e-4) / part.abs().mean().clamp_(min=1e-4)
                part.mul_(gain)
                gains.append(gain)
        self._last_gains = torch.stack(gains) if gains else torch.ones(len(sizes), device=flat.device, dtype=flat.dtype)
        return [part.reshape(w.shape) for part, w in zip(torch.split(w_drift, sizes), weights)]

    def apply_weights(self, weights, level, generator=None, modules=None):
        noisy = self.weights_at_many(weights, _seconds(level), generator)
        if modules:
            self._gain = {id(m): g for m, g in zip(modules, self._last_gains) if m is not None}
        return noisy

    def apply(self, x, level, generator=None, site="weights", module=None, inputs=()):
        if site == "outputs":
            return self._output_noise(x, generator, module, inputs)
        if site != "weights":
            raise ValueError(f"PCMNoise models weights and outputs, got site {site!r}")
        t = _seconds(level)
        # straight-through: the forward sees PCM weights, the gradient flows to the clean weight
        return x + (self.weights_at(x.detach(), t, generator) - x.detach())


    def _output_noise(self, y: Tensor, generator, module, inputs) -> Tensor:
        """aihwkit's forward output noise, for tiles whose largest weight maps to 1
        (``weight_scaling_omega=1``): std ``out_noise·max|x|·max|w|`` per sample, amplified
        by the digital drift-compensation factor of this step."""
        if self.out_noise == 0.0:
            return y
        weight = getattr(module, "weight", None)
        if weight is None or not inputs:
            raise ValueError("PCMNoise output noise needs a layer with a weight (Conv/Linear)")
        gain = self._gain.get(id(module), 1.0)
        bound = input_abs_max(module, inputs[0], y) * (weight.detach().abs().amax() * gain * self.out_noise)
        # y + noise, both in y's layout (an addcmul with the (N, 1, ...) bound may pick channels-last)
        return y + randn_like(y, generator).mul_(bound)


def _seconds(level: Tensor | float) -> float:
    return float(level.reshape(-1)[0]) if isinstance(level, Tensor) else float(level)


def pcm_drifted_weights(w: Tensor, t_inference: float, seed: int = 0, **pcm_kwargs: float) -> Tensor:
    """One-shot: ``w`` after programming and ``t_inference`` seconds of drift (no autograd)."""
    generator = torch.Generator(device=w.device).manual_seed(seed)
    with torch.no_grad():
        return PCMNoise(**pcm_kwargs).weights_at(w, t_inference, generator)
