"""Layers shared by the diffusion ports (diffusers' UNet2DModel, DiTTransformer2DModel,
AutoencoderKL): sinusoidal timestep features and the blocks the ports have in common.

Images are NHWC (memjax's vision layout); diffusers is NCHW, the converters transpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.errors import InputError
from memjax.models.layers import attention


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of diffusion timesteps (Ho et al. 2020, after Vaswani et al. 2017),
    as diffusers' ``get_timestep_embedding``.

    Frequencies ``exp(-log(max_period) * k / (dim/2 - downscale_freq_shift))`` for
    ``k < dim // 2``; features ``[sin, cos]`` of ``scale * t * freq`` (``[cos, sin]`` when
    ``flip_sin_to_cos``), a zero column appended when ``dim`` is odd.

    Args:
      timesteps: [B] (integer or fractional) timesteps.
      dim: feature width.

    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    # The frequencies as a host constant (float64, rounded once to float32): XLA's float32
    # exp differs by an ulp between programs, which at t ≈ 999 moves the features by 6e-5
    # (and the engine's program would disagree with a plain jit of the same model).
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float64)
    freqs = jnp.asarray(np.exp(exponent / (half - downscale_freq_shift)).astype(np.float32))
    args = scale * (jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :])
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ----------------------------------------------------------------------------------------
# Blocks shared by UNet2DModel and AutoencoderKL (Ho et al. 2020's U-Net residual blocks,
# Rombach et al. 2022's KL autoencoder), in diffusers' arithmetic. Parameter names follow
# diffusers' module names so the converters map keys by name (see ``diffusers_key``).
# ----------------------------------------------------------------------------------------

#: diffusers' ``get_activation`` names this port implements.
DIFFUSERS_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape) * fan_in ** -0.5)


class Conv2d(nnx.Module):
    """PyTorch ``Conv2d`` with bias on NHWC input; kernel HWIO ``[k, k, C_in, C_out]``.

    ``padding`` pixels of zeros on every side (PyTorch's symmetric ``padding``).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, rngs: nnx.Rngs,
                 stride: int = 1, padding: int = 0):
        self.kernel = _normal(rngs, (kernel_size, kernel_size, c_in, c_out),
                              c_in * kernel_size * kernel_size)
        self.bias = nnx.Param(jnp.zeros((c_out,)))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C_in] -> [B, H', W', C_out], H' = floor((H + 2p - k) / stride) + 1."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST)
        return y + jnp.broadcast_to(self.bias[...].astype(y.dtype), y.shape)


