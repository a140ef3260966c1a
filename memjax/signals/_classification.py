"""Per-example signals of a classifier's output: loss, confidence, LiRA's phi, margin.

One example per call (``logits`` [C], ``label`` scalar); batch with :func:`jax.vmap`.
Everything is computed in float32 whatever the input dtype, from the log-softmax shifted
by the max logit, so logits as large as ±1e4 give finite, accurate values.

Labels are not range-checked here: a traced value cannot raise. The engine validates
labels on the host with :func:`check_labels` before anything is traced; a label outside
``[0, C)`` that slips through gives NaN for the label-dependent fields (never a silently
wrapped or clamped class) and ``correct = False``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memjax._checks import check_positive_int
from memjax.errors import InputError


def classification(logits: jax.Array, label: jax.Array) -> dict[str, jax.Array]:
    """Membership signals of one classified example.

    Args:
        logits: [C] float logits (any float dtype), C >= 2.
        label: scalar integer true class in ``[0, C)``.

    Returns:
        Dict of float32 scalars (``correct`` is bool):

        - ``loss``: cross-entropy ``logsumexp(z) - z_y``.
        - ``p_true``: ``softmax(z)_y``.
        - ``phi``: LiRA's logit-scaled confidence ``log p_y - log(1 - p_y)``
          ``= z_y - logsumexp_{y' != y} z_y'`` (Carlini et al. 2022, "Membership
          Inference Attacks From First Principles").
        - ``hinge``: ``z_y - max_{y' != y} z_y'``.
        - ``entropy``: ``-sum_c p_c log p_c``.
        - ``correct``: ``argmax(z) == y``.

    Raises:
        InputError: at trace time, if ``logits`` is not 1-D float with at least 2
            classes or ``label`` is not an integer scalar.
    """
    logits = jnp.asarray(logits)
    label = jnp.asarray(label)
    if logits.ndim != 1:
        raise InputError(
            f"logits must be 1-D [C] (one example; batch with jax.vmap), got shape "
            f"{logits.shape}"
        )
    num_classes = logits.shape[0]
    if num_classes < 2:
        raise InputError(f"logits must have at least 2 classes, got C={num_classes}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise InputError(f"logits must have a floating dtype, got {logits.dtype}")
    if label.ndim != 0:
        raise InputError(
            f"label must be an integer scalar (one example; batch with jax.vmap), got "
            f"shape {label.shape}"
        )
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise InputError(f"label must have an integer dtype, got {label.dtype}")

    z = logits.astype(jnp.float32)
    classes = jnp.arange(num_classes)
    in_range = (label >= 0) & (label < num_classes)
    # Out-of-range labels index past the end so the "fill" gather yields NaN; jnp would
    # otherwise wrap negative labels and clamp large ones to a real class.
    index = jnp.where(in_range, label, num_classes)
    is_true = (classes == label) & in_range

    # Work with logits shifted by their max: z - max is exact for nearby logits, so the
    # loss and phi keep their relative precision even when |z| ~ 1e4 (logsumexp(z) - z_y
    # would round the ~1e4 log-partition first and lose ~1e-3 absolute).
    s = z - jnp.max(z)
    log_p = jax.nn.log_softmax(s)
    log_p_y = jnp.take(log_p, index, mode="fill", fill_value=jnp.nan)
    s_y = jnp.take(s, index, mode="fill", fill_value=jnp.nan)
    z_y = jnp.take(z, index, mode="fill", fill_value=jnp.nan)

    # Wrong classes only: mask the true class to -inf, then a stable logsumexp / max.
    phi = s_y - jax.nn.logsumexp(jnp.where(is_true, -jnp.inf, s))
    hinge = z_y - jnp.max(jnp.where(is_true, -jnp.inf, z))

    p = jnp.exp(log_p)
    # p == 0 where log p is very negative or -inf: contribute 0, not 0 * -inf = NaN.
    entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0))

    return {
        "loss": -log_p_y,
        "p_true": jnp.exp(log_p_y),
        "phi": phi,
        "hinge": hinge,
        "entropy": entropy,
        "correct": jnp.argmax(z) == label,
    }


def check_labels(labels: np.ndarray, num_classes: int, name: str = "label",
                 indices: np.ndarray | None = None) -> None:
    """Host-side check that integer labels lie in ``[0, num_classes)``.

    Args:
        labels: array of labels, any shape, integer dtype.
        num_classes: number of classes C.
        name: field name used in the error message.
        indices: [n] example indices of 1-D ``labels`` (a batch of a larger source), so the
            message names the example rather than the position in the batch.

    Raises:
        InputError: naming ``name``, the first offending index and value and the expected
            range; or if ``labels`` does not have an integer dtype.
    """
    labels = np.asarray(labels)
    num_classes = check_positive_int(num_classes, "num_classes")
    if labels.dtype.kind not in "iu":
        raise InputError(
            f"{name} must have an integer dtype with classes in [0, {num_classes}), got "
            f"dtype {labels.dtype}"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        where = np.argwhere(bad)[0]  # first in C order
        index = int(where[0]) if labels.ndim == 1 else tuple(int(i) for i in where)
        if indices is not None and labels.ndim == 1:
            index = int(np.asarray(indices)[where[0]])
        value = labels[tuple(where)]
        count = int(bad.sum())
        raise InputError(
            f"{name} at index {index} is {value}, expected an integer in "
            f"[0, {num_classes}) ({count} out-of-range value(s) in total)"
        )
