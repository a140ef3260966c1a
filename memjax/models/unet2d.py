"""diffusers' ``UNet2DModel`` (pixel-space DDPM ε-predictor) in Flax NNX, NHWC.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (the U-Net of App. B: residual
blocks with a timestep embedding, self-attention at chosen resolutions, skip connections
between mirrored down and up blocks); Dhariwal & Nichol 2021 for the ``"scale_shift"``
adaptive GroupNorm and class conditioning. The arithmetic is diffusers' (0.42):

* the timestep's sinusoidal features (``flip_sin_to_cos``, ``freq_shift``) through
  ``time_embedding`` (linear, SiLU, linear) give ``emb`` [B, T]; a class embedding is
  added to it (``num_class_embeds``: a table; ``class_embed_type="timestep"``: the labels'
  own sinusoidal features through a second MLP; ``"identity"``: the labels are [B, T]
  vectors added as they are);
* ``conv_in``; down blocks (``DownBlock2D`` / ``AttnDownBlock2D``: ``layers_per_block``
  residual blocks, each followed by attention in the Attn variant, then a stride-2 conv
  except in the last block), every intermediate kept for the skips; ``UNetMidBlock2D``;
  up blocks (``UpBlock2D`` / ``AttnUpBlock2D``: ``layers_per_block + 1`` residual blocks,
  each on the concatenation with the last unused skip, then nearest x2 + conv except in
  the last); GroupNorm, SiLU, ``conv_out``.

Taps (see :mod:`memjax.models.taps`): ``time_embedding`` ([B, T], class embedding
included), ``conv_in``, ``down_blocks.{i}``, ``mid_block``, ``up_blocks.{i}`` (each block's
output sample), ``out`` (the output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.errors import InputError
from memjax.models.diffusion_layers import (
    DIFFUSERS_ACTIVATIONS,
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    MidBlock2D,
    ResnetBlock2D,
    SpatialAttention,
    Upsample2D,
    convert_by_name,
    timestep_embedding,
)
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
TIME_NORMS = ("default", "scale_shift")
CLASS_EMBED_TYPES = (None, "timestep", "identity")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The diffusers ``UNet2DModel`` config attributes this port implements (diffusers'
    defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                       "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    sample_size: Any = None

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def class_conditional(self) -> bool:
        return self.class_embed_type is not None or self.num_class_embeds is not None


class TimestepEmbedding(nnx.Module):
    """diffusers' ``TimestepEmbedding``: ``linear_2(silu(linear_1(x)))``."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(d_in, d_out, rngs=rngs)
        self.linear_2 = Linear(d_out, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ClassTable(nnx.Module):
    """``nn.Embedding(num_class_embeds, T)``: integer labels [B] -> rows [B, T]."""

    def __init__(self, count: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (count, dim)))

    def __call__(self, labels: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], labels.astype(jnp.int32), axis=0)


def _class_embedding(config: UNet2DConfig, rngs: nnx.Rngs) -> nnx.Module | None:
    """diffusers' ``class_embedding``: a table (``num_class_embeds`` without a type), the
    timestep MLP (``"timestep"``), or none (``"identity"`` adds the labels themselves)."""
    t, c0 = config.time_embed_dim, config.block_out_channels[0]
    if config.class_embed_type == "timestep":
        return TimestepEmbedding(c0, t, rngs=rngs)
    if config.class_embed_type is None and config.num_class_embeds is not None:
        return ClassTable(config.num_class_embeds, t, rngs=rngs)
    return None


