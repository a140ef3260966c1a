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
    cnn_kfac_batch_stats,
    conv_patches,
    conv_weight_matrix,
    ekfac_batch_stats,
    ekfac_factors,
    embedding_ekfac_factors,
    embedding_ekfac_stats,
    embedding_factors,
    embedding_kfac_stats,
    kfac_batch_stats,
    kfac_factors,
    merge_stats,
    positions_ekfac_stats,
    positions_kfac_stats,
    precondition,
    precondition_embedding,
    precondition_matrix,
    sample_labels,
)
from memjax.models.classifier import MLPConfig, classifier_logits, conv3x3_same

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


# --- layers applied at many positions: tokens, convolution patches --------------------------


def numpy_positions_sums(a, g, w, average_s):
    """Σ_i w_i Σ_t ã ãᵀ, Σ_i w_i Σ_t g gᵀ (/ T if average_s), by explicit loops in float64."""
    a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=2)
    a_sum, s_sum = np.zeros((a.shape[2],) * 2), np.zeros((g.shape[2],) * 2)
    for i in range(a.shape[0]):
        for t in range(a.shape[1]):
            a_sum += w[i] * np.outer(a[i, t], a[i, t])
            s_sum += w[i] * np.outer(g[i, t], g[i, t]) / (a.shape[1] if average_s else 1)
    return a, a_sum, s_sum


@pytest.mark.parametrize("average_s", [False, True])
def test_positions_stats_equal_explicit_sums(rng, average_s):
    b, t, d_in, d_out = 5, 7, 3, 4
    a, g, w = rng.normal(size=(b, t, d_in)), rng.normal(size=(b, t, d_out)), rng.random(b)
    with jax.enable_x64(True):
        stats = positions_kfac_stats(a, g, w, average_s_over_positions=average_s)
        (factor,) = kfac_factors(stats)
        (factor,) = ekfac_factors([factor], positions_ekfac_stats(factor, a, g, w))
    a1, a_sum, s_sum = numpy_positions_sums(a, g, w, average_s)
    np.testing.assert_allclose(stats.a_sums[0], a_sum, RTOL, ATOL)
    np.testing.assert_allclose(stats.s_sums[0], s_sum, RTOL, ATOL)
    np.testing.assert_allclose(stats.count, w.sum(), RTOL)
    # EK-FAC: the summed per-example gradient G_i = Σ_t g ãᵀ rotated into K-FAC's basis
    q_a, q_s = np.asarray(factor.a_eigvecs), np.asarray(factor.s_eigvecs)
    sq = sum(w[i] * (q_s.T @ (g[i].T @ a1[i]) @ q_a) ** 2 for i in range(b)) / w.sum()
    np.testing.assert_allclose(factor.corrected, sq, RTOL, ATOL)
    assert not np.allclose(sq, np.outer(factor.s_eigvals, factor.a_eigvals))  # EK-FAC differs


def test_one_position_is_the_dense_layer(rng):
    """T = 1 gives exactly kfac_batch_stats' factors of a one-layer model."""
    params = random_mlp(rng, [4, 3])
    x, y = rng.normal(size=(N, 4)), rng.integers(0, 3, N)
    with jax.enable_x64(True):
        dense = kfac_batch_stats(to_jax(params), x, y, fisher="empirical")
        (a,), (g,) = numpy_per_example(params, x, y)
        stats = positions_kfac_stats(a[:, None, :-1], g[:, None], average_s_over_positions=True)
    np.testing.assert_allclose(stats.a_sums[0], dense.a_sums[0], RTOL, ATOL)
    np.testing.assert_allclose(stats.s_sums[0], dense.s_sums[0], RTOL, ATOL)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_precondition_matrix_equals_dense_solve(rng, method):
    a, g = rng.normal(size=(6, 5, 2)), rng.normal(size=(6, 5, 3))
    grad = rng.normal(size=(3, 3))
    with jax.enable_x64(True):
        (f,) = kfac_factors(positions_kfac_stats(a, g))
        (f,) = ekfac_factors([f], positions_ekfac_stats(f, a, g))
        out = precondition_matrix(grad, f, 0.05, method=method)
    q = np.kron(np.asarray(f.a_eigvecs), np.asarray(f.s_eigvecs))
    eig = (np.kron(f.a_eigvals, f.s_eigvals) if method == "kfac"
           else np.asarray(f.corrected).reshape(-1, order="F"))
    np.testing.assert_allclose(out, explicit_inverse_apply(q @ np.diag(eig) @ q.T, 0.05, grad),
                               RTOL, ATOL)


