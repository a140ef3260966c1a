"""LlamaGen's class-conditional image-token GPT in Flax NNX (Sun et al. 2024, "Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation"; FoundationVision/LlamaGen,
``autoregressive/models/gpt.py``, ``Transformer`` with ``model_type='c2i'``).

A Llama decoder (pre-norm RMSNorm blocks, SwiGLU ``w2(silu(w1 x) * w3 x)``, grouped-query
attention with ``n_kv_head`` K/V heads, no biases) over the sequence
``[class embedding, image tokens 0 .. T-2]``; row t of the logits predicts image token t
(row 0 from the class prefix), exactly the rows LlamaGen's training forward scores with
``cls_token_num = 1``. The class embedding table has ``num_classes + 1`` rows when
``class_dropout_prob > 0``: row ``num_classes`` is the null class of classifier-free
guidance (unconditional logits).

Positions: a 2-D rotary embedding over the ``g x g`` token grid (``g = sqrt(block_size)``).
Each head's dims are taken in interleaved pairs (2j, 2j + 1); with ``n = head_dim / 4``
frequencies ``f_j = 1 / rope_base ** (2j / (head_dim / 2))``, pair j < n is rotated by
``row * f_j`` and pair n + j by ``col * f_j``. Sequence position p uses row p of LlamaGen's
table ``[cls_token_num zero rows; the g*g grid cells in raster order]``: the first
``cls_token_num`` positions get cos = sin = 0, i.e. their queries and keys are multiplied
by ZERO (not left unrotated: a prefix key scores exactly 0 against every query), and
position p >= cls_token_num gets grid cell ``p - cls_token_num``. With the usual
``cls_token_num = 1`` image token t (position t + 1) sits at cell t. With
``cls_token_num = C > 1`` the c2i model still has ONE class token (LlamaGen's
``LabelEmbedder`` returns one row; ``[:, :C]`` keeps it), so image tokens 0 .. C-2 also get
zero rotation and token t >= C-1 sits at cell t + 1 - C, as LlamaGen's forward and its
``generate`` (positions ``input_pos``) both compute; memjax returns every row (LlamaGen's
training slice ``logits[:, C-1:]`` would no longer line up with its targets for C > 1).

The interleaved pairs are stored permuted (per head: even dims first, then odd dims) in
memjax's q/k kernels, so the Llama port's half-split rotary computes exactly LlamaGen's
interleaved rotation (q . k is unchanged by a permutation applied to both); the blocks are
:class:`memjax.models.llama.LlamaDecoderLayer` and its taps (``layers.{i}.attn_out``,
``layers.{i}.mlp_hidden``, ``layers.{i}.out``), plus ``final`` (after ``norm``).

LlamaGen ships no config.json; memjax reads its own (``"model_type": "llamagen"``) with the
names of LlamaGen's ``ModelArgs``: ``dim``, ``n_layer``, ``n_head``, ``n_kv_head``,
``multiple_of``, ``ffn_dim_multiplier``, ``rope_base``, ``norm_eps``, ``num_classes``,
``class_dropout_prob``, ``vocab_size``, ``cls_token_num``, ``block_size`` (and
``gpt_type``, LlamaGen's ``model_type``, renamed because config.json's ``model_type`` names
the architecture; only "c2i" is ported). Dropouts, ``drop_path_rate``, ``max_batch_size``,
``max_seq_len`` and ``initializer_range`` do not change inference and are accepted as
given. The FFN hidden size is ``find_multiple(int(m * int(2 * 4 * dim / 3)), multiple_of)``
(m = ``ffn_dim_multiplier`` when set), as LlamaGen's ``FeedForward``.

Weights: LlamaGen's state dict (``tok_embeddings``, ``cls_embedding.embedding_table``,
``layers.{i}.attention.wqkv`` [q; k; v rows] / ``wo``, ``feed_forward.w1/w2/w3``,
``attention_norm`` / ``ffn_norm``, ``norm``, ``output``), from safetensors or, with
``allow_pickle``, from a ``.pt``; keys may carry a ``module.`` / ``_orig_mod.`` /
``model.`` prefix (DDP, ``torch.compile``). Its ``freqs_cis`` and KV-cache buffers are
ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from memjax.errors import InputError
from memjax.models.layers import AttentionMask, Dense
from memjax.models.llama import LlamaConfig, LlamaDecoderLayer, RMSNorm
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap


@dataclasses.dataclass(frozen=True)
class LlamaGenConfig:
    """LlamaGen's ``ModelArgs`` (defaults as there; ``gpt_type`` is its ``model_type``)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    gpt_type: str = "c2i"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's ``FeedForward`` hidden size."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return hidden if hidden % self.multiple_of == 0 else \
            hidden + self.multiple_of - hidden % self.multiple_of

    @property
    def has_null_class(self) -> bool:
        """Whether the class table has the null (unconditional) row ``num_classes``."""
        return self.class_dropout_prob > 0

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    def decoder_config(self) -> LlamaConfig:
        """The Llama-port configuration of the decoder blocks."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.dim,
                           intermediate_size=self.ffn_hidden, num_hidden_layers=self.n_layer,
                           num_attention_heads=self.n_head, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, hidden_act="silu",
                           rms_norm_eps=self.norm_eps)


def grid_rotary_angles(config: LlamaGenConfig) -> np.ndarray:
    """[block_size, head_dim / 2] float32 angles of LlamaGen's ``precompute_freqs_cis_2d``:
    cell ``r * g + c`` rotates pair j < head_dim / 4 by ``r * f_j`` and pair
    head_dim / 4 + j by ``c * f_j`` (float32 products, as its torch code)."""
    half = config.head_dim // 2
    exponent = np.arange(0, half, 2, dtype=np.float32)[: half // 2] / np.float32(half)
    freqs = (np.float32(1.0) / np.power(np.float32(config.rope_base), exponent)).astype(
        np.float32)
    g = config.grid_size
    steps = np.arange(g, dtype=np.float32)[:, None] * freqs[None, :]  # [g, head_dim / 4]
    rows = np.broadcast_to(steps[:, None, :], (g, g, steps.shape[1]))
    cols = np.broadcast_to(steps[None, :, :], (g, g, steps.shape[1]))
    return np.concatenate([rows, cols], axis=-1).reshape(g * g, half).astype(np.float32)


def rotary_cos_sin(config: LlamaGenConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` [length, head_dim] for sequence positions ``0 .. length-1`` in the
    half-split layout of :func:`memjax.models.layers.apply_rotary` (pair j's value at dims
    j and j + head_dim / 2): ``cls_token_num`` zero rows, then the grid cells."""
    angles = grid_rotary_angles(config)
    cos = np.concatenate([np.zeros((config.cls_token_num, angles.shape[1]), np.float32),
                          np.cos(angles)])[:length]
    sin = np.concatenate([np.zeros((config.cls_token_num, angles.shape[1]), np.float32),
                          np.sin(angles)])[:length]
    return (jnp.asarray(np.concatenate([cos, cos], axis=-1)),
            jnp.asarray(np.concatenate([sin, sin], axis=-1)))


