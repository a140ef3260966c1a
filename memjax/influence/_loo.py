"""Exact leave-one-out ground truth for L2-regularised multinomial logistic regression.

The convex check of Ko et al., "The Mirrored Influence Hypothesis: Efficient Data
Influence Estimation by Harnessing Forward Passes", CVPR 2024: exact LOO influence
L(θ_{−i}; t) − L(θ; t) versus the mirrored quantity (the change of z_i's loss when t is
learned). The objective is sklearn's with ``C = 1/(n·l2)`` divided by C·n:

    J(θ) = (1/n) Σ_i w_i CE(x_i, y_i; W, b) + (l2/2)·||W||²      (intercept unpenalised)

Everything runs in float64. The full fit is damped Newton; each refit (remove one training
example, or add one test example) is vmapped and starts from the full optimum θ̂ with the
fixed preconditioner (∇²J_{±z}(θ̂))^{-1}, applied exactly by a rank-K Woodbury update of
(∇²J(θ̂))^{-1}. The refit optimum is O(1/n) from θ̂, so each iteration contracts the error
by a factor O(1/n); fits stop when the largest gradient entry is below ``tol`` (1e-12 by
default; the reached value is returned).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from memjax.errors import InputError


class LogisticFit(NamedTuple):
    params: dict[str, np.ndarray]  # {"w": [D, K], "b": [K]} float64
    grad_norm: float  # max |∇J| at the returned params
    iterations: int


class Refits(NamedTuple):
    params: dict[str, np.ndarray]  # stacked {"w": [M, D, K], "b": [M, K]}
    grad_norm: float  # max over the M refits of max |∇J|
    iterations: int


def logistic_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of ONE example: x [D], y int scalar -> scalar."""
    logits = x @ params["w"] + params["b"]
    return jax.nn.logsumexp(logits) - logits[y]


def _objective(params, x, y, weights, l2):
    ce = jax.vmap(logistic_loss, in_axes=(None, 0, 0))(params, x, y)
    # The intercept is defined only up to a constant shift (softmax is invariant to it);
    # the ½(Σb)² term pins that shift without changing any loss, so ∇²J is invertible.
    gauge = 0.5 * jnp.sum(params["b"]) ** 2
    return jnp.sum(weights * ce) / x.shape[0] + 0.5 * l2 * jnp.sum(params["w"] ** 2) + gauge


def _check_data(x, y, n_classes, name="x"):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise InputError(f"{name}: expected features [N, D] and labels [N] with N > 0, got "
                         f"{x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: expected finite features")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"{name} labels: expected integers in [0, {n_classes}), got "
                         f"{y.dtype} in [{y.min()}, {y.max()}]")
    return x, y.astype(np.int64)


def fit_logistic(x, y, weights=None, *, l2: float, n_classes: int | None = None,
                 tol: float = 1e-12, max_iter: int = 100) -> LogisticFit:
    """Minimise J (module docstring) by damped Newton in float64.

    Args:
      x: [N, D] features; y: [N] int labels; weights: [N] example weights (default 1).
      l2: the ridge strength on W (sklearn's C = 1/(N·l2)).
      n_classes: K (default max(y) + 1).
      tol: stop when max |∇J| < tol.
    """
    if not l2 > 0:
        raise InputError(f"l2={l2!r}: expected a positive number")
    n_classes = int(np.max(y)) + 1 if n_classes is None else n_classes
    x, y = _check_data(x, y, n_classes)
    weights = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(x),):
        raise InputError(f"weights: expected shape ({len(x)},), got {weights.shape}")
    with jax.enable_x64(True):
        p0 = {"w": jnp.zeros((x.shape[1], n_classes)), "b": jnp.zeros(n_classes)}
        flat0, unravel = ravel_pytree(p0)
        f = jax.jit(lambda v: _objective(unravel(v), x, y, weights, l2))
        grad, hess = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
        theta, it = flat0, 0
        for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
            g = grad(theta)
            if float(jnp.max(jnp.abs(g))) < tol:
                break
            step = jnp.linalg.solve(hess(theta), g)
            t, value = 1.0, f(theta)
            # Backtracking keeps the first Newton steps (far from θ̂) from overshooting.
            while f(theta - t * step) > value - 0.25 * t * (g @ step) and t > 1e-8:
                t *= 0.5
            theta = theta - t * step
        g = grad(theta)
        return LogisticFit(jax.tree.map(np.asarray, unravel(theta)),
                           float(jnp.max(jnp.abs(g))), it)