class DownBlock(nnx.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnets (each followed by attention when
    ``attention``), then an optional stride-2 ``Downsample2D``; returns the output and
    every intermediate (the skips)."""

    def __init__(self, c_in: int, c_out: int, *, attention: bool, downsample: bool,
                 config: UNet2DConfig, rngs: nnx.Rngs):
        n, t, g, eps = (config.layers_per_block, config.time_embed_dim,
                        config.norm_num_groups, config.norm_eps)
        self.resnets = nnx.List([
            ResnetBlock2D(c_in if j == 0 else c_out, c_out, temb_channels=t, groups=g,
                          eps=eps, act=config.act_fn, rngs=rngs,
                          time_embedding_norm=config.resnet_time_scale_shift)
            for j in range(n)])
        head_dim = config.attention_head_dim or c_out
        self.attentions = nnx.List([
            SpatialAttention(c_out, head_dim=head_dim, groups=g, eps=eps, rngs=rngs)
            for _ in range(n)] if attention else [])
        self.downsampler = Downsample2D(c_out, c_out, use_conv=True,
                                        padding=config.downsample_padding,
                                        rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[j](x)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: ``layers_per_block + 1`` resnets, each on
    ``concat([x, skip])`` with the last unused skip (each followed by attention when
    ``attention``), then an optional nearest x2 + conv ``Upsample2D``."""

    def __init__(self, c_in: int, c_prev: int, c_out: int, *, attention: bool,
                 upsample: bool, config: UNet2DConfig, rngs: nnx.Rngs):
        n, t, g, eps = (config.layers_per_block + 1, config.time_embed_dim,
                        config.norm_num_groups, config.norm_eps)
        self.resnets = nnx.List([
            ResnetBlock2D((c_prev if j == 0 else c_out) + (c_in if j == n - 1 else c_out),
                          c_out, temb_channels=t, groups=g, eps=eps, act=config.act_fn,
                          rngs=rngs, time_embedding_norm=config.resnet_time_scale_shift)
            for j in range(n)])
        head_dim = config.attention_head_dim or c_out
        self.attentions = nnx.List([
            SpatialAttention(c_out, head_dim=head_dim, groups=g, eps=eps, rngs=rngs)
            for _ in range(n)] if attention else [])
        self.upsampler = Upsample2D(c_out, c_out, use_conv=True, rngs=rngs) \
            if upsample else None

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if len(self.attentions):
                x = self.attentions[j](x)
        return x if self.upsampler is None else self.upsampler(x)


class UNet2DModel(nnx.Module):
    """The ε-predictor: sample [B, H, W, C_in], timestep [B] -> [B, H, W, out_channels]."""

    def __init__(self, config: UNet2DConfig, *, rngs: nnx.Rngs):
        self.config = config
        channels = config.block_out_channels
        c0, t = channels[0], config.time_embed_dim
        self.conv_in = Conv2d(config.in_channels, c0, 3, padding=1, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c0, t, rngs=rngs)
        self.class_embedding = _class_embedding(config, rngs)
        last = len(channels) - 1
        self.down_blocks = nnx.List([
            DownBlock(channels[max(i - 1, 0)], channels[i],
                      attention=kind == "AttnDownBlock2D", downsample=i < last,
                      config=config, rngs=rngs)
            for i, kind in enumerate(config.down_block_types)])
        attn_groups = config.attn_norm_num_groups
        if attn_groups is None and config.resnet_time_scale_shift == "default":
            attn_groups = config.norm_num_groups  # diffusers: no norm with scale_shift
        self.mid_block = None if config.mid_block_type is None else MidBlock2D(
            channels[-1], temb_channels=t, groups=config.norm_num_groups,
            attn_groups=attn_groups, eps=config.norm_eps, act=config.act_fn,
            head_dim=config.attention_head_dim or channels[-1],
            add_attention=config.add_attention, rngs=rngs,
            time_embedding_norm=config.resnet_time_scale_shift,
            output_scale_factor=config.mid_block_scale_factor)
        rev = channels[::-1]
        self.up_blocks = nnx.List([
            UpBlock(rev[min(i + 1, last)], rev[max(i - 1, 0)], rev[i],
                    attention=kind == "AttnUpBlock2D", upsample=i < last, config=config,
                    rngs=rngs)
            for i, kind in enumerate(config.up_block_types)])
        self.conv_norm_out = GroupNorm(c0, config.norm_num_groups, eps=config.norm_eps)
        self.conv_out = Conv2d(c0, config.out_channels, 3, padding=1, rngs=rngs)

    def embed_time(self, timestep: jax.Array, class_labels: jax.Array | None) -> jax.Array:
        """timestep [B] (and class_labels) -> the embedding [B, T] every resnet reads."""
        c = self.config
        features = timestep_embedding(timestep, c.block_out_channels[0],
                                      flip_sin_to_cos=c.flip_sin_to_cos,
                                      downscale_freq_shift=c.freq_shift)
        emb = self.time_embedding(features)
        if not c.class_conditional:
            if class_labels is not None:
                raise InputError("class_labels: this UNet2DModel is not class-conditional "
                                 "(no num_class_embeds or class_embed_type)")
            return emb
        if class_labels is None:
            raise InputError("class_labels: this UNet2DModel is class-conditional; pass "
                             "the labels")
        if c.class_embed_type == "identity":
            return emb + jnp.asarray(class_labels, emb.dtype)
        if c.class_embed_type == "timestep":
            labels = timestep_embedding(class_labels, c.block_out_channels[0],
                                        flip_sin_to_cos=c.flip_sin_to_cos,
                                        downscale_freq_shift=c.freq_shift)
            return emb + self.class_embedding(labels)
        return emb + self.class_embedding(jnp.asarray(class_labels))

    def __call__(self, sample: jax.Array, timestep: jax.Array,
                 class_labels: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """ε [B, H, W, out_channels] for sample [B, H, W, in_channels], timestep [B]
        (integer or fractional), class_labels [B] (integers; [B, T] vectors for
        ``class_embed_type="identity"``) when the model is class-conditional."""
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise InputError(f"sample: expected NHWC [B, H, W, {c.in_channels}], got shape "
                             f"{tuple(sample.shape)}")
        timestep = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), sample.shape[:1])
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        emb = tap(taps, "time_embedding", self.embed_time(timestep, class_labels))
        x = tap(taps, "conv_in", self.conv_in(sample))
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, block_skips = block(x, emb)
            skips.extend(block_skips)
            tap(taps, f"down_blocks.{i}", x)
        if self.mid_block is not None:
            x = tap(taps, "mid_block", self.mid_block(x, emb))
        for i, block in enumerate(self.up_blocks):
            x = tap(taps, f"up_blocks.{i}", block(x, skips, emb))
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return tap(taps, "out", x)

    def memjax_interface(self) -> tuple[str, str, tuple[str, ...]]:
        """("diffusion", "__call__", inputs): inputs ("sample", "timestep"), with
        "class_labels" for a class-conditional model."""
        inputs = ("sample", "timestep")
        if self.config.class_conditional:
            inputs += ("class_labels",)
        return ("diffusion", "__call__", inputs)


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(UNet2DConfig)}
# Read and honoured (dataclass fields), or neutral at inference: dropout is off,
# num_train_timesteps only sizes the "learned" time table (refused below).
_IMPLEMENTED = _FIELDS | {"dropout", "num_train_timesteps"}
_DEFAULTS: dict[str, Any] = {"time_embedding_type": "positional", "downsample_type": "conv",
                             "upsample_type": "conv"}