def interleaved_to_halves(head_dim: int) -> np.ndarray:
    """Within-head order putting LlamaGen's interleaved rotary pairs (2j, 2j + 1) at the
    half-split positions (j, j + head_dim / 2): even dims first, then odd dims."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


class LlamaGen(nnx.Module):
    """LlamaGen's c2i ``Transformer`` at inference (no dropout)."""

    def __init__(self, config: LlamaGenConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.dim
        self.tok_embeddings = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, d)) * 0.02)
        self.cls_embedding = nnx.Param(jax.random.normal(
            rngs.params(), (config.num_classes + int(config.has_null_class), d)) * 0.02)
        decoder = config.decoder_config()
        self.layers = nnx.List([LlamaDecoderLayer(decoder, i, rngs=rngs)
                                for i in range(config.n_layer)])
        self.norm = RMSNorm(d, eps=config.norm_eps)
        self.output = Dense(d, config.vocab_size, rngs=rngs, use_bias=False)

    def memjax_interface(self) -> tuple[str, str, tuple[str, ...]]:
        return ("iar", "__call__", ("class_labels", "input_ids"))

    def __call__(self, class_labels: jax.Array, input_ids: jax.Array, *,
                 taps: Taps | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of image tokens ``input_ids`` [B, T] given
        ``class_labels`` [B] (``num_classes``: the null class); row t predicts
        ``input_ids[:, t]``. T is at most ``block_size``."""
        t = input_ids.shape[-1]
        if t > self.config.block_size:
            raise InputError(f"input_ids: {t} tokens, but this LlamaGen's grid holds "
                             f"block_size={self.config.block_size}")
        prefix = self.cls_embedding[...][class_labels][:, None, :]
        tokens = self.tok_embeddings[...][input_ids[:, :-1]]
        x = jnp.concatenate([prefix, tokens.astype(prefix.dtype)], axis=1)
        cos, sin = rotary_cos_sin(self.config, t)
        mask = AttentionMask(None, causal=True)
        for layer in self.layers:
            x = layer(x, mask, cos, sin, taps)
        h = tap(taps, "final", self.norm(x))
        return self.output(h).astype(jnp.float32)


# ModelArgs fields that never change inference (dropout, KV-cache sizes, t2i captions).
_INFERENCE_NEUTRAL = {"token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                      "drop_path_rate", "max_batch_size", "max_seq_len", "caption_dim"}
_FIELDS = {f.name for f in dataclasses.fields(LlamaGenConfig)}


def from_config(config: dict[str, Any]) -> LlamaGenConfig:
    """memjax's LlamaGen config.json (``ModelArgs`` names) -> :class:`LlamaGenConfig`."""
    check_config(config, _FIELDS | _INFERENCE_NEUTRAL, {}, "llamagen")
    values = {k: config[k] for k in _FIELDS if k in config}
    try:
        result = LlamaGenConfig(**values)
        ints = ("dim", "n_layer", "n_head", "multiple_of", "num_classes", "vocab_size",
                "cls_token_num", "block_size")
        bad = [k for k in ints if not isinstance(getattr(result, k), int)
               or isinstance(getattr(result, k), bool) or getattr(result, k) < 1]
    except TypeError as error:
        raise InputError(f"llamagen config.json: {error}") from None
    if bad:
        raise InputError(f"llamagen config.json {bad}: expected positive integers")
    if result.gpt_type != "c2i":
        raise InputError(f"llamagen config.json gpt_type={result.gpt_type!r}: memjax ports "
                         "only the class-conditional 'c2i' model (t2i's caption embedder is "
                         "not ported)")
    if result.dim % result.n_head or result.head_dim % 4:
        raise InputError(f"llamagen config.json dim={result.dim}, n_head={result.n_head}: "
                         "the 2-D rotary embedding needs head_dim = dim / n_head, a multiple "
                         "of 4")
    if result.n_head % result.kv_heads:
        raise InputError(f"llamagen config.json n_head={result.n_head} is not a multiple of "
                         f"n_kv_head={result.kv_heads}")
    if result.grid_size ** 2 != result.block_size:
        raise InputError(f"llamagen config.json block_size={result.block_size}: expected a "
                         "square number of tokens (the token grid)")
    return result


_PREFIXES = ("module.", "_orig_mod.", "model.")


def _key_prefix(keys) -> str:
    """The wrapper prefix every key shares (DDP ``module.``, ``torch.compile``'s
    ``_orig_mod.``), repeated as often as it is nested."""
    prefix = ""
    while True:
        rest = [k[len(prefix):] for k in keys]
        extra = next((p for p in _PREFIXES if rest and all(k.startswith(p) for k in rest)),
                     None)
        if extra is None:
            return prefix
        prefix += extra


def _permute_heads(kernel: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Kernel [D, heads * head_dim] with each head's columns in half-split order."""
    order = np.concatenate([h * head_dim + interleaved_to_halves(head_dim)
                            for h in range(heads)])
    return kernel[:, order]


def convert(reader, config: LlamaGenConfig) -> dict[tuple, Any]:
    """LlamaGen state-dict keys -> param paths (Linear weights [out, in] transposed; wqkv
    split into q/k/v, q/k columns permuted per head for the half-split rotary)."""
    prefix = _key_prefix([k for k in reader.tensors
                          if not any(s in k for s in ("freqs_cis", "kv_cache", "causal_mask"))])
    take = lambda key: reader.take(prefix + key)
    transpose = lambda w: None if w is None else w.T
    params = {("tok_embeddings",): take("tok_embeddings.weight"),
              ("cls_embedding",): take("cls_embedding.embedding_table.weight"),
              ("norm", "scale"): take("norm.weight"),
              ("output", "kernel"): transpose(take("output.weight"))}
    d, dh, h, kv = config.dim, config.head_dim, config.n_head, config.kv_heads
    for i in range(config.n_layer):
        layer = f"layers.{i}."
        params[("layers", i, "input_layernorm", "scale")] = take(f"{layer}attention_norm.weight")
        params[("layers", i, "post_attention_layernorm", "scale")] = take(
            f"{layer}ffn_norm.weight")
        for ours, theirs in (("o_proj", "attention.wo"), ("gate_proj", "feed_forward.w1"),
                             ("down_proj", "feed_forward.w2"), ("up_proj", "feed_forward.w3")):
            params[("layers", i, ours, "kernel")] = transpose(take(f"{layer}{theirs}.weight"))
        key = f"{layer}attention.wqkv.weight"
        wqkv = take(key)
        if wqkv is None:
            continue
        expected = ((h + 2 * kv) * dh, d)
        if tuple(wqkv.shape) != expected:
            raise InputError(f"llamagen checkpoint tensor {prefix + key}: shape "
                             f"{tuple(wqkv.shape)}, the config needs {expected} "
                             "(n_head + 2 n_kv_head heads of dim / n_head rows)")
        kernel = np.asarray(wqkv).T
        q, k, v = np.split(kernel, [h * dh, (h + kv) * dh], axis=1)
        params[("layers", i, "q_proj", "kernel")] = _permute_heads(q, h, dh)
        params[("layers", i, "k_proj", "kernel")] = _permute_heads(k, kv, dh)
        params[("layers", i, "v_proj", "kernel")] = v
    return {k: v for k, v in params.items() if v is not None}


def partition_rules(config: LlamaGenConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style, as the Llama port: q/k/v and w1/w3 column-parallel, wo/w2
    row-parallel; the vocabulary of the token embedding and the output over ``model``."""
    return [
        (r"/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", PartitionSpec(None, "model")),
        (r"/(o_proj|down_proj)/kernel$", PartitionSpec("model", None)),
        (r"^tok_embeddings$", PartitionSpec("model", None)),
        (r"^output/kernel$", PartitionSpec(None, "model")),
    ]


ARCH = register(Architecture(
    name="llamagen", model_types=("llamagen",), from_hf_config=from_config,
    build=lambda config, rngs: LlamaGen(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules,
    # Buffers some LlamaGen checkpoints carry (rotary table, KV cache, causal mask).
    ignore=(r"(^|\.)freqs_cis$", r"\.kv_cache\.", r"(^|\.)causal_mask$"),
    config_class=LlamaGenConfig,
))
