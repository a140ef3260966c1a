"""One model format with a version: every model memjax writes, and the layouts of the
previous release read back (written here the way that release wrote them)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import memjax
from memjax.convert import read_meta, restore
from memjax.errors import InputError
from memjax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from memjax.train import CNNConfig, classifier_logits, load_model, load_models, save_model


def _orbax_save(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, tree), force=True)
    checkpointer.wait_until_finished()


@pytest.fixture
def cnn():
    config = CNNConfig((8, 8, 1), 3, channels=(4,), hidden=(6,))
    return jax.tree.map(np.asarray, config.init(jax.random.key(0))), config


def test_every_writer_uses_version_1_and_memjax_load_opens_it(cnn, tmp_path, rng):
    params, config = cnn
    save_model(tmp_path / "one", params, config)
    meta = read_meta(tmp_path / "one")
    assert (meta["format"], meta["version"], meta["architecture"], meta["kind"]) == (
        "memjax-model", 1, "cnn_classifier", "classifier")
    model = memjax.load(tmp_path / "one")
    image = rng.random((8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(model(image), classifier_logits(params, image), rtol=1e-5,
                               atol=1e-6)
    back, back_config = load_model(tmp_path / "one")
    assert back_config == config
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_previous_release_classifier_and_set_layouts_load(cnn, tmp_path, rng):
    params, config = cnn
    # A classifier as memjax.train.save_model wrote it: the config with its "kind" field.
    _orbax_save(tmp_path / "old" / "params", params)
    (tmp_path / "old" / "memjax_model.json").write_text(json.dumps(config.to_json()))
    back, back_config = load_model(tmp_path / "old")
    assert back_config == config
    np.testing.assert_array_equal(back["layers"][0]["w"], params["layers"][0]["w"])
    assert read_meta(tmp_path / "old")["version"] == 1  # upgraded on read
    # A set as save_models wrote it: models.json + keep.npy + stacked params.
    stacked = jax.tree.map(lambda a: np.stack([a, a + 1.0]), params)
    keep = rng.random((2, 10)) < 0.5
    folder = tmp_path / "old_set"
    _orbax_save(folder / "params", stacked)
    np.save(folder / "keep.npy", keep)
    (folder / "models.json").write_text(json.dumps(
        {**config.to_json(), "n_models": 2, "n_examples": 10, "training": {"steps": 3}}))
    got, got_keep, got_config, meta = load_models(folder)
    np.testing.assert_array_equal(got_keep, keep)
    assert got_config == config and meta["training"] == {"steps": 3}
    second = memjax.load(folder, index=1)
    np.testing.assert_array_equal(second.params["layers"][0]["w"],
                                  params["layers"][0]["w"] + 1.0)
    with pytest.raises(InputError, match="is a set of 2 models: pass index=0..1"):
        memjax.load(folder)


def test_previous_release_converted_port_loads(tmp_path, rng):
    config = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    module = GPT2LMHeadModel(config, rngs=nnx.Rngs(0))
    # memjax convert before version 1: {"architecture", "config"} and the pure state.
    _orbax_save(tmp_path / "params", nnx.to_pure_dict(nnx.state(module)))
    (tmp_path / "memjax_model.json").write_text(json.dumps(
        {"architecture": "gpt2", "config": dataclasses.asdict(config)}))
    restored, restored_config = restore(tmp_path)
    assert restored_config == config
    ids = jnp.asarray(rng.integers(0, 13, (1, 8)))
    np.testing.assert_array_equal(restored(ids), module(ids))
    model = memjax.load(tmp_path)
    assert model.kind == "causal_lm"
    np.testing.assert_array_equal(
        model({"input_ids": ids[0], "attention_mask": jnp.ones(8, jnp.int32)}), module(ids)[0])


def test_unreadable_metadata_is_refused_with_a_message(cnn, tmp_path):
    params, config = cnn
    save_model(tmp_path / "m", params, config)
    meta = json.loads((tmp_path / "m" / "memjax_model.json").read_text())
    (tmp_path / "m" / "memjax_model.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(InputError, match="version 2; this memjax reads 'memjax-model' "
                                         "version 1 .*upgrade memjax"):
        memjax.load(tmp_path / "m")
    (tmp_path / "m" / "memjax_model.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        memjax.load(tmp_path / "m")
    (tmp_path / "m" / "memjax_model.json").write_text(json.dumps({"weights": 1}))
    with pytest.raises(InputError, match="not a memjax model description"):
        memjax.load(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json .* and no memjax_model.json"):
        memjax.load(tmp_path / "empty")


def test_fingerprint_follows_the_content(cnn, tmp_path):
    """Model.fingerprint: equal after a save/load round trip, different when a value
    changes (the engine's params hash, with the model's name, inputs and kind)."""
    params, config = cnn
    model = memjax.Model.from_classifier(params, config)
    save_model(tmp_path / "m", params, config)
    assert memjax.load(tmp_path / "m").fingerprint == model.fingerprint
    changed = jax.tree.map(np.copy, params)
    changed["layers"][0]["w"][0, 0] += 1.0
    assert memjax.Model.from_classifier(changed, config).fingerprint != model.fingerprint
    assert model.replace(kind="encoder").fingerprint != model.fingerprint
