"""Embedded data: scikit-learn's digits (no download) and synthetic shapes."""

from lightning_relief.data.digits import OOD_KINDS, DigitsDataModule
from lightning_relief.data.synthetic import SyntheticDataModule

__all__ = ["OOD_KINDS", "DigitsDataModule", "SyntheticDataModule"]