def refit_logistic(fit: LogisticFit, x, y, extra_x, extra_y, sign: float, *, l2: float,
                   tol: float = 1e-12, max_iter: int = 50) -> Refits:
    """The optimum of J + sign·CE(z)/N for every extra example z, vmapped.

    ``sign=-1`` with ``extra = (x, y)`` gives the N leave-one-out fits (weight of z_i goes
    from 1 to 0); ``sign=+1`` with test examples gives the "learn t" fits.
    """
    n_classes = fit.params["b"].shape[0]
    x, y = _check_data(x, y, n_classes)
    extra_x, extra_y = _check_data(extra_x, extra_y, n_classes, name="extra_x")
    n = x.shape[0]
    with jax.enable_x64(True):
        flat_hat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, fit.params))
        ones = jnp.ones(n)

        def obj(v, ex, ey):
            p = unravel(v)
            return _objective(p, x, y, ones, l2) + sign * logistic_loss(p, ex, ey) / n

        def logits(v, ex):
            p = unravel(v)
            return ex @ p["w"] + p["b"]

        p_inv = jnp.linalg.inv(jax.hessian(lambda v: _objective(unravel(v), x, y, ones, l2))(
            flat_hat))

        def preconditioner(ex):
            # ∇²CE(z) = Jᵀ A J with J = ∂logits/∂θ [K, P], A = diag(p) − ppᵀ, so
            # (H + s·JᵀAJ/n)^{-1} = P − s·P Jᵀ (nI + s·A J P Jᵀ)^{-1} A J P.
            jac = jax.jacobian(logits)(flat_hat, ex)
            prob = jax.nn.softmax(logits(flat_hat, ex))
            a = jnp.diag(prob) - jnp.outer(prob, prob)
            b = p_inv @ jac.T
            q = jnp.linalg.solve(n * jnp.eye(n_classes) + sign * a @ (jac @ b), a)
            return b, q

        def solve_one(ex, ey):
            b, q = preconditioner(ex)
            grad = jax.grad(obj)

            def apply(g):
                return p_inv @ g - sign * b @ (q @ (b.T @ g))

            def body(state):
                v, _, it = state
                v = v - apply(grad(v, ex, ey))
                return v, jnp.max(jnp.abs(grad(v, ex, ey))), it + 1

            def cond(state):
                return (state[1] >= tol) & (state[2] < max_iter)

            start = (flat_hat, jnp.max(jnp.abs(grad(flat_hat, ex, ey))), 0)
            return jax.lax.while_loop(cond, body, start)

        v, gnorm, its = jax.jit(jax.vmap(solve_one))(jnp.asarray(extra_x), jnp.asarray(extra_y))
        params = jax.vmap(unravel)(v)
        return Refits(jax.tree.map(np.asarray, params), float(jnp.max(gnorm)),
                      int(jnp.max(its)))


def _losses(params: dict, x, y) -> np.ndarray:
    """CE of every example under every stacked params: [M, N]."""
    with jax.enable_x64(True):
        per = jax.vmap(jax.vmap(logistic_loss, in_axes=(None, 0, 0)), in_axes=(0, None, None))
        return np.asarray(per(jax.tree.map(jnp.asarray, params), jnp.asarray(x),
                              jnp.asarray(y)))


def loo_influence(x, y, test_x, test_y, *, l2: float, n_classes: int | None = None,
                  tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Exact LOO influence [T, N]: L(θ_{−i}; t) − L(θ; t) (positive = i supports t).

    Returns the influence and the largest max|∇J| reached by any of the N + 1 fits.
    """
    n_classes = int(max(np.max(y), np.max(test_y))) + 1 if n_classes is None else n_classes
    fit = fit_logistic(x, y, l2=l2, n_classes=n_classes, tol=tol)
    refits = refit_logistic(fit, x, y, x, y, -1.0, l2=l2, tol=tol)
    base = _losses(jax.tree.map(lambda a: a[None], fit.params), test_x, test_y)  # [1, T]
    loo = _losses(refits.params, test_x, test_y)  # [N, T]
    return (loo - base).T, max(fit.grad_norm, refits.grad_norm)


def dual_loo_influence(x, y, test_x, test_y, *, l2: float, n_classes: int | None = None,
                       tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Exact mirrored influence [T, N]: −(L(θ_{+t}; z_i) − L(θ; z_i)) (positive = supports).

    θ_{+t} is the exact optimum with test example t added to the training objective
    (Ko et al. 2024's DualLOO); the sign makes it comparable with :func:`loo_influence`.
    """
    n_classes = int(max(np.max(y), np.max(test_y))) + 1 if n_classes is None else n_classes
    fit = fit_logistic(x, y, l2=l2, n_classes=n_classes, tol=tol)
    refits = refit_logistic(fit, x, y, test_x, test_y, 1.0, l2=l2, tol=tol)
    base = _losses(jax.tree.map(lambda a: a[None], fit.params), x, y)  # [1, N]
    learned = _losses(refits.params, x, y)  # [T, N]
    return -(learned - base), max(fit.grad_norm, refits.grad_norm)
