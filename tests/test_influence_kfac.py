"""K-FAC / EK-FAC factors of dense layers against explicit float64 NumPy sums.

Vec convention throughout: a layer's weight gradient is G = g ãᵀ [out, in+1] (bias last
column) and vec stacks columns (``order="F"``), so vec(G) = ã ⊗ g and K-FAC's curvature is
A ⊗ S in that order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.errors import InputError
from memjax.influence._kfac import (
    ekfac_batch_stats,
    ekfac_factors,
    kfac_batch_stats,
    kfac_factors,
    merge_stats,
    precondition,
    sample_labels,
)
from memjax.models.classifier import MLPConfig, classifier_logits

pytestmark = pytest.mark.strict_dtypes

# float64 end to end: JAX's eigh / einsum against NumPy's agree to ~1e-13 relative on these
# 3-to-7-dimensional factors; the damped solves (λ ≥ 1e-3, eigenvalues ≲ 10², so condition
# numbers ≲ 1e5) can amplify that to ~1e-11. 1e-9 covers it; a wrong formula is off by O(1).
RTOL, ATOL = 1e-9, 1e-12
SIZES = [4, 6, 3]  # 2-layer MLP: 4 inputs, 6 hidden, 3 classes
N = 24


def random_mlp(rng, sizes):
    return {"layers": [{"w": rng.normal(size=(m, n)), "b": rng.normal(size=n)}
                       for m, n in zip(sizes[:-1], sizes[1:], strict=True)]}


def numpy_per_example(params, x, y):
    """Per-example ã_k [N, in_k+1], g_k [N, out_k], by hand-written backprop in float64."""
    h, inputs, pre = x, [], []
    layers = params["layers"]
    for k, layer in enumerate(layers):
        inputs.append(np.concatenate([h, np.ones((len(h), 1))], axis=1))
        s = h @ layer["w"] + layer["b"]
        pre.append(s)
        h = s if k == len(layers) - 1 else np.maximum(s, 0.0)
    p = np.exp(h - h.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(h.shape[1])[y]  # d(-log p_y)/d logits
    grads = [g]
    for k in range(len(layers) - 1, 0, -1):
        g = (g @ layers[k]["w"].T) * (pre[k - 1] > 0)
        grads.insert(0, g)
    return inputs, grads


def to_jax(params):
    return jax.tree.map(jnp.asarray, params)


def test_factors_equal_explicit_covariances(rng):
    params = random_mlp(rng, SIZES)
    x, y = rng.normal(size=(N, SIZES[0])), rng.integers(0, SIZES[-1], N)
    inputs, grads = numpy_per_example(params, x, y)
    with jax.enable_x64(True):
        jp = to_jax(params)
        # Streams: two uneven batches merged equal the sums over all N.
        stats = merge_stats(kfac_batch_stats(jp, x[:7], y[:7], fisher="empirical"),
                            kfac_batch_stats(jp, x[7:], y[7:], fisher="empirical"))
        factors = kfac_factors(stats)
        corrected = ekfac_factors(factors, merge_stats(
            ekfac_batch_stats(jp, factors, x[:10], y[:10], fisher="empirical"),
            ekfac_batch_stats(jp, factors, x[10:], y[10:], fisher="empirical")))
    assert float(stats.count) == N
    for a, g, f, fc in zip(inputs, grads, factors, corrected, strict=True):
        big_a, big_s = a.T @ a / N, g.T @ g / N
        q_a, q_s = np.asarray(f.a_eigvecs), np.asarray(f.s_eigvecs)
        np.testing.assert_allclose(q_a @ np.diag(f.a_eigvals) @ q_a.T, big_a, RTOL, ATOL)
        np.testing.assert_allclose(q_s @ np.diag(f.s_eigvals) @ q_s.T, big_s, RTOL, ATOL)
        np.testing.assert_allclose(f.a_eigvals, np.linalg.eigvalsh(big_a), RTOL, ATOL)
        np.testing.assert_allclose(f.s_eigvals, np.linalg.eigvalsh(big_s), RTOL, ATOL)
        per_g = g[:, :, None] * a[:, None, :]  # G_i = g_i ã_iᵀ [N, out, in+1]
        lam = np.mean((q_s.T[None] @ per_g @ q_a[None]) ** 2, axis=0)
        np.testing.assert_allclose(fc.corrected, lam, RTOL, ATOL)


def test_true_fisher_uses_sampled_labels(rng, seed):
    params = random_mlp(rng, SIZES)
    x = rng.normal(size=(N, SIZES[0]))
    with jax.enable_x64(True):
        jp, key = to_jax(params), jax.random.key(seed)
        labels = sample_labels(jp, x, key)
        true = kfac_batch_stats(jp, x, fisher="true", key=key)
        empirical = kfac_batch_stats(jp, x, labels, fisher="empirical")
    jax.tree.map(lambda t, e: np.testing.assert_allclose(t, e, RTOL, ATOL), true, empirical)


def test_sampled_labels_follow_predictive_distribution(rng, seed):
    params = random_mlp(rng, [4, 3])
    x = np.repeat(rng.normal(size=(1, 4)), 20000, axis=0)
    with jax.enable_x64(True):
        labels = np.asarray(sample_labels(to_jax(params), x, jax.random.key(seed)))
    logits = x[0] @ params["layers"][0]["w"] + params["layers"][0]["b"]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    freq = np.bincount(labels, minlength=3) / len(labels)
    # Binomial standard error ≤ sqrt(0.25 / 20000) = 0.0035; 6 s.e. fails ~1e-9 of runs.
    np.testing.assert_allclose(freq, p, atol=0.021)


def test_forward_matches_classifier_logits(rng, seed):
    """The factors' forward pass is the MLP memjax.train builds (float32, its own init)."""
    params = MLPConfig((2, 3), 5, hidden=(7,)).init(jax.random.key(seed))
    x = rng.normal(size=(3, 2, 3)).astype(np.float32)
    key = jax.random.key(seed + 1)
    labels = sample_labels(params, x, key)
    logits = jax.vmap(classifier_logits, in_axes=(None, 0))(params, x)
    expected = jax.random.categorical(key, logits, axis=-1)
    np.testing.assert_array_equal(labels, expected)


