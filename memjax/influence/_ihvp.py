"""Matrix-free inverse-Hessian-vector products: curvature products, CG and LiSSA solvers.

Influence functions (Koh & Liang, ICML 2017, "Understanding Black-box Predictions via
Influence Functions") need ``(H + λI)^{-1} v`` for the training loss's curvature H, which is
never formed for a real model. This module gives the pieces:

- curvature-vector products over a batch of training examples (the MEAN over examples):
  :func:`hvp`, the exact Hessian by forward-over-reverse differentiation (Pearlmutter 1994),
  and :func:`gnhvp`, the Gauss-Newton matrix ``J^T H_out J`` (Schraudolph 2002, "Fast
  Curvature Matrix-Vector Products for Second-Order Gradient Descent"; Martens 2010,
  "Deep learning via Hessian-free optimization"), positive semi-definite whenever the
  output loss is convex;
- solvers of ``(A + λI) x = b`` given only ``matvec(v) = A v``, for K right-hand sides at
  once (``b`` is a pytree whose leaves carry a leading axis of size K): :func:`cg_solve`
  (conjugate gradient, each right-hand side with its own stopping test) and :func:`lissa`
  (Agarwal, Bullins & Hazan 2017, "Second-Order Stochastic Optimization for Machine
  Learning in Linear Time", in the form of Koh & Liang's implementation);
- the exact ground truth for small models: :func:`dense_curvature` builds the [P, P] matrix
  of any such product and :func:`dense_solve` solves with it.

The matvec here is full-batch and deterministic: ``matvec = functools.partial(hvp, loss_fn,
params, train_batch)`` uses every training example at every iteration (LiSSA's stochastic
minibatch estimates are not implemented). Losses follow the influence package's
convention: ``loss_fn(params, example) -> scalar`` for ONE example, batches are pytrees with
a leading example axis. Nothing here calls ``jit``; callers jit at the edge. A solver
cannot raise from inside a trace, so each returns a :class:`SolveResult` with per
right-hand-side convergence flags; :func:`require_converged` (outside ``jit``) turns
non-convergence into an :class:`~memjax.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from memjax.errors import InputError

Matvec = Callable[[Any], Any]


class SolveResult(NamedTuple):
    """What a solver returns, for K right-hand sides.

    Attributes:
      x: the solutions, a pytree like ``b`` (leaves with a leading axis K).
      relative_residual: [K] ``||b - (A + λI) x|| / ||b||`` at the returned x (0 where b = 0).
      iterations: [K] int32, matvecs spent on each right-hand side (LiSSA: its depth).
      converged: [K] bool, ``relative_residual <= tol`` and finite.
    """

    x: Any
    relative_residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


def hvp(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, v: Any) -> Any:
    """Hessian-vector product ``H v`` of the mean loss over ``batch`` (forward over reverse).

    ``H = (1/B) Σ_i ∇²_θ loss_fn(θ, z_i)``; computed as the JVP of the gradient (Pearlmutter
    1994), one forward and one backward pass per example, never forming H.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      params: the parameter pytree θ (P scalars in all).
      batch: pytree whose leaves have a leading example axis B.
      v: a pytree like ``params``. ``jax.vmap(hvp, (None, None, None, 0))`` takes K vectors.

    Returns:
      ``H v``, a pytree like ``params``.
    """
    def mean_loss(p):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch))

    return jax.jvp(jax.grad(mean_loss), (params,), (v,))[1]


def gnhvp(outputs_fn: Callable[[Any, Any], Any], output_loss: Callable[[Any, Any], jax.Array],
          params: Any, batch: Any, v: Any) -> Any:
    """Gauss-Newton-vector product ``G v`` of the mean loss over ``batch``.

    For a loss ``output_loss(outputs_fn(θ, z), z)``, ``G = (1/B) Σ_i J_i^T H_i J_i`` with
    ``J_i`` the Jacobian of the outputs [O] in θ and ``H_i`` the Hessian [O, O] of
    ``output_loss`` in the outputs (Schraudolph 2002; Martens 2010, Sec. 4.2). G drops the
    Hessian's term in the outputs' own curvature, so it is PSD for a convex ``output_loss``
    (e.g. softmax cross-entropy on logits) and equals H for a model linear in θ.

    Args:
      outputs_fn: ``outputs_fn(params, example) -> outputs`` (any pytree, e.g. logits [C]).
      output_loss: ``output_loss(outputs, example) -> scalar``, convex in ``outputs``.
      params, batch, v: as in :func:`hvp` (vmap over ``v`` for K vectors).

    Returns:
      ``G v``, a pytree like ``params``.
    """
    def all_outputs(p):
        return jax.vmap(outputs_fn, in_axes=(None, 0))(p, batch)

    outputs, jv = jax.jvp(all_outputs, (params,), (v,))  # J v, per example

    def output_hvp(out, tangent, example):
        grad_out = jax.grad(output_loss)
        return jax.jvp(lambda o: grad_out(o, example), (out,), (tangent,))[1]

    h_jv = jax.vmap(output_hvp)(outputs, jv, batch)
    count = jax.tree.leaves(outputs)[0].shape[0]
    _, pullback = jax.vjp(all_outputs, params)
    return pullback(jax.tree.map(lambda t: t / count, h_jv))[0]


def dense_curvature(matvec: Matvec, params: Any) -> jax.Array:
    """The [P, P] matrix of a linear ``matvec`` on pytrees like ``params`` (small models only).

    Columns are ``matvec`` of the unit vectors, flattened with
    ``jax.flatten_util.ravel_pytree`` (the order :func:`dense_solve`'s vectors use). Costs P
    matvecs and P² floats: the ground truth in tests, not a method for real models.
    """
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.shape[0], dtype=flat.dtype)
    columns = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(basis)
    return columns.T


def dense_solve(matrix: jax.Array, vectors: jax.Array, damping: float) -> jax.Array:
    """``(A + λI)^{-1} b`` for each row b of ``vectors`` [K, P], A = ``matrix`` [P, P].

    Returns [K, P]. An exact LU solve: O(P³), for small models.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"dense_solve: matrix must be square [P, P], got {matrix.shape}")
    if vectors.ndim != 2 or vectors.shape[1] != matrix.shape[0]:
        raise InputError(f"dense_solve: vectors must be [K, {matrix.shape[0]}], "
                         f"got {vectors.shape}")
    _check_damping(damping, "dense_solve")
    damped = matrix + damping * jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    return jnp.linalg.solve(damped, vectors.T).T


