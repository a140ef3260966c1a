"""Checkpoint reading: sharded safetensors, half precision, pickles, config guard, CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from memjax.cli import main
from memjax.convert import load, load_pretrained, read_tensors
from memjax.errors import InputError


@pytest.fixture
def gpt2(tmp_path, seed):
    """A tiny random GPT-2 saved as one safetensors file, and its reference logits."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=4)).eval()
    model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(seed).integers(0, 97, (2, 10))
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.numpy()
    return model, tmp_path / "hf", ids, logits


def test_sharded_checkpoint_with_index_loads_identically(gpt2, tmp_path):
    model, _, ids, logits = gpt2
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    loaded, _ = load_pretrained(tmp_path / "sharded")
    assert np.abs(np.asarray(loaded(jnp.asarray(ids))) - logits).max() <= 1e-5


# Our forward runs in the checkpoint's half precision; the reference evaluates the same
# half-precision weights in float32. The difference is the rounding of activations to the
# half format: bf16 keeps 8 significand bits (unit roundoff 2^-9 ~ 2.0e-3), fp16 keeps 11
# (2^-12 ~ 2.4e-4), and the logits carry about one unit roundoff of error relative to
# max(1, max|logit|). Measured over 40 fresh seeds: at most 3.2e-3 (bf16) and 3.8e-4
# (fp16); the tolerances are ~3x that.
@pytest.mark.parametrize("torch_dtype, jax_dtype, tolerance", [
    (torch.bfloat16, jnp.bfloat16, 1e-2), (torch.float16, jnp.float16, 1.2e-3)])
def test_half_precision_checkpoints(gpt2, tmp_path, torch_dtype, jax_dtype, tolerance):
    model, _, ids, _ = gpt2
    half = model.to(torch_dtype)
    half.save_pretrained(tmp_path / "half")
    tensors = read_tensors(tmp_path / "half")
    assert {str(t.dtype) for t in tensors.values()} == {str(jnp.dtype(jax_dtype))}
    loaded, _ = load_pretrained(tmp_path / "half", dtype=jax_dtype)
    ours = np.asarray(loaded(jnp.asarray(ids)), dtype=np.float32)
    with torch.no_grad():  # the same half-precision weights, evaluated by PyTorch in fp32
        ref = half.float()(torch.tensor(ids)).logits.numpy()
    assert loaded.wte[...].dtype == jax_dtype
    assert np.abs(ours - ref).max() <= tolerance * max(1.0, np.abs(ref).max())


def test_pickled_checkpoints_are_refused_unless_allowed(gpt2, tmp_path):
    model, _, ids, logits = gpt2
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"only pickled weights \(pytorch_model.bin\).*"
                                         r"allow_pickle=True"):
        load_pretrained(folder)
    loaded, _ = load_pretrained(folder, allow_pickle=True)
    assert np.abs(np.asarray(loaded(jnp.asarray(ids))) - logits).max() <= 1e-5


@pytest.mark.parametrize("key, value", [("add_cross_attention", True),
                                        ("is_decoder", True), ("n_experts", 4)])
def test_config_attributes_that_change_the_model_are_refused(gpt2, key, value):
    _, folder, _, _ = gpt2
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"{key}={value!r}"):
        load_pretrained(folder)


def test_neutral_attributes_at_default_are_accepted(gpt2):
    _, folder, ids, logits = gpt2
    config = json.loads((folder / "config.json").read_text())
    config.update(is_decoder=False, add_cross_attention=False, use_cache=False)
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_pretrained(folder)
    assert np.abs(np.asarray(loaded(jnp.asarray(ids))) - logits).max() <= 1e-5


def test_unknown_model_type_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(InputError, match="model_type 'mamba': expected one of"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="no \\*.safetensors weights"):
        load_pretrained(tmp_path)


def test_cli_convert_round_trip_in_bfloat16(gpt2, tmp_path, capsys):
    _, folder, ids, _ = gpt2
    assert main(["convert", str(folder), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    direct, _ = load_pretrained(folder, dtype=jnp.bfloat16)
    restored = load(tmp_path / "bf16")  # memjax.load: a Model, one example at a time
    assert restored.params["wte"][...].dtype == jnp.bfloat16
    mask = np.ones_like(ids[0])
    np.testing.assert_array_equal(
        np.asarray(restored({"input_ids": ids[0], "attention_mask": mask}), np.float32),
        np.asarray(direct(jnp.asarray(ids)), np.float32)[0])
