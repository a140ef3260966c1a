"""SimCLR encoders trained on keep-mask subsets, many at once (memorization demonstrations).

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations":
two augmented views of each image in a minibatch, an encoder, and the NT-Xent loss (each
view must pick its partner out of the 2B − 1 other views). SSLMem / UnitMem (Wang et al.
2024) compare an encoder f trained WITH a candidate set against g trained WITHOUT it:
``train_simclrs`` trains both (any number of keep masks) in one vmapped program.

The encoder is a :class:`memjax.train.CNNConfig` network whose last layer is the
embedding (``num_classes`` = embedding size); views come from ``views_fn(image, key)``
(e.g. :class:`memjax.augment.SimCLRView`) keyed by (example id, augmentation id), so the
training views are reproducible. Training uses augmentation ids from
:data:`TRAIN_AUG_OFFSET` on, leaving the low ids to evaluation views.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.augment import view_key
from memjax.models import Model
from memjax.train.classifier import CNNConfig, classifier_logits
from memjax.train.clip import kept_minibatch
from memjax.train.reference import check_keep, model_keys

#: Training views use augmentation ids >= this, so they never coincide with the views an
#: evaluation (ids 0, 1, ...) draws for the same example.
TRAIN_AUG_OFFSET = 1 << 20

ViewsFn = Callable[[jax.Array, jax.Array], jax.Array]


def nt_xent(z1: jax.Array, z2: jax.Array, valid: jax.Array, temperature: float) -> jax.Array:
    """NT-Xent loss of a minibatch of view pairs.

    Args:
      z1, z2: [B, D] embeddings of the two views of each example (normalised here).
      valid: [B] bool, the pairs that take part (others are neither anchors nor negatives).
      temperature: softmax temperature τ.

    Returns:
      Scalar: the mean over the 2·(valid pairs) anchors of −log softmax(partner).
    """
    z = jnp.concatenate([z1, z2])
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
    both = jnp.concatenate([valid, valid])
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    # An anchor is never its own negative; invalid views are nobody's negative.
    allowed = both[None, :] & ~jnp.eye(n, dtype=bool)
    logits = jnp.where(allowed, logits, -1e9)
    partner = (jnp.arange(n) + n // 2) % n
    per_anchor = optax.softmax_cross_entropy_with_integer_labels(logits, partner)
    weight = both.astype(jnp.float32)
    return jnp.sum(per_anchor * weight) / jnp.maximum(weight.sum(), 1.0)


def embed(params: dict[str, Any], image: jax.Array) -> jax.Array:
    """[D] embedding of one image: the encoder's last layer (no classifier head)."""
    return classifier_logits(params, image)


def encoder_model(params: dict[str, Any], config: CNNConfig) -> Model:
    """A trained encoder as a :class:`memjax.Model` (``kind="encoder"``; its activations
    ``conv{k}``, ``dense{k}``, ``embedding`` come from one forward pass)."""
    return Model.from_classifier(params, config, kind="encoder")


def pair_loss(params: dict[str, Any], images: jax.Array, ids: jax.Array, rows: jax.Array,
              valid: jax.Array, step: jax.Array, *, views_fn: Callable, view_seed: int,
              temperature: float, offset: int) -> jax.Array:
    """NT-Xent of the minibatch ``rows`` ([B] indices, ``valid`` [B] bool) at step ``step``,
    on the views ``view_key(view_seed, id, offset + 2 step + {0, 1})``; scalar. Training uses
    ``offset`` = :data:`TRAIN_AUG_OFFSET`, unlearning (memjax.train.unlearning) its own."""
    base = offset + 2 * step

    def two_views(image, example_id):
        return (views_fn(image, view_key(view_seed, example_id, base)),
                views_fn(image, view_key(view_seed, example_id, base + 1)))

    v1, v2 = jax.vmap(two_views)(images[rows], ids[rows])
    z1 = jax.vmap(embed, in_axes=(None, 0))(params, v1)
    z2 = jax.vmap(embed, in_axes=(None, 0))(params, v2)
    return nt_xent(z1, z2, valid, temperature)


def fit_simclr(key: jax.Array, images: jax.Array, ids: jax.Array, keep: jax.Array, *,
               config: CNNConfig, views_fn: ViewsFn, view_seed: int = 0, steps: int = 300,
               batch_size: int = 128, temperature: float = 0.5,
               learning_rate: float = 1e-3, init_key: jax.Array | None = None
               ) -> dict[str, Any]:
    """Train a SimCLR encoder on the images with ``keep`` = 1 (minibatch Adam).

    Args:
      key: PRNG key: initialisation and the minibatch draws.
      images: [N, H, W, C] in [0, 1]; ids: [N] example ids keying the views; keep: [N] bool.
      views_fn: ``views_fn(image, key) -> view``; training view j of example i at step s
        uses ``view_key(view_seed, i, TRAIN_AUG_OFFSET + 2 s + j)``.
      init_key: if given, the initialisation comes from it instead of ``key`` (``key``
        then draws only the minibatches).

    Returns:
      The encoder params. Pure: vmap over (key, keep) to train many encoders at once.
    """
    k_init, k_batches = jax.random.split(key)
    params = config.init(k_init if init_key is None else init_key)
    optimizer = optax.adam(learning_rate)

    def loss(p, rows, valid, step):
        return pair_loss(p, images, ids, rows, valid, step, views_fn=views_fn,
                         view_seed=view_seed, temperature=temperature,
                         offset=TRAIN_AUG_OFFSET)

    def step(carry, inputs):
        p, state = carry
        step_key, index = inputs
        rows, valid = kept_minibatch(step_key, keep, batch_size)
        grads = jax.grad(loss)(p, rows, valid, index)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    inputs = (jax.random.split(k_batches, steps), jnp.arange(steps))
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), inputs)
    return params


def train_simclrs(key: jax.Array, images: np.ndarray, ids: np.ndarray, keep: np.ndarray, *,
                  config: CNNConfig, views_fn: ViewsFn, view_seed: int = 0,
                  steps: int = 300, batch_size: int = 128, temperature: float = 0.5,
                  learning_rate: float = 1e-3, same_init: bool = False) -> Any:
    """One SimCLR encoder per row of ``keep`` [M, N] (e.g. f with a candidate set and g
    without), all in one jitted vmap; model m trains with ``jax.random.split(key, M)[m]``.

    ``same_init``: every model starts from one initialisation (:func:`model_keys`).

    Returns:
      Stacked params (leading axis M), as host arrays.
    """
    keep = check_keep(keep, len(images))
    fit = functools.partial(fit_simclr, config=config, views_fn=views_fn,
                            view_seed=view_seed, steps=steps,
                            batch_size=batch_size, temperature=temperature,
                            learning_rate=learning_rate)
    keys, init_key = model_keys(key, keep.shape[0], same_init)
    fit = functools.partial(fit, init_key=init_key)
    trained = jax.jit(jax.vmap(fit, in_axes=(0, None, None, 0)))(keys, images, ids, keep)
    return jax.tree.map(np.asarray, trained)
