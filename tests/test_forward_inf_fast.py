"""Forward-INF's blocked layout (Ko et al., CVPR 2024): big engine batches scored in row blocks.

The scores must not depend on how the training rows are cut: one batch or several, blocks of
64 rows with or without a remainder, one device or eight. Every case is checked against the
float64 NumPy scores of a one-hidden-layer tanh MLP with hand-written gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.engine import make_mesh
from memjax.influence import forward_inf
from memjax.influence._forward_inf import (
    BLOCK_ROWS,
    MAX_BATCH_ROWS,
    default_batch_size,
    in_blocks,
)

D, H, K = 4, 8, 3
N_TRAIN, N_TEST, LR = 150, 3, 0.1


def loss_fn(p, ex):
    hidden = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
    logits = hidden @ p["w2"] + p["b2"]
    return jax.nn.logsumexp(logits) - logits[ex["y"]]


# ---- float64 NumPy reference --------------------------------------------------------

def np_forward(p, x):
    hidden = np.tanh(x @ p["w1"] + p["b1"])
    return hidden, hidden @ p["w2"] + p["b2"]


def np_losses(p, x, y):
    """Cross-entropy [M] of M rows."""
    _, logits = np_forward(p, x)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return lse - logits[np.arange(len(y)), y]


def np_grads(p, x, y):
    """Per-example gradients of the cross-entropy, {name: [M, ...]} (backprop by hand)."""
    hidden, logits = np_forward(p, x)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    dlogits = prob - np.eye(K)[y]
    dpre = (dlogits @ p["w2"].T) * (1.0 - hidden**2)
    return {"w1": x[:, :, None] * dpre[:, None, :], "b1": dpre,
            "w2": hidden[:, :, None] * dlogits[:, None, :], "b2": dlogits}


def np_scores(p, test, train):
    """Finite δ [T, N] of one SGD ascent step θ' = θ + lr·g_t, and first order lr·g_t·g_i."""
    g_test = np_grads(p, test["x"], test["y"])
    g_train = np_grads(p, train["x"], train["y"])
    base = np_losses(p, train["x"], train["y"])
    finite = np.stack([np_losses({k: p[k] + LR * g_test[k][t] for k in p}, train["x"],
                                 train["y"]) - base for t in range(N_TEST)])
    flat = lambda g: np.concatenate([g[k].reshape(len(g[k]), -1) for k in sorted(g)], 1)  # noqa: E731
    return finite, LR * flat(g_test) @ flat(g_train).T


@pytest.fixture
def problem(rng):
    params = {"w1": rng.normal(size=(D, H)), "b1": rng.normal(size=H) * 0.1,
              "w2": rng.normal(size=(H, K)), "b2": rng.normal(size=K) * 0.1}

    def data(n):
        return {"x": rng.normal(size=(n, D)), "y": rng.integers(0, K, size=n).astype(np.int32)}

    test, train = data(N_TEST), data(N_TRAIN)
    as32 = lambda d: {k: v.astype(np.float32) if v.dtype.kind == "f" else v  # noqa: E731
                      for k, v in d.items()}
    return (params, test, train), (as32(params), as32(test), as32(train))


# ---- tests --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 64, 150, 192])
def test_in_blocks_equals_one_pass(rng, n):
    x = rng.normal(size=(n, D))
    y = rng.normal(size=n)
    w = rng.normal(size=(D, 6))
    expected = np.tanh(x @ w) + y[:, None]  # float64 NumPy

    def block_fn(rows):
        return jnp.tanh(rows["x"] @ w.astype(np.float32)) + rows["y"][:, None]

    rows = {"x": x.astype(np.float32), "y": y.astype(np.float32)}
    got = jax.jit(lambda r: in_blocks(block_fn, r, BLOCK_ROWS))(rows)
    # float32: a 4-term dot and tanh of O(1) values, a few ulps (1.2e-7) each.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    # Really blocked: more than one full block runs as a loop of n // 64 iterations.
    jaxpr = str(jax.make_jaxpr(lambda r: in_blocks(block_fn, r, BLOCK_ROWS))(rows))
    assert ("length=" + str(n // BLOCK_ROWS) in jaxpr) == (n // BLOCK_ROWS > 1)


def test_default_batch_size():
    # Digits: 1,797 rows of 64 floats + a label and 64 scores; at most 1,024 rows a batch ->
    # two equal batches of 899 rows, rounded up to 904 (7 padded rows, not 251).
    assert default_batch_size(1797, 260 + 256, 1, fixed=False) == 904
    assert default_batch_size(1797, 260 + 256, 1, fixed=True) == MAX_BATCH_ROWS
    # 224x224x3 float32 images (602 KB): 16 MiB holds 27 rows, the floor is one block.
    assert default_batch_size(10_000, 602_112, 8, fixed=True) == 8 * BLOCK_ROWS
    assert default_batch_size(40, 100, 8, fixed=False) == 64  # 5 rows a device -> 8
    for n in (1, 63, 1000, 5000, 123_457):
        for n_data in (1, 8):
            for row_bytes in (16, 40_000, 10**7):
                batch = default_batch_size(n, row_bytes, n_data, fixed=False)
                cap = default_batch_size(n, row_bytes, n_data, fixed=True)
                assert batch % (8 * n_data) == 0 and cap % (BLOCK_ROWS * n_data) == 0
                assert BLOCK_ROWS * n_data <= cap <= MAX_BATCH_ROWS * n_data and batch <= cap
                n_batches = -(-n // batch)
                assert n_batches == -(-n // cap)  # as few batches as the cap allows
                assert n_batches * batch - n < 8 * n_data * n_batches  # nearly no padding


@pytest.mark.parametrize("devices,batch_size", [(1, None), (1, 136), (8, 8 * 136)])
def test_blocked_scores_equal_numpy(problem, devices, batch_size):
    # None: one batch of 152 rows (two blocks and a remainder of 24); 136: two batches, the
    # last one padded; 8 devices: 136 rows each (mostly padding), blocks on every device.
    (p64, test64, train64), (params, test, train) = problem
    finite64, first64 = np_scores(p64, test64, train64)
    mesh = make_mesh(devices=jax.devices()[:devices])
    kw = dict(lr=LR, optimizer="sgd", direction="ascent", batch_size=batch_size, mesh=mesh)
    finite = forward_inf(loss_fn, params, test, train, mode="finite", score="delta", **kw)
    first = forward_inf(loss_fn, params, test, train, mode="first_order", **kw)
    assert finite.shape == first.shape == (N_TEST, N_TRAIN)
    # Finite δ is a difference of float32 losses of O(1-10): a few ulps of the loss each.
    loss_scale = np.abs(np_losses(p64, train64["x"], train64["y"])).max()
    np.testing.assert_allclose(finite, finite64, rtol=1e-4, atol=4e-7 * loss_scale)
    # First order: float32 jvps of 4-8-3 sums, relative to the largest score.
    np.testing.assert_allclose(first, first64, rtol=1e-4, atol=1e-5 * np.abs(first64).max())
