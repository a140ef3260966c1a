"""Layers shared by the diffusion ports (diffusers' UNet2DModel, DiTTransformer2DModel,
AutoencoderKL): sinusoidal timestep features and the blocks the ports have in common.

Images are NHWC (memjax's vision layout); diffusers is NCHW, the converters transpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))
    args = scale * (jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :])
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
