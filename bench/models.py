"""Benchmark models as small pure functions, in JAX (one example) and PyTorch (a batch).

Parameters are a dict pytree of float32 arrays with the same names and layouts in both
frameworks (dense kernels are ``[in, out]``, used as ``x @ w + b``), so one set of weights
is copied across with :func:`to_torch` and the two implementations can be checked against
each other before anything is timed.

FLOP counts are analytic: each matmul of an ``[m, k]`` by a ``[k, n]`` costs ``2 m n k``;
biases, norms, softmax and activations are left out (they are O(m n), not O(m n k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------- MLP


def init_mlp(seed: int, sizes: tuple[int, ...]) -> dict:
    """He-initialised ReLU MLP: ``{"layers": [{"w": [in, out], "b": [out]}, ...]}``."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = rng.standard_normal((fan_in, fan_out), dtype=np.float32) * math.sqrt(2.0 / fan_in)
        b = 0.01 * rng.standard_normal(fan_out, dtype=np.float32)
        layers.append({"w": w, "b": b})
    return {"layers": layers}


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """Logits of one flattened example ``x`` [in] (ReLU between layers)."""
    *hidden, last = params["layers"]
    for layer in hidden:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def mlp_flops(sizes: tuple[int, ...]) -> int:
    """FLOPs per example: one [1, in] x [in, out] matmul per layer, 2 * in * out each."""
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def torch_mlp(params: dict, x):
    """Batched PyTorch twin of :func:`mlp`: ``x`` [B, in] -> logits [B, C]."""
    import torch

    *hidden, last = params["layers"]
    for layer in hidden:
        x = torch.relu(torch.addmm(layer["b"], x, layer["w"]))
    return torch.addmm(last["b"], x, last["w"])


# ---------------------------------------------------------------------------- ViT


@dataclass(frozen=True)
class ViTConfig:
    """A small pre-LN ViT with a cls token (defaults: ~4.8M params, CIFAR-sized input)."""

    image: int = 32
    channels: int = 3
    patch: int = 4
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 1024
    classes: int = 10
    ln_eps: float = 1e-6

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + 1  # + cls

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


