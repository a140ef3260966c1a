"""Correlation statistics for evaluating attribution scores, and the linear datamodeling score.

``pearson`` and ``spearman`` follow ``scipy.stats`` (Spearman = Pearson of average ranks,
so ties get the mean of the ranks they span). A constant input has no defined
correlation and gives NaN, as scipy does. ``lds`` is the linear datamodeling score of
TRAK (Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from memjax.errors import InputError


def pearson(a: ArrayLike, b: ArrayLike, axis: int = -1) -> jax.Array:
    """Pearson correlation of ``a`` and ``b`` along ``axis``.

    Args:
        a, b: arrays of the same shape, at least 2 entries along ``axis``.
        axis: the axis correlated over; the other axes are batch axes.

    Returns:
        The correlations, shape of ``a`` without ``axis``.
    """
    a, b = _checked(a, b, axis)
    # Centering before the products keeps float32 accurate when the means are large.
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    num = (a * b).sum(axis)
    return num / jnp.sqrt((a * a).sum(axis) * (b * b).sum(axis))


def spearman(a: ArrayLike, b: ArrayLike, axis: int = -1) -> jax.Array:
    """Spearman rank correlation along ``axis``: Pearson of average ranks (as scipy).

    Args:
        a, b: arrays of the same shape, at least 2 entries along ``axis``.
        axis: the axis correlated over; the other axes are batch axes.

    Returns:
        The correlations, shape of ``a`` without ``axis``.
    """
    a, b = _checked(a, b, axis)
    return pearson(rankdata(a, axis), rankdata(b, axis), axis)


def rankdata(x: ArrayLike, axis: int = -1) -> jax.Array:
    """1-based ranks along ``axis``, ties given their average rank (scipy's "average").

    An entry with ``l`` entries strictly below it and ``r`` entries at most equal to it
    (itself included) spans ranks l+1 .. r, whose mean is (l + r + 1) / 2.
    """
    x = jnp.moveaxis(jnp.asarray(x), axis, -1)

    def ranks_1d(row):
        s = jnp.sort(row)
        lower = jnp.searchsorted(s, row, side="left")
        upper = jnp.searchsorted(s, row, side="right")
        return (lower + upper + 1) / 2.0

    flat = x.reshape(-1, x.shape[-1])
    ranks = jax.vmap(ranks_1d)(flat).reshape(x.shape)
    return jnp.moveaxis(ranks, -1, axis)


class LDS(NamedTuple):
    """Linear datamodeling score: ``per_test`` [T] and its ``mean`` over test examples."""

    per_test: jax.Array
    mean: jax.Array


def lds(predicted_scores: ArrayLike, subsets: ArrayLike, outputs: ArrayLike) -> LDS:
    """Linear datamodeling score (Park et al. 2023, TRAK, Definition 2.3).

    For test example t, an attribution method predicts that a model trained on subset
    S_s outputs Σ_{i ∈ S_s} τ(t)_i; the LDS is the Spearman correlation, over the S
    subsets, between these predictions and the outputs actually measured on models
    trained on those subsets.

    Args:
        predicted_scores: [T, N] attribution scores τ(t)_i of training example i for test t.
        subsets: [S, N] bool, row s marks the training examples of subset s.
        outputs: [S, T] measured output (e.g. margin) for test t of the model trained on
            subset s.

    Returns:
        ``LDS(per_test [T], mean)``. A test whose outputs or predictions are constant over
        the subsets has no rank correlation (NaN) and is left out of the mean.
    """
    scores = jnp.asarray(predicted_scores)
    subsets = jnp.asarray(subsets)
    outputs = jnp.asarray(outputs)
    if scores.ndim != 2:
        raise InputError(f"predicted_scores has shape {scores.shape}: expected [T, N]")
    t, n = scores.shape
    if subsets.ndim != 2 or subsets.shape[1] != n or subsets.dtype != jnp.bool_:
        raise InputError(f"subsets has shape {subsets.shape} dtype {subsets.dtype}: expected "
                         f"bool [S, {n}]")
    s = subsets.shape[0]
    if s < 2:
        raise InputError(f"subsets has {s} rows: expected at least 2 subsets to rank")
    if outputs.shape != (s, t):
        raise InputError(f"outputs has shape {outputs.shape}: expected [S, T] = [{s}, {t}]")
    predicted = subsets.astype(scores.dtype) @ scores.T  # [S, T]
    per_test = spearman(predicted, outputs, axis=0)
    return LDS(per_test, jnp.nanmean(per_test))


def _checked(a, b, axis):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"a has shape {a.shape} but b has {b.shape}: expected equal shapes")
    if a.ndim == 0 or not -a.ndim <= axis < a.ndim:
        raise InputError(f"axis={axis} for shape {a.shape}: expected an axis of the inputs")
    if a.shape[axis] < 2:
        raise InputError(f"inputs have {a.shape[axis]} entries along axis {axis}: "
                         "expected at least 2")
    dtype = jnp.result_type(a, b, jnp.float32)
    return a.astype(dtype), b.astype(dtype)
