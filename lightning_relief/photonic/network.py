"""A network whose linear and conv layers are photonic samplers, ready for ``ClassifierModule``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_relief.models.spec import model_spec
from lightning_relief.nn.photonic import BandwidthMode, SamplingMode
from lightning_relief.photonic.convert import convert_to_photonic
from lightning_relief.photonic.sampling import sample_logits

__all__ = ["PhotonicNetwork"]


class PhotonicNetwork(nn.Module):
    """``model`` with its layers converted to photonic samplers, returning predictive log-probabilities.

    A forward pass draws ``train_samples`` samples in training mode and
    ``num_samples`` in eval mode, and returns ``log(mean_k softmax(logits_k))``:
    used as logits, its softmax is the predictive mean and cross-entropy on it
    is the NLL of the predictive distribution. With one sample it returns that
    sample's logits. So ``ClassifierModule`` trains it and reports the NLL, ECE
    and accuracy of the ``K``-sample predictive, and ``predict`` returns the
    predictive mean. The photonic options are those of
    :class:`~lightning_relief.nn.photonic.PhotonicSamplerLayer`.

    Built from a model of :mod:`lightning_relief.models` (or any
    ``records_init_args`` class), it records its own spec, so checkpoints reload
    with ``ClassifierModule.load_from_checkpoint(path)`` alone.

    Example::

        >>> import torch
        >>> from lightning_relief.models import MLP, ClassifierModule
        >>> net = PhotonicNetwork(MLP(in_features=64, dropout=0.0), bandwidth_ratio=0.02, num_samples=8)
        >>> module = ClassifierModule(net)
        >>> torch.allclose(module.eval()(torch.randn(3, 1, 8, 8)).exp().sum(-1), torch.ones(3))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        num_samples: int = 16,
        train_samples: int = 1,
        bandwidth_ratio: float = 0.02,
        bandwidth: BandwidthMode = "fixed",
        bandwidth_bounds: tuple[float, float] = (1e-4, 0.5),
        correlation: float = 0.0,
        max_intensity: float | None = None,
        noise_floor: float = 0.0,
        adc_bits: int | None = None,
        adc_range: float | None = None,
        sampling: SamplingMode = "local",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("num_samples", num_samples), ("train_samples", train_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        options = dict(
            bandwidth_ratio=bandwidth_ratio,
            bandwidth=bandwidth,
            bandwidth_bounds=tuple(bandwidth_bounds),
            correlation=correlation,
            max_intensity=max_intensity,
            noise_floor=noise_floor,
            adc_bits=adc_bits,
            adc_range=adc_range,
            sampling=sampling,
        )
        inner_spec = model_spec(model)
        self.model = convert_to_photonic(model, None if layers is None else list(layers), inplace=True, **options)
        self.num_samples = num_samples
        self.train_samples = train_samples
        if inner_spec is not None:
            # read by model_spec(): ClassifierModule stores it, build_model() rebuilds the whole network
            self.init_args = {
                "model": inner_spec,
                "layers": None if layers is None else list(layers),
                "num_samples": num_samples,
                "train_samples": train_samples,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            }

    def forward(self, x: Tensor) -> Tensor:
        k = self.train_samples if self.training else self.num_samples
        if k == 1:
            return self.model(x)
        logits = sample_logits(self.model, x, k)
        return torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(k)