def _choice(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise InputError(f"UNet2DModel config.json {key}={value!r}: memjax implements "
                         f"{list(allowed)}")


def _positive_ints(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise InputError(f"UNet2DModel config.json {key}={value!r}: expected positive ints")
    return tuple(value)


def from_hf_config(hf: dict[str, Any]) -> UNet2DConfig:
    """diffusers ``UNet2DModel`` config.json -> :class:`UNet2DConfig`; attributes the port
    does not implement raise InputError naming them."""
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "UNet2DModel")
    values = {k: v for k, v in hf.items() if k in _FIELDS}
    for key in ("down_block_types", "up_block_types"):
        if key in values:
            values[key] = tuple(values[key])
    if isinstance(values.get("sample_size"), list):  # [h, w]; unused by the forward pass
        values["sample_size"] = tuple(values["sample_size"])
    values["block_out_channels"] = _positive_ints(
        hf.get("block_out_channels", UNet2DConfig.block_out_channels), "block_out_channels")
    config = UNet2DConfig(**values)
    for kind in config.down_block_types:
        _choice(kind, DOWN_BLOCKS, "down_block_types")
    for kind in config.up_block_types:
        _choice(kind, UP_BLOCKS, "up_block_types")
    n = len(config.block_out_channels)
    if len(config.down_block_types) != n or len(config.up_block_types) != n:
        raise InputError(f"UNet2DModel config.json: {len(config.down_block_types)} "
                         f"down_block_types, {len(config.up_block_types)} up_block_types and "
                         f"{n} block_out_channels must be as many")
    _choice(config.mid_block_type, ("UNetMidBlock2D", None), "mid_block_type")
    _choice(config.act_fn, tuple(DIFFUSERS_ACTIVATIONS), "act_fn")
    _choice(config.resnet_time_scale_shift, TIME_NORMS, "resnet_time_scale_shift")
    _choice(config.class_embed_type, CLASS_EMBED_TYPES, "class_embed_type")
    if not isinstance(config.norm_num_groups, int) or isinstance(config.norm_num_groups, bool):
        raise InputError(f"UNet2DModel config.json norm_num_groups={config.norm_num_groups!r}:"
                         " expected an int")
    return config


def _build(config: UNet2DConfig, rngs: nnx.Rngs) -> UNet2DModel:
    return UNet2DModel(config, rngs=rngs)


def convert(reader, config: UNet2DConfig) -> dict[tuple, Any]:
    """diffusers keys -> param paths by name (conv kernels OIHW -> HWIO, linear ones
    transposed)."""
    return convert_by_name(reader, lambda: _build(config, nnx.Rngs(0)), "UNet2DModel")


ARCH = register(Architecture(
    name="unet2d", model_types=("UNet2DModel",), from_hf_config=from_hf_config,
    build=_build, convert=convert, config_class=UNet2DConfig,
))
