"""A tiny CLIP-style dual encoder trained on a keep-mask subset of image-caption pairs.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP): an image tower and a text tower project into a shared space and are
trained with the symmetric InfoNCE loss over in-batch negatives, with a learned logit
scale (initialised at 1/0.07, clamped at 100). Here both towers are plain-pytree MLPs (the
style of :mod:`memjax.train.classifier`), small enough to train many on a CPU:

- image tower: flattened image -> hidden layers (ReLU) -> projection [D];
- text tower: a learned word-embedding table, mean-pooled over the caption's non-padding
  tokens (a bag of words) -> hidden layers (ReLU) -> projection [D].

``fit_clip`` is a pure function of (key, data, keep mask): deterministic for a key and
vmappable over (key, keep); ``train_clips`` trains M models in one jitted vmap.
The audit's digit image-caption pairs are built in :mod:`memjax.audit.data`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.errors import InputError
from memjax.models import Model
from memjax.models.protocol import ApplyForward
from memjax.train.reference import check_keep, model_keys

#: Token id 0 pads captions; it is excluded from the text tower's mean pool.
PAD = 0
#: Clamp of the learned logit scale (CLIP clips exp(logit_scale) at 100).
MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Shape of a tiny CLIP: image [*image_shape] and caption ids [caption_length] -> [D].

    Attributes:
      image_shape: shape of one image, e.g. (8, 8, 1); flattened by the image tower.
      vocab_size: number of token ids (0 = padding).
      caption_length: tokens per caption L.
      embed_dim: shared embedding size D.
      hidden: hidden widths of the image tower (ReLU).
      text_width: word-embedding width of the text tower.
      text_hidden: hidden widths of the text tower after pooling (ReLU).
    """

    image_shape: tuple[int, ...]
    vocab_size: int
    caption_length: int
    embed_dim: int = 32
    hidden: tuple[int, ...] = (256,)
    text_width: int = 64
    text_hidden: tuple[int, ...] = (128,)

    @property
    def image_dim(self) -> int:
        return int(np.prod(self.image_shape))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "tiny_clip", "image_shape": list(self.image_shape),
                "vocab_size": self.vocab_size, "caption_length": self.caption_length,
                "embed_dim": self.embed_dim, "hidden": list(self.hidden),
                "text_width": self.text_width, "text_hidden": list(self.text_hidden)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ClipConfig:
        if value.get("kind") != "tiny_clip":
            raise InputError(f"model kind {value.get('kind')!r}: expected 'tiny_clip'")
        return cls(tuple(value["image_shape"]), int(value["vocab_size"]),
                   int(value["caption_length"]), int(value["embed_dim"]),
                   tuple(value["hidden"]), int(value["text_width"]),
                   tuple(value["text_hidden"]))


def _dense_stack(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def _apply_stack(layers: list[dict[str, jax.Array]], h: jax.Array) -> jax.Array:
    # ReLU between layers; the last layer is the linear projection into the shared space.
    *hidden, last = layers
    for layer in hidden:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ last["w"] + last["b"]


def init_clip(key: jax.Array, config: ClipConfig) -> dict[str, Any]:
    """He-initialised params ``{"image": [...], "token_embedding": [V, W], "text": [...],
    "logit_scale": []}``; ``logit_scale`` starts at log(1/0.07) as in CLIP."""
    k_img, k_tok, k_txt = jax.random.split(key, 3)
    return {
        "image": _dense_stack(k_img, [config.image_dim, *config.hidden, config.embed_dim]),
        "token_embedding": jax.random.normal(k_tok, (config.vocab_size, config.text_width)),
        "text": _dense_stack(k_txt, [config.text_width, *config.text_hidden,
                                     config.embed_dim]),
        "logit_scale": jnp.asarray(math.log(1.0 / 0.07), jnp.float32),
    }


def encode_image(params: dict[str, Any], image: jax.Array) -> jax.Array:
    """Image embedding [D] (unnormalised) of ONE image [*image_shape] (flattened here)."""
    return _apply_stack(params["image"], jnp.ravel(image).astype(jnp.float32))


def encode_text(params: dict[str, Any], caption_ids: jax.Array) -> jax.Array:
    """Text embedding [D] (unnormalised) of ONE caption [L]; ``PAD`` (0) positions are
    left out of the mean pool."""
    real = (caption_ids != PAD).astype(jnp.float32)
    words = params["token_embedding"][caption_ids]  # [L, W]
    pooled = (words * real[:, None]).sum(0) / jnp.maximum(real.sum(), 1.0)
    return _apply_stack(params["text"], pooled)


def clip_embed(params: dict[str, Any], image: jax.Array, caption_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Embeddings of ONE pair: (image_emb [D], text_emb [D]), unnormalised.

    Like CLIP's ``encode_image`` / ``encode_text`` these are the raw projections; the loss
    and the attacks (:mod:`memjax.mia`) L2-normalise them.
    """
    return encode_image(params, image), encode_text(params, caption_ids)


def _pair_embeddings(params: dict[str, Any], pair: dict[str, jax.Array]) -> dict[str, Any]:
    image, text = clip_embed(params, pair["image"], pair["text"])
    return {"image": image, "text": text}


def clip_model(params: dict[str, Any], config: ClipConfig) -> Model:
    """A tiny CLIP as a :class:`memjax.Model` (``kind="clip"``): ``apply`` gives both
    embeddings of a pair (fields ``image`` and ``text``), ``tower("image")`` and
    ``tower("text")`` each encoder alone (as CLIPMem and the CLIP attacks use them)."""
    return Model.from_apply(
        _pair_embeddings, params, name=f"tiny CLIP {config.image_dim}->{config.embed_dim}",
        inputs=("image", "text"), kind="clip",
        towers=(("image", ApplyForward(encode_image), ("image",)),
                ("text", ApplyForward(encode_text), ("text",))))


def clip_loss(params: dict[str, Any], images: jax.Array, captions: jax.Array,
              valid: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP loss, Radford et al. 2021) of one minibatch.

    Args:
      images: [B, ...] images; captions: [B, L] ids; valid: [B] bool, pairs that take part
        (invalid ones are neither anchors nor negatives).

    Returns:
      Scalar: mean over valid pairs of the image->text and text->image cross-entropies.
    """
    img, txt = jax.vmap(clip_embed, in_axes=(None, 0, 0))(params, images, captions)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True).clip(1e-6)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True).clip(1e-6)
    scale = jnp.minimum(jnp.exp(params["logit_scale"]), MAX_LOGIT_SCALE)
    logits = scale * img @ txt.T  # [B, B]: row i = image i against every caption
    pair_ok = valid[:, None] & valid[None, :]
    logits = jnp.where(pair_ok, logits, -1e9)
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    w = valid.astype(jnp.float32)
    return jnp.sum((i2t + t2i) * 0.5 * w) / jnp.maximum(w.sum(), 1.0)


