"""SimCLR training (Chen et al. 2020): NT-Xent against NumPy, vmapped = separate fits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.errors import InputError
from memjax.train import CNNConfig
from memjax.train.simclr import fit_simclr, nt_xent, train_simclrs


def keyed_views(image, key):
    """A small deterministic augmentation: keyed flip and brightness (test stand-in)."""
    k_flip, k_gain = jax.random.split(key)
    image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
    return jnp.clip(image * jax.random.uniform(k_gain, minval=0.7, maxval=1.3), 0.0, 1.0)


def view_of(image, example_id, aug_id):
    """View ``aug_id`` of example ``example_id`` with the training keys (view seed 0)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), example_id), aug_id)
    return keyed_views(image, key)


def numpy_nt_xent(z1, z2, valid, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    both = np.concatenate([valid, valid])
    n = len(z)
    losses = []
    for a in range(n):
        if not both[a]:
            continue
        others = [j for j in range(n) if j != a and both[j]]
        logits = np.array([z[a] @ z[j] / temperature for j in others])
        partner = others.index((a + n // 2) % n)
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                      - logits[partner])
    return np.mean(losses)


def test_nt_xent_matches_numpy():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
    valid = np.array([True, True, False, True, True, True])
    for temperature in (0.1, 0.5):
        got = nt_xent(z1, z2, valid, temperature)
        np.testing.assert_allclose(got, numpy_nt_xent(z1, z2, valid, temperature), rtol=1e-5)


def test_vmapped_simclr_equals_separate_fits():
    rng = np.random.default_rng(1)
    images = rng.random((40, 4, 4, 1)).astype(np.float32)
    ids = np.arange(40)
    keep = np.stack([np.arange(40) < 30, np.arange(40) >= 10])
    config = CNNConfig((4, 4, 1), 8, channels=(4,), hidden=(16,))
    kwargs = {"config": config, "views_fn": keyed_views, "steps": 5, "batch_size": 16}
    stacked = train_simclrs(jax.random.key(2), images, ids, keep, **kwargs)
    fit = jax.jit(functools.partial(fit_simclr, **kwargs))
    for m, key in enumerate(jax.random.split(jax.random.key(2), 2)):
        alone = fit(key, images, ids, keep[m])
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(stacked), strict=True):
            np.testing.assert_allclose(b[m], np.asarray(a), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="keep: expected a boolean mask"):
        train_simclrs(jax.random.key(0), images, ids, keep.astype(int), **kwargs)


def test_same_init_shares_the_initialisation_only():
    """same_init: every encoder starts from one initialisation (0 steps: identical
    params) and then trains on its own minibatches (equal to fit_simclr with init_key)."""
    from memjax.train.reference import model_keys

    rng = np.random.default_rng(3)
    images = rng.random((40, 4, 4, 1)).astype(np.float32)
    ids = np.arange(40)
    keep = np.stack([np.arange(40) < 30, np.arange(40) >= 10])
    config = CNNConfig((4, 4, 1), 8, channels=(4,), hidden=(16,))
    kwargs = {"config": config, "views_fn": keyed_views, "batch_size": 16}
    start = train_simclrs(jax.random.key(5), images, ids, keep, steps=0, same_init=True,
                          **kwargs)
    for leaf in jax.tree.leaves(start):
        np.testing.assert_array_equal(leaf[0], leaf[1])
    apart = train_simclrs(jax.random.key(5), images, ids, keep, steps=0, **kwargs)
    assert not np.array_equal(apart["layers"][0]["w"][0], apart["layers"][0]["w"][1])
    trained = train_simclrs(jax.random.key(5), images, ids, keep, steps=3, same_init=True,
                            **kwargs)
    keys, init_key = model_keys(jax.random.key(5), 2, True)
    fit = jax.jit(functools.partial(fit_simclr, steps=3, **kwargs))
    for m in range(2):
        alone = fit(keys[m], images, ids, keep[m], init_key=init_key)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(trained), strict=True):
            np.testing.assert_allclose(b[m], np.asarray(a), rtol=1e-5, atol=1e-6)


def test_simclr_training_lowers_the_loss_on_digits():
    from memjax.data import digits

    data = digits().arrays
    images, ids = data["image"][:256], np.arange(256)
    config = CNNConfig(images.shape[1:], 16, channels=(8,), hidden=(32,))

    def batch_loss(params):
        rows = np.arange(64)
        v1 = jax.vmap(view_of, in_axes=(0, 0, None))(images[rows], ids[rows], 0)
        v2 = jax.vmap(view_of, in_axes=(0, 0, None))(images[rows], ids[rows], 1)
        from memjax.train.simclr import embed

        z1 = jax.vmap(embed, in_axes=(None, 0))(params, v1)
        z2 = jax.vmap(embed, in_axes=(None, 0))(params, v2)
        return float(nt_xent(z1, z2, np.ones(64, bool), 0.5))

    keep = np.ones((1, 256), bool)
    before = train_simclrs(jax.random.key(0), images, ids, keep, config=config,
                           views_fn=keyed_views, steps=1, learning_rate=1e-9)
    after = train_simclrs(jax.random.key(0), images, ids, keep, config=config,
                          views_fn=keyed_views, steps=150, batch_size=64)
    first = jax.tree.map(lambda a: a[0], before)
    trained = jax.tree.map(lambda a: a[0], after)
    assert batch_loss(trained) < 0.8 * batch_loss(first)


def test_encoder_activations_end_in_the_embedding():
    from memjax.train.simclr import embed, encoder_model

    config = CNNConfig((8, 8, 1), 6, channels=(4, 8), hidden=(12,))
    params = config.init(jax.random.key(0))
    image = np.random.default_rng(0).random((8, 8, 1)).astype(np.float32)
    model = encoder_model(params, config)
    layers = model.activations("*")(params, image)
    assert list(layers) == ["conv1", "conv2", "dense1", "embedding"]  # call order
    assert {k: v.shape for k, v in layers.items()} == {
        "conv1": (4, 4, 4), "conv2": (2, 2, 8), "dense1": (12,), "embedding": (6,)}
    np.testing.assert_allclose(layers["embedding"], embed(params, image), rtol=1e-6)
    # The Model scores with XLA's convolution, training uses im2col: float32 rounding apart.
    np.testing.assert_allclose(model(image), embed(params, image), rtol=1e-5, atol=1e-6)
