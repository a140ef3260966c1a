"""Fused per-token vocabulary statistics: ``hidden @ W + b`` reduced tile by tile.

From final hidden states [N, D], the unembedding [D, V] (optional bias [V]) and target ids
[N], the kernel produces the softmax statistics of every row over the whole vocabulary
(:class:`memjax.signals._tokens.VocabStats`: running max, rescaled partition sum, mean and
M2) and the target logit, without ever holding more than one [block_rows, block_vocab]
tile of logits. ``finalize_stats`` turns them into logsumexp, mu_t = E_p[log p] and
sigma_t = std_p[log p] (Min-K%++) and log p(target).

The reference that defines it is :func:`memjax.signals._tokens.streamed_hidden_stats` (an
XLA ``lax.scan`` over vocabulary chunks). Both use the same per-tile statistics
(``chunk_stats``) and the same numerically careful merge (``merge_stats``), imported from
there, so the kernel differs from the reference only in tile boundaries and in the
accumulation order of the matmul.

Grid: (row tiles, vocab tiles). The vocab axis is the reduction ("arbitrary" /
"sequential") axis: the output blocks keep the same block index along it, so they stay
resident and carry the running state from one vocab tile to the next. Ragged V (50,257 is
a multiple of no tile) is handled by masking the last tile's out-of-range columns to
-inf, which ``chunk_stats`` counts as zero probability; ragged rows by zero-padding the
hidden states and slicing the padded rows off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.signals._tokens import (
    VocabStats,
    chunk_stats,
    merge_stats,
    streamed_hidden_stats,
)

from ._dispatch import cdiv, compiler_params

_F32 = jnp.float32

# Interpret-mode defaults (CPU tests). GPU tiles are pending measurement: with D = 768 a
# [D, 128] bf16 slice of W is 192 KiB, so a tuned Mosaic GPU version will likely split D.
BLOCK_ROWS = 64
BLOCK_VOCAB = 512


def reference(hidden: jax.Array, unembedding: jax.Array, bias: jax.Array | None,
              index: jax.Array, *, chunk_size: int) -> tuple[VocabStats, jax.Array]:
    """The XLA reference: ``streamed_hidden_stats`` (lax.scan over vocab chunks).

    Args:
        hidden: [N, D]; unembedding: [D, V]; bias: [V] or None; index: [N] int32 in [0, V]
        (V marks an out-of-range target: NaN target logit).

    Returns:
        (VocabStats [N], target logit [N] float32).
    """
    return streamed_hidden_stats(hidden, unembedding, bias, index, chunk_size)


def _kernel(*refs, vocab: int, block_vocab: int, has_bias: bool):
    if has_bias:
        h_ref, w_ref, b_ref, t_ref, m_ref, s_ref, mean_ref, m2_ref, tl_ref = refs
    else:
        h_ref, w_ref, t_ref, m_ref, s_ref, mean_ref, m2_ref, tl_ref = refs
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, _F32)
        s_ref[...] = jnp.zeros(s_ref.shape, _F32)
        mean_ref[...] = jnp.zeros(mean_ref.shape, _F32)
        m2_ref[...] = jnp.zeros(m2_ref.shape, _F32)
        tl_ref[...] = jnp.zeros(tl_ref.shape, _F32)

    z = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=_F32)  # [rows, block_vocab]
    if has_bias:
        z = z + b_ref[...].astype(_F32)[None, :]
    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    # Columns past V read undefined memory (the last tile overhangs): -inf = probability 0.
    z = jnp.where(cols < vocab, z, -jnp.inf)
    # Exactly one tile holds each in-range target; the others add 0 (never 0 * NaN).
    tl_ref[...] += jnp.sum(jnp.where(cols == t_ref[...][:, None], z, 0.0), axis=1)
    state = VocabStats(m_ref[...], s_ref[...], mean_ref[...], m2_ref[...])
    new = merge_stats(state, chunk_stats(z))
    m_ref[...] = new.m
    s_ref[...] = new.w
    mean_ref[...] = new.mean
    m2_ref[...] = new.m2


def kernel(hidden: jax.Array, unembedding: jax.Array, bias: jax.Array | None,
           index: jax.Array, *, block_rows: int = BLOCK_ROWS,
           block_vocab: int = BLOCK_VOCAB, interpret: bool = False
           ) -> tuple[VocabStats, jax.Array]:
    """The Pallas kernel; same contract as :func:`reference`.

    Args:
        hidden: [N, D]; unembedding: [D, V]; bias: [V] or None; index: [N] int32 in [0, V].
        block_rows, block_vocab: tile sizes (clamped to N and V).
        interpret: run in Pallas interpret mode (CPU).
    """
    n, dim = hidden.shape
    vocab = unembedding.shape[1]
    rows = min(block_rows, n)
    cols = min(block_vocab, vocab)
    n_pad = cdiv(n, rows) * rows
    # Zero rows are harmless (finite logits) and sliced off; index V matches no column.
    hidden = jnp.pad(hidden, ((0, n_pad - n), (0, 0)))
    index = jnp.pad(index.astype(jnp.int32), (0, n_pad - n), constant_values=vocab)
    grid = (n_pad // rows, cdiv(vocab, cols))
    row_spec = pl.BlockSpec((rows,), lambda i, j: (i,))
    in_specs = [pl.BlockSpec((rows, dim), lambda i, j: (i, 0)),
                pl.BlockSpec((dim, cols), lambda i, j: (0, j))]
    args = [hidden, unembedding]
    if bias is not None:
        in_specs.append(pl.BlockSpec((cols,), lambda i, j: (j,)))
        args.append(bias)
    in_specs.append(row_spec)
    args.append(index)
    out = jax.ShapeDtypeStruct((n_pad,), _F32)
    body = functools.partial(_kernel, vocab=vocab, block_vocab=cols,
                             has_bias=bias is not None)
    m, w, mean, m2, target = pl.pallas_call(
        body,
        out_shape=(out,) * 5,
        grid=grid,
        in_specs=in_specs,
        out_specs=(row_spec,) * 5,
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(),
        name="memjax_token_stats",
    )(*args)
    target = jnp.where(index < vocab, target, jnp.nan)  # out-of-range target: NaN, as XLA
    return VocabStats(m[:n], w[:n], mean[:n], m2[:n]), target[:n]
