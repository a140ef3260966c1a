"""Matrix-free IHVPs (memjax.influence._ihvp) against float64 NumPy.

A tiny tanh MLP (3 -> 4 -> 2, 26 parameters) with softmax cross-entropy and a multiclass
logistic regression: gradients and the Gauss-Newton matrix are written out by hand in
NumPy, the Hessian is central differences of that NumPy gradient, and solves are
``np.linalg.solve``. The JAX side runs in float64 (``jax.enable_x64``) so that the
tolerances measure the methods, not float32 rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from memjax.errors import InputError
from memjax.influence._ihvp import (
    cg_solve,
    dense_curvature,
    dense_solve,
    gnhvp,
    hvp,
    lissa,
    require_converged,
)

pytestmark = pytest.mark.strict_dtypes

D_IN, D_HID, D_OUT, N = 3, 4, 2, 12
DAMPING = 0.05


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ---- the model, in JAX ------------------------------------------------------------------

def mlp_logits(params, x):
    hidden = jnp.tanh(params["w1"] @ x + params["b1"])
    return params["w2"] @ hidden + params["b2"]


def output_ce(logits, example):
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def mlp_outputs(params, example):
    return mlp_logits(params, example["x"])


def mlp_loss(params, example):
    return output_ce(mlp_outputs(params, example), example)


def linear_outputs(params, example):
    return params["w"] @ example["x"] + params["b"]


def linear_loss(params, example):
    return output_ce(linear_outputs(params, example), example)


# ---- the same model, in NumPy float64 ------------------------------------------------------
# ravel_pytree flattens a dict in sorted key order: b1, b2, w1, w2 (and b, w).

def pack(*leaves):
    return np.concatenate([np.ravel(leaf) for leaf in leaves])


def unpack_mlp(theta):
    sizes = [D_HID, D_OUT, D_HID * D_IN, D_OUT * D_HID]
    b1, b2, w1, w2 = np.split(theta, np.cumsum(sizes)[:-1])
    return b1, b2, w1.reshape(D_HID, D_IN), w2.reshape(D_OUT, D_HID)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_mlp_grad(theta, x, y):
    """Mean cross-entropy gradient, by hand."""
    b1, b2, w1, w2 = unpack_mlp(theta)
    total = np.zeros_like(theta)
    for xi, yi in zip(x, y, strict=True):
        h = np.tanh(w1 @ xi + b1)
        dlogits = softmax(w2 @ h + b2) - np.eye(D_OUT)[yi]
        dz = (w2.T @ dlogits) * (1 - h * h)
        total += pack(dz, dlogits, np.outer(dz, xi), np.outer(dlogits, h))
    return total / len(x)


def np_mlp_hessian(theta, x, y, eps=1e-5):
    """Central differences of the hand-written gradient: error O(eps²) ≈ 1e-10."""
    cols = []
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = eps
        cols.append((np_mlp_grad(theta + e, x, y) - np_mlp_grad(theta - e, x, y)) / (2 * eps))
    h = np.stack(cols, axis=1)
    return (h + h.T) / 2


def np_mlp_gauss_newton(theta, x, y):
    """(1/N) Σ J_i^T (diag p - p p^T) J_i with the logits' Jacobian J_i [C, P] by hand."""
    b1, b2, w1, w2 = unpack_mlp(theta)
    total = np.zeros((theta.size, theta.size))
    for xi in x:
        h = np.tanh(w1 @ xi + b1)
        p = softmax(w2 @ h + b2)
        jac = []
        for c in range(D_OUT):
            dz = w2[c] * (1 - h * h)  # d logit_c / d pre-activation
            jac.append(pack(dz, np.eye(D_OUT)[c], np.outer(dz, xi),
                            np.outer(np.eye(D_OUT)[c], h)))
        jac = np.stack(jac)
        total += jac.T @ (np.diag(p) - np.outer(p, p)) @ jac
    return total / len(x)


