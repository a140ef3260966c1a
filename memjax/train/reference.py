"""Many small models at once: reference (shadow) models for membership inference.

``train_classifiers`` trains M classifiers (MLP or CNN) in one ``jax.vmap`` over (key,
keep mask), each on its own subset of the data (keep [M, N]); ``balanced_keep`` draws the
masks the way LiRA's reference code does, so every example is IN for exactly half of the
models.

Each model computes its loss on its own kept rows only (gathered, padded to the largest
subset with weight 0), not on all N rows weighted by the mask: half the FLOPs when models
keep half the data, with the same full-batch gradient as :func:`fit_classifier` on the
mask (up to float summation order).

Saved in memjax's one model format (:mod:`memjax.convert.saved`): the metadata records
``n_models`` M, ``n_examples`` N and the training settings; ``keep.npy`` [M, N] bool says
which examples model m trained on; ``params/`` holds the stacked params (leading axis M).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from memjax.convert.saved import MODEL_FILE, is_model_folder, restore_classifiers, write_model
from memjax.errors import InputError
from memjax.train.classifier import CNNConfig, MLPConfig, fit_classifier


def balanced_keep(n_models: int, n_examples: int, seed: int) -> np.ndarray:
    """[M, N] bool: each example IN for exactly ⌊M/2⌋ models, at random (Carlini et al. 2022)."""
    if n_models < 2 or n_models % 2:
        raise InputError(f"n_models={n_models}: expected an even number >= 2 (each example is "
                         "IN for half of the models)")
    order = np.argsort(np.random.default_rng(seed).random((n_models, n_examples)), axis=0)
    return order < n_models // 2


def check_keep(keep: Any, n_examples: int) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype != bool:
        raise InputError(f"keep: expected a boolean mask [M, N], got dtype {keep.dtype}")
    if keep.ndim != 2 or keep.shape[1] != n_examples:
        raise InputError(f"keep: expected shape [M, {n_examples}], got {keep.shape}")
    return keep


def model_keys(key: jax.Array, n_models: int, same_init: bool
               ) -> tuple[jax.Array, jax.Array | None]:
    """(per-model keys [M], shared initialisation key or None) for vmapped trainers.

    ``same_init=False``: model m uses ``jax.random.split(key, M)[m]`` for everything.
    ``same_init=True``: every model starts from one initialisation (its own key then draws
    only minibatches), so a leave-out comparison (f trained with a set, g without)
    measures what the training sets did, not two random initialisations.
    """
    if not same_init:
        return jax.random.split(key, n_models), None
    k_models, k_init = jax.random.split(key)
    return jax.random.split(k_models, n_models), k_init


def kept_rows(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows [M, K] int32, weight [M, K] bool): each model's kept example indices first
    (ascending), padded to K = the largest subset with weight-0 rows."""
    width = max(1, int(keep.sum(axis=1).max()))
    rows = np.argsort(~keep, axis=1, kind="stable")[:, :width].astype(np.int32)
    return rows, np.take_along_axis(keep, rows, axis=1)


def train_classifiers(key: jax.Array, images: np.ndarray, labels: np.ndarray,
                      keep: np.ndarray, *, config: MLPConfig | CNNConfig, steps: int = 300,
                      learning_rate: float = 1e-3) -> Any:
    """Train one classifier per row of ``keep`` [M, N], all in one vmapped, jitted program.

    Returns:
      Stacked params: every leaf has a leading axis of size M. Model m is initialised from
      ``jax.random.split(key, M)[m]``, so the result equals M separate
      :func:`fit_classifier` calls on the masks (to float summation order).
    """
    keep = check_keep(keep, len(labels))
    rows, weight = kept_rows(keep)
    keys = jax.random.split(key, keep.shape[0])
    trained = _train_on_rows(keys, images, labels, rows, weight, config=config, steps=steps,
                             learning_rate=learning_rate)
    return jax.tree.map(np.asarray, trained)


@functools.partial(jax.jit, static_argnames=("config", "steps", "learning_rate"))
def _train_on_rows(keys, images, labels, rows, weight, *, config, steps, learning_rate):
    def one(key, model_rows, model_weight):
        # The gather runs inside the program: no [M, K, ...] copy of the data on the host.
        return fit_classifier(key, images[model_rows], labels[model_rows], model_weight,
                              config=config, steps=steps, learning_rate=learning_rate)

    return jax.vmap(one)(keys, rows, weight)


def save_models(directory: str | Path, params: Any, keep: np.ndarray, config: MLPConfig, *,
                training: dict[str, Any]) -> Path:
    """Write stacked params [M, ...], keep mask [M, N] and config (memjax's model format,
    :mod:`memjax.convert.saved`; ``memjax.load(directory, index=m)`` opens model m)."""
    return write_model(directory, params, config, kind="classifier", keep=keep,
                       training=training)


def load_models(directory: str | Path
                ) -> tuple[Any, np.ndarray, MLPConfig | CNNConfig, dict[str, Any]]:
    """(stacked params, keep [M, N], config, metadata) saved by :func:`save_models` (this
    release's format or the previous ``models.json`` layout)."""
    directory = Path(directory).absolute()
    if not is_model_folder(directory):
        raise InputError(f"{str(directory)!r}: expected a folder written by "
                         f"memjax.train.save_models (with {MODEL_FILE})")
    params, config, keep, meta = restore_classifiers(directory)
    if keep is None:
        raise InputError(f"{str(directory)!r} holds one model, not a set written by "
                         "memjax.train.save_models (with keep.npy)")
    return params, check_keep(keep, meta["n_examples"]), config, meta
