"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) in Flax NNX, matching Hugging Face's PyTorch code.

Black et al. 2022 (GPT-NeoX-20B); Biderman et al. 2023 (Pythia). Pre-LayerNorm decoder
blocks with rotary position embeddings (Su et al. 2021) on the first ``rotary_pct`` of
each head's dimensions, a fused ``query_key_value`` projection, and (by default) the
"parallel" residual ``x + attn(ln_1(x)) + mlp(ln_2(x))``. The unembedding ``embed_out``
is separate from the token embedding unless ``tie_word_embeddings``.

``__call__`` returns logits [B, T, V]; ``hidden_states`` returns the final (post
``final_layer_norm``) hidden states [B, T, D] and ``unembedding()`` the [D, V] output
matrix, for the vocabulary-chunked token signals.

Layout notes:

- ``query_key_value`` keeps Hugging Face's output layout, interleaved per head: the 3D
  outputs are H groups of ``[q_h, k_h, v_h]`` (each head_dim wide), so a column shard
  over whole heads holds complete heads (Megatron-style tensor parallelism).
- Positions are ``0..T-1`` for every row, whatever ``attention_mask`` says (as HF does
  when no ``position_ids`` are passed): left-padded rows therefore see shifted positions,
  exactly as in HF. Rotary embeddings have no length limit, so no length is refused;
  ``max_position_embeddings`` is kept only as the trained context length.

