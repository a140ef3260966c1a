"""The architecture registry: how each port reads its checkpoint, strictly.

Each architecture registers an :class:`Architecture`: how to read its HF config, how to
build the NNX module, and how to map checkpoint tensors onto the module's parameters.
Loading reports every missing, unexpected and mis-shaped tensor by name in one error, and
refuses HF config attributes that the port does not implement when they differ from
their defaults.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memjax.data.base import path_name
from memjax.errors import InputError

ParamPath = tuple[str | int, ...]

# HF config attributes that never change the computation (bookkeeping, tokenizer ids,
# generation settings, label names); every other attribute must be implemented or at its
# default.
NEUTRAL_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "id2label", "label2id", "num_labels", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "tokenizer_class", "prefix", "task_specific_params",
    "return_dict", "output_hidden_states", "output_attentions", "use_cache", "torchscript",
    "chunk_size_feed_forward", "problem_type", "finetuning_task", "initializer_range",
    "initializer_factor", "gradient_checkpointing", "use_return_dict", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "cross_attention_hidden_size", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "output_router_logits", "classifier_dropout", "transformers.js_config",
    "_class_name", "_diffusers_version",
})


# Attributes every HF config may carry that change the computation (decoder masks,
# cross-attention); no port implements them, so only their defaults are accepted.
COMMON_DEFAULTS = {"is_decoder": False, "add_cross_attention": False,
                   "is_encoder_decoder": False, "tie_encoder_decoder": False}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one architecture loads (a small protocol of pure functions).

    Attributes:
      name: memjax's name (e.g. "gpt2").
      model_types: HF ``model_type`` values it accepts.
      from_hf_config: HF config dict -> the port's config dataclass; raises InputError
        for attributes it cannot honour (see :func:`check_config`).
      build: (config, rngs) -> NNX module.
      convert: (TensorReader, config) -> {param path tuple: array}, reading tensors
        with ``reader.take`` and transposing layouts. From a safetensors checkpoint
        ``take`` hands out lazy tensors (memjax.convert.checkpoint.LazyTensor): ``.T``,
        ``transpose`` and reshapes that add or drop unit axes keep them lazy, so each
        device's block is read alone; any other NumPy operation reads the tensor whole.
      partition_rules: config -> [(regex over param path, PartitionSpec)] for ``model``
        axis sharding (empty: replicate).
      ignore: regexes of checkpoint keys that are buffers, not weights (e.g. causal masks).
      config_class: the port's config dataclass (for save/restore and partition rules).
      refine_config: (config, checkpoint keys) -> config, for structure that only the
        weights tell (e.g. whether a BERT checkpoint has a pooler).
      refused: ``{model_type: why}`` for related model types recognised only to say what
        is missing (never listed as supported).
    """

    name: str
    model_types: tuple[str, ...]
    from_hf_config: Callable[[dict[str, Any]], Any]
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    convert: Callable[[Any, Any], dict[ParamPath, np.ndarray]]
    partition_rules: Callable[[Any], list[tuple[str, PartitionSpec]]] = lambda config: []
    ignore: tuple[str, ...] = ()
    config_class: type | None = None
    refine_config: Callable[[Any, frozenset[str]], Any] = lambda config, keys: config
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def check_config(hf_config: dict[str, Any], implemented: set[str] | frozenset[str],
                 defaults: dict[str, Any], arch: str) -> None:
    """Refuse HF config attributes the port does not implement that differ from defaults.

    Args:
      hf_config: the checkpoint's config.json.
      implemented: attributes the port reads and honours.
      defaults: HF's default value of every other attribute the architecture knows; one
        present with another value raises, naming it. Unknown attributes also raise.
    """
    problems = []
    defaults = {**COMMON_DEFAULTS, **defaults}
    for key, value in hf_config.items():
        if key in implemented or key in NEUTRAL_CONFIG_KEYS:
            continue
        if key in defaults:
            if value != defaults[key]:
                problems.append(f"{key}={value!r} (memjax implements only {defaults[key]!r})")
        else:
            problems.append(f"{key}={value!r} (unknown to memjax's {arch} port)")
    if problems:
        raise InputError(f"{arch} config.json has attributes this port does not implement: "
                         + "; ".join(problems))


def detect_architecture(hf_config: dict[str, Any]) -> Architecture:
    # Hugging Face configs name their architecture by ``model_type``; diffusers configs by
    # the class that wrote them (``_class_name``, e.g. "UNet2DModel").
    model_type = hf_config.get("model_type", hf_config.get("_class_name"))
    for arch in ARCHITECTURES.values():
        if model_type in arch.refused:
            raise InputError(f"config.json model_type {arch.refused[model_type]}")
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise InputError(f"config.json model_type {model_type!r}: expected one of {known}")


def _path_str(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)


