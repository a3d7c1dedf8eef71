"""Embedded data: scikit-learn's digits and MNIST-1D (both made locally, no download) and synthetic shapes."""

from lightning_relief.data.digits import OOD_KINDS, DigitsDataModule
from lightning_relief.data.mnist1d import MNIST1D_OOD_KINDS, MNIST1DDataModule
from lightning_relief.data.synthetic import SyntheticDataModule

__all__ = ["MNIST1D_OOD_KINDS", "OOD_KINDS", "DigitsDataModule", "MNIST1DDataModule", "SyntheticDataModule"]
