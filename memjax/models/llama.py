"""Llama-family decoders (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Olmo2ForCausalLM``, ``GemmaForCausalLM``, ``Gemma2ForCausalLM``) in
Flax NNX, matching Hugging Face's PyTorch code.

Touvron et al. 2023 (LLaMA); Jiang et al. 2023 (Mistral 7B); Yang et al. 2024 (Qwen2);
Yang et al. 2025 (Qwen3); OLMo et al. 2024 (OLMo 2); Gemma Team 2024 (Gemma; Gemma 2).

Pre-norm decoder blocks (OLMo 2, Gemma 2: other norm placements, below)
``x + attn(rms_1(x))`` then ``x + mlp(rms_2(x))`` with RMSNorm (Zhang & Sennrich 2019),
rotary position embeddings (Su et al. 2021) on the whole head, grouped-query attention
(Ainslie et al. 2023: ``num_key_value_heads`` K/V heads, each shared by
``num_attention_heads / num_key_value_heads`` query heads, as HF's ``repeat_kv``) and a
gated MLP ``down(act(gate(x)) * up(x))`` (Shazeer 2020: SwiGLU with silu, GeGLU with gelu).

``__call__`` returns logits [B, T, V]; ``hidden_states`` returns the final (post ``norm``)
hidden states [B, T, D] and ``unembedding()`` the [D, V] output matrix, for the
vocabulary-chunked token signals (the GPT-2 / GPT-NeoX protocol); ``final_logit_softcap``
is Gemma 2's cap on the logits (None elsewhere), which the token signals apply per chunk.

Family differences, all from config.json:

- Llama: ``attention_bias`` puts a bias on q/k/v/o alike; ``mlp_bias`` on gate/up/down.
- Qwen2: q/k/v have a bias and o has none (HF hard-codes this; config.json has no
  ``attention_bias``). Sliding-window layers: ``layer_types`` entries "sliding_attention"
  (when a config.json has none, HF's default: layers ``>= max_window_layers`` when
  ``use_sliding_window``) mask keys ``q - k >= sliding_window``; the others are full.
- Qwen3: Llama's ``attention_bias`` plus ``q_norm`` / ``k_norm``, RMSNorms over each head's
  ``head_dim`` applied to q and k before the rotary embedding; sliding layers as Qwen2.
- OLMo 2: norms after the sublayers, ``x + rms_a(attn(x))`` then ``x + rms_f(mlp(x))``
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``, no ``input_layernorm``),
  and ``q_norm`` / ``k_norm`` over the whole q / k projections (all heads), before the
  rotary embedding. Its RMSNorm multiplies the scale in float32 before the cast back.
- Mistral: ``sliding_window`` W masks keys with ``q - k >= W`` in every layer (HF's
  ``sliding_window_overlay``); a no-op while the sequence is no longer than W.
- Gemma: embeddings times ``sqrt(hidden_size)`` (a float32 constant cast to the weights'
  dtype, as HF's ``GemmaTextScaledWordEmbedding``); RMSNorm ``(1 + weight) * normed`` in
  float32, then the cast (HF's ``GemmaRMSNorm``; Llama casts before its scale); GeGLU with
  ``hidden_act`` ("gelu" read as "gelu_pytorch_tanh", as HF; a ``hidden_activation`` that
  disagrees is refused, see ``_activation``); explicit ``head_dim``; tied embeddings by
  default; ``attention_bias`` on q/k/v/o.
- Gemma 2: Gemma plus "sandwich" norms ``x + post_attn(attn(in(x)))`` then
  ``x + post_ff(mlp(pre_ff(x)))``; attention scale ``query_pre_attn_scalar ** -0.5``;
  attention scores soft-capped ``c * tanh(s / c)`` (``attn_logit_softcapping``, before the
  mask) and logits too (``final_logit_softcapping``); ``layer_types`` alternating
  "sliding_attention" (window ``sliding_window``) and "full_attention" (HF's default: even
  layers sliding). Activation from ``hidden_activation``.
- Gemma 3 (``gemma3``, ``gemma3_text``) is refused, naming what is missing.
- Rotary ``rope_type``: "default"; "linear" (inverse frequencies / factor); "llama3"
  (Llama 3.1's wavelength-banded scaling); "dynamic" (dynamic NTK: the base becomes
  ``theta * (factor * T / L - (factor - 1)) ** (d / (d - 2))`` once the length T exceeds
  L = ``max_position_embeddings``); "yarn" (Peng et al. 2023: ``beta_fast`` /
  ``beta_slow`` ramp between extrapolated and interpolated frequencies, ``truncate``,
  cos/sin scaled by ``attention_factor`` or the ``mscale`` / ``mscale_all_dim`` formula,
  ``original_max_position_embeddings`` defaulting to ``max_position_embeddings``). Any
  other type ("longrope", ...) is refused by name.

Where memjax differs from HF: dynamic NTK. HF recomputes the frequencies from
``max(position_ids) + 1`` of the batch, and keeps them (state in the module) until a batch
shorter than L comes; memjax computes them from the static length T of the program it
runs. The two are equal when no ``position_ids`` are passed (HF then uses T, the batch's
padded length) and the HF module has not seen a longer batch since its last batch shorter
than L. Consequently, past L the scores of a dynamic-NTK model depend on the padded length
of the batch in both: the engine's length buckets change T, and so the frequencies.

Positions are ``0..T-1`` for every row, whatever ``attention_mask`` says (as HF does when no
``position_ids`` are passed, and as the GPT-NeoX port does): a left-padded row therefore
sees shifted positions, exactly as in HF. Padded keys are masked out.

Taps (see :mod:`memjax.models.taps`): ``layers.{i}.attn_out`` (after ``o_proj``),
``layers.{i}.mlp_hidden`` (``act(gate(x)) * up(x)``, the input of ``down_proj``: the
gated hidden state, not HF's ``act_fn`` output alone), ``layers.{i}.out`` (block output),
``final`` (after ``norm``).
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
from memjax.models.layers import (
    ACTIVATIONS,
    AttentionMask,
    Dense,
    apply_rotary,
    attention,
    rotary_tables,
)
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """memjax's Llama-family configuration (defaults: HF's ``LlamaConfig``, Llama-2-7B).

    ``qkv_bias`` / ``o_bias`` are HF's ``attention_bias`` for Llama (both), and (True, False)
    for Qwen2. ``rope_*`` are the entries of HF's ``rope_parameters`` (``rope_scaling`` in
    older files); ``rope_factor`` etc. are used only by the scaled rope types (yarn:
    ``rope_attention_factor`` / ``rope_mscale`` / ``rope_mscale_all_dim`` None when absent,
    ``rope_beta_fast`` / ``rope_beta_slow`` / ``rope_truncate`` at HF's defaults).
    ``sliding_window`` is None (full causal attention) or the window W; ``layer_types``
    empty means every layer the same (windowed when ``sliding_window`` is set: Mistral),
    else one "full_attention" / "sliding_attention" per layer (Qwen2/Qwen3, Gemma 2).
    ``qk_norm``: None, "head" (Qwen3: per head) or "projection" (OLMo 2: over all heads).
    ``post_norm``: OLMo 2's norms after the sublayers; ``sandwich_norm``: Gemma 2's norms
    before and after both sublayers. Gemma: ``embed_scale`` (embeddings times
    sqrt(hidden_size)), ``norm_plus_one`` (RMSNorm scale ``1 + weight``, in float32).
    Gemma 2: ``query_pre_attn_scalar`` (attention scale ``s ** -0.5`` instead of
    ``head_dim ** -0.5``), ``attn_logit_softcapping`` and ``final_logit_softcapping``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rope_attention_factor: float | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    qk_norm: str | None = None
    post_norm: bool = False
    sandwich_norm: bool = False
    embed_scale: bool = False
    norm_plus_one: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None


def _default_inv_freq(theta, dim: int) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32, as HF's torch code."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _dynamic_ntk_inv_freq(config: LlamaConfig, length: int) -> np.ndarray:
    """HF's ``_compute_dynamic_ntk_parameters`` at sequence length ``length``.

    Up to ``max_position_embeddings`` HF keeps the frequencies it computed at init (a Python
    float base, equal to ``rope_theta`` up to rounding); past it, HF recomputes them in
    float32 torch arithmetic from ``seq_len = max(position_ids) + 1``: both are mirrored.
    """
    dim, original = config.head_dim, config.max_position_embeddings
    factor = config.rope_factor
    if length <= original:
        base = config.rope_theta * ((factor * original / original) - (factor - 1)) ** (
            dim / (dim - 2))
        return _default_inv_freq(base, dim)
    f32 = np.float32
    ratio = (f32(factor) * f32(length)) / f32(original) - f32(factor - 1)
    base = f32(config.rope_theta) * np.power(ratio, f32(dim / (dim - 2)))
    return _default_inv_freq(f32(base), dim)


def yarn_attention_factor(config: LlamaConfig) -> float:
    """YaRN's cos/sin scale (Peng et al. 2023, "YaRN: Efficient Context Window Extension of
    Large Language Models"): ``attention_factor`` if given, else ``0.1 ln(factor) + 1``, or
    the ratio of that with ``mscale`` over that with ``mscale_all_dim`` when both are set
    (DeepSeek's variant), as HF's ``_compute_yarn_parameters`` (float64 Python maths)."""
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = config.rope_factor
    if config.rope_mscale and config.rope_mscale_all_dim:
        return float(get_mscale(factor, config.rope_mscale)
                     / get_mscale(factor, config.rope_mscale_all_dim))
    return get_mscale(factor)


def _yarn_inv_freq(config: LlamaConfig) -> np.ndarray:
    """YaRN's "NTK-by-parts" frequencies: dimensions rotating more than ``beta_fast`` times
    over the original context are kept, fewer than ``beta_slow`` divided by ``factor``, a
    linear ramp in between (bounds floored/ceiled when ``truncate``), as HF (float32 tensors,
    float64 scalars)."""
    dim, base, factor = config.head_dim, config.rope_theta, config.rope_factor
    original = config.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevents a division by zero
    f32 = np.float32
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
    extrapolation_weight = (f32(1) - ramp).astype(f32)
    pos_freqs = np.power(f32(base), np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(f32)
    extrapolation = (f32(1) / pos_freqs).astype(f32)
    interpolation = (f32(1) / (f32(factor) * pos_freqs)).astype(f32)
    return (interpolation * (f32(1) - extrapolation_weight)
            + extrapolation * extrapolation_weight).astype(f32)


def rotary_inv_freq(config: LlamaConfig, length: int | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, computed as HF's ``ROPE_INIT_FUNCTIONS``
    do (float32 operations) for every rope type of :data:`ROPE_TYPES`.

    ``length``: the sequence length T, read only by "dynamic" (None: its init value, as for
    any T up to ``max_position_embeddings``).
    """
    if config.rope_type == "dynamic":
        return _dynamic_ntk_inv_freq(config, length or config.max_position_embeddings)
    if config.rope_type == "yarn":
        return _yarn_inv_freq(config)
    inv_freq = _default_inv_freq(config.rope_theta, config.head_dim)
    factor = np.float32(config.rope_factor)
    if config.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    if config.rope_type == "llama3":
        old_len = np.float32(config.rope_original_max_position_embeddings)
        low, high = np.float32(config.rope_low_freq_factor), np.float32(
            config.rope_high_freq_factor)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rotary_cos_sin(config: LlamaConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` [T, head_dim] float32 for positions ``0..T-1`` (yarn: times its
    attention factor, as HF's ``attention_scaling``)."""
    cos, sin = rotary_tables(rotary_inv_freq(config, length), length)
    if config.rope_type == "yarn":
        scaling = jnp.float32(yarn_attention_factor(config))
        cos, sin = cos * scaling, sin * scaling
    return cos, sin


def layer_windows(config: LlamaConfig) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full causal attention)."""
    if not config.layer_types:
        return (config.sliding_window,) * config.num_hidden_layers
    return tuple(config.sliding_window if kind == SLIDING else None
                 for kind in config.layer_types)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping ``cap * tanh(x / cap)`` (identity when ``cap`` is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nnx.Module):
    """HF's ``LlamaRMSNorm``: ``weight * (x / sqrt(mean(x^2) + eps))``, the statistics in
    float32 and the normalised value cast back to x's dtype before the scale.

    ``scale_in_float32`` (OLMo 2): the scale multiplies in float32, then the cast.
    ``plus_one`` (HF's ``GemmaRMSNorm``): ``(1 + weight) * normed`` in float32, then the
    cast; its checkpoints store ``weight`` around 0.
    """

    def __init__(self, dim: int, *, eps: float, scale_in_float32: bool = False,
                 plus_one: bool = False):
        self.scale = nnx.Param(jnp.zeros((dim,)) if plus_one else jnp.ones((dim,)))
        self.eps = eps
        self.scale_in_float32 = scale_in_float32
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(variance + self.eps)
        if self.plus_one:
            scale = 1.0 + self.scale[...].astype(jnp.float32)
            return (normed * jnp.broadcast_to(scale, normed.shape)).astype(x.dtype)
        if self.scale_in_float32:
            scale = jnp.broadcast_to(self.scale[...].astype(jnp.float32), normed.shape)
            return (scale * normed).astype(x.dtype)
        normed = normed.astype(x.dtype)
        return jnp.broadcast_to(self.scale[...].astype(x.dtype), normed.shape) * normed


def _norm(config: LlamaConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=config.rms_norm_eps, scale_in_float32=config.post_norm,
                   plus_one=config.norm_plus_one)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, index: int, *, rngs: nnx.Rngs):
        d, dh, f = config.hidden_size, config.head_dim, config.intermediate_size
        h, kv = config.num_attention_heads, config.num_key_value_heads
        norm = lambda dim: _norm(config, dim)
        self.post_norm, self.sandwich_norm = config.post_norm, config.sandwich_norm
        self.input_layernorm = None if config.post_norm else norm(d)
        self.post_attention_layernorm = norm(d)
        self.pre_feedforward_layernorm = norm(d) if config.sandwich_norm else None
        self.post_feedforward_layernorm = (norm(d) if config.post_norm or config.sandwich_norm
                                           else None)
        self.q_proj = Dense(d, h * dh, rngs=rngs, use_bias=config.qkv_bias)
        self.k_proj = Dense(d, kv * dh, rngs=rngs, use_bias=config.qkv_bias)
        self.v_proj = Dense(d, kv * dh, rngs=rngs, use_bias=config.qkv_bias)
        self.o_proj = Dense(h * dh, d, rngs=rngs, use_bias=config.o_bias)
        self.gate_proj = Dense(d, f, rngs=rngs, use_bias=config.mlp_bias)
        self.up_proj = Dense(d, f, rngs=rngs, use_bias=config.mlp_bias)
        self.down_proj = Dense(f, d, rngs=rngs, use_bias=config.mlp_bias)
        self.qk_norm = config.qk_norm
        q_dim, k_dim = (dh, dh) if config.qk_norm == "head" else (h * dh, kv * dh)
        self.q_norm = norm(q_dim) if config.qk_norm else None
        self.k_norm = norm(k_dim) if config.qk_norm else None
        self.n_head, self.n_kv, self.head_dim = h, kv, dh
        self.scale = (config.query_pre_attn_scalar or dh) ** -0.5
        self.attn_softcap = config.attn_logit_softcapping
        self.act = config.hidden_act
        self.name = f"layers.{index}"

    def _attention(self, x, mask, cos, sin, taps):
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "projection":  # OLMo 2: over all heads, before the rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.n_head, self.head_dim)
        k = k.reshape(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: per head, before the rotary embedding
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # K/V head j serves query heads j * rep .. (j + 1) * rep - 1 (HF's repeat_kv):
        # attention repeats them on the XLA path and reads them grouped under cuDNN.
        a = attention(q, k, v, mask, self.scale, softcap=self.attn_softcap)
        return tap(taps, f"{self.name}.attn_out",
                   self.o_proj(a.reshape(b, t, self.n_head * self.head_dim)))

    def _mlp(self, x, taps):
        h = tap(taps, f"{self.name}.mlp_hidden",
                ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(h)

    def __call__(self, x, mask, cos, sin, taps):
        if self.post_norm:
            x = x + self.post_attention_layernorm(self._attention(x, mask, cos, sin, taps))
            out = x + self.post_feedforward_layernorm(self._mlp(x, taps))
        elif self.sandwich_norm:  # Gemma 2: norms before and after both sublayers
            x = x + self.post_attention_layernorm(
                self._attention(self.input_layernorm(x), mask, cos, sin, taps))
            out = x + self.post_feedforward_layernorm(
                self._mlp(self.pre_feedforward_layernorm(x), taps))
        else:
            x = x + self._attention(self.input_layernorm(x), mask, cos, sin, taps)
            out = x + self._mlp(self.post_attention_layernorm(x), taps)
        return tap(taps, f"{self.name}.out", out)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02)
        self.layers = nnx.List([LlamaDecoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size)
        self.lm_head = (None if config.tie_word_embeddings else
                        nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      taps: Taps | None = None) -> jax.Array:
        """Final hidden states [B, T, D] (after ``norm``) of ``input_ids`` [B, T].

        ``attention_mask`` [B, T] (1 = token, 0 = padding) masks padded keys; positions
        stay ``0..T-1`` in every row, as in HF without ``position_ids``.
        """
        t = input_ids.shape[-1]
        x = self.embed_tokens[...][input_ids]
        if self.config.embed_scale:  # Gemma: a float32 sqrt(hidden_size) cast to x's dtype
            x = x * jnp.asarray(np.float32(self.config.hidden_size ** 0.5)).astype(x.dtype)
        windows = layer_windows(self.config)
        # Described, never a [T, T] array; a window W keeps keys k > q - W (HF's
        # sliding_window_overlay), a no-op while T <= W.
        masks = {w: AttentionMask(attention_mask, causal=True, window=w) for w in set(windows)}
        cos, sin = rotary_cos_sin(self.config, t)
        for layer, window in zip(self.layers, windows, strict=True):
            x = layer(x, masks[window], cos, sin, taps)
        return tap(taps, "final", self.norm(x))

    def unembedding(self) -> jax.Array:
        """The output matrix [D, V]: ``lm_head`` transposed (``embed_tokens`` when tied)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return weight[...].T

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's final-logit soft-cap c (None: none): the logits are ``c * tanh(z / c)``
        of ``hidden_states @ unembedding()``; the token signals apply it per vocabulary
        chunk."""
        return self.config.final_logit_softcapping

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """Logits [B, T, V] (soft-capped for Gemma 2)."""
        h = self.hidden_states(input_ids, attention_mask, taps=taps)
        return softcap(h @ self.unembedding().astype(h.dtype), self.final_logit_softcap)


# Attributes every family reads.
_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
           "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
           "tie_word_embeddings",
           # Dropout is off at inference.
           "attention_dropout"}
_IMPLEMENTED = _COMMON | {"hidden_act", "attention_bias", "mlp_bias", "sliding_window",
                          "use_sliding_window", "max_window_layers", "layer_types"}
_GEMMA_IMPLEMENTED = _COMMON | {"hidden_act", "hidden_activation", "attention_bias",
                                "use_bidirectional_attention"}
_IMPLEMENTED_BY_TYPE = {
    "gemma": _GEMMA_IMPLEMENTED,
    # cache_implementation ("hybrid" in Gemma 2 checkpoints) only configures generation.
    "gemma2": _GEMMA_IMPLEMENTED | {"query_pre_attn_scalar", "sliding_window", "layer_types",
                                    "final_logit_softcapping", "attn_logit_softcapping",
                                    "cache_implementation"},
}
# pretraining_tp != 1 only splits HF's matmuls (same maths up to rounding); kept strict.
_DEFAULTS: dict[str, Any] = {"pretraining_tp": 1}
# HF's config defaults where they differ from LlamaConfig's, for attributes a config.json
# leaves out (transformers' GemmaConfig / Gemma2Config).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  tie_word_embeddings=True),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
# model_types recognised only to say what is missing.
_REFUSED_TYPES = {
    t: (f"{t}: memjax does not implement Gemma 3 (q_norm/k_norm with Gemma's 1 + weight, "
        "a separate rotary base for sliding layers (rope_local_base_freq, per-layer-type "
        "rope_parameters), its local/global layer pattern); Gemma and Gemma 2 are ported")
    for t in ("gemma3", "gemma3_text")}
_ROPE_NEEDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"),
               "dynamic": ("factor",), "yarn": ("factor",)}
# Optional keys, with HF's value when absent (yarn's original length: max_position_embeddings).
_ROPE_OPTIONAL: dict[str, dict[str, Any]] = {
    "yarn": {"original_max_position_embeddings": None, "attention_factor": None,
             "beta_fast": None, "beta_slow": None, "mscale": None, "mscale_all_dim": None,
             "truncate": True}}


def _yarn_fields(params: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """yarn's fields as HF's ``_compute_yarn_parameters`` reads them: ``factor`` null means
    max_position_embeddings / original; a missing or zero beta means 32 (fast) / 1 (slow)."""
    optional = {**_ROPE_OPTIONAL["yarn"], **params}
    max_len = int(hf.get("max_position_embeddings", LlamaConfig.max_position_embeddings))
    original = optional["original_max_position_embeddings"]
    original = max_len if original is None else int(original)
    factor = params["factor"]
    factor = max_len / original if factor is None else float(factor)
    maybe = lambda v: None if v is None else float(v)
    return {"rope_factor": factor, "rope_original_max_position_embeddings": original,
            "rope_attention_factor": maybe(optional["attention_factor"]),
            "rope_beta_fast": float(optional["beta_fast"] or 32),
            "rope_beta_slow": float(optional["beta_slow"] or 1),
            "rope_mscale": maybe(optional["mscale"]),
            "rope_mscale_all_dim": maybe(optional["mscale_all_dim"]),
            "rope_truncate": bool(optional["truncate"])}


def _rope(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The ``rope_*`` fields from ``rope_scaling`` (older files) or ``rope_parameters``, with
    the legacy top-level ``rope_theta``; refuses unimplemented rope types by name."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"{arch} config.json rope_parameters={params!r}: expected a dict")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_NEEDS:
        raise InputError(f"{arch} config.json rope_type={rope_type!r}: memjax implements "
                         f"only {list(ROPE_TYPES)}")
    allowed = {"rope_type", "type", "rope_theta", *_ROPE_NEEDS[rope_type],
               *_ROPE_OPTIONAL.get(rope_type, {})}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InputError(f"{arch} config.json rope parameters {unknown} are not implemented "
                         f"for rope_type={rope_type!r}")
    missing = [k for k in _ROPE_NEEDS[rope_type] if k not in params]
    if missing:
        raise InputError(f"{arch} config.json rope_type={rope_type!r} needs {missing}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if theta <= 0:
        raise InputError(f"{arch} config.json rope_theta={theta!r}: expected a positive base")
    fields = {"rope_type": rope_type, "rope_theta": theta}
    if rope_type == "yarn":
        return {**fields, **_yarn_fields(params, hf)}
    for key in _ROPE_NEEDS[rope_type]:
        cast = int if key == "original_max_position_embeddings" else float
        fields[f"rope_{key}"] = cast(params[key])
    return fields


_QK_NORM = {"qwen3": "head", "olmo2": "projection"}


def _checked_layer_types(hf: dict[str, Any], arch: str, types: list[str] | tuple[str, ...],
                         window: int | None) -> tuple[str, ...]:
    n_layers = int(hf.get("num_hidden_layers", LlamaConfig.num_hidden_layers))
    bad = sorted({t for t in types if t not in (FULL, SLIDING)})
    if len(types) != n_layers or bad:
        raise InputError(f"{arch} config.json layer_types={list(types)!r}: expected "
                         f"num_hidden_layers={n_layers} entries among {[FULL, SLIDING]}")
    if SLIDING in types and (window is None or window < 1):
        raise InputError(f"{arch} config.json layer_types has {SLIDING!r} layers but the "
                         f"sliding window is {window!r} (use_sliding_window / "
                         "sliding_window): expected a positive window")
    return tuple(types)


def _attention_layout(hf: dict[str, Any], arch: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types): Mistral's window on every layer; Qwen2/Qwen3's and
    Gemma 2's per-layer windows from ``layer_types``, or, when a config.json has none, HF's
    default pattern (Qwen: sliding from layer ``max_window_layers`` on, only with
    ``use_sliding_window``; Gemma 2: even layers sliding)."""
    if arch in ("qwen2", "qwen3", "gemma2"):
        if arch == "gemma2":
            window = hf.get("sliding_window")
            default = [SLIDING if (i + 1) % 2 else FULL
                       for i in range(int(hf["num_hidden_layers"]))]
        else:  # HF drops the window unless use_sliding_window
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            first = int(hf.get("max_window_layers", 28))
            default = [SLIDING if window is not None and i >= first else FULL
                       for i in range(int(hf.get("num_hidden_layers",
                                                 LlamaConfig.num_hidden_layers)))]
        window = None if window is None else int(window)
        types = _checked_layer_types(hf, arch, hf.get("layer_types") or default, window)
        return (window, types) if SLIDING in types else (None, ())
    for key in ("use_sliding_window", "max_window_layers", "layer_types"):
        if hf.get(key) not in (None, False):
            raise InputError(f"{arch} config.json {key}={hf[key]!r} is not implemented")
    window = hf.get("sliding_window")
    if window is not None and (arch != "mistral" or int(window) < 1):
        raise InputError(f"{arch} config.json sliding_window={window!r}: memjax implements a "
                         "sliding window (a positive int) only for Mistral, Qwen2/Qwen3 "
                         "(with layer_types) and Gemma 2")
    return (None if window is None else int(window)), ()


def _gelu_alias(act: str | None) -> str | None:
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _activation(hf: dict[str, Any], arch: str) -> str:
    """The MLP activation. Gemma: the installed transformers reads ``hidden_act`` (and
    rewrites "gelu" to "gelu_pytorch_tanh"), Gemma 2 ``hidden_activation``; transformers
    releases have read one or the other, so the other one, when present, must agree (with
    "gelu" read as the tanh approximation) or the config is refused."""
    if arch in ("gemma", "gemma2"):
        used, other = (("hidden_act", "hidden_activation") if arch == "gemma"
                       else ("hidden_activation", "hidden_act"))
        act = _gelu_alias(hf[used]) if arch == "gemma" else hf[used]
        if hf.get(other) is not None and _gelu_alias(hf[other]) != _gelu_alias(act):
            raise InputError(f"{arch} config.json {used}={hf[used]!r} and {other}="
                             f"{hf[other]!r} disagree; transformers versions read one or the "
                             "other: make them equal")
    else:
        act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise InputError(f"{arch} config.json hidden_act={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    return act


def _optional_float(hf: dict[str, Any], key: str) -> float | None:
    value = hf.get(key)
    if value is not None and float(value) <= 0:
        raise InputError(f"{hf.get('model_type')} config.json {key}={value!r}: expected a "
                         "positive number or null")
    return None if value is None else float(value)


# Read as they are; the others are derived per family below.
_PLAIN_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                 "rms_norm_eps", "mlp_bias", "tie_word_embeddings")


def from_hf_config(hf: dict[str, Any]) -> LlamaConfig:
    arch = hf.get("model_type", "llama")
    if arch in _REFUSED_TYPES:
        raise InputError(f"config.json model_type {_REFUSED_TYPES[arch]}")
    hf = {**_HF_DEFAULTS.get(arch, {}), **hf}
    check_config(hf, _IMPLEMENTED_BY_TYPE.get(arch, _IMPLEMENTED), _DEFAULTS, arch)
    if hf.get("use_bidirectional_attention"):
        raise InputError(f"{arch} config.json use_bidirectional_attention="
                         f"{hf['use_bidirectional_attention']!r}: memjax implements only "
                         "causal attention")
    if arch == "qwen2" and "attention_bias" in hf:
        raise InputError("qwen2 config.json attention_bias: Qwen2's biases are fixed (q/k/v "
                         "yes, o no); the attribute is unknown to HF's Qwen2")
    values = {k: hf[k] for k in _PLAIN_FIELDS if k in hf}
    heads = int(values.get("num_attention_heads", 32))
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = heads
    hidden = int(values.get("hidden_size", 4096))
    head_dim = hf.get("head_dim") or hidden // heads
    bias = bool(hf.get("attention_bias", False))
    qkv_bias, o_bias = (True, False) if arch == "qwen2" else (bias, bias)
    window, layer_types = _attention_layout(hf, arch)
    gemma = arch in ("gemma", "gemma2")
    gemma2 = arch == "gemma2"
    config = LlamaConfig(**values, head_dim=int(head_dim), hidden_act=_activation(hf, arch),
                         qkv_bias=qkv_bias, o_bias=o_bias, sliding_window=window,
                         layer_types=layer_types, qk_norm=_QK_NORM.get(arch),
                         post_norm=arch == "olmo2", sandwich_norm=gemma2, embed_scale=gemma,
                         norm_plus_one=gemma,
                         query_pre_attn_scalar=(_optional_float(hf, "query_pre_attn_scalar")
                                                if gemma2 else None),
                         attn_logit_softcapping=_optional_float(hf, "attn_logit_softcapping"),
                         final_logit_softcapping=_optional_float(hf, "final_logit_softcapping"),
                         **_rope(hf, arch))
    if config.num_attention_heads % config.num_key_value_heads:
        raise InputError(f"{arch} config.json: num_attention_heads="
                         f"{config.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={config.num_key_value_heads}")
    if config.head_dim % 2:
        raise InputError(f"{arch} config.json head_dim={config.head_dim}: rotary embeddings "
                         "need an even head_dim")
    return config


def _layer_norm_names(config: LlamaConfig) -> tuple[str, ...]:
    if config.post_norm:
        return ("post_attention_layernorm", "post_feedforward_layernorm")
    if config.sandwich_norm:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
    return ("input_layernorm", "post_attention_layernorm")


def convert(reader, config: LlamaConfig) -> dict[tuple, np.ndarray]:
    """HF keys -> param paths; Linear weights [out, in] are transposed to [in, out]."""
    prefix = "model." if any(k.startswith("model.") for k in reader.tensors) else ""
    take = lambda key: reader.take(prefix + key)
    # A view, not a copy: fill_params traces it back to its checkpoint key for messages.
    transpose = lambda w: None if w is None else w.T
    params = {("embed_tokens",): take("embed_tokens.weight"),
              ("norm", "scale"): take("norm.weight")}
    linears = {"q_proj": ("self_attn.q_proj", config.qkv_bias),
               "k_proj": ("self_attn.k_proj", config.qkv_bias),
               "v_proj": ("self_attn.v_proj", config.qkv_bias),
               "o_proj": ("self_attn.o_proj", config.o_bias),
               "gate_proj": ("mlp.gate_proj", config.mlp_bias),
               "up_proj": ("mlp.up_proj", config.mlp_bias),
               "down_proj": ("mlp.down_proj", config.mlp_bias)}
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        for norm in _layer_norm_names(config):
            params[("layers", i, norm, "scale")] = take(f"{layer}{norm}.weight")
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                params[("layers", i, norm, "scale")] = take(f"{layer}self_attn.{norm}.weight")
        for ours, (theirs, has_bias) in linears.items():
            params[("layers", i, ours, "kernel")] = transpose(take(f"{layer}{theirs}.weight"))
            if has_bias:
                params[("layers", i, ours, "bias")] = take(f"{layer}{theirs}.bias")
    if not config.tie_word_embeddings:
        params[("lm_head",)] = reader.take("lm_head.weight")
    elif "lm_head.weight" in reader:
        tied = reader.take("lm_head.weight")
        embed = params[("embed_tokens",)]
        if embed is not None and not np.array_equal(tied, embed):
            raise InputError("llama checkpoint: lm_head.weight differs from "
                             "embed_tokens.weight, but config.json has "
                             "tie_word_embeddings=True")
    return {k: v for k, v in params.items() if v is not None}


def partition_rules(config: LlamaConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style: q/k/v (by heads) and gate/up (by MLP hidden) column-parallel, o/down
    row-parallel; the vocabulary of both embeddings over ``model``."""
    return [
        (r"/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", PartitionSpec(None, "model")),
        (r"/(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", PartitionSpec("model")),
        (r"/(o_proj|down_proj)/kernel$", PartitionSpec("model", None)),
        (r"^(embed_tokens|lm_head)$", PartitionSpec("model", None)),
    ]


ARCH = register(Architecture(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma",
                               "gemma2"),
    refused=_REFUSED_TYPES,
    from_hf_config=from_hf_config,
    build=lambda config, rngs: LlamaForCausalLM(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules,
    # Rotary buffers that old checkpoints saved alongside the weights.
    ignore=(r"\.rotary_emb\.inv_freq$",),
    config_class=LlamaConfig,
))
