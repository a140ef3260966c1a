"""Pallas kernels (memjax.kernels) against their XLA references, in interpret mode on CPU.

Every kernel is forced with ``impl="kernel"`` (or ``MEMJAX_KERNELS=kernel``) and compared
with its reference on fresh random inputs, at shapes that leave ragged tiles. Shapes are
small but span several tiles in every grid axis: interpret mode is slow.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import kernels
from memjax.errors import InputError
from memjax.memorization._dejavu import knn as dejavu_knn
from memjax.memorization._unitmem import batch_stats
from memjax.signals._tokens import tokens

# Strict dtype promotion: these code paths promote no dtype implicitly (conftest).
pytestmark = pytest.mark.strict_dtypes

# float32 kernels vs references: the same per-tile formulas, different tile boundaries and
# matmul accumulation order, so agreement to a few float32 ulps of the logit scale.
RTOL = 1e-5
# log p(target) of a near-certain token is ~0: its rounding error scales with the logits
# (|z| ~ 10 here, ulp ~ 1e-6), not with log p, so a relative bound alone cannot hold there.
ATOL = 1e-6


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- token stats


def _lm_inputs(rng, lead, dim, vocab, dtype=np.float32, scale=1.0):
    hidden = rng.standard_normal((*lead, dim)).astype(dtype)
    weight = (scale * rng.standard_normal((dim, vocab)) / np.sqrt(dim)).astype(dtype)
    bias = rng.standard_normal(vocab).astype(dtype)
    targets = rng.integers(0, vocab, lead)
    return hidden, weight, bias, targets


@pytest.mark.parametrize(
    "lead, dim, vocab, blocks, use_bias",
    [
        ((37,), 16, 1000, (16, 128), True),  # ragged rows (37 = 2x16 + 5) and V (1000)
        ((2, 5), 8, 300, (4, 64), False),  # [B, T, D]; ragged rows and V
        ((8,), 8, 256, (8, 128), True),  # tiles divide evenly
    ],
)
def test_token_stats_kernel_equals_reference(rng, lead, dim, vocab, blocks, use_bias):
    hidden, weight, bias, targets = _lm_inputs(rng, lead, dim, vocab, scale=8.0)
    bias = bias if use_bias else None
    ref = kernels.token_stats(hidden, weight, targets, bias, chunk_size=97, impl="reference")
    out = kernels.token_stats(hidden, weight, targets, bias, impl="kernel",
                              block_rows=blocks[0], block_vocab=blocks[1])
    for name in ("logp", "lse", "mu", "sigma"):
        assert out[name].shape == targets.shape
        _close(out[name], ref[name])
    # Not a vacuous comparison: the statistics agree with the full log-softmax.
    logits = hidden.reshape(-1, dim).astype(np.float64) @ weight
    if use_bias:
        logits = logits + bias
    top = logits.max(1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    p = np.exp(log_p)
    mu = (p * log_p).sum(1)
    _close(out["mu"].reshape(-1), mu, rtol=1e-4, atol=1e-5)
    _close(out["logp"].reshape(-1), np.take_along_axis(
        log_p, targets.reshape(-1, 1), 1)[:, 0], rtol=1e-4, atol=1e-5)


def test_token_stats_bf16_inputs(rng):
    """bf16 hidden and unembedding: same tolerance as float32, because both paths multiply
    bf16 values exactly in float32 (8-bit significands: the products fit in 24 bits) and
    accumulate in float32; only the summation order differs. Checked against float64 on
    the same bf16 values too, which bounds the float32 accumulation error."""
    hidden, weight, bias, targets = _lm_inputs(rng, (19,), 32, 700, scale=8.0)
    hidden, weight = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16)
    ref = kernels.token_stats(hidden, weight, targets, bias, chunk_size=128, impl="reference")
    out = kernels.token_stats(hidden, weight, targets, bias, impl="kernel",
                              block_rows=8, block_vocab=256)
    for name in ("logp", "lse", "mu", "sigma"):
        _close(out[name], ref[name])
    logits = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64) + bias
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    _close(out["lse"], lse, rtol=1e-5, atol=0)


def test_token_stats_masked_vocab_and_bad_targets(rng):
    """-inf bias masks columns (a whole tile of them here); a target on a masked column
    has log p = -inf; out-of-range targets (-100, V) give NaN, as the XLA path."""
    vocab = 300
    hidden, weight, bias, targets = _lm_inputs(rng, (11,), 8, vocab, scale=4.0)
    bias[64:128] = -np.inf  # exactly the second vocab tile of 64
    bias[[5, 200, 299]] = -np.inf
    targets[:4] = [-100, vocab, 70, 299]
    ref = kernels.token_stats(hidden, weight, targets, bias, chunk_size=50, impl="reference")
    out = kernels.token_stats(hidden, weight, targets, bias, impl="kernel",
                              block_rows=4, block_vocab=64)
    assert np.isnan(out["logp"][:2]).all() and np.isneginf(out["logp"][2:4]).all()
    assert np.isfinite(out["mu"]).all() and np.isfinite(out["sigma"]).all()
    for name in ("logp", "lse", "mu", "sigma"):
        _close(out[name], ref[name])


@pytest.mark.parametrize("use_bias", [True, False])
def test_tokens_dispatches_through_the_switch(rng, monkeypatch, use_bias):
    """memjax.signals._tokens (hidden form, streamed) under vmap + jit gives the same
    numbers with MEMJAX_KERNELS=kernel as with reference."""
    hidden, weight, bias, targets = _lm_inputs(rng, (3, 9), 16, 600, scale=8.0)
    fn = partial(tokens, unembedding=weight, bias=bias if use_bias else None, chunk_size=128)
    run = lambda: jax.jit(jax.vmap(lambda h, t: fn(hidden=h, targets=t)))(hidden, targets)
    monkeypatch.setenv("MEMJAX_KERNELS", "reference")
    ref = run()
    monkeypatch.setenv("MEMJAX_KERNELS", "kernel")
    calls = []
    real = kernels._token_stats.kernel
    monkeypatch.setattr(kernels._token_stats, "kernel",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = run()
    assert calls, "MEMJAX_KERNELS=kernel did not reach the Pallas kernel"
    for name in ("logp", "mu", "sigma", "entropy", "lse", "mean_loss"):
        _close(out[name], ref[name])


# --------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n_q, n_public, dim, k, block, block_q",
    [
        (13, 101, 8, 5, 16, 8),  # ragged queries and public set
        (16, 64, 4, 10, 32, 16),  # even tiles
        (7, 45, 6, 20, 8, 4),  # k larger than a public block
    ],
)
def test_knn_kernel_equals_reference(rng, metric, n_q, n_public, dim, k, block, block_q):
    queries = rng.standard_normal((n_q, dim)).astype(np.float32)
    public = rng.standard_normal((n_public, dim)).astype(np.float32)
    ref_v, ref_i = dejavu_knn(queries, public, k, metric=metric, block_size=block,
                              impl="reference")
    out_v, out_i = dejavu_knn(queries, public, k, metric=metric, block_size=block,
                              impl="kernel", block_queries=block_q)
    np.testing.assert_array_equal(out_i, ref_i)
    _close(out_v, ref_v)
    # Exact neighbours, nearest first, by brute force in float64.
    d = ((queries[:, None, :].astype(np.float64) - public[None]) ** 2).sum(-1)
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
        d = -unit(queries.astype(np.float64)) @ unit(public.astype(np.float64)).T
    np.testing.assert_array_equal(out_i, np.argsort(d, axis=1, kind="stable")[:, :k])


def test_knn_ties_go_to_the_lower_index(rng):
    """Copies of a query's nearest row at indices in the same and in later blocks come
    out in index order, in both paths (block 16: rows 3, 9 | 20 | 90)."""
    public = rng.standard_normal((101, 4)).astype(np.float32)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    for row in (3, 9, 20, 90):
        public[row] = queries[0] + 0.01
    public[[40, 41]] = queries[1]  # zero distance twice
    for impl in ("reference", "kernel"):
        vals, idx = dejavu_knn(queries, public, 4, block_size=16, impl=impl,
                               block_queries=2)
        np.testing.assert_array_equal(idx[0], [3, 9, 20, 90])
        np.testing.assert_array_equal(idx[1, :2], [40, 41])
        assert vals[1, 0] == 0 and vals[1, 1] == 0


def test_knn_every_public_row_once_when_k_equals_p(rng):
    """k = P with a ragged last block: padded columns (-inf) are never picked."""
    queries = rng.standard_normal((5, 3)).astype(np.float32)
    public = rng.standard_normal((21, 3)).astype(np.float32)
    ref = dejavu_knn(queries, public, 21, block_size=8, impl="reference")
    vals, idx = dejavu_knn(queries, public, 21, block_size=8, impl="kernel")
    assert (np.sort(idx, axis=1) == np.arange(21)).all()
    assert np.isfinite(vals).all() and (np.diff(vals, axis=1) >= 0).all()
    np.testing.assert_array_equal(idx, ref[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_dejavu_knn_dispatches_through_the_switch(rng, monkeypatch, metric):
    queries = rng.standard_normal((10, 6)).astype(np.float32)
    public = rng.standard_normal((77, 6)).astype(np.float32)
    monkeypatch.setenv("MEMJAX_KERNELS", "reference")
    ref_v, ref_i = dejavu_knn(queries, public, 7, metric=metric, block_size=32)
    monkeypatch.setenv("MEMJAX_KERNELS", "kernel")
    calls = []
    real = kernels._knn.kernel
    monkeypatch.setattr(kernels._knn, "kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    out_v, out_i = dejavu_knn(queries, public, 7, metric=metric, block_size=32)
    assert calls, "MEMJAX_KERNELS=kernel did not reach the Pallas kernel"
    np.testing.assert_array_equal(out_i, ref_i)
    _close(out_v, ref_v)


# --------------------------------------------------------------------------- unit stats


@pytest.mark.parametrize(
    "n, units, block_u, block_n",
    [(300, 70, 32, 64), (64, 32, 32, 16), (5, 3, 128, 256)],  # ragged; even; one tile
)
def test_unit_stats_kernel_equals_reference(rng, n, units, block_u, block_n):
    mu = rng.standard_normal((n, units)).astype(np.float32)
    ref = kernels.unit_stats(mu, impl="reference")
    out = kernels.unit_stats(mu, impl="kernel", block_units=block_u, block_examples=block_n)
    for name in ("max", "min", "argmax"):
        np.testing.assert_array_equal(out[name], ref[name])
    _close(out["sum"], ref["sum"], atol=0)
    # The float64 host definition: max/min/argmax identical, sum to float32 rounding.
    host = batch_stats(mu, 0)
    np.testing.assert_array_equal(out["argmax"], host.argmax)
    np.testing.assert_array_equal(out["max"], host.max)
    _close(out["sum"], host.sum, rtol=1e-5, atol=1e-5 * np.abs(mu).sum(0).max())


def test_unit_stats_argmax_ties_take_the_first_example(rng):
    mu = rng.standard_normal((200, 40)).astype(np.float32)
    mu[[10, 12, 150], 0] = 9.0  # same tile (10, 12) and a later tile (150)
    mu[[130, 150], 1] = 9.0  # only in later tiles
    mu[:, 2] = 1.5  # constant: every example ties
    mu[:, 3] = -1e30  # very negative everywhere
    out = kernels.unit_stats(mu, impl="kernel", block_units=16, block_examples=32)
    np.testing.assert_array_equal(out["argmax"][:4], [10, 130, 0, 0])
    np.testing.assert_array_equal(out["argmax"], np.argmax(mu, axis=0))
    np.testing.assert_array_equal(out["min"], mu.min(0))


# --------------------------------------------------------------------------- dispatch


def test_switch_selects_kernel_or_reference(monkeypatch):
    monkeypatch.delenv("MEMJAX_KERNELS", raising=False)
    # auto follows the table, whatever rows it holds today: the kernel exactly where a
    # (backend, kernel) row says it was measured faster.
    names = ("token_stats", "knn", "unit_stats")
    for backend in ("cpu", "gpu", "tpu"):
        for name in names:
            want = "kernel" if kernels.MEASURED_FASTER.get((backend, name)) else "reference"
            assert kernels.resolve(name, backend=backend) == want, (backend, name)
    # On an empty table auto is the reference; a row counts only for its own backend and
    # kernel, and only when True.
    _dispatch = kernels._dispatch
    monkeypatch.setattr(_dispatch, "MEASURED_FASTER", {})
    assert [kernels.resolve(n) for n in names] == ["reference"] * 3
    monkeypatch.setitem(_dispatch.MEASURED_FASTER, ("tpu", "knn"), True)
    monkeypatch.setitem(_dispatch.MEASURED_FASTER, ("gpu", "unit_stats"), False)
    assert kernels.resolve("knn", backend="tpu") == "kernel"
    assert kernels.resolve("knn", backend="gpu") == "reference"
    assert kernels.resolve("token_stats", backend="tpu") == "reference"
    assert kernels.resolve("unit_stats", backend="gpu") == "reference"
    monkeypatch.setattr(_dispatch, "MEASURED_FASTER", kernels.MEASURED_FASTER)
    monkeypatch.setitem(kernels.MEASURED_FASTER, (jax.default_backend(), "knn"), True)
    assert kernels.resolve("knn") == "kernel"
    assert kernels.resolve("token_stats") == "reference"
    monkeypatch.setenv("MEMJAX_KERNELS", "reference")
    assert kernels.resolve("knn") == "reference"
    monkeypatch.setenv("MEMJAX_KERNELS", "Kernel")
    assert kernels.resolve("knn") == "kernel"
    assert kernels.resolve("knn", impl="reference") == "reference"  # explicit wins


def test_switch_routes_unit_stats(monkeypatch):
    calls = []
    real = kernels._unit_stats.kernel
    monkeypatch.setattr(kernels._unit_stats, "kernel",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    mu = np.arange(12, dtype=np.float32).reshape(4, 3)
    monkeypatch.setenv("MEMJAX_KERNELS", "reference")
    kernels.unit_stats(mu)
    assert not calls
    # auto on a backend with no measured row for unit_stats: the reference too.
    monkeypatch.setenv("MEMJAX_KERNELS", "auto")
    monkeypatch.delitem(kernels.MEASURED_FASTER, (jax.default_backend(), "unit_stats"),
                        raising=False)
    kernels.unit_stats(mu)
    assert not calls
    monkeypatch.setenv("MEMJAX_KERNELS", "kernel")
    np.testing.assert_array_equal(kernels.unit_stats(mu)["argmax"], [3, 3, 3])
    assert calls


def test_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MEMJAX_KERNELS", "fast")
    with pytest.raises(InputError, match=r"MEMJAX_KERNELS='fast'.*auto, kernel, reference"):
        dejavu_knn(np.ones((2, 2), np.float32), np.ones((3, 2), np.float32), 1)
    with pytest.raises(InputError, match="impl"):
        kernels.resolve("knn", impl="triton")


def test_bad_input_names_the_argument():
    ones = np.ones((4, 3), np.float32)
    with pytest.raises(InputError, match="metric"):
        dejavu_knn(ones, ones, 2, metric="l1")
    with pytest.raises(InputError, match="k=5"):
        dejavu_knn(ones, ones, 5)
    with pytest.raises(InputError, match="targets"):
        kernels.token_stats(ones, np.ones((3, 5), np.float32), np.zeros(3, int))
    with pytest.raises(InputError, match="unembedding"):
        kernels.token_stats(ones, np.ones((4, 5), np.float32), np.zeros(4, int))
    with pytest.raises(InputError, match="mu"):
        kernels.unit_stats(np.ones((4,), np.float32))
    with pytest.raises(InputError, match="hidden"):
        kernels.token_stats(np.ones((4, 3), int), np.ones((3, 5), np.float32),
                            np.zeros(4, int))
