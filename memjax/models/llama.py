"""Llama-family decoders (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Olmo2ForCausalLM``) in Flax NNX, matching Hugging Face's PyTorch code.

Touvron et al. 2023 (LLaMA); Jiang et al. 2023 (Mistral 7B); Yang et al. 2024 (Qwen2);
Yang et al. 2025 (Qwen3); OLMo et al. 2024 (OLMo 2).

Pre-norm decoder blocks (OLMo 2: post-norm, below) ``x + attn(rms_1(x))`` then
``x + mlp(rms_2(x))`` with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings
(Su et al. 2021) on the whole head, grouped-query attention (Ainslie et al. 2023:
``num_key_value_heads`` K/V heads, each shared by ``num_attention_heads /
num_key_value_heads`` query heads, as HF's ``repeat_kv``) and a SwiGLU MLP
``down(act(gate(x)) * up(x))`` (Shazeer 2020).

``__call__`` returns logits [B, T, V]; ``hidden_states`` returns the final (post ``norm``)
hidden states [B, T, D] and ``unembedding()`` the [D, V] output matrix, for the
vocabulary-chunked token signals (the GPT-2 / GPT-NeoX protocol).

Family differences, all from config.json:

- Llama: ``attention_bias`` puts a bias on q/k/v/o alike; ``mlp_bias`` on gate/up/down.
- Qwen2: q/k/v have a bias and o has none (HF hard-codes this; config.json has no
  ``attention_bias``). Sliding-window layers (``layer_types`` with "sliding_attention")
  are refused.
- Qwen3: Llama's ``attention_bias`` plus ``q_norm`` / ``k_norm``, RMSNorms over each head's
  ``head_dim`` applied to q and k before the rotary embedding; sliding windows refused.
- OLMo 2: norms after the sublayers, ``x + rms_a(attn(x))`` then ``x + rms_f(mlp(x))``
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``, no ``input_layernorm``),
  and ``q_norm`` / ``k_norm`` over the whole q / k projections (all heads), before the
  rotary embedding. Its RMSNorm multiplies the scale in float32 before the cast back.
- Mistral: ``sliding_window`` W masks keys with ``q - k >= W`` in every layer (HF's
  ``sliding_window_overlay``); a no-op while the sequence is no longer than W.
- Rotary: "default", "linear" (inverse frequencies / factor) and "llama3" (Llama 3.1's
  wavelength-banded scaling) ``rope_type``; any other is refused by name.

Positions are ``0..T-1`` for every row, whatever ``attention_mask`` says (as HF does when no
``position_ids`` are passed, and as the GPT-NeoX port does): a left-padded row therefore
sees shifted positions, exactly as in HF. Padded keys are masked out.

Taps (see :mod:`memjax.models.taps`): ``layers.{i}.attn_out`` (after ``o_proj``),
``layers.{i}.mlp_hidden`` (``act(gate(x)) * up(x)``, the input of ``down_proj``: the
SwiGLU hidden state, not HF's ``act_fn`` output alone), ``layers.{i}.out`` (block output),
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
from memjax.models.layers import ACTIVATIONS, Dense, attention, causal_mask
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """memjax's Llama-family configuration (defaults: HF's ``LlamaConfig``, Llama-2-7B).

    ``qkv_bias`` / ``o_bias`` are HF's ``attention_bias`` for Llama (both), and (True, False)
    for Qwen2. ``rope_*`` are the entries of HF's ``rope_parameters`` (``rope_scaling`` in
    older files); ``rope_factor`` etc. are used only by the scaled rope types.
    ``sliding_window`` is None (full causal attention) or Mistral's window. ``qk_norm``:
    None, "head" (Qwen3: per head) or "projection" (OLMo 2: over all heads). ``post_norm``:
    OLMo 2's norms after the sublayers.
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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    qk_norm: str | None = None
    post_norm: bool = False


