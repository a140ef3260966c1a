"""Pallas kernels for memjax's hot paths, each defined by a pure-XLA reference.

Installed as ``memjax.kernels`` (setup.cfg ``package_dir``); never importable as a bare
top-level ``kernels`` module, which would clash with an unrelated PyPI package. The
bottom of the package after ``memjax.errors``, ``memjax._checks`` and ``memjax._io``: it
imports nothing else from memjax (see ARCHITECTURE.md).

One dispatching function per hot path picks the kernel or its reference:

- :func:`token_stats` / :func:`vocab_stats`: fused ``hidden @ W + b`` -> log p(target),
  logsumexp, mu and sigma of log p over the vocabulary (Min-K%++), streamed over
  vocabulary tiles (reference: :func:`streamed_hidden_stats`, built from
  :class:`VocabStats`, :func:`chunk_stats`, :func:`merge_stats`, :func:`finalize_stats`,
  which ``memjax.signals.tokens`` uses too).
- :func:`knn_scores`: blockwise exact k-NN with a running top-k (reference:
  :func:`knn_scan`; ``memjax.memorization.knn`` validates, jits and shards it).
- :func:`unit_stats`: per-unit max / argmax / sum / min over examples for UnitMem
  (reference: a float32 jnp version of ``memjax.memorization.batch_stats``).

The choice is made when the function is called (at trace time under ``jit``): the
``impl`` argument if given, else ``MEMJAX_KERNELS=auto|kernel|reference``. ``auto`` picks
the kernel only where :data:`MEASURED_FASTER` records it as measured faster on the
current backend; that table is empty until GPU/TPU measurements exist, so today ``auto``
means the reference everywhere. ``kernel`` on CPU runs in Pallas interpret mode.
A jitted caller that must follow later changes of the variable passes the resolved
choice as a static argument (as ``memjax.memorization.knn`` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from memjax._checks import check_positive_int
from memjax.errors import InputError

from . import _knn, _token_stats, _unit_stats
from ._dispatch import ENV, MEASURED_FASTER, MODES, interpret, mode, resolve
from ._knn import EPS, block_scores, knn_scan, unit_rows
from ._token_stats import (
    VocabStats,
    chunk_stats,
    empty_stats,
    finalize_stats,
    merge_stats,
    project_logits,
    soft_cap,
    streamed_hidden_stats,
    streamed_stats,
)

__all__ = [
    "ENV",
    "EPS",
    "MEASURED_FASTER",
    "MODES",
    "VocabStats",
    "block_scores",
    "chunk_stats",
    "empty_stats",
    "finalize_stats",
    "knn_scan",
    "knn_scores",
    "merge_stats",
    "mode",
    "project_logits",
    "resolve",
    "soft_cap",
    "streamed_hidden_stats",
    "streamed_stats",
    "token_stats",
    "unit_rows",
    "unit_stats",
    "vocab_stats",
]


# --------------------------------------------------------------------------- token stats


def vocab_stats(hidden: jax.Array, unembedding: jax.Array, bias: jax.Array | None,
                index: jax.Array, *, chunk_size: int, impl: str | None = None,
                block_rows: int | None = None, block_vocab: int | None = None,
                softcap: float | None = None) -> tuple[VocabStats, jax.Array]:
    """Dispatch point of the streamed vocabulary statistics (used by ``memjax.signals.tokens``).

    Args:
        hidden: [N, D]; unembedding: [D, V]; bias: [V] or None.
        index: [N] int32 target ids in [0, V]; V marks an out-of-range target (NaN logit).
        chunk_size: vocabulary columns per step of the reference's scan.
        impl: "kernel", "reference" or None (``MEMJAX_KERNELS``).
        block_rows, block_vocab: kernel tiles (None: the module defaults).
        softcap: None, or c: statistics of the soft-capped logits ``c * tanh(z / c)``
            (Gemma 2's ``final_logit_softcapping``; the target logit capped too).

    Returns:
        (VocabStats [N], target logit [N] float32).
    """
    if resolve("token_stats", impl) == "reference":
        return _token_stats.reference(hidden, unembedding, bias, index, chunk_size=chunk_size,
                                      softcap=softcap)
    return _token_stats.kernel(
        hidden, unembedding, bias, index,
        block_rows=block_rows or _token_stats.BLOCK_ROWS,
        block_vocab=block_vocab or _token_stats.BLOCK_VOCAB,
        interpret=interpret(), softcap=softcap)


def token_stats(hidden: ArrayLike, unembedding: ArrayLike, targets: ArrayLike,
                bias: ArrayLike | None = None, *, chunk_size: int = 8192,
                impl: str | None = None, block_rows: int | None = None,
                block_vocab: int | None = None, softcap: float | None = None
                ) -> dict[str, jax.Array]:
    """Per-token log p(target), logsumexp, mu and sigma of log p, never forming [.., V].

    Args:
        hidden: [B, T, D] or [N, D] float final hidden states.
        unembedding: [D, V] float; bias: optional [V] float.
        targets: [B, T] or [N] int next tokens; ids outside [0, V) give NaN ``logp``.
        chunk_size: the reference's vocabulary chunk; impl, block_rows, block_vocab,
            softcap: see :func:`vocab_stats`.

    Returns:
        ``{"logp", "lse", "mu", "sigma"}``, float32, shaped like ``targets``.
    """
    hidden = _floating(hidden, "hidden")
    unembedding = _floating(unembedding, "unembedding")
    targets = jnp.asarray(targets)
    if hidden.ndim not in (2, 3):
        raise InputError(f"hidden: expected [B, T, D] or [N, D], got shape {hidden.shape}")
    if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[-1]:
        raise InputError(f"unembedding: expected [D, V] with D = {hidden.shape[-1]} "
                         f"(hidden's last dim), got shape {unembedding.shape}")
    if targets.shape != hidden.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise InputError(f"targets: expected integer ids of shape {hidden.shape[:-1]} "
                         f"(hidden without D), got {targets.dtype} {targets.shape}")
    vocab = unembedding.shape[1]
    if vocab < 2:
        raise InputError(f"unembedding: expected at least 2 vocabulary columns, got V={vocab}")
    if bias is not None:
        bias = _floating(bias, "bias")
        if bias.shape != (vocab,):
            raise InputError(f"bias: expected shape ({vocab},) = [V], got {bias.shape}")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    flat = targets.reshape(-1)
    index = jnp.where((flat >= 0) & (flat < vocab), flat, vocab).astype(jnp.int32)
    stats, target_logit = vocab_stats(
        hidden.reshape(-1, hidden.shape[-1]), unembedding, bias, index,
        chunk_size=chunk_size, impl=impl, block_rows=block_rows, block_vocab=block_vocab,
        softcap=softcap)
    lse, mu, sigma = finalize_stats(stats)
    # As memjax.signals.tokens: (z_t - m) - log w avoids rounding a large lse; log p <= 0.
    logp = jnp.minimum((target_logit - stats.m) - jnp.log(stats.w), 0.0)
    shape = targets.shape
    return {"logp": logp.reshape(shape), "lse": lse.reshape(shape),
            "mu": mu.reshape(shape), "sigma": sigma.reshape(shape)}


# --------------------------------------------------------------------------- k-NN


def knn_scores(queries: jax.Array, public: jax.Array, k: int, metric: str = "l2",
               block_size: int = 1024, impl: str | None = None,
               block_queries: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Dispatch point in :func:`knn_scan`'s convention: (nearness [Q, k], indices [Q, k]).

    Nearness is -squared L2 or cosine, best first; ties to the lower public index. No
    validation: ``memjax.memorization.knn`` is the checked, jitted, sharded entry point.
    """
    if resolve("knn", impl) == "reference":
        return _knn.reference(queries, public, k, metric, block_size)
    return _knn.kernel(queries, public, k, metric, block_size,
                       block_queries=block_queries or _knn.BLOCK_QUERIES,
                       interpret=interpret())


# --------------------------------------------------------------------------- unit stats


def unit_stats(mu: ArrayLike, *, impl: str | None = None, block_units: int | None = None,
               block_examples: int | None = None) -> dict[str, jax.Array]:
    """Per-unit max, argmax (first example on ties), sum and min of ``mu`` [N, U], float32.

    The float32 counterpart of ``memjax.memorization.batch_stats`` (which stays float64 on
    the host); NaN activations are not supported.

    Returns:
        ``{"max", "sum", "min"}`` [U] float32, ``"argmax"`` [U] int32.
    """
    mu = _floating(mu, "mu")
    if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
        raise InputError(f"mu: expected a non-empty [N, U] array, got shape {mu.shape}")
    if resolve("unit_stats", impl) == "reference":
        return _unit_stats.reference(mu)
    return _unit_stats.kernel(
        mu, block_units=block_units or _unit_stats.BLOCK_UNITS,
        block_examples=block_examples or _unit_stats.BLOCK_EXAMPLES,
        interpret=interpret())


def _floating(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{name}: expected a floating dtype, got {x.dtype}")
    return x
