"""Small image generators trained on a keep-mask subset (the audit's membership and
dataset-inference demonstrations for generators).

- :func:`fit_denoiser`: a DDPM ε-predictor (Ho et al. 2020) — any NNX port called as
  ``module(sample [B,H,W,C], timestep [B], class_labels [B] | None)`` (memjax's
  ``UNet2DModel`` / ``DiTTransformer2DModel``) — trained on the kept images with the
  simple loss ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖², t uniform over the schedule.
- :func:`patch_codebook` / :func:`patch_tokens`: a k-means codebook over p×p image
  patches and the token grid of each image (a VQ tokenizer without a decoder network,
  enough for an image-token model to memorise).
- :func:`fit_token_model`: a class-conditional image-token model (memjax's LlamaGen
  port: ``module(class_labels [B], input_ids [B,T]) -> logits [B,T,V]``) trained with
  next-token cross-entropy and class dropout to the null class (classifier-free guidance,
  Ho & Salimans 2022), as LlamaGen trains (Sun et al. 2024).

All are deterministic functions of a key: minibatches of distinct kept examples
(:func:`memjax.train.clip.kept_minibatch`), Adam, one jitted step run in a host loop
(see :func:`_adam_steps` for why not a ``lax.scan``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memjax.errors import InputError
from memjax.train.clip import kept_minibatch


def _adam_steps(params, loss_fn: Callable, key: jax.Array, steps: int, learning_rate: float):
    """``steps`` Adam steps of ``loss_fn(params, step_key)``: one jitted step, a host loop.

    Not a ``lax.scan``: XLA:CPU runs convolution gradients inside a while loop ~40x slower
    than the same step on its own (a 2-level UNet at 16x16, batch 64: 7.9 s vs 0.22 s per
    step, measured), so the loop stays on the host and the functions here are not jitted
    or vmapped by the caller.
    """
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(p, state, k):
        grads = jax.grad(loss_fn)(p, k)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for k in jax.random.split(key, steps):
        params, state = step(params, state, k)
    return params


def fit_denoiser(key: jax.Array, images: jax.Array, keep: jax.Array, *,
                 build: Callable[[nnx.Rngs], nnx.Module], alphas_cumprod: jax.Array,
                 class_labels: jax.Array | None = None, steps: int = 1000,
                 batch_size: int = 64, learning_rate: float = 2e-3) -> nnx.State:
    """Train ``build(rngs)`` as a DDPM ε-predictor on the kept images; returns its params.

    Args:
      key: PRNG key (initialisation, minibatches, timesteps and noise).
      images: [N, H, W, C] float in [-1, 1] (diffusers' convention).
      keep: [N] 0/1, the training set.
      alphas_cumprod: [T] ᾱ_t of the noise schedule.
      class_labels: [N] int for a class-conditional model, else None.

    Returns:
      The trained NNX params (merge with the graph of ``build``).
    """
    k_init, k_steps = jax.random.split(key)
    graph, params = nnx.split(build(nnx.Rngs(params=k_init)))
    keep = jnp.asarray(keep).astype(bool)
    batch_size = min(batch_size, keep.shape[0])
    abar = jnp.asarray(alphas_cumprod, jnp.float32)

    def loss(p, k):
        k_batch, k_t, k_noise = jax.random.split(k, 3)
        idx, valid = kept_minibatch(k_batch, keep, batch_size)
        x0 = images[idx]
        t = jax.random.randint(k_t, (batch_size,), 0, abar.shape[0])
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        a = abar[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
        labels = None if class_labels is None else class_labels[idx]
        eps = nnx.merge(graph, p)(x_t, t, labels)
        per_example = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
        w = valid.astype(jnp.float32)
        return jnp.sum(per_example * w) / jnp.maximum(w.sum(), 1.0)

    return _adam_steps(params, loss, k_steps, steps, learning_rate)


def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """[N, H/p, W/p, p·p·C] non-overlapping patches of [N, H, W, C] images."""
    n, h, w, c = images.shape
    if h % patch or w % patch:
        raise InputError(f"images {images.shape}: height and width must be multiples of the "
                         f"patch size {patch}")
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // patch, w // patch, patch * patch * c)


def patch_codebook(images: np.ndarray, *, patch: int, size: int, seed: int = 0) -> np.ndarray:
    """[size, p·p·C] k-means centroids (Lloyd's algorithm, k-means++ init) of the images'
    p×p patches: the codebook of a VQ image tokenizer (van den Oord et al. 2017) without
    the learned encoder."""
    from sklearn.cluster import KMeans

    flat = _patches(np.asarray(images, np.float64), patch).reshape(-1, patch * patch
                                                                   * images.shape[-1])
    km = KMeans(n_clusters=size, n_init=1, random_state=seed).fit(flat)
    return km.cluster_centers_.astype(np.float32)


def patch_tokens(images: np.ndarray, codebook: np.ndarray, *, patch: int) -> np.ndarray:
    """[N, (H/p)·(W/p)] int32 raster-order token ids: each patch's nearest codeword."""
    flat = _patches(np.asarray(images, np.float32), patch)
    flat = flat.reshape(flat.shape[0], -1, flat.shape[-1])
    d = ((flat[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)
    return d.argmin(-1).astype(np.int32)


def fit_token_model(key: jax.Array, class_labels: jax.Array, tokens: jax.Array,
                    keep: jax.Array, *, build: Callable[[nnx.Rngs], nnx.Module],
                    null_class: int, class_dropout: float = 0.1, steps: int = 1000,
                    batch_size: int = 64, learning_rate: float = 2e-3) -> nnx.State:
    """Train ``build(rngs)`` (class-conditional image-token model) on the kept examples.

    Each training example's class is replaced by ``null_class`` with probability
    ``class_dropout``, so the model also learns the unconditional distribution that
    classifier-free guidance contrasts with.

    Args:
      class_labels: [N] int; tokens: [N, T] int image tokens; keep: [N] 0/1.

    Returns:
      The trained NNX params.
    """
    k_init, k_steps = jax.random.split(key)
    graph, params = nnx.split(build(nnx.Rngs(params=k_init)))
    keep = jnp.asarray(keep).astype(bool)
    batch_size = min(batch_size, keep.shape[0])

    def loss(p, k):
        k_batch, k_drop = jax.random.split(k)
        idx, valid = kept_minibatch(k_batch, keep, batch_size)
        drop = jax.random.uniform(k_drop, (batch_size,)) < class_dropout
        labels = jnp.where(drop, null_class, class_labels[idx])
        ids = tokens[idx]
        logits = nnx.merge(graph, p)(labels, ids).astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
        w = valid.astype(jnp.float32)
        return jnp.sum(per_token.mean(-1) * w) / jnp.maximum(w.sum(), 1.0)

    return _adam_steps(params, loss, k_steps, steps, learning_rate)
