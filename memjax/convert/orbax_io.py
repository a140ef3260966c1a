"""Saving converted (ported) models and restoring them as NNX modules.

The folder format is :mod:`memjax.convert.saved`'s (one format for every model memjax
writes); ``restore`` rebuilds the module abstractly and restores the state into it, so no
random initialisation runs. ``memjax.load`` returns the same model as a
:class:`memjax.Model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from memjax.convert.saved import is_model_folder, read_meta, restore_port
from memjax.convert.saved import save as _save_model


def save(model: nnx.Module, config: Any, directory: str | Path, *,
         copy_from: str | Path | None = None) -> Path:
    """Save ``model`` (built from ``config``) to ``directory`` (orbax + memjax_model.json);
    with ``copy_from`` (the checkpoint folder it was converted from) also that folder's
    tokenizer files and ``preprocessor_config.json``, so ``memjax.load`` of ``directory``
    tokenises and preprocesses as the checkpoint does."""
    return _save_model(model, config, directory, copy_from=copy_from)


def is_converted(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ported model written by memjax (any format version)."""
    if not is_model_folder(directory):
        return False
    from memjax.models.classifier import CONFIG_KINDS

    return read_meta(directory)["architecture"] not in CONFIG_KINDS


def restore(directory: str | Path, *, dtype: Any = None) -> tuple[nnx.Module, Any]:
    """Restore a model saved by :func:`save`: (model, config)."""
    model, config = restore_port(directory)
    if dtype is not None:
        model = cast(model, dtype)
    return model, config


def cast(model: nnx.Module, dtype: Any) -> nnx.Module:
    """A copy of ``model`` with floating-point parameters cast to ``dtype``."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, state)
    return nnx.merge(graphdef, state)