def cg_solve(matvec: Matvec, b: Any, damping: float, *, tol: float = 1e-6,
             max_iter: int = 100) -> SolveResult:
    """Conjugate gradient for ``(A + λI) x = b``, K right-hand sides at once.

    A must be symmetric positive semi-definite (with λ > 0) or definite: the Gauss-Newton
    matrix of a convex output loss is; the Hessian of a non-convex model need not be, and CG
    may then fail (reported by ``converged``). Each right-hand side runs its own loop
    (``lax.while_loop`` vmapped over K) and stops when ``||r|| <= tol·||b||`` or after
    ``max_iter`` iterations (Hestenes & Stiefel 1952; Nocedal & Wright, Alg. 5.2). Starts at
    x = 0; where the true residual then misses ``tol`` (the recursive one drifts in float32),
    CG restarts once from it (residual replacement), within the same ``max_iter``.

    Args:
      matvec: ``A v`` for ONE pytree v like the rows of ``b`` (e.g. a partial of :func:`hvp`).
      b: pytree whose leaves have a leading axis K (K right-hand sides).
      damping: λ ≥ 0.
      tol: relative residual at which a right-hand side stops.
      max_iter: iteration cap per right-hand side.

    Returns:
      :class:`SolveResult` (``iterations`` = CG steps taken per right-hand side).
    """
    _check_damping(damping, "cg_solve")
    if max_iter < 1 or tol <= 0:
        raise InputError(f"cg_solve: need max_iter >= 1 and tol > 0, got {max_iter}, {tol}")
    flat_b, unravel_rows, damped = _flat_problem(matvec, b, damping, "cg_solve")

    def solve_one(rhs):
        threshold_sq = (tol * tol) * jnp.vdot(rhs, rhs)

        def keep_going(state):
            _, r, _, rs, it = state
            return (rs > threshold_sq) & (it < max_iter)

        def step(state):
            x, r, p, rs, it = state
            ap = damped(p)
            alpha = rs / jnp.vdot(p, ap)
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = jnp.vdot(r, r)
            p = r + (rs_new / rs) * p
            return x, r, p, rs_new, it + 1

        zero = jnp.zeros_like(rhs)
        start = (zero, rhs, rhs, jnp.vdot(rhs, rhs), jnp.zeros((), jnp.int32))
        x, _, _, _, it = jax.lax.while_loop(keep_going, step, start)
        # The recursive residual drifts from the true b - (A + λI) x in floating point
        # (float32: by ~1e-7 relative per step), and ``converged`` is judged on the true one.
        # Restart once from the true residual (residual replacement); when it already meets
        # tol the loop does not run and x is unchanged.
        true_residual = rhs - damped(x)
        restart = (x, true_residual, true_residual, jnp.vdot(true_residual, true_residual), it)
        x, _, _, _, it = jax.lax.while_loop(keep_going, step, restart)
        return x, it

    x, iterations = jax.vmap(solve_one)(flat_b)
    return _result(damped, flat_b, x, iterations, tol, unravel_rows)


