"""Building blocks shared by the transformer ports (plain NNX Params, HF-compatible maths)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


class Dense(nnx.Module):
    """``x @ kernel + bias`` with kernel [in, out] (PyTorch Linear weights are transposed)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,))) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is None:
            return y
        return y + jnp.broadcast_to(self.bias[...].astype(x.dtype), y.shape)


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              scale: float) -> jax.Array:
    """Softmax attention. q/k/v [B, T, H, Dh]; mask broadcastable to [B, H, Tq, Tk] (True =
    attend). Scores and softmax in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def causal_mask(attention_mask: jax.Array | None, length: int) -> jax.Array:
    """[B or 1, 1, T, T] bool: causal, and keys with attention_mask = 0 masked out."""
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, None, :] != 0)
    return mask


def padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """[B, 1, 1, T] bool key mask for bidirectional encoders (None: attend everywhere)."""
    return None if attention_mask is None else (attention_mask[:, None, None, :] != 0)
