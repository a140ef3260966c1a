"""Per-example losses for influence methods, built from a model's forward function.

Each loss takes ``(params, example)`` for ONE example (no batch axis) and returns a float
scalar: the ``loss_fn`` that :func:`forward_inf`, :func:`self_influence` and
:func:`grad_dot` take. Bind the model part once with ``functools.partial`` (the engine keys
compiled programs by value, so equal partials share one compilation):

- :func:`cross_entropy_loss`: a classifier's logits and the example's ``label``;
- :func:`causal_lm_loss`: a causal LM's mean next-token cross-entropy over the attention
  mask (Hugging Face's ``labels=input_ids`` loss of one sequence);
- :func:`zero_shot_loss`: a CLIP used as a zero-shot classifier, logits from the cosine of
  the image with one prompt per class (Radford et al. 2021, Sec. 3.1.4).

Each is an output loss applied to the model's outputs, and both halves are public for the
Gauss-Newton curvature (:func:`memjax.influence.gnhvp` needs the outputs and a loss convex
in them): :func:`classifier_outputs` / :func:`label_cross_entropy`,
:func:`causal_lm_outputs` / :func:`next_token_cross_entropy`, :func:`zero_shot_outputs` /
:func:`label_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from memjax.engine.mesh import path_name
from memjax.errors import InputError


def label_cross_entropy(logits: jax.Array, example: dict[str, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of logits [C] against the example's integer ``label``: the
    output loss of :func:`cross_entropy_loss` and :func:`zero_shot_loss` (convex in the
    logits, so its Gauss-Newton matrix is PSD; :func:`memjax.influence.gnhvp`)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           example["label"])


def classifier_outputs(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       example: dict[str, jax.Array]) -> jax.Array:
    """Logits [C] of ONE example's ``image``: the outputs of :func:`cross_entropy_loss`."""
    return logits_fn(params, example["image"])


