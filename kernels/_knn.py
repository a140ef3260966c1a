"""Blockwise exact k-NN with a running top-k: query tiles x public blocks.

The reference that defines it is :func:`knn_scan` (``memjax.memorization.knn`` validates
its inputs and dispatches here): nearness scores (-squared L2 as ``|q|^2 + |p|^2 - 2 q.p``
clamped at 0, or cosine of unit rows) of a query block against one public block at a
time, merged into a running top-k; ties go to the lower public index. The kernel computes
each block's scores with the same function (:func:`block_scores`) and replaces
``lax.top_k`` on the concatenated candidates by k rounds of max / first-argmax /
mark-taken, which selects the same elements in the same order: the running top-k is kept
sorted by (value desc, index asc) and precedes the block's columns, whose public indices
are all larger.

Grid: (query tiles, public blocks); the public axis is the reduction axis carrying the
running top-k in the resident output blocks. Ragged P: the last block's columns past P
score -inf. Ragged Q: zero-padded query rows, sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._dispatch import cdiv, compiler_params

BLOCK_QUERIES = 128
#: Lower clamp on vector norms, as in ``torch.nn.functional.normalize``: an all-zero vector
#: normalises to zero (cosine 0) instead of 0/0 = NaN. Shared by every cosine in memjax.
EPS = 1e-12


# --------------------------------------------------------------------------- XLA reference


def block_scores(queries: jax.Array, block: jax.Array, metric: str) -> jax.Array:
    """[Q, B] nearness (higher = nearer): -squared L2 distance, or cosine similarity."""
    dots = jnp.matmul(queries, block.T, precision=lax.Precision.HIGHEST)
    if metric == "l2":
        # |q - p|^2 expanded as faiss IndexFlatL2 does; clamped: rounding can go below 0.
        sq = (jnp.sum(queries * queries, axis=1)[:, None] + jnp.sum(block * block, axis=1)[None]
              - 2.0 * dots)
        scores = -jnp.maximum(sq, 0.0)
    else:
        scores = dots
    # -0.0 and 0.0 are equal but top_k orders them; one zero keeps ties by index.
    return jnp.where(scores == 0, 0.0, scores)


def unit_rows(x: jax.Array) -> jax.Array:
    """``x / max(|x|, EPS)`` along the last axis (rows of [N, D]; one vector of [D])."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)


