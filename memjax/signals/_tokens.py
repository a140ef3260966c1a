"""Per-token signals of a causal language model: log-likelihood and Min-K%++ statistics.

One sequence per call (``[T, ...]`` inputs, no batch axis); batch with :func:`jax.vmap`.
The model's next-token distribution at position t is ``p_t = softmax(z_t)`` over the V
vocabulary logits ``z_t``; the signals are ``log p_t(target_t)`` and the mean and standard
deviation of ``log p_t(v)`` for ``v ~ p_t`` (Min-K%++, Zhang et al. 2024, "Min-K%++:
Improved Baseline for Detecting Pre-Training Data from Large Language Models").

Two paths give the same numbers:

- ``chunk_size=None``: reference path, a full float32 log-softmax over ``[T, V]``.
- ``chunk_size=n``: streams the vocabulary in chunks of n columns, so no float32 ``[T, V]``
  tensor (nor ``[B, T, V]`` under vmap) is ever materialised: each chunk's logits are
  reduced to a few per-position statistics (:func:`chunk_stats`) that are merged with
  Chan et al.'s parallel variance update, rescaled like an online softmax
  (:func:`merge_stats`). Given ``hidden`` and ``unembedding``, the chunk's logits are
  computed from a slice of the unembedding matrix, so the full logits never exist at all.

The statistics and the merge are small pure functions on :class:`VocabStats` so that a
fused kernel can reuse them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memjax.errors import InputError

_F32 = jnp.float32
_FLOOR = -1e18


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


def tokens(
    logits: jax.Array | None = None,
    *,
    targets: jax.Array,
    mask: jax.Array | None = None,
    hidden: jax.Array | None = None,
    unembedding: jax.Array | None = None,
    bias: jax.Array | None = None,
    chunk_size: int | None = None,
) -> dict[str, jax.Array]:
    """Per-token signals of one sequence.

    Give either ``logits`` or ``hidden`` and ``unembedding`` (logits = ``hidden @
    unembedding + bias``), not both.

    Args:
        logits: [T, V] float logits predicting ``targets``.
        targets: [T] integer next tokens in ``[0, V)``. The engine validates them on the
            host (:func:`memjax.signals.check_labels`); an out-of-range target gives NaN
            ``logp`` at that position (harmless where ``mask`` is false, e.g. an ignore
            index of -100).
        mask: [T] bool (or 0/1 integer) positions to score; None means all.
        hidden: [T, D] float final hidden states.
        unembedding: [D, V] float output projection.
        bias: optional [V] float output bias (only with ``hidden``).
        chunk_size: None for the reference path; a positive int to stream the vocabulary
            in chunks of that many columns (a static Python int; any V, the last chunk may
            be shorter). Memory then scales with ``T * chunk_size``, not ``T * V``. Caveat:
            XLA:CPU's bf16 normalisation upcasts a bf16 ``logits`` or ``unembedding`` array
            to float32 whole, once, before the loop (its slices are taken in float32);
            float32 inputs are not affected. With ``hidden``, the streamed statistics go
            through ``memjax.kernels.vocab_stats``: ``MEMJAX_KERNELS`` (read at trace time)
            may select the fused Pallas kernel, whose own vocab tiles replace chunk_size.

    Returns:
        Dict of float32 arrays. Per position [T] (computed at every position, masked or
        not, so shapes stay fixed: consumers must apply ``mask``):

        - ``logp``: ``log p_t(target_t)``.
        - ``mu``: ``E_{v~p_t}[log p_t(v)]`` (Min-K%++'s mean).
        - ``sigma``: ``sqrt(E_{v~p_t}[(log p_t(v) - mu_t)^2])`` (Min-K%++'s std).
        - ``entropy``: ``-mu``.
        - ``lse``: ``logsumexp_v z_t(v)``, the log-partition.

        Scalars:

        - ``mean_loss``: mean of ``-logp`` over positions where ``mask`` is true; 0.0 when
          there are none.
        - ``n_tokens``: number of positions where ``mask`` is true.

    Raises:
        InputError: at trace time, for a wrong combination of inputs, wrong ranks, dtypes or
            mismatched sizes, or a bad ``chunk_size``.
    """
    targets = jnp.asarray(targets)
    if targets.ndim != 1:
        raise InputError(
            f"targets must be 1-D [T] (one sequence; batch with jax.vmap), got shape "
            f"{targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise InputError(f"targets must have an integer dtype, got {targets.dtype}")
    num_tokens = targets.shape[0]

    if logits is not None:
        given = [n for n, x in (("hidden", hidden), ("unembedding", unembedding),
                                ("bias", bias)) if x is not None]
        if given:
            raise InputError(
                f"pass either logits or hidden+unembedding, not both: got logits and "
                f"{', '.join(given)}"
            )
        logits = _float_array(logits, "logits", ndim=2, what="[T, V]")
        if logits.shape[0] != num_tokens:
            raise InputError(
                f"logits has {logits.shape[0]} positions but targets has {num_tokens}; "
                f"expected logits [T, V] with T = len(targets)"
            )
        vocab = logits.shape[1]
    else:
        if hidden is None and unembedding is None:
            raise InputError("pass either logits [T, V] or hidden [T, D] and unembedding [D, V]")
        if hidden is None or unembedding is None:
            missing = "hidden [T, D]" if hidden is None else "unembedding [D, V]"
            raise InputError(f"hidden and unembedding go together: {missing} is missing")
        hidden = _float_array(hidden, "hidden", ndim=2, what="[T, D]")
        unembedding = _float_array(unembedding, "unembedding", ndim=2, what="[D, V]")
        if hidden.shape[0] != num_tokens:
            raise InputError(
                f"hidden has {hidden.shape[0]} positions but targets has {num_tokens}; "
                f"expected hidden [T, D] with T = len(targets)"
            )
        if unembedding.shape[0] != hidden.shape[1]:
            raise InputError(
                f"unembedding's first dim must equal hidden's last dim D={hidden.shape[1]}, "
                f"got unembedding shape {unembedding.shape}"
            )
        vocab = unembedding.shape[1]
        if bias is not None:
            bias = _float_array(bias, "bias", ndim=1, what="[V]")
            if bias.shape[0] != vocab:
                raise InputError(
                    f"bias must have shape [V] = ({vocab},) to match unembedding, got "
                    f"{bias.shape}"
                )
    if vocab < 2:
        raise InputError(f"the vocabulary must have at least 2 entries, got V={vocab}")

    if mask is None:
        mask = jnp.ones((num_tokens,), bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != (num_tokens,):
            raise InputError(f"mask must have shape [T] = ({num_tokens},), got {mask.shape}")
        if mask.dtype != jnp.bool_:
            if not jnp.issubdtype(mask.dtype, jnp.integer):
                raise InputError(f"mask must be bool (or 0/1 integers), got dtype {mask.dtype}")
            mask = mask != 0

    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int | np.integer)
        or chunk_size < 1
    ):
        raise InputError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    # Out-of-range targets index past the end so the "fill" gathers give NaN (jnp would
    # otherwise wrap negative ids such as -100 and clamp large ones to a real token).
    index = jnp.where((targets >= 0) & (targets < vocab), targets, vocab)

    if chunk_size is None:
        if logits is not None:
            z = logits.astype(_F32)
        else:
            z = _project(hidden, unembedding, bias)
        logp, mu, sigma, lse = _full_vocab(z, index)
    else:
        if logits is not None:
            target_logit = jnp.take_along_axis(
                logits, index[:, None], axis=1, mode="fill", fill_value=jnp.nan
            )[:, 0].astype(_F32)
            chunk = lambda start, size: lax.dynamic_slice_in_dim(
                logits, start, size, axis=1
            ).astype(_F32)
            stats = _streamed_stats(chunk, vocab, int(chunk_size), num_tokens)
        else:
            # Imported here: memjax.kernels imports this module for its reference.
            from memjax import kernels

            # MEMJAX_KERNELS picks the Pallas kernel or streamed_hidden_stats (the default).
            stats, target_logit = kernels.vocab_stats(
                hidden, unembedding, bias, index, chunk_size=int(chunk_size)
            )
        lse, mu, sigma = finalize_stats(stats)
        # (z_t - m) - log w rather than z_t - lse: no rounding of a large lse. The target
        # logit comes from its own product, which may round a hair above the chunk max for
        # a near-certain token: clamp to log p <= 0 (NaN still propagates).
        logp = jnp.minimum((target_logit - stats.m) - jnp.log(stats.w), 0.0)

    n_tokens = jnp.sum(mask).astype(_F32)
    # where, not multiply: NaN at masked positions (bad targets there) must not leak in.
    total = jnp.sum(jnp.where(mask, -logp, 0.0))
    mean_loss = jnp.where(n_tokens > 0, total / jnp.maximum(n_tokens, 1.0), 0.0)
    return {
        "logp": logp,
        "mu": mu,
        "sigma": sigma,
        "entropy": -mu,
        "lse": lse,
        "mean_loss": mean_loss,
        "n_tokens": n_tokens,
    }


def _float_array(x: jax.Array, name: str, *, ndim: int, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise InputError(
            f"{name} must be {ndim}-D {what} (one sequence; batch with jax.vmap), got "
            f"shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _project(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``hidden @ weight + bias`` accumulated and returned in float32."""
    z = jnp.dot(hidden, weight, preferred_element_type=_F32)
    if bias is not None:
        z = z + bias.astype(_F32)
    return z


def _full_vocab(
    z: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Reference path on float32 logits [T, V]: ``(logp, mu, sigma, lse)``."""
    log_p = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(log_p)
    live = p > 0  # skip 0 * -inf for vanishing probabilities
    log_p_live = jnp.where(live, log_p, 0.0)
    mu = jnp.sum(p * log_p_live, axis=-1)
    var = jnp.sum(p * jnp.square(log_p_live - mu[:, None]), axis=-1)
    logp = jnp.take_along_axis(
        log_p, index[:, None], axis=1, mode="fill", fill_value=jnp.nan
    )[:, 0]
    return logp, mu, jnp.sqrt(var), jax.nn.logsumexp(z, axis=-1)


def streamed_hidden_stats(
    hidden: jax.Array,
    unembedding: jax.Array,
    bias: jax.Array | None,
    index: jax.Array,
    chunk_size: int,
) -> tuple[VocabStats, jax.Array]:
    """Streamed statistics of ``hidden @ unembedding + bias``, never forming [T, V].

    The XLA reference of the fused Pallas kernel ``memjax.kernels.token_stats``.

    Args:
        hidden: [T, D] float; unembedding: [D, V] float; bias: [V] float or None.
        index: [T] int32 target ids; ``V`` (out of range) gives a NaN target logit.
        chunk_size: vocabulary columns per chunk (static).

    Returns:
        (:class:`VocabStats` [T], target logit [T] float32).
    """
    # The T target columns of W, not the [T, V] logits.
    w_targets = jnp.take(unembedding, index, axis=1, mode="fill", fill_value=jnp.nan)
    target_logit = jnp.einsum(
        "td,dt->t", hidden, w_targets, preferred_element_type=_F32
    )
    if bias is not None:
        target_logit = target_logit + jnp.take(
            bias, index, mode="fill", fill_value=jnp.nan
        ).astype(_F32)
    chunk = lambda start, size: _project(
        hidden,
        lax.dynamic_slice_in_dim(unembedding, start, size, axis=1),
        None if bias is None else lax.dynamic_slice_in_dim(bias, start, size),
    )
    stats = _streamed_stats(chunk, unembedding.shape[1], chunk_size, hidden.shape[0])
    return stats, target_logit


def _streamed_stats(chunk, vocab: int, chunk_size: int, num_tokens: int) -> VocabStats:
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