def kept_minibatch(key: jax.Array, keep: jax.Array, batch_size: int
                   ) -> tuple[jax.Array, jax.Array]:
    """(indices [B], valid [B] bool): B distinct kept examples, uniformly at random.

    Kept examples are ordered first by a random key (``argsort(where(keep, u, 2 + u))``), so
    the first B positions are a uniform sample without replacement from the kept set; if
    fewer than B are kept, the tail is non-kept examples, marked invalid. Fixed shapes, so
    it is vmappable over ``keep``.
    """
    u = jax.random.uniform(key, keep.shape)
    order = jnp.argsort(jnp.where(keep, u, 2.0 + u))[:batch_size]
    return order, keep[order]


def fit_clip(key: jax.Array, images: jax.Array, captions: jax.Array, keep: jax.Array, *,
             config: ClipConfig, steps: int = 1000, learning_rate: float = 2e-3,
             batch_size: int = 128, init_key: jax.Array | None = None) -> dict[str, Any]:
    """Train a tiny CLIP on the pairs with ``keep`` = 1 (minibatch Adam, CLIP loss).

    The CLIP loss needs in-batch negatives, so every step draws ``batch_size`` distinct
    kept pairs (:func:`kept_minibatch`); initialisation and batches are deterministic in
    ``key``. Pure: vmap over (key, keep) to train many models at once.

    Args:
      key: PRNG key (initialisation and minibatches).
      images: [N, *image_shape] float; captions: [N, L] int token ids; keep: [N] 0/1 mask.
      init_key: if given, the initialisation comes from it (``key`` draws minibatches).

    Returns:
      The trained params (:func:`init_clip`'s structure).
    """
    k_init, k_batches = jax.random.split(key)
    params = init_clip(k_init if init_key is None else init_key, config)
    optimizer = optax.adam(learning_rate)
    keep = keep.astype(bool)
    batch_size = min(batch_size, keep.shape[0])

    def step(carry, k):
        p, state = carry
        idx, valid = kept_minibatch(k, keep, batch_size)
        grads = jax.grad(clip_loss)(p, images[idx], captions[idx], valid)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  jax.random.split(k_batches, steps))
    return params


def train_clips(key: jax.Array, images: np.ndarray, captions: np.ndarray, keep: np.ndarray,
                *, config: ClipConfig, steps: int = 1000, learning_rate: float = 2e-3,
                batch_size: int = 128, same_init: bool = False) -> Any:
    """Train one tiny CLIP per row of ``keep`` [M, N] bool, in one vmapped, jitted program.

    Returns:
      Stacked params (every leaf has a leading axis M). Model m uses
      ``jax.random.split(key, M)[m]``, so the result equals M separate :func:`fit_clip`
      calls. ``same_init``: one shared initialisation (:func:`model_keys`).

    Raises:
      InputError: if ``keep`` is not a boolean [M, N] mask.
    """
    keep = check_keep(keep, len(images))
    keys, init_key = model_keys(key, keep.shape[0], same_init)
    fit = functools.partial(fit_clip, config=config, steps=steps,
                            learning_rate=learning_rate, batch_size=batch_size,
                            init_key=init_key)
    trained = jax.jit(jax.vmap(fit, in_axes=(0, None, None, 0)))(keys, images, captions,
                                                                  keep)
    return jax.tree.map(np.asarray, trained)
