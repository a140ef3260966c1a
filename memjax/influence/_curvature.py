"""Inverse-curvature preconditioners for any model's loss, restricted to its trainable leaves.

The pieces (:mod:`memjax.influence._ihvp` products and solvers,
:mod:`memjax.influence._preconditioners`) work on any parameter pytree. A real model's
params also hold leaves that are not differentiated (integer buffers, BatchNorm
statistics, leaves frozen by ``trainable``), and ``forward_inf`` hands its preconditioner
the gradient in the full params layout with zeros on those leaves. The functions here do
the bookkeeping once: the curvature is the Gauss-Newton matrix of the loss as a function
of the TRAINABLE leaves only (the block of the full matrix that a trainable-only update
sees), the solve runs in that space, and the result is put back in the params layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from memjax.data.base import numeric_fields
from memjax.engine.cache import cached_jit
from memjax.influence._forward_inf import (
    merge_trainable,
    select_trainable,
    trainable_grad,
    trainable_mask,
)
from memjax.influence._ihvp import gnhvp
from memjax.influence._preconditioners import solver_curvature


def trainable_view(params: Any, trainable: Any = None) -> tuple[list, Any, tuple[bool, ...]]:
    """``(leaves, treedef, mask)``: the params' leaves as device arrays, their structure and
    the trainable mask of :func:`memjax.influence.trainable_mask`."""
    leaves, treedef = jax.tree.flatten(params)
    return [jnp.asarray(leaf) for leaf in leaves], treedef, tuple(trainable_mask(params,
                                                                             trainable))


def test_gradients(loss_fn: Callable, params: Any, test: Any, trainable: Any = None) -> list:
    """Per-example loss gradients of the T test examples, trainable leaves only: a list of
    arrays [T, *leaf.shape] in ``select_trainable`` order (jitted; value-cached)."""
    leaves, treedef, mask = trainable_view(params, trainable)
    return _test_gradients(loss_fn, treedef, mask)(leaves, test)


def _test_gradients(loss_fn, treedef, mask):
    def one(leaves, example):
        return trainable_grad(loss_fn, treedef, leaves, mask, example)

    return cached_jit(jax.vmap(one, in_axes=(None, 0)))


def gauss_newton_preconditioner(method: str, outputs_fn: Callable, output_loss: Callable,
                                loss_fn: Callable, params: Any, train_batch: Any, test: Any, *,
                                trainable: Any = None, damping: float | None = None,
                                tol: float | None = None, max_iter: int = 500, seed: int = 0
                                ) -> tuple[Callable[[Any], Any], dict]:
    """``grads -> (G + λI)⁻¹ grads`` for ``forward_inf(precondition=...)`` by CG or LiSSA,
    G the Gauss-Newton matrix (Schraudolph 2002; Martens 2010) of the mean loss over
    ``train_batch`` in the trainable leaves, checked to converge on the test gradients.

    Args:
      method: ``"cg"`` or ``"lissa"`` (:func:`memjax.influence._preconditioners.
        solver_curvature`: damping rule, LiSSA scale and depth, tolerances).
      outputs_fn, output_loss: the loss split as ``output_loss(outputs_fn(params, ex), ex)``
        with ``output_loss`` convex in the outputs (e.g. :func:`classifier_outputs` and
        :func:`label_cross_entropy`), so G is PSD.
      loss_fn: the same per-example loss, ``loss_fn(params, example)`` (test gradients).
      params: the full params pytree.
      train_batch: dict of arrays [M, ...]: the training examples whose mean curvature G is.
      test: dict of arrays [T, ...]: the test examples whose gradients are solved here.
      trainable, damping, tol, max_iter, seed: as in ``forward_inf`` / ``solver_curvature``.

    Returns:
      ``(precondition, info)``; ``precondition`` takes and returns the full params layout
      (frozen leaves: zero in, zero out).
    """
    train_batch, test = numeric_fields(train_batch), numeric_fields(test)
    leaves, treedef, mask = trainable_view(params, trainable)

    def outputs_of(train, example):
        full = jax.tree.unflatten(treedef, merge_trainable(leaves, mask, train))
        return outputs_fn(full, example)

    matvec = functools.partial(gnhvp, outputs_of, output_loss, select_trainable(leaves, mask),
                               train_batch)
    grads = test_gradients(loss_fn, params, test, trainable)
    solve, info = solver_curvature(method, matvec, select_trainable(leaves, mask), grads,
                                   damping=damping, tol=tol, max_iter=max_iter, seed=seed)
    info["curvature_examples"] = int(jax.tree.leaves(train_batch)[0].shape[0])
    return functools.partial(_in_trainable_space, solve=solve, treedef=treedef,
                             leaves=leaves, mask=mask), info


def _in_trainable_space(grads: Any, *, solve, treedef, leaves, mask) -> Any:
    """Apply ``solve`` (on the list of trainable leaves) to a full-layout gradient."""
    solved = solve(select_trainable(jax.tree.leaves(grads), mask))
    zeros = [jnp.zeros_like(leaf) for leaf in leaves]
    return jax.tree.unflatten(treedef, merge_trainable(zeros, mask, solved))
