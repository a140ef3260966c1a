"""``memjax.load``: any model folder memjax understands -> a :class:`memjax.Model`.

Folders: a Hugging Face checkpoint (config.json + safetensors, sharded or not), a folder
written by ``memjax convert``, or one written by ``memjax.train.save_model`` /
``save_models`` (then ``index`` picks one model of the set). The returned model carries
the checkpoint's preprocessing config (``preprocessor_config.json``), its tokenizer folder
(when it has tokenizer files) and the architecture's partition rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.convert.core import load_pretrained
from memjax.convert.orbax_io import cast
from memjax.convert.saved import (
    MODEL_FILE,
    interface,
    is_model_folder,
    read_meta,
    restore_classifiers,
    restore_port,
)
from memjax.errors import InputError
from memjax.models.classifier import CONFIG_KINDS
from memjax.models.protocol import Model, NNXForward
from memjax.models.registry import partition_rules

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "tokenizer.model")
PREPROCESSOR_FILE = "preprocessor_config.json"
#: A diffusers pipeline folder: one subfolder per component, listed in this file.
PIPELINE_FILE = "model_index.json"
#: The pipeline components that are the denoiser memjax scores, in the order looked for.
DENOISERS = ("unet", "transformer")


def pipeline_component(folder: str | Path, name: str) -> Path | None:
    """``folder/name`` when ``folder`` is a diffusers pipeline folder (``model_index.json``)
    with that component (a subfolder with ``config.json``), else None."""
    folder = Path(folder)
    if not (folder / PIPELINE_FILE).is_file():
        return None
    component = folder / name
    return component if (component / "config.json").is_file() else None


def _pipeline_denoiser(folder: Path) -> Path:
    """A pipeline folder's denoiser subfolder (its UNet or transformer)."""
    for name in DENOISERS:
        component = pipeline_component(folder, name)
        if component is not None:
            return component
    raise InputError(f"model {str(folder)!r} is a diffusers pipeline ({PIPELINE_FILE}) "
                     f"without a {' or '.join(DENOISERS)} subfolder holding config.json; pass "
                     "the folder of the component to load")


def from_port(module: nnx.Module, config: Any, *, source: str | None = None,
              preprocess: dict[str, Any] | None = None, tokenizer: str | None = None
              ) -> Model:
    """A :class:`Model` from a ported NNX module and its config."""
    kind, method, inputs = interface(module)
    rules = tuple(partition_rules(config)) if config is not None else ()
    model = Model.from_nnx(module, method=method, inputs=inputs, kind=kind, config=config,
                           partition_rules=rules, source=source, preprocess=preprocess,
                           tokenizer=tokenizer)
    if kind == "clip":  # the towers CLIPMem and the CLIP attacks call on their own
        graphdef = model.forward.graphdef
        text = ("input_ids", "attention_mask")
        model = model.replace(towers=(
            ("image", NNXForward(graphdef, "encode_image", ("image",)), ("image",)),
            ("text", NNXForward(graphdef, "encode_text", text), text)))
    return model


def _preprocess(folder: Path) -> dict[str, Any] | None:
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


def _tokenizer(folder: Path) -> str | None:
    return str(folder) if any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def load(path: str | Path, *, dtype: Any = None, allow_pickle: bool = False,
         index: int | None = None, mesh: Any = None) -> Model:
    """Open any model folder memjax understands as a :class:`Model`.

    Args:
      path: a Hugging Face checkpoint folder, a ``memjax convert`` folder, a
        ``memjax.train`` folder (one model, or a set of models with ``index``), or a
        diffusers pipeline folder (``model_index.json``: its ``unet`` or ``transformer``).
      dtype: cast floating-point params (e.g. ``jnp.bfloat16``); default: as stored
        (Hugging Face checkpoints load as float32).
      allow_pickle: accept ``.bin``/``.pt`` weights (``torch.load(weights_only=True)``).
      index: which model of a saved set (``memjax.train.save_models``).
      mesh: a ``jax.sharding.Mesh`` (every process passes the same one): a Hugging Face
        checkpoint's safetensors are then read lazily and each parameter is placed
        straight onto the sharding its partition rule gives over the mesh's ``model``
        axis, each process reading only the blocks its devices hold (see
        :func:`memjax.convert.core.load_pretrained`). Other folders load whole; the
        engine places their params when scoring.

    Returns:
      The :class:`Model`; ``model.source`` is the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"model {str(path)!r}: expected a model folder (Hugging Face "
                         "checkpoint, memjax convert output, or memjax.train output)")
    if not (folder / "config.json").is_file() and (folder / PIPELINE_FILE).is_file():
        folder = _pipeline_denoiser(folder)
    source = str(folder.absolute())
    if is_model_folder(folder):
        meta = read_meta(folder)
    elif (folder / "config.json").is_file():
        meta = None
    else:
        raise InputError(f"model {str(path)!r}: no config.json (expected a Hugging Face "
                         f"checkpoint folder) and no {MODEL_FILE} (expected a folder written "
                         "by memjax convert or memjax.train)")
    if meta is not None and meta["architecture"] in CONFIG_KINDS:
        params, config, keep, meta = restore_classifiers(folder, meta)
        if keep is not None:
            if index is None or not 0 <= index < keep.shape[0]:
                raise InputError(f"model {str(path)!r} is a set of {keep.shape[0]} models: "
                                 f"pass index=0..{keep.shape[0] - 1} (got {index!r})")
            params = jax.tree.map(lambda a: a[index], params)
        elif index is not None:
            raise InputError(f"index={index!r}: model {str(path)!r} is one model, not a set")
        model = Model.from_classifier(params, config, kind=meta["kind"], source=source)
        if dtype is not None:
            model = model.replace(params=jax.tree.map(lambda a: a.astype(dtype), params))
        return model
    if index is not None:
        raise InputError(f"index={index!r}: model {str(path)!r} is one model, not a set")
    if meta is not None:
        module, config = restore_port(folder, meta)
        if dtype is not None:
            module = cast(module, dtype)
    else:
        module, config = load_pretrained(folder, dtype=dtype or jnp.float32,
                                         allow_pickle=allow_pickle, mesh=mesh)
    model = from_port(module, config, source=source, preprocess=_preprocess(folder),
                      tokenizer=_tokenizer(folder))
    return _sentence_transformer(model, folder)


def _sentence_transformer(model: Model, folder: Path) -> Model:
    """A sentence-transformers folder (``modules.json``) embeds texts as its pipeline does:
    masked mean pooling, L2-normalised when it has a Normalize module, texts truncated
    to its ``max_seq_length`` (Reimers & Gurevych 2019). Other folders are unchanged."""
    if model.kind != "text_encoder" or not (folder / "modules.json").is_file():
        return model
    from memjax.models.bert import read_sentence_config

    pipeline = read_sentence_config(folder)
    forward = model.forward
    return model.replace(
        forward=NNXForward(forward.graphdef, "sentence_embedding", forward.inputs,
                           (("normalize", pipeline.normalize),)),
        name=f"{model.name} (sentence-transformers)", text_length=pipeline.max_seq_length)
