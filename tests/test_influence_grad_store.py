"""The projected training-gradient store and its streaming top-k queries, against float64
NumPy: explicit per-example gradients of a softmax regression, the dense projection R, the
dense score matrix and argsort, and the explicit Kronecker projection of a dense layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.engine import ScoreStore
from memjax.errors import InputError
from memjax.influence._grad_store import (
    factorized_projection,
    gradient_store,
    kronecker_factors,
    merge_block,
    query_store,
    query_vectors,
)
from memjax.influence._gradients import projection_matrix

D, C, K = 6, 3, 16  # features, classes, projected width
SEED, BLOCK = 3, 7  # a block size that does not divide P = 21: several padded R blocks


def softmax_loss(params, example):
    logits = example["x"] @ params["w"] + params["b"]
    return jax.nn.logsumexp(logits) - logits[example["label"]]


def numpy_grads(params, x, label):
    """[N, P] float64 per-example gradients in ravel_pytree order: b [C], then w [D, C]
    row-major (jax.tree.leaves sorts dict keys)."""
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    logits = x.astype(np.float64) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(C)[label]  # d loss / d logits
    grad_w = x.astype(np.float64)[:, :, None] * residual[:, None, :]
    return np.concatenate([residual, grad_w.reshape(len(x), -1)], axis=1)


@pytest.fixture
def problem(rng):
    params = {"w": rng.normal(size=(D, C)).astype(np.float32),
              "b": rng.normal(size=C).astype(np.float32)}
    n = 100
    data = {"x": rng.normal(size=(n, D)).astype(np.float32),
            "label": rng.integers(0, C, size=n).astype(np.int32)}
    return params, data


def test_stored_rows_and_query_scores_equal_explicit_projection(tmp_path, problem, rng):
    params, data = problem
    store = gradient_store(softmax_loss, params, data, ScoreStore(tmp_path / "s", chunk_size=32),
                           projection_dim=K, batch_size=16, seed=SEED, block_size=BLOCK)
    r = np.asarray(projection_matrix(D * C + C, K, seed=SEED, block_size=BLOCK), np.float64)
    expected_rows = numpy_grads(params, data["x"], data["label"]) @ r
    # float32 gradients and projection of O(1) values summed over P = 21 terms: ~1e-6.
    np.testing.assert_allclose(store.read()["grad"], expected_rows, rtol=1e-5, atol=1e-5)

    qx = rng.normal(size=(9, D)).astype(np.float32)
    ql = rng.integers(0, C, size=9).astype(np.int32)
    queries = query_vectors(softmax_loss, params, {"x": qx, "label": ql}, projection_dim=K,
                            seed=SEED, block_size=BLOCK)
    expected_queries = numpy_grads(params, qx, ql) @ r
    np.testing.assert_allclose(queries, expected_queries, rtol=1e-5, atol=1e-5)
    found = query_store(store, queries, top_k=5, block_rows=24)
    dense = expected_queries @ expected_rows.T  # [T, N] g_t·R·Rᵀ·g_i, float64
    # Scores are sums of K = 16 products of float32 values ~O(1): well inside 1e-4.
    np.testing.assert_allclose(found["top_scores"], -np.sort(-dense, axis=1)[:, :5],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(dense, found["top_rows"], axis=1),
                               found["top_scores"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(found["bottom_scores"], np.sort(dense, axis=1)[:, :5],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(dense, found["bottom_rows"], axis=1),
                               found["bottom_scores"], rtol=1e-4, atol=1e-4)


def _fails_at(example):
    def validate(fields, indices):
        if example in indices:
            raise InputError(f"bad example {example}")
    return validate


def test_interrupted_store_resumes_to_identical_rows(tmp_path, problem):
    params, data = problem
    options = {"projection_dim": K, "batch_size": 16, "seed": SEED, "block_size": BLOCK}
    path = tmp_path / "s"
    with pytest.raises(InputError, match="bad example 70"):
        gradient_store(softmax_loss, params, data, ScoreStore(path, chunk_size=32),
                       validate=_fails_at(70), **options)
    store = ScoreStore(path)
    assert store.info()["state"] == "incomplete"
    assert 0 in store.done_chunks() and 2 not in store.done_chunks()  # 70 is in chunk 2
    resumed = gradient_store(softmax_loss, params, data, ScoreStore(path), **options).read()
    clean = gradient_store(softmax_loss, params, data,
                           ScoreStore(tmp_path / "clean", chunk_size=32), **options).read()
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key])


@pytest.mark.parametrize("n, block_rows, top_k", [(203, 16, 4), (5, 64, 5), (40, 8, 1)])
def test_streaming_top_k_equals_dense_sort(rng, n, block_rows, top_k):
    rows = rng.normal(size=(n, 5)).astype(np.float32)
    queries = rng.normal(size=(7, 5)).astype(np.float32)
    found = query_store(rows, queries, top_k=top_k, block_rows=block_rows)
    dense = queries.astype(np.float64) @ rows.astype(np.float64).T
    # float32 dot products of 5 terms ~O(1): error ~1e-6.
    np.testing.assert_allclose(found["top_scores"], -np.sort(-dense, axis=1)[:, :top_k],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, found["top_rows"], axis=1),
                               found["top_scores"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found["bottom_scores"], np.sort(dense, axis=1)[:, :top_k],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, found["bottom_rows"], axis=1),
                               found["bottom_scores"], rtol=1e-5, atol=1e-5)
    assert found["top_rows"].min() >= 0 and found["top_rows"].max() < n  # no padding row


def test_ties_keep_the_lower_row_first():
    found = query_store(np.zeros((30, 2), np.float32), np.ones((2, 2), np.float32), top_k=3,
                        block_rows=8)
    np.testing.assert_array_equal(found["top_rows"], [[0, 1, 2]] * 2)
    np.testing.assert_array_equal(found["bottom_rows"], [[0, 1, 2]] * 2)


def test_five_thousand_queries_against_fifty_thousand_rows_never_hold_n_by_t():
    n, t, k, block, top = 50_000, 5_000, 32, 512, 10
    running = (jax.ShapeDtypeStruct((t, top), jnp.float32),
               jax.ShapeDtypeStruct((t, top), jnp.int32))
    compiled = merge_block.lower(
        running, running, jax.ShapeDtypeStruct((block, k), jnp.float32),
        jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32)).compile()
    memory = compiled.memory_analysis()
    step_bytes = memory.temp_size_in_bytes + memory.output_size_in_bytes
    # One step holds a few [T, block + top] score/index arrays (measured: 5 of them, 52 MB
    # on XLA:CPU), whatever N is; the [N, T] float32 score matrix alone would be 1 GB.
    assert step_bytes <= 8 * t * (block + top) * 4
    assert step_bytes < n * t * 4 / 10


def test_factorized_projection_equals_kronecker_projection_of_the_gradient(rng):
    s, d_in, d_out, k_in, k_out = 5, 4, 3, 2, 3
    a = rng.normal(size=(s, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    c = rng.normal(size=(s, d_out)).astype(np.float32)

    def loss(weight):  # a dense layer over S positions: y_s = a_s @ W
        return jnp.sum(jnp.tanh(a @ weight) * c)

    y = a.astype(np.float64) @ w
    g = c * (1 - np.tanh(y) ** 2)  # [S, out] d loss / d y_s, float64
    grad_w = a.astype(np.float64).T @ g  # Σ_s a_s g_sᵀ
    # The convention holds for autodiff's gradient (float32 of O(1) values).
    np.testing.assert_allclose(jax.grad(loss)(w), grad_w, rtol=1e-5, atol=1e-5)
    p_in, p_out = kronecker_factors(1, d_in, d_out, k_in, k_out)
    dense = grad_w.reshape(-1) @ np.kron(np.asarray(p_in, np.float64),
                                         np.asarray(p_out, np.float64))
    got = factorized_projection(jnp.asarray(a), jnp.asarray(g, jnp.float32), p_in, p_out)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)  # float32 sums of ~20 terms


def test_bad_inputs_are_named(rng):
    rows = rng.normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(InputError, match="top_k=11: expected at most the 10"):
        query_store(rows, rows, top_k=11)
    with pytest.raises(InputError, match=r"expected \[N, 3\]"):
        query_store(rows, rows[:, :3], top_k=2)
    with pytest.raises(InputError, match="top_k=0"):
        query_store(rows, rows, top_k=0)
    with pytest.raises(InputError, match="activations"):
        factorized_projection(jnp.ones((3, 2)), jnp.ones((4, 2)), jnp.ones((2, 1)),
                              jnp.ones((2, 1)))


@pytest.mark.parametrize("s_train, s_test", [(1, 1), (7, 3)])
def test_factorized_dot_equals_the_formed_gradients(s_train, s_test, rng):
    """Σ_{s,s'} (a_is·a_ts')(g_is·g_ts') = vec(Σ a gᵀ)·vec(Σ a gᵀ), float64 NumPy."""
    from memjax.influence import factorized_dot, factorized_dot_is_cheaper

    a_i, g_i = rng.normal(size=(s_train, 5)), rng.normal(size=(s_train, 4))
    a_t, g_t = rng.normal(size=(s_test, 5)), rng.normal(size=(s_test, 4))
    want = np.sum((a_i.T @ g_i) * (a_t.T @ g_t))
    got = factorized_dot(*(jnp.asarray(v, jnp.float32) for v in (a_i, g_i, a_t, g_t)))
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 sums of ~100 products
    # One position each (an MLP layer): 1·1·(in + out) < 3·in·out, always cheaper.
    assert factorized_dot_is_cheaper(1, 1, 768, 768)
    # Width 768: 512 tokens each, 512²·1536 = 4.0e8 < 1025·768² = 6.0e8 (factorized);
    # 1,024 tokens each, 1.6e9 > 2049·768² = 1.2e9 (form the gradients).
    assert factorized_dot_is_cheaper(512, 512, 768, 768)
    assert not factorized_dot_is_cheaper(1024, 1024, 768, 768)


def _token_model(rng, vocab=7, dim=4):
    params = {"emb": jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32),
              "w": jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=vocab), jnp.float32)}

    def loss(p, example):  # mean next-token CE: the dense layer w (+ b) at every position
        hidden = p["emb"][example["ids"][:-1]] @ p["w"]
        logits = hidden + jnp.broadcast_to(p["b"], hidden.shape)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]),
                                                    example["ids"][1:]])

    data = {"ids": rng.integers(0, vocab, size=(10, 6)).astype(np.int32)}
    return params, loss, data


