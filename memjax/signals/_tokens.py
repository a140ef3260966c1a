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
  reduced to a few per-position statistics (``memjax.kernels.chunk_stats``) that are
  merged with Chan et al.'s parallel variance update, rescaled like an online softmax
  (``memjax.kernels.merge_stats``). Given ``hidden`` and ``unembedding``, the chunk's
  logits are computed from a slice of the unembedding matrix, so the full logits never
  exist at all.

The statistics and the merge are small pure functions on ``memjax.kernels.VocabStats``,
defined in :mod:`memjax.kernels` beside the fused Pallas kernel that reuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memjax._checks import check_positive_int
from memjax.errors import InputError
from memjax.kernels import (
    finalize_stats,
    project_logits,
    soft_cap,
    streamed_stats,
    vocab_stats,
)

_F32 = jnp.float32


def tokens(
    logits: jax.Array | None = None,
    *,
    targets: jax.Array,
    mask: jax.Array | None = None,
    hidden: jax.Array | None = None,
    unembedding: jax.Array | None = None,
    bias: jax.Array | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
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
            be shorter). Memory then scales with ``T * chunk_size``, not ``T * V``. With
            ``hidden``, each chunk is a row slice of ``unembedding.T``: give the transpose
            of a stored [V, D] matrix (as every port's ``unembedding()`` does) and XLA
            slices the stored matrix itself; a [D, V] array stored as such costs one
            transposed copy. On XLA:CPU a bf16 matrix is sliced as its uint16 bits (a
            float slice would be upcast, making a float32 copy of the whole matrix), which
            still costs one 16-bit copy; a bf16 ``logits`` array is upcast whole, once,
            before the loop. With ``hidden``, the streamed statistics go
            through ``memjax.kernels.vocab_stats``: ``MEMJAX_KERNELS`` (read at trace time)
            may select the fused Pallas kernel, whose own vocab tiles replace chunk_size.
        softcap: None, or a positive c (a static Python float): the model's logits are
            ``c * tanh(z / c)`` of the given (or projected) ``z``, as Gemma 2's
            ``final_logit_softcapping`` (Gemma Team 2024); applied in float32 to every
            chunk and to the target logit, so both paths stay exact.

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

    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise InputError(f"softcap must be None or a positive number, got {softcap!r}")

    # Out-of-range targets index past the end so the "fill" gathers give NaN (jnp would
    # otherwise wrap negative ids such as -100 and clamp large ones to a real token).
    index = jnp.where((targets >= 0) & (targets < vocab), targets, vocab)

    if chunk_size is None:
        if logits is not None:
            z = logits.astype(_F32)
        else:
            z = project_logits(hidden, unembedding, bias)
        logp, mu, sigma, lse = _full_vocab(soft_cap(z, softcap), index)
    else:
        if logits is not None:
            target_logit = jnp.take_along_axis(
                logits, index[:, None], axis=1, mode="fill", fill_value=jnp.nan
            )[:, 0].astype(_F32)
            target_logit = soft_cap(target_logit, softcap)
            chunk = lambda start, size: soft_cap(lax.dynamic_slice_in_dim(
                logits, start, size, axis=1
            ).astype(_F32), softcap)
            stats = streamed_stats(chunk, vocab, int(chunk_size), num_tokens)
        else:
            # MEMJAX_KERNELS picks the Pallas kernel or streamed_hidden_stats (the default).
            stats, target_logit = vocab_stats(
                hidden, unembedding, bias, index, chunk_size=int(chunk_size), softcap=softcap
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


def causal_lm_tokens(
    hidden: jax.Array,
    unembedding: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    bias: jax.Array | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> dict[str, jax.Array]:
    """Per-token signals of one causal-LM sequence: position t scores token t+1.

    The score function of a causal language model (GPT-2, GPT-NeoX, ...) from the final
    hidden states of its own input: the targets are the inputs shifted left by one, and a
    position is scored when its input and its target are both real tokens (the last
    position has no target).

    Args:
        hidden: [T, D] float final hidden states of ``input_ids``.
        unembedding: [D, V] float output projection; bias: optional [V].
        input_ids: [T] integer token ids.
        attention_mask: [T] (nonzero = real token, 0 = padding).
        chunk_size: as in :func:`tokens` (None: the full float32 log-softmax).
        softcap: the model's final-logit soft-cap, as in :func:`tokens`.

    Returns:
        :func:`tokens`' fields, plus ``scored`` [T] bool, the positions counted in
        ``mean_loss`` and ``n_tokens``; stored with the signals because Min-K% needs it
        (``memjax mia stored``).
    """
    ids = jnp.asarray(input_ids)
    mask = jnp.asarray(attention_mask)
    length = ids.shape[0]
    scored = (mask != 0) & (jnp.roll(mask, -1) != 0) & (jnp.arange(length) < length - 1)
    signals = tokens(hidden=hidden, unembedding=unembedding, bias=bias,
                     targets=jnp.roll(ids, -1), mask=scored, chunk_size=chunk_size,
                     softcap=softcap)
    return {**signals, "scored": scored}


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


