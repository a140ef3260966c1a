"""Image-text similarity of a contrastive (CLIP-style) model.

CLIP membership inference (Ko et al. 2023, "Practical Membership Inference Attacks
Against Large-Scale Multi-Modal Models: A Pilot Study") scores a pair by the cosine
similarity of its image and text embeddings. One pair per call; batch with jax.vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.errors import InputError
from memjax.kernels import unit_rows


def contrastive(image_emb: jax.Array, text_emb: jax.Array) -> dict[str, jax.Array]:
    """Cosine similarity of one image-text pair.

    Args:
        image_emb: [D] float image embedding.
        text_emb: [D] float text embedding (same D).

    Returns:
        ``{"cosine": float32 scalar}``: ``<x/max(|x|, EPS), y/max(|y|, EPS)>`` (EPS:
        ``memjax.kernels.EPS``, as in ``torch.nn.functional.normalize``) computed in
        float32, clipped to [-1, 1] (rounding can overshoot by an ulp); 0 if either
        embedding is all zeros.

    Raises:
        InputError: at trace time, if an embedding is not 1-D float or the sizes differ.
    """
    image_emb = _embedding(image_emb, "image_emb")
    text_emb = _embedding(text_emb, "text_emb")
    if image_emb.shape != text_emb.shape:
        raise InputError(
            f"image_emb and text_emb must have the same size D, got {image_emb.shape[0]} "
            f"and {text_emb.shape[0]}"
        )
    x = unit_rows(image_emb.astype(jnp.float32))
    y = unit_rows(text_emb.astype(jnp.float32))
    return {"cosine": jnp.clip(jnp.dot(x, y), -1.0, 1.0)}


def _embedding(x: jax.Array, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise InputError(
            f"{name} must be 1-D [D] (one pair; batch with jax.vmap), got shape {x.shape}"
        )
    if x.shape[0] < 1:
        raise InputError(f"{name} must have D >= 1 entries, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{name} must have a floating dtype, got {x.dtype}")
    return x