def cross_entropy_loss(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       example: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy of ONE example (fields ``image`` and ``label``) under a classifier.

    Args:
      logits_fn: ``logits_fn(params, image) -> [C]`` logits (e.g.
        ``memjax.train.classifier_logits``).

    Bind ``logits_fn`` once (``functools.partial(cross_entropy_loss, logits_fn)``, at
    module level) to get the ``loss_fn(params, example)`` that :func:`forward_inf`,
    :func:`self_influence` and :func:`grad_dot` take.
    """
    logits = logits_fn(params, example["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def causal_lm_outputs(logits_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
                      params: Any, example: dict[str, jax.Array]) -> jax.Array:
    """Logits [T, V] float32 of ONE sequence (``input_ids``, ``attention_mask`` [T]): the
    outputs of :func:`causal_lm_loss`, checked for shape."""
    ids, mask = example["input_ids"], example["attention_mask"]
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise InputError(f"causal_lm_loss: expected input_ids [T] and attention_mask [T] for "
                         f"one sequence, got {ids.shape} and {mask.shape}")
    logits = logits_fn(params, {"input_ids": ids, "attention_mask": mask})
    if logits.shape[:1] != ids.shape:
        raise InputError(f"causal_lm_loss: the model returned {logits.shape}; expected "
                         f"logits [T, V] with T = {ids.shape[0]}")
    return logits.astype(jnp.float32)


def next_token_cross_entropy(logits: jax.Array, example: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy of logits [T, V] over the counted positions (token
    t+1 real): the output loss of :func:`causal_lm_loss`, convex in the logits."""
    ids, mask = example["input_ids"], example["attention_mask"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:-1], ids[1:])
    counted = mask[1:].astype(jnp.float32)
    return jnp.sum(nll * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def causal_lm_loss(logits_fn: Callable[[Any, dict[str, jax.Array]], jax.Array], params: Any,
                   example: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy of ONE sequence: the per-sequence loss of a causal LM.

    Position t predicts token t+1; it counts when token t+1 is real
    (``attention_mask[t+1] = 1``), which is Hugging Face's loss with ``labels=input_ids``
    and padding labelled -100, for left or right padding. Forward-INF's loss for an LM
    (Ko et al. 2024 treat a training sequence's loss as the unit of influence).

    Args:
      logits_fn: ``logits_fn(params, {"input_ids", "attention_mask"}) -> [T, V]`` (a
        causal LM's ``model.apply``).
      example: ``input_ids`` [T] int, ``attention_mask`` [T] (1 = token, 0 = padding).

    Returns:
      float32 scalar: sum over counted positions of -log p(token t+1) / their count (0
      for a sequence with fewer than two real tokens).
    """
    return next_token_cross_entropy(causal_lm_outputs(logits_fn, params, example), example)


def zero_shot_logits(image_fn: Callable[[Any, jax.Array], jax.Array],
                     text_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
                     scale_fn: Callable[[Any], jax.Array], prompt_ids: jax.Array,
                     prompt_mask: jax.Array, params: Any, image: jax.Array) -> jax.Array:
    """CLIP zero-shot logits [C] of ONE image: ``exp(s) * cos(f_img(image), f_txt(prompt_c))``.

    Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language
    Supervision", Sec. 3.1.4): one prompt per class (e.g. "a photo of a {class}."), the
    logits are the cosines of the image embedding with each prompt's, times the learned
    temperature. ``s`` is the checkpoint's ``logit_scale`` (stored as a log, as Hugging
    Face's ``CLIPModel``; its ``logits_per_image`` are these logits). The prompts' embeddings
    are computed from ``params``, so a parameter update of the text tower moves them too.

    Args:
      image_fn: ``image_fn(params, image) -> [E]`` (a CLIP's ``tower("image").apply``).
      text_fn: ``text_fn(params, {"input_ids", "attention_mask"}) -> [E]`` for one text.
      scale_fn: ``scale_fn(params) -> scalar`` log temperature.
      prompt_ids, prompt_mask: [C, T] the tokenised prompts.
    """
    img = image_fn(params, image).astype(jnp.float32)
    txt = jax.vmap(lambda ids, mask: text_fn(params, {"input_ids": ids,
                                                      "attention_mask": mask}))(
        prompt_ids, prompt_mask).astype(jnp.float32)
    # As Hugging Face: divide by the norm with no epsilon (a zero embedding is a bug upstream).
    img = img / jnp.linalg.norm(img)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.exp(scale_fn(params).astype(jnp.float32)) * (txt @ img)


def zero_shot_outputs(image_fn: Callable[[Any, jax.Array], jax.Array],
                      text_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
                      scale_fn: Callable[[Any], jax.Array], prompt_ids: jax.Array,
                      prompt_mask: jax.Array, params: Any,
                      example: dict[str, jax.Array]) -> jax.Array:
    """Zero-shot logits [C] of ONE example's ``image``: the outputs of
    :func:`zero_shot_loss`."""
    return zero_shot_logits(image_fn, text_fn, scale_fn, prompt_ids, prompt_mask, params,
                            example["image"])


def zero_shot_loss(image_fn: Callable[[Any, jax.Array], jax.Array],
                   text_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
                   scale_fn: Callable[[Any], jax.Array], prompt_ids: jax.Array,
                   prompt_mask: jax.Array, params: Any,
                   example: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy of ONE example (``image``, ``label``) under CLIP zero-shot logits
    (:func:`zero_shot_logits`; ``label`` indexes the prompts)."""
    return label_cross_entropy(zero_shot_outputs(image_fn, text_fn, scale_fn, prompt_ids,
                                                 prompt_mask, params, example), example)


def param_leaf(params: Any, path: str) -> jax.Array:
    """The parameter leaf whose path name (``memjax.influence.param_paths``) is ``path``,
    e.g. ``param_leaf(clip.params, "logit_scale")``; ``functools.partial(param_leaf,
    path=...)`` is the ``scale_fn`` of :func:`zero_shot_logits`."""
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path_name(key) == path:
            return leaf
    raise InputError(f"params: no parameter {path!r}")


def sampled_label(outputs_fn: Callable[[Any, dict[str, jax.Array]], jax.Array], params: Any,
                  example: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """``example`` with its ``label`` drawn from softmax(outputs) [C]: the label of the TRUE
    Fisher (Martens & Grosse 2015, Sec. 5: the expectation over the model's own predictive
    distribution, whose Fisher is the Gauss-Newton matrix of softmax cross-entropy).
    ``outputs_fn`` is e.g. :func:`classifier_outputs` bound to the model."""
    logits = jax.lax.stop_gradient(outputs_fn(params, example)).astype(jnp.float32)
    label = jax.random.categorical(key, logits)
    return {**example, "label": label.astype(jnp.asarray(example["label"]).dtype)}
