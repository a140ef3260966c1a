"""The one model protocol every memjax method takes: :class:`Model`.

A :class:`Model` is a frozen value: a pure per-example forward function with activation
taps, its params pytree, and what the model needs around it (which example fields it
reads, its preprocessing, tokenizer folder, partition rules for the ``model`` mesh axis).
The same object comes out of every constructor:

- :meth:`Model.from_nnx` — any Flax NNX port (``memjax.load`` of a Hugging Face or
  ``memjax convert`` folder uses it);
- :meth:`Model.from_classifier` — the small native MLP/CNN/ResNet models that
  ``memjax.train`` trains (classifiers, SimCLR encoders);
- :meth:`Model.from_apply` — any pure ``apply(params, inputs)`` a user writes.

Methods call ``model.apply(params, inputs)`` for ONE example (no batch axis; the engine
vmaps) or ``model.activations(patterns)`` for named intermediate activations from the same
pass. Both are value-hashable callables (frozen dataclasses), so the engine's compile cache
recognises equal ones across calls and across re-built models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.data.base import hash_params
from memjax.errors import InputError
from memjax.models.classifier import CNNConfig, MLPConfig, classifier_logits
from memjax.models.taps import Taps, tap

#: What a model's ``inputs`` are: one field name -> that field's array; several -> a dict.
Inputs = Any


def _pick(example_or_inputs: Any, names: tuple[str, ...]) -> Any:
    """The model's inputs from an example dict (or the inputs themselves)."""
    if not isinstance(example_or_inputs, Mapping):
        return example_or_inputs
    missing = [n for n in names if n not in example_or_inputs]
    if missing:
        raise InputError(f"example: the model reads field(s) {list(names)}; missing "
                         f"{missing} (fields: {sorted(example_or_inputs)})")
    if len(names) == 1:
        return example_or_inputs[names[0]]
    return {n: example_or_inputs[n] for n in names}


# --------------------------------------------------------------------------- forwards
# A forward is forward(params, inputs, taps) for ONE example. Each is a frozen dataclass so
# that equal forwards hash equal (the engine's compile cache keys functions by value).


@dataclasses.dataclass(frozen=True)
class NNXForward:
    """An NNX module's ``method`` on one example: adds and removes the batch axis.

    ``inputs`` names the method's positional arguments in order (example fields).
    """

    graphdef: Any
    method: str = "__call__"
    inputs: tuple[str, ...] = ("image",)
    #: Keyword arguments of ``method`` as (name, value) pairs (hashable), e.g. a
    #: sentence-transformers checkpoint's ``(("normalize", True),)``.
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, params: Any, inputs: Inputs, taps: Taps | None = None) -> Any:
        module = nnx.merge(self.graphdef, params)
        values = [inputs] if len(self.inputs) == 1 and not isinstance(inputs, Mapping) \
            else [inputs[n] for n in self.inputs]
        out = getattr(module, self.method)(*[jnp.asarray(v)[None] for v in values],
                                           taps=taps, **dict(self.options))
        return jax.tree.map(lambda x: x[0], out)


@dataclasses.dataclass(frozen=True)
class ClassifierForward:
    """memjax's native MLP/CNN (:func:`memjax.models.classifier.classifier_logits`).

    Scoring one model uses XLA's convolution (``conv="xla"``: 3.9x faster on XLA:CPU than
    the im2col form that vmapped training over many models needs; equal to float32
    rounding)."""

    conv: str = "xla"

    def __call__(self, params: Any, inputs: Inputs, taps: Taps | None = None) -> jax.Array:
        return classifier_logits(params, inputs, taps=taps, conv=self.conv)


@dataclasses.dataclass(frozen=True)
class ApplyForward:
    """A user's ``apply(params, inputs)``; a dict output is also reported as taps."""

    apply: Callable[[Any, Inputs], Any]

    def __call__(self, params: Any, inputs: Inputs, taps: Taps | None = None) -> Any:
        out = self.apply(params, inputs)
        if isinstance(out, Mapping):
            for name, value in out.items():
                tap(taps, name, value)
        return out


