"""``memjax.models.layers.attention``: the dense and the query-blocked paths, the structured
mask, the fused (``jax.nn.dot_product_attention``) mapping, and a causal LM scoring 8,192
tokens on CPU through ``signal_function(model, "tokens")``.

The reference is softmax attention in float64 NumPy (Vaswani et al. 2017), written from
the definition: a query attends to key k iff the mask allows it; a query with no allowed
key averages every value uniformly (what HF's additive minimum gives, and memjax keeps).

Tolerances:
- ``F64_TOL = 2e-6`` against float64: outputs are convex combinations of values of size
  ~1; float32 scores over Dh <= 16 and softmax sums over <= 64 keys round to a few 1e-7.
- ``BLOCK_TOL = 1e-6`` blocked vs dense, and across the LM at T = 1,024: every softmax row
  is the same row in both paths; only XLA's matmul blocking of a shorter query block may
  round differently (a few float32 ulps).
- ``FUSED_TOL = 1e-5`` ``jax.nn.dot_product_attention`` (XLA) vs ``attention``: the issue's
  bound for the fused path in float32.
- ``GRAD_TOL = 1e-5`` blocked vs dense gradients: a key's gradient sums ~37 query rows
  weighted by N(0, 1) cotangents, so its rounding is ~10x one output's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.convert import from_port
from memjax.models import layers
from memjax.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM
from memjax.models.layers import (
    AttentionMask,
    attention,
    attention_implementation,
    causal_mask,
    fused_attention,
    padding_mask,
)
from memjax.signals import signal_function

F64_TOL = 2e-6
BLOCK_TOL = 1e-6
FUSED_TOL = 1e-5
GRAD_TOL = 1e-5

B, T, H, DH = 3, 37, 4, 16
BLOCKS = (5, 16, 36)  # none divides T = 37; 36 leaves a last block of 1


def reference(q, k, v, allowed, scale, softcap=None):
    """float64 softmax attention; ``allowed`` [B, Tq, Tk] bool; q/k/v [B, T, H, Dh]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    allowed = np.broadcast_to(allowed[:, None], scores.shape)
    scores = np.where(allowed, scores, -np.inf)
    none = ~allowed.any(-1, keepdims=True)
    scores = np.where(none, 0.0, scores)  # a row with no allowed key averages every key
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def allowed_keys(key_mask, causal: bool, window: int | None, t: int) -> np.ndarray:
    """[B, T, T] bool from the definition, independently of ``AttentionMask.block``."""
    allowed = np.ones((key_mask.shape[0], t, t), bool) & key_mask[:, None, :].astype(bool)
    for qi in range(t):
        for ki in range(t):
            if causal and ki > qi:
                allowed[:, qi, ki] = False
            if window is not None and ki <= qi - window:
                allowed[:, qi, ki] = False
    return allowed


@pytest.fixture
def qkv(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, DH)).astype(np.float32) for _ in range(3))
    key_mask = np.ones((B, T), bool)
    key_mask[1, :5] = False  # left padding: queries 0..4 see no key under a causal mask
    key_mask[2, T - 6:] = False  # right padding
    return q, k, v, key_mask


