"""Tests of memjax.signals against independent float64 NumPy references.

Inputs are fresh random draws each run; the seed is printed (shown on failure) and can be
pinned with MEMJAX_TEST_SEED=<int>.
"""

from __future__ import annotations

import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.errors import InputError
from memjax.kernels import chunk_stats, empty_stats, finalize_stats, merge_stats
from memjax.signals import check_labels, classification, contrastive, tokens

RTOL = 1e-5
ATOL = 1e-6  # values that are ~0 (confident losses, small entropies)
# hidden @ unembedding is a float32 matmul: the logits themselves carry ~1e-6 absolute
# rounding error relative to the float64 product, which bounds the agreement of
# near-zero outputs (mu, entropy of a peaked distribution).
ATOL_MATMUL = 1e-5
# bf16 weights: the float64 reference multiplies the same bf16 values exactly, while
# XLA accumulates the bf16 products in float32 in its own order; looser, bf16 only.
RTOL_BF16, ATOL_BF16 = 1e-4, 1e-4


@pytest.fixture
def rng():
    seed = int(os.environ.get("MEMJAX_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"MEMJAX_TEST_SEED={seed}")
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# float64 references (plain NumPy, no memjax code)
# --------------------------------------------------------------------------------------


def ref_logsumexp(z, axis=-1):
    z = np.asarray(z, np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def ref_classification(z, y):
    z = np.asarray(z, np.float64)
    logp = z - ref_logsumexp(z)
    p = np.exp(logp)
    others = np.delete(z, y)
    return {
        "loss": -logp[y],
        "p_true": p[y],
        "phi": z[y] - ref_logsumexp(others),
        "hinge": z[y] - others.max(),
        "entropy": -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0)),
        "correct": np.argmax(z) == y,
    }


def ref_tokens(z, targets, mask=None):
    """z [T, V] float64 logits."""
    z = np.asarray(z, np.float64)
    lse = ref_logsumexp(z)
    logp_all = z - lse[:, None]
    p = np.exp(logp_all)
    live = p > 0
    lp = np.where(live, logp_all, 0.0)
    mu = np.sum(p * lp, axis=1)
    sigma = np.sqrt(np.sum(np.where(live, p * (lp - mu[:, None]) ** 2, 0.0), axis=1))
    logp = logp_all[np.arange(len(targets)), targets]
    mask = np.ones(len(targets), bool) if mask is None else np.asarray(mask, bool)
    n = mask.sum()
    return {
        "logp": logp,
        "mu": mu,
        "sigma": sigma,
        "entropy": -mu,
        "lse": lse,
        "mean_loss": -logp[mask].sum() / n if n else 0.0,
        "n_tokens": float(n),
    }


def ref_cosine(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 0.0
    return x @ y / (nx * ny)


def batched_ref(fn, *args, **kwargs):
    """Stack a per-example reference over the leading axis of every argument."""
    n = len(args[0]) if args else len(next(iter(kwargs.values())))
    outs = [
        fn(*(a[i] for a in args), **{k: v[i] for k, v in kwargs.items()}) for i in range(n)
    ]
    return {k: np.stack([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def assert_fields(out, ref, rtol=RTOL, atol=ATOL, fields=None):
    for key in fields or ref:
        actual = np.asarray(out[key])
        if np.asarray(ref[key]).dtype == bool:
            assert actual.dtype == np.bool_, key
            np.testing.assert_array_equal(actual, ref[key], err_msg=key)
        else:
            assert actual.dtype == np.float32, (key, actual.dtype)
            np.testing.assert_allclose(actual, ref[key], rtol=rtol, atol=atol, err_msg=key)


def assert_finite(out):
    for key, value in out.items():
        assert np.all(np.isfinite(np.asarray(value, np.float64))), key


def vjit(fn):
    """Batch with vmap and compile once (op-by-op eager dispatch is slow to test)."""
    return jax.jit(jax.vmap(fn))


def to_bf16(x):
    """Round to bf16; return the bf16 array and its exact float64 values."""
    b = jnp.asarray(x, jnp.bfloat16)
    return b, np.asarray(b.astype(jnp.float32), np.float64)


# --------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,num_classes,scale", [(16, 2, 1.0), (8, 10, 3.0), (4, 1000, 5.0)])
def test_classification_matches_float64(rng, batch, num_classes, scale):
    logits = (scale * rng.standard_normal((batch, num_classes))).astype(np.float32)
    labels = rng.integers(0, num_classes, batch)
    # make sure both correct and wrong predictions occur
    labels[0] = np.argmax(logits[0])
    out = vjit(classification)(logits, labels)
    assert set(out) == {"loss", "p_true", "phi", "hinge", "entropy", "correct"}
    assert_fields(out, batched_ref(ref_classification, logits, labels))


def extreme_logits(rng, n, num_classes):
    rows = []
    # +-1e4 with random signs
    rows.append(rng.choice([-1e4, 1e4], num_classes))
    # huge near-ties plus tiny ones: softmax among the ~1e4 entries is non-trivial
    near = 1e4 + rng.standard_normal(num_classes)
    rows.append(np.where(rng.random(num_classes) < 0.5, near, -1e4))
    # one-hot-like
    row = np.zeros(num_classes)
    row[rng.integers(num_classes)] = 1e4
    rows.append(row)
    row = np.full(num_classes, -1e4)
    row[rng.integers(num_classes)] = 1e4
    rows.append(row)
    # mixture of huge and tiny magnitudes
    rows.append(rng.choice([-1e4, -30.0, 0.0, 1e-6, 25.0, 1e4], num_classes))
    while len(rows) < n:
        rows.append(rng.choice([-1e4, 1e4], num_classes) + rng.standard_normal(num_classes))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("num_classes", [2, 7, 100])
def test_classification_extreme_logits(rng, num_classes):
    logits = extreme_logits(rng, 8, num_classes)
    n = len(logits)
    labels = rng.integers(0, num_classes, n)
    # label on the max, and on a non-max class when there is a clear max
    labels[:n // 2] = np.argmax(logits[:n // 2], axis=1)
    out = vjit(classification)(logits, labels)
    assert_finite(out)
    assert_fields(out, batched_ref(ref_classification, logits, labels))


def test_classification_hand_values():
    fn = jax.jit(classification)
    out = fn(jnp.array([2.0, 0.0, -1.0]), 0)
    z = np.array([2.0, 0.0, -1.0])
    p = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(out["p_true"], p[0], rtol=1e-6)
    np.testing.assert_allclose(out["phi"], np.log(p[0] / (1 - p[0])), rtol=1e-6)
    np.testing.assert_allclose(out["hinge"], 2.0)
    assert bool(out["correct"])
    # phi stays finite (and exact) where p_true rounds to 1 in float32
    out = fn(jnp.array([1e4, -1e4], jnp.float32), 0)
    assert float(out["p_true"]) == 1.0 and float(out["phi"]) == 2e4


def test_classification_low_precision_inputs_compute_in_float32(rng):
    for dtype in (jnp.bfloat16, jnp.float16):
        logits = jnp.asarray(3 * rng.standard_normal((4, 50)), dtype)
        labels = rng.integers(0, 50, 4)
        out = vjit(classification)(logits, labels)
        exact = np.asarray(logits.astype(jnp.float32), np.float64)
        assert_fields(out, batched_ref(ref_classification, exact, labels))


def test_classification_out_of_range_label_is_nan_not_wrapped():
    logits = jnp.array([3.0, 1.0, 0.5])
    for label in (-1, 3):
        out = jax.jit(classification)(logits, label)
        for key in ("loss", "p_true", "phi", "hinge"):
            assert np.isnan(out[key]), (label, key)
        assert not bool(out["correct"])
        assert np.isfinite(out["entropy"])


def test_classification_bad_input():
    with pytest.raises(InputError, match="logits.*1-D"):
        classification(jnp.zeros((2, 3)), 0)
    with pytest.raises(InputError, match="logits.*at least 2 classes"):
        classification(jnp.zeros((1,)), 0)
    with pytest.raises(InputError, match="logits.*floating"):
        classification(jnp.zeros((3,), jnp.int32), 0)
    with pytest.raises(InputError, match="label.*scalar"):
        classification(jnp.zeros((3,)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(InputError, match="label.*integer"):
        classification(jnp.zeros((3,)), 1.0)
    # raised at trace time under vmap + jit too
    with pytest.raises(InputError, match="logits"):
        vjit(classification)(jnp.zeros((4, 1)), jnp.zeros((4,), jnp.int32))


def test_check_labels():
    check_labels(np.array([0, 9, 3]), 10)
    check_labels(np.array([[0, 1], [2, 1]], np.uint8), 3)
    with pytest.raises(InputError, match=r"label at index 3 is 10, expected .*\[0, 10\)"):
        check_labels(np.array([0, 1, 2, 10, 11]), 10)
    with pytest.raises(InputError, match=r"y at index 1 is -1, expected .*\[0, 5\)"):
        check_labels(np.array([0, -1, 7]), 5, name="y")
    with pytest.raises(InputError, match=r"label at index \(1, 0\) is 4"):
        check_labels(np.array([[0, 1], [4, 2]]), 3)
    with pytest.raises(InputError, match="label.*integer dtype.*float"):
        check_labels(np.array([0.0, 1.0]), 3)
    with pytest.raises(InputError, match="label.*integer dtype.*bool"):
        check_labels(np.array([True, False]), 3)


# --------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------

TOKEN_FIELDS = ("logp", "mu", "sigma", "entropy", "lse", "mean_loss", "n_tokens")


def random_mask(rng, batch, length):
    mask = rng.random((batch, length)) < 0.7
    mask[0] = False  # an all-false row
    mask[-1] = True
    return mask


@pytest.mark.parametrize("chunk_size", [None, 7, 64])
@pytest.mark.parametrize("batch,length,vocab,scale", [(3, 5, 2, 1.0), (4, 9, 100, 4.0)])
def test_tokens_logits_match_float64(rng, batch, length, vocab, scale, chunk_size):
    logits = (scale * rng.standard_normal((batch, length, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length))
    mask = random_mask(rng, batch, length)
    fn = vjit(partial(tokens, chunk_size=chunk_size))
    out = fn(logits, targets=targets, mask=mask)
    assert set(out) == set(TOKEN_FIELDS)
    assert out["logp"].shape == (batch, length) and out["mean_loss"].shape == (batch,)
    assert_fields(out, batched_ref(ref_tokens, logits, targets, mask))
    np.testing.assert_array_equal(out["entropy"], -out["mu"])
    assert float(out["mean_loss"][0]) == 0.0 and float(out["n_tokens"][0]) == 0.0


@pytest.mark.parametrize("chunk_size", [None, 16, 50])
def test_tokens_extreme_logits(rng, chunk_size):
    batch, length, vocab = 2, 8, 50
    logits = np.stack(
        [extreme_logits(rng, length, vocab) for _ in range(batch)]
    )  # [B, T, V]
    targets = rng.integers(0, vocab, (batch, length))
    targets[:, ::2] = np.argmax(logits[:, ::2], axis=-1)
    out = vjit(partial(tokens, chunk_size=chunk_size))(logits, targets=targets)
    assert_finite(out)
    assert_fields(out, batched_ref(ref_tokens, logits, targets))


def test_tokens_chunk_far_below_max(rng):
    # A whole chunk ~80 below a peaked one: its weight e^-80 is tiny but not 0 in float32.
    # The merged mean must not add and subtract the far chunk's offset (ulp(80) ~ 8e-6,
    # while mu ~ -1e-4 here).
    length, vocab = 8, 48
    logits = -80 + 0.5 * rng.standard_normal((1, length, vocab))
    logits[..., 16:32] = -12 + rng.standard_normal((1, length, 16))
    logits[0, np.arange(length), 16 + rng.integers(16, size=length)] = 0.0
    logits = logits.astype(np.float32)
    targets = rng.integers(0, vocab, (1, length))
    for chunk_size in (None, 16):
        out = vjit(partial(tokens, chunk_size=chunk_size))(logits, targets=targets)
        assert_fields(out, batched_ref(ref_tokens, logits, targets))


@pytest.mark.parametrize("chunk_size", [None, 5, 8])
def test_tokens_neg_inf_logits(rng, chunk_size):
    # -inf logits (masked-out vocabulary), including whole chunks of them, are weightless
    length, vocab = 6, 40
    logits = rng.standard_normal((1, length, vocab)).astype(np.float32)
    logits[..., 30:] = -np.inf  # chunks [30:35] and [35:40] (size 5) are all -inf
    logits[..., 3] = -np.inf
    targets = rng.integers(4, 30, (1, length))
    out = vjit(partial(tokens, chunk_size=chunk_size))(logits, targets=targets)
    assert_finite(out)
    assert_fields(out, batched_ref(ref_tokens, logits, targets))


def test_tokens_mu_sigma_definition(rng):
    # mu, sigma against the direct definition under p, on a tiny hand-checkable vocabulary
    z = np.array([[2.0, 0.5, -1.0, 0.0]], np.float32)
    out = jax.jit(tokens)(jnp.asarray(z), targets=jnp.array([1]))
    p = np.exp(z[0].astype(np.float64))
    p /= p.sum()
    lp = np.log(p)
    mu = (p * lp).sum()
    np.testing.assert_allclose(out["mu"][0], mu, rtol=RTOL)
    np.testing.assert_allclose(out["sigma"][0], np.sqrt((p * (lp - mu) ** 2).sum()), rtol=RTOL)
    np.testing.assert_allclose(out["entropy"][0], -(p * lp).sum(), rtol=RTOL)
    np.testing.assert_allclose(out["logp"][0], lp[1], rtol=RTOL)
    # uniform: sigma 0, entropy log V
    out = jax.jit(partial(tokens, chunk_size=3))(jnp.zeros((2, 8)), targets=jnp.array([0, 3]))
    np.testing.assert_allclose(out["sigma"], 0.0, atol=ATOL)
    np.testing.assert_allclose(out["entropy"], np.log(8), rtol=RTOL)


def test_tokens_chunked_equals_unchunked_logits(rng):
    batch, length = 2, 6
    for vocab, chunks in ((37, (5, 37, 64)), (1000, (300, 999))):
        logits = (3 * rng.standard_normal((batch, length, vocab))).astype(np.float32)
        targets = rng.integers(0, vocab, (batch, length))
        mask = random_mask(rng, batch, length)
        ref = vjit(tokens)(logits, targets=targets, mask=mask)
        for chunk_size in chunks:
            out = vjit(partial(tokens, chunk_size=chunk_size))(
                logits, targets=targets, mask=mask
            )
            assert_fields(out, ref, fields=TOKEN_FIELDS)


def hidden_inputs(rng, batch, length, dim, vocab, dtype=np.float32):
    # logits of std ~2: a spread of peaked and flat next-token distributions
    hidden = (rng.standard_normal((batch, length, dim)) * 2 / np.sqrt(dim)).astype(dtype)
    weight = rng.standard_normal((dim, vocab)).astype(dtype)
    bias = rng.standard_normal(vocab).astype(dtype)
    targets = rng.integers(0, vocab, (batch, length))
    return hidden, weight, bias, targets


@pytest.mark.parametrize("use_bias", [False, True])
def test_tokens_hidden_form(rng, use_bias):
    batch, length, dim, vocab = 3, 7, 16, 300
    hidden, weight, bias, targets = hidden_inputs(rng, batch, length, dim, vocab)
    mask = random_mask(rng, batch, length)
    bias = bias if use_bias else None
    z = np.einsum("btd,dv->btv", hidden.astype(np.float64), weight.astype(np.float64))
    if use_bias:
        z = z + bias.astype(np.float64)
    ref = batched_ref(ref_tokens, z, targets, mask)

    def run(chunk_size):
        # the unembedding is shared by the batch (closed over, not vmapped)
        fn = partial(tokens, unembedding=weight, bias=bias, chunk_size=chunk_size)
        return vjit(lambda h, t, m: fn(hidden=h, targets=t, mask=m))(hidden, targets, mask)

    full = run(None)
    assert_fields(full, ref, atol=ATOL_MATMUL)
    for chunk_size in (128, 512):
        out = run(chunk_size)
        assert_fields(out, ref, atol=ATOL_MATMUL)
        assert_fields(out, full, fields=TOKEN_FIELDS, atol=ATOL_MATMUL / 10)


def test_tokens_bf16_hidden_form(rng):
    batch, length, dim, vocab = 2, 6, 32, 257
    hidden, weight, bias, targets = hidden_inputs(rng, batch, length, dim, vocab)
    hidden, hidden64 = to_bf16(hidden)
    weight, weight64 = to_bf16(weight)
    bias, bias64 = to_bf16(bias)
    z = np.einsum("btd,dv->btv", hidden64, weight64) + bias64
    ref = batched_ref(ref_tokens, z, targets)
    # vmap over everything: each example has its own unembedding and bias
    stack = lambda x: jnp.broadcast_to(x, (batch, *x.shape))
    outs = {
        c: vjit(partial(tokens, chunk_size=c))(
            hidden=hidden, unembedding=stack(weight), bias=stack(bias), targets=targets
        )
        for c in (None, 50)
    }
    for out in outs.values():
        assert_fields(out, ref, rtol=RTOL_BF16, atol=ATOL_BF16)
    assert_fields(outs[50], outs[None], fields=TOKEN_FIELDS, atol=ATOL_MATMUL / 10)


def test_tokens_bf16_logits(rng):
    logits, exact = to_bf16(3 * rng.standard_normal((2, 5, 90)))
    targets = rng.integers(0, 90, (2, 5))
    ref = batched_ref(ref_tokens, exact, targets)
    for chunk_size in (None, 16):
        out = vjit(partial(tokens, chunk_size=chunk_size))(logits, targets=targets)
        assert_fields(out, ref)  # exact inputs: float32 tolerance


def test_tokens_mask_and_bad_targets(rng):
    length, vocab = 6, 20
    logits = rng.standard_normal((length, vocab)).astype(np.float32)
    targets = np.array([1, 2, -100, 3, 20, 4])
    mask = np.array([True, True, False, True, False, True])
    ref = ref_tokens(logits, np.where(mask, targets, 0), mask)
    for chunk_size in (None, 7):
        run = jax.jit(partial(tokens, chunk_size=chunk_size))
        out = run(logits, targets=targets, mask=mask)
        # out-of-range targets give NaN (not a wrapped/clamped token) ...
        assert np.isnan(out["logp"][2]) and np.isnan(out["logp"][4])
        # ... and masked positions never reach mean_loss
        np.testing.assert_allclose(out["mean_loss"], ref["mean_loss"], rtol=RTOL)
        assert float(out["n_tokens"]) == 4.0
        # 0/1 integer masks are accepted
        out_int = run(logits, targets=targets, mask=mask.astype(np.int32))
        np.testing.assert_array_equal(out_int["mean_loss"], out["mean_loss"])
        # no mask: all positions
        out_all = run(logits, targets=np.where(mask, targets, 0))
        assert float(out_all["n_tokens"]) == length
        none = run(logits, targets=targets, mask=np.zeros(length, bool))
        assert float(none["mean_loss"]) == 0.0 and float(none["n_tokens"]) == 0.0


def test_stats_merge_any_partition(rng):
    """merge_stats over any split of the columns (empty and all -inf parts too) is exact."""
    vocab = 60
    z = (4 * rng.standard_normal((3, vocab))).astype(np.float32)
    z[2, :20] = -np.inf
    ref = {
        "lse": ref_logsumexp(z),
        "mu": ref_tokens(z, np.zeros(3, int))["mu"],
        "sigma": ref_tokens(z, np.zeros(3, int))["sigma"],
    }
    cuts = rng.choice(np.arange(1, vocab), 5, replace=False)
    # [0:0] is an empty part; [10:20] is all -inf in row 2
    parts = np.split(np.arange(vocab), sorted({0, 10, 20, *cuts.tolist()}))
    merge, stats_of = jax.jit(merge_stats), jax.jit(chunk_stats)
    stats = empty_stats((3,))
    for part in rng.permutation(len(parts)):
        cols = parts[part]
        if len(cols):
            stats = merge(stats, stats_of(jnp.asarray(z[:, cols])))
        else:
            stats = merge(stats, empty_stats((3,)))
    lse, mu, sigma = finalize_stats(stats)
    assert_fields({"lse": lse, "mu": mu, "sigma": sigma}, ref)


def test_tokens_chunked_memory():
    """The chunked path never materialises a float32 [B, T, V] tensor.

    Measured with XLA's buffer assignment of the compiled program: temp memory of the
    chunked path is a fraction of one [B, T, V] float32 buffer, does not grow with V, and
    its HLO has no buffer of that shape; the unchunked path exceeds one such buffer. The
    unembedding is given as the ports give it, the transpose of a stored [V, D] matrix
    (the chunks are row slices of that matrix); a [D, V] array stored as such costs one
    transposed copy of it (D x V, not T x V) on top.
    """
    batch, length, dim, chunk = 2, 64, 32, 512

    def compiled(vocab, chunk_size, stored_as_rows=True):
        def fn(hidden, weight, targets):
            unembedding = jnp.swapaxes(weight, 1, 2) if stored_as_rows else weight
            return vjit(partial(tokens, chunk_size=chunk_size))(
                hidden=hidden, unembedding=unembedding, targets=targets)

        shape = (batch, vocab, dim) if stored_as_rows else (batch, dim, vocab)
        return jax.jit(fn).lower(jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
                                 jax.ShapeDtypeStruct(shape, jnp.float32),
                                 jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()

    def temp(c):
        stats = c.memory_analysis()
        assert stats is not None, "memory_analysis unavailable on this backend"
        return stats.temp_size_in_bytes

    vocab = 5000
    full_bytes = batch * length * vocab * 4
    big = re.compile(rf"f32\[{batch},{length},{vocab}\]")
    chunked, unchunked = compiled(vocab, chunk), compiled(vocab, None)
    assert temp(unchunked) >= full_bytes
    assert big.search(unchunked.as_text())
    # z, exp weights and offsets of one [B, T, chunk] chunk + the [B, chunk, D] weight slice
    assert temp(chunked) < full_bytes / 2, temp(chunked) / full_bytes
    assert not big.search(chunked.as_text())
    # 4x the vocabulary: unchunked temp grows ~4x, chunked temp stays put
    assert temp(compiled(4 * vocab, None)) > 3.5 * temp(unchunked)
    assert temp(compiled(4 * vocab, chunk)) < 1.1 * temp(chunked)
    # A [D, V] array stored as such: one transposed copy of it, still no [B, T, V].
    weight_bytes = batch * dim * vocab * 4
    columns = compiled(vocab, chunk, stored_as_rows=False)
    assert temp(columns) < full_bytes / 2 + weight_bytes, temp(columns) / full_bytes
    assert not big.search(columns.as_text())


def test_tokens_bad_input():
    t = jnp.zeros((4,), jnp.int32)
    h, w = jnp.zeros((4, 8)), jnp.zeros((8, 10))
    z = jnp.zeros((4, 10))
    cases = [
        (dict(logits=z, hidden=h, unembedding=w), "not both.*hidden"),
        (dict(logits=z, bias=jnp.zeros(10)), "not both.*bias"),
        (dict(), "either logits"),
        (dict(hidden=h), "unembedding.*missing"),
        (dict(unembedding=w), "hidden.*missing"),
        (dict(hidden=h, unembedding=jnp.zeros((7, 10))), "unembedding's first dim.*D=8"),
        (dict(hidden=h[None], unembedding=w), "hidden must be 2-D"),
        (dict(hidden=h, unembedding=w, bias=jnp.zeros(9)), "bias must have shape"),
        (dict(logits=z[0]), "logits must be 2-D"),
        (dict(logits=z[:3]), "logits has 3 positions but targets has 4"),
        (dict(hidden=h[:3], unembedding=w), "hidden has 3 positions"),
        (dict(logits=z.astype(jnp.int32)), "logits must have a floating dtype"),
        (dict(logits=z[:, :1]), "at least 2"),
        (dict(logits=z, mask=jnp.ones(3, bool)), "mask must have shape"),
        (dict(logits=z, mask=jnp.ones(4)), "mask must be bool"),
        (dict(logits=z, chunk_size=0), "chunk_size"),
        (dict(logits=z, chunk_size=2.5), "chunk_size"),
        (dict(logits=z, chunk_size=True), "chunk_size"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            tokens(targets=t, **kwargs)
    with pytest.raises(InputError, match="targets must be 1-D"):
        tokens(z, targets=t[None])
    with pytest.raises(InputError, match="targets must have an integer dtype"):
        tokens(z, targets=jnp.zeros(4))


# --------------------------------------------------------------------------------------
# contrastive
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 512])
def test_contrastive_matches_float64(rng, dim):
    image = rng.standard_normal((6, dim)).astype(np.float32)
    text = rng.standard_normal((6, dim)).astype(np.float32)
    text[1] = 2.5 * image[1]  # cosine 1
    text[2] = -image[2]  # cosine -1
    out = vjit(contrastive)(image, text)
    ref = {"cosine": np.array([ref_cosine(a, b) for a, b in zip(image, text, strict=True)])}
    assert_fields(out, ref)
    assert np.all(np.abs(out["cosine"]) <= 1.0)


def test_contrastive_zero_and_low_precision(rng):
    out = contrastive(jnp.zeros(8), jnp.ones(8))
    assert float(out["cosine"]) == 0.0
    out = contrastive(jnp.zeros(8), jnp.zeros(8))
    assert float(out["cosine"]) == 0.0
    for dtype in (jnp.bfloat16, jnp.float16):
        a, b = (jnp.asarray(rng.standard_normal(64), dtype) for _ in range(2))
        out = contrastive(a, b)
        assert out["cosine"].dtype == jnp.float32
        exact = [np.asarray(x.astype(jnp.float32), np.float64) for x in (a, b)]
        np.testing.assert_allclose(out["cosine"], ref_cosine(*exact), rtol=RTOL, atol=ATOL)


def test_contrastive_bad_input():
    with pytest.raises(InputError, match="image_emb and text_emb must have the same size D"):
        contrastive(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(InputError, match="image_emb must be 1-D"):
        contrastive(jnp.zeros((2, 3)), jnp.zeros(3))
    with pytest.raises(InputError, match="text_emb must have a floating dtype"):
        contrastive(jnp.zeros(3), jnp.zeros(3, jnp.int32))


def test_signals_are_exported_by_name():
    """Each signal is public under its own name (no registry: callers import them)."""
    import memjax.signals as signals
    from memjax.signals import _classification, _contrastive, _tokens

    assert {"causal_lm_tokens", "classification", "contrastive", "tokens"} <= set(
        signals.__all__)
    assert (signals.classification, signals.tokens, signals.contrastive) == (
        _classification.classification, _tokens.tokens, _contrastive.contrastive)
    assert (classification, tokens, contrastive) == (
        signals.classification, signals.tokens, signals.contrastive)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_causal_lm_tokens_scores_the_next_real_token(rng, chunk_size):
    """Position t is scored with target ids[t + 1] when both are real tokens; the signals
    equal a float64 log-softmax of hidden @ W at those positions."""
    from memjax.signals import causal_lm_tokens

    length, dim, vocab = 9, 5, 23
    hidden = rng.standard_normal((length, dim)).astype(np.float32)
    weight = rng.standard_normal((dim, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, length)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0])  # 6 real tokens, right-padded
    out = causal_lm_tokens(jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(ids),
                           jnp.asarray(mask), chunk_size=chunk_size)
    scored = np.array([True] * 5 + [False] * 4)  # the 6th real token has no real target
    np.testing.assert_array_equal(out["scored"], scored)
    z = hidden.astype(np.float64) @ weight.astype(np.float64)
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - z.max(1, keepdims=True)
    want = log_p[np.arange(length - 1), ids[1:]]
    np.testing.assert_allclose(out["logp"][:length - 1], want, rtol=RTOL, atol=ATOL_MATMUL)
    assert float(out["n_tokens"]) == 5
    np.testing.assert_allclose(float(out["mean_loss"]), -want[scored[:-1]].mean(),
                               rtol=RTOL, atol=ATOL_MATMUL)