@dataclasses.dataclass(frozen=True)
class Apply:
    """``model.apply``: forward(params, inputs) without taps (a value-hashable function)."""

    forward: Callable[..., Any]
    inputs: tuple[str, ...]

    def __call__(self, params: Any, inputs: Inputs) -> Any:
        return self.forward(params, _pick(inputs, self.inputs), None)


@dataclasses.dataclass(frozen=True)
class Activations:
    """``model.activations(patterns)``: (params, inputs) -> {name: activation} for the taps
    matching ``patterns`` (fnmatch), in the order the forward pass reports them."""

    forward: Callable[..., Any]
    inputs: tuple[str, ...]
    patterns: tuple[str, ...]

    def __call__(self, params: Any, inputs: Inputs) -> dict[str, Any]:
        taps = Taps(self.patterns)
        self.forward(params, _pick(inputs, self.inputs), taps)
        taps.check()
        return {name: taps.values[name] for name in taps.seen if name in taps.values}


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as every memjax method takes it.

    Attributes:
      forward: ``forward(params, inputs, taps)`` for ONE example (no batch axis); pure.
      params: the params pytree (arrays; an ``nnx.State`` for the ports).
      name: what the model is (e.g. ``"ViTForImageClassification"``, ``"CNN conv16-32..."``).
      inputs: the example fields the model reads, in order: ``("image",)`` for vision
        models (``inputs`` is then that array), ``("input_ids", "attention_mask")`` for
        text (a dict).
      kind: ``"classifier"`` (outputs logits), ``"encoder"``, ``"causal_lm"``, ``"clip"``,
        ``"text_encoder"`` — which signals and losses apply to it.
      config: the architecture's config (port dataclass or MLPConfig/CNNConfig), if any.
      preprocess: the checkpoint's preprocessing (e.g. its image processor config: size,
        mean, std, rescale) as a dict, or None when inputs go in as given.
      tokenizer: folder of the checkpoint's tokenizer, if it has one.
      partition_rules: ``[(regex over param path, PartitionSpec)]`` for the ``model`` axis.
      source: where the model was loaded from (None if built in memory).
      towers: separately callable parts sharing the params, ``((name, forward, inputs),
        ...)``: a CLIP's ``"image"`` and ``"text"`` encoders (see :meth:`tower`).
    """

    forward: Callable[..., Any]
    params: Any
    name: str
    inputs: tuple[str, ...] = ("image",)
    kind: str = "classifier"
    config: Any = None
    preprocess: Mapping[str, Any] | None = None
    tokenizer: str | None = None
    partition_rules: tuple = ()
    source: str | None = None
    towers: tuple = ()
    #: The checkpoint's own text truncation length when its pipeline sets one below the
    #: position table (sentence-transformers' ``max_seq_length``); see context_length.
    text_length: int | None = None

    @property
    def context_length(self) -> int | None:
        """Tokens per text the checkpoint's own pipeline uses: its truncation length when
        it sets one (sentence-transformers' ``max_seq_length``), else its position table;
        None for a model without text input."""
        if self.text_length is not None:
            return self.text_length
        config = getattr(self.config, "text_config", self.config)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(height, width, channels) of the images the model takes when its config fixes
        them (ViT, CLIP), else None (convolutional models take any size)."""
        config = getattr(self.config, "vision_config", self.config)
        size = getattr(config, "image_size", None)
        if size is None:
            return None
        height, width = (size, size) if isinstance(size, int) else size
        return int(height), int(width), int(getattr(config, "num_channels", 3))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_nnx(cls, module: nnx.Module, *, method: str = "__call__",
                 inputs: Sequence[str] = ("image",), kind: str = "classifier",
                 name: str | None = None, **fields: Any) -> Model:
        """A model from an NNX module (any port). ``method`` is called with the ``inputs``
        fields, each given a batch axis of 1, and ``taps=``."""
        graphdef, state = nnx.split(module)
        inputs = tuple(inputs)
        return cls(NNXForward(graphdef, method, inputs), state,
                   name or type(module).__name__, inputs=inputs, kind=kind, **fields)

    @classmethod
    def from_classifier(cls, params: Any, config: MLPConfig | CNNConfig, *,
                        kind: str = "classifier", **fields: Any) -> Model:
        """A memjax.train MLP/CNN/ResNet (``kind="encoder"`` for a SimCLR encoder)."""
        if not isinstance(config, (MLPConfig, CNNConfig)):
            raise InputError(f"config: expected MLPConfig or CNNConfig, got "
                             f"{type(config).__name__}")
        return cls(ClassifierForward(), params, config.describe(), inputs=("image",),
                   kind=kind, config=config, **fields)

    @classmethod
    def from_apply(cls, apply: Callable[[Any, Inputs], Any], params: Any, *,
                   name: str | None = None, inputs: Sequence[str] = ("image",),
                   kind: str = "classifier", **fields: Any) -> Model:
        """A model from a pure ``apply(params, inputs)`` for one example. If it returns a
        dict ``{layer: activation}``, those are its taps."""
        if not callable(apply):
            raise InputError(f"apply: expected a function apply(params, inputs), got "
                             f"{type(apply).__name__}")
        return cls(ApplyForward(apply), params,
                   name or getattr(apply, "__qualname__", type(apply).__name__),
                   inputs=tuple(inputs), kind=kind, **fields)

    # ------------------------------------------------------------------ use

    @property
    def apply(self) -> Apply:
        """``apply(params, inputs) -> outputs`` for one example; ``inputs`` may also be
        the whole example dict (the model picks its fields)."""
        return Apply(self.forward, self.inputs)

    def __call__(self, inputs: Inputs) -> Any:
        """The outputs on one example with the model's own params."""
        return self.apply(self.params, inputs)

    def activations(self, patterns: str | Sequence[str] = "*") -> Activations:
        """``fn(params, inputs) -> {name: activation}`` for the taps matching ``patterns``
        (fnmatch; ``"*"``: all), from one forward pass."""
        if isinstance(patterns, str):
            patterns = (patterns,)
        return Activations(self.forward, self.inputs, tuple(patterns))

    def activation_names(self, example: Any) -> list[str]:
        """Every tap name of the forward pass on ``example`` (one example's dict or the
        model's inputs, as arrays or ShapeDtypeStructs), in call order; shapes only."""
        taps = Taps(())
        jax.eval_shape(lambda p, x: self.forward(p, _pick(x, self.inputs), taps),
                       self.params, example)
        return list(dict.fromkeys(taps.seen))

    def tower(self, name: str) -> Model:
        """One part of the model as a model of its own (same params), e.g. a CLIP's
        ``tower("image")`` (inputs ``("image",)``) and ``tower("text")``."""
        for tower_name, forward, inputs in self.towers:
            if tower_name == name:
                return dataclasses.replace(self, forward=forward, inputs=tuple(inputs),
                                           kind="encoder", towers=())
        raise InputError(f"{self.name} has no {name!r} tower; it has "
                         f"{[t[0] for t in self.towers] or 'none'}")

    def replace(self, **changes: Any) -> Model:
        """A copy with fields replaced (e.g. ``params=``)."""
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash of what the model computes: its name, input fields and kind, the
        forward function's type, and the params' paths, shapes, dtypes and values (the
        engine's :func:`memjax.data.base.hash_params`)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((self.name, self.inputs, self.kind,
                            type(self.forward).__qualname__)).encode())
        digest.update(hash_params(self.params).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        n = sum(int(getattr(x, "size", 0)) for x in jax.tree.leaves(self.params))
        where = f", source={self.source!r}" if self.source else ""
        return (f"Model({self.name!r}, kind={self.kind!r}, inputs={self.inputs}, "
                f"{n:,} params{where})")
