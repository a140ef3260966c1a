"""Vmapped training of many models: equal to separate runs, deterministic, saved and loaded."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from memjax.errors import InputError
from memjax.train import (
    MLPConfig,
    balanced_keep,
    fit_mlp,
    load_models,
    save_models,
    train_mlps,
)


@pytest.fixture(scope="module")
def small_data():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 60).astype(np.int32)
    return images, labels, MLPConfig((4, 4, 1), 3, hidden=(8,))


def test_balanced_keep_puts_every_example_in_half_the_models():
    keep = balanced_keep(16, 500, seed=1)
    assert keep.dtype == bool and keep.shape == (16, 500)
    np.testing.assert_array_equal(keep.sum(axis=0), 8)
    assert not np.array_equal(keep[0], keep[1])
    np.testing.assert_array_equal(keep, balanced_keep(16, 500, seed=1))
    with pytest.raises(InputError, match="even number"):
        balanced_keep(3, 10, seed=0)


def test_vmapped_training_equals_separate_runs(small_data):
    images, labels, config = small_data
    keep = balanced_keep(4, len(labels), seed=2)
    key = jax.random.key(7)
    stacked = train_mlps(key, images, labels, keep, config=config, steps=25)
    for m, model_key in enumerate(jax.random.split(key, 4)):
        alone = fit_mlp(model_key, images, labels, keep[m], config=config, steps=25)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(stacked), strict=True):
            np.testing.assert_allclose(b[m], np.asarray(a), rtol=1e-5, atol=1e-6)
    again = train_mlps(key, images, labels, keep, config=config, steps=25)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_and_load_models(small_data, tmp_path):
    images, labels, config = small_data
    keep = balanced_keep(2, len(labels), seed=3)
    params = train_mlps(jax.random.key(0), images, labels, keep, config=config, steps=5)
    save_models(tmp_path / "models", params, keep, config, training={"steps": 5})
    loaded, loaded_keep, loaded_config, meta = load_models(tmp_path / "models")
    np.testing.assert_array_equal(loaded_keep, keep)
    assert loaded_config == config and meta["training"] == {"steps": 5}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keep_mask_must_be_boolean_and_match(small_data):
    images, labels, config = small_data
    with pytest.raises(InputError, match="keep: expected a boolean mask"):
        train_mlps(jax.random.key(0), images, labels, np.ones((2, 60)), config=config)
    with pytest.raises(InputError, match=r"keep: expected shape \[M, 60\]"):
        train_mlps(jax.random.key(0), images, labels, np.ones((2, 59), bool), config=config)