def explicit_inverse_apply(curvature, damping, grad_matrix):
    """(curvature + λI)⁻¹ vec(G), vec column-stacking, reshaped back to G's shape."""
    vec = grad_matrix.reshape(-1, order="F")
    solved = np.linalg.solve(curvature + damping * np.eye(len(vec)), vec)
    return solved.reshape(grad_matrix.shape, order="F")


def grad_matrices(grads):
    return [np.concatenate([layer["w"], layer["b"][None]], axis=0).T for layer in grads["layers"]]


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [None, 0.05])
def test_precondition_equals_dense_solve(rng, method, damping):
    params = random_mlp(rng, SIZES)
    x, y = rng.normal(size=(N, SIZES[0])), rng.integers(0, SIZES[-1], N)
    grads = random_mlp(rng, SIZES)  # any vector in the params layout
    with jax.enable_x64(True):
        jp = to_jax(params)
        factors = kfac_factors(kfac_batch_stats(jp, x, y, fisher="empirical"))
        factors = ekfac_factors(factors, ekfac_batch_stats(jp, factors, x, y, fisher="empirical"))
        out = precondition(to_jax(grads), factors, damping, method=method)
    for f, g_in, g_out in zip(factors, grad_matrices(grads), grad_matrices(out), strict=True):
        q = np.kron(np.asarray(f.a_eigvecs), np.asarray(f.s_eigvecs))
        if method == "kfac":
            eig = np.kron(np.asarray(f.a_eigvals), np.asarray(f.s_eigvals))
        else:
            eig = np.asarray(f.corrected).reshape(-1, order="F")
        lam = 0.1 * eig.mean() if damping is None else damping  # the documented rule
        curvature = q @ np.diag(eig) @ q.T
        if method == "kfac":  # also: Q diag(λ_A ⊗ λ_S) Qᵀ is A ⊗ S itself
            big_a = np.asarray(f.a_eigvecs) @ np.diag(f.a_eigvals) @ np.asarray(f.a_eigvecs).T
            big_s = np.asarray(f.s_eigvecs) @ np.diag(f.s_eigvals) @ np.asarray(f.s_eigvecs).T
            np.testing.assert_allclose(curvature, np.kron(big_a, big_s), RTOL, ATOL)
        np.testing.assert_allclose(g_out, explicit_inverse_apply(curvature, lam, g_in), RTOL,
                                   ATOL)