def np_logistic_hessian(w, b, x):
    """Exact Hessian of mean softmax cross-entropy for logits = W x + b, order (b, W)."""
    total = np.zeros((D_OUT * (D_IN + 1),) * 2)
    for xi in x:
        p = softmax(w @ xi + b)
        cov = np.diag(p) - np.outer(p, p)
        # d logits / d(b, W) = [I, I ⊗ x^T]
        jac = np.concatenate([np.eye(D_OUT), np.kron(np.eye(D_OUT), xi[None, :])], axis=1)
        total += jac.T @ cov @ jac
    return total / len(x)


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def mlp(rng):
    params = {"w1": rng.normal(size=(D_HID, D_IN)), "b1": rng.normal(size=D_HID) * 0.5,
              "w2": rng.normal(size=(D_OUT, D_HID)), "b2": rng.normal(size=D_OUT) * 0.5}
    x = rng.normal(size=(N, D_IN))
    y = rng.integers(0, D_OUT, size=N)
    theta = pack(params["b1"], params["b2"], params["w1"], params["w2"])
    jparams = jax.tree.map(jnp.asarray, params)
    assert np.array_equal(np.asarray(ravel_pytree(jparams)[0]), theta)  # layouts agree
    return jparams, {"x": jnp.asarray(x), "label": jnp.asarray(y)}, theta, x, y


def stacked(vectors, params):
    """[K, P] rows as a pytree like ``params`` with a leading axis K."""
    unravel = ravel_pytree(params)[1]
    return jax.vmap(unravel)(jnp.asarray(vectors))


def flat_rows(tree):
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


# ---- curvature products -------------------------------------------------------------------

def test_hvp_matches_finite_difference_hessian_vmapped(mlp, rng):
    params, batch, theta, x, y = mlp
    hessian = np_mlp_hessian(theta, x, y)
    vectors = rng.normal(size=(5, theta.size))
    products = jax.jit(jax.vmap(functools.partial(hvp, mlp_loss, params, batch)))(
        stacked(vectors, params))
    # Central differences with eps = 1e-5 are exact to ~1e-10 (O(eps²) truncation, 1e-11
    # rounding); 1e-7 leaves room for that and still catches any real error.
    np.testing.assert_allclose(flat_rows(products), vectors @ hessian.T, atol=1e-7, rtol=0)
    # The MLP's Hessian is indefinite here, unlike its Gauss-Newton matrix.
    assert np.linalg.eigvalsh(hessian).min() < -1e-6


def test_gnhvp_matches_hand_written_gauss_newton(mlp, rng):
    params, batch, theta, x, y = mlp
    gauss_newton = np_mlp_gauss_newton(theta, x, y)
    vectors = rng.normal(size=(4, theta.size))
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params, batch)
    products = jax.jit(jax.vmap(matvec))(stacked(vectors, params))
    # Both sides are exact float64 formulas: agreement to rounding (1e-12).
    np.testing.assert_allclose(flat_rows(products), vectors @ gauss_newton.T, atol=1e-12,
                               rtol=0)
    dense = np.asarray(jax.jit(lambda: dense_curvature(matvec, params))())
    np.testing.assert_allclose(dense, gauss_newton, atol=1e-12, rtol=0)
    assert np.linalg.eigvalsh(dense).min() > -1e-12  # PSD, as a convex output loss makes it
    # The Hessian differs from it by the residual term (the MLP is not linear in θ).
    assert np.abs(np_mlp_hessian(theta, x, y) - gauss_newton).max() > 1e-3


def test_gauss_newton_equals_hessian_for_linear_model(rng):
    w, b = rng.normal(size=(D_OUT, D_IN)), rng.normal(size=D_OUT)
    x, y = rng.normal(size=(N, D_IN)), rng.integers(0, D_OUT, size=N)
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    batch = {"x": jnp.asarray(x), "label": jnp.asarray(y)}
    hessian = jax.jit(dense_curvature, static_argnums=0)(
        functools.partial(hvp, linear_loss, params, batch), params)
    gauss_newton = jax.jit(dense_curvature, static_argnums=0)(
        functools.partial(gnhvp, linear_outputs, output_ce, params, batch), params)
    expected = np_logistic_hessian(w, b, x)
    # Exact identity G = H for a model linear in θ, and both equal the closed form: rounding.
    np.testing.assert_allclose(np.asarray(gauss_newton), np.asarray(hessian), atol=1e-13,
                               rtol=0)
    np.testing.assert_allclose(np.asarray(hessian), expected, atol=1e-13, rtol=0)


