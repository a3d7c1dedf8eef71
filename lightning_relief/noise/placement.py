"""Where noise lands: which modules, and whether on their weights, activations or outputs.

Sites:

- ``"weights"``: the ``weight`` of each selected layer is perturbed for the
  training step (an analog crossbar's conductances);
- ``"outputs"``: noise on the output of each selected compute layer (the
  analog matrix-vector product, before any digital op);
- ``"activations"``: noise on the output of each selected nonlinearity
  (Walking Noise / VANT put it after every conv and ReLU).

Layers are chosen by class name (any class in the module's MRO, so ``Conv2d``
also matches subclasses) and/or by ``fnmatch`` patterns on module names from
``named_modules()``; ``exclude`` patterns win and cover the layers inside an
excluded module too.

Layers whose matrix products run inside their own forward (``GRU``/``LSTM``,
``MultiheadAttention``, ``Bilinear``) are out of reach: a placement that covers
one of them makes the injector raise
:class:`~lightning_relief.errors.UnsupportedLayerError` naming it, rather than
train that layer without noise (see :func:`unsupported_layers`).

>>> from lightning_relief.models import LeNet5
>>> [name for name, _ in Placement("outputs").select(LeNet5())]
['features.0.0', 'features.1.0', 'classifier.1', 'classifier.4', 'classifier.7']
>>> [name for name, _ in Placement("activations", names=["features.*"]).select(LeNet5())]
['features.0.2', 'features.1.2']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fnmatch import fnmatch

from torch import nn

from lightning_relief.noise.models import SITES

COMPUTE_LAYERS = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
# compute layers whose weights are used inside their own forward (no output of a selected layer to hook)
UNREACHABLE_LAYERS = ("RNNBase", "RNNCellBase", "MultiheadAttention", "Bilinear")
ACTIVATION_LAYERS = ("ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "ELU", "Hardtanh")


class Placement:
    """A noise site and the layers it applies to.

    Args:
        site: ``"weights"``, ``"outputs"`` or ``"activations"``.
        layers: class names to select; default: conv/linear layers for
            weights/outputs, nonlinearities for activations. ``[]`` selects by
            ``names`` only.
        names: ``fnmatch`` patterns on module names; a selected module must
            match one of them and ``layers`` (pass ``layers=[]`` to select by
            name whatever the type).
        exclude: ``fnmatch`` patterns of module names never selected.
    """

    def __init__(
        self,
        site: str = "outputs",
        layers: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        if isinstance(layers, str) or isinstance(names, str) or isinstance(exclude, str):
            raise TypeError("layers, names and exclude must be lists of strings, not a single string")
        self.site = site
        self.default_layers = layers is None
        if layers is None:
            layers = ACTIVATION_LAYERS if site == "activations" else COMPUTE_LAYERS
        self.layers = tuple(str(layer) for layer in layers)
        self.names = tuple(str(n) for n in names or ())
        self.exclude = tuple(str(e) for e in exclude)
        if not self.layers and not self.names:
            raise ValueError("Placement selects nothing: give layers or names")

    def excluded(self, name: str) -> bool:
        """``name`` or a module containing it matches an ``exclude`` pattern."""
        parts = name.split(".")
        return any(fnmatch(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1) for pattern in self.exclude)

    def matches(self, name: str, module: nn.Module) -> bool:
        if not name or self.excluded(name):
            return False
        type_ok = any(cls.__name__ in self.layers for cls in type(module).__mro__) if self.layers else True
        name_ok = any(fnmatch(name, pattern) for pattern in self.names) if self.names else True
        if self.site == "weights" and not isinstance(getattr(module, "weight", None), nn.Parameter):
            return False
        return type_ok and name_ok

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs of ``model`` this placement applies to."""
        for name, module in model.named_modules():
            if self.matches(name, module):
                yield name, module

    def __repr__(self) -> str:
        return (
            f"Placement(site={self.site!r}, layers={list(self.layers)}, names={list(self.names)}, exclude={list(self.exclude)})"
        )


def _is(module: nn.Module, names: Sequence[str]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def unsupported_layers(model: nn.Module, placement: Placement) -> Iterator[tuple[str, nn.Module]]:
    """Layers ``placement`` covers but cannot put noise on: ``(name, module)`` pairs.

    - a recurrent, attention or bilinear layer, when the placement takes the
      default compute layers (it asked for every matrix product) and does not
      exclude it;
    - for ``"outputs"``: a selected layer inside such a layer (the
      ``out_proj`` of ``MultiheadAttention`` is a ``Linear`` whose forward is
      never called); reported as the outer layer.
    """
    outer = [
        (name, m) for name, m in model.named_modules() if name and _is(m, UNREACHABLE_LAYERS) and not placement.excluded(name)
    ]
    for name, module in outer:
        if placement.default_layers and (not placement.names or any(fnmatch(name, p) for p in placement.names)):
            yield name, module
        elif placement.site == "outputs" and any(True for _ in placement.select(module)):
            yield name, module


def as_placements(placement: Placement | str | Sequence[Placement | str] | None, default_sites: Sequence[str]) -> list[Placement]:
    """Normalise the strategy's ``placement`` argument to a list of :class:`Placement`."""
    if placement is None:
        return [Placement(site) for site in default_sites]
    items = [placement] if isinstance(placement, (Placement, str)) else list(placement)
    out = []
    for item in items:
        if isinstance(item, str):
            item = Placement(item)
        if not isinstance(item, Placement):
            raise TypeError(f"placement must be a Placement, a site name or a list of them, got {type(item).__name__}")
        out.append(item)
    if not out:
        raise ValueError("placement is an empty list")
    return out