def test_ekfac_reproduces_gauss_newton_inverse_on_one_dense_layer(rng):
    """One dense layer z = W ã under softmax cross-entropy: the Gauss–Newton matrix is exactly
    GGN = (1/n) Σ_i ã_i ã_iᵀ ⊗ H_i, H_i = diag(p_i) − p_i p_iᵀ (vec column-stacking). When every
    example has the same predictive distribution p (input weights zero, random bias), H_i = H
    and GGN = A ⊗ H is an exact Kronecker product whose exact eigenbasis is Q_A ⊗ Q_H.

    The true Fisher's S = E_y[g gᵀ] with y ~ p equals H exactly (g = p − e_y); the test takes
    that expectation exactly, not by sampling, by listing every label c of every example with
    weight p_c. Then K-FAC's eigenbasis is the exact eigenbasis of the GGN, EK-FAC's corrected
    eigenvalues E[(Q_Sᵀ G Q_A)²] are its exact eigenvalues λ_S ⊗ λ_A, and EK-FAC's
    (Q diag(Λ) Qᵀ + λI)⁻¹ is (GGN + λI)⁻¹ — checked against the GGN built from the formula
    above, independently of the factors."""
    d, c, n = 5, 4, 16
    params = {"layers": [{"w": np.zeros((d, c)), "b": rng.normal(size=c)}]}
    x = rng.normal(size=(n, d))
    p = np.exp(params["layers"][0]["b"] - params["layers"][0]["b"].max())
    p /= p.sum()
    x_all, y_all = np.repeat(x, c, axis=0), np.tile(np.arange(c), n)
    w_all = np.tile(p, n)  # every (example, label) pair weighted by p(label)
    with jax.enable_x64(True):
        jp = to_jax(params)
        factors = kfac_factors(kfac_batch_stats(jp, x_all, y_all, fisher="empirical",
                                                weights=w_all))
        factors = ekfac_factors(factors, ekfac_batch_stats(jp, factors, x_all, y_all,
                                                           fisher="empirical", weights=w_all))
        grads = random_mlp(rng, [d, c])
        damping = 1e-3
        out = precondition(to_jax(grads), factors, damping, method="ekfac")
    a = np.concatenate([x, np.ones((n, 1))], axis=1)
    hess = np.diag(p) - np.outer(p, p)
    ggn = sum(np.kron(np.outer(ai, ai), hess) for ai in a) / n
    f = factors[0]
    np.testing.assert_allclose(f.corrected, np.outer(f.s_eigvals, f.a_eigvals), RTOL, ATOL)
    [g_in], [g_out] = grad_matrices(grads), grad_matrices(out)
    np.testing.assert_allclose(g_out, explicit_inverse_apply(ggn, damping, g_in), RTOL, ATOL)


def test_bad_inputs_name_the_input(rng):
    params = to_jax(random_mlp(rng, SIZES))
    x = np.zeros((2, SIZES[0]))
    with pytest.raises(InputError, match="fisher"):
        kfac_batch_stats(params, x, np.zeros(2, int), fisher="exact")
    with pytest.raises(InputError, match="y: expected"):
        kfac_batch_stats(params, x, np.zeros(3, int), fisher="empirical")
    with pytest.raises(InputError, match="key"):
        kfac_batch_stats(params, x, fisher="true")
    with pytest.raises(InputError, match="params"):
        kfac_batch_stats({"convs": [{}], **params}, x, np.zeros(2, int), fisher="empirical")
    factors = kfac_factors(kfac_batch_stats(params, x, np.zeros(2, int), fisher="empirical"))
    with pytest.raises(InputError, match="factors"):
        precondition(params, factors, 0.1, method="ekfac")
    with pytest.raises(InputError, match="damping"):
        precondition(params, factors, -1.0, method="kfac")
