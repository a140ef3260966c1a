"""Streaming per-unit statistics of activations for UnitMem: max, argmax, sum, min.

``memjax.memorization.batch_stats`` defines them in float64 NumPy on the host.
:func:`reference` is the same definition in jnp **float32** (so it can run on an
accelerator next to the model): max, min and argmax are exact (first index on ties, as
``np.argmax``), the sum is a float32 sum and differs from the float64 one by rounding.
The kernel equals the reference (sum up to float32 summation order).

Grid: (unit tiles, example tiles); the example axis is the reduction axis and carries
the running max/argmax/sum/min in the resident output blocks. A later tile replaces the
running max only when strictly greater, so ties keep the first example. Ragged N: rows
past N are masked (-inf for max, +inf for min, 0 for sum). Ragged U: the outputs are
padded to whole unit tiles and sliced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._dispatch import cdiv, compiler_params

_F32 = jnp.float32
BLOCK_UNITS = 128
BLOCK_EXAMPLES = 256


def reference(mu: jax.Array) -> dict[str, jax.Array]:
    """Per-unit statistics of ``mu`` [N, U] in float32.

    Returns:
        ``{"max", "sum", "min"}`` [U] float32 and ``"argmax"`` [U] int32 (first index).
    """
    mu = mu.astype(_F32)
    return {"max": jnp.max(mu, axis=0), "argmax": jnp.argmax(mu, axis=0).astype(jnp.int32),
            "sum": jnp.sum(mu, axis=0), "min": jnp.min(mu, axis=0)}


def _kernel(x_ref, max_ref, arg_ref, sum_ref, min_ref, *, n: int, block_examples: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, _F32)
        arg_ref[...] = jnp.zeros(arg_ref.shape, jnp.int32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, _F32)
        min_ref[...] = jnp.full(min_ref.shape, jnp.inf, _F32)

    x = x_ref[...].astype(_F32)  # [block_examples, units]
    row = j * block_examples + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    live = row < n  # the last example tile overhangs N: undefined memory
    tile_max = jnp.max(jnp.where(live, x, -jnp.inf), axis=0)
    first = jnp.min(jnp.where(live & (x == tile_max[None, :]), row, jnp.iinfo(jnp.int32).max),
                    axis=0)
    # Strictly greater: on ties the earlier tile (lower example index) keeps the max.
    better = tile_max > max_ref[...]
    arg_ref[...] = jnp.where(better, first, arg_ref[...])
    max_ref[...] = jnp.where(better, tile_max, max_ref[...])
    sum_ref[...] += jnp.sum(jnp.where(live, x, 0.0), axis=0)
    min_ref[...] = jnp.minimum(min_ref[...], jnp.min(jnp.where(live, x, jnp.inf), axis=0))


def kernel(mu: jax.Array, *, block_units: int = BLOCK_UNITS,
           block_examples: int = BLOCK_EXAMPLES, interpret: bool = False
           ) -> dict[str, jax.Array]:
    """The Pallas kernel; same contract as :func:`reference` (tiles clamped to N, U)."""
    n, units = mu.shape
    cols = min(block_units, units)
    rows = min(block_examples, n)
    u_pad = cdiv(units, cols) * cols
    spec = pl.BlockSpec((cols,), lambda i, j: (i,))
    body = functools.partial(_kernel, n=n, block_examples=rows)
    mx, arg, total, mn = pl.pallas_call(
        body,
        out_shape=(jax.ShapeDtypeStruct((u_pad,), _F32),
                   jax.ShapeDtypeStruct((u_pad,), jnp.int32),
                   jax.ShapeDtypeStruct((u_pad,), _F32),
                   jax.ShapeDtypeStruct((u_pad,), _F32)),
        grid=(u_pad // cols, cdiv(n, rows)),
        in_specs=[pl.BlockSpec((rows, cols), lambda i, j: (j, i))],
        out_specs=(spec,) * 4,
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(),
        name="memjax_unit_stats",
    )(mu)
    return {"max": mx[:units], "argmax": arg[:units], "sum": total[:units],
            "min": mn[:units]}
