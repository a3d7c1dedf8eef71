"""Photonic sampler layers: Bayesian linear and conv layers whose weights are
chaotic-light intensities (the physical model is in :mod:`lightning_relief.photonic.physics`).

Every weight is a differential pair of non-negative intensities ``w = I+ - I-``.
Per sample each intensity is Gaussian around a trainable amplitude ``a`` with
relative spread ``s = sqrt(2·f_e/f_o)``, so ``E[w] = a+ - a-`` and
``Var[w] = s^2 (a+^2 + a-^2)``. The bandwidth ratio ``f_e/f_o`` is fixed,
one trainable value per layer, or one per weight, always inside physical bounds.

Sampling
    A forward pass draws one sample per example. Inside
    :func:`lightning_relief.photonic.photonic_samples` (used by
    :func:`~lightning_relief.photonic.sample_logits`) the batch is ``K`` stacked
    copies of the input, sample-major, and sample ``k`` is wavelength channel
    ``k``: consecutive samples share ``correlation`` of their fluctuation. When
    told the raw batch size, the first photonic layer receives the input once
    and fans it out to the ``K`` samples itself, so the layers before it run
    once instead of ``K`` times.

    ``sampling="local"`` (default) samples the outputs (local reparameterization):
    each output's mean is ``x·E[w]`` and its variance ``x^2·Var[w]``. That is
    exactly the output distribution of weights drawn anew for every example and
    output position; it ignores the clipping of intensities at 0 and
    ``max_intensity``, which matters only when ``s`` is large.
    ``sampling="exact"`` draws ``K`` full weight realizations (clipped to
    ``[0, max_intensity]``), each shared by the whole batch: the reference the
    fast path is tested against.

    Under DDP (an initialised process group) the draws from the global
    generator are each rank's own (:func:`~lightning_relief.photonic.physics.rank_normal`),
    although ``seed_everything`` seeds every rank alike: DDP averages the
    gradients of ``world_size`` independent draws and the weights stay the same
    on every rank. An explicit generator (``sample_logits(seed=...)``) draws as
    it is on every rank.

Readout
    ``noise_floor`` adds Gaussian detector noise (a standard deviation in output
    units) to every output; ``adc_bits`` quantizes outputs to ``2**adc_bits``
    levels over ``[-adc_range, adc_range]`` (straight-through gradients).

Moments
    :meth:`PhotonicSamplerLayer.propagate_moments` maps an input mean and
    variance to the output's (inputs and weights independent), so the layers
    compose with ``MomentPropagationWrapper``.

Example::

    >>> import torch
    >>> from lightning_relief.nn.photonic import PhotonicLinear
    >>> from lightning_relief.photonic import sample_logits
    >>> layer = PhotonicLinear(8, 3, bandwidth_ratio=0.02, correlation=0.3)
    >>> sample_logits(layer, torch.randn(5, 8), num_samples=32, seed=0).shape
    torch.Size([32, 5, 3])
    >>> mean, var = layer.propagate_moments(torch.randn(5, 8), torch.zeros(5, 8))
    >>> tuple(var.shape), bool((var > 0).all())
    ((5, 3), True)
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relief.photonic.physics import ar1_noise, quantize_readout, readout_step

__all__ = ["PhotonicConv2d", "PhotonicLinear", "PhotonicSamplerLayer"]

BandwidthMode = Literal["fixed", "layer", "weight"]
SamplingMode = Literal["local", "exact"]
_BANDWIDTH_MODES: tuple[str, ...] = get_args(BandwidthMode)
_SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)
# variances below this are treated as zero so sqrt never sees 0 (its gradient is infinite there)
_VAR_FLOOR = 1e-20


def _repeat(x: Tensor, k: int) -> Tensor:
    """``k`` sample-major copies of a batch."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


