"""Lazy, sharded checkpoint loading (memjax.convert.checkpoint + load_pretrained(mesh=...)).

Correctness: tiny Hugging Face checkpoints (GPT-2, ViT, BERT, CLIP from tests/hf_tiny.py)
loaded onto 8 CPU devices (conftest forces them) with ``model=8`` and ``model=4`` x
``data=2`` equal, block by block on every device, what ``safetensors`` itself reads,
converted by the architecture's converter over plain NumPy arrays; every parameter has
the sharding its partition rule gives it (and the one the engine would place it on, so
scoring never moves it). :class:`LazyTensor` views (transposes, unit-axis reshapes,
deferred reshapes) read the same blocks NumPy indexing gives, for every stored dtype.

Memory: see :func:`test_two_processes_each_read_and_hold_half_the_checkpoint`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from bench.checkpoint_load import write_random_gpt2
from memjax.convert import TensorReader, from_port, load_pretrained, read_config
from memjax.convert.checkpoint import open_tensors, read_header
from memjax.engine import make_mesh, param_shardings
from memjax.errors import InputError
from memjax.models.registry import detect_architecture, place_tensor
from tests import hf_tiny

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("gpt2", "vit", "bert", "clip")


def reference_params(folder: Path) -> tuple[dict[tuple, np.ndarray], object]:
    """Param path -> array, read by the ``safetensors`` library (every file, whole) and
    converted by the architecture's converter over NumPy arrays: the eager path."""
    import memjax.models  # noqa: F401 - registers the architectures

    hf_config = read_config(folder)
    arch = detect_architecture(hf_config)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    reader = TensorReader(tensors, ignore=arch.ignore)
    config = arch.refine_config(arch.from_hf_config(hf_config), frozenset(tensors))
    params = arch.convert(reader, config)
    return {path: np.asarray(value) for path, value in params.items()}, config


def expected_spec(name: str, shape: tuple[int, ...], rules, mesh) -> PartitionSpec:
    """The first rule whose pattern is found in ``name``; axes that do not divide stay
    replicated (the documented rule, written out here independently)."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            entries = list(spec) + [None] * (len(shape) - len(spec))
            return PartitionSpec(*[axis if axis is None or dim % mesh.shape[axis] == 0 else None
                                   for dim, axis in zip(shape, entries, strict=True)])
    return PartitionSpec()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: hf_tiny.cached(tmp_path_factory, name)[0] for name in ARCHITECTURES}


@pytest.mark.parametrize("model_axis", [8, 4])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sharded_load_equals_eager_load_block_by_block(checkpoints, name, model_axis):
    folder = checkpoints[name]
    reference, config = reference_params(folder)
    mesh = make_mesh(model=model_axis)
    module, loaded_config = load_pretrained(folder, mesh=mesh)
    assert loaded_config == config
    rules = detect_architecture(read_config(folder)).partition_rules(config)
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    assert set(flat) == set(reference)
    sharded = 0
    for path, var in flat.items():
        array, want = var.get_value(), reference[path]
        name_ = "/".join(map(str, path))
        spec = expected_spec(name_, want.shape, rules, mesh)
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), want.ndim), name_
        sharded += spec != PartitionSpec()
        assert array.dtype == np.float32 and array.shape == want.shape
        for shard in array.addressable_shards:  # each device holds exactly its block
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index],
                                          err_msg=name_)
    assert sharded >= 8  # q/k/v or qkv, MLP in/out, per layer: the rules really apply
    # The engine places params with the same rules: a loaded model is never moved.
    model = from_port(module, config)
    engine = param_shardings(model.params, mesh, model.partition_rules)
    for placed, wanted in zip(jax.tree.leaves(model.params), jax.tree.leaves(engine),
                              strict=True):
        assert placed.sharding == wanted


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_unsharded_lazy_load_equals_eager_load(checkpoints, name):
    reference, _ = reference_params(checkpoints[name])
    module, _ = load_pretrained(checkpoints[name])
    for path, var in nnx.to_flat_state(nnx.state(module)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), reference[path])


def test_sharded_index_and_bfloat16(tmp_path):
    """A checkpoint split over several files with model.safetensors.index.json, loaded in
    bfloat16: NumPy's float32 -> bfloat16 cast (round to nearest even) of the reference."""
    total = write_random_gpt2(tmp_path, n_layer=2, n_embd=32, vocab_size=64, n_positions=16,
                              max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    assert total == sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    reference, _ = reference_params(tmp_path)
    module, _ = load_pretrained(tmp_path, mesh=make_mesh(model=8), dtype=jax.numpy.bfloat16)
    for path, var in nnx.to_flat_state(nnx.state(module)):
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      reference[path].astype(ml_dtypes.bfloat16))


