"""A model's per-example signal function: ``signal_function(model, signal)``.

One path for every :class:`memjax.Model` — a memjax.train classifier, a Hugging Face
ViT/ResNet/GPT-2/Pythia/CLIP through ``memjax.load``, or ``Model.from_apply`` — so
``memjax score`` and the attacks built on stored signals run on any of them:

  classification  classifiers (kind ``"classifier"``): fields ``image`` and ``label``
                  -> :func:`classification` (loss, p_true, LiRA's φ, ...).
  tokens          causal LMs (kind ``"causal_lm"``, NNX ports): ``input_ids`` and
                  ``attention_mask`` -> :func:`causal_lm_tokens` through the
                  vocabulary-chunked path (no [T, V] float32 log-softmax).
  contrastive     CLIP (kind ``"clip"``): the image and text towers' fields ->
                  :func:`contrastive` (cosine of the normalised embeddings).

Each function is a frozen dataclass, so equal ones (the same architecture and settings)
share the engine's compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax._checks import check_choice
from memjax.engine import SequenceLayout
from memjax.errors import InputError
from memjax.models import Model
from memjax.models.protocol import NNXForward
from memjax.signals._classification import check_labels, classification
from memjax.signals._contrastive import contrastive
from memjax.signals._tokens import causal_lm_tokens

SIGNAL_KINDS = ("classification", "tokens", "contrastive")
#: Vocabulary columns per step of the token statistics (memory O(T * TOKEN_CHUNK)).
TOKEN_CHUNK = 8192

Validator = Callable[[dict[str, np.ndarray], np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class ClassificationSignals:
    """fn(params, example) -> the classification bundle of the model's logits."""

    apply: Callable[[Any, Any], jax.Array]
    label_field: str = "label"

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return classification(self.apply(params, example), example[self.label_field])


#: The per-position fields of the token signals ([T] each); the rest are per example.
TOKEN_POSITION_FIELDS = ("logp", "mu", "sigma", "entropy", "lse", "scored")
TOKEN_LAYOUT = SequenceLayout(fields=("input_ids", "attention_mask"),
                              length_field="attention_mask", outputs=TOKEN_POSITION_FIELDS)


def trims_exactly(lm: Any) -> bool:
    """Whether a causal LM's outputs at real tokens are independent of the padded length.

    False for HF's "dynamic" (NTK-aware) rotary scaling: past the trained context its
    frequencies follow the padded length T (in HF too), so a trimmed batch would score
    differently from the full-length one; such a model runs at full length.
    """
    return getattr(getattr(lm, "config", None), "rope_type", None) != "dynamic"


@dataclasses.dataclass(frozen=True)
class CausalLMTokenSignals:
    """fn(params, example) -> per-token signals of an NNX causal LM (hidden states and the
    unembedding; the logits are never materialised beyond one vocabulary chunk).

    The fields of :func:`causal_lm_tokens`, with every per-position field set to 0 where
    ``scored`` is False (padding, and the last real token, whose target would be padding
    or nothing). memjax differs here from the bare :func:`causal_lm_tokens` (which
    computes them at every position, padding included): those values depend on the
    padding that follows, so they would change with the sequence length the engine runs
    at. Zeroed, a batch run at a shorter length (``sequence_layout``, the engine's length
    buckets) gives the same fields as the full-length run. No attack reads them: every
    consumer masks with ``scored``.
    """

    graphdef: Any
    chunk_size: int = TOKEN_CHUNK
    #: Right-padded ``input_ids`` and ``attention_mask`` [T], per-position outputs [T]:
    #: the engine may trim a batch to its longest sequence's bucket. None for a model
    #: whose outputs depend on the padded length (see :func:`trims_exactly`).
    sequence_layout: SequenceLayout | None = TOKEN_LAYOUT

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        lm = nnx.merge(self.graphdef, params)
        ids, mask = example["input_ids"], example["attention_mask"]
        hidden = lm.hidden_states(ids[None], mask[None])[0]
        # Gemma 2's final-logit soft-cap (static config), applied to every vocabulary chunk.
        signals = causal_lm_tokens(hidden, lm.unembedding(), ids, mask,
                                   chunk_size=self.chunk_size,
                                   softcap=getattr(lm, "final_logit_softcap", None))
        return zero_unscored(signals)


