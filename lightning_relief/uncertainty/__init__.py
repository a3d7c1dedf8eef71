"""Calibration, uncertainty and OOD-detection metrics; the ensemble module; temperature scaling.

Every metric has a functional form (:mod:`lightning_relief.uncertainty.functional`)
and a torchmetrics ``Metric`` class (:mod:`lightning_relief.uncertainty.metrics`).
OOD scores follow one convention: a higher score means more likely OOD.
"""

from lightning_relief.uncertainty.ensemble import EnsembleModel
from lightning_relief.uncertainty.functional import (
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    disagreement,
    expected_calibration_error,
    fpr_at_95_tpr,
    mutual_information,
    negative_log_likelihood,
    ood_aupr,
    ood_auroc,
    predictive_entropy,
)
from lightning_relief.uncertainty.metrics import (
    OODAUPR,
    OODAUROC,
    AdaptiveCalibrationError,
    BrierScore,
    Disagreement,
    ExpectedCalibrationError,
    FPRAt95TPR,
    MutualInformation,
    NegativeLogLikelihood,
    PredictiveEntropy,
)
from lightning_relief.uncertainty.plot import plot_reliability_diagram
from lightning_relief.uncertainty.stacking import ensemble_model
from lightning_relief.uncertainty.temperature import NotIdentifiableError, apply_temperature, fit_temperature, temperature_of

__all__ = [
    "OODAUPR",
    "OODAUROC",
    "AdaptiveCalibrationError",
    "BrierScore",
    "Disagreement",
    "EnsembleModel",
    "ExpectedCalibrationError",
    "FPRAt95TPR",
    "MutualInformation",
    "NegativeLogLikelihood",
    "NotIdentifiableError",
    "PredictiveEntropy",
    "adaptive_calibration_error",
    "apply_temperature",
    "brier_score",
    "calibration_bins",
    "disagreement",
    "ensemble_model",
    "expected_calibration_error",
    "fit_temperature",
    "fpr_at_95_tpr",
    "mutual_information",
    "negative_log_likelihood",
    "ood_aupr",
    "ood_auroc",
    "plot_reliability_diagram",
    "predictive_entropy",
    "temperature_of",
]
