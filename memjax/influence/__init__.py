"""Influence of training examples on predictions: Forward-INF and exact LOO ground truth."""

from memjax.influence.forward_inf import forward_inf, make_optimizer, trainable_mask
from memjax.influence.loo import (
    dual_loo_influence,
    fit_logistic,
    logistic_loss,
    loo_influence,
    refit_logistic,
)

__all__ = [
    "dual_loo_influence",
    "fit_logistic",
    "forward_inf",
    "logistic_loss",
    "loo_influence",
    "make_optimizer",
    "refit_logistic",
    "trainable_mask",
]
