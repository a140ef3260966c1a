"""Influence of training examples on predictions.

- :func:`forward_inf` (Ko et al., CVPR 2024, "The Mirrored Influence Hypothesis"):
  mirrored influence from forward passes, finite or first order; :func:`self_influence`,
  :func:`relative_influence`, :func:`relative_first_order` (with its settings
  :data:`RANKING`), :func:`top_sources`, :func:`hit_rates` for its applications;
  :func:`cross_entropy_loss`, :func:`causal_lm_loss` and :func:`zero_shot_loss` make the
  per-example loss of a classifier, a causal LM (mean token cross-entropy) and a CLIP
  zero-shot classifier; :func:`param_paths` names the parameters that ``trainable``
  patterns select.
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
from memjax.influence._forward_inf import (
    forward_inf,
    glob_predicate,
    make_optimizer,
    param_paths,
    trainable_mask,
)
from memjax.influence._gradients import grad_dot, per_example_grads, project, tracin
from memjax.influence._lava import lava, lava_values
from memjax.influence._loo import (
    dual_loo_influence,
    fit_logistic,
    logistic_loss,
    loo_influence,
    refit_logistic,
)
from memjax.influence._losses import (
    causal_lm_loss,
    cross_entropy_loss,
    param_leaf,
    zero_shot_logits,
    zero_shot_loss,
)
from memjax.influence._stats import lds, pearson, spearman

__all__ = [
    "RANKING",
    "causal_lm_loss",
    "cross_entropy_loss",
    "dual_loo_influence",
    "fit_logistic",
    "forward_inf",
    "glob_predicate",
    "grad_dot",
    "hit_rates",
    "lava",
    "lava_values",
    "lds",
    "logistic_loss",
    "loo_influence",
    "make_optimizer",
    "param_leaf",
    "param_paths",
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
    "zero_shot_logits",
    "zero_shot_loss",
]
