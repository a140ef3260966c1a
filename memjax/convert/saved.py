"""The one on-disk format of every model memjax writes, and ``memjax.load``.

A model folder holds::

    memjax_model.json   {"format": "memjax-model", "version": 1,
                         "architecture": "vit" | "gpt2" | ... | "mlp_classifier" | "cnn_classifier",
                         "kind": "classifier" | "encoder" | "causal_lm" | "clip" | "text_encoder",
                         "config": {...},                 # the architecture's config
                         "n_models": M, "n_examples": N,   # only for a set of models
                         "training": {...}}               # optional: how it was trained
    params/             orbax checkpoint of the params (a set: leading axis M)
    keep.npy            only for a set: [M, N] bool, model m trained on example n
    tokenizer.json, preprocessor_config.json, ...
                        a converted checkpoint's tokenizer and image-processor files,
                        copied as they are (:data:`PREPROCESSING_FILES`), so that
                        ``memjax.load`` of the folder prepares inputs as the checkpoint did

Written by ``memjax convert`` (ported checkpoints), ``memjax.train.save_model`` (one
native classifier or encoder) and ``memjax.train.save_models`` (reference models with
their keep mask). The previous release wrote three layouts — convert's ``{"architecture",
"config"}``, a classifier's config with a ``kind`` field, and ``models.json`` beside
``keep.npy`` — :func:`read_meta` reads all three as version 1 and refuses anything else
with a message saying what it found.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from memjax._io import atomic_write_bytes, atomic_write_json
from memjax.errors import InputError
from memjax.models.classifier import CONFIG_KINDS, config_from_json
from memjax.models.protocol import Model
from memjax.models.registry import ARCHITECTURES

MODEL_FILE = "memjax_model.json"
LEGACY_SET_FILE = "models.json"  # memjax.train.save_models before format version 1
FORMAT = "memjax-model"
VERSION = 1
KEEP_FILE = "keep.npy"
#: The Hugging Face files that say how a checkpoint's inputs are prepared: the image
#: processor's config and every file of the slow and fast tokenizers.
PREPROCESSING_FILES = (
    "preprocessor_config.json", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    # sentence-transformers' pipeline: its modules, pooling and truncation length.
    "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
)


# --------------------------------------------------------------------------- metadata


def config_to_json(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (tuples -> lists); native classifier configs keep
    their own schema without the ``kind`` field."""
    if isinstance(config, tuple(CONFIG_KINDS.values())):
        return {k: v for k, v in config.to_json().items() if k != "kind"}
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def config_from_dict(architecture: str, value: dict[str, Any]) -> Any:
    """The config object of ``architecture`` from :func:`config_to_json`'s output."""
    if architecture in CONFIG_KINDS:
        return config_from_json({**value, "kind": architecture})
    import memjax.models  # noqa: F401 - registers the ported architectures

    arch = ARCHITECTURES.get(architecture)
    if arch is None or arch.config_class is None:
        raise InputError(f"{MODEL_FILE}: unknown architecture {architecture!r}; expected one "
                         f"of {sorted([*ARCHITECTURES, *CONFIG_KINDS])}")
    cls = arch.config_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise InputError(f"{MODEL_FILE}: unknown config fields {unknown} for {cls.__name__}")
    converted = {}
    for name, item in value.items():
        default = fields[name].default
        converted[name] = tuple(item) if isinstance(item, list) and isinstance(
            default, tuple) else item
    return cls(**converted)