Taps (see :mod:`memjax.models.taps`): ``layers.{i}.attn_out`` (after ``dense``),
``layers.{i}.mlp_hidden`` (after the activation), ``layers.{i}.out`` (block output),
``final`` (after ``final_layer_norm``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from memjax.errors import InputError
from memjax.models.layers import (
    ACTIVATIONS,
    AttentionMask,
    Dense,
    LayerNorm,
    apply_rotary,
    attention,
    rotary_tables,
)
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    """memjax's GPT-NeoX configuration (defaults: Pythia-160M).

    ``rotary_pct`` and ``rotary_emb_base`` are HF's ``partial_rotary_factor`` and
    ``rope_theta`` (``rope_parameters``; ``rotary_pct``/``rotary_emb_base`` in older
    config files).
    """

    vocab_size: int = 50304
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Rotated dimensions per head: ``int(head_dim * rotary_pct)`` rounded up to even
        (HF builds ``cos``/``sin`` from ``arange(0, dim, 2)`` and rotates that many)."""
        dim = int(self.head_dim * self.rotary_pct)
        return 2 * len(range(0, dim, 2))


def rotary_inv_freq(config: GPTNeoXConfig) -> np.ndarray:
    """Inverse frequencies [rotary_ndims / 2], float32, computed as HF does (float32 ops)."""
    dim = int(config.head_dim * config.rotary_pct)
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(config.rotary_emb_base), exponent)
            ).astype(np.float32)


def rotary_cos_sin(config: GPTNeoXConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` [T, rotary_ndims] float32 for positions ``0..T-1``."""
    return rotary_tables(rotary_inv_freq(config), length)


class GPTNeoXLayer(nnx.Module):
    def __init__(self, config: GPTNeoXConfig, index: int, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.input_layernorm = LayerNorm(d, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(d, eps=config.layer_norm_eps)
        self.query_key_value = Dense(d, 3 * d, rngs=rngs, use_bias=config.attention_bias)
        self.dense = Dense(d, d, rngs=rngs, use_bias=config.attention_bias)
        self.dense_h_to_4h = Dense(d, config.intermediate_size, rngs=rngs)
        self.dense_4h_to_h = Dense(config.intermediate_size, d, rngs=rngs)
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.parallel = config.use_parallel_residual
        self.act = config.hidden_act
        self.name = f"layers.{index}"

    def _attention(self, x, mask, cos, sin, taps):
        b, t, d = x.shape
        # HF layout: per head, [q_h, k_h, v_h] side by side.
        qkv = self.query_key_value(x).reshape(b, t, self.n_head, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = attention(q, k, v, mask, self.scale)
        return tap(taps, f"{self.name}.attn_out", self.dense(a.reshape(b, t, d)))

    def _mlp(self, x, taps):
        h = tap(taps, f"{self.name}.mlp_hidden",
                ACTIVATIONS[self.act](self.dense_h_to_4h(x)))
        return self.dense_4h_to_h(h)

    def __call__(self, x, mask, cos, sin, taps):
        a = self._attention(self.input_layernorm(x), mask, cos, sin, taps)
        if self.parallel:
            out = self._mlp(self.post_attention_layernorm(x), taps) + a + x
        else:
            x = a + x
            out = self._mlp(self.post_attention_layernorm(x), taps) + x
        return tap(taps, f"{self.name}.out", out)


class GPTNeoXForCausalLM(nnx.Module):
    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.config = config
        shape = (config.vocab_size, config.hidden_size)
        self.embed_in = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02)
        self.layers = nnx.List([GPTNeoXLayer(config, i, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = (None if config.tie_word_embeddings else
                          nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      taps: Taps | None = None) -> jax.Array:
        """Final hidden states [B, T, D] (after ``final_layer_norm``) of ``input_ids`` [B, T].

        ``attention_mask`` [B, T] (1 = token, 0 = padding) masks padded keys; positions
        stay ``0..T-1`` in every row, as in HF without ``position_ids``.
        """
        t = input_ids.shape[-1]
        x = self.embed_in[...][input_ids]
        mask = AttentionMask(attention_mask, causal=True)  # never a [T, T] array
        cos, sin = rotary_cos_sin(self.config, t)
        for layer in self.layers:
            x = layer(x, mask, cos, sin, taps)
        return tap(taps, "final", self.final_layer_norm(x))

    def unembedding(self) -> jax.Array:
        """The output matrix [D, V]: ``embed_out`` transposed (``embed_in`` when tied)."""
        weight = self.embed_in if self.embed_out is None else self.embed_out
        return weight[...].T

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """Logits [B, T, V]."""
        h = self.hidden_states(input_ids, attention_mask, taps=taps)
        return h @ self.unembedding().astype(h.dtype)


_IMPLEMENTED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings",
                "layer_norm_eps", "use_parallel_residual", "attention_bias",
                "tie_word_embeddings", "rope_parameters", "rope_scaling", "rotary_pct",
                "rotary_emb_base",
                # Dropout is off at inference (older config files use the *_prob names).
                "attention_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                "hidden_dropout_prob"}
_DEFAULTS: dict[str, Any] = {}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope(hf: dict[str, Any]) -> tuple[float, float]:
    """(rotary_pct, rotary_emb_base) with HF's precedence: ``rope_scaling``, else
    ``rope_parameters``; missing entries from ``rotary_pct``/``rotary_emb_base``, else
    0.25 and 10000. Only the default (unscaled) rotary embedding is implemented."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"gpt_neox config.json rope_parameters={params!r}: expected a dict")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise InputError(f"gpt_neox config.json rope_type={rope_type!r}: memjax implements "
                         "only the default (unscaled) rotary embedding")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise InputError(f"gpt_neox config.json rope parameters {unknown} are not implemented "
                         "(memjax implements rope_theta and partial_rotary_factor)")
    pct = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    base = params.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    if not 0.0 <= float(pct) <= 1.0:
        raise InputError(f"gpt_neox config.json partial_rotary_factor={pct!r}: expected a "
                         "fraction in [0, 1]")
    if float(base) <= 0:
        raise InputError(f"gpt_neox config.json rope_theta={base!r}: expected a positive base")
    return float(pct), float(base)


def from_hf_config(hf: dict[str, Any]) -> GPTNeoXConfig:
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "gpt_neox")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise InputError(f"gpt_neox config.json hidden_act={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    pct, base = _rope(hf)
    fields = {f.name for f in dataclasses.fields(GPTNeoXConfig)} - {"rotary_pct",
                                                                     "rotary_emb_base"}
    # HF's GPTNeoXConfig defaults (the 20B model) for anything the file leaves out.
    values = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44,
              "num_attention_heads": 64, "intermediate_size": 24576}
    values.update({k: v for k, v in hf.items() if k in fields})
    config = GPTNeoXConfig(**values, rotary_pct=pct, rotary_emb_base=base)
    if config.hidden_size % config.num_attention_heads:
        raise InputError(f"gpt_neox config.json: hidden_size={config.hidden_size} is not "
                         f"divisible by num_attention_heads={config.num_attention_heads}")
    return config


def convert(reader, config: GPTNeoXConfig) -> dict[tuple, np.ndarray]:
    """HF GPT-NeoX keys -> param paths; Linear weights [out, in] are transposed to [in, out]."""
    prefix = "gpt_neox." if any(k.startswith("gpt_neox.") for k in reader.tensors) else ""
    take = lambda key: reader.take(prefix + key)
    # A view, not a copy: fill_params traces it back to its checkpoint key for messages.
    transpose = lambda w: None if w is None else w.T
    params = {("embed_in",): take("embed_in.weight"),
              ("final_layer_norm", "scale"): take("final_layer_norm.weight"),
              ("final_layer_norm", "bias"): take("final_layer_norm.bias")}
    linears = {"query_key_value": ("attention.query_key_value", config.attention_bias),
               "dense": ("attention.dense", config.attention_bias),
               "dense_h_to_4h": ("mlp.dense_h_to_4h", True),
               "dense_4h_to_h": ("mlp.dense_4h_to_h", True)}
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params[("layers", i, norm, "scale")] = take(f"{layer}{norm}.weight")
            params[("layers", i, norm, "bias")] = take(f"{layer}{norm}.bias")
        for ours, (theirs, has_bias) in linears.items():
            params[("layers", i, ours, "kernel")] = transpose(take(f"{layer}{theirs}.weight"))
            if has_bias:
                params[("layers", i, ours, "bias")] = take(f"{layer}{theirs}.bias")
    # Checkpoints name the unembedding embed_out (HF's on-disk name) or lm_head.
    out_key = "lm_head.weight" if "lm_head.weight" in reader and \
        "embed_out.weight" not in reader else "embed_out.weight"
    if not config.tie_word_embeddings:
        params[("embed_out",)] = reader.take(out_key)
    elif out_key in reader:
        tied = reader.take(out_key)
        if params[("embed_in",)] is not None and not np.array_equal(tied, params[("embed_in",)]):
            raise InputError(f"gpt_neox checkpoint: {out_key} differs from embed_in.weight, but "
                             "config.json has tie_word_embeddings=True")
    return {k: v for k, v in params.items() if v is not None}


def partition_rules(config: GPTNeoXConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style: column-parallel in-projections, row-parallel out-projections; the
    vocabulary of both embeddings over ``model``."""
    return [
        (r"/(query_key_value|dense_h_to_4h)/kernel$", PartitionSpec(None, "model")),
        (r"/(query_key_value|dense_h_to_4h)/bias$", PartitionSpec("model")),
        (r"/(dense|dense_4h_to_h)/kernel$", PartitionSpec("model", None)),
        (r"^(embed_in|embed_out)$", PartitionSpec("model", None)),
    ]


ARCH = register(Architecture(
    name="gpt_neox", model_types=("gpt_neox",), from_hf_config=from_hf_config,
    build=lambda config, rngs: GPTNeoXForCausalLM(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules,
    # Causal-mask and rotary buffers that old checkpoints saved alongside the weights.
    ignore=(r"\.attention\.(masked_)?bias$", r"\.rotary_emb\.inv_freq$"),
    config_class=GPTNeoXConfig,
))