def _random_blocks(rng, shape, count):
    for _ in range(count):
        block = []
        for dim in shape:
            start = int(rng.integers(0, dim + 1))
            block.append(slice(start, int(rng.integers(start, dim + 1))))
        yield tuple(block)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int64])
def test_lazy_views_read_the_blocks_numpy_indexing_gives(tmp_path, rng, dtype):
    arrays = {"matrix": rng.normal(size=(7, 9)), "conv": rng.normal(size=(5, 3, 2, 4)),
              "cls": rng.normal(size=(1, 1, 6)), "scalar": np.asarray(rng.normal())}
    arrays = {k: np.asarray(v * 100).astype(dtype) for k, v in arrays.items()}
    save_file(arrays, str(tmp_path / "t.safetensors"))
    lazy = open_tensors(tmp_path)
    assert sorted(lazy) == sorted(arrays)
    views = [  # (lazy view, the same view of the NumPy array, sliceable)
        (lazy["matrix"], arrays["matrix"], True),
        (lazy["matrix"].T, arrays["matrix"].T, True),
        (lazy["conv"].transpose(2, 3, 1, 0), arrays["conv"].transpose(2, 3, 1, 0), True),
        (np.transpose(lazy["conv"], (1, 0, 3, 2)), arrays["conv"].transpose(1, 0, 3, 2), True),
        (lazy["cls"].reshape(6), arrays["cls"].reshape(6), True),
        (lazy["cls"].reshape(6).reshape(2, 1, 3), arrays["cls"].reshape(2, 1, 3), False),
        (lazy["matrix"].reshape(1, 7, 1, 9).T, arrays["matrix"].reshape(1, 7, 1, 9).T, True),
        (lazy["conv"].reshape(15, -1).T, arrays["conv"].reshape(15, -1).T, False),
        (lazy["scalar"], arrays["scalar"], True),
    ]
    for view, want, sliceable in views:
        assert view.shape == want.shape and view.dtype == want.dtype
        assert view.sliceable == sliceable and view.key in arrays
        np.testing.assert_array_equal(np.asarray(view), want)
        for block in _random_blocks(rng, want.shape, 12):
            np.testing.assert_array_equal(view[block], want[block])
    # Integer and strided indices read the whole view, then index it.
    np.testing.assert_array_equal(lazy["matrix"].T[2, ::3], arrays["matrix"].T[2, ::3])
    with pytest.raises(ValueError, match="cannot reshape"):
        lazy["matrix"].reshape(8, 8)


def test_deferred_views_are_placed_whole_then_sliced(tmp_path, rng):
    array = rng.normal(size=(4, 6, 8)).astype(np.float32)
    save_file({"w": array}, str(tmp_path / "w.safetensors"))
    view = open_tensors(tmp_path)["w"].reshape(24, 8).T  # not a block of the stored array
    assert not view.sliceable
    mesh = make_mesh(model=8)
    placed = place_tensor(view, np.float32, NamedSharding(mesh, PartitionSpec("model", None)))
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), array.reshape(24, 8).T[shard.index])


@pytest.mark.parametrize("preadv", [True, False], ids=["preadv", "seek_readinto"])
def test_column_blocks_are_read_row_by_row_without_touching_other_bytes(tmp_path, rng,
                                                                        monkeypatch, preadv):
    """A column block of a C-order matrix is one read per row; the bytes around it are
    never read (here: poisoned with NaN, so a wrong offset shows). Also without
    ``os.preadv`` (Windows), through seek + readinto."""
    if not preadv:
        monkeypatch.delattr("os.preadv", raising=False)
    array = rng.normal(size=(6, 10)).astype(np.float32)
    save_file({"w": array}, str(tmp_path / "w.safetensors"))
    stored = read_header(tmp_path / "w.safetensors")["w"]
    data = bytearray((tmp_path / "w.safetensors").read_bytes())
    poisoned = np.full((6, 10), np.nan, np.float32)
    poisoned[1:5, 3:7] = array[1:5, 3:7]
    data[stored.offset:stored.offset + array.nbytes] = poisoned.tobytes()
    (tmp_path / "w.safetensors").write_bytes(bytes(data))
    np.testing.assert_array_equal(open_tensors(tmp_path)["w"][1:5, 3:7], array[1:5, 3:7])
    np.testing.assert_array_equal(open_tensors(tmp_path)["w"].T[3:7, 1:5], array[1:5, 3:7].T)