def test_factorized_store_equals_the_kronecker_projection_of_the_gradients(rng, tmp_path):
    """LoGra's store (k² columns per dense layer from activations and output gradients,
    the embedding projected densely) equals P_inᵀ[∇W; ∇b]P_out and R_restᵀ vec(∇emb) of
    the formed per-example gradients (float64 NumPy), and queries use the same R."""
    from memjax.influence import (
        gradient_store,
        kronecker_factors,
        query_vectors,
    )

    params, loss, data = _token_model(rng)
    rows = gradient_store(loss, params, data, tmp_path / "store", projection_dim=8,
                          factor_dim=3, batch_size=8, seed=5).read()["grad"]
    assert rows.shape == (10, 9 + 8)
    p_in, p_out = (np.asarray(m, np.float64) for m in kronecker_factors(6, 5, 7, 3, 3))
    r_rest = np.asarray(projection_matrix(7 * 4, 8, seed=5), np.float64)
    want = []
    for ids in data["ids"]:
        grads = jax.grad(loss)(params, {"ids": ids})
        w_aug = np.concatenate([np.asarray(grads["w"]), np.asarray(grads["b"])[None]], axis=0)
        want.append(np.r_[(p_in.T @ w_aug @ p_out).ravel(),
                          np.asarray(grads["emb"]).ravel() @ r_rest])
    want = np.stack(want)
    # float32 products of O(1) values over 5 positions: 1e-5 of the largest entry.
    np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5 * np.abs(want).max())
    queries = query_vectors(loss, params, {"ids": data["ids"][:3]}, projection_dim=8,
                            factor_dim=3, seed=5)
    np.testing.assert_allclose(queries, rows[:3], rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(InputError, match="factor_dim: the factorized store"):
        gradient_store(loss, params, data, tmp_path / "other", projection_dim=8,
                       factor_dim=3, batch_size=8, trainable="w")
