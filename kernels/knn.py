"""Blockwise exact k-NN with a running top-k: query tiles x public blocks.

The reference that defines it is :func:`memjax.memorization._dejavu.knn_scan`: nearness
scores (-squared L2 as ``|q|^2 + |p|^2 - 2 q.p`` clamped at 0, or cosine of unit rows)
of a query block against one public block at a time, merged into a running top-k; ties
go to the lower public index. The kernel computes each block's scores with the same
function (``_block_scores``, imported) and replaces ``lax.top_k`` on the concatenated
candidates by k rounds of max / first-argmax / mark-taken, which selects the same
elements in the same order: the running top-k is kept sorted by (value desc, index asc)
and precedes the block's columns, whose public indices are all larger.

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

from memjax.memorization._dejavu import _block_scores, _unit_rows, knn_scan

from ._dispatch import cdiv, compiler_params

BLOCK_QUERIES = 128


def reference(queries: jax.Array, public: jax.Array, k: int, metric: str,
              block_size: int) -> tuple[jax.Array, jax.Array]:
    """``knn_scan``: (scores [Q, k] float32, best first; indices [Q, k] int32)."""
    return knn_scan(queries, public, k, metric=metric, block_size=block_size)


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

    scores = _block_scores(q_ref[...], p_ref[...], metric)  # [rows, block]
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
        queries, public = _unit_rows(queries), _unit_rows(public)
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