def rotary_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, computed as HF's ``ROPE_INIT_FUNCTIONS``
    do (float32 operations), for the "default", "linear" and "llama3" rope types."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)
                ).astype(np.float32)
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
    """``cos``, ``sin`` [T, head_dim] float32 for positions ``0..T-1``."""
    inv_freq = jnp.asarray(rotary_inv_freq(config))
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, Dh] by cos/sin [T, Dh] (HF's ``apply_rotary_pos_emb``)."""
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


def sliding_causal_mask(attention_mask: jax.Array | None, length: int,
                        window: int | None) -> jax.Array:
    """[B or 1, 1, T, T] bool: causal, padded keys out, and with a window W keys ``k <= q - W``
    out too (HF's ``sliding_window_overlay``: attend iff ``k > q - W``)."""
    mask = causal_mask(attention_mask, length)
    if window is None or window >= length:
        return mask
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    return mask & (k > q - window)[None, None]


class RMSNorm(nnx.Module):
    """HF's ``LlamaRMSNorm``: ``weight * (x / sqrt(mean(x^2) + eps))``, the statistics in
    float32 and the normalised value cast back to x's dtype before the scale."""

    def __init__(self, dim: int, *, eps: float, scale_in_float32: bool = False):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.eps = eps
        self.scale_in_float32 = scale_in_float32  # OLMo 2: (weight * normed).to(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(variance + self.eps)
        if self.scale_in_float32:
            scale = jnp.broadcast_to(self.scale[...].astype(jnp.float32), normed.shape)
            return (scale * normed).astype(x.dtype)
        normed = normed.astype(x.dtype)
        return jnp.broadcast_to(self.scale[...].astype(x.dtype), normed.shape) * normed


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, index: int, *, rngs: nnx.Rngs):
        d, dh, f = config.hidden_size, config.head_dim, config.intermediate_size
        h, kv = config.num_attention_heads, config.num_key_value_heads
        norm = lambda dim: RMSNorm(dim, eps=config.rms_norm_eps,
                                   scale_in_float32=config.post_norm)
        self.post_norm = config.post_norm
        self.input_layernorm = None if config.post_norm else norm(d)
        self.post_attention_layernorm = norm(d)
        self.post_feedforward_layernorm = norm(d) if config.post_norm else None
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
        self.scale = dh ** -0.5
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
        # HF's repeat_kv: K/V head j serves query heads j * rep .. (j + 1) * rep - 1.
        rep = self.n_head // self.n_kv
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        a = attention(q, k, v, mask, self.scale)
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
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                            scale_in_float32=config.post_norm)
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
        mask = sliding_causal_mask(attention_mask, t, self.config.sliding_window)
        cos, sin = rotary_cos_sin(self.config, t)
        for layer in self.layers:
            x = layer(x, mask, cos, sin, taps)
        return tap(taps, "final", self.norm(x))

    def unembedding(self) -> jax.Array:
        """The output matrix [D, V]: ``lm_head`` transposed (``embed_tokens`` when tied)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return weight[...].T

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """Logits [B, T, V]."""
        h = self.hidden_states(input_ids, attention_mask, taps=taps)
        return h @ self.unembedding().astype(h.dtype)


_IMPLEMENTED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling",
                "rope_theta", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                # Dropout is off at inference.
                "attention_dropout"}
# pretraining_tp != 1 only splits HF's matmuls (same maths up to rounding); kept strict.
_DEFAULTS: dict[str, Any] = {"pretraining_tp": 1}
_ROPE_NEEDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings")}


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
    unknown = sorted(set(params) - {"rope_type", "type", "rope_theta",
                                    *_ROPE_NEEDS[rope_type]})
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
    for key in _ROPE_NEEDS[rope_type]:
        cast = int if key == "original_max_position_embeddings" else float
        fields[f"rope_{key}"] = cast(params[key])
    return fields


_QK_NORM = {"qwen3": "head", "olmo2": "projection"}


def _sliding_window(hf: dict[str, Any], arch: str) -> int | None:
    """Mistral's window (every layer); Qwen2's per-layer windows are refused."""
    if arch in ("qwen2", "qwen3"):
        types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in types:
            raise InputError(f"{arch} config.json use_sliding_window / layer_types "
                             "'sliding_attention': memjax implements only full attention "
                             f"for {arch}")
        return None
    for key in ("use_sliding_window", "max_window_layers", "layer_types"):
        if hf.get(key) not in (None, False):
            raise InputError(f"{arch} config.json {key}={hf[key]!r} is not implemented")
    window = hf.get("sliding_window")
    if window is not None and (arch != "mistral" or int(window) < 1):
        raise InputError(f"{arch} config.json sliding_window={window!r}: memjax implements a "
                         "sliding window (a positive int) only for Mistral")
    return None if window is None else int(window)


def from_hf_config(hf: dict[str, Any]) -> LlamaConfig:
    arch = hf.get("model_type", "llama")
    check_config(hf, _IMPLEMENTED, _DEFAULTS, arch)
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise InputError(f"{arch} config.json hidden_act={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    if arch == "qwen2" and "attention_bias" in hf:
        raise InputError("qwen2 config.json attention_bias: Qwen2's biases are fixed (q/k/v "
                         "yes, o no); the attribute is unknown to HF's Qwen2")
    values = {f.name: hf[f.name] for f in dataclasses.fields(LlamaConfig)
              if f.name in hf and f.name not in ("head_dim", "sliding_window")}
    values.pop("rope_theta", None)
    heads = int(values.get("num_attention_heads", 32))
    values.setdefault("num_key_value_heads", heads)
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = heads
    hidden = int(values.get("hidden_size", 4096))
    head_dim = hf.get("head_dim") or hidden // heads
    bias = bool(hf.get("attention_bias", False))
    qkv_bias, o_bias = (True, False) if arch == "qwen2" else (bias, bias)
    config = LlamaConfig(**values, head_dim=int(head_dim), qkv_bias=qkv_bias, o_bias=o_bias,
                         sliding_window=_sliding_window(hf, arch),
                         qk_norm=_QK_NORM.get(arch), post_norm=arch == "olmo2",
                         **_rope(hf, arch))
    if config.num_attention_heads % config.num_key_value_heads:
        raise InputError(f"{arch} config.json: num_attention_heads="
                         f"{config.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={config.num_key_value_heads}")
    if config.head_dim % 2:
        raise InputError(f"{arch} config.json head_dim={config.head_dim}: rotary embeddings "
                         "need an even head_dim")
    return config


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
        norms = (("post_attention_layernorm", "post_feedforward_layernorm") if config.post_norm
                 else ("input_layernorm", "post_attention_layernorm"))
        for norm in norms:
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
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2"),
    from_hf_config=from_hf_config,
    build=lambda config, rngs: LlamaForCausalLM(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules,
    # Rotary buffers that old checkpoints saved alongside the weights.
    ignore=(r"\.rotary_emb\.inv_freq$",),
    config_class=LlamaConfig,
))
