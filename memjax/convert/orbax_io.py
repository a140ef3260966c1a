"""Saving converted models with orbax-checkpoint and restoring them.

A converted folder holds ``memjax_model.json`` (architecture name and the port's config)
and ``params/`` (an orbax checkpoint of the module's state). ``restore`` rebuilds the
module abstractly and restores the state into it, so no random initialisation runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from memjax.convert.core import ARCHITECTURES
from memjax.errors import InputError

MODEL_FILE = "memjax_model.json"


def _config_to_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def _architecture_of(config: Any):
    for arch in ARCHITECTURES.values():
        if arch.config_class is not None and isinstance(config, arch.config_class):
            return arch
    raise InputError(f"no architecture is registered for config {type(config).__name__}")


def save(model: nnx.Module, config: Any, directory: str | Path) -> Path:
    """Save ``model`` (built from ``config``) to ``directory`` (orbax + memjax_model.json)."""
    import orbax.checkpoint as ocp

    arch = _architecture_of(config)
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    state = jax.tree.map(np.asarray, nnx.state(model))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", nnx.to_pure_dict(state), force=True)
    checkpointer.wait_until_finished()
    (directory / MODEL_FILE).write_text(json.dumps(
        {"architecture": arch.name, "config": _config_to_json(config)}, indent=1))
    return directory


def _config_from_json(cls: type, value: dict[str, Any]) -> Any:
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


def _key(path: tuple) -> tuple[str, ...]:
    """A pytree path as strings (orbax metadata names list indices by strings)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / MODEL_FILE).is_file()


def restore(directory: str | Path, *, dtype: Any = None) -> tuple[nnx.Module, Any]:
    """Restore a model saved by :func:`save`: (model, config)."""
    import orbax.checkpoint as ocp

    import memjax.models  # noqa: F401 - registers the architectures

    directory = Path(directory).absolute()
    if not is_converted(directory):
        raise InputError(f"{str(directory)!r}: expected a folder written by memjax convert "
                         f"(with {MODEL_FILE})")
    meta = json.loads((directory / MODEL_FILE).read_text())
    arch = ARCHITECTURES.get(meta.get("architecture"))
    if arch is None or arch.config_class is None:
        raise InputError(f"{MODEL_FILE}: unknown architecture {meta.get('architecture')!r}; "
                         f"expected one of {sorted(ARCHITECTURES)}")
    config = _config_from_json(arch.config_class, meta["config"])
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    # The abstract model is float32; the checkpoint's own dtypes (e.g. bfloat16 from
    # memjax convert --dtype) are kept by restoring to its stored metadata.
    stored = ocp.StandardCheckpointer().metadata(directory / "params").item_metadata
    stored = stored.tree if hasattr(stored, "tree") else stored
    dtypes = {_key(path): meta.dtype
              for path, meta in jax.tree_util.tree_flatten_with_path(stored)[0]}
    target = jax.tree_util.tree_map_with_path(
        lambda path, v: jax.ShapeDtypeStruct(v.shape, dtypes.get(_key(path), v.dtype)),
        nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(directory / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    if dtype is not None:
        model = cast(model, dtype)
    return model, config


def cast(model: nnx.Module, dtype: Any) -> nnx.Module:
    """A copy of ``model`` with floating-point parameters cast to ``dtype``."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, state)
    return nnx.merge(graphdef, state)
