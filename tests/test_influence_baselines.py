"""Grad-dot/TracIn vs analytic float64 gradients, blockwise projection, stats vs scipy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from memjax.errors import InputError
from memjax.influence._gradients import (
    grad_dot,
    per_example_grads,
    project,
    projection_matrix,
    tracin,
)
from memjax.influence._stats import lds, pearson, rankdata, spearman

D, C = 5, 3


def logistic_loss(params, example):
    """Multinomial logistic regression cross-entropy of ONE example."""
    logits = example["x"] @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[example["y"]]


def _residual64(params, x, y):
    """float64 p − onehot(y): ∂loss/∂logits; ∂loss/∂w = x ⊗ r and ∂loss/∂b = r."""
    logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p - np.eye(C)[y]


def _grad_dot64(params, test, train):
    """g_t·g_i = (x_t·x_i + 1)(r_t·r_i): the analytic gradients of the logistic loss."""
    xt, xi = (np.asarray(b["x"], np.float64) for b in (test, train))
    rt, ri = _residual64(params, xt, test["y"]), _residual64(params, xi, train["y"])
    return (xt @ xi.T + 1.0) * (rt @ ri.T)


def _random(rng, n):
    return {"x": rng.normal(size=(n, D)).astype(np.float32),
            "y": rng.integers(0, C, n).astype(np.int32)}


def _params(rng):
    return {"w": rng.normal(size=(D, C)).astype(np.float32),
            "b": rng.normal(size=C).astype(np.float32)}


def test_per_example_grads_analytic():
    rng = np.random.default_rng(0)
    params, batch = _params(rng), _random(rng, 6)
    g = np.asarray(per_example_grads(logistic_loss, params, batch))
    r = _residual64(params, np.asarray(batch["x"], np.float64), batch["y"])
    # ravel_pytree orders dict keys: b [C], then w [D, C] row-major.
    expected = np.concatenate([r, (batch["x"][:, :, None] * r[:, None, :]).reshape(6, -1)], 1)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [4, 7, 64])  # N=23: padded last batch, one batch
def test_grad_dot_matches_float64(batch_size):
    rng = np.random.default_rng(batch_size)
    params, test, train = _params(rng), _random(rng, 5), _random(rng, 23)
    scores = grad_dot(logistic_loss, params, test, train, batch_size=batch_size)
    expected = _grad_dot64(params, test, train)
    assert scores.shape == (5, 23)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_grad_dot_under_jit():
    rng = np.random.default_rng(1)
    params, test, train = _params(rng), _random(rng, 3), _random(rng, 10)
    fn = jax.jit(functools.partial(grad_dot, logistic_loss, batch_size=4))
    np.testing.assert_allclose(np.asarray(fn(params, test, train)),
                               _grad_dot64(params, test, train), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_params, block_size", [(37, 8), (37, 37), (37, 100), (64, 16)])
def test_projection_equals_materialised(num_params, block_size):
    rng = np.random.default_rng(num_params + block_size)
    g = rng.normal(size=(4, num_params)).astype(np.float32)
    r = np.asarray(projection_matrix(num_params, 6, seed=3, block_size=block_size))
    assert r.shape == (num_params, 6)
    np.testing.assert_allclose(np.asarray(project(g, 6, seed=3, block_size=block_size)),
                               g.astype(np.float64) @ r, rtol=1e-5, atol=1e-5)


def test_projection_matrix_is_gaussian_with_variance_one_over_k():
    r = np.asarray(projection_matrix(4000, 8, seed=0, block_size=512))
    assert abs(r.mean()) < 4 * (1 / np.sqrt(8)) / np.sqrt(r.size)
    np.testing.assert_allclose(r.var(), 1 / 8, rtol=0.05)  # 32k samples: sd of var ≈ 0.8%
    assert not np.allclose(r[:512], r[512:1024])  # blocks use distinct keys


def test_grad_dot_projected_equals_materialised():
    rng = np.random.default_rng(2)
    params, test, train = _params(rng), _random(rng, 4), _random(rng, 11)
    p = D * C + C
    scores = grad_dot(logistic_loss, params, test, train, projection_dim=7, seed=5,
                      block_size=4, batch_size=3)
    r = np.asarray(projection_matrix(p, 7, seed=5, block_size=4), np.float64)
    gt = np.asarray(per_example_grads(logistic_loss, params, test), np.float64) @ r
    gi = np.asarray(per_example_grads(logistic_loss, params, train), np.float64) @ r
    np.testing.assert_allclose(np.asarray(scores), gt @ gi.T, rtol=1e-5, atol=1e-5)


def test_tracin_sums_checkpoints():
    rng = np.random.default_rng(3)
    checkpoints = [_params(rng) for _ in range(3)]
    lrs = [0.5, 0.1, 0.02]
    test, train = _random(rng, 4), _random(rng, 9)
    scores = tracin(logistic_loss, checkpoints, lrs, test, train, batch_size=5)
    expected = sum(lr * _grad_dot64(p, test, train)
                   for p, lr in zip(checkpoints, lrs, strict=True))
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("make, match", [
    (lambda t, n: ({"x": t["x"]}, n), "same fields"),
    (lambda t, n: ({"x": t["x"][:, :2], "y": t["y"]}, n), "per-example shape"),
    (lambda t, n: ({"x": t["x"][:0], "y": t["y"][:0]}, n), "0 examples"),
    (lambda t, n: (t, {"x": n["x"][:0], "y": n["y"][:0]}), "0 examples"),
    (lambda t, n: ({"x": t["x"], "y": t["y"][:2]}, n), "leading"),
])
def test_bad_batches(make, match):
    rng = np.random.default_rng(4)
    params, test, train = _params(rng), _random(rng, 3), _random(rng, 5)
    test, train = make(test, train)
    with pytest.raises(InputError, match=match):
        grad_dot(logistic_loss, params, test, train)


def test_bad_loss_and_options():
    rng = np.random.default_rng(5)
    params, test, train = _params(rng), _random(rng, 3), _random(rng, 5)

    def vector_loss(p, ex):
        return ex["x"] @ p["w"]

    with pytest.raises(InputError, match="scalar"):
        grad_dot(vector_loss, params, test, train)
    with pytest.raises(InputError, match="projection_dim"):
        grad_dot(logistic_loss, params, test, train, projection_dim=0)
    with pytest.raises(InputError, match="batch_size"):
        grad_dot(logistic_loss, params, test, train, batch_size=0)
    with pytest.raises(InputError, match="lrs"):
        tracin(logistic_loss, [params, params], [0.1], test, train)
    with pytest.raises(InputError, match="empty"):
        tracin(logistic_loss, [], [], test, train)


def _with_ties(rng, shape):
    return rng.integers(0, 5, size=shape).astype(np.float32)  # many ties


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_pearson_spearman_match_scipy(axis):
    rng = np.random.default_rng(6 + axis)
    for make in (lambda s: rng.normal(size=s).astype(np.float32), lambda s: _with_ties(rng, s)):
        a, b = make((4, 9, 6)), make((4, 9, 6))
        got_p, got_s = np.asarray(pearson(a, b, axis)), np.asarray(spearman(a, b, axis))
        a64 = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]).astype(np.float64)
        b64 = np.moveaxis(b, axis, -1).reshape(-1, a.shape[axis]).astype(np.float64)
        shape = got_p.shape
        exp_p = np.array([scipy.stats.pearsonr(x, y)[0] for x, y in zip(a64, b64, strict=True)])
        exp_s = np.array([scipy.stats.spearmanr(x, y)[0] for x, y in zip(a64, b64, strict=True)])
        exp_p, exp_s = exp_p.reshape(shape), exp_s.reshape(shape)
        np.testing.assert_allclose(got_p, exp_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_s, exp_s, rtol=1e-5, atol=1e-6)


def test_rankdata_average_ties():
    x = np.array([[3.0, 1.0, 3.0, 2.0, 3.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(rankdata(x)), scipy.stats.rankdata(x, axis=-1))


def test_lds_matches_definition():
    rng = np.random.default_rng(8)
    t, n, s = 4, 12, 15
    scores = rng.normal(size=(t, n)).astype(np.float32)
    subsets = rng.random((s, n)) < 0.5
    outputs = (subsets @ scores.T.astype(np.float64) + rng.normal(size=(s, t))).astype(np.float32)
    outputs[:, 2] = np.round(outputs[:, 2])  # ties in the measured outputs
    outputs[:, 3] = 1.0  # constant: no rank correlation
    res = lds(scores, subsets, outputs)
    predicted = subsets.astype(np.float64) @ scores.T.astype(np.float64)
    expected = np.array([scipy.stats.spearmanr(predicted[:, i], outputs[:, i])[0]
                         for i in range(3)])
    np.testing.assert_allclose(np.asarray(res.per_test[:3]), expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(res.per_test[3])
    np.testing.assert_allclose(float(res.mean), expected.mean(), rtol=1e-5)


def test_stats_bad_input():
    with pytest.raises(InputError, match="equal shapes"):
        pearson(np.zeros(3), np.zeros(4))
    with pytest.raises(InputError, match="at least 2"):
        spearman(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(InputError, match="axis"):
        pearson(np.zeros(3), np.zeros(3), axis=2)
    with pytest.raises(InputError, match="bool"):
        lds(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(InputError, match="outputs"):
        lds(np.zeros((2, 3)), np.zeros((4, 3), bool), np.zeros((2, 4)))


def test_grad_dot_is_vmapped_not_reduced():
    # A training example's score must not depend on which other examples share its batch.
    rng = np.random.default_rng(9)
    params, test, train = _params(rng), _random(rng, 2), _random(rng, 8)
    full = grad_dot(logistic_loss, params, test, train, batch_size=8)
    alone = grad_dot(logistic_loss, params, test, jax.tree.map(lambda x: x[3:4], train))
    np.testing.assert_allclose(np.asarray(full[:, 3:4]), np.asarray(alone), rtol=1e-6)
    assert jnp.asarray(full).dtype == jnp.float32