def test_dense_solve(rng):
    a = rng.normal(size=(6, 6))
    matrix = a @ a.T
    vectors = rng.normal(size=(3, 6))
    expected = np.linalg.solve(matrix + 0.3 * np.eye(6), vectors.T).T
    got = np.asarray(dense_solve(jnp.asarray(matrix), jnp.asarray(vectors), 0.3))
    # Condition number of a 6×6 Wishart + 0.3 I is ≲ 1e4: float64 LU agrees to 1e-10.
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="vectors"):
        dense_solve(jnp.asarray(matrix), jnp.asarray(vectors[:, :5]), 0.3)
    with pytest.raises(InputError, match="damping"):
        dense_solve(jnp.asarray(matrix), jnp.asarray(vectors), -1.0)


# ---- solvers ------------------------------------------------------------------------------

def test_cg_matches_dense_solve_each_rhs_converging_alone(mlp, rng):
    params, batch, theta, x, y = mlp
    gauss_newton = np_mlp_gauss_newton(theta, x, y)
    damped = gauss_newton + DAMPING * np.eye(theta.size)
    eigvals, eigvecs = np.linalg.eigh(gauss_newton)
    # Four random right-hand sides, one eigenvector (CG: one step) and a zero (no step).
    vectors = np.concatenate([rng.normal(size=(4, theta.size)), eigvecs[:, -1][None],
                              np.zeros((1, theta.size))])
    expected = np.linalg.solve(damped, vectors.T).T
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params, batch)
    solve = jax.jit(lambda b: cg_solve(matvec, b, DAMPING, tol=1e-10, max_iter=200))
    result = require_converged(solve(stacked(vectors, params)), "cg")
    iterations = np.asarray(result.iterations)
    assert iterations[4] == 1 and iterations[5] == 0 and (iterations[:4] > 1).all()
    assert (iterations <= theta.size + 5).all()  # CG: ≤ P steps in exact arithmetic
    # Residual ≤ 1e-10·||b||, so the error is ≤ cond(G + λI)·1e-10·||x||; cond ≲ 1e3 here.
    cond = (eigvals.max() + DAMPING) / (max(eigvals.min(), 0) + DAMPING)
    error = np.linalg.norm(flat_rows(result.x) - expected, axis=1)
    assert (error <= cond * 1e-10 * np.linalg.norm(expected, axis=1) + 1e-14).all()
    assert (np.asarray(result.relative_residual) <= 1e-10).all()


def test_cg_reports_iteration_cap(mlp, rng):
    params, batch, theta, *_ = mlp
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params, batch)
    vectors = rng.normal(size=(2, theta.size))
    result = jax.jit(lambda b: cg_solve(matvec, b, 1e-4, tol=1e-12, max_iter=2))(
        stacked(vectors, params))
    assert not np.asarray(result.converged).any()
    assert (np.asarray(result.iterations) == 2).all()
    with pytest.raises(InputError, match="max_iter"):
        require_converged(result, "cg")


def test_lissa_is_koh_liang_recursion(rng):
    # The variant, step by step: v_j = b + v_{j-1} - (A + λI) v_{j-1}/s, x = v_depth / s.
    a = rng.normal(size=(5, 5))
    matrix = a @ a.T / 5
    b = rng.normal(size=(3, 5))
    scale, depth = 4.0, 3
    v = b.copy()
    for _ in range(depth):
        v = b + v - v @ (matrix + DAMPING * np.eye(5)).T / scale
    result = lissa(lambda t: {"p": jnp.asarray(matrix) @ t["p"]}, {"p": jnp.asarray(b)},
                   DAMPING, scale, depth)
    # Three float64 steps of the same recursion: rounding only.
    np.testing.assert_allclose(np.asarray(result.x["p"]), v / scale, atol=1e-13, rtol=0)