def numpy_patches(image):
    """im2col by loops: row r*W+c holds the zero-padded 3x3 neighbourhood, (i, j, channel)."""
    h, w, _ = image.shape
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    return np.stack([padded[r:r + 3, c:c + 3].reshape(-1) for r in range(h) for c in range(w)])


def test_conv_patches_match_the_classifier_convolution(rng):
    image, conv = rng.normal(size=(4, 6, 3)), {"w": rng.normal(size=(3, 3, 3, 5)),
                                               "b": rng.normal(size=5)}
    with jax.enable_x64(True):
        patches = np.asarray(conv_patches(jnp.asarray(image)))
        matrix = np.asarray(conv_weight_matrix(to_jax(conv)))
        xla = np.asarray(conv3x3_same(jnp.asarray(image), jnp.asarray(conv["w"]), "xla"))
    np.testing.assert_allclose(patches, numpy_patches(image), RTOL, ATOL)
    pre = np.concatenate([patches, np.ones((24, 1))], axis=1) @ matrix.T
    np.testing.assert_allclose(pre, xla.reshape(24, 5) + conv["b"], RTOL, ATOL)


def numpy_cnn_per_example(params, image, label):
    """Per conv layer patches ã [HW, 9C+1] and g [HW, C_out] of one image, hand backprop."""
    h, saved = image, []
    for conv in params["convs"]:
        rows, cols, _ = h.shape
        patch = np.concatenate([numpy_patches(h), np.ones((rows * cols, 1))], axis=1)
        kernel = np.concatenate([conv["w"].reshape(-1, conv["w"].shape[-1]), conv["b"][None]])
        pre = patch @ kernel
        saved.append((patch, pre, kernel, h.shape))
        h = np.maximum(pre, 0).reshape(rows // 2, 2, cols // 2, 2, -1).mean(axis=(1, 3))
    _, grads = numpy_per_example({"layers": params["layers"]}, h.reshape(1, -1), [label])
    dh = (grads[0] @ params["layers"][0]["w"].T).reshape(h.shape)  # d loss / d last pool
    conv_g = [None] * len(saved)
    for k in range(len(saved) - 1, -1, -1):
        patch, pre, kernel, (rows, cols, chans) = saved[k]
        up = np.repeat(np.repeat(dh, 2, axis=0), 2, axis=1) / 4  # average-pool backward
        conv_g[k] = up.reshape(rows * cols, -1) * (pre > 0)
        d_patch = (conv_g[k] @ kernel.T)[:, :-1].reshape(rows, cols, 3, 3, chans)
        d_pad = np.zeros((rows + 2, cols + 2, chans))
        for r in range(rows):
            for c in range(cols):
                d_pad[r:r + 3, c:c + 3] += d_patch[r, c]
        dh = d_pad[1:-1, 1:-1]
    return [s[0] for s in saved], conv_g, grads


def random_cnn(rng, channels=(2, 3, 4), hidden=5, classes=3, side=4):
    convs = [{"w": rng.normal(size=(3, 3, m, n)) * 0.5, "b": rng.normal(size=n)}
             for m, n in zip(channels[:-1], channels[1:], strict=True)]
    flat = (side // 2 ** len(convs)) ** 2 * channels[-1]
    return {"convs": convs, "layers": random_mlp(rng, [flat, hidden, classes])["layers"]}


def test_cnn_factors_equal_explicit_kfc_sums(rng):
    params, b = random_cnn(rng), 6
    x, y, w = rng.normal(size=(b, 4, 4, 2)), rng.integers(0, 3, b), rng.random(b)
    with jax.enable_x64(True):
        stats = cnn_kfac_batch_stats(to_jax(params), x, y, fisher="empirical", weights=w)
    per = [numpy_cnn_per_example(params, x[i], y[i]) for i in range(b)]
    for k in range(2):  # conv layers: A sums patches, S sums gradients / positions (KFC)
        a = np.stack([p[0][k] for p in per])
        g = np.stack([p[1][k] for p in per])
        _, a_sum, s_sum = numpy_positions_sums(a[..., :-1], g, w, average_s=True)
        np.testing.assert_allclose(stats.a_sums[k], a_sum, RTOL, ATOL)
        np.testing.assert_allclose(stats.s_sums[k], s_sum, RTOL, ATOL)
    for k in range(2):  # then the dense layers, as for an MLP
        g = np.stack([p[2][k][0] for p in per])
        np.testing.assert_allclose(stats.s_sums[2 + k], np.einsum("b,bi,bj->ij", w, g, g),
                                   RTOL, ATOL)
    assert len(stats.a_sums) == 4


def numpy_cnn_logits(params, x):
    out = []
    for image in x:
        h = image
        for conv in params["convs"]:
            rows, cols, _ = h.shape
            kernel = np.concatenate([conv["w"].reshape(-1, conv["w"].shape[-1]),
                                     conv["b"][None]])
            pre = np.concatenate([numpy_patches(h), np.ones((rows * cols, 1))], axis=1) @ kernel
            h = np.maximum(pre, 0).reshape(rows // 2, 2, cols // 2, 2, -1).mean(axis=(1, 3))
        h = h.reshape(-1)
        for layer in params["layers"][:-1]:
            h = np.maximum(h @ layer["w"] + layer["b"], 0)
        out.append(h @ params["layers"][-1]["w"] + params["layers"][-1]["b"])
    return np.stack(out)


def test_cnn_true_fisher_samples_from_the_cnn(rng, seed):
    """fisher="true" equals the empirical stats at labels drawn with the same key from the
    CNN's own logits (computed here in NumPy)."""
    params, x = random_cnn(rng), rng.normal(size=(6, 4, 4, 2))
    with jax.enable_x64(True):
        key = jax.random.key(seed)
        labels = jax.random.categorical(key, jnp.asarray(numpy_cnn_logits(params, x)), axis=-1)
        true = cnn_kfac_batch_stats(to_jax(params), x, fisher="true", key=key)
        empirical = cnn_kfac_batch_stats(to_jax(params), x, labels, fisher="empirical")
    for got, want in zip(true.s_sums, empirical.s_sums, strict=True):
        np.testing.assert_allclose(got, want, RTOL, ATOL)


def test_cnn_summed_gradient_is_the_weight_gradient(rng):
    """Σ_t g_t ã_tᵀ of the conv layers equals jax.grad of classifier_logits' loss: ties the
    hand backprop (and so the stats checked against it) to the classifier's own forward."""
    # classifier_logits computes in float32: params and image are float32-representable and
    # NumPy runs them in float64; float32 rounding through 4 layers of O(1)-O(10) values is
    # ~1e-6 relative, so 1e-4 (a wrong gradient is off by O(1))
    params = jax.tree.map(lambda v: v.astype(np.float32).astype(np.float64), random_cnn(rng))
    image, label = rng.normal(size=(4, 4, 2)).astype(np.float32).astype(np.float64), 1
    patches, conv_g, _ = numpy_cnn_per_example(params, image, label)

    def loss(p):
        return -jax.nn.log_softmax(classifier_logits(p, image.astype(np.float32)))[label]

    grads = jax.grad(loss)(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params))
    for k in range(2):
        expected = np.asarray(conv_weight_matrix(grads["convs"][k]))
        np.testing.assert_allclose(conv_g[k].T @ patches[k], expected, 1e-4, 1e-4)


def test_cnn_and_positions_bad_inputs_name_the_input(rng):
    params = to_jax(random_cnn(rng))
    x = rng.normal(size=(2, 4, 4, 2))
    with pytest.raises(InputError, match="key"):
        cnn_kfac_batch_stats(params, x)
    residual = {**params, "convs": [{**params["convs"][0], "res": []}]}
    with pytest.raises(InputError, match="params"):
        cnn_kfac_batch_stats(residual, x, np.zeros(2, int), fisher="empirical")
    with pytest.raises(InputError, match="params"):
        cnn_kfac_batch_stats({"layers": params["layers"]}, x, fisher="empirical")
    with pytest.raises(InputError, match="g:"):
        positions_kfac_stats(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="a:"):
        positions_kfac_stats(np.zeros((2, 4)), np.zeros((2, 4, 4)))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_embedding_factors_and_solve_equal_explicit_ones(rng, method):
    """Embedding table [V, d] as a dense layer on one-hot inputs: A = E[Σ_t e eᵀ] (diagonal:
    token counts), S = E[Σ_t g gᵀ], Λ = E[(Q_Sᵀ G)²] with G [d, V] = Σ_t g_t e_tᵀ, and the
    damped solve against the dense (d·V)² matrix. Tokens repeat within an example."""
    b, t, vocab, d = 5, 6, 4, 3
    tokens, g = rng.integers(0, vocab, (b, t)), rng.normal(size=(b, t, d))
    w, grad = rng.random(b), rng.normal(size=(vocab, d))
    with jax.enable_x64(True):
        f = embedding_factors(embedding_kfac_stats(tokens, g, vocab, w))
        f = embedding_ekfac_factors(f, embedding_ekfac_stats(f, tokens, g, w))
        out = precondition_embedding(grad, f, None, method=method)
    f = jax.tree.map(np.asarray, f)
    onehot = np.eye(vocab)[tokens]  # [b, t, V]
    a_full = np.einsum("b,bti,btj->ij", w, onehot, onehot) / w.sum()
    np.testing.assert_allclose(np.diag(f.a_diag), a_full, RTOL, ATOL)  # A is diagonal
    s_full = np.einsum("b,bti,btj->ij", w, g, g) / w.sum()
    np.testing.assert_allclose(f.s_eigvecs @ np.diag(f.s_eigvals) @ f.s_eigvecs.T, s_full,
                               RTOL, ATOL)
    q_s = np.asarray(f.s_eigvecs)
    g_mats = [sum(np.outer(g[i, s], onehot[i, s]) for s in range(t)) for i in range(b)]
    sq = sum(w[i] * (q_s.T @ g_mats[i]) ** 2 for i in range(b)) / w.sum()
    np.testing.assert_allclose(f.corrected, sq, RTOL, ATOL)
    # dense curvature in the vec (column-stacking) of G [d, V]: Q = I_V ⊗ Q_S
    q = np.kron(np.eye(vocab), q_s)
    if method == "kfac":
        curvature = np.kron(a_full, s_full)
    else:
        curvature = q @ np.diag(sq.reshape(-1, order="F")) @ q.T
    lam = 0.1 * np.trace(curvature) / len(curvature)  # the documented rule: 0.1 × mean eig
    expected = explicit_inverse_apply(curvature, lam, grad.T).T
    np.testing.assert_allclose(out, expected, RTOL, ATOL)


def test_embedding_bad_inputs_name_the_input(rng):
    g = rng.normal(size=(2, 3, 4))
    with pytest.raises(InputError, match="tokens"):
        embedding_kfac_stats(np.zeros((2, 3)), g, 5)
    with pytest.raises(InputError, match="g:"):
        embedding_kfac_stats(np.zeros((2, 4), int), g, 5)
    with pytest.raises(InputError, match="vocab_size"):
        embedding_kfac_stats(np.zeros((2, 3), int), g, 0)