def knn_scan(queries: jax.Array, public: jax.Array, k: int, metric: str = "l2",
             block_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest public rows of every query; pure (jit it at the edge).

    Ties go to the lower public index: a block's candidates follow the running top-k
    (lower indices) in the merge, and ``lax.top_k`` keeps the earlier of equal values.

    Returns:
      (scores [Q, k] float32: -squared L2 or cosine, best first; indices [Q, k] int32).
    """
    queries = queries.astype(jnp.float32)
    public = public.astype(jnp.float32)
    if metric == "cosine":
        queries, public = unit_rows(queries), unit_rows(public)
    n_public, dim = public.shape
    block = min(block_size, n_public)
    n_blocks = -(-n_public // block)
    padded = jnp.pad(public, ((0, n_blocks * block - n_public), (0, 0)))
    blocks = padded.reshape(n_blocks, block, dim)
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * block
    n_q = queries.shape[0]

    def merge(carry, xs):
        vals, idx = carry
        rows, offset = xs
        cols = offset + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(cols < n_public, block_scores(queries, rows, metric), -jnp.inf)
        cand_v = jnp.concatenate([vals, scores], axis=1)
        cand_i = jnp.concatenate([idx, jnp.broadcast_to(cols, (n_q, block))], axis=1)
        top_v, pos = lax.top_k(cand_v, k)
        return (top_v, jnp.take_along_axis(cand_i, pos, axis=1)), None

    init = (jnp.full((n_q, k), -jnp.inf, jnp.float32), jnp.full((n_q, k), -1, jnp.int32))
    (vals, idx), _ = lax.scan(merge, init, (blocks, offsets))
    return vals, idx


def reference(queries: jax.Array, public: jax.Array, k: int, metric: str,
              block_size: int) -> tuple[jax.Array, jax.Array]:
    """:func:`knn_scan`: (scores [Q, k] float32, best first; indices [Q, k] int32)."""
    return knn_scan(queries, public, k, metric=metric, block_size=block_size)


# --------------------------------------------------------------------------- Pallas kernel


def select_top_k(values: jax.Array, index: jax.Array, k: int
                 ) -> tuple[jax.Array, jax.Array]:
    """The k largest of each row of ``values`` [R, C], best first, earlier column on ties.

    ``index`` [R, C] int32 is carried along. k rounds of max and first-argmax with a
    ``taken`` mask (not overwriting with -inf, so -inf candidates are still picked in
    order, exactly as ``lax.top_k`` does). NaN scores are not supported.
    """
    rows, width = values.shape
    col = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    out_col = lax.broadcasted_iota(jnp.int32, (rows, k), 1)

    def pick(r, carry):
        taken, top_v, top_i = carry
        avail = jnp.where(taken, -jnp.inf, values)
        best = jnp.max(avail, axis=1, keepdims=True)
        first = jnp.min(jnp.where(~taken & (avail == best), col, width), axis=1,
                        keepdims=True)
        hit = col == first
        chosen = jnp.sum(jnp.where(hit, index, 0), axis=1, keepdims=True)
        top_v = jnp.where(out_col == r, best, top_v)
        top_i = jnp.where(out_col == r, chosen, top_i)
        return taken | hit, top_v, top_i

    init = (jnp.zeros((rows, width), bool), jnp.zeros((rows, k), values.dtype),
            jnp.zeros((rows, k), jnp.int32))
    _, top_v, top_i = lax.fori_loop(0, k, pick, init)
    return top_v, top_i


def _kernel(q_ref, p_ref, v_ref, i_ref, *, k: int, n_public: int, block: int,
            metric: str):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        v_ref[...] = jnp.full(v_ref.shape, -jnp.inf, jnp.float32)
        i_ref[...] = jnp.full(i_ref.shape, -1, jnp.int32)

    scores = block_scores(q_ref[...], p_ref[...], metric)  # [rows, block]
    cols = j * block + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    # The last block overhangs P: its extra rows are undefined memory, never candidates.
    scores = jnp.where(cols < n_public, scores, -jnp.inf)
    cand_v = jnp.concatenate([v_ref[...], scores], axis=1)
    cand_i = jnp.concatenate([i_ref[...], cols], axis=1)
    v_ref[...], i_ref[...] = select_top_k(cand_v, cand_i, k)


def kernel(queries: jax.Array, public: jax.Array, k: int, metric: str, block_size: int,
           *, block_queries: int = BLOCK_QUERIES, interpret: bool = False
           ) -> tuple[jax.Array, jax.Array]:
    """The Pallas kernel; same contract as :func:`reference`.

    Args:
        queries: [Q, D]; public: [P, D], P >= k; block_size: public rows per block;
        block_queries: query rows per tile (both clamped to the array sizes).
    """
    queries = queries.astype(jnp.float32)
    public = public.astype(jnp.float32)
    if metric == "cosine":
        queries, public = unit_rows(queries), unit_rows(public)
    n_q, dim = queries.shape
    n_public = public.shape[0]
    rows = min(block_queries, n_q)
    block = min(block_size, n_public)
    q_pad = cdiv(n_q, rows) * rows
    queries = jnp.pad(queries, ((0, q_pad - n_q), (0, 0)))
    out_spec = pl.BlockSpec((rows, k), lambda i, j: (i, 0))
    body = functools.partial(_kernel, k=k, n_public=n_public, block=block, metric=metric)
    vals, idx = pl.pallas_call(
        body,
        out_shape=(jax.ShapeDtypeStruct((q_pad, k), jnp.float32),
                   jax.ShapeDtypeStruct((q_pad, k), jnp.int32)),
        grid=(q_pad // rows, cdiv(n_public, block)),
        in_specs=[pl.BlockSpec((rows, dim), lambda i, j: (i, 0)),
                  pl.BlockSpec((block, dim), lambda i, j: (j, 0))],
        out_specs=(out_spec, out_spec),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(),
        name="memjax_knn",
    )(queries, public)
    return vals[:n_q], idx[:n_q]
