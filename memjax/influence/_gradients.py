"""Gradient-similarity influence baselines: grad-dot and TracIn (Pruthi et al. 2020).

The influence of training example ``z_i`` on test example ``z_t`` is estimated by the
dot product of their loss gradients, g_t · g_i (grad-dot, i.e. TracIn with one checkpoint
and learning rate 1), or by TracInCP's sum over checkpoints Σ_k η_k g_t^(k) · g_i^(k)
("Estimating Training Data Influence by Tracing Gradient Descent", Pruthi et al., NeurIPS
2020). Higher = more influential (a positive score means a gradient step on ``z_i`` lowers
the loss of ``z_t``).

``loss_fn(params, example) -> scalar`` scores ONE example; batches are pytrees whose
leaves share a leading example axis, and per-example gradients are ``vmap(grad(loss_fn))``
(score one example, batch by transform). Nothing here calls ``jit``: every function
traces, so callers jit at the edge with ``loss_fn`` and the keyword options static.

Memory: only the [T, P] test gradients (or their [T, k] projections) are held; training
examples go through ``lax.map`` in batches of ``batch_size``, so no [N, P] matrix exists.
The optional random projection R [P, k] (Johnson–Lindenstrauss, as in TracIn's and TRAK's
projected variants) is generated block by block from ``fold_in(key, block)`` and is never
stored whole; :func:`projection_matrix` materialises the same R for tests at small P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from memjax.errors import InputError
from memjax.influence._forward_inf import trainable_grad, trainable_mask

LossFn = Callable[[Any, Any], jax.Array]


def per_example_grads(loss_fn: LossFn, params: Any, batch: Any, *,
                      trainable: Any = None) -> jax.Array:
    """Flattened per-example loss gradients with respect to the trainable parameters.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
        params: model parameters (any pytree; P trainable scalars in all).
        batch: pytree whose leaves have a leading example axis of size B.
        trainable: as in :func:`memjax.influence.forward_inf` (default: every float leaf
            but NNX ``BatchStat`` ones: BatchNorm running statistics are buffers, not
            parameters, as in PyTorch).

    Returns:
        [B, P] gradients, each the trainable leaves flattened in ``jax.tree.leaves`` order.
    """
    _check_batch(batch, "batch")
    _check_scalar_loss(loss_fn, params, batch)
    mask = tuple(trainable_mask(params, trainable))
    leaves, treedef = jax.tree.flatten(params)

    def flat_grad(example):
        return ravel_pytree(trainable_grad(loss_fn, treedef, leaves, mask, example))[0]

    return jax.vmap(flat_grad)(batch)


def projection_matrix(num_params: int, projection_dim: int, *, seed: int = 0,
                      block_size: int = 4096) -> jax.Array:
    """The [P, k] Gaussian projection that :func:`project` applies, materialised.

    For tests and small P only: it stores P·k floats, which :func:`project` never does.
    """
    _check_projection(projection_dim, block_size)
    n_blocks = -(-num_params // block_size)
    blocks = [_projection_block(seed, b, block_size, projection_dim) for b in range(n_blocks)]
    return jnp.concatenate(blocks, axis=0)[:num_params]


def project(grads: ArrayLike, projection_dim: int, *, seed: int = 0,
            block_size: int = 4096) -> jax.Array:
    """Random projection ``grads @ R`` with R [P, k] ~ N(0, 1/k), built block by block.

    Row block ``b`` of R (rows ``b·block_size`` to ``(b+1)·block_size``) is drawn from
    ``fold_in(PRNGKey(seed), b)``, so only one [block_size, k] block exists at a time and
    the result equals ``grads @ projection_matrix(P, k, seed=seed, block_size=block_size)``
    (up to float summation order). E[(Rᵀg)·(Rᵀh)] = g·h, so projected dot products are
    unbiased estimates of the exact ones.

    Args:
        grads: [B, P] flattened gradients.
        projection_dim: k, the number of projected dimensions.
        seed: seed of R; use the same seed for test and training gradients.
        block_size: rows of R generated at a time.

    Returns:
        [B, k] projected gradients.
    """
    _check_projection(projection_dim, block_size)
    grads = jnp.asarray(grads)
    if grads.ndim != 2:
        raise InputError(f"grads has shape {grads.shape}: expected [B, P]")
    n, p = grads.shape
    n_blocks = -(-p // block_size)
    # Zero-padding P to a whole number of blocks adds rows of R that multiply zeros, so
    # the padded product equals the unpadded one.
    padded = jnp.pad(grads, ((0, 0), (0, n_blocks * block_size - p)))
    padded = padded.reshape(n, n_blocks, block_size).transpose(1, 0, 2)

    def add_block(acc, xs):
        index, g_block = xs
        block = _projection_block(seed, index, block_size, projection_dim)
        return acc + g_block @ block.astype(g_block.dtype), None

    init = jnp.zeros((n, projection_dim), grads.dtype)
    out, _ = jax.lax.scan(add_block, init, (jnp.arange(n_blocks), padded))
    return out


def grad_dot(loss_fn: LossFn, params: Any, test: Any, train: Any, *,
             projection_dim: int | None = None, seed: int = 0, block_size: int = 4096,
             batch_size: int = 256) -> jax.Array:
    """Grad-dot influence scores g_t · g_i (TracIn with one checkpoint and η = 1).

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
        params: parameters at which gradients are taken.
        test: pytree batch of T test examples (leading axis T).
        train: pytree batch of N training examples, same structure and per-example
            shapes as ``test``.
        projection_dim: if given, score (Rᵀg_t)·(Rᵀg_i) with the blockwise random
            projection of :func:`project` instead of the exact dot product.
        seed: seed of the projection.
        block_size: rows of R generated at a time.
        batch_size: training examples whose gradients are formed at a time.

    Returns:
        [T, N] scores; row t, column i is the influence of training example i on test t.
    """
    _check_pair(test, train)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: expected a positive int")
    if projection_dim is not None:
        _check_projection(projection_dim, block_size)

    def features(batch):
        g = per_example_grads(loss_fn, params, batch)
        if projection_dim is None:
            return g
        return project(g, projection_dim, seed=seed, block_size=block_size)

    test_features = features(test)  # [T, P] or [T, k]: the only gradients kept
    n = _batch_size(train)
    n_batches = -(-n // batch_size)
    # Pad N by repeating the last example (not zeros, which could make a loss NaN) and
    # drop the padded columns at the end.
    index = jnp.minimum(jnp.arange(n_batches * batch_size), n - 1)
    batched = jax.tree.map(
        lambda x: jnp.take(x, index, axis=0).reshape(n_batches, batch_size, *x.shape[1:]),
        train)
    scores = jax.lax.map(lambda b: test_features @ features(b).T, batched)  # [nb, T, bs]
    return scores.transpose(1, 0, 2).reshape(test_features.shape[0], -1)[:, :n]


def tracin(loss_fn: LossFn, checkpoints: Sequence[Any], lrs: Sequence[float], test: Any,
           train: Any, **kwargs) -> jax.Array:
    """TracInCP scores Σ_k η_k g_t^(k) · g_i^(k) over saved checkpoints (Pruthi et al. 2020).

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
        checkpoints: K parameter pytrees saved during training.
        lrs: K learning rates η_k in effect at those checkpoints.
        test: pytree batch of T test examples.
        train: pytree batch of N training examples.
        **kwargs: :func:`grad_dot` options (projection_dim, seed, block_size, batch_size);
            every checkpoint uses the same projection.

    Returns:
        [T, N] scores.
    """
    checkpoints, lrs = list(checkpoints), list(lrs)
    if not checkpoints:
        raise InputError("checkpoints is empty: expected at least one parameter pytree")
    if len(checkpoints) != len(lrs):
        raise InputError(f"{len(checkpoints)} checkpoints but {len(lrs)} lrs: expected "
                         "one learning rate per checkpoint")
    total = None
    for params, lr in zip(checkpoints, lrs, strict=True):
        term = lr * grad_dot(loss_fn, params, test, train, **kwargs)
        total = term if total is None else total + term
    return total


def _projection_block(seed: int, index, block_size: int, projection_dim: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    return jax.random.normal(key, (block_size, projection_dim)) / jnp.sqrt(projection_dim)


def _check_projection(projection_dim, block_size) -> None:
    if not isinstance(projection_dim, int) or projection_dim < 1:
        raise InputError(f"projection_dim={projection_dim!r}: expected a positive int")
    if not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"block_size={block_size!r}: expected a positive int")


def _batch_size(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def _check_batch(batch, name: str) -> None:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise InputError(f"{name} has no arrays: expected a pytree of [B, ...] arrays")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in leaves]
        raise InputError(f"{name} leaves have shapes {shapes}: expected one shared leading "
                         "example axis")
    if sizes == {0}:
        raise InputError(f"{name} has 0 examples: expected at least one")


def _check_pair(test, train) -> None:
    _check_batch(test, "test")
    _check_batch(train, "train")
    if jax.tree.structure(test) != jax.tree.structure(train):
        raise InputError(f"test has fields {jax.tree.structure(test)} but train has "
                         f"{jax.tree.structure(train)}: expected the same fields")
    for a, b in zip(jax.tree.leaves(test), jax.tree.leaves(train), strict=True):
        if jnp.shape(a)[1:] != jnp.shape(b)[1:] or jnp.result_type(a) != jnp.result_type(b):
            raise InputError(f"a test field has per-example shape {jnp.shape(a)[1:]} "
                             f"{jnp.result_type(a)} but train has {jnp.shape(b)[1:]} "
                             f"{jnp.result_type(b)}: expected the same")


def _check_scalar_loss(loss_fn: LossFn, params, batch) -> None:
    example = jax.tree.map(lambda x: x[0], batch)
    out = jax.eval_shape(loss_fn, params, example)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise InputError(f"loss_fn returned {shape}: expected a scalar loss for one example")