def test_broken_safetensors_files_name_the_file(tmp_path):
    save_file({"w": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # truncated: the last tensor's bytes run past the end
    with pytest.raises(InputError, match=r"model.safetensors.*not a readable safetensors"):
        open_tensors(tmp_path)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(InputError, match="header length"):
        open_tensors(tmp_path)
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(InputError, match="known dtype"):
        open_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model.safetensors", "v": "model.safetensors"}}))
    save_file({"w": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(InputError, match=r"lists tensors that its shards lack: \['v'\]"):
        open_tensors(tmp_path)


def test_a_mesh_without_the_rule_axis_is_refused(checkpoints):
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(InputError, match=r"names mesh axes \['model'\]"):
        load_pretrained(checkpoints["gpt2"], mesh=mesh)


# Memory. On CPU a device's buffers are the process's own memory, so one process holding
# all 8 devices holds the whole model however it is sharded; the test therefore runs two
# jax.distributed processes (gloo on 127.0.0.1) with 4 CPU devices each and the ``model``
# axis (size 8) over both. Each process must read, and hold, only its own half of every
# sharded parameter (plus the replicated ones: positions, LayerNorms, biases, 0.1% here).
# The checkpoint is GPT-2-shaped, 10 layers of width 1024 and a vocabulary of 8192, float32:
# 538 MB, written from NumPy straight to safetensors.
#
# Peak RSS increase of each process during load_pretrained (VmHWM after resetting it via
# /proc/self/clear_refs, minus VmRSS before): must stay below half the checkpoint + 48 MiB.
# The constant covers (a) the host buffer and device copy of the largest block being placed
# (wte's 16 MiB half, twice if the runtime copies rather than aliases it: 32 MiB), (b) the
# replicated parameters (0.5 MiB) and (c) the runtime's first-use allocations (measured: the
# whole increase is 3-4 MiB above half the checkpoint). Reading every tensor, or holding it
# replicated, would cost at least the whole 513 MiB. The bytes each process reads are also
# counted: exactly the bytes its devices hold, each distinct block once.
CONSTANT_BYTES = 48 * 2**20


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def test_two_processes_each_read_and_hold_half_the_checkpoint(tmp_path):
    folder = tmp_path / "gpt2"
    try:
        nbytes = write_random_gpt2(folder, n_layer=10, n_embd=1024, vocab_size=8192)
        assert nbytes >= 500e6
        tensor_bytes = sum(4 * math.prod(t.shape)
                           for t in read_header(folder / "model.safetensors").values())
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "tests._workers", "sharded_load", str(i), str(port),
             str(folder), str(tmp_path / f"out{i}.json")], cwd=REPO, env=_worker_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    replicated = 4 * (64 * 1024 + 10 * 6 * 1024 + 2 * 1024)  # wpe, LayerNorms + biases, ln_f
    for result in results:
        assert result["specs"]["layers.0.c_attn.kernel"] == [None, "model"]
        assert result["specs"]["wte"] == ["model", None]
        assert result["read_bytes"] == result["held_bytes"]
        assert result["held_bytes"] == (tensor_bytes - replicated) // 2 + replicated
        increase = result["peak"] - result["rss_before"]
        assert increase < nbytes / 2 + CONSTANT_BYTES, (increase, nbytes, result)


def test_torch_state_dict_onto_a_mesh(checkpoints, tmp_path_factory):
    """``from_torch_state_dict(..., mesh=)`` places a state dict like a checkpoint."""
    from memjax.convert import from_torch_state_dict

    _, torch_model = hf_tiny.cached(tmp_path_factory, "gpt2")
    mesh = make_mesh(model=8)
    loaded, config = load_pretrained(checkpoints["gpt2"], mesh=mesh)
    module = from_torch_state_dict(torch_model.state_dict(), config, mesh=mesh)
    want = dict(nnx.to_flat_state(nnx.state(loaded)))
    for path, var in nnx.to_flat_state(nnx.state(module)):
        array = var.get_value()
        assert array.sharding == want[path].get_value().sharding
        np.testing.assert_array_equal(np.asarray(array), np.asarray(want[path].get_value()))


def test_scoring_a_model_loaded_onto_the_mesh(checkpoints, rng):
    """The engine scores a model loaded with ``mesh=`` as it is (its params are already
    where the rules put them) and gets the logits of the model loaded unsharded, which the
    engine shards by the same rules: the same program on the same blocks, so bitwise equal."""
    from memjax.engine import score

    mesh = make_mesh(model=4)
    sharded = from_port(*load_pretrained(checkpoints["gpt2"], mesh=mesh))
    plain = from_port(*load_pretrained(checkpoints["gpt2"]))
    data = {"input_ids": rng.integers(0, 300, (6, 12)).astype(np.int32),
            "attention_mask": np.ones((6, 12), np.int32)}
    logits = lambda model: score(lambda p, ex: {"logits": model.apply(p, ex)}, model.params,
                                 data, batch_size=2, mesh=mesh, progress=False,
                                 param_rules=model.partition_rules)["logits"]
    np.testing.assert_array_equal(logits(sharded), logits(plain))
