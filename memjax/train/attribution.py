"""Ground truth for data attribution by retraining: subset models for the LDS, and exact LOO.

- :func:`subset_outputs`: ``n_subsets`` classifiers, each trained on a random
  ``fraction`` of the training set, all in ONE vmapped program
  (:func:`memjax.train.train_classifiers`), and each one's output on every test example.
  With :func:`memjax.influence.lds` this is the linear datamodeling score of Park et al.
  (ICML 2023, "TRAK: Attributing Model Behavior at Scale", Definition 2.3), the ground
  truth kronfluence and dattri report on.
- :func:`loo_retraining` / :func:`retraining_effects`: the change of each test loss when
  the model is retrained without listed training examples (leave-one-out, Koh & Liang,
  ICML 2017, Sec. 5.1), from the SAME initialisation as the full model per seed, all
  models of all seeds in one vmapped program, averaged over seeds.

The output is the NEGATIVE cross-entropy of the test example, −L(θ_S; t): the influence
methods of :mod:`memjax.influence` score gradients of that same loss and orient a score
positive when training example i supports t (lowers its loss), so a subset's summed scores
predict a HIGHER output, the direction :func:`memjax.influence.lds` correlates with. TRAK's
multi-class margin log p/(1−p) (p the probability of the true class) is one fixed increasing
function of −L = log p for every model, so both give the same Spearman correlation over
subsets, i.e. the same LDS.

Retraining is full-batch Adam (:func:`memjax.train.fit_classifier`): given the
initialisation, training is deterministic, so two models that start from one key differ
only by their training sets. A nonconvex network's LOO effect is still noisy across
initialisations: on the digits MLP 64-128-10 (1,300 examples, 300 steps, lr 2e-3) the
standard deviation of one LOO effect across 8 initialisations was 1.7× its mean magnitude
(measured over 32 pairs of 4 random training examples and 8 test digits; effects of
|1e-5|..|1e-3|), so one seed does not even give the sign; averaging over s seeds divides
the noise by √s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax._checks import check_positive_int
from memjax.errors import InputError
from memjax.models.classifier import CNNConfig, MLPConfig, classifier_logits
from memjax.train.reference import _train_on_rows, kept_rows, train_classifiers

#: Fewest subset models for an LDS: its Spearman correlation over S subsets has a standard
#: error of about 1/√S (0.1 at S = 100), the scale of the differences between methods.
MIN_SUBSETS = 100


def losses_of_models(stacked_params: Any, test: dict[str, Any]) -> jax.Array:
    """[M, T] cross-entropy of every test example under every model.

    Args:
      stacked_params: classifier params with a leading model axis M on every leaf.
      test: ``{"image": [T, ...], "label": [T] int}``.
    """
    def one_model(params):
        logits = jax.vmap(classifier_logits, in_axes=(None, 0))(params, test["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, test["label"])

    return jax.vmap(one_model)(stacked_params)


_losses_of_models = jax.jit(losses_of_models)


def random_subsets(n_subsets: int, n_examples: int, fraction: float, seed: int) -> np.ndarray:
    """[S, N] bool: each row a uniformly random subset of exactly round(fraction·N) examples."""
    size = int(round(fraction * n_examples))
    if not 0.0 < fraction < 1.0 or not 1 <= size < n_examples:
        raise InputError(f"fraction={fraction!r}: expected 0 < fraction < 1 keeping between 1 "
                         f"and {n_examples - 1} of the {n_examples} training examples")
    order = np.argsort(np.random.default_rng(seed).random((n_subsets, n_examples)), axis=1)
    return order < size


def _check_data(images: Any, labels: Any, test: Any) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"labels: expected [N] with N = {len(images)} (one per image), got "
                         f"shape {labels.shape}")
    if not isinstance(test, dict) or set(test) != {"image", "label"}:
        raise InputError("test: expected {'image': [T, ...], 'label': [T]}")
    if np.shape(test["image"])[1:] != images.shape[1:] \
            or np.shape(test["label"]) != (len(test["image"]),):
        raise InputError(f"test: expected images [T, {', '.join(map(str, images.shape[1:]))}] "
                         f"and labels [T], got {np.shape(test['image'])} and "
                         f"{np.shape(test['label'])}")
    return images, labels


def subset_outputs(images: Any, labels: Any, test: dict[str, Any], *,
                   n_subsets: int = MIN_SUBSETS, fraction: float = 0.5,
                   config: MLPConfig | CNNConfig, steps: int = 300,
                   learning_rate: float = 1e-3, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Train ``n_subsets`` classifiers on random subsets at once; their test outputs.

    Park et al. (ICML 2023), "TRAK", Definition 2.3: the LDS ground truth. Subset s is
    ``random_subsets(n_subsets, N, fraction, seed)[s]`` and its model starts from
    ``jax.random.split(jax.random.key(seed), n_subsets)[s]`` (independent initialisations,
    as in TRAK's subset models), i.e. ``fit_classifier`` on that mask, trained by
    :func:`memjax.train.train_classifiers` in one vmapped program.

    Args:
      images: [N, ...] float training inputs; labels: [N] int.
      test: ``{"image": [T, ...], "label": [T]}``.
      n_subsets: S >= :data:`MIN_SUBSETS`.
      fraction: the share of the N examples in every subset (exactly round(fraction·N)).
      config, steps, learning_rate: the recipe (that of the model being attributed).
      seed: subsets and initialisations.

    Returns:
      ``(subsets [S, N] bool, outputs [S, T] float32)``: outputs[s, t] = −CE of test t under
      the model trained on subset s (see the module docstring for why −CE).
    """
    images, labels = _check_data(images, labels, test)
    if check_positive_int(n_subsets, "n_subsets") < MIN_SUBSETS:
        raise InputError(f"n_subsets={n_subsets}: expected at least {MIN_SUBSETS} subset "
                         "models (the LDS's Spearman correlation over fewer is too noisy)")
    subsets = random_subsets(n_subsets, len(labels), fraction, seed)
    stacked = train_classifiers(jax.random.key(seed), images, labels, subsets, config=config,
                                steps=steps, learning_rate=learning_rate)
    return subsets, -np.asarray(_losses_of_models(stacked, test))