class PhotonicSamplerLayer(nn.Module):
    """Base class of :class:`PhotonicLinear` and :class:`PhotonicConv2d`.

    Build one from an existing layer with :meth:`from_module`. Arguments
    (shared by both forms, keyword only):

    - ``bandwidth_ratio``: initial ``f_e/f_o``; the relative spread is ``sqrt(2·ratio)``.
    - ``bandwidth``: ``"fixed"`` (a buffer), ``"layer"`` (one trainable ratio) or
      ``"weight"`` (one trainable ratio per weight).
    - ``bandwidth_bounds``: physical ``(low, high)`` limits of a trainable ratio.
    - ``correlation``: lag-1 correlation of consecutive samples, in ``[0, 1)``
      (see :func:`~lightning_relief.photonic.physics.correlation_from_rates`).
    - ``max_intensity``: upper limit of every intensity (``None``: unlimited).
      Amplitudes are parametrized to stay below it; exact sampling clips samples to it.
    - ``noise_floor``: detector noise standard deviation added to each output.
    - ``adc_bits``/``adc_range``: readout quantization (``None``: off).
    - ``sampling``: ``"local"`` or ``"exact"`` (see the module docstring).
    - ``arm_floor``: when built from a weight, both arms start at ``relu(±w)``
      plus this fraction of the weight's RMS, so neither arm starts dark.
    """

    weight_shape: tuple[int, ...]
    fixed_bandwidth_ratio: Tensor

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        *,
        bandwidth_ratio: float = 0.02,
        bandwidth: BandwidthMode = "fixed",
        bandwidth_bounds: tuple[float, float] = (1e-4, 0.5),
        correlation: float = 0.0,
        max_intensity: float | None = None,
        noise_floor: float = 0.0,
        adc_bits: int | None = None,
        adc_range: float | None = None,
        sampling: SamplingMode = "local",
        arm_floor: float = 0.1,
    ) -> None:
        super().__init__()
        if type(self) is PhotonicSamplerLayer:
            raise TypeError(
                "PhotonicSamplerLayer is the base class: build PhotonicLinear, PhotonicConv2d, "
                "or PhotonicSamplerLayer.from_module(nn.Linear or nn.Conv2d)"
            )
        low, high = (float(v) for v in bandwidth_bounds)
        if not 0.0 < low < high:
            raise ValueError(f"bandwidth_bounds must be (low, high) with 0 < low < high, got {tuple(bandwidth_bounds)}")
        if bandwidth not in _BANDWIDTH_MODES:
            raise ValueError(f"bandwidth must be one of {_BANDWIDTH_MODES}, got {bandwidth!r}")
        if bandwidth == "fixed" and not bandwidth_ratio >= 0:
            raise ValueError(f"bandwidth_ratio must be >= 0, got {bandwidth_ratio}")
        if bandwidth != "fixed" and not low < bandwidth_ratio < high:
            raise ValueError(
                f"a trainable bandwidth_ratio must lie strictly inside bandwidth_bounds {(low, high)}, got {bandwidth_ratio}"
            )
        if not 0.0 <= correlation < 1.0:
            raise ValueError(f"correlation must be in [0, 1), got {correlation}")
        if max_intensity is not None and not max_intensity > 0:
            raise ValueError(f"max_intensity must be > 0 or None, got {max_intensity}")
        if not noise_floor >= 0:
            raise ValueError(f"noise_floor must be >= 0, got {noise_floor}")
        if adc_bits is not None:
            if not isinstance(adc_bits, int) or isinstance(adc_bits, bool) or not 1 <= adc_bits <= 24:
                raise ValueError(f"adc_bits must be an int in [1, 24] or None, got {adc_bits!r}")
            if adc_range is None or not adc_range > 0:
                raise ValueError(f"adc_bits={adc_bits} needs adc_range > 0 (ADC full scale), got {adc_range}")
        if sampling not in _SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {_SAMPLING_MODES}, got {sampling!r}")
        if not arm_floor > 0:
            raise ValueError(f"arm_floor must be > 0, got {arm_floor}")
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.bandwidth = bandwidth
        self.bandwidth_bounds = (low, high)
        self.correlation = float(correlation)
        self.max_intensity = None if max_intensity is None else float(max_intensity)
        self.noise_floor = float(noise_floor)
        self.adc_bits = adc_bits
        self.adc_range = None if adc_range is None else float(adc_range)
        self.sampling = sampling
        self.arm_floor = float(arm_floor)
        # arms [I+, I-] of every weight; amplitude = |raw|, or max_intensity·sigmoid(raw)
        self.raw_amplitude = nn.Parameter(torch.empty(2, *self.weight_shape))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None
        if bandwidth == "fixed":
            self.register_buffer("fixed_bandwidth_ratio", torch.tensor(float(bandwidth_ratio)))
            self.raw_bandwidth = None
        else:
            shape = () if bandwidth == "layer" else self.weight_shape
            fraction = torch.tensor((bandwidth_ratio - low) / (high - low))
            self.raw_bandwidth = nn.Parameter(torch.logit(fraction).expand(shape).clone())
        # set by photonic_samples(): the batch then holds this many stacked copies
        self._num_samples: int | None = None
        self._raw_batch: int | None = None
        self._generator: torch.Generator | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, *, copy_weights: bool = True, **options) -> PhotonicSamplerLayer:
        """A photonic layer with ``module``'s shape (``nn.Linear`` or ``nn.Conv2d``) and mean weights."""
        if isinstance(module, nn.Linear):
            layer: PhotonicSamplerLayer = PhotonicLinear(
                module.in_features, module.out_features, bias=module.bias is not None, **options
            )
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"only padding_mode='zeros' convolutions convert, got {module.padding_mode!r}")
            layer = PhotonicConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=module.groups,
                bias=module.bias is not None,
                **options,
            )
        else:
            raise TypeError(f"only nn.Linear and nn.Conv2d convert to photonic layers, got {type(module).__name__}")
        if copy_weights:
            layer.set_weight(module.weight.detach())
            if module.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(module.bias.detach())  # type: ignore[union-attr]
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @torch.no_grad()
    def set_weight(self, weight: Tensor, *, clip: bool = False) -> None:
        """Set the amplitudes so that the mean weight equals ``weight``.

        Both arms get ``arm_floor · rms(weight)`` on top of ``relu(±weight)``.
        An arm above ``max_intensity`` is an error, or with ``clip=True`` is
        clipped just below it (used for random initialization).
        """
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight must have shape {self.weight_shape}, got {tuple(weight.shape)}")
        rms = weight.pow(2).mean().sqrt()
        floor = self.arm_floor * (rms if rms > 0 else weight.new_tensor(1e-3))
        arms = torch.stack([weight.clamp_min(0), (-weight).clamp_min(0)]) + floor
        if self.max_intensity is not None:
            if clip:
                arms = arms.clamp(max=0.99 * self.max_intensity)
            if float(arms.max()) >= self.max_intensity:
                raise ValueError(
                    f"max_intensity={self.max_intensity} is below the largest arm intensity "
                    f"{float(arms.max()):.4g} these weights need; raise max_intensity or rescale the weights"
                )
            raw = torch.logit(arms / self.max_intensity)
        else:
            raw = arms
        self.raw_amplitude.copy_(raw)

    def reset_parameters(self) -> None:
        """``nn.Linear``/``nn.Conv2d``'s initialization, as mean weights."""
        fan_in = math.prod(self.weight_shape[1:])
        weight = torch.empty(self.weight_shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.set_weight(weight, clip=True)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- the physical quantities ----------------------------------------------------------

    @property
    def amplitude(self) -> Tensor:
        """Mean intensities ``[2, *weight_shape]`` of the arms ``[I+, I-]`` (non-negative)."""
        if self.max_intensity is not None:
            return self.max_intensity * torch.sigmoid(self.raw_amplitude)
        # |theta| rather than softplus: an optimizer step moves a lit arm by the same amount as
        # a plain weight (softplus shrinks the steps of dim arms ~10x and training stalls)
        return self.raw_amplitude.abs()

    @property
    def bandwidth_ratio(self) -> Tensor:
        """``f_e/f_o``: a scalar, or one per weight when ``bandwidth="weight"``."""
        if self.raw_bandwidth is None:
            return self.fixed_bandwidth_ratio
        low, high = self.bandwidth_bounds
        return low + (high - low) * torch.sigmoid(self.raw_bandwidth)

    @property
    def relative_spread(self) -> Tensor:
        """``sigma/mu = sqrt(2·f_e/f_o)`` of each intensity."""
        return (2.0 * self.bandwidth_ratio).sqrt()

    def weight_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of the weights: ``a+ - a-`` and ``s^2 (a+^2 + a-^2)``."""
        amp = self.amplitude
        return amp[0] - amp[1], 2.0 * self.bandwidth_ratio * amp.pow(2).sum(0)

    def sample_intensities(self, num_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` draws of both arms, ``[K, 2, *weight_shape]``, clipped to ``[0, max_intensity]``.

        Consecutive draws follow the AR(1) chain with lag-1 ``correlation``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        amp = self.amplitude
        noise = ar1_noise(
            (num_samples, *amp.shape),
            self.correlation,
            generator=generator if generator is not None else self._generator,
            device=amp.device,
            dtype=amp.dtype,
        )
        intensity = amp * (1.0 + self.relative_spread * noise)
        upper = self.max_intensity if self.max_intensity is not None else None
        return intensity.clamp(min=0.0, max=upper)

    def sample_weights(self, num_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` weight realizations ``I+ - I-``: ``[K, *weight_shape]``."""
        intensity = self.sample_intensities(num_samples, generator)
        return intensity[:, 0] - intensity[:, 1]

    # ---- forward ----------------------------------------------------------------------------

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _affine_per_sample(self, x: Tensor, weights: Tensor, num_samples: int) -> Tensor:
        """Apply weight realization ``k`` to the ``k``-th block of the sample-major batch."""
        raise NotImplementedError

    def _noise(self, shape: torch.Size, num_samples: int, like: Tensor, correlation: float) -> Tensor:
        noise = ar1_noise(
            (num_samples, shape[0] // num_samples, *shape[1:]),
            correlation,
            generator=self._generator,
            device=like.device,
            dtype=like.dtype,
        )
        return noise.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        k = self._num_samples or 1
        # a batch of the raw size means the input is the same for every sample (no photonic layer
        # before this one): compute on it once and fan out to the K samples here
        fan_out = k > 1 and self._raw_batch is not None and x.shape[0] == self._raw_batch
        if not fan_out and x.shape[0] % k:
            raise ValueError(f"inside photonic_samples(num_samples={k}) the batch must be a multiple of {k}, got {x.shape[0]}")
        if self.sampling == "exact":
            if fan_out:
                x = _repeat(x, k)
            y = self._affine_per_sample(x, self.sample_weights(k), k)
            if self.bias is not None:
                y = y + self.bias.view(-1, *([1] * (y.ndim - 2)))
        else:
            w_mean, w_var = self.weight_moments()
            mean = self._affine(x, w_mean, self.bias)
            var = self._affine(x * x, w_var.expand(self.weight_shape), None)
            # without autograd the buffers are reused in place: less memory, fewer page faults on CPU
            in_place = not (torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad))
            std = var.clamp_min_(_VAR_FLOOR).sqrt_() if in_place else var.clamp_min(_VAR_FLOOR).sqrt()
            if fan_out:
                mean, std = _repeat(mean, k), _repeat(std, k)
            noise = self._noise(mean.shape, k, mean, self.correlation)
            y = mean.addcmul_(std, noise) if in_place else mean + std * noise
        return self._readout(y, k)

    def _readout(self, y: Tensor, num_samples: int) -> Tensor:
        if self.noise_floor > 0:
            y = y + self.noise_floor * self._noise(y.shape, num_samples, y, 0.0)
        if self.adc_bits is not None:
            y = quantize_readout(y, self.adc_bits, self.adc_range)  # type: ignore[arg-type]
        return y

    def propagate_moments(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Output mean and variance for independent inputs of ``mean`` and ``var``.

        ``E[y] = E[x]·E[w] + b`` and ``Var[y] = Var[x]·E[w]^2 + E[x^2]·Var[w]``
        (summed over the inputs), plus ``noise_floor^2`` and, with an ADC, the
        rounding variance ``step^2/12`` (saturation is not modelled here).
        """
        w_mean, w_var = self.weight_moments()
        out_mean = self._affine(mean, w_mean, self.bias)
        w_var = w_var.expand(self.weight_shape)
        out_var = self._affine(var, w_mean.pow(2), None) + self._affine(mean.pow(2) + var, w_var, None)
        extra = self.noise_floor**2
        if self.adc_bits is not None:
            extra += readout_step(self.adc_bits, self.adc_range) ** 2 / 12.0  # type: ignore[arg-type]
        return out_mean, out_var + extra

    def extra_repr(self) -> str:
        parts = [
            f"bandwidth={self.bandwidth}",
            f"sampling={self.sampling}",
            f"correlation={self.correlation}",
        ]
        if self.max_intensity is not None:
            parts.append(f"max_intensity={self.max_intensity}")
        if self.noise_floor:
            parts.append(f"noise_floor={self.noise_floor}")
        if self.adc_bits is not None:
            parts.append(f"adc_bits={self.adc_bits}, adc_range={self.adc_range}")
        return ", ".join(parts)


class PhotonicLinear(PhotonicSamplerLayer):
    """A photonic sampler layer in ``nn.Linear`` form: ``[*, in_features] -> [*, out_features]``.

    >>> import torch
    >>> PhotonicLinear(4, 2)(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **options) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        super().__init__((out_features, in_features), bias, **options)
        self.in_features = in_features
        self.out_features = out_features
        self.reset_parameters()

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _affine_per_sample(self, x: Tensor, weights: Tensor, num_samples: int) -> Tensor:
        blocks = x.reshape(num_samples, -1, self.in_features)
        y = torch.bmm(blocks, weights.transpose(1, 2))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class PhotonicConv2d(PhotonicSamplerLayer):
    """A photonic sampler layer in ``nn.Conv2d`` form (zero padding).

    >>> import torch
    >>> PhotonicConv2d(1, 4, 3, padding=1)(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        **options,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels < 1 or out_channels < 1 or kh < 1 or kw < 1:
            raise ValueError(
                f"bad PhotonicConv2d sizes: in_channels={in_channels}, out_channels={out_channels}, kernel_size={kernel_size}"
            )
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        super().__init__((out_channels, in_channels // groups, kh, kw), bias, **options)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.reset_parameters()

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _affine_per_sample(self, x: Tensor, weights: Tensor, num_samples: int) -> Tensor:
        # the K realizations become K groups of one grouped convolution over the channel axis
        n = x.shape[0] // num_samples
        stacked = x.reshape(num_samples, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
        y = F.conv2d(
            stacked,
            weights.reshape(-1, *weights.shape[2:]),
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups * num_samples,
        )
        spatial = y.shape[2:]
        y = y.reshape(n, num_samples, self.out_channels, *spatial).transpose(0, 1)
        return y.reshape(-1, self.out_channels, *spatial)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, " + super().extra_repr()
        )