def init_vit(seed: int, cfg: ViTConfig) -> dict:
    """Random ViT weights (normal, std 0.02; LayerNorms at identity)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (0.02 * rng.standard_normal(shape, dtype=np.float32))
    zeros = lambda *shape: np.zeros(shape, np.float32)
    ln = lambda: {"scale": np.ones(cfg.dim, np.float32), "bias": zeros(cfg.dim)}
    blocks = [
        {
            "ln1": ln(),
            "qkv": {"w": normal(cfg.dim, 3 * cfg.dim), "b": zeros(3 * cfg.dim)},
            "out": {"w": normal(cfg.dim, cfg.dim), "b": zeros(cfg.dim)},
            "ln2": ln(),
            "fc1": {"w": normal(cfg.dim, cfg.mlp_dim), "b": zeros(cfg.mlp_dim)},
            "fc2": {"w": normal(cfg.mlp_dim, cfg.dim), "b": zeros(cfg.dim)},
        }
        for _ in range(cfg.depth)
    ]
    return {
        "embed": {"w": normal(cfg.patch_dim, cfg.dim), "b": zeros(cfg.dim)},
        "cls": normal(1, cfg.dim),
        "pos": normal(cfg.tokens, cfg.dim),
        "blocks": blocks,
        "ln_f": ln(),
        # std 0.2 on unit-variance features: logits of std ~3, so the signals vary.
        "head": {"w": normal(cfg.dim, cfg.classes) * 10, "b": zeros(cfg.classes)},
    }


def param_count(params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def _layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x: jax.Array, p: dict) -> jax.Array:
    return x @ p["w"] + p["b"]


def patchify(image: jax.Array, patch: int) -> jax.Array:
    """[H, W, C] -> [(H/p)(W/p), p*p*C], patches in row-major order."""
    h, w, c = image.shape
    x = image.reshape(h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 2, 1, 3, 4).reshape((h // patch) * (w // patch), patch * patch * c)


def attention_core(qkv: jax.Array, heads: int) -> jax.Array:
    """Softmax attention of one example: fused ``qkv`` [T, 3D] -> [T, D].

    Heads-first batched matmuls (``[H, T, D/h] @ [H, D/h, T]``): on XLA:CPU this runs ~2x
    faster than the einsum form flax uses (:func:`attention_core_einsum`), measured in
    bench/vit_components.py, so the JAX peer is not handicapped by its formulation.
    """
    tokens, dim = qkv.shape[0], qkv.shape[1] // 3
    q, k, v = qkv.reshape(tokens, 3, heads, dim // heads).transpose(1, 2, 0, 3)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim // heads)
    return (jax.nn.softmax(scores, axis=-1) @ v).transpose(1, 0, 2).reshape(tokens, dim)


def attention_core_einsum(qkv: jax.Array, heads: int) -> jax.Array:
    """The same attention as :func:`attention_core`, written as flax writes it (einsum)."""
    tokens, dim = qkv.shape[0], qkv.shape[1] // 3
    qkv = qkv.reshape(tokens, 3, heads, dim // heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim // heads)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(tokens, dim)


def _attention(x: jax.Array, block: dict, heads: int) -> jax.Array:
    return _dense(attention_core(_dense(x, block["qkv"]), heads), block["out"])


def vit(params: dict, image: jax.Array, cfg: ViTConfig) -> jax.Array:
    """Logits [classes] of one image [H, W, C] (pre-LN blocks, exact GELU, cls-token head)."""
    x = _dense(patchify(image, cfg.patch), params["embed"])
    x = jnp.concatenate([params["cls"], x], axis=0) + params["pos"]
    for block in params["blocks"]:
        x = x + _attention(_layer_norm(x, block["ln1"], cfg.ln_eps), block, cfg.heads)
        h = _layer_norm(x, block["ln2"], cfg.ln_eps)
        x = x + _dense(jax.nn.gelu(_dense(h, block["fc1"]), approximate=False), block["fc2"])
    return _dense(_layer_norm(x[0], params["ln_f"], cfg.ln_eps), params["head"])


def vit_flops(cfg: ViTConfig) -> int:
    """FLOPs per example: every matmul of the forward pass, 2 m n k each."""
    t, d, p = cfg.tokens, cfg.dim, cfg.patches
    embed = 2 * p * cfg.patch_dim * d  # [P, p*p*C] x [p*p*C, D]
    qkv = 2 * t * d * 3 * d  # [T, D] x [D, 3D]
    scores = 2 * t * t * d  # heads x [T, D/h] x [D/h, T]
    mix = 2 * t * t * d  # heads x [T, T] x [T, D/h]
    out = 2 * t * d * d  # [T, D] x [D, D]
    mlp_ = 2 * (2 * t * d * cfg.mlp_dim)  # [T, D] x [D, M] and [T, M] x [M, D]
    head = 2 * d * cfg.classes  # cls token only
    return embed + cfg.depth * (qkv + scores + mix + out + mlp_) + head


def _torch_layer_norm(x, p: dict, eps: float):
    import torch.nn.functional as F

    return F.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], eps)


def torch_vit(params: dict, images, cfg: ViTConfig):
    """Batched PyTorch twin of :func:`vit`: ``images`` [B, H, W, C] -> logits [B, classes].

    Uses ``scaled_dot_product_attention``, PyTorch's fused attention: the fair batched peer.
    """
    import torch
    import torch.nn.functional as F

    b, h, w, c = images.shape
    pp, heads, dim = cfg.patch, cfg.heads, cfg.dim
    x = images.reshape(b, h // pp, pp, w // pp, pp, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, cfg.patches, cfg.patch_dim) @ params["embed"]["w"] + params["embed"]["b"]
    x = torch.cat([params["cls"].expand(b, 1, dim), x], dim=1) + params["pos"]
    for block in params["blocks"]:
        y = _torch_layer_norm(x, block["ln1"], cfg.ln_eps)
        qkv = (y @ block["qkv"]["w"] + block["qkv"]["b"]).reshape(b, cfg.tokens, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, D/h]
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, dim)
        x = x + att @ block["out"]["w"] + block["out"]["b"]
        y = _torch_layer_norm(x, block["ln2"], cfg.ln_eps)
        y = F.gelu(y @ block["fc1"]["w"] + block["fc1"]["b"])
        x = x + y @ block["fc2"]["w"] + block["fc2"]["b"]
    x = _torch_layer_norm(x[:, 0], params["ln_f"], cfg.ln_eps)
    return x @ params["head"]["w"] + params["head"]["b"]


# ---------------------------------------------------------------------------- helpers


def to_torch(params):
    """The same weights as torch tensors (copies, so the frameworks never share buffers)."""
    import torch

    return jax.tree.map(lambda a: torch.from_numpy(np.array(a, np.float32)), params)