def retraining_effects(images: Any, labels: Any, test: dict[str, Any], masks: Any, *,
                       seeds: Sequence[int], config: MLPConfig | CNNConfig, steps: int = 300,
                       learning_rate: float = 1e-3) -> np.ndarray:
    """[T, M] mean over seeds of L(θ_m; t) − L(θ; t): each training set's effect on each test loss.

    For every seed, the full model θ (all N examples) and one model θ_m per row of
    ``masks`` [M, N] start from the same initialisation ``jax.random.key(seed)``; full-batch
    Adam is then deterministic, so θ_m − θ is caused by the training set alone. All
    (1 + M)·len(seeds) models train in one vmapped program.

    Args:
      images: [N, ...] float; labels: [N] int; test: ``{"image": [T, ...], "label": [T]}``.
      masks: [M, N] bool, the training set of each retrained model.
      seeds: initialisation seeds (at least one) the effect is averaged over.
      config, steps, learning_rate: the training recipe (:func:`fit_classifier`).
    """
    images, labels = _check_data(images, labels, test)
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.ndim != 2 or masks.shape[1] != len(labels):
        raise InputError(f"masks: expected bool [M, {len(labels)}], got {masks.dtype} "
                         f"{list(masks.shape)}")
    seeds = [int(s) for s in np.atleast_1d(np.asarray(seeds, dtype=np.int64))]
    if not seeds:
        raise InputError("seeds: expected at least one initialisation seed")
    every = np.concatenate([np.ones((1, len(labels)), bool), masks])  # row 0: the full model
    rows, weight = kept_rows(every)
    n_models = len(every)
    keys = jnp.concatenate([jnp.stack([jax.random.key(s)] * n_models) for s in seeds])
    stacked = _train_on_rows(keys, images, labels, np.tile(rows, (len(seeds), 1)),
                             np.tile(weight, (len(seeds), 1)), config=config, steps=steps,
                             learning_rate=learning_rate)
    losses = np.asarray(_losses_of_models(stacked, test), np.float64)
    losses = losses.reshape(len(seeds), n_models, -1)  # [seeds, 1 + M, T]
    return (losses[:, 1:] - losses[:, :1]).mean(axis=0).T


def loo_retraining(images: Any, labels: Any, test: dict[str, Any], rows: Any, *,
                   seeds: Sequence[int], config: MLPConfig | CNNConfig, steps: int = 300,
                   learning_rate: float = 1e-3) -> np.ndarray:
    """[T, R] exact leave-one-out effect L(θ_{−i}; t) − L(θ; t) by retraining, i in ``rows``.

    Positive = removing training example i raises t's loss (i supports t), the orientation
    of :func:`memjax.influence.loo_influence` and of the influence scores. Each θ_{−i}
    starts from the full model's initialisation for every seed and the effect is averaged
    over ``seeds`` (:func:`retraining_effects`); for small networks: R + 1 models per seed
    are trained at once.

    Args:
      images: [N, ...] float; labels: [N] int; test: ``{"image": [T, ...], "label": [T]}``.
      rows: [R] distinct training indices to leave out, one at a time.
      seeds, config, steps, learning_rate: as :func:`retraining_effects`.
    """
    n = len(np.asarray(labels))
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0 \
            or rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows):
        raise InputError(f"rows: expected distinct training indices in [0, {n}), got {rows!r}")
    masks = np.ones((len(rows), n), bool)
    masks[np.arange(len(rows)), rows] = False
    return retraining_effects(images, labels, test, masks, seeds=seeds, config=config,
                              steps=steps, learning_rate=learning_rate)
