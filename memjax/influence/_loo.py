"""Exact leave-one-out ground truth for L2-regularised multinomial logistic regression.

The convex check of Ko et al., "The Mirrored Influence Hypothesis: Efficient Data
Influence Estimation by Harnessing Forward Passes", CVPR 2024: exact LOO influence
L(θ_{−i}; t) − L(θ; t) versus the mirrored quantity (the change of z_i's loss when t is
learned). With n the size of the FULL training set, fixed for every fit below:

    J(θ)      = (1/n) Σ_i w_i CE(x_i, y_i; W, b) + (l2/2)·||W||² + ½(Σ_k b_k)²
    J_{−i}(θ) = J(θ) − CE(z_i)/n        (leave z_i out: its weight 1 → 0)
    J_{+t}(θ) = J(θ) + CE(t)/n          (learn test example t: weight 0 → 1)

The loss is a SUM over the (changed) training set divided by the full n, and l2 is the same
for every refit; the intercept is unpenalised (the ½(Σb)² gauge only pins softmax's
shift-invariance and changes no loss). J is scikit-learn's objective C·Σ CE + ½||W||² with
C = 1/(n·l2), divided by C·n, so every memjax refit equals sklearn refitted with the SAME C.

Where this differs from the Forward-INF notebook (reds-lab/Forward-INF, FIELD-NOTES): the
notebook refits sklearn ``LogisticRegression(C=1/(n·0.01))`` (lbfgs, default tol 1e-4) with
n the size of EACH refit's own training set (n − 1 for LOO, n + 1 for DualLOO). That is a
MEAN loss per refit, i.e. memjax's J_{∓} with l2 rescaled by (n ∓ 1)/n: the regulariser
changes by O(l2/n) between the full fit and each refit, the same order as the effect of one
example, so the notebook's LOO/DualLOO values carry an extra shrinkage effect (nearly the
same for every i) that memjax's do not.

Everything runs in float64. The full fit is damped Newton. Each refit starts from the full
optimum θ̂ with the fixed preconditioner (∇²J_{±z}(θ̂))^{-1}, applied exactly by a rank-K
Woodbury update of (∇²J(θ̂))^{-1}: cheap, and each iteration contracts the error by the
relative change of the Hessian between θ̂ and the refit optimum (a step is kept only while
it halves max|∇J|). That is O(1/n) for most refits, but not for a high-loss test example
that moves θ a lot (digits, N = 150, seed 1: a DualLOO refit was still at max|∇J| = 1.3e-3
after 50 such iterations, silently). The refits that have not reached ``tol`` continue with
damped Newton (the exact Hessian of J_{±z} at the current iterate, rebuilt every step,
Armijo backtracking), which converges quadratically: that refit now ends below 1e-11.

Fits stop at max|∇J| < ``tol`` (default ``TOL`` = 1e-11, ~10× float64's rounding floor on
digits). Non-convergence is never silent: every fit and refit returns the max|∇J| it
reached, and any that ends at or above ``tol`` triggers a ``RuntimeWarning`` naming how many
fits did not converge, the worst gradient norm, the iteration cap and the fix (raise
``max_iter`` or loosen ``tol``). A warning, not an exception, because memjax.errors has no
error class for it and the numbers are still useful for diagnosis; a ground truth must not
be wrong silently, so tests that use it turn this warning into an error (``filterwarnings``,
as tests/test_influence_convex.py does).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from memjax.errors import InputError

# Default max|∇J| to reach. float64 cannot go much lower: rounding θ alone moves the gradient
# by ≈ eps·λ_max(∇²J)·|θ|, ~1e-12 on digits pixels (0..16) with l2 = 0.01, where a DualLOO
# refit (N = 200) stayed at 1.05e-12 through 50 Newton steps. The parameter error is at most
# ~TOL/λ_min(∇²J) ≈ 1e-9 there, far below any influence value.
TOL = 1e-11


class LogisticFit(NamedTuple):
    params: dict[str, np.ndarray]  # {"w": [D, K], "b": [K]} float64
    grad_norm: float  # max |∇J| at the returned params
    iterations: int


class Refits(NamedTuple):
    params: dict[str, np.ndarray]  # stacked {"w": [M, D, K], "b": [M, K]}
    grad_norm: float  # max over the M refits of max |∇J|
    iterations: int  # the most iterations any refit took (both phases)
    grad_norms: np.ndarray  # [M] max |∇J_{±z}| each refit reached
    newton_refits: int  # how many refits needed the damped-Newton phase


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


def _hessian(params, x, coef, l2):
    """Exact ∇²[Σ_i coef_i CE(x_i) + (l2/2)||W||² + ½(Σb)²] in the ravel_pytree order.

    params {"w": [D, K], "b": [K]}; x [M, D]; coef [M] -> [P, P], P = (D + 1)·K. With
    x̃ = [x, 1] and θ̃ = [W; b] ([D + 1, K]), ∇²CE(x) = x̃x̃ᵀ ⊗ (diag(p) − ppᵀ).
    """
    d, k = params["w"].shape
    prob = jax.nn.softmax(x @ params["w"] + params["b"][None])  # [M, K]
    a = jax.vmap(jnp.diag)(prob) - prob[:, :, None] * prob[:, None, :]  # [M, K, K]
    xt = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # [M, D + 1]
    h = jnp.einsum("md,me,mkl->dkel", xt * coef[:, None], xt, a).reshape((d + 1) * k, -1)
    penalty = jnp.concatenate([jnp.full(d * k, l2), jnp.zeros(k)])
    gauge = jnp.zeros(((d + 1) * k,) * 2).at[d * k:, d * k:].set(1.0)
    h = h + jnp.diag(penalty) + gauge
    # Position of each ravel_pytree entry in θ̃'s row-major order.
    order, _ = ravel_pytree({"w": jnp.arange(d * k).reshape(d, k), "b": d * k + jnp.arange(k)})
    return h[order][:, order]


def _decrease_resolvable(value, slope):
    """Whether the Newton decrement g·s (≈ 2× the predicted decrease of J) is above float64
    rounding of J. Below it, Armijo's test compares rounding noise and would shrink every
    step to nothing; so close to the optimum the full Newton step is taken (it converges
    quadratically there)."""
    return slope > 1e-13 * (1.0 + abs(value))


def _warn_unconverged(what: str, grad_norms: np.ndarray, tol: float, max_iter: int) -> None:
    bad = grad_norms >= tol
    if bad.any():
        warnings.warn(
            f"{what}: {int(bad.sum())} of {bad.size} did not converge: worst max|∇J| = "
            f"{float(grad_norms.max()):.3g} >= tol={tol:g} after the iteration cap "
            f"max_iter={max_iter}; the result is not the exact optimum. Raise max_iter or "
            f"loosen tol.", RuntimeWarning, stacklevel=3)


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
                 tol: float = TOL, max_iter: int = 100) -> LogisticFit:
    """Minimise J(θ) = (1/N) Σ w_i CE + (l2/2)||W||² + ½(Σb)² (module docstring) by damped
    Newton in float64 (Ko et al. 2024's convex check).

    Args:
      x: [N, D] features; y: [N] int labels; weights: [N] example weights (default 1).
      l2: the ridge strength on W (sklearn's C = 1/(N·l2)); the loss is a mean over the N
        examples, the intercept unpenalised.
      n_classes: K (default max(y) + 1).
      tol: stop when max |∇J| < tol; max_iter: the Newton iteration cap.

    Returns:
      LogisticFit(params {"w": [D, K], "b": [K]}, grad_norm = max|∇J| reached, iterations).
      Warns (RuntimeWarning) when grad_norm >= tol: the fit hit max_iter.
    """
    if not l2 > 0:
        raise InputError(f"l2={l2!r}: expected a positive number")
    if max_iter < 1:
        raise InputError(f"max_iter={max_iter!r}: expected a positive integer")
    n_classes = int(np.max(y)) + 1 if n_classes is None else n_classes
    x, y = _check_data(x, y, n_classes)
    weights = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(x),):
        raise InputError(f"weights: expected shape ({len(x)},), got {weights.shape}")
    with jax.enable_x64(True):
        p0 = {"w": jnp.zeros((x.shape[1], n_classes)), "b": jnp.zeros(n_classes)}
        flat0, unravel = ravel_pytree(p0)
        f = jax.jit(lambda v: _objective(unravel(v), x, y, weights, l2))
        grad = jax.jit(jax.grad(f))
        hess = jax.jit(lambda v: _hessian(unravel(v), x, weights / len(x), l2))
        theta, it = flat0, 0
        for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
            g = grad(theta)
            if float(jnp.max(jnp.abs(g))) < tol:
                break
            step = jnp.linalg.solve(hess(theta), g)
            t, value, slope = 1.0, f(theta), g @ step
            # Backtracking keeps the first Newton steps (far from θ̂) from overshooting.
            while (_decrease_resolvable(value, slope)
                   and f(theta - t * step) > value - 0.25 * t * slope and t > 1e-8):
                t *= 0.5
            theta = theta - t * step
        g = grad(theta)
        grad_norm = float(jnp.max(jnp.abs(g)))
        _warn_unconverged("fit_logistic", np.array([grad_norm]), tol, max_iter)
        return LogisticFit(jax.tree.map(np.asarray, unravel(theta)), grad_norm, it)


def refit_logistic(fit: LogisticFit, x, y, extra_x, extra_y, sign: float, *, l2: float,
                   tol: float = TOL, max_iter: int = 50) -> Refits:
    """The optimum of J_{±z} = J + sign·CE(z)/N for every extra example z, vmapped.

    N is the size of the full training set (x, y) and l2 the same as the full fit's, for
    every refit (module docstring: the Forward-INF notebook instead refits with C =
    1/(n'·0.01), n' the refit's own size). ``sign=-1`` with ``extra = (x, y)`` gives the N
    leave-one-out fits (weight of z_i goes from 1 to 0); ``sign=+1`` with test examples gives
    the "learn t" fits (Ko et al. 2024's DualLOO).

    Args:
      fit: the full fit (fit_logistic on x, y with the same l2); x [N, D], y [N];
      extra_x [M, D], extra_y [M]; tol: max|∇J_{±z}| to reach; max_iter: the cap of EACH
      phase (fixed-preconditioner iterations, then damped Newton for the refits left).

    Returns:
      Refits: stacked params [M, ...], per-refit grad_norms [M] and their max, the most
      iterations any refit took, how many needed Newton. Warns (RuntimeWarning) naming the
      count and worst gradient norm when any refit ends at or above tol.
    """
    if max_iter < 1:
        raise InputError(f"max_iter={max_iter!r}: expected a positive integer")
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

        grad = jax.grad(obj)

        def logits(v, ex):
            p = unravel(v)
            return ex @ p["w"] + p["b"]

        p_inv = jnp.linalg.inv(_hessian(unravel(flat_hat), x, ones / n, l2))

        def preconditioner(ex):
            # ∇²CE(z) = Jᵀ A J with J = ∂logits/∂θ [K, P], A = diag(p) − ppᵀ, so
            # (H + s·JᵀAJ/n)^{-1} = P − s·P Jᵀ (nI + s·A J P Jᵀ)^{-1} A J P.
            jac = jax.jacobian(logits)(flat_hat, ex)
            prob = jax.nn.softmax(logits(flat_hat, ex))
            a = jnp.diag(prob) - jnp.outer(prob, prob)
            b = p_inv @ jac.T
            q = jnp.linalg.solve(n * jnp.eye(n_classes) + sign * a @ (jac @ b), a)
            return b, q

        def cond(state):
            return (state[1] >= tol) & (state[2] < max_iter)

        def fixed_preconditioner_refit(ex, ey):
            b, q = preconditioner(ex)

            def apply(g):
                return p_inv @ g - sign * b @ (q @ (b.T @ g))

            def body(state):
                # A step is kept only if it at least halves max|∇J|; otherwise this phase
                # stops (the Hessian moved too far from ∇²J(θ̂)) and Newton takes over.
                v, g, it, _ = state
                v_new = v - apply(grad(v, ex, ey))
                g_new = jnp.max(jnp.abs(grad(v_new, ex, ey)))
                keep = g_new < 0.5 * g
                return jnp.where(keep, v_new, v), jnp.where(keep, g_new, g), it + 1, ~keep

            def go_on(state):
                return cond(state) & ~state[3]

            start = (flat_hat, jnp.max(jnp.abs(grad(flat_hat, ex, ey))), 0, False)
            return jax.lax.while_loop(go_on, body, start)[:3]

        def newton_refit(v0, ex, ey):
            xs = jnp.concatenate([x, ex[None]])
            coef = jnp.concatenate([ones, jnp.full(1, sign)]) / n

            def body(state):
                v, _, it, best_v, best_g = state
                g = grad(v, ex, ey)
                step = jnp.linalg.solve(_hessian(unravel(v), xs, coef, l2), g)
                value, slope = obj(v, ex, ey), g @ step

                def shorter(t):  # backtracking (Armijo, factor ½)
                    return (_decrease_resolvable(value, slope) & (t > 1e-8)
                            & (obj(v - t * step, ex, ey) > value - 0.25 * t * slope))

                t = jax.lax.while_loop(shorter, lambda t: 0.5 * t, 1.0)
                v = v - t * step
                return v, jnp.max(jnp.abs(grad(v, ex, ey))), it + 1, best_v, best_g

            def body_keep_best(state):
                # Near max|∇J| ≈ eps·λ_max(∇²J)·|θ| (~1e-12 on 0..16 pixel features) the
                # iterates only resample rounding; return the best one seen, not the last.
                v, g, it, best_v, best_g = body(state)
                better = g < best_g
                return v, g, it, jnp.where(better, v, best_v), jnp.where(better, g, best_g)

            def go_on(state):
                return (state[4] >= tol) & (state[2] < max_iter)

            g0 = jnp.max(jnp.abs(grad(v0, ex, ey)))
            _, _, it, best_v, best_g = jax.lax.while_loop(go_on, body_keep_best,
                                                         (v0, g0, 0, v0, g0))
            return best_v, best_g, it

        ex_all, ey_all = jnp.asarray(extra_x), jnp.asarray(extra_y)
        v, gnorm, its = jax.jit(jax.vmap(fixed_preconditioner_refit))(ex_all, ey_all)
        v, gnorm, its = np.array(v), np.array(gnorm), np.array(its)
        left = np.flatnonzero(gnorm >= tol)
        if left.size:
            v_n, g_n, it_n = jax.jit(jax.vmap(newton_refit))(v[left], ex_all[left],
                                                             ey_all[left])
            v[left], gnorm[left], its[left] = v_n, g_n, its[left] + np.asarray(it_n)
        _warn_unconverged("refit_logistic (refits)", gnorm, tol, max_iter)
        params = jax.vmap(unravel)(jnp.asarray(v))
        return Refits(jax.tree.map(np.asarray, params), float(gnorm.max()), int(its.max()),
                      gnorm, int(left.size))


def _losses(params: dict, x, y) -> np.ndarray:
    """CE of every example under every stacked params: [M, N]."""
    with jax.enable_x64(True):
        per = jax.vmap(jax.vmap(logistic_loss, in_axes=(None, 0, 0)), in_axes=(0, None, None))
        return np.asarray(per(jax.tree.map(jnp.asarray, params), jnp.asarray(x),
                              jnp.asarray(y)))


def loo_influence(x, y, test_x, test_y, *, l2: float, n_classes: int | None = None,
                  tol: float = TOL) -> tuple[np.ndarray, float]:
    """Exact LOO influence [T, N]: L(θ_{−i}; t) − L(θ; t) (positive = i supports t).

    θ minimises J = (1/N)Σ CE + (l2/2)||W||² (module docstring) and θ_{−i} minimises
    J − CE(z_i)/N: the sum over the N − 1 remaining examples still divided by N, l2 fixed.
    The Forward-INF notebook instead refits sklearn with C = 1/((N − 1)·0.01), a mean loss
    whose regulariser weight relative to the data changes by 1/N (module docstring).

    Args: x [N, D], y [N]; test_x [T, D], test_y [T]; l2; n_classes; tol (every fit).
    Returns the influence and the largest max|∇J| reached by any of the N + 1 fits; warns
    (RuntimeWarning) if any of them did not reach tol.
    """
    n_classes = int(max(np.max(y), np.max(test_y))) + 1 if n_classes is None else n_classes
    fit = fit_logistic(x, y, l2=l2, n_classes=n_classes, tol=tol)
    refits = refit_logistic(fit, x, y, x, y, -1.0, l2=l2, tol=tol)
    base = _losses(jax.tree.map(lambda a: a[None], fit.params), test_x, test_y)  # [1, T]
    loo = _losses(refits.params, test_x, test_y)  # [N, T]
    return (loo - base).T, max(fit.grad_norm, refits.grad_norm)


def dual_loo_influence(x, y, test_x, test_y, *, l2: float, n_classes: int | None = None,
                       tol: float = TOL) -> tuple[np.ndarray, float]:
    """Exact mirrored influence [T, N]: −(L(θ_{+t}; z_i) − L(θ; z_i)) (positive = supports).

    θ_{+t} is the exact optimum of J + CE(t)/N, test example t added to the training sum
    that is still divided by N, l2 fixed (Ko et al. 2024's DualLOO); the sign makes it
    comparable with :func:`loo_influence`. The Forward-INF notebook instead refits sklearn
    with C = 1/((N + 1)·0.01) on the N + 1 examples (module docstring).

    Args: x [N, D], y [N]; test_x [T, D], test_y [T]; l2; n_classes; tol (every fit).
    Returns the influence and the largest max|∇J| reached by any of the T + 1 fits; warns
    (RuntimeWarning) if any of them did not reach tol.
    """
    n_classes = int(max(np.max(y), np.max(test_y))) + 1 if n_classes is None else n_classes
    fit = fit_logistic(x, y, l2=l2, n_classes=n_classes, tol=tol)
    refits = refit_logistic(fit, x, y, test_x, test_y, 1.0, l2=l2, tol=tol)
    base = _losses(jax.tree.map(lambda a: a[None], fit.params), x, y)  # [1, N]
    learned = _losses(refits.params, x, y)  # [T, N]
    return -(learned - base), max(fit.grad_norm, refits.grad_norm)
