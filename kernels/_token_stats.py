"""Fused per-token vocabulary statistics: ``hidden @ W + b`` reduced tile by tile.

From final hidden states [N, D], the unembedding [D, V] (optional bias [V]) and target ids
[N], the kernel produces the softmax statistics of every row over the whole vocabulary
(:class:`VocabStats`: running max, rescaled partition sum, mean and
M2) and the target logit, without ever holding more than one [block_rows, block_vocab]
tile of logits. ``finalize_stats`` turns them into logsumexp, mu_t = E_p[log p] and
sigma_t = std_p[log p] (Min-K%++) and log p(target).

The reference that defines it is :func:`streamed_hidden_stats` (an XLA ``lax.scan`` over
vocabulary chunks; ``memjax.signals.tokens`` streams through it). Both use the same
per-tile statistics (:func:`chunk_stats`) and the same numerically careful merge
(:func:`merge_stats`), so the kernel differs from the reference only in tile boundaries
and in the accumulation order of the matmul.

Grid: (row tiles, vocab tiles). The vocab axis is the reduction ("arbitrary" /
"sequential") axis: the output blocks keep the same block index along it, so they stay
resident and carry the running state from one vocab tile to the next. Ragged V (50,257 is
a multiple of no tile) is handled by masking the last tile's out-of-range columns to
-inf, which ``chunk_stats`` counts as zero probability; ragged rows by zero-padding the
hidden states and slicing the padded rows off.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._dispatch import cdiv, compiler_params

_F32 = jnp.float32
_FLOOR = -1e18

# Interpret-mode defaults (CPU tests). GPU tiles are pending measurement: with D = 768 a
# [D, 128] bf16 slice of W is 192 KiB, so a tuned Mosaic GPU version will likely split D.
BLOCK_ROWS = 64
BLOCK_VOCAB = 512


# --------------------------------------------------------------------------- XLA reference


class VocabStats(NamedTuple):
    """Softmax statistics of a set of vocabulary columns, one value per position.

    With ``e_v = exp(z_v - m)`` over the columns v in the set:

    Attributes:
        m: max logit (``-inf`` for an empty set or one of only ``-inf`` logits).
        w: ``sum_v e_v`` (the partition function rescaled by ``exp(-m)``).
        mean: ``sum_v e_v (z_v - m) / w``: the softmax-weighted mean logit, stored relative
            to ``m`` so that ``mu = mean - log w`` involves no cancellation of large logits.
            It lies in ``[-log(n), 0]`` for n columns.
        m2: ``sum_v e_v (z_v - m - mean)^2``: weighted sum of squared deviations (shift
            invariant).
    """

    m: jax.Array
    w: jax.Array
    mean: jax.Array
    m2: jax.Array


def empty_stats(shape: tuple[int, ...]) -> VocabStats:
    """Statistics of the empty set: the identity of :func:`merge_stats`."""
    zeros = jnp.zeros(shape, _F32)
    return VocabStats(jnp.full(shape, -jnp.inf, _F32), zeros, zeros, zeros)


def chunk_stats(z: jax.Array) -> VocabStats:
    """Statistics of one chunk of logits.

    Args:
        z: [..., n] float32 logits of n vocabulary columns.

    Returns:
        :class:`VocabStats` with leading shape ``z.shape[:-1]``.
    """
    m = jnp.max(z, axis=-1)
    # A chunk of only -inf logits is empty (w = 0); shift by 0 instead of -inf - -inf = NaN.
    ref = jnp.where(jnp.isneginf(m), 0.0, m)
    # Floor the offsets so a -inf logit gives e = 0 and 0 * d = 0, not 0 * -inf = NaN; the
    # floor is far below exp's underflow and its square still fits in float32.
    d = jnp.maximum(z - ref[..., None], _FLOOR)
    e = jnp.exp(d)
    w = jnp.sum(e, axis=-1)
    mean = jnp.sum(e * d, axis=-1) / jnp.where(w > 0, w, 1.0)
    m2 = jnp.sum(e * jnp.square(d - mean[..., None]), axis=-1)
    return VocabStats(m, w, mean, m2)


def merge_stats(a: VocabStats, b: VocabStats) -> VocabStats:
    """Statistics of the union of two disjoint column sets (associative, commutative).

    Chan, Golub & LeVeque (1979) parallel update with weights rescaled to the common max
    (as in the online softmax of Milakov & Gimelshein 2018): with ``m = max(m_a, m_b)``,
    ``w_a' = w_a e^{m_a - m}``, ``w_b' = w_b e^{m_b - m}``, ``w = w_a' + w_b'`` and
    ``delta = mean_b - mean_a`` (both taken relative to ``m``)::

        mean = mean_a + delta w_b' / w      (written as the convex combination below)
        M2   = M2_a e^{m_a - m} + M2_b e^{m_b - m} + delta^2 w_a' w_b' / w

    No ``E[z^2] - E[z]^2`` cancellation. The mean is computed as
    ``mean_a (w_a'/w) + mean_b (w_b'/w)`` (algebraically the same): a set whose rescaled
    weight underflows then contributes exactly nothing, whereas ``mean_a + delta ...``
    would add and subtract its far-away relative mean and lose precision.
    """
    m = jnp.maximum(a.m, b.m)
    ref = jnp.where(jnp.isneginf(m), 0.0, m)
    shift_a = a.m - ref  # <= 0; -inf for an empty set
    shift_b = b.m - ref
    scale_a = jnp.exp(shift_a)
    scale_b = jnp.exp(shift_b)
    wa = a.w * scale_a
    wb = b.w * scale_b
    w = wa + wb
    safe_w = jnp.where(w > 0, w, 1.0)
    fa = wa / safe_w
    fb = wb / safe_w
    # Means relative to the new max; a set with no weight is left out (its shift may be -inf).
    ra = jnp.where(wa > 0, a.mean + shift_a, 0.0)
    rb = jnp.where(wb > 0, b.mean + shift_b, 0.0)
    mean = fa * ra + fb * rb
    delta = rb - ra
    # delta^2 wa wb / w grouped so a huge delta only ever meets a weight that is ~0.
    m2 = a.m2 * scale_a + b.m2 * scale_b + (delta * fa) * (delta * wb)
    return VocabStats(m, w, mean, m2)


def finalize_stats(s: VocabStats) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lse, mu, sigma)`` from the statistics of the whole vocabulary.

    ``lse = m + log w``; ``mu = E_p[log p] = E_p[z] - lse = mean - log w``;
    ``sigma = sqrt(M2 / w)`` (the spread of ``log p`` equals that of ``z``: shift invariant).
    """
    log_w = jnp.log(s.w)
    return s.m + log_w, s.mean - log_w, jnp.sqrt(s.m2 / s.w)