CASES = {  # name -> (key padding?, causal, window, softcap)
    "full": (False, False, None, None),
    "padding": (True, False, None, None),
    "causal": (False, True, None, None),
    "causal_padding": (True, True, None, None),
    "sliding_window": (True, True, 6, None),
    "softcap": (True, True, None, 1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_equals_dense_equals_float64(qkv, case):
    q, k, v, key_mask = qkv
    padded, causal, window, softcap = CASES[case]
    keys = key_mask if padded else np.ones_like(key_mask)
    mask = AttentionMask(jnp.asarray(keys) if padded else None, causal=causal, window=window)
    scale = DH ** -0.5
    want = reference(q, k, v, allowed_keys(keys, causal, window, T), scale, softcap)
    dense = np.asarray(attention(q, k, v, mask, scale, softcap=softcap))
    np.testing.assert_allclose(dense, want, atol=F64_TOL, rtol=0)
    for block in BLOCKS:
        blocked = np.asarray(attention(q, k, v, mask, scale, softcap=softcap,
                                       block_size=block))
        np.testing.assert_allclose(blocked, dense, atol=BLOCK_TOL, rtol=0, err_msg=str(block))
        np.testing.assert_allclose(blocked, want, atol=F64_TOL, rtol=0, err_msg=str(block))


def test_dense_mask_arrays_match_the_structured_mask(qkv):
    """The ports' old masks (``causal_mask`` [B, 1, T, T], ``padding_mask`` [B, 1, 1, T],
    a shared [1, 1, T, T]) give bit-for-bit the structured mask's dense result, and block
    the same way."""
    q, k, v, key_mask = qkv
    scale = 0.3
    pairs = [(causal_mask(jnp.asarray(key_mask), T), AttentionMask(key_mask, causal=True)),
             (causal_mask(None, T), AttentionMask(causal=True)),
             (padding_mask(jnp.asarray(key_mask)), AttentionMask(key_mask))]
    for array, structured in pairs:
        want = np.asarray(attention(q, k, v, structured, scale))
        np.testing.assert_array_equal(np.asarray(attention(q, k, v, array, scale)), want)
        for block in BLOCKS:
            got = np.asarray(attention(q, k, v, array, scale, block_size=block))
            np.testing.assert_allclose(got, want, atol=BLOCK_TOL, rtol=0)


def test_grouped_query_heads(seed):
    """GQA: 2 K/V heads serving 6 query heads, repeated by the caller (as the Llama port
    does) or by ``attention``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 29, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 29, 2, 8)).astype(np.float32) for _ in range(2))
    k_rep, v_rep = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    allowed = allowed_keys(np.ones((2, 29), bool), True, None, 29)
    want = reference(q, k_rep, v_rep, allowed, 8 ** -0.5)
    mask = AttentionMask(causal=True)
    for block in (None, 4, 10):
        got = np.asarray(attention(q, k_rep, v_rep, mask, 8 ** -0.5, block_size=block))
        np.testing.assert_allclose(got, want, atol=F64_TOL, rtol=0)
        unrepeated = np.asarray(attention(q, k, v, mask, 8 ** -0.5, block_size=block))
        np.testing.assert_array_equal(unrepeated, got)
    # The fused call takes the 2 K/V heads unrepeated.
    fused = np.asarray(fused_attention(q, k, v, mask, 8 ** -0.5, implementation="xla"))
    np.testing.assert_allclose(fused, want, atol=FUSED_TOL, rtol=0)


@pytest.mark.parametrize("case", ["full", "causal", "causal_padding", "sliding_window"])
def test_fused_mapping_matches_attention(qkv, case):
    """``jax.nn.dot_product_attention``'s arguments (is_causal, local_window_size, mask)
    express the structured mask: its XLA implementation equals ``attention`` on every row
    that has a key to attend to."""
    q, k, v, key_mask = qkv
    padded, causal, window, _ = CASES[case]
    mask = AttentionMask(key_mask if padded else None, causal=causal, window=window)
    got = np.asarray(fused_attention(q, k, v, mask, 0.25, implementation="xla"))
    want = np.asarray(attention(q, k, v, mask, 0.25))
    keys = key_mask if padded else np.ones_like(key_mask)
    live = allowed_keys(keys, causal, window, T).any(-1)  # [B, T]
    np.testing.assert_allclose(got[live], want[live], atol=FUSED_TOL, rtol=0)


def test_implementation_choice():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention_implementation("cuda", bf16, 64, None, True) == "cudnn"
    assert attention_implementation("cuda", jnp.float16, 128, None, True) == "cudnn"
    assert attention_implementation("cpu", bf16, 64, None, True) == "xla"
    assert attention_implementation("tpu", bf16, 64, None, True) == "xla"
    assert attention_implementation("rocm", bf16, 64, None, True) == "xla"  # no cuDNN
    assert attention_implementation("cuda", f32, 64, None, True) == "xla"  # no fp32 kernel
    assert attention_implementation("cuda", bf16, 64, 50.0, True) == "xla"  # softcap
    assert attention_implementation("cuda", bf16, 64, None, False) == "xla"  # dense mask
    assert attention_implementation("cuda", bf16, 100, None, True) == "xla"  # Dh % 8
    assert attention_implementation("cuda", bf16, 256, None, True) == "xla"  # Dh > 128
    assert layers.current_backend() == jax.default_backend() == "cpu"


def test_block_size_from_budget():
    # 4 bytes x 32 heads x 8,192 keys = 1 MiB per query row.
    assert layers.query_block_size(1, 8192, 8192, 32, 64 * 2**20) == 64
    assert layers.query_block_size(1, 197, 197, 12, 64 * 2**20) == 197  # dense
    assert layers.query_block_size(4, 10, 10**9, 32, 1) == 1
    with pytest.raises(ValueError, match="implementation"):
        attention(*(jnp.ones((1, 4, 1, 2)),) * 3, None, 1.0, implementation="flash")


# -- a tiny causal LM at long context ------------------------------------------------------

LONG_T = 8192
MODERATE_T = 1024


@pytest.fixture(scope="module")
def tiny_lm():
    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=LONG_T, rotary_pct=1.0)
    model = from_port(GPTNeoXForCausalLM(config, rngs=nnx.Rngs(0)), config)
    fn, _ = signal_function(model, "tokens")
    return model, fn


def example(seed: int, length: int, pad: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones(length, np.int32)
    mask[length - pad:] = 0
    return {"input_ids": rng.integers(0, 64, length).astype(np.int32), "attention_mask": mask}


def test_lm_scores_8192_tokens_on_cpu_in_bounded_memory(tiny_lm, seed):
    """T = 8,192 goes the blocked path: XLA's plan for the whole signal function holds far
    less than the dense [H, T, T] float32 scores (512 MiB here) it would otherwise need."""
    model, fn = tiny_lm
    inputs = example(seed, LONG_T, pad=100)
    compiled = jax.jit(lambda p, e: fn(p, e)).lower(model.params, inputs).compile()
    dense_scores = 4 * 2 * LONG_T * LONG_T
    assert compiled.memory_analysis().temp_size_in_bytes < dense_scores / 2
    out = compiled(model.params, inputs)
    logp = np.asarray(out["logp"])
    scored = np.asarray(out["scored"]).astype(bool)
    assert logp.shape == (LONG_T,) and scored.sum() == LONG_T - 100 - 1
    assert np.isfinite(logp[scored]).all() and (logp[scored] < 0).all()


def test_lm_blocked_equals_dense_at_moderate_length(tiny_lm, seed, monkeypatch):
    model, fn = tiny_lm
    inputs = example(seed, MODERATE_T, pad=37)
    # 2 heads x 1,024 keys x 4 bytes: the default budget runs this dense (8 MiB of scores).
    assert layers.query_block_size(1, MODERATE_T, MODERATE_T, 2) == MODERATE_T
    dense = jax.jit(lambda p, e: fn(p, e))(model.params, inputs)
    monkeypatch.setattr(layers, "MAX_SCORE_BYTES", 4 * 2 * MODERATE_T * 100)  # 100 rows
    blocked = jax.jit(lambda p, e: fn(p, e))(model.params, inputs)
    scored = np.asarray(dense["scored"]).astype(bool)
    for field in ("logp", "mu", "sigma", "entropy"):
        np.testing.assert_allclose(np.asarray(blocked[field])[scored],
                                   np.asarray(dense[field])[scored],
                                   atol=BLOCK_TOL, rtol=BLOCK_TOL, err_msg=field)


def test_gradients_of_blocked_equal_dense(qkv):
    """Influence and memorization differentiate through the ports: the blocked path's
    ``lax.map`` / ``lax.switch`` give the dense path's gradients."""
    q, k, v, key_mask = qkv
    mask = AttentionMask(key_mask, causal=True, window=9)
    weights = np.random.default_rng(0).standard_normal((B, T, H, DH)).astype(np.float32)

    def loss(q, k, v, block):
        return jnp.sum(attention(q, k, v, mask, 0.25, block_size=block) * weights)

    dense = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    blocked = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, 5)
    for want, got in zip(dense, blocked, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=GRAD_TOL, rtol=0)
