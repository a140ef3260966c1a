"""diffusers' ``AutoencoderKL`` (the latent-diffusion VAE) in Flax NNX, NHWC.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": a
convolutional encoder maps an image to a diagonal Gaussian posterior over latents, a
decoder maps latents back. The arithmetic is diffusers' (0.42):

* ``Encoder``: ``conv_in``; ``DownEncoderBlock2D`` blocks (``layers_per_block`` residual
  blocks without time embedding, then a stride-2 conv with one zero row/column padded at
  the bottom/right, except in the last block); ``UNetMidBlock2D`` (resnet, single-head
  attention over all positions, resnet); GroupNorm, SiLU, ``conv_out`` to
  ``2 * latent_channels``; then ``quant_conv`` (1x1) when ``use_quant_conv``. The moments
  split into mean and log-variance, the log-variance clamped to [-30, 20].
* ``Decoder``: ``post_quant_conv`` (1x1, when ``use_post_quant_conv``), ``conv_in``, the
  mid block, ``UpDecoderBlock2D`` blocks (``layers_per_block + 1`` resnets, then nearest
  x2 + conv except in the last), GroupNorm, SiLU, ``conv_out``.

All GroupNorms use eps 1e-6. ``scaling_factor`` / ``shift_factor`` are kept in the config
(``latent`` returns the unscaled posterior mean; a latent-diffusion model sees
``(mean - shift_factor) * scaling_factor``). ``force_upcast`` (a dtype choice for fp16
pipelines) and diffusers' tiling / slicing switches (runtime methods, not config) do not
change the math on one image.

Taps: ``encoder.conv_in``, ``encoder.down_blocks.{i}``, ``encoder.mid_block``,
``encoder.out`` (the moments before ``quant_conv``), ``moments`` (after it),
``posterior.mean``, ``posterior.logvar`` (clamped); in
``decode``: ``decoder.conv_in``, ``decoder.mid_block``, ``decoder.up_blocks.{i}``.
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
    MidBlock2D,
    ResnetBlock2D,
    Upsample2D,
    convert_by_name,
)
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap

EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps and the norms' eps
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The diffusers ``AutoencoderKL`` config attributes this port reads (its defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


def _mid(channels: int, config: AutoencoderKLConfig, rngs: nnx.Rngs) -> MidBlock2D:
    return MidBlock2D(channels, temb_channels=None, groups=config.norm_num_groups,
                      attn_groups=config.norm_num_groups, eps=EPS, act=config.act_fn,
                      head_dim=channels, add_attention=config.mid_block_add_attention,
                      rngs=rngs)


def _resnet(c_in: int, c_out: int, config: AutoencoderKLConfig, rngs: nnx.Rngs
            ) -> ResnetBlock2D:
    return ResnetBlock2D(c_in, c_out, temb_channels=None, groups=config.norm_num_groups,
                         eps=EPS, act=config.act_fn, rngs=rngs)


class EncoderBlock(nnx.Module):
    """``DownEncoderBlock2D``: resnets, then an optional stride-2 conv (padding 0)."""

    def __init__(self, c_in: int, c_out: int, *, downsample: bool,
                 config: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(c_in if j == 0 else c_out, c_out, config, rngs)
                                 for j in range(config.layers_per_block)])
        self.downsampler = Downsample2D(c_out, c_out, use_conv=True, padding=0,
                                        rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None)
        return x if self.downsampler is None else self.downsampler(x)


class DecoderBlock(nnx.Module):
    """``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets, then optional x2 + conv."""

    def __init__(self, c_in: int, c_out: int, *, upsample: bool,
                 config: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(c_in if j == 0 else c_out, c_out, config, rngs)
                                 for j in range(config.layers_per_block + 1)])
        self.upsampler = Upsample2D(c_out, c_out, use_conv=True, rngs=rngs) \
            if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
    """image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        channels = config.block_out_channels
        last = len(channels) - 1
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(channels[max(i - 1, 0)], channels[i], downsample=i < last,
                         config=config, rngs=rngs) for i in range(len(channels))])
        self.mid_block = _mid(channels[-1], config, rngs)
        self.conv_norm_out = GroupNorm(channels[-1], config.norm_num_groups, eps=EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1,
                               rngs=rngs)
        self.act = config.act_fn

    def __call__(self, x: jax.Array, taps: Taps | None) -> jax.Array:
        x = tap(taps, "encoder.conv_in", self.conv_in(x))
        for i, block in enumerate(self.down_blocks):
            x = tap(taps, f"encoder.down_blocks.{i}", block(x))
        x = tap(taps, "encoder.mid_block", self.mid_block(x, None))
        x = self.conv_out(DIFFUSERS_ACTIVATIONS[self.act](self.conv_norm_out(x)))
        return tap(taps, "encoder.out", x)


