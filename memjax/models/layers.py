"""Building blocks shared by the transformer ports (plain NNX Params, HF-compatible maths)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.backend import get_backend

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def rotary_tables(inv_freq: np.ndarray | jax.Array, length: int
                   ) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` [T, 2 * len(inv_freq)] float32 of rotary embeddings (Su et al. 2021)
    for positions ``0..T-1``, each frequency repeated over both halves as HF builds them."""
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``R = cos.shape[-1]`` dims of x [B, T, H, Dh] by cos/sin [T, R]
    (HF's ``apply_rotary_pos_emb``); the other ``Dh - R`` dims (GPT-NeoX's partial rotary)
    pass through."""
    r = cos.shape[-1]
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    rotated = x[..., :r] * cos + _rotate_half(x[..., :r]) * sin
    return rotated if r == x.shape[-1] else jnp.concatenate([rotated, x[..., r:]], axis=-1)


class Dense(nnx.Module):
    """``x @ kernel + bias`` with kernel [in, out] (PyTorch Linear weights are transposed)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,))) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in x's dtype, accumulated in float32 and rounded once
        (as PyTorch's bf16/fp16 Linear; for float32 x, the plain product). For bf16 x,
        XLA:CPU runs the bf16 x bf16 -> float32 product natively, ~2x faster than the
        bf16 -> bf16 one."""
        y = jnp.dot(x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + jnp.broadcast_to(self.bias[...].astype(jnp.float32), y.shape)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (as PyTorch's fused kernel)."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        scale, bias = (jnp.broadcast_to(v[...], y.shape) for v in (self.scale, self.bias))
        return (y * scale + bias).astype(x.dtype)


# Bytes of float32 scores one attention call may hold at once before its queries are split
# into blocks (per example: under the engine's vmap each example holds its own). 64 MiB keeps
# every ViT/BERT/CLIP shape and GPT-2 at T = 1,024 on the one-block path (the dense
# formula); a T = 8,192, 32-head layer runs in blocks of 64 queries (64 MiB of scores).
MAX_SCORE_BYTES = 64 * 2**20
# Groups of query blocks a causal blocked attention splits into, each reading only the keys
# its queries may see: (G + 1) / 2G of the dense work (G = 8: 56%), G programs per layer.
CAUSAL_GROUPS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: holds an array
class AttentionMask:
    """A self-attention mask described, not materialised: key padding, causal, window.

    ``key_mask`` [B, Tk] (True / nonzero = a real key, or None: every key is real);
    ``causal``: query q attends to keys k <= q; ``window`` W (with ``causal``, Mistral's
    sliding window, HF's ``sliding_window_overlay``): only keys k > q - W. A query attends
    to key k iff all three allow it. ``attention`` builds only the [chunk, Tk] block of it
    that a query block needs, so a long context never holds a [T, T] mask.
    """

    key_mask: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata={"static": True})
    window: int | None = dataclasses.field(default=None, metadata={"static": True})

    def block(self, q_start: jax.Array | int, q_len: int, k_len: int,
              k_start: int = 0) -> jax.Array | None:
        """[B or 1, 1, q_len, k_len] bool for queries ``q_start .. q_start + q_len - 1`` and
        keys ``k_start .. k_start + k_len - 1`` (None: attend everywhere). Equal to those
        rows and columns of ``causal_mask`` / ``padding_mask``."""
        mask = None
        if self.causal or self.window is not None:
            q = q_start + jax.lax.broadcasted_iota(jnp.int32, (q_len, k_len), 0)
            k = k_start + jax.lax.broadcasted_iota(jnp.int32, (q_len, k_len), 1)
            mask = k <= q if self.causal else jnp.ones((q_len, k_len), bool)
            if self.window is not None:
                mask = mask & (k > q - self.window)
            mask = mask[None, None]
        if self.key_mask is not None:
            keys = (self.key_mask[:, k_start:k_start + k_len] != 0)[:, None, None, :]
            mask = keys if mask is None else mask & keys
        return mask


def attention_implementation(backend: str, dtype: jnp.dtype, head_dim: int,
                             softcap: float | None, structured_mask: bool) -> str:
    """Which formulation ``attention`` runs: ``"cudnn"`` or ``"xla"``.

    ``"cudnn"`` (``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused
    flash attention, Dao 2023) only where it computes the same function: an NVIDIA GPU
    (``backend == "cuda"``, see ``current_backend``),
    bf16/fp16 inputs (cuDNN has no float32 flash kernel), a head dim that is a multiple of 8
    and at most 128 (what every GPU generation's kernel accepts), no soft-capping (cuDNN
    has none) and a mask that is None or an ``AttentionMask`` (``structured_mask``:
    causal / window are cuDNN's own mask types; key padding becomes its boolean mask).
    Everything else, CPU included, runs ``"xla"``: memjax's heads-first einsum formula,
    query-blocked when the scores would be large (``bench/attention_cpu.py`` measures it
    on CPU against ``jax.nn.dot_product_attention``'s XLA path, other layouts and
    PyTorch's SDPA).
    """
    fused = (backend == "cuda" and jnp.dtype(dtype) in (jnp.bfloat16,
             jnp.float16) and head_dim % 8 == 0 and head_dim <= 128 and softcap is None
             and structured_mask)
    return "cudnn" if fused else "xla"


def current_backend() -> str:
    """``jax.default_backend()``, with ``"gpu"`` told apart into ``"cuda"`` / ``"rocm"``
    (cuDNN exists only on the first)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = get_backend().platform_version.lower()
    return "cuda" if "cuda" in version else "rocm" if "rocm" in version else backend


def query_block_size(batch: int, q_len: int, k_len: int, heads: int,
                     max_score_bytes: int = MAX_SCORE_BYTES) -> int:
    """Queries per block so one block's float32 scores [B, H, block, Tk] fit the budget
    (at least 1, at most ``q_len``: one block is the dense formula)."""
    per_query = 4 * batch * heads * k_len
    return max(1, min(q_len, max_score_bytes // per_query))


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | AttentionMask | None, scale: float, *,
              softcap: float | None = None, block_size: int | None = None,
              max_score_bytes: int | None = None,
              implementation: str | None = None) -> jax.Array:
    """Exact softmax attention (Vaswani et al. 2017), ``softmax(q k^T * scale) v``.

    Args:
      q: [B, Tq, H, Dh]; k, v: [B, Tk, H or Hkv, Dh]: grouped-query K/V (Ainslie et al.
        2023) either repeated to H or as Hkv heads dividing H, K/V head j serving query
        heads j * H / Hkv .. (j + 1) * H / Hkv - 1 (HF's ``repeat_kv``); the fused path
        reads them unrepeated, the XLA path repeats them.
      mask: an ``AttentionMask``, or a bool array broadcastable to [B, H, Tq, Tk] (True =
        attend), or None. A query row whose keys are all masked gets uniform weights over
        all Tk keys (as with HF's additive minimum).
      scale: multiplies the scores (usually Dh ** -0.5).
      softcap: c (Gemma 2) replaces the scaled scores s by ``c * tanh(s / c)`` before the
        mask.
      block_size: queries per block; default from ``max_score_bytes``.
      max_score_bytes: the float32 score budget that sets the default block size
        (default ``MAX_SCORE_BYTES``, read at each call).
      implementation: ``"xla"`` or ``"cudnn"``; default ``attention_implementation`` of
        ``current_backend()`` at trace time.

    Returns:
      [B, Tq, H, Dh] in v's dtype. Scores and softmax in float32.

    When the scores [B, H, Tq, Tk] fit ``max_score_bytes`` this is the dense formula.
    Otherwise queries go in blocks (``lax.map``; a last, shorter block when the size does
    not divide Tq), each block against all keys it may attend to, so every softmax row is
    the same exact row as the dense one, and peak memory is O(block * Tk * H) instead of
    O(Tq * Tk * H). With a causal ``AttentionMask`` the blocks are grouped
    (``CAUSAL_GROUPS``) and each group reads only the keys up to its last query (and from
    its first query's window start), skipping ~(G - 1) / 2G of the work; a row left
    with no key to attend to (padding before the first real token) is set to the uniform
    average of all values, as the dense formula gives it. Unlike FlashAttention's online
    softmax over key blocks (Dao et al. 2022; Rabe & Staats 2021) no row is ever split,
    which keeps every row's rounding as the dense formula has it.
    """
    b, tq, h, dh = q.shape
    tk = k.shape[1]
    structured = isinstance(mask, AttentionMask)
    if implementation is None:
        implementation = attention_implementation(current_backend(), q.dtype, dh,
                                                  softcap, structured or mask is None)
    if implementation == "cudnn":
        return fused_attention(q, k, v, mask, scale, implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention implementation {implementation!r}: expected 'xla' "
                         f"or 'cudnn'")
    if k.shape[2] != h:
        if h % k.shape[2]:
            raise ValueError(f"attention: {h} query heads is not a multiple of "
                             f"{k.shape[2]} key/value heads")
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    budget = MAX_SCORE_BYTES if max_score_bytes is None else max_score_bytes
    block = block_size or query_block_size(b, tq, tk, h, budget)
    if block >= tq:
        dense = mask.block(0, tq, tk) if structured else mask
        return _dense_attention(q, k, v, dense, scale, softcap)
    return _blocked_attention(q, k, v, mask, scale, softcap, block)


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, T, H, Dh] <-> [B, H, T, Dh]."""
    return jnp.swapaxes(x, 1, 2)


def _dense_attention(q, k, v, mask, scale, softcap):
    """The whole score matrix at once; q/k/v [B, T, H, Dh], mask a bool array or None."""
    out = _attention_heads_first(_heads_first(q), _heads_first(k), _heads_first(v), mask,
                                 scale, softcap)
    return _heads_first(out)


def _attention_heads_first(q, k, v, mask, scale, softcap):
    """q [B, H, Tq, Dh], k/v [B, H, Tk, Dh] -> [B, H, Tq, Dh].

    Heads-first operands make both products plain batched matmuls over (B, H); XLA:CPU
    runs them 2-3.5x faster than the same einsums on [B, T, H, Dh] operands, transposes
    included (ViT shapes, vmapped per example; ``bench/attention_cpu.py``). The results
    differ from the [B, T, H, Dh] form only by float32 rounding (~1e-7).
    """
    b, h, tq, tk = *q.shape[:3], k.shape[2]
    # (B, H) merged into one batch axis for the products and the softmax: with the extra
    # (often unit: per-example calls are [1, H, T, Dh]) axis, XLA:CPU ran this 2.5x slower
    # under vmap (ViT shapes; the softmax's reductions were the slow part).
    merged = lambda x: x.reshape(b * h, *x.shape[2:])
    scores = jnp.einsum("nqd,nkd->nqk", merged(q), merged(k),
                        preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if mask is not None:
        scores = merged(jnp.where(mask, scores.reshape(b, h, tq, tk),
                                  jnp.finfo(jnp.float32).min))
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkd->nqd", weights, merged(v), preferred_element_type=jnp.float32)
    return out.reshape(b, h, tq, v.shape[-1]).astype(v.dtype)


def _mask_rows(mask, start, length: int, tq: int, k_lo: int, k_hi: int):
    """Rows ``start .. start + length - 1`` and key columns ``k_lo .. k_hi - 1`` of a mask
    (structured or an array broadcastable to [B, H, Tq, Tk])."""
    if mask is None:
        return None
    if isinstance(mask, AttentionMask):
        return mask.block(start, length, k_hi - k_lo, k_lo)
    if mask.ndim >= 2 and mask.shape[-2] != 1:
        full = jnp.broadcast_to(mask, mask.shape[:-2] + (tq, mask.shape[-1]))
        mask = jax.lax.dynamic_slice_in_dim(full, start, length, axis=full.ndim - 2)
    return mask if mask.shape[-1] == 1 else mask[..., k_lo:k_hi]


def _causal_groups(mask: AttentionMask, tq: int, block: int) -> tuple[int, list]:
    """(rows per group, [(k_lo, k_hi)] per group): ``CAUSAL_GROUPS`` groups of whole query
    blocks, group g reading only keys ``k_lo .. k_hi - 1`` (later keys are causally masked
    for all its queries; earlier ones outside every query's window)."""
    n_blocks = -(-tq // block)
    rows = block * -(-n_blocks // min(CAUSAL_GROUPS, n_blocks))
    ranges = []
    for q_start in range(0, tq, rows):
        k_lo = 0 if mask.window is None else max(0, q_start - mask.window + 1)
        ranges.append((k_lo, min(q_start + rows, tq)))
    return rows, ranges


def _blocked_attention(q, k, v, mask, scale, softcap, block: int):
    """Queries in blocks of ``block``; for a causal ``AttentionMask`` (Tq = Tk) grouped so
    each group reads only its keys (``_causal_groups``). The heads-first transposes are
    done once, outside the loops."""
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
    if not (isinstance(mask, AttentionMask) and mask.causal and tq == tk):
        rows_of = lambda start, length: _mask_rows(mask, start, length, tq, 0, tk)
        return _heads_first(_query_range(q, k, v, scale, softcap, block, rows_of, 0, tq))
    rows, ranges = _causal_groups(mask, tq, block)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows * len(ranges) - tq), (0, 0)))

    def group(index: int, k_lo: int, k_hi: int):
        def run(_):
            rows_of = lambda start, length: mask.block(start, length, k_hi - k_lo, k_lo)
            q_start = index * rows
            out = _query_range(q, k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], scale, softcap,
                               block, rows_of, q_start, q_start + rows)
            return _uniform_where_no_key(out, mask.block(q_start, rows, k_hi - k_lo, k_lo),
                                         v) if (k_lo, k_hi) != (0, tk) else out
        return run

    branches = [group(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    # One group at a time: lax.map over the group index, each a static-shape branch (the
    # index is never batched, so under vmap this stays a conditional, not a select).
    out = jax.lax.map(lambda i: jax.lax.switch(i, branches, None),
                      jnp.arange(len(ranges), dtype=jnp.int32))  # [G, B, H, rows, Dh]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, rows * len(ranges), v.shape[-1])
    return _heads_first(out[:, :, :tq])


def _query_range(q, k, v, scale, softcap, block, mask_rows, q_start, q_stop):
    """Queries ``q_start .. q_stop - 1`` of heads-first q in blocks: ``lax.map`` over the
    whole blocks, then the rest."""
    b, h = q.shape[:2]
    n_full, rest = divmod(q_stop - q_start, block)

    def one_block(start, length):
        rows = jax.lax.dynamic_slice_in_dim(q, start, length, axis=2)
        return _attention_heads_first(rows, k, v, mask_rows(start, length), scale, softcap)

    parts = []
    if n_full:
        starts = q_start + jnp.arange(n_full, dtype=jnp.int32) * block
        out = jax.lax.map(lambda start: one_block(start, block), starts)  # [n, B, H, blk, D]
        parts.append(jnp.moveaxis(out, 0, 2).reshape(b, h, n_full * block, v.shape[-1]))
    if rest:
        parts.append(one_block(q_start + n_full * block, rest))
    return jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def _uniform_where_no_key(out, rows_mask, v):
    """Rows of ``out`` [B, H, rows, Dh] whose ``rows_mask`` [B or 1, 1, rows, keys] allows
    no key become the mean of all values v [B, H, Tk, Dh], the dense formula's uniform row
    (softmax of equal minimum scores)."""
    no_key = ~jnp.any(rows_mask, axis=-1, keepdims=True)
    mean = jnp.mean(v.astype(jnp.float32), axis=2, keepdims=True).astype(out.dtype)
    return jnp.where(no_key, mean, out)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
                    scale: float, *, implementation: str = "cudnn") -> jax.Array:
    """``attention`` through ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on GPU).

    q [B, Tq, H, Dh], k/v [B, Tk, H or fewer (GQA), Dh] -> [B, Tq, H, Dh]. The mask maps
    onto its arguments: ``causal`` -> ``is_causal``, ``window`` W -> ``local_window_size =
    (W - 1, 0)`` (keys q - W < k <= q), ``key_mask`` -> a bool ``mask`` [B, 1, Tq, Tk].
    ``implementation="xla"`` runs the same call through XLA, which is how this mapping is
    tested on CPU. Difference: under cuDNN a query row with every key masked (a padded
    position before the first real token) need not be the uniform average ``attention``
    gives; such rows are padding, which the signals never read.
    """
    if mask is not None and not isinstance(mask, AttentionMask):
        raise ValueError("fused attention takes an AttentionMask, not a dense mask array")
    mask = mask or AttentionMask()
    keys = None
    if mask.key_mask is not None:
        keys = jnp.broadcast_to((mask.key_mask != 0)[:, None, None, :],
                                (q.shape[0], 1, q.shape[1], k.shape[1]))
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=keys, scale=scale,
                                        is_causal=mask.causal, local_window_size=window,
                                        implementation=implementation)


def causal_mask(attention_mask: jax.Array | None, length: int) -> jax.Array:
    """[B or 1, 1, T, T] bool: causal, and keys with attention_mask = 0 masked out."""
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, None, :] != 0)
    return mask


def padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """[B, 1, 1, T] bool key mask for bidirectional encoders (None: attend everywhere)."""
    return None if attention_mask is None else (attention_mask[:, None, None, :] != 0)
