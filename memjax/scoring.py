"""Score functions for the models memjax loads: model folder + signal kind -> engine inputs.

``scorer(model_path, signal)`` returns a :class:`Scorer`: the per-example function, its
params, partition rules and a host-side validator for :func:`memjax.engine.score`. Model
folders are Hugging Face checkpoints (config.json + safetensors), folders written by
``memjax convert``, or classifiers written by ``memjax audit`` / ``memjax.train``.

Signals:
  classification  image classifiers (ViT, ResNet, memjax.train MLP/CNN): fields ``image`` [H, W, C]
                  and ``label``.
  tokens          causal LMs (GPT-2, GPT-NeoX): fields ``input_ids`` [T] and
                  ``attention_mask`` [T]; position t scores token t+1, through the
                  vocabulary-chunked path.
  contrastive     CLIP: fields ``image`` [H, W, C], ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.errors import InputError

SIGNAL_KINDS = ("classification", "tokens", "contrastive")
TOKEN_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Scorer:
    """What the engine needs to score a model: fn(params, example), params, rules, check."""

    fn: Callable[[Any, dict[str, Any]], Any]
    params: Any
    param_rules: list
    validate: Callable[[dict[str, np.ndarray], np.ndarray], None]
    description: str


def _require(fields: dict[str, np.ndarray], names: tuple[str, ...], signal: str) -> None:
    missing = [n for n in names if n not in fields]
    if missing:
        raise InputError(f"--data: the {signal} signal needs field(s) {missing}; the source "
                         f"has {sorted(fields)}")


def _classifier_scorer(path: Path, signal: str) -> Scorer:
    from memjax.train import classification_signals, load_model

    if signal != "classification":
        raise InputError(f"--signal {signal!r}: a memjax.train classifier supports only "
                         "'classification'")
    params, config = load_model(path)
    return Scorer(classification_signals, params, [], classifier_validator(config),
                  config.kind)


def classifier_validator(config) -> Callable[[dict[str, np.ndarray], np.ndarray], None]:
    """Host check of a batch for memjax.train classifiers: fields, image shape, labels."""
    from memjax.signals import check_labels

    def validate(fields, indices):
        _require(fields, ("image", "label"), "classification")
        if fields["image"].shape[1:] != tuple(config.input_shape):
            raise InputError(f"--data field 'image' has shape {fields['image'].shape[1:]} per "
                             f"example; the model expects {tuple(config.input_shape)}")
        check_labels(fields["label"], config.num_classes, name="--data field 'label'",
                     indices=indices)

    return validate


def _nnx_scorer(path: Path, signal: str) -> Scorer:
    from flax import nnx

    from memjax.convert import load, partition_rules
    from memjax.signals import check_labels, classification, contrastive, tokens

    model, config = load(path)
    graphdef, state = nnx.split(model)
    name = type(model).__name__
    rules = partition_rules(config)

    if signal == "tokens":
        if not hasattr(model, "hidden_states"):
            raise InputError(f"--signal tokens needs a causal LM; {name} is not one")

        def fn(params, example):
            lm = nnx.merge(graphdef, params)
            ids, mask = example["input_ids"], example["attention_mask"]
            hidden = lm.hidden_states(ids[None], mask[None])[0]
            # Position t predicts token t+1; the last position has no target.
            targets = jnp.roll(ids, -1)
            scored = (mask != 0) & (jnp.roll(mask, -1) != 0) & (jnp.arange(ids.shape[0])
                                                                < ids.shape[0] - 1)
            # The scored mask is stored too: Min-K% needs it (memjax mia --scores).
            return {**tokens(hidden=hidden, unembedding=lm.unembedding(), targets=targets,
                             mask=scored, chunk_size=TOKEN_CHUNK), "scored": scored}

        vocab = int(model.unembedding().shape[1])  # once, not per batch

        def validate(fields, indices):
            _require(fields, ("input_ids", "attention_mask"), signal)
            check_labels(fields["input_ids"], vocab, name="--data field 'input_ids'")

    elif signal == "contrastive":
        if not hasattr(model, "encode_image"):
            raise InputError(f"--signal contrastive needs a CLIP model; {name} is not one")

        def fn(params, example):
            clip = nnx.merge(graphdef, params)
            image = clip.encode_image(example["image"][None])[0]
            text = clip.encode_text(example["input_ids"][None],
                                    example["attention_mask"][None])[0]
            return contrastive(image, text)

        def validate(fields, indices):
            _require(fields, ("image", "input_ids", "attention_mask"), signal)

    elif signal == "classification":
        def fn(params, example):
            classifier = nnx.merge(graphdef, params)
            return classification(classifier(example["image"][None])[0], example["label"])

        num_classes: dict[tuple, int] = {}

        def validate(fields, indices):
            _require(fields, ("image", "label"), signal)
            shape = (1, *fields["image"].shape[1:])
            if shape not in num_classes:  # the logits' width, by shape inference only
                logits = jax.eval_shape(lambda x: nnx.merge(graphdef, state)(x),
                                        jax.ShapeDtypeStruct(shape, jnp.float32))
                num_classes[shape] = int(logits.shape[-1])
            check_labels(fields["label"], num_classes[shape], name="--data field 'label'",
                         indices=indices)
    else:
        raise InputError(f"--signal {signal!r}: expected one of {SIGNAL_KINDS}")
    return Scorer(fn, state, rules, validate, name)


def scorer(model_path: str | Path, signal: str) -> Scorer:
    """The engine inputs for scoring ``model_path`` with ``signal`` (see module docstring)."""
    path = Path(model_path)
    if signal not in SIGNAL_KINDS:
        raise InputError(f"--signal {signal!r}: expected one of {SIGNAL_KINDS}")
    meta = path / "memjax_model.json"
    from memjax.train.classifier import CONFIG_KINDS

    if meta.is_file() and json.loads(meta.read_text()).get("kind") in CONFIG_KINDS:
        return _classifier_scorer(path, signal)
    if not path.is_dir():
        raise InputError(f"--model {str(path)!r}: expected a model folder (Hugging Face "
                         "checkpoint, memjax convert output, or memjax audit's model/)")
    return _nnx_scorer(path, signal)
