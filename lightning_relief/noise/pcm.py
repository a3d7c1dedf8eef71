"""Phase-change-memory (PCM) weight noise in plain torch: programming, drift, 1/f read noise.

The formulas are the published PCM model that IBM aihwkit implements as
``PCMLikeNoiseModel`` (Nandakumar et al. 2019; see ``reference.md`` §3). A
weight tensor is mapped to a pair of conductances (positive part on one
device, negative part on the other, the tensor's max |w| at ``g_max``); each
device gets programming noise, a drift exponent ν of its own, drift
``(t/t0)^-ν`` and accumulated 1/f read noise; the weight is read back from the
difference. Global drift compensation rescales the drifted weights by the
programmed mean |w| over the drifted one, each read as aihwkit's
``GlobalDriftCompensation`` reads it: one-hot inputs through the tile's
periphery, so every read weight carries the output noise.

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

from lightning_relief.noise.models import Draws, NoiseModel, add_noise, input_abs_max, randn_like, randn_like_shape

G_MAX = 25.0  # µS
T0 = 20.0  # s, first read after programming
T_READ = 250e-9  # s
PROG_COEFF = (0.26348, 1.9650, -1.1731)  # µS, fitted at g_max = 25 µS
ONE_YEAR = 365 * 24 * 3600.0
_LN2 = math.log(2.0)
_LOG2_Q0 = math.log2(0.0088)
_BLOCK = 1 << 15  # weights per block of PCMNoise's device pass: its (3, 2, block) temporaries fit a 1 MB L2


def prog_noise_std(g_target: Tensor, g_max: float = G_MAX) -> Tensor:
    """σ_prog (µS) of programming a device to ``g_target`` (µS)."""
    return _prog_std_of(g_target / g_max).mul_(g_max)


def _prog_std_of(g_hat: Tensor, scale: float = 1.0, out: Tensor | None = None) -> Tensor:
    """``scale``·σ_prog in units of g_max of a device at ``g_hat`` = g / g_max (the fit scales with g_max)."""
    c0, c1, c2 = (scale * c / G_MAX for c in PROG_COEFF)
    inner = _affine(g_hat, c2, c1, out=out)
    return torch.addcmul(_const(c0, g_hat), inner, g_hat, out=inner)  # Horner: c0 + c1·ĝ + c2·ĝ²


def drift_nu_params(g_target: Tensor, g_max: float = G_MAX) -> tuple[Tensor, Tensor]:
    """(μ_ν, σ_ν) of the drift exponent of a device at ``g_target``."""
    return _drift_nu_of((g_target / g_max).abs_())


def _drift_nu_of(g_hat: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(μ_ν, σ_ν) of devices at ``g_hat``; ``out``: a ``(2, *g_hat.shape)`` tensor to write both into."""
    mu_out, sigma_out = (None, None) if out is None else out.unbind()
    ln_g = _ln(g_hat, 1e-7, out=sigma_out)
    mu = _affine(ln_g, -0.0155, 0.0244, out=mu_out).clamp_(0.049, 0.1)
    sigma = _affine(ln_g, -0.0125, -0.0059, out=ln_g).clamp_(0.008, 0.045)
    return mu, sigma


def _ln(x: Tensor, floor: float, out: Tensor | None = None) -> Tensor:
    """ln max(x, floor) (the floor keeps zeros out: log of 0 takes a slow path, 6x slower). Plain
    ``log``: 0.3-0.7 ns per element on this CPU (torch 2.14), where ``log1p(x - 1)`` takes 2-3 ns."""
    return torch.clamp(x, min=floor, out=out).log_()


def read_noise_q(g_prog: Tensor, g_max: float = G_MAX) -> Tensor:
    """Q_s of the 1/f read noise of a device at ``g_prog`` (µS, >= 0)."""
    return _read_q_of(g_prog / g_max)


def _read_q_of(g_hat: Tensor, out: Tensor | None = None) -> Tensor:
    """Q_s of devices at ``g_hat`` = g / g_max (>= 0); ``out=g_hat`` computes it in place."""
    # min(0.0088 / max(ĝ^0.65, 1e-3), 0.2) = min(2^(log2 0.0088 - 0.65 ln ĝ / ln 2), 0.2): the 1e-3
    # floor only matters where the 0.2 ceiling already holds (below ĝ = 0.0083); the floor keeps zeros
    # out of the logarithm, and exp2 runs at a fraction of exp's cost on CPU
    ln_g = _ln(g_hat, 1e-6, out=out)
    return _affine(ln_g, -0.65 / _LN2, _LOG2_Q0, out=ln_g).exp2_().clamp_(max=0.2)


