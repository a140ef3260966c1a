"""Vmapped training of many models: equal to separate runs, deterministic, saved and loaded."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from memjax.data import digits
from memjax.errors import InputError
from memjax.train import (
    CNNConfig,
    MLPConfig,
    balanced_keep,
    classifier_logits,
    fit_classifier,
    load_models,
    save_models,
    train_classifiers,
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


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_vmapped_training_equals_separate_runs(small_data, kind):
    images, labels, config = small_data
    if kind != "mlp":
        config = CNNConfig((4, 4, 1), 3, channels=(4,), hidden=(8,), residual=kind == "resnet")
    keep = balanced_keep(4, len(labels), seed=2)
    key = jax.random.key(7)
    stacked = train_classifiers(key, images, labels, keep, config=config, steps=25)
    for m, model_key in enumerate(jax.random.split(key, 4)):
        alone = fit_classifier(model_key, images, labels, keep[m], config=config, steps=25)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(stacked), strict=True):
            np.testing.assert_allclose(b[m], np.asarray(a), rtol=1e-5, atol=1e-6)
    again = train_classifiers(key, images, labels, keep, config=config, steps=25)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_save_and_load_models(small_data, tmp_path, kind):
    images, labels, config = small_data
    if kind != "mlp":
        config = CNNConfig((4, 4, 1), 3, channels=(2, 4), hidden=(), residual=kind == "resnet")
    keep = balanced_keep(2, len(labels), seed=3)
    params = train_classifiers(jax.random.key(0), images, labels, keep, config=config, steps=5)
    save_models(tmp_path / "models", params, keep, config, training={"steps": 5})
    loaded, loaded_keep, loaded_config, meta = load_models(tmp_path / "models")
    np.testing.assert_array_equal(loaded_keep, keep)
    assert loaded_config == config and meta["training"] == {"steps": 5}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keep_mask_must_be_boolean_and_match(small_data):
    images, labels, config = small_data
    with pytest.raises(InputError, match="keep: expected a boolean mask"):
        train_classifiers(jax.random.key(0), images, labels, np.ones((2, 60)), config=config)
    with pytest.raises(InputError, match=r"keep: expected shape \[M, 60\]"):
        train_classifiers(jax.random.key(0), images, labels, np.ones((2, 59), bool), config=config)


def test_cnn_matches_numpy_forward():
    """Independent float64 NumPy forward: SAME 3x3 conv, ReLU, 2x2 average pool, dense."""
    config = CNNConfig((4, 6, 2), 3, channels=(3,), hidden=(5,))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                          config.init(jax.random.key(1)))
    image = np.random.default_rng(2).normal(size=(4, 6, 2))
    conv = params["convs"][0]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((4, 6, 3))
    for i in range(4):
        for j in range(6):
            out[i, j] = np.einsum("abc,abcd->d", padded[i:i + 3, j:j + 3], conv["w"])
    h = np.maximum(out + conv["b"], 0).reshape(2, 2, 3, 2, 3).mean(axis=(1, 3)).ravel()
    first, last = params["layers"]
    expected = np.maximum(h @ first["w"] + first["b"], 0) @ last["w"] + last["b"]
    got = classifier_logits(jax.tree.map(np.float32, params), image.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _numpy_conv3x3(image: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    height, width, _ = image.shape
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((height, width, w.shape[-1]))
    for i in range(height):
        for j in range(width):
            out[i, j] = np.einsum("abc,abcd->d", padded[i:i + 3, j:j + 3], w)
    return out + b


def test_resnet_matches_numpy_and_starts_as_the_cnn():
    """The residual stage relu(h + conv(relu(conv(h)))) after conv-ReLU-pool equals a
    float64 NumPy forward (with a non-zero second conv); at initialisation the zero second
    conv makes the ResNet the plain CNN of the same key; training reaches that conv."""
    plain = CNNConfig((4, 6, 2), 3, channels=(3,), hidden=(5,))
    resnet = CNNConfig((4, 6, 2), 3, channels=(3,), hidden=(5,), residual=True)
    image = np.random.default_rng(2).normal(size=(4, 6, 2))
    start = resnet.init(jax.random.key(1))
    np.testing.assert_array_equal(classifier_logits(start, image.astype(np.float32)),
                                  classifier_logits(plain.init(jax.random.key(1)),
                                                    image.astype(np.float32)))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), start)
    first_res, second_res = params["convs"][0]["res"]
    second_res["w"] = np.random.default_rng(3).normal(size=second_res["w"].shape) * 0.3
    conv = params["convs"][0]
    h = np.maximum(_numpy_conv3x3(image, conv["w"], conv["b"]), 0)
    h = h.reshape(2, 2, 3, 2, 3).mean(axis=(1, 3))
    inner = np.maximum(_numpy_conv3x3(h, first_res["w"], first_res["b"]), 0)
    h = np.maximum(h + _numpy_conv3x3(inner, second_res["w"], second_res["b"]), 0).ravel()
    first, last = params["layers"]
    expected = np.maximum(h @ first["w"] + first["b"], 0) @ last["w"] + last["b"]
    got = classifier_logits(jax.tree.map(np.float32, params), image.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert CNNConfig.from_json(resnet.to_json()) == resnet and resnet.describe().startswith(
        "ResNet")
    labels = np.array([0, 1, 2, 1])
    images = np.random.default_rng(4).normal(size=(4, 4, 6, 2)).astype(np.float32)
    trained = fit_classifier(jax.random.key(1), images, labels, np.ones(4), config=resnet,
                             steps=3)
    assert np.abs(np.asarray(trained["convs"][0]["res"][1]["w"])).max() > 0


def test_vmapped_cnns_learn_digits():
    """Two CNNs trained at once on halves of real digits generalise to the other half."""
    source = digits()
    images, labels = source.arrays["image"], source.arrays["label"]
    keep = balanced_keep(2, len(labels), seed=0)
    config = CNNConfig(images.shape[1:], 10, channels=(8, 16), hidden=(32,))
    params = train_classifiers(jax.random.key(0), images, labels, keep, config=config,
                               steps=200, learning_rate=3e-3)
    for m in range(2):
        model = jax.tree.map(lambda a, m=m: a[m], params)
        logits = jax.vmap(classifier_logits, in_axes=(None, 0))(model, images)
        correct = np.asarray(logits.argmax(-1) == labels)
        assert correct[keep[m]].mean() > 0.97 and correct[~keep[m]].mean() > 0.9


def test_cnn_input_must_pool_evenly():
    with pytest.raises(InputError, match="not divisible"):
        CNNConfig((6, 6, 1), 10, channels=(8, 16))
