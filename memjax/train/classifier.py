"""Training the small native classifiers (:mod:`memjax.models.classifier`) with optax.

``fit_classifier`` is a pure function of (key, data, weights): deterministic for a key, and
``jax.vmap`` over keys and weights trains many models at once (reference models for
membership inference; :func:`memjax.train.train_classifiers`). Training is full-batch
Adam on the weighted mean loss, where the weights [N] (0/1: a keep mask) select the
training examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from memjax.convert.saved import MODEL_FILE, is_model_folder, restore_classifiers, write_model
from memjax.errors import InputError
from memjax.models.classifier import (  # noqa: F401 - re-exported for memjax.train users
    CONFIG_KINDS,
    CNNConfig,
    MLPConfig,
    classifier_logits,
    config_from_json,
    conv3x3_same,
    conv_stage,
    dense_layers,
)
from memjax.signals import classification


def classification_signals(params: dict[str, Any], example: dict[str, jax.Array]):
    """The engine's score function: the classification signal bundle of one example."""
    return classification(classifier_logits(params, example["image"]), example["label"])


def fit_classifier(key: jax.Array, images: jax.Array, labels: jax.Array, keep: jax.Array, *,
                   config: MLPConfig | CNNConfig, steps: int = 400,
                   learning_rate: float = 1e-3, weight_decay: float = 0.0) -> dict[str, Any]:
    """Train a classifier on the examples with ``keep`` = 1 (full-batch Adam).

    Args:
      key: PRNG key for initialisation.
      images: [N, ...] float inputs; labels: [N] int; keep: [N] 0/1 training weights.

    Returns:
      The trained params. Pure: vmap over (key, keep) to train many models at once.
    """
    params = config.init(key)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    keep = keep.astype(jnp.float32)

    def loss(p):
        logits = jax.vmap(classifier_logits, in_axes=(None, 0))(p, images)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_example * keep) / jnp.maximum(jnp.sum(keep), 1.0)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def save_model(directory: str | Path, params: dict[str, Any],
               config: MLPConfig | CNNConfig, *, kind: str = "classifier") -> Path:
    """Save one classifier (or encoder: ``kind="encoder"``) in memjax's model format
    (:mod:`memjax.convert.saved`); ``memjax.load(directory)`` opens it as a Model."""
    return write_model(directory, params, config, kind=kind)


def load_model(directory: str | Path) -> tuple[dict[str, Any], MLPConfig | CNNConfig]:
    """(params, config) of a classifier saved by :func:`save_model` (this release's format
    or the previous one); names the folder if it is not one."""
    directory = Path(directory).absolute()
    if not is_model_folder(directory):
        raise InputError(f"--model {str(directory)!r}: expected a folder with {MODEL_FILE} "
                         "(written by memjax audit or memjax.train.save_model)")
    params, config, keep, _ = restore_classifiers(directory)
    if keep is not None:
        raise InputError(f"--model {str(directory)!r} holds a set of {keep.shape[0]} models; "
                         "expected one (memjax.load(path, index=i) picks one of a set)")
    return params, config