def project_logits(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``hidden @ weight + bias`` accumulated and returned in float32."""
    z = jnp.dot(hidden, weight, preferred_element_type=_F32)
    if bias is not None:
        z = z + jnp.broadcast_to(bias.astype(_F32), z.shape)
    return z


def _as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as uint16 bits (XLA:CPU upcasts a bf16 slice or gather to
    float32, and then hoists that convert of the whole matrix out of the vocabulary loop:
    a float32 copy of the unembedding; integer slicing is never converted)."""
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits


def slice_rows(rows: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    """``rows[start:start + size]`` of a [V, D] matrix, without a float32 copy of it."""
    return _from_bits(lax.dynamic_slice_in_dim(_as_bits(rows), start, size, axis=0),
                      rows.dtype)


def take_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """``rows[index]`` [T, D] of a [V, D] matrix; an index of V (out of range) gives a NaN
    row; no float32 copy of the matrix."""
    inside = index < rows.shape[0]
    taken = _from_bits(jnp.take(_as_bits(rows), jnp.where(inside, index, 0), axis=0),
                       rows.dtype)
    return jnp.where(inside[:, None], taken, jnp.asarray(jnp.nan, rows.dtype))


def project_rows(hidden: jax.Array, rows: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``hidden [T, D] @ rows [C, D]^T + bias`` accumulated and returned in float32 (the
    operands stay in their dtype: bf16 x bf16 -> float32 is a native dot on XLA:CPU)."""
    z = lax.dot_general(hidden, rows, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    if bias is not None:
        z = z + jnp.broadcast_to(bias.astype(_F32), z.shape)
    return z


def soft_cap(z: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's final-logit soft-capping ``cap * tanh(z / cap)``; None: ``z`` unchanged."""
    return z if cap is None else cap * jnp.tanh(z / cap)


def streamed_hidden_stats(
    hidden: jax.Array,
    unembedding: jax.Array,
    bias: jax.Array | None,
    index: jax.Array,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[VocabStats, jax.Array]:
    """Streamed statistics of ``hidden @ unembedding + bias``, never forming [T, V].

    The XLA reference of the fused Pallas kernel (:func:`kernel`).

    Args:
        hidden: [T, D] float; unembedding: [D, V] float; bias: [V] float or None.
        index: [T] int32 target ids; ``V`` (out of range) gives a NaN target logit.
        chunk_size: vocabulary columns per chunk (static).
        softcap: None, or c: the logits are ``c * tanh(z / c)`` of the float32 ``z``
            (Gemma 2's ``final_logit_softcapping``), the target logit too.

    Returns:
        (:class:`VocabStats` [T], target logit [T] float32).
    """
    # Rows of W^T [V, D]: a model's unembedding() is its [V, D] embedding transposed, and
    # XLA folds this transpose of a transpose away, so each chunk is a contiguous row
    # slice of the stored matrix. Slicing columns of [D, V] instead made XLA hoist one
    # whole transposed (and, for bf16, upcast) copy of the matrix out of the loop.
    rows = unembedding.T
    # The T target rows, not the [T, V] logits.
    w_targets = take_rows(rows, index)
    target_logit = jnp.einsum(
        "td,td->t", hidden, w_targets, preferred_element_type=_F32
    )
    if bias is not None:
        target_logit = target_logit + jnp.take(
            bias, index, mode="fill", fill_value=jnp.nan
        ).astype(_F32)
    target_logit = soft_cap(target_logit, softcap)
    chunk = lambda start, size: soft_cap(project_rows(
        hidden,
        slice_rows(rows, start, size),
        None if bias is None else lax.dynamic_slice_in_dim(bias, start, size),
    ), softcap)
    stats = streamed_stats(chunk, unembedding.shape[1], chunk_size, hidden.shape[0])
    return stats, target_logit


def streamed_stats(chunk, vocab: int, chunk_size: int, num_tokens: int) -> VocabStats:
    """Merge the statistics of ``chunk(start, size)`` ([T, size] float32) over the vocab.

    A ``lax.scan`` over the full chunks (dynamic slices: no padded copy of the weights),
    then one static remainder chunk when ``chunk_size`` does not divide V.
    """
    num_full, remainder = divmod(vocab, chunk_size)
    stats = empty_stats((num_tokens,))
    if num_full:

        def body(carry: VocabStats, i: jax.Array) -> tuple[VocabStats, None]:
            return merge_stats(carry, chunk_stats(chunk(i * chunk_size, chunk_size))), None

        stats, _ = lax.scan(body, stats, jnp.arange(num_full))
    if remainder:
        stats = merge_stats(stats, chunk_stats(chunk(num_full * chunk_size, remainder)))
    return stats


def reference(hidden: jax.Array, unembedding: jax.Array, bias: jax.Array | None,
              index: jax.Array, *, chunk_size: int, softcap: float | None = None
              ) -> tuple[VocabStats, jax.Array]:
    """The XLA reference: :func:`streamed_hidden_stats` (lax.scan over vocab chunks).

    Args:
        hidden: [N, D]; unembedding: [D, V]; bias: [V] or None; index: [N] int32 in [0, V]
        (V marks an out-of-range target: NaN target logit); softcap: as
        :func:`streamed_hidden_stats`.

    Returns:
        (VocabStats [N], target logit [N] float32).
    """
    return streamed_hidden_stats(hidden, unembedding, bias, index, chunk_size, softcap)


# --------------------------------------------------------------------------- Pallas kernel


def _kernel(*refs, vocab: int, block_vocab: int, has_bias: bool, softcap: float | None):
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
    z = soft_cap(z, softcap)
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
           block_vocab: int = BLOCK_VOCAB, interpret: bool = False,
           softcap: float | None = None) -> tuple[VocabStats, jax.Array]:
    """The Pallas kernel; same contract as :func:`reference`.

    Args:
        hidden: [N, D]; unembedding: [D, V]; bias: [V] or None; index: [N] int32 in [0, V].
        block_rows, block_vocab: tile sizes (clamped to N and V).
        interpret: run in Pallas interpret mode (CPU).
        softcap: as :func:`streamed_hidden_stats` (applied to each tile before masking).
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
                             has_bias=bias is not None, softcap=softcap)
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