def is_model_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds a model memjax wrote (this format or a previous one)."""
    directory = Path(directory)
    return (directory / MODEL_FILE).is_file() or (directory / LEGACY_SET_FILE).is_file()


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The folder's metadata as format version 1 (previous layouts upgraded on read)."""
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file() and (directory / LEGACY_SET_FILE).is_file():
        path = directory / LEGACY_SET_FILE
    if not path.is_file():
        raise InputError(f"{str(directory)!r}: expected a model folder with {MODEL_FILE} "
                         "(written by memjax convert, memjax.train.save_model or save_models)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if "version" in meta:
        if meta.get("format") != FORMAT or meta["version"] != VERSION:
            raise InputError(f"{path}: format {meta.get('format')!r} version "
                             f"{meta['version']!r}; this memjax reads {FORMAT!r} version "
                             f"{VERSION} (and the layouts before it): upgrade memjax")
        return meta
    if "architecture" in meta and "config" in meta:  # memjax convert, before version 1
        return {"format": FORMAT, "version": VERSION, "architecture": meta["architecture"],
                # A port's kind follows from its module (interface); memjax.load asks it.
                "kind": None,
                "config": meta["config"]}
    if meta.get("kind") in CONFIG_KINDS:  # memjax.train classifier (set), before version 1
        extra = {k: meta[k] for k in ("n_models", "n_examples", "training") if k in meta}
        return {"format": FORMAT, "version": VERSION, "architecture": meta["kind"],
                "kind": "classifier",
                "config": {k: v for k, v in meta.items()
                           if k not in ("kind", "n_models", "n_examples", "training")},
                **extra}
    raise InputError(f"{path}: not a memjax model description (no 'version', no "
                     f"'architecture' and no classifier 'kind'; keys: {sorted(meta)})")


# What each port's module computes on one example: (kind, method, input fields). Vision
# models read NHWC images; text models token ids and their attention mask.
_INTERFACES = {
    "CLIPModel": ("clip", "embed", ("image", "input_ids", "attention_mask")),
    "GPT2LMHeadModel": ("causal_lm", "__call__", ("input_ids", "attention_mask")),
    "GPTNeoXForCausalLM": ("causal_lm", "__call__", ("input_ids", "attention_mask")),
    "LlamaForCausalLM": ("causal_lm", "__call__", ("input_ids", "attention_mask")),
    "BertModel": ("text_encoder", "__call__", ("input_ids", "attention_mask")),
    "ViTForImageClassification": ("classifier", "__call__", ("image",)),
    "ViTModel": ("encoder", "__call__", ("image",)),
    "CifarResNet": ("classifier", "__call__", ("image",)),
}


def interface(module: nnx.Module) -> tuple[str, str, tuple[str, ...]]:
    """(kind, method, input fields) of a ported module."""
    name = type(module).__name__
    if hasattr(module, "memjax_interface"):  # ports whose inputs follow their config
        return module.memjax_interface()
    if name == "ResNet":
        return ("encoder" if module.classifier is None else "classifier", "__call__",
                ("image",))
    if name not in _INTERFACES:
        raise InputError(f"no model interface is registered for {name}; expected one of "
                         f"{sorted([*_INTERFACES, 'ResNet'])}")
    return _INTERFACES[name]



# --------------------------------------------------------------------------- writing


def _save_params(directory: Path, params: Any) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()


def _architecture_name(config: Any) -> str:
    if isinstance(config, tuple(CONFIG_KINDS.values())):
        return config.kind
    for arch in ARCHITECTURES.values():
        if arch.config_class is not None and isinstance(config, arch.config_class):
            return arch.name
    raise InputError(f"no architecture is registered for config {type(config).__name__}")


def copy_preprocessing(source: str | Path, directory: str | Path) -> list[str]:
    """Copy ``source``'s :data:`PREPROCESSING_FILES` (those it has) into ``directory``,
    each atomically and byte for byte; returns their names."""
    source, directory = Path(source), Path(directory)
    copied = []
    for name in PREPROCESSING_FILES:
        if (source / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(directory / name, (source / name).read_bytes())
            copied.append(name)
    return copied


def write_model(directory: str | Path, params: Any, config: Any, *, kind: str,
                keep: np.ndarray | None = None, training: dict[str, Any] | None = None,
                copy_from: str | Path | None = None) -> Path:
    """Write params (a pure pytree of arrays; a set: leading axis M) and metadata, and
    with ``copy_from`` (a checkpoint folder) its tokenizer and preprocessing files.

    The metadata file is written last, atomically, so a folder with a readable
    ``memjax_model.json`` always has its params (and copied files).
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if copy_from is not None:
        copy_preprocessing(copy_from, directory)
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                            "architecture": _architecture_name(config), "kind": kind,
                            "config": config_to_json(config)}
    if keep is not None:
        keep = np.asarray(keep, bool)
        np.save(directory / KEEP_FILE, keep)
        meta.update(n_models=int(keep.shape[0]), n_examples=int(keep.shape[1]))
    if training is not None:
        meta["training"] = training
    _save_params(directory, params)
    atomic_write_json(directory / MODEL_FILE, meta)
    return directory


def save(model: Model | nnx.Module, config_or_directory: Any, directory: Any = None, *,
         copy_from: str | Path | None = None) -> Path:
    """Save a model: ``save(model, directory)`` for a :class:`Model`, or
    ``save(nnx_module, config, directory)`` for a port (as ``memjax convert`` does).

    ``copy_from``: the checkpoint folder the model came from; its tokenizer and
    preprocessing files (:data:`PREPROCESSING_FILES`) are copied beside the params."""
    if isinstance(model, Model):
        directory = config_or_directory
        if model.config is None:
            raise InputError("save: the model has no config (built with Model.from_apply?); "
                             "only ports and memjax.train models can be saved")
        params = model.params
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        return write_model(directory, params, model.config, kind=model.kind,
                           copy_from=copy_from)
    config = config_or_directory
    state = jax.tree.map(np.asarray, nnx.state(model))
    return write_model(directory, nnx.to_pure_dict(state), config, kind=interface(model)[0],
                       copy_from=copy_from)


# --------------------------------------------------------------------------- reading


def _key(path: tuple) -> tuple[str, ...]:
    """A pytree path as strings (orbax metadata names list indices by strings)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _restore(directory: Path, target: Any) -> Any:
    """Restore params into ``target``'s structure, keeping the stored dtypes."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(directory / "params").item_metadata
    stored = stored.tree if hasattr(stored, "tree") else stored
    dtypes = {_key(path): meta.dtype
              for path, meta in jax.tree_util.tree_flatten_with_path(stored)[0]}
    target = jax.tree_util.tree_map_with_path(
        lambda path, v: jax.ShapeDtypeStruct(v.shape, dtypes.get(_key(path), v.dtype)), target)
    return checkpointer.restore(directory / "params", target)


def restore_port(directory: str | Path, meta: dict[str, Any] | None = None
                 ) -> tuple[nnx.Module, Any]:
    """(module, config) of a ported model folder; no random initialisation runs."""
    directory = Path(directory).absolute()
    meta = read_meta(directory) if meta is None else meta
    config = config_from_dict(meta["architecture"], meta["config"])
    if meta["architecture"] in CONFIG_KINDS:
        raise InputError(f"{str(directory)!r} holds a memjax.train {meta['architecture']}, "
                         "not a ported architecture: open it with memjax.load")
    arch = ARCHITECTURES[meta["architecture"]]
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    # The abstract model is float32; the checkpoint's own dtypes (e.g. bfloat16 from
    # memjax convert --dtype) are kept by restoring to its stored metadata.
    restored = _restore(directory, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), config


def restore_classifiers(directory: str | Path, meta: dict[str, Any] | None = None
                        ) -> tuple[Any, Any, np.ndarray | None, dict[str, Any]]:
    """(params, config, keep or None, meta) of a memjax.train folder (one model or a set:
    then params have a leading axis M and ``keep`` is [M, N])."""
    directory = Path(directory).absolute()
    meta = read_meta(directory) if meta is None else meta
    if meta["architecture"] not in CONFIG_KINDS:
        raise InputError(f"{str(directory)!r} holds a ported {meta['architecture']!r} model, "
                         "not a memjax.train classifier")
    config = config_from_dict(meta["architecture"], meta["config"])
    one = jax.eval_shape(config.init, jax.random.key(0))
    keep = None
    if "n_models" in meta:
        keep_path = directory / KEEP_FILE
        if not keep_path.is_file():
            raise InputError(f"{str(directory)!r}: a set of {meta['n_models']} models needs "
                             f"{KEEP_FILE} beside {MODEL_FILE}")
        keep = np.load(keep_path)
        if keep.shape != (meta["n_models"], meta["n_examples"]):
            raise InputError(f"{keep_path}: shape {keep.shape}; expected "
                             f"{(meta['n_models'], meta['n_examples'])}")
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((keep.shape[0], *a.shape), a.dtype),
                           one)
    params = jax.tree.map(np.asarray, _restore(directory, one))
    return params, config, keep, meta
