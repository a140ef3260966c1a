"""Simple unlearning baselines for SimCLR encoders (:mod:`memjax.train.simclr`).

The baselines MUC (Wang et al. 2024, "MUC: Machine Unlearning for Contrastive Learning
with Black-box Evaluation") adapts to contrastive learning, each a few SGD steps from the
original encoder on the NT-Xent loss L (:func:`memjax.train.simclr.nt_xent`):

- ``"finetune"`` (FT): descend L on retain-set minibatches (catastrophic forgetting of the
  forget set);
- ``"gradient_ascent"`` (GA): ascend L on forget-set minibatches (in-batch negatives are
  other forget examples);
- ``"neggrad_plus"`` (NegGrad+, Kurmanji et al. 2023, "Towards Unbounded Machine
  Unlearning"): descend ``beta * L(retain batch) - (1 - beta) * L(forget batch)``.

Step s draws a retain minibatch with ``kept_minibatch(fold_in(fold_in(key, s), 0), retain,
batch_size)`` and a forget minibatch with ``fold_in(..., 1)`` and ``forget_batch_size``
(:func:`memjax.train.clip.kept_minibatch`: distinct examples; fewer kept than the batch
leaves invalid slots that take no part). View j of example i at step s is
``views_fn(image, view_key(view_seed, i, UNLEARN_AUG_OFFSET + 2 s + j))``: never a view
the original training (ids from :data:`memjax.train.simclr.TRAIN_AUG_OFFSET`, fewer than
2^19 steps) or an evaluation (low ids) drew. The update is plain SGD
(``params <- params - learning_rate * grad``) or Adam.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax._checks import check_choice, check_positive_int
from memjax.errors import InputError
from memjax.train.clip import kept_minibatch
from memjax.train.simclr import pair_loss

METHODS = ("finetune", "gradient_ascent", "neggrad_plus")
OPTIMIZERS = ("sgd", "adam")
#: Unlearning views use augmentation ids >= this (training: 2^20 + 2 s + j, s < 2^19).
UNLEARN_AUG_OFFSET = 3 << 20

ViewsFn = Callable[[jax.Array, jax.Array], jax.Array]


def unlearning_objective(params: Any, images: jax.Array, ids: jax.Array, retain: jax.Array,
                         forget: jax.Array, key: jax.Array, step: jax.Array, *, method: str,
                         views_fn: ViewsFn, view_seed: int, batch_size: int,
                         forget_batch_size: int, temperature: float,
                         beta: float) -> jax.Array:
    """The loss one step of ``method`` descends (module docstring); scalar.

    Args: images [N, H, W, C]; ids [N]; retain, forget [N] bool masks; key: the run's key
    (step ``step`` uses ``fold_in(key, step)``).
    """
    step_key = jax.random.fold_in(key, step)
    loss = functools.partial(pair_loss, params, images, ids, step=step, views_fn=views_fn,
                             view_seed=view_seed, temperature=temperature,
                             offset=UNLEARN_AUG_OFFSET)
    if method == "finetune":
        return loss(*kept_minibatch(jax.random.fold_in(step_key, 0), retain, batch_size))
    forget_loss = loss(*kept_minibatch(jax.random.fold_in(step_key, 1), forget,
                                       forget_batch_size))
    if method == "gradient_ascent":
        return -forget_loss
    retain_loss = loss(*kept_minibatch(jax.random.fold_in(step_key, 0), retain, batch_size))
    return beta * retain_loss - (1.0 - beta) * forget_loss


@functools.partial(jax.jit, static_argnames=("method", "views_fn", "view_seed", "steps",
                                             "batch_size", "forget_batch_size",
                                             "optimizer_name"))
def _unlearn(params, images, ids, retain, forget, key, *, method, views_fn, view_seed, steps,
             batch_size, forget_batch_size, temperature, beta, learning_rate, optimizer_name):
    objective = functools.partial(unlearning_objective, images=images, ids=ids,
                                  retain=retain, forget=forget, key=key, method=method,
                                  views_fn=views_fn, view_seed=view_seed,
                                  batch_size=batch_size, forget_batch_size=forget_batch_size,
                                  temperature=temperature, beta=beta)

    optimizer = (optax.sgd(learning_rate) if optimizer_name == "sgd"
                 else optax.adam(learning_rate))

    def step(carry, index):
        p, state = carry
        grads = jax.grad(lambda q: objective(q, step=index))(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
    return params


def unlearn_simclr(params: Any, images: np.ndarray, ids: np.ndarray, retain: np.ndarray,
                   forget: np.ndarray, *, method: str, views_fn: ViewsFn, key: jax.Array,
                   view_seed: int = 0, steps: int = 10, batch_size: int = 128,
                   forget_batch_size: int | None = None, learning_rate: float = 1e-2,
                   optimizer: str = "sgd", temperature: float = 0.5,
                   beta: float = 0.5) -> Any:
    """``steps`` SGD steps of an unlearning baseline from a SimCLR encoder's ``params``.

    Args:
      params: the original encoder (:func:`memjax.train.simclr.fit_simclr` output).
      images: [N, H, W, C] in [0, 1]; ids: [N] ids keying the views (the training ids).
      retain, forget: [N] bool masks (disjoint; the forget set non-empty; the retain set
        non-empty for finetune and neggrad_plus).
      method: "finetune", "gradient_ascent" or "neggrad_plus".
      forget_batch_size: default ``min(batch_size, forget.sum())``.
      optimizer: "sgd" (``p <- p - learning_rate * grad``) or "adam" (optax defaults, the
        optimizer :func:`memjax.train.simclr.fit_simclr` trains with).
      beta: NegGrad+'s weight of the retain loss.

    Returns:
      The unlearned params, as host arrays.
    """
    check_choice("method", method, METHODS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    retain = np.asarray(retain, bool)
    forget = np.asarray(forget, bool)
    if retain.shape != (len(images),) or forget.shape != (len(images),):
        raise InputError(f"retain, forget: expected [N] masks with N = {len(images)}, got "
                         f"{retain.shape} and {forget.shape}")
    if (retain & forget).any():
        raise InputError(f"retain and forget share {int((retain & forget).sum())} examples; "
                         "expected disjoint sets")
    if not forget.any() or (method != "gradient_ascent" and not retain.any()):
        raise InputError(f"method {method!r}: the forget set (and, except for "
                         "gradient_ascent, the retain set) must be non-empty")
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"beta: expected a weight in [0, 1], got {beta}")
    batch_size = check_positive_int(batch_size, "batch_size")
    forget_batch_size = (min(batch_size, int(forget.sum())) if forget_batch_size is None
                         else check_positive_int(forget_batch_size, "forget_batch_size"))
    out = _unlearn(params, jnp.asarray(images), jnp.asarray(ids, jnp.int32),
                   jnp.asarray(retain), jnp.asarray(forget), key, method=method,
                   views_fn=views_fn, view_seed=int(view_seed),
                   steps=check_positive_int(steps, "steps"), batch_size=batch_size,
                   forget_batch_size=forget_batch_size, temperature=float(temperature),
                   beta=float(beta), learning_rate=float(learning_rate),
                   optimizer_name=optimizer)
    return jax.tree.map(np.asarray, out)
