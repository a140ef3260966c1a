"""Influence of training examples on predictions.

- :func:`forward_inf` (Ko et al., CVPR 2024, "The Mirrored Influence Hypothesis"):
  mirrored influence from forward passes, finite or first order; :func:`self_influence`,
  :func:`relative_influence`, :func:`relative_first_order` (with its settings
  :data:`RANKING`), :func:`top_sources`, :func:`hit_rates` for its applications;
  :func:`cross_entropy_loss` makes a classifier's per-example loss from its logits.
- Baselines and ground truth: :func:`grad_dot` / :func:`tracin` (Pruthi et al. 2020, with
  a blockwise random projection), exact :func:`loo_influence` / :func:`dual_loo_influence`
  for L2-regularised logistic regression, :func:`lds` (Park et al. 2023), :func:`pearson`,
  :func:`spearman`.
- :func:`lava_values` (Just et al. 2023): data values from class-wise optimal transport.
"""

from memjax.influence._applications import (
    RANKING,
    hit_rates,
    relative_first_order,
    relative_influence,
    self_influence,
    top_sources,
)
from memjax.influence._forward_inf import forward_inf, make_optimizer, trainable_mask
from memjax.influence._gradients import grad_dot, per_example_grads, project, tracin
from memjax.influence._lava import lava, lava_values
from memjax.influence._loo import (
    dual_loo_influence,
    fit_logistic,
    logistic_loss,
    loo_influence,
    refit_logistic,
)
from memjax.influence._losses import cross_entropy_loss
from memjax.influence._stats import lds, pearson, spearman

__all__ = [
    "RANKING",
    "cross_entropy_loss",
    "dual_loo_influence",
    "fit_logistic",
    "forward_inf",
    "grad_dot",
    "hit_rates",
    "lava",
    "lava_values",
    "lds",
    "logistic_loss",
    "loo_influence",
    "make_optimizer",
    "pearson",
    "per_example_grads",
    "project",
    "refit_logistic",
    "relative_first_order",
    "relative_influence",
    "self_influence",
    "spearman",
    "top_sources",
    "tracin",
    "trainable_mask",
]
