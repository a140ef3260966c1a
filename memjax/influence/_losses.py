"""Per-example losses for influence methods, built from a model's logits function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def cross_entropy_loss(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       example: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy of ONE example (fields ``image`` and ``label``) under a classifier.

    Args:
      logits_fn: ``logits_fn(params, image) -> [C]`` logits (e.g.
        ``memjax.train.classifier_logits``).

    Bind ``logits_fn`` once (``functools.partial(cross_entropy_loss, logits_fn)``, at
    module level) to get the ``loss_fn(params, example)`` that :func:`forward_inf`,
    :func:`self_influence` and :func:`grad_dot` take.
    """
    logits = logits_fn(params, example["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])
