"""Applications of Forward-INF (Ko et al., CVPR 2024): self-influence and source tracing.

- :func:`self_influence`: the effect of unlearning each training example on its own loss,
  δ_ii = L(θ'_i; z_i) − L(θ; z_i) with θ'_i = θ after ascent on z_i. Examples the model
  has to bend to fit (mislabeled, atypical, memorized) move most. One update per example,
  run by the engine as an ordinary per-example function: no [N, N] matrix.
- :func:`relative_influence`: influence divided by each training example's own
  self-influence magnitude (RelatIF, Barshan et al. 2020): at first order a gradient
  cosine, so examples with large gradients (misfit, mislabeled) stop dominating every
  test example's ranking.
- :func:`relative_first_order`: first-order Forward-INF relative to self-influence (the
  cosine of the test and training gradients): an exact copy of a training example ranks
  its source first.
- :func:`top_sources` / :func:`hit_rates`: for [T, N] influence scores, the k most
  supporting training examples of each test example, and how often the known source
  (a leaked duplicate, the training document a text came from) is among them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.engine import score as engine_score
from memjax.errors import InputError
from memjax.influence._forward_inf import (
    LossFn,
    check_settings,
    forward_inf,
    loss_at,
    make_optimizer,
    select_trainable,
    small_step_tangent,
    trainable_mask,
    update_params,
)


def self_influence(loss_fn: LossFn, params: Any, train: Any, *, lr: float,
                   mode: str = "finite", optimizer: str = "sgd", steps: int = 1,
                   trainable: Any = None, batch_size: int = 256, mesh: Any = None,
                   store: Any = None, progress: bool = False) -> np.ndarray | Any:
    """Self-influence δ_ii of every training example (higher = more self-influential).

    ``finite``: ``steps`` steps of ``optimizer`` ascending z_i's own loss, then the change
    of that loss. ``first_order``: its small-step limit, g_i·v_i with v_i the first step's
    direction (``steps·lr·g_i`` for SGD: lr·|g_i|²; ``steps·lr·sign(g_i)`` for sign and
    Adam: lr·|g_i|₁).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      params: pytree of parameters; ``trainable`` as in :func:`forward_inf`.
      train: any engine source of N examples.

    Returns:
      [N] float32 (or the completed :class:`ScoreStore`, field ``self_influence``).
    """
    check_settings(mode=mode, optimizer=optimizer, lr=lr, steps=steps)
    mask = tuple(trainable_mask(params, trainable))
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    fn = _self_influence_fn(loss_fn, treedef, mask, mode, optimizer, float(lr), int(steps))
    out = engine_score(fn, leaves, train, batch_size=batch_size, mesh=mesh, store=store,
                       progress=progress)
    return out if store is not None else np.asarray(out["self_influence"])


# A fresh closure per call: the engine keys compiled programs by value.
def _self_influence_fn(loss_fn, treedef, mask, mode, optimizer, lr, steps):
    def fn(leaves, example):
        def own_loss(train):
            return loss_at(loss_fn, treedef, leaves, mask, train, example)

        start = select_trainable(leaves, mask)
        if mode == "first_order":
            grad = jax.grad(own_loss)(start)
            tangent = small_step_tangent(grad, optimizer, lr, steps)
            value = sum(jnp.vdot(g, v) for g, v in zip(grad, tangent, strict=True))
        else:
            moved = update_params(lambda w: -own_loss(w), start,
                                  make_optimizer(optimizer, lr), steps)
            value = own_loss(moved) - own_loss(start)
        return {"self_influence": value}

    return fn


def relative_influence(scores: Any, self_scores: Any) -> np.ndarray:
    """[T, N] ``scores / sqrt(|self_scores|)``: each training example's influence relative
    to its own self-influence (first order: lr·g_i·g_t / sqrt(lr·|g_i|²), the cosine of
    the gradients times sqrt(lr)·|g_t|, which does not change the ranking over i).

    Args:
      scores: [T, N] influence, e.g. :func:`forward_inf` oriented scores.
      self_scores: [N] :func:`self_influence` of the same training examples (same lr).
    """
    scores, self_scores = np.asarray(scores, np.float64), np.asarray(self_scores, np.float64)
    if scores.ndim != 2 or self_scores.shape != (scores.shape[1],):
        raise InputError(f"self_scores: expected [N] = [{scores.shape[-1]}] for scores "
                         f"[T, N], got {self_scores.shape} and {scores.shape}")
    # A training example with zero gradient has zero influence on everything: keep it 0.
    scale = np.sqrt(np.abs(self_scores))
    return np.divide(scores, scale, out=np.zeros_like(scores), where=scale > 0)


#: Source ranking: first-order influence relative to self-influence, i.e. the cosine of
#: the training and test gradients (an exact copy of a training example scores exactly 1,
#: the maximum; in the finite regime no such guarantee holds).
RANKING = {"mode": "first_order", "optimizer": "sgd", "lr": 0.1}


def relative_first_order(loss_fn: LossFn, params: Any, test: Any, train: Any, *,
                         batch_size: int = 256, trainable: Any = None,
                         progress: bool = False) -> np.ndarray:
    """[T, N] first-order Forward-INF relative to self-influence (a gradient cosine over
    the ``trainable`` parameters, see :func:`trainable_mask`)."""
    scores = forward_inf(loss_fn, params, test, train, **RANKING, trainable=trainable,
                         batch_size=batch_size, progress=progress)
    own = self_influence(loss_fn, params, train, **RANKING, trainable=trainable,
                         batch_size=batch_size, progress=progress)
    return relative_influence(scores, own)


def top_sources(scores: Any, k: int = 5) -> np.ndarray:
    """[T, k] indices of the k highest-scoring training examples per test row, best first.

    Args:
      scores: [T, N] influence (higher = supports more), e.g. ``forward_inf`` oriented.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise InputError(f"scores: expected [T, N] with N >= 1, got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise InputError(f"k={k}: expected 1 <= k <= N = {scores.shape[1]}")
    if not np.isfinite(scores).all():
        raise InputError("scores: has NaN/Inf values; expected finite influence scores")
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def hit_rates(scores: Any, source: Any, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: fraction of test rows whose true ``source`` [T] is among their top-k}."""
    source = np.asarray(source)
    scores = np.asarray(scores)
    if source.shape != (scores.shape[0],):
        raise InputError(f"source: expected [T] = [{scores.shape[0]}] training indices, got "
                         f"shape {source.shape}")
    top = top_sources(scores, max(ks))
    return {k: float(np.mean((top[:, :k] == source[:, None]).any(axis=1))) for k in ks}