def _affine(x: Tensor, scale: float, shift: float, out: Tensor | None = None) -> Tensor:
    """``scale·x + shift`` in one pass over ``x`` (two in-place ops make two)."""
    return torch.add(_const(shift, x), x, alpha=scale, out=out)


_CONSTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _const(value: float, like: Tensor) -> Tensor:
    """A cached 0-d tensor of ``value`` on ``like``'s device: building one per call (``new_tensor``)
    costs more than the op it feeds on a small model, and a step uses a dozen. Only for values from a
    fixed set (formula coefficients, a model's scales), never per step: the cache keeps every value."""
    key = (value, like.dtype, like.device)
    const = _CONSTS.get(key)
    if const is None:
        const = _CONSTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return const


def _per_tensor(values: Tensor) -> list[float] | list[Tensor]:
    """One factor per weight tensor: numbers on a CPU (no device to wait for, and an op with a number
    dispatches once, where ``unbind`` dispatches per tensor), 0-d tensors on an accelerator (no sync)."""
    return values.tolist() if values.device.type == "cpu" else list(values.unbind())


# the idle device of a pair (target 0 µS): its σ_prog, μ_ν and σ_ν, once
_PROG_STD_IDLE = float(_prog_std_of(torch.zeros(())))
_NU_IDLE = tuple(float(v) for v in _drift_nu_of(torch.zeros(())))


def read_noise_time_factor(t_inference: float, t0: float = T0, t_read: float = T_READ) -> float:
    """sqrt(ln((t + t_read) / (2 t_read))) with t counted from the start of programming."""
    t = t_inference + t0
    return math.sqrt(math.log((t + t_read) / (2 * t_read)))


