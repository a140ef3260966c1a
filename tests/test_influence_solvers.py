"""Checked matrix-free curvature for mirrored influence (issue 15 items 1-2): CG and LiSSA
preconditioners with their damping rule, LiSSA's scale and depth, and the Gauss-Newton
curvature of a model's trainable leaves, against float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from memjax.errors import InputError
from memjax.influence import (
    classifier_outputs,
    cross_entropy_loss,
    gauss_newton_preconditioner,
    label_cross_entropy,
    largest_eigenvalue,
    mean_eigenvalue,
    solver_curvature,
)


def _spd(rng, p, spread=30.0):
    """A random SPD matrix with eigenvalues spread over [1, spread] (a gap at the top)."""
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    eig = np.r_[np.linspace(1.0, spread / 2, p - 1), spread]
    return (q * eig) @ q.T, eig


def _dense_matvec(matrix):
    m = jnp.asarray(matrix, jnp.float32)
    return lambda v: {"w": m @ v["w"]}


def test_mean_eigenvalue_is_exact_on_a_diagonal(rng):
    """Rademacher probes have z_i² = 1, so zᵀDz = trace(D) exactly for a diagonal D."""
    diag = rng.uniform(0.5, 3.0, size=11)
    value = mean_eigenvalue(_dense_matvec(np.diag(diag)), {"w": jnp.zeros(11)}, probes=3)
    assert value == pytest.approx(diag.mean(), rel=1e-6)  # float32 sums of 11 terms


def test_largest_eigenvalue_matches_numpy(rng):
    matrix, eig = _spd(rng, 12)
    value = largest_eigenvalue(_dense_matvec(matrix), {"w": jnp.zeros(12)}, iterations=60)
    # The gap is 30 vs 15: 60 power steps shrink the other components by 2^-60.
    assert value == pytest.approx(eig.max(), rel=1e-5)


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_solver_preconditioner_equals_dense_solve(method, rng):
    matrix, _ = _spd(rng, 12)
    b = rng.normal(size=(4, 12))
    params = {"w": jnp.zeros(12)}
    precondition, info = solver_curvature(method, _dense_matvec(matrix), params,
                                          {"w": jnp.asarray(b, jnp.float32)}, damping=0.5,
                                          tol=1e-5)
    want = np.linalg.solve(matrix + 0.5 * np.eye(12), b.T).T
    got = np.stack([precondition({"w": jnp.asarray(row, jnp.float32)})["w"] for row in b])
    # Relative residual 1e-5 at condition number ~60: the error is below 1e-3 relative.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert info["worst_relative_residual"] <= 1e-5
    if method == "lissa":
        # depth = the smallest with (1 - λ/scale)^depth <= tol, scale = 0.7 (λ_max + λ).
        scale = 0.7 * (info["largest_eigenvalue"] + 0.5)
        assert info["scale"] == pytest.approx(scale)
        assert (1 - 0.5 / scale) ** info["depth"] <= 1e-5 < (1 - 0.5 / scale) ** (
            info["depth"] - 1)


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(rng):
    diag = rng.uniform(0.5, 3.0, size=9)
    b = {"w": jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)}
    _, info = solver_curvature("cg", _dense_matvec(np.diag(diag)), {"w": jnp.zeros(9)}, b)
    assert info["damping"] == pytest.approx(0.1 * diag.mean(), rel=1e-6)


def test_unconverged_solves_are_refused(rng):
    matrix, _ = _spd(rng, 12, spread=1e4)
    b = {"w": jnp.asarray(rng.normal(size=(2, 12)), jnp.float32)}
    with pytest.raises(InputError, match="cg: 2 of 2 right-hand sides did not converge"):
        solver_curvature("cg", _dense_matvec(matrix), {"w": jnp.zeros(12)}, b, damping=0.0,
                         tol=1e-7, max_iter=2)
    with pytest.raises(InputError, match="lissa: reaching tol=0.001 needs"):
        solver_curvature("lissa", _dense_matvec(matrix), {"w": jnp.zeros(12)}, b,
                         damping=1e-3)
    with pytest.raises(InputError, match="curvature method='newton'"):
        solver_curvature("newton", _dense_matvec(matrix), {"w": jnp.zeros(12)}, b)


def _logits(params, image):
    return image @ params["w"] + params["b"]


def _np_gauss_newton(w, b, x, trainable_b):
    """Float64 (1/M) Σ Jᵀ(diag p − ppᵀ)J of softmax regression, in the order [w (row-major),
    then b if trainable]."""
    prob = scipy.special.softmax(x @ w + b, axis=1)
    k = w.shape[1]
    total = 0.0
    for xi, p in zip(x, prob, strict=True):
        # d logit_k / d w[d, j] = x_d δ_kj (row-major: column d·K + j); d logit_k / d b_j = δ_kj
        jac = np.concatenate([np.einsum("d,kj->kdj", xi, np.eye(k)).reshape(k, -1)]
                             + ([np.eye(k)] if trainable_b else []), axis=1)
        total = total + jac.T @ (np.diag(p) - np.outer(p, p)) @ jac
    return total / len(x)


@pytest.mark.parametrize("trainable", [None, "w"])
def test_gauss_newton_preconditioner_on_trainable_leaves(trainable, rng):
    """(G + λI)⁻¹ on the trainable leaves equals float64 NumPy; frozen leaves stay zero."""
    d, k = 5, 3
    w, b = rng.normal(size=(d, k)), rng.normal(size=k)
    x, y = rng.normal(size=(20, d)), rng.integers(0, k, 20)
    tx, ty = rng.normal(size=(3, d)), rng.integers(0, k, 3)
    params = {"b": jnp.asarray(b, jnp.float32), "w": jnp.asarray(w, jnp.float32)}
    train = {"image": x.astype(np.float32), "label": y.astype(np.int32)}
    test = {"image": tx.astype(np.float32), "label": ty.astype(np.int32)}
    loss = functools.partial(cross_entropy_loss, _logits)
    outputs = functools.partial(classifier_outputs, _logits)
    precondition, info = gauss_newton_preconditioner(
        "cg", outputs, label_cross_entropy, loss, params, train, test, trainable=trainable,
        damping=0.05, tol=1e-6)
    assert info["curvature_examples"] == 20

    w32, b32 = np.float64(np.float32(w)), np.float64(np.float32(b))
    gn = _np_gauss_newton(w32, b32, x, trainable is None)
    prob = scipy.special.softmax(tx @ w32 + b32, axis=1)
    resid = prob - np.eye(k)[ty]
    g_w = (tx[:, :, None] * resid[:, None, :]).reshape(3, -1)
    g = np.concatenate([g_w, resid], axis=1) if trainable is None else g_w
    want = np.linalg.solve(gn + 0.05 * np.eye(len(gn)), g.T).T
    for t in range(3):
        grads = {"b": jnp.asarray(resid[t], jnp.float32) if trainable is None
                 else jnp.zeros(k), "w": jnp.asarray(g_w[t].reshape(d, k), jnp.float32)}
        out = jax.tree.map(np.asarray, precondition(grads))
        got = out["w"].ravel() if trainable else np.r_[out["w"].ravel(), out["b"]]
        # CG to 1e-6 relative residual at condition ~1e2, float32 products: 1e-4 relative.
        np.testing.assert_allclose(got, want[t], rtol=0, atol=1e-4 * np.abs(want).max())
        if trainable:
            assert not out["b"].any()  # the frozen leaf: zero in, zero out


def test_eight_devices_equal_one(rng, tmp_path):
    """Curvature-aware Forward-INF (CG on the Gauss-Newton matrix, EK-FAC) and the gradient
    store give the same numbers on the 8 forced host devices as on one (1e-5 relative)."""
    from memjax.engine import make_mesh
    from memjax.influence import (
        ekfac_batch_stats,
        ekfac_factors,
        ekfac_preconditioner,
        forward_inf,
        gradient_store,
        kfac_batch_stats,
        kfac_factors,
    )

    d, k = 6, 3
    w, b = rng.normal(size=(d, k)), rng.normal(size=k)
    x, y = rng.normal(size=(48, d)), rng.integers(0, k, 48)
    tx, ty = rng.normal(size=(3, d)), rng.integers(0, k, 3)
    params = {"layers": [{"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}]}
    train = {"image": x.astype(np.float32), "label": y.astype(np.int32)}
    test = {"image": tx.astype(np.float32), "label": ty.astype(np.int32)}

    def logits(p, image):
        layer = p["layers"][0]
        return image @ layer["w"] + layer["b"]

    loss = functools.partial(cross_entropy_loss, logits)
    outputs = functools.partial(classifier_outputs, logits)
    cg, _ = gauss_newton_preconditioner("cg", outputs, label_cross_entropy, loss, params,
                                        train, test, damping=0.05, tol=1e-6)
    stats_x = x.astype(np.float32)
    factors = kfac_factors(kfac_batch_stats(params, stats_x, y, fisher="empirical"))
    factors = ekfac_factors(factors, ekfac_batch_stats(params, factors, stats_x, y,
                                                       fisher="empirical"))
    eight, one = make_mesh(), make_mesh(devices=jax.devices()[:1])
    assert eight.devices.size == 8
    for precondition in (cg, ekfac_preconditioner(factors, 0.05)):
        kw = dict(lr=0.1, batch_size=16, precondition=precondition)
        many = forward_inf(loss, params, test, train, mesh=eight, **kw)
        single = forward_inf(loss, params, test, train, mesh=one, **kw)
        assert np.abs(single).max() > 1e-3
        np.testing.assert_allclose(many, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())
    stores = [gradient_store(loss, params, train, tmp_path / name, projection_dim=16,
                             batch_size=16, mesh=mesh).read()["grad"]
              for name, mesh in (("eight", eight), ("one", one))]
    np.testing.assert_allclose(stores[0], stores[1], rtol=1e-5,
                               atol=1e-5 * np.abs(stores[1]).max())
