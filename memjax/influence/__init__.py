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
- Curvature: :func:`hvp` / :func:`gnhvp` (Hessian / Gauss-Newton vector products),
  :func:`cg_solve` and :func:`lissa` inverse-curvature solves batched over vectors,
  :func:`dense_curvature` / :func:`dense_solve` as the exact ground truth for small models;
  K-FAC / EK-FAC factors (Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023)
  of dense layers (:func:`kfac_batch_stats` / :func:`kfac_factors`,
  :func:`ekfac_batch_stats` / :func:`ekfac_factors`, :func:`kfac_precondition`),
  convolutions (KFC, Grosse & Martens 2016: :func:`cnn_kfac_batch_stats`), layers applied
  per token (:func:`positions_kfac_stats`, :func:`kfac_precondition_matrix`) and
  embeddings (:func:`embedding_kfac_stats`), streamed with :func:`merge_kfac_stats`;
  :func:`dense_preconditioner` / :func:`cg_preconditioner` / :func:`ekfac_preconditioner`
  for curvature-aware mirrored influence, ``forward_inf(precondition=...)``; any model of
  the model protocol: :func:`fit_kfac` (dense layers found in the loss's jaxpr by
  :func:`find_dense_layers`, K-FAC/EK-FAC; the diagonal Fisher for the other leaves) and
  :func:`curvature_preconditioner`; matrix-free and checked: :func:`solver_curvature` and
  :func:`gauss_newton_preconditioner` (CG / LiSSA on the Gauss-Newton matrix of the
  trainable leaves, damping 0.1 x the mean eigenvalue by :func:`mean_eigenvalue`).
- Many queries: :func:`gradient_store` (projected per-example training gradients in a
  resumable store, once), :func:`query_vectors` and :func:`query_store` (blocked scoring
  with running top-k / bottom-k, never an N x T matrix); :func:`factorized_projection`
  with :func:`kronecker_factors` (LoGra, Choe et al. 2024: a dense layer's projected
  gradient without forming it).
"""

from memjax.influence._applications import (
    RANKING,
    hit_rates,
    relative_first_order,
    relative_influence,
    self_influence,
    top_sources,
)
from memjax.influence._capture import (
    DenseLayer,
    find_dense_layers,
    layer_inputs_and_output_grads,
)
from memjax.influence._curvature import gauss_newton_preconditioner, test_gradients
from memjax.influence._forward_inf import (
    forward_inf,
    glob_predicate,
    make_optimizer,
    param_paths,
    trainable_mask,
)
from memjax.influence._generic_kfac import (
    CurvatureFactors,
    curvature_preconditioner,
    fit_kfac,
)
from memjax.influence._grad_store import (
    FactorizedGradient,
    KroneckerProjection,
    ProjectedGradient,
    factorized_dot,
    factorized_dot_is_cheaper,
    factorized_projection,
    gradient_store,
    kronecker_factors,
    kronecker_projection,
    projected_fisher_solve,
    projected_gram,
    query_store,
    query_vectors,
)
from memjax.influence._gradients import grad_dot, per_example_grads, project, tracin
from memjax.influence._ihvp import (
    SolveResult,
    cg_solve,
    dense_curvature,
    dense_solve,
    gnhvp,
    hvp,
    lissa,
    require_converged,
)
from memjax.influence._kfac import (
    DenseFactors,
    EkfacStats,
    EmbeddingFactors,
    KfacStats,
    cnn_kfac_batch_stats,
    conv_patches,
    conv_weight_matrix,
    ekfac_batch_stats,
    ekfac_factors,
    embedding_ekfac_factors,
    embedding_ekfac_stats,
    embedding_factors,
    embedding_kfac_stats,
    kfac_batch_stats,
    kfac_factors,
    positions_ekfac_stats,
    positions_kfac_stats,
    precondition_embedding,
    sample_labels,
)
from memjax.influence._kfac import merge_stats as merge_kfac_stats
from memjax.influence._kfac import precondition as kfac_precondition
from memjax.influence._kfac import precondition_matrix as kfac_precondition_matrix
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
    causal_lm_outputs,
    classifier_outputs,
    cross_entropy_loss,
    label_cross_entropy,
    next_token_cross_entropy,
    param_leaf,
    sampled_label,
    zero_shot_logits,
    zero_shot_loss,
    zero_shot_outputs,
)
from memjax.influence._preconditioners import (
    cg_preconditioner,
    dense_preconditioner,
    ekfac_preconditioner,
    largest_eigenvalue,
    lissa_preconditioner,
    mean_eigenvalue,
    solver_curvature,
)
from memjax.influence._stats import lds, pearson, spearman

__all__ = [
    "RANKING",
    "CurvatureFactors",
    "DenseFactors",
    "DenseLayer",
    "EkfacStats",
    "EmbeddingFactors",
    "FactorizedGradient",
    "KfacStats",
    "KroneckerProjection",
    "ProjectedGradient",
    "SolveResult",
    "causal_lm_loss",
    "causal_lm_outputs",
    "cg_preconditioner",
    "cg_solve",
    "classifier_outputs",
    "cnn_kfac_batch_stats",
    "conv_patches",
    "conv_weight_matrix",
    "cross_entropy_loss",
    "curvature_preconditioner",
    "dense_curvature",
    "dense_preconditioner",
    "dense_solve",
    "dual_loo_influence",
    "ekfac_batch_stats",
    "ekfac_factors",
    "ekfac_preconditioner",
    "embedding_ekfac_factors",
    "embedding_ekfac_stats",
    "embedding_factors",
    "embedding_kfac_stats",
    "factorized_dot",
    "factorized_dot_is_cheaper",
    "factorized_projection",
    "find_dense_layers",
    "fit_kfac",
    "fit_logistic",
    "forward_inf",
    "gauss_newton_preconditioner",
    "glob_predicate",
    "gnhvp",
    "grad_dot",
    "gradient_store",
    "hit_rates",
    "hvp",
    "kfac_batch_stats",
    "kfac_factors",
    "kfac_precondition",
    "kfac_precondition_matrix",
    "kronecker_factors",
    "kronecker_projection",
    "label_cross_entropy",
    "largest_eigenvalue",
    "lava",
    "lava_values",
    "layer_inputs_and_output_grads",
    "lds",
    "lissa",
    "lissa_preconditioner",
    "logistic_loss",
    "loo_influence",
    "make_optimizer",
    "mean_eigenvalue",
    "merge_kfac_stats",
    "next_token_cross_entropy",
    "param_leaf",
    "param_paths",
    "pearson",
    "per_example_grads",
    "positions_ekfac_stats",
    "positions_kfac_stats",
    "precondition_embedding",
    "project",
    "projected_fisher_solve",
    "projected_gram",
    "query_store",
    "query_vectors",
    "refit_logistic",
    "relative_first_order",
    "relative_influence",
    "require_converged",
    "sample_labels",
    "sampled_label",
    "self_influence",
    "solver_curvature",
    "spearman",
    "test_gradients",
    "top_sources",
    "tracin",
    "trainable_mask",
    "zero_shot_logits",
    "zero_shot_loss",
    "zero_shot_outputs",
]