def fill_params(model_abstract: nnx.Module, params: dict[ParamPath, Any],
                reader: Any, dtype: Any, arch: str, *, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, PartitionSpec]] = ()) -> nnx.Module:
    """Put converted tensors into an abstract module; report every mismatch at once.

    Args:
      model_abstract: the module from ``nnx.eval_shape`` (shapes only).
      params: param path -> array, or a lazy tensor (``shape``, ``dtype``, ``key``,
        ``sliceable`` and ``tensor[block]``, see memjax.convert.checkpoint.LazyTensor).
      reader: the TensorReader the converter read from (missing / unexpected keys).
      dtype: the dtype every parameter is cast to.
      arch: the architecture's name, for messages.
      mesh: place each parameter directly on its sharding over this mesh (by ``rules``,
        as :func:`param_shardings` says), reading only the blocks this process's devices
        hold; None: whole tensors on the default device, one at a time.
      rules: the architecture's partition rules (used with ``mesh``).

    Returns:
      The module with its parameters as ``jax.Array``s.
    """
    graphdef, state = nnx.split(model_abstract)
    flat = dict(nnx.to_flat_state(state))
    # Weights and BatchNorm running statistics both come from the checkpoint, checked alike.
    expected = {path: var for path, var in flat.items()
                if isinstance(var, (nnx.Param, nnx.BatchStat))}
    problems = []
    if reader.missing:
        problems.append(f"missing tensors: {sorted(set(reader.missing))}")
    unexpected = reader.unexpected()
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    absent = sorted(_path_str(p) for p in expected if p not in params)
    extra = sorted(_path_str(p) for p in params if p not in expected)
    if absent and not reader.missing:
        problems.append(f"parameters with no checkpoint tensor: {absent}")
    if extra:
        problems.append(f"converter produced unknown parameters: {extra}")
    for path, var in expected.items():
        value = params.get(path)
        if value is not None and tuple(value.shape) != tuple(var.get_value().shape):
            source = reader.key_of(value)
            origin = f" (checkpoint tensor {source})" if source else ""
            problems.append(f"{_path_str(path)}{origin}: checkpoint shape "
                            f"{tuple(value.shape)}, model expects {tuple(var.get_value().shape)}")
    if problems:
        raise InputError(f"{arch} checkpoint does not match the model: " + "; ".join(problems))
    shardings = {} if mesh is None else dict(
        nnx.to_flat_state(param_shardings(state, mesh, rules)))
    for path, var in flat.items():
        sharding = shardings[path].get_value() if mesh is not None else None
        abstract = var.get_value()
        if path in params:
            var.set_value(place_tensor(params[path], dtype, sharding))
        else:  # non-Param state (e.g. BatchNorm statistics the converter also fills)
            zeros = np.zeros(abstract.shape, abstract.dtype)
            var.set_value(place_tensor(zeros, abstract.dtype, sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def place_tensor(value: Any, dtype: Any, sharding: NamedSharding | None = None) -> jax.Array:
    """One tensor (array or lazy tensor) as a ``jax.Array`` of ``dtype``.

    With a ``sharding``, each of this process's devices gets its block (from
    ``jax.make_array_from_callback``): a sliceable lazy tensor reads only the blocks this
    process holds (each distinct block once, when several devices hold the same one);
    anything else is read whole once and sliced. Without one, the tensor is read whole
    onto the default device. Casting happens on the host, per block, with NumPy (round to
    nearest even, as XLA's convert).
    """
    target = np.dtype(jnp.dtype(dtype))
    if sharding is None:
        return jax.device_put(np.asarray(value).astype(target, copy=False))
    if getattr(value, "sliceable", False):
        read = value.__getitem__
    else:
        host = np.asarray(value)
        read = host.__getitem__
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.asarray(read(index)).astype(target, copy=False)
        return blocks[key]

    return jax.make_array_from_callback(tuple(value.shape), sharding, block, dtype=target)


def param_shardings(params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, PartitionSpec]] | None = None) -> Any:
    """A pytree of ``NamedSharding`` for ``params``: by the first matching rule, else replicated.

    A partition rule maps a regular expression searched in a parameter's path name
    ("layers/0/c_fc/kernel", see memjax.data.base.path_name) to its PartitionSpec. A
    dimension that the rule's mesh axes do not divide evenly stays replicated. (The engine
    places params with this function too, so a model loaded onto a mesh is never moved.)
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in (rules or ())]

    def sharding_for(path, leaf):
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if len(spec) > np.ndim(leaf):
                    raise InputError(
                        f"partition rule {pattern.pattern!r} -> {spec} has more axes than "
                        f"parameter {name!r} of shape {np.shape(leaf)}"
                    )
                return NamedSharding(mesh, _divisible(spec, np.shape(leaf), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding_for, params)


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` with dimensions that the named mesh axes do not divide left replicated
    (e.g. GPT-2's 50,257-token vocabulary over an even ``model`` axis)."""
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                         strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise InputError(f"partition spec {spec} names mesh axes {unknown}; the mesh has "
                             f"{list(mesh.shape)} (build it with memjax.engine.make_mesh)")
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        entries.append(axes if dim % size == 0 else None)
    return PartitionSpec(*entries)


def architecture_of(config: Any) -> Architecture:
    """The architecture registered for a port's config object."""
    for arch in ARCHITECTURES.values():
        if arch.config_class is not None and isinstance(config, arch.config_class):
            return arch
    raise InputError(f"no architecture is registered for config {type(config).__name__}")


def partition_rules(config: Any) -> list[tuple[str, PartitionSpec]]:
    """The ``model``-axis partition rules of a loaded model's config (see engine.score)."""
    return architecture_of(config).partition_rules(config)


def tree_size(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