def zero_unscored(signals: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """:func:`causal_lm_tokens`' fields with the per-position float fields [T] set to 0
    where ``scored`` is False (``where``, so a NaN there does not survive)."""
    scored = signals["scored"]
    zeroed = {name: jnp.where(scored, signals[name], jnp.zeros_like(signals[name]))
              for name in TOKEN_POSITION_FIELDS if name != "scored"}
    return {**signals, **zeroed}


@dataclasses.dataclass(frozen=True)
class ContrastiveSignals:
    """fn(params, example) -> cosine of a CLIP's image and text embeddings of a pair."""

    image: Callable[[Any, Any], jax.Array]
    text: Callable[[Any, Any], jax.Array]

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return contrastive(self.image(params, example), self.text(params, example))


def _require(fields: dict[str, np.ndarray], names: tuple[str, ...], signal: str) -> None:
    missing = [n for n in names if n not in fields]
    if missing:
        raise InputError(f"--data: the {signal} signal needs field(s) {missing}; the source "
                         f"has {sorted(fields)}")


def _classification(model: Model) -> tuple[Callable, Validator]:
    fn = ClassificationSignals(model.apply)
    image_field = model.inputs[0]
    expected = getattr(model.config, "input_shape", None)  # memjax.train classifiers
    num_classes: dict[tuple, int] = {}

    def validate(fields, indices):
        _require(fields, (*model.inputs, "label"), "classification")
        shape = tuple(fields[image_field].shape[1:])
        if expected is not None and shape != tuple(expected):
            raise InputError(f"--data field {image_field!r} has shape {shape} per example; "
                             f"the model expects {tuple(expected)}")
        if shape not in num_classes:  # the logits' width, by shape inference only
            logits = jax.eval_shape(model.apply, model.params,
                                    jax.ShapeDtypeStruct(shape, jnp.float32))
            num_classes[shape] = int(logits.shape[-1])
        check_labels(fields["label"], num_classes[shape], name="--data field 'label'",
                     indices=indices)

    return fn, validate


def _tokens(model: Model) -> tuple[Callable, Validator]:
    lm = nnx.merge(model.forward.graphdef, model.params) \
        if isinstance(model.forward, NNXForward) else None
    if not hasattr(lm, "hidden_states"):
        raise InputError("--signal tokens needs a causal LM port (GPT-2, GPT-NeoX, "
                         f"Llama/Mistral/Qwen/OLMo 2/Gemma); {model.name} is not one")
    vocab = int(lm.unembedding().shape[1])  # once, not per batch

    def validate(fields, indices):
        _require(fields, ("input_ids", "attention_mask"), "tokens")
        check_labels(fields["input_ids"], vocab, name="--data field 'input_ids'")

    layout = TOKEN_LAYOUT if trims_exactly(lm) else None
    return CausalLMTokenSignals(model.forward.graphdef, sequence_layout=layout), validate


def _contrastive(model: Model) -> tuple[Callable, Validator]:
    image, text = model.tower("image"), model.tower("text")
    needed = tuple(dict.fromkeys((*image.inputs, *text.inputs)))

    def validate(fields, indices):
        _require(fields, needed, "contrastive")

    return ContrastiveSignals(image.apply, text.apply), validate


# signal -> (model kind it needs, how that kind is described, builder)
_KINDS = {"classification": ("classifier", "an image classifier", _classification),
          "tokens": ("causal_lm", "a causal LM", _tokens),
          "contrastive": ("clip", "a CLIP model", _contrastive)}


def signal_function(model: Model, signal: str) -> tuple[Callable, Validator]:
    """(fn(params, example), validate(fields, indices)) scoring ``model`` with ``signal``
    (see the module docstring) for :func:`memjax.engine.score`."""
    if not isinstance(model, Model):
        raise InputError(f"model: expected a memjax.Model, got {type(model).__name__}")
    check_choice("--signal", signal, SIGNAL_KINDS)
    kind, described, build = _KINDS[signal]
    if model.kind != kind:
        raise InputError(f"--signal {signal} needs {described}; {model.name} is not one (a "
                         f"{model.kind!r} model)")
    return build(model)
