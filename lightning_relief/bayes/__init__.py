"""bayesian-torch integration: conversion, the scaled KL term, Monte-Carlo and mean-weight prediction.

``(out, kl)`` tuples from bayesian-torch layers never reach user code: converted
layers return plain outputs, :class:`OutputOnly` strips tuples from models that
return them, and the KL term is computed from the layers' tensors.
"""

from lightning_relief.bayes.convert import OutputOnly, bayesian_layers, make_bayesian, to_bayesian
from lightning_relief.bayes.kl import KLDivergenceCallback, kl_divergence, kl_term, training_set_size
from lightning_relief.bayes.model import BayesianModel
from lightning_relief.bayes.predict import mc_predict, mean_weights, predict_mean

__all__ = [
    "BayesianModel",
    "KLDivergenceCallback",
    "OutputOnly",
    "bayesian_layers",
    "kl_divergence",
    "kl_term",
    "make_bayesian",
    "mc_predict",
    "mean_weights",
    "predict_mean",
    "to_bayesian",
    "training_set_size",
]