class Decoder(nnx.Module):
    """latents [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        rev = config.block_out_channels[::-1]
        last = len(rev) - 1
        self.conv_in = Conv2d(config.latent_channels, rev[0], 3, padding=1, rngs=rngs)
        self.mid_block = _mid(rev[0], config, rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], upsample=i < last, config=config,
                         rngs=rngs) for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(rev[-1], config.norm_num_groups, eps=EPS)
        self.conv_out = Conv2d(rev[-1], config.out_channels, 3, padding=1, rngs=rngs)
        self.act = config.act_fn

    def __call__(self, z: jax.Array, taps: Taps | None) -> jax.Array:
        x = tap(taps, "decoder.conv_in", self.conv_in(z))
        x = tap(taps, "decoder.mid_block", self.mid_block(x, None))
        for i, block in enumerate(self.up_blocks):
            x = tap(taps, f"decoder.up_blocks.{i}", block(x))
        return self.conv_out(DIFFUSERS_ACTIVATIONS[self.act](self.conv_norm_out(x)))


def posterior(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``DiagonalGaussianDistribution`` parameters: moments [..., 2Z] -> (mean,
    logvar), the first and second halves of the channels, logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class AutoencoderKL(nnx.Module):
    """The KL autoencoder: :meth:`encode`, :meth:`latent`, :meth:`decode`."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1, rngs=rngs) if config.use_quant_conv \
            else None
        self.post_quant_conv = Conv2d(z, z, 1, rngs=rngs) if config.use_post_quant_conv \
            else None

    def encode(self, image: jax.Array, *, taps: Taps | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """image [B, H, W, in_channels] in [-1, 1] -> the posterior's (mean, logvar), each
        [B, H/f, W/f, latent_channels] with f = 2 ** (len(block_out_channels) - 1);
        logvar clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``."""
        c = self.config
        if image.ndim != 4 or image.shape[-1] != c.in_channels:
            raise InputError(f"image: expected NHWC [B, H, W, {c.in_channels}], got shape "
                             f"{tuple(image.shape)}")
        moments = self.encoder(image, taps)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = posterior(tap(taps, "moments", moments))
        return tap(taps, "posterior.mean", mean), tap(taps, "posterior.logvar", logvar)

    def latent(self, image: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """The unscaled posterior mean [B, h, w, latent_channels] (what the "vae" kind
        returns; a latent-diffusion model sees ``(mean - shift) * scaling_factor``)."""
        return self.encode(image, taps=taps)[0]

    def decode(self, latents: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents, taps)

    def memjax_interface(self) -> tuple[str, str, tuple[str, ...]]:
        return ("vae", "latent", ("image",))


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
# force_upcast: runs fp16 pipelines' VAE in float32, a dtype choice memjax makes at load.
_IMPLEMENTED = _FIELDS | {"force_upcast"}
_DEFAULTS: dict[str, Any] = {}


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def from_hf_config(hf: dict[str, Any]) -> AutoencoderKLConfig:
    """diffusers ``AutoencoderKL`` config.json -> :class:`AutoencoderKLConfig`; attributes
    the port does not implement raise InputError naming them."""
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "AutoencoderKL")
    config = AutoencoderKLConfig(**{k: _tuple(v) for k, v in hf.items() if k in _FIELDS})
    n = len(config.block_out_channels)
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
        kinds = getattr(config, key)
        if any(k != allowed for k in kinds) or len(kinds) != n:
            raise InputError(f"AutoencoderKL config.json {key}={list(kinds)!r}: memjax "
                             f"implements {n} x {allowed!r} (one per block_out_channels)")
    if config.act_fn not in DIFFUSERS_ACTIVATIONS:
        raise InputError(f"AutoencoderKL config.json act_fn={config.act_fn!r}: memjax "
                         f"implements {sorted(DIFFUSERS_ACTIVATIONS)}")
    return config


def _build(config: AutoencoderKLConfig, rngs: nnx.Rngs) -> AutoencoderKL:
    return AutoencoderKL(config, rngs=rngs)


def convert(reader, config: AutoencoderKLConfig) -> dict[tuple, Any]:
    """diffusers keys -> param paths by name (conv kernels OIHW -> HWIO)."""
    return convert_by_name(reader, lambda: _build(config, nnx.Rngs(0)), "AutoencoderKL")


ARCH = register(Architecture(
    name="autoencoder_kl", model_types=("AutoencoderKL",), from_hf_config=from_hf_config,
    build=_build, convert=convert, config_class=AutoencoderKLConfig,
))