class PCMNoise(NoiseModel):
    """PCM weights at ``t`` seconds after programming; the level is ``t``.

    Args:
        g_max: conductance (µS) that the largest |w| of a tensor maps to.
        drift_compensation: rescale drifted weights to the programmed mean |w|
            (aihwkit's global drift compensation, whose one-hot readouts carry
            ``out_noise``); without it the weights shrink by about ``(t/t0)^-0.05``.
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
            if not 0 < float(value) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in (
            ("prog_noise_scale", prog_noise_scale),
            ("read_noise_scale", read_noise_scale),
            ("drift_scale", drift_scale),
            ("out_noise", out_noise),
        ):
            if not 0 <= float(value) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.g_max = float(g_max)
        self.drift_compensation = bool(drift_compensation)
        self.prog_noise_scale = float(prog_noise_scale)
        self.read_noise_scale = float(read_noise_scale)
        self.drift_scale = float(drift_scale)
        self.out_noise = float(out_noise)
        self.t0 = float(t0)
        self.t_read = float(t_read)
        self._work: Tensor | None = None
        self._out_scale: dict[int, float | Tensor] = {}  # per layer: out_noise · max|w| · this step's drift-compensation factor

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_work"] = None  # scratch memory: not worth pickling with a checkpointed callback
        return state

    def _workspace(self, like: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Scratch memory for a pass over ``n`` weights, kept while ``n`` stays (on a CPU, fresh memory
        costs a page fault per 4 KiB, more than the arithmetic on it): three rows of ``n`` and the
        ``(3, 2, block)`` temporaries of the device pass."""
        block = min(n, _BLOCK)
        size = 3 * n + 6 * block  # grows with n: one size, one layout
        work = self._work
        if work is None or work.numel() != size or work.dtype != like.dtype or work.device != like.device:
            work = self._work = torch.empty(size, dtype=like.dtype, device=like.device)
        return work[: 3 * n].view(3, n), work[3 * n :].view(3, 2, block)

    def weights_at(self, w: Tensor, t_inference: float, generator: Draws = None) -> Tensor:
        """``w`` programmed onto PCM pairs and read ``t_inference`` seconds later."""
        return self.weights_at_many([w], t_inference, generator)[0]

    def weights_at_many(self, weights: Sequence[Tensor], t_inference: float, generator: Draws = None) -> list[Tensor]:
        """:meth:`weights_at` for several tensors (one chip, each tensor its own ``max|w| -> g_max`` scale).

        All tensors go through the device model as one flat batch, in scratch
        memory kept across calls: a training step costs the same few dozen
        tensor ops whatever the number of layers. Each weight ``w`` maps to a
        pair of devices, row 0 at ĝ = |w| / max|w| (units of ``g_max``), row 1
        (its idle partner) at 0; ``sign(w)`` says which of the two held it.
        """
        if not weights:
            return []
        if t_inference < 0:
            raise ValueError(f"t_inference must be >= 0 seconds, got {t_inference}")
        sizes = [w.numel() for w in weights]
        n = sum(sizes)
        rows, temps = self._workspace(weights[0], n)
        reads, flat = rows[0:2], rows[2]
        torch.cat([w.detach().reshape(-1) for w in weights], out=flat)
        g_hat = torch.abs(flat, out=reads[1])  # reads[1] is free until the drifted readout
        w_max = torch.stack([part.amax() for part in g_hat.split(sizes)]).clamp_(min=1e-7)
        torch._foreach_mul_(list(g_hat.split(sizes)), _per_tensor(w_max.reciprocal()))
        # drift: g·(t/t0)^-ν = g / 2^(ν·L) with L = log2(t/t0)·drift_scale, a number (a 0-d constant per
        # step would be a new tensor per step)
        t = t_inference + self.t0
        log_t = self.drift_scale * math.log2(t / self.t0) if t_inference > 0 else 0.0
        factor = self.read_noise_scale * read_noise_time_factor(t_inference, self.t0, self.t_read)
        # all draws up front, for all weights: the result does not depend on the block size
        eps_prog = randn_like_shape(flat, reads.shape, generator)
        eps_nu = randn_like_shape(flat, reads.shape, generator)
        eps_read = randn_like_shape(flat, reads.shape, generator) if factor > 0 else None
        w_drift = torch.empty_like(flat)
        block = temps.shape[-1]
        for lo in range(0, n, block):
            # a block's temporaries stay in cache: over all weights at once (19 MB at 32 px) each of the
            # pass's ~30 ops would stream them through memory
            hi = min(lo + block, n)
            g_prog, expo, scratch = temps[:, :, : hi - lo].unbind()
            self._read_back(
                g_hat[lo:hi],
                eps_prog[:, lo:hi],
                eps_nu[:, lo:hi],
                None if eps_read is None else eps_read[:, lo:hi],
                log_t,
                factor,
                g_prog,
                expo,
                scratch,
                reads[0, lo:hi],
                w_drift[lo:hi],
            )
        w_drift.mul_(flat.sign_())  # the weight's sign says which device held it
        factors = w_max  # conductance 1 (g_max) reads as the tensor's max |w|
        if self.drift_compensation:
            # global drift compensation: the programmed mean |w| over the drifted one, per tensor, as
            # aihwkit's GlobalDriftCompensation reads them: one-hot inputs through the tile's periphery,
            # so each read weight carries the output noise (units of max|w|); it inflates the smaller,
            # drifted readout more, and the factor falls short of the true ratio (1.86 for 2.0 at a year)
            reads[1].copy_(w_drift)
            if self.out_noise > 0:
                reads.add_(randn_like_shape(flat, reads.shape, generator), alpha=self.out_noise)
            # both readouts' mean |w| per tensor (a sum of conductances times max|w| over the count)
            means = torch.stack([part.sum(1) for part in reads.abs_().split(sizes, dim=1)], dim=1)
            means = means.mul_(factors / flat.new_tensor(sizes)).clamp_(min=1e-4)
            gains = means[0] / means[1]
            factors = factors * gains
        else:
            gains = torch.ones_like(w_max)
        parts = w_drift.split(sizes)
        torch._foreach_mul_(list(parts), _per_tensor(factors))
        self._last_gains = gains
        self._last_factors = factors  # clean max|w| times the compensation: the scale of each tile's output
        return [part.view(w.shape) for part, w in zip(parts, weights)]

    def _read_back(
        self,
        g_hat: Tensor,
        eps_prog: Tensor,
        eps_nu: Tensor,
        eps_read: Tensor | None,
        log_t: float,
        factor: float,
        g_prog: Tensor,
        expo: Tensor,
        scratch: Tensor,
        programmed: Tensor,
        out: Tensor,
    ) -> None:
        """The device pairs of weights ``g_hat``: ``out`` = the pair's conductance difference read
        back after drift, ``programmed`` = that difference right after programming; ``g_prog``,
        ``expo`` and ``scratch`` are ``(2, len(g_hat))`` temporaries (row 1: the idle device)."""
        # programming: the idle device's σ_prog, μ_ν and σ_ν are constants, so the device formulas run
        # over the weights once, not twice; the draws may be read-only pool slices (results go out=)
        sigma_prog = _prog_std_of(g_hat, self.prog_noise_scale, out=scratch[0])
        torch.addcmul(g_hat, sigma_prog, eps_prog[0], out=g_prog[0])
        torch.mul(eps_prog[1], _PROG_STD_IDLE * self.prog_noise_scale, out=g_prog[1])
        g_prog.clamp_(min=0.0)
        if log_t > 0:
            mu, sigma_nu = _drift_nu_of(g_hat, out=expo)
            mu.addcmul_(sigma_nu, eps_nu[0])
            mu_zero, sigma_zero = _NU_IDLE
            _affine(eps_nu[1], sigma_zero, mu_zero, out=expo[1])
            expo.abs_().mul_(log_t).exp2_()  # 2^(ν·L), ν ~ |N(μ_ν, σ_ν²)|
        if self.drift_compensation:
            torch.sub(g_prog[0], g_prog[1], out=programmed)
        # 1/f read noise: g_drift·(1 + f·Q_s(g_prog)·ε) >= 0 iff its second factor is (g_drift >= 0)
        g_final = g_prog
        if eps_read is not None:
            g_final = _read_q_of(g_prog, out=scratch)
            torch.addcmul(_const(1.0, g_final), g_final, eps_read, value=factor, out=g_final)
            g_final.clamp_(min=0.0).mul_(g_prog)
        if log_t > 0:
            g_final = torch.div(g_final, expo, out=scratch)
        torch.sub(g_final[0], g_final[1], out=out)  # the pair reads row 0 minus row 1

    def apply_weights(self, weights, level, generator=None, modules=None):
        noisy = self.weights_at_many(weights, _seconds(level), generator)
        if modules:
            # the output noise's std per unit input, per layer: out_noise times the clean max|w| times
            # the digital drift compensation
            scales = _per_tensor(self._last_factors * self.out_noise)
            self._out_scale = {id(m): scale for m, scale in zip(modules, scales) if m is not None}
        return noisy

    def apply(self, x, level, generator=None, site="weights", module=None, inputs=(), inplace=False):
        if site == "outputs":
            return self._output_noise(x, generator, module, inputs, inplace)
        if site != "weights":
            raise ValueError(f"PCMNoise models weights and outputs, got site {site!r}")
        t = _seconds(level)
        # straight-through: the forward sees PCM weights, the gradient flows to the clean weight
        return x + (self.weights_at(x.detach(), t, generator) - x.detach())

    def _output_noise(self, y: Tensor, generator, module, inputs, inplace: bool = False) -> Tensor:
        """aihwkit's forward output noise, for tiles whose largest weight maps to 1
        (``weight_scaling_omega=1``): std ``out_noise·max|x|·max|w|`` per sample, amplified
        by the digital drift-compensation factor of this step."""
        if self.out_noise == 0.0:
            return y
        weight = getattr(module, "weight", None)
        if weight is None or not inputs:
            raise ValueError("PCMNoise output noise needs a layer with a weight (Conv/Linear)")
        scale = self._out_scale.get(id(module))
        if scale is None:  # no weight noise on this layer this step: its weights as they are
            scale = weight.detach().abs().amax() * self.out_noise
        bound = input_abs_max(module, inputs[0], y)
        if isinstance(scale, Tensor):  # an accelerator's factor stays there
            bound, scale = bound.mul_(scale), 1.0
        return add_noise(y, randn_like(y, generator), bound, inplace, value=scale)  # y first: the result keeps y's layout


def _seconds(level: Tensor | float) -> float:
    if not isinstance(level, Tensor):
        return float(level)
    return float(level if level.dim() == 0 else level.reshape(-1)[0])


def pcm_drifted_weights(w: Tensor, t_inference: float, seed: int = 0, **pcm_kwargs: float) -> Tensor:
    """One-shot: ``w`` after programming and ``t_inference`` seconds of drift (no autograd)."""
    generator = torch.Generator(device=w.device).manual_seed(seed)
    with torch.no_grad():
        return PCMNoise(**pcm_kwargs).weights_at(w, t_inference, generator)