def test_lissa_matches_dense_solve(mlp, rng):
    params, batch, theta, x, y = mlp
    gauss_newton = np_mlp_gauss_newton(theta, x, y)
    # Damping relative to the top eigenvalue keeps cond(G + λI) ≤ 51, so depth ≤ ~1050.
    damping = float(np.linalg.eigvalsh(gauss_newton).max()) / 50
    damped = gauss_newton + damping * np.eye(theta.size)
    eigvals = np.linalg.eigvalsh(damped)
    scale = float(eigvals.max())  # ||(G + λI)/scale|| = 1 < 2: converges
    factor = max(abs(1 - eigvals / scale))  # error shrinks by this per step
    depth = int(np.ceil(np.log(1e-9) / np.log(factor)))
    vectors = rng.normal(size=(3, theta.size))
    expected = np.linalg.solve(damped, vectors.T).T
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params, batch)
    result = jax.jit(lambda b: lissa(matvec, b, damping, scale, depth, tol=1e-6))(
        stacked(vectors, params))
    require_converged(result, "lissa")
    assert (np.asarray(result.iterations) == depth).all()
    # Error after `depth` steps is factor^depth·||x*|| ≤ 1e-9·||x*|| (the series' tail;
    # 1% slack for float64 rounding over ~1000 steps).
    error = np.linalg.norm(flat_rows(result.x) - expected, axis=1)
    assert (error <= 1.01e-9 * np.linalg.norm(expected, axis=1)).all()
    # A quarter of that depth is measurably short of the solve: the depth matters.
    short = jax.jit(lambda b: lissa(matvec, b, damping, scale, depth // 4, tol=1e-6))(
        stacked(vectors, params))
    assert (np.linalg.norm(flat_rows(short.x) - expected, axis=1)
            > 1e-8 * np.linalg.norm(expected, axis=1)).all()


def test_lissa_scale_too_small_is_reported(mlp, rng):
    params, batch, theta, x, y = mlp
    top = np.linalg.eigvalsh(np_mlp_gauss_newton(theta, x, y)).max() + DAMPING
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params, batch)
    vectors = rng.normal(size=(2, theta.size))
    # scale = top/4: the top eigen-direction grows by |1 - 4| = 3 per step: diverges.
    result = jax.jit(lambda b: lissa(matvec, b, DAMPING, top / 4, 60))(
        stacked(vectors, params))
    assert not np.asarray(result.converged).any()
    with pytest.raises(InputError, match="raise scale"):
        require_converged(result, "lissa")


def test_solver_inputs_are_checked(mlp):
    params, batch, theta, *_ = mlp
    matvec = functools.partial(hvp, mlp_loss, params, batch)
    b = stacked(np.ones((2, theta.size)), params)
    with pytest.raises(InputError, match="scale"):
        lissa(matvec, b, DAMPING, 0.0, 10)
    with pytest.raises(InputError, match="depth"):
        lissa(matvec, b, DAMPING, 1.0, 0)
    with pytest.raises(InputError, match="damping"):
        cg_solve(matvec, b, float("nan"))
    ragged = dict(b, b1=b["b1"][:1])
    with pytest.raises(InputError, match="leading axis K"):
        cg_solve(matvec, ragged, DAMPING)


def test_cg_float32(mlp, rng):
    params, batch, theta, x, y = mlp
    gauss_newton = np_mlp_gauss_newton(theta, x, y)
    vectors = rng.normal(size=(3, theta.size))
    expected = np.linalg.solve(gauss_newton + DAMPING * np.eye(theta.size), vectors.T).T
    to32 = functools.partial(jax.tree.map, lambda a: a.astype(jnp.float32)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a)
    params32, batch32 = to32(params), to32(batch)
    matvec = functools.partial(gnhvp, mlp_outputs, output_ce, params32, batch32)
    result = jax.jit(lambda b: cg_solve(matvec, b, DAMPING, tol=1e-4, max_iter=200))(
        to32(stacked(vectors, params)))
    assert flat_rows(result.x).dtype == np.float32
    # float32 CG to a 1e-4 relative residual: error ≤ cond·1e-4 in exact arithmetic; with
    # float32 rounding (1e-7 per op, amplified by cond) the stated bound is cond·2e-4.
    cond = np.linalg.cond(gauss_newton + DAMPING * np.eye(theta.size))
    error = np.linalg.norm(flat_rows(result.x) - expected, axis=1)
    assert (error <= cond * 2e-4 * np.linalg.norm(expected, axis=1)).all()