class Linear(nnx.Module):
    """PyTorch ``Linear``: ``x @ kernel + bias`` with kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = _normal(rngs, (d_in, d_out), d_in)
        self.bias = nnx.Param(jnp.zeros((d_out,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
        return y + jnp.broadcast_to(self.bias[...].astype(y.dtype), y.shape)


class GroupNorm(nnx.Module):
    """PyTorch ``GroupNorm`` (Wu & He 2018) over NHWC: each example's channels split into
    ``groups`` consecutive groups, each normalised over (H, W, its channels) with the
    biased variance, then an affine per channel. Statistics in float32."""

    def __init__(self, channels: int, groups: int, *, eps: float):
        if channels % groups:
            raise InputError(f"GroupNorm: {channels} channels are not divisible into "
                             f"{groups} groups (norm_num_groups)")
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.groups, self.eps = groups, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = (y * jnp.broadcast_to(self.scale[...].astype(jnp.float32), y.shape)
             + jnp.broadcast_to(self.bias[...].astype(jnp.float32), y.shape))
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (the DDPM residual block, Ho et al. 2020, App. B):

    ``h = conv1(act(norm1(x)))``; with a time embedding ``e`` [B, T],
    ``"default"``: ``h = norm2(h + proj(act(e)))``; ``"scale_shift"`` (Dhariwal & Nichol
    2021's adaptive GroupNorm): ``(scale, shift) = proj(act(e))``,
    ``h = norm2(h) * (1 + scale) + shift``; then ``h = conv2(act(h))`` and the output is
    ``(shortcut(x) + h) / output_scale_factor``, the shortcut a 1x1 conv (3x3 with
    ``conv_shortcut``) when the channel count changes, else the identity.
    """

    def __init__(self, c_in: int, c_out: int, *, temb_channels: int | None, groups: int,
                 eps: float, act: str, rngs: nnx.Rngs, time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0, conv_shortcut: bool = False):
        self.norm1 = GroupNorm(c_in, groups, eps=eps)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1, rngs=rngs)
        width = 2 * c_out if time_embedding_norm == "scale_shift" else c_out
        self.time_emb_proj = None if temb_channels is None else Linear(
            temb_channels, width, rngs=rngs)
        self.norm2 = GroupNorm(c_out, groups, eps=eps)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, rngs=rngs)
        k = 3 if conv_shortcut else 1
        self.conv_shortcut = None if c_in == c_out else Conv2d(c_in, c_out, k, padding=k // 2,
                                                               rngs=rngs)
        self.act, self.time_embedding_norm = act, time_embedding_norm
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        """x [B, H, W, C_in], temb [B, T] or None -> [B, H, W, C_out]."""
        act = DIFFUSERS_ACTIVATIONS[self.act]
        h = self.conv1(act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            e = self.time_emb_proj(act(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = jnp.split(e, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(act(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class SpatialAttention(nnx.Module):
    """diffusers' ``Attention`` as the UNet and VAE blocks use it on feature maps
    (``_from_deprecated_attn_block``): self-attention over the H*W positions
    (Vaswani et al. 2017; Ho et al. 2020's 16x16 attention):

    ``h = group_norm(x)`` (absent when ``groups`` is None), ``q, k, v = to_q/k/v(h)``
    split into ``heads`` heads of ``head_dim``, ``softmax(q k^T / sqrt(head_dim)) v``,
    ``to_out.0``, then ``(that + x) / rescale_output_factor``.
    """

    def __init__(self, channels: int, *, head_dim: int, groups: int | None, eps: float,
                 rngs: nnx.Rngs, rescale_output_factor: float = 1.0):
        heads = channels // head_dim
        if heads < 1:
            raise InputError(f"attention_head_dim={head_dim} is larger than the {channels} "
                             "channels it attends over")
        inner = heads * head_dim
        self.group_norm = None if groups is None else GroupNorm(channels, groups, eps=eps)
        self.to_q = Linear(channels, inner, rngs=rngs)
        self.to_k = Linear(channels, inner, rngs=rngs)
        self.to_v = Linear(channels, inner, rngs=rngs)
        self.to_out = Linear(inner, channels, rngs=rngs)
        self.heads, self.head_dim = heads, head_dim
        self.rescale_output_factor = rescale_output_factor

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, hgt, wid, c = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.reshape(b, hgt * wid, c)
        shape = (b, hgt * wid, self.heads, self.head_dim)
        q, k, v = (proj(h).reshape(shape) for proj in (self.to_q, self.to_k, self.to_v))
        # memjax's exact attention: dense, or in query blocks when the scores are large
        # (a 64x64 latent's 4096 positions), every softmax row as the dense formula's.
        a = attention(q, k, v, None, self.head_dim ** -0.5)
        out = self.to_out(a.reshape(b, hgt * wid, -1)).reshape(b, hgt, wid, c)
        return (out + x) / self.rescale_output_factor


class Downsample2D(nnx.Module):
    """diffusers' ``Downsample2D``: a 3x3 stride-2 conv with ``padding`` zeros per side;
    ``padding=0`` first pads one zero row/column at the bottom/right (diffusers' asymmetric
    padding, the original DDPM's ``pad (0, 1, 0, 1)``). Without ``use_conv``: 2x2 average
    pooling (channels unchanged)."""

    def __init__(self, c_in: int, c_out: int, *, use_conv: bool, padding: int,
                 rngs: nnx.Rngs):
        self.conv = Conv2d(c_in, c_out, 3, stride=2, padding=padding, rngs=rngs) \
            if use_conv else None
        self.pad_bottom_right = use_conv and padding == 0

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, ~H/2, ~W/2, C_out]."""
        if self.conv is None:
            b, h, w, c = x.shape
            x = x[:, :h // 2 * 2, :w // 2 * 2]
            return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        if self.pad_bottom_right:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """diffusers' ``Upsample2D`` (interpolating form): nearest-neighbour x2, then a 3x3 conv
    with padding 1 (without ``use_conv``, the interpolation alone)."""

    def __init__(self, c_in: int, c_out: int, *, use_conv: bool, rngs: nnx.Rngs):
        self.conv = Conv2d(c_in, c_out, 3, padding=1, rngs=rngs) if use_conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C_out]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x if self.conv is None else self.conv(x)


class MidBlock2D(nnx.Module):
    """diffusers' ``UNetMidBlock2D`` with one layer: ``resnets.0``, then (when
    ``add_attention``) ``attentions.0``, then ``resnets.1``, all at ``channels``."""

    def __init__(self, channels: int, *, temb_channels: int | None, groups: int,
                 attn_groups: int | None, eps: float, act: str, head_dim: int,
                 add_attention: bool, rngs: nnx.Rngs, time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0):
        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels=temb_channels,
                                 groups=groups, eps=eps, act=act, rngs=rngs,
                                 time_embedding_norm=time_embedding_norm,
                                 output_scale_factor=output_scale_factor)

        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([SpatialAttention(
            channels, head_dim=head_dim, groups=attn_groups, eps=eps, rngs=rngs,
            rescale_output_factor=output_scale_factor)] if add_attention else [])

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        x = self.resnets[0](x, temb)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x, temb)


def diffusers_key(path: tuple[str | int, ...]) -> tuple[str, str]:
    """A parameter path of these blocks -> (diffusers state-dict key, layout).

    Names follow diffusers' modules; ``kernel`` and ``scale`` read diffusers' ``weight``
    (layout ``"hwio"`` for conv kernels, ``"T"`` for linear ones, ``"same"`` otherwise),
    ``to_out`` is diffusers' ``to_out.0``, ``downsampler``/``upsampler`` its
    ``downsamplers.0``/``upsamplers.0``, an ``embedding`` table its ``weight``.
    """
    names = {"to_out": "to_out.0", "downsampler": "downsamplers.0",
             "upsampler": "upsamplers.0"}
    *parents, leaf = (str(p) for p in path)
    parents = [names.get(p, p) for p in parents]
    layout = "same"
    if leaf == "kernel":
        layout = "kernel"
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join([*parents, leaf]), layout


def convert_by_name(reader: Any, build: Callable[[], nnx.Module], arch: str
                    ) -> dict[tuple, Any]:
    """Every parameter of ``build()`` read from its diffusers key (:func:`diffusers_key`):
    conv kernels OIHW -> HWIO, linear kernels transposed. Mis-shaped tensors raise
    InputError naming their keys (missing and unexpected ones are reported by the loader).
    """
    from memjax.models.vit import ParamMap

    abstract = nnx.eval_shape(build)
    out = ParamMap(reader)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, layout = diffusers_key(tuple(path))
        if layout == "kernel":
            layout = "hwio" if var.get_value().ndim == 4 else "T"
        out.put(tuple(path), key, layout)
    return out.finish(build, arch)
