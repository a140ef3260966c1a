"""CLIP (``CLIPModel``) in Flax NNX, matching Hugging Face's PyTorch implementation.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision". Two pre-LN transformer towers and two linear projections into a shared
embedding space:

* vision: a ViT (Dosovitskiy et al. 2021) with a bias-free patch conv, a class embedding,
  learned positions, ``pre_layrnorm`` before the encoder and ``post_layernorm`` on the
  final [CLS] state, then ``visual_projection`` (no bias);
* text: token + position embeddings, a causal encoder (plus the padding mask),
  ``final_layer_norm``, the state at the EOS token, then ``text_projection`` (no bias).
  The EOS position follows HF: with the legacy ``eos_token_id == 2`` it is the argmax of
  ``input_ids`` (the EOT token had the largest id), otherwise the first occurrence of
  ``eos_token_id`` (position 0 if absent).

``encode_image(pixel_values)`` [B, H, W, C] -> [B, E] and ``encode_text(input_ids,
attention_mask)`` [B, T] -> [B, E] return the projected, unnormalised embeddings (HF's
``get_image_features(...).pooler_output`` / ``get_text_features``); ``__call__`` returns
``logits_per_image`` [B_img, B_txt] = exp(logit_scale) * cosine similarities.

Taps (see :mod:`memjax.models.taps`), prefixed ``vision.`` or ``text.``:
``{tower}.embeddings`` (encoder input; for vision after ``pre_layrnorm``),
``{tower}.layers.{i}.attn_out``, ``{tower}.layers.{i}.mlp_hidden`` (after the activation),
``{tower}.layers.{i}.out`` (block output), ``text.final`` (after ``final_layer_norm``),
``{tower}.pooled`` (pooled state before the projection: post-LN [CLS] / EOS state).
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
from memjax.models.layers import AttentionMask, Dense, LayerNorm
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap
from memjax.models.vit import (
    EncoderBlock,
    ParamMap,
    PatchEmbed,
    check_activation,
    check_heads,
    check_images,
    encoder_rules,
)

#: The EOS id of CLIP configs written before transformers PR #24773; such configs pool
#: at the largest token id instead of the EOS id.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512

    def __post_init__(self):
        # Restoring from memjax_model.json passes the towers as dicts.
        for name, cls in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))


def _blocks(config: CLIPTextConfig | CLIPVisionConfig, prefix: str,
            rngs: nnx.Rngs) -> nnx.List:
    d, heads = config.hidden_size, config.num_attention_heads
    return nnx.List([
        EncoderBlock(dim=d, heads=heads, head_dim=d // heads, inner=config.intermediate_size,
                     act=config.hidden_act, eps=config.layer_norm_eps, qkv_bias=True,
                     name=f"{prefix}.layers.{i}", rngs=rngs)
        for i in range(config.num_hidden_layers)])


class CLIPVisionTransformer(nnx.Module):
    """Images [B, H, W, C] -> (last hidden state [B, 1 + N, D], pooled [B, D])."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.config = config
        self.patch_embed = PatchEmbed((p, p), config.num_channels, d, rngs=rngs, use_bias=False)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * 0.02)
        self.position_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.num_patches + 1, d)) * 0.02)
        self.pre_layrnorm = LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = _blocks(config, "vision", rngs)
        self.post_layernorm = LayerNorm(d, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: jax.Array, taps: Taps | None = None):
        size = (self.config.image_size, self.config.image_size)
        check_images(pixel_values, size, self.config.num_channels, "clip")
        x = self.patch_embed(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype),
                               (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + jnp.broadcast_to(self.position_embedding[...].astype(x.dtype), x.shape)
        x = tap(taps, "vision.embeddings", self.pre_layrnorm(x))
        for block in self.layers:
            x = block(x, None, taps)
        # HF's last_hidden_state has no final LayerNorm; only the [CLS] state is normed.
        pooled = tap(taps, "vision.pooled", self.post_layernorm(x[:, 0]))
        return x, pooled


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of the pooled token, as HF CLIPTextTransformer chooses it."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # argmax returns the first True (0 when there is none, like torch).
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nnx.Module):
    """Token ids [B, T] -> (last hidden state [B, T, D] after final LN, pooled [B, D])."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.token_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, d)) * 0.02)
        self.position_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.max_position_embeddings, d)) * 0.01)
        self.layers = _blocks(config, "text", rngs)
        self.final_layer_norm = LayerNorm(d, eps=config.layer_norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 taps: Taps | None = None):
        if input_ids.ndim != 2:
            raise InputError(f"clip input_ids: expected [B, T], got shape {input_ids.shape}")
        t = input_ids.shape[-1]
        if t > self.config.max_position_embeddings:
            raise InputError(f"clip input_ids has {t} positions; this CLIP text tower supports "
                             f"at most {self.config.max_position_embeddings}")
        x = self.token_embedding[...][input_ids]
        x = x + jnp.broadcast_to(self.position_embedding[...][:t], x.shape)
        x = tap(taps, "text.embeddings", x)
        mask = AttentionMask(attention_mask, causal=True)
        for block in self.layers:
            x = block(x, mask, taps)
        x = tap(taps, "text.final", self.final_layer_norm(x))
        index = eos_positions(input_ids, self.config.eos_token_id)
        pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        return x, tap(taps, "text.pooled", pooled)


def _unit(x: jax.Array) -> jax.Array:
    # HF divides by sqrt(sum(x**2)) with no epsilon; so do we, for identical logits.
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nnx.Module):
    """CLIP: ``encode_image``, ``encode_text`` and image-text logits."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config.vision_config, rngs=rngs)
        self.text_model = CLIPTextTransformer(config.text_config, rngs=rngs)
        self.visual_projection = Dense(config.vision_config.hidden_size, config.projection_dim,
                                       rngs=rngs, use_bias=False)
        self.text_projection = Dense(config.text_config.hidden_size, config.projection_dim,
                                     rngs=rngs, use_bias=False)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, jnp.float32))

    def encode_image(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Projected image embeddings [B, E] (unnormalised) of NHWC images [B, H, W, C]."""
        return self.visual_projection(self.vision_model(pixel_values, taps)[1])

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    taps: Taps | None = None) -> jax.Array:
        """Projected text embeddings [B, E] (unnormalised) of token ids [B, T]."""
        return self.text_projection(self.text_model(input_ids, attention_mask, taps)[1])

    def embed(self, pixel_values: jax.Array, input_ids: jax.Array,
              attention_mask: jax.Array | None = None, *,
              taps: Taps | None = None) -> dict[str, jax.Array]:
        """``{"image": [B, E], "text": [B, E]}``: both projected (unnormalised) embeddings
        of B image-caption pairs (what ``memjax.Model.apply`` returns for a CLIP)."""
        return {"image": self.encode_image(pixel_values, taps=taps),
                "text": self.encode_text(input_ids, attention_mask, taps=taps)}

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """``logits_per_image`` [B_img, B_txt]: exp(logit_scale) * cosine similarity."""
        image = _unit(self.encode_image(pixel_values, taps=taps))
        text = _unit(self.encode_text(input_ids, attention_mask, taps=taps))
        scale = jnp.exp(self.logit_scale[...]).astype(text.dtype)
        return (text @ image.T * scale).T  # HF computes logits_per_text, then transposes


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

_TOWER_COMMON = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "layer_norm_eps",
    # Dropout is off at inference; the towers never read their projection_dim (CLIPModel
    # uses the top-level one); use_bfloat16 is a training flag of old configs.
    "attention_dropout", "dropout", "projection_dim", "use_bfloat16",
}
_TEXT_IMPLEMENTED = _TOWER_COMMON | {"vocab_size", "max_position_embeddings", "eos_token_id"}
_VISION_IMPLEMENTED = _TOWER_COMMON | {"num_channels", "image_size", "patch_size"}
_TOP_IMPLEMENTED = {
    "text_config", "vision_config", "text_config_dict", "vision_config_dict",
    "projection_dim",
    # Only initialises logit_scale, which the checkpoint stores.
    "logit_scale_init_value",
}
# Every computation-relevant CLIP attribute is implemented; none falls back to a default.
_TEXT_DEFAULTS: dict[str, Any] = {}
_VISION_DEFAULTS: dict[str, Any] = {}

# HF CLIPTextConfig / CLIPVisionConfig defaults of the attributes that matter: a legacy
# ``*_config_dict`` is expanded with them before it overrides ``*_config`` (as HF does).
_HF_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
            "projection_dim": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 49406,
            "eos_token_id": 49407}
_HF_VISION = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
              "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
              "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "attention_dropout": 0.0}


def _tower_dict(hf: dict[str, Any], name: str, hf_defaults: dict[str, Any]) -> dict[str, Any]:
    tower = hf.get(name) or {}
    if not isinstance(tower, dict):
        raise InputError(f"clip config.json {name}: expected an object, got {tower!r}")
    legacy = hf.get(f"{name}_dict")
    if legacy:  # HF: CLIP*Config(**legacy).to_dict() overrides *_config key by key
        tower = {**tower, **hf_defaults, **legacy}
    return tower


def _tower(cls, hf: dict[str, Any], implemented, defaults, what: str):
    check_config(hf, implemented, defaults, what)
    for key in ("hidden_act",):
        check_activation(hf.get(key, "quick_gelu"), key, what)
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in hf.items() if k in fields})
    check_heads(config.hidden_size, config.num_attention_heads, what)
    return config


def from_hf_config(hf: dict[str, Any]) -> CLIPConfig:
    """HF CLIP config.json (with nested text_config / vision_config) -> :class:`CLIPConfig`."""
    check_config(hf, _TOP_IMPLEMENTED, {}, "clip")
    text_hf = _tower_dict(hf, "text_config", _HF_TEXT)
    vision_hf = _tower_dict(hf, "vision_config", _HF_VISION)
    text = _tower(CLIPTextConfig, text_hf, _TEXT_IMPLEMENTED, _TEXT_DEFAULTS,
                  "clip text_config")
    vision = _tower(CLIPVisionConfig, vision_hf, _VISION_IMPLEMENTED, _VISION_DEFAULTS,
                    "clip vision_config")
    if not isinstance(text.eos_token_id, int) or isinstance(text.eos_token_id, bool):
        raise InputError(f"clip text_config eos_token_id={text.eos_token_id!r}: expected one "
                         "int (the token whose state is pooled)")
    for key in ("image_size", "patch_size"):
        value = getattr(vision, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"clip vision_config {key}={value!r}: expected a positive int")
    if vision.patch_size > vision.image_size:
        raise InputError(f"clip vision_config: patch_size={vision.patch_size} is larger than "
                         f"image_size={vision.image_size}")
    return CLIPConfig(text_config=text, vision_config=vision,
                      projection_dim=int(hf.get("projection_dim", 512)))


def _encoder(out: ParamMap, root: tuple, prefix: str, layers: int) -> None:
    for i in range(layers):
        key, path = f"{prefix}.encoder.layers.{i}.", (*root, "layers", i)
        out.layer_norm((*path, "layer_norm1"), key + "layer_norm1")
        out.layer_norm((*path, "layer_norm2"), key + "layer_norm2")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.linear((*path, proj), f"{key}self_attn.{proj}")
        for fc in ("fc1", "fc2"):
            out.linear((*path, fc), f"{key}mlp.{fc}")


def convert(reader, config: CLIPConfig) -> dict[tuple, np.ndarray]:
    """HF CLIPModel keys -> param paths (Linear weights transposed, the patch conv to HWIO)."""
    out = ParamMap(reader)
    vis, txt = ("vision_model",), ("text_model",)
    out.put((*vis, "patch_embed", "kernel"), "vision_model.embeddings.patch_embedding.weight",
            "hwio")
    out.put((*vis, "class_embedding"), "vision_model.embeddings.class_embedding")
    out.put((*vis, "position_embedding"), "vision_model.embeddings.position_embedding.weight")
    out.put((*txt, "token_embedding"), "text_model.embeddings.token_embedding.weight")
    out.put((*txt, "position_embedding"), "text_model.embeddings.position_embedding.weight")
    out.put(("logit_scale",), "logit_scale")
    out.layer_norm((*vis, "pre_layrnorm"), "vision_model.pre_layrnorm")
    out.layer_norm((*vis, "post_layernorm"), "vision_model.post_layernorm")
    out.layer_norm((*txt, "final_layer_norm"), "text_model.final_layer_norm")
    _encoder(out, vis, "vision_model", config.vision_config.num_hidden_layers)
    _encoder(out, txt, "text_model", config.text_config.num_hidden_layers)
    out.linear(("visual_projection",), "visual_projection", bias=False)
    out.linear(("text_projection",), "text_projection", bias=False)
    return out.finish(lambda: CLIPModel(config, rngs=nnx.Rngs(0)), "clip")


def partition_rules(config: CLIPConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style ``model``-axis rules for both towers: column-parallel q/k/v/fc1,
    row-parallel out_proj/fc2; the token embedding split over its vocabulary rows."""
    return encoder_rules(r"token_embedding$")


ARCH = register(Architecture(
    name="clip", model_types=("clip",), from_hf_config=from_hf_config,
    build=lambda config, rngs: CLIPModel(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules, ignore=(r"position_ids$",), config_class=CLIPConfig,
))