def lissa(matvec: Matvec, b: Any, damping: float, scale: float, depth: int, *,
          tol: float = 1e-4) -> SolveResult:
    """LiSSA: ``(A + λI)^{-1} b`` by the truncated Neumann series, K right-hand sides at once.

    The recursion (Agarwal et al. 2017, as Koh & Liang 2017's implementation runs it, with
    the full-batch matvec at every step)::

        v_0 = b,    v_j = b + v_{j-1} - (A + λI) v_{j-1} / scale,    x = v_depth / scale

    whose fixed point is ``v = scale (A + λI)^{-1} b``. Koh & Liang write the step as
    ``b + (1 - d) v - A v / scale``; that is this recursion with their ``d = λ / scale``,
    so their result is ``(A + scale·d·I)^{-1} b``. It converges iff every eigenvalue μ of
    ``A + λI`` lies in ``(0, 2·scale)`` (the iteration matrix ``I - (A + λI)/scale`` then has
    spectral radius < 1; Koh & Liang's condition ``||A/scale|| < 1`` suffices for PSD A and
    small λ), with error factor ``max |1 - μ/scale|`` per step. A ``scale`` below half the
    largest eigenvalue diverges: ``converged`` is then False (the residual grows or is
    non-finite), never silently.

    Args:
      matvec: ``A v`` for ONE pytree v like the rows of ``b``.
      b: pytree whose leaves have a leading axis K.
      damping: λ ≥ 0.
      scale: > 0, at least half the largest eigenvalue of ``A + λI`` for convergence.
      depth: number of recursion steps (matvecs), ≥ 1.
      tol: relative residual (one extra matvec at the end) below which ``converged``.

    Returns:
      :class:`SolveResult` (``iterations`` = ``depth`` for every right-hand side).
    """
    _check_damping(damping, "lissa")
    if not scale > 0:
        raise InputError(f"lissa: scale must be > 0, got {scale}")
    if depth < 1 or tol <= 0:
        raise InputError(f"lissa: need depth >= 1 and tol > 0, got {depth}, {tol}")
    flat_b, unravel_rows, damped = _flat_problem(matvec, b, damping, "lissa")

    def solve_one(rhs):
        inv_scale = jnp.asarray(1.0 / scale, rhs.dtype)

        def step(_, v):
            return rhs + v - inv_scale * damped(v)

        return jax.lax.fori_loop(0, depth, step, rhs) * inv_scale

    x = jax.vmap(solve_one)(flat_b)
    iterations = jnp.full((flat_b.shape[0],), depth, jnp.int32)
    return _result(damped, flat_b, x, iterations, tol, unravel_rows)


def require_converged(result: SolveResult, method: str) -> SolveResult:
    """Raise :class:`InputError` if any right-hand side of ``result`` did not converge.

    Call it outside ``jit``. The message names the worst residual and what to change
    (``scale``/``depth`` for LiSSA, ``max_iter``/``damping`` for CG).
    """
    converged = np.asarray(result.converged)
    if converged.all():
        return result
    residual = np.asarray(result.relative_residual)
    worst = residual[~converged]
    hint = ("raise scale (above half the largest eigenvalue of A + λI) or depth"
            if method == "lissa" else "raise max_iter or damping (A + λI must be definite)")
    raise InputError(f"{method}: {int((~converged).sum())} of {converged.size} right-hand "
                     f"sides did not converge (worst relative residual {np.max(worst):.3g}); "
                     f"{hint}")


def _flat_problem(matvec: Matvec, b: Any, damping: float, where: str):
    """``b`` as [K, P] rows, the row -> pytree map, and the flat damped matvec."""
    leaves = jax.tree.leaves(b)
    if not leaves:
        raise InputError(f"{where}: b has no arrays")
    counts = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(counts) != 1 or None in counts:
        raise InputError(f"{where}: every leaf of b needs the same leading axis K (one row "
                         f"per right-hand side); got leading sizes {sorted(map(str, counts))}")
    _, unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], b))
    flat_b = jax.vmap(lambda row: ravel_pytree(row)[0])(b)

    def damped(v):
        out = ravel_pytree(matvec(unravel(v)))[0]
        return out + jnp.asarray(damping, v.dtype) * v

    return flat_b, jax.vmap(unravel), damped


def _result(damped, flat_b, x, iterations, tol, unravel_rows) -> SolveResult:
    residual = flat_b - jax.vmap(damped)(x)
    b_norm = jnp.linalg.norm(flat_b, axis=1)
    r_norm = jnp.linalg.norm(residual, axis=1)
    relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), r_norm)
    converged = jnp.isfinite(relative) & (relative <= tol)
    return SolveResult(unravel_rows(x), relative, iterations, converged)


def _check_damping(damping: float, where: str) -> None:
    if not np.isfinite(damping) or damping < 0:
        raise InputError(f"{where}: damping must be finite and >= 0, got {damping}")
