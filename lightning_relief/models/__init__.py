"""Reference models every plugin is tested on, and the ``ClassifierModule``."""

from lightning_relief.models.classifier import ClassifierModule
from lightning_relief.models.lenet import LeNet5
from lightning_relief.models.mlp import MLP
from lightning_relief.models.mnist1d import MNIST1DCNN, MNIST1DGRU
from lightning_relief.models.resnet import ResNet, resnet8, resnet20
from lightning_relief.models.spec import build_model, model_spec

__all__ = [
    "ClassifierModule",
    "LeNet5",
    "MLP",
    "MNIST1DCNN",
    "MNIST1DGRU",
    "ResNet",
    "build_model",
    "model_spec",
    "resnet8",
    "resnet20",
]
