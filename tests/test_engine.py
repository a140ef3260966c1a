"""The sharded runner and the score store: exactness across devices, processes and kills."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.engine import ScoreStore, compile_cache_info, make_mesh, score
from memjax.errors import InputError, StoreError
from tests import _workers

REPO = Path(__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def reference_loss(data, params) -> np.ndarray:
    """Float64 NumPy loss of the worker MLP."""
    hidden = np.tanh(data["x"].astype(np.float64) @ params["w1"])
    logits = hidden @ params["w2"].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return lse - logits[np.arange(len(logits)), data["label"]]


@pytest.fixture
def data(seed):
    return _workers.make_data(seed=seed % (1 << 30))


@pytest.fixture
def params(seed):
    return _workers.make_params(seed=(seed + 1) % (1 << 30))


def test_scores_match_numpy_and_keep_example_order(data, params):
    result = score(_workers.mlp_signals, params, data, batch_size=40, progress=False)
    assert set(result) == {"id", "loss", "logits"}
    np.testing.assert_array_equal(result["id"], data["id"])
    assert result["logits"].shape == (len(data["x"]), _workers.CLASSES)
    np.testing.assert_allclose(result["loss"], reference_loss(data, params), rtol=1e-5,
                               atol=1e-5)


def test_one_device_equals_eight_devices(data, params):
    assert jax.device_count() == 8
    one = score(_workers.mlp_signals, params, data, batch_size=24, progress=False,
                mesh=make_mesh(devices=jax.devices()[:1]))
    eight = score(_workers.mlp_signals, params, data, batch_size=24, progress=False)
    two_by_four = score(_workers.mlp_signals, params, data, batch_size=24, progress=False,
                        mesh=make_mesh(model=2), param_rules=[("w1", jax.P(None, "model"))])
    for other in (eight, two_by_four):
        np.testing.assert_array_equal(other["id"], one["id"])
        assert np.abs(other["loss"] - one["loss"]).max() <= 1e-6
        assert np.abs(other["logits"] - one["logits"]).max() <= 1e-6


def test_one_compilation_for_full_and_padded_batches(params):
    data = _workers.make_data()
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    def fresh_fn(p, example):  # a new function object: nothing cached for it yet
        return _workers.mlp_signals(p, example)

    before = compile_cache_info()["compiles"]
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        n_batches = -(-len(data["x"]) // 64)
        assert len(data["x"]) % 64 != 0 and n_batches > 5
        score(fresh_fn, params, data, batch_size=64, progress=False)
        score(fresh_fn, params, data, batch_size=64, progress=False)  # cached executable
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compile_cache_info()["compiles"] - before == 1
    assert len(compiles) == 1


def test_batch_not_multiple_of_devices_is_refused(data, params):
    with pytest.raises(InputError, match=r"batch_size=12: expected a multiple .*8.*try 16"):
        score(_workers.mlp_signals, params, data, batch_size=12, progress=False)


@pytest.mark.parametrize("bad, message", [
    ({}, "non-empty dict"),
    ({"x": np.zeros((0, 3), np.float32)}, "empty"),
    ({"x": np.zeros((3, 2), np.float32), "y": np.zeros(4, np.int32)}, "different numbers"),
    ([1, 2, 3], "expected a dict of arrays"),
])
def test_bad_sources_are_named(bad, message, params):
    with pytest.raises(InputError, match=message):
        score(_workers.mlp_signals, params, bad, batch_size=8, progress=False)


def test_nan_input_is_refused_with_the_example(data, params):
    data["x"][777, 3] = np.nan
    with pytest.raises(InputError, match=r"input field 'x' has NaN or Inf at example index 777"):
        score(_workers.mlp_signals, params, data, batch_size=32, progress=False)


def test_bfloat16_inputs_reach_the_function_and_are_checked(data, params):
    """bfloat16 fields (NumPy dtype kind 'V', from ml_dtypes) are inputs like any float:
    passed on (not dropped) and checked for NaN."""
    import ml_dtypes

    half = dict(data, x=data["x"].astype(ml_dtypes.bfloat16))
    seen = []

    def fn(p, example):
        seen.append(example["x"].dtype)
        return _workers.mlp_signals(p, {**example, "x": example["x"].astype(jnp.float32)})

    result = score(fn, params, half, batch_size=40, progress=False)
    assert seen[0] == jnp.bfloat16
    rounded = dict(data, x=half["x"].astype(np.float32))
    np.testing.assert_allclose(result["loss"], reference_loss(rounded, params), rtol=1e-5,
                               atol=1e-5)
    half["x"][5, 0] = np.nan
    with pytest.raises(InputError, match=r"input field 'x' has NaN or Inf at example index 5"):
        score(fn, params, half, batch_size=40, progress=False)


def test_nonfinite_scores_are_refused(data, params):
    params["w2"][:, 0] = np.inf
    with pytest.raises(InputError, match=r"score '(loss|logits)' is NaN or Inf for example id"):
        score(_workers.mlp_signals, params, data, batch_size=32, progress=False)


def test_bad_batch_size_and_fn(data, params):
    with pytest.raises(InputError, match="batch_size: expected a positive integer"):
        score(_workers.mlp_signals, params, data, batch_size=0)
    with pytest.raises(InputError, match="fn: expected a function"):
        score("loss", params, data, batch_size=8)


def test_store_round_trip_and_exports(tmp_path, data, params):
    plain = score(_workers.mlp_signals, params, data, batch_size=16, progress=False)
    store = score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
                  store=ScoreStore(tmp_path / "s", chunk_size=48))
    assert store.complete and store.n_chunks == -(-len(data["x"]) // 48)
    stored = store.read()
    for key in plain:
        np.testing.assert_array_equal(stored[key], plain[key])
    frame = store.to_pandas()
    assert list(frame.columns) == ["id", "logits", "loss"] or set(frame.columns) == {
        "id", "logits", "loss"}
    np.testing.assert_array_equal(frame["id"].to_numpy(), data["id"])
    np.testing.assert_allclose(np.stack(frame["logits"].to_numpy()), plain["logits"])
    import pyarrow.parquet as pq

    table = pq.read_table(store.to_parquet(tmp_path / "out.parquet"))
    np.testing.assert_array_equal(table.column("loss").to_numpy(), plain["loss"])
    assert json.loads(table.schema.metadata[b"shape:logits"]) == [_workers.CLASSES]


def test_store_from_another_configuration_is_refused(tmp_path, data, params):
    path = tmp_path / "s"
    score(_workers.mlp_signals, params, data, batch_size=16, store=path, progress=False)
    params["w1"][0, 0] += 1.0
    with pytest.raises(StoreError, match=r"different run \(differs in: params\)"):
        score(_workers.mlp_signals, params, data, batch_size=16, store=str(path),
              progress=False)
    with pytest.raises(StoreError, match="batch_size"):
        score(_workers.mlp_signals, _workers.make_params(), data, batch_size=32,
              store=str(path), progress=False)


def test_truncated_or_corrupt_chunk_is_recomputed(tmp_path, data, params):
    path = tmp_path / "s"
    first = score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
                  store=ScoreStore(path, chunk_size=64)).read()
    chunk3 = path / "chunks" / "000003.npz"
    chunk3.write_bytes(chunk3.read_bytes()[:100])  # truncated
    chunk5 = path / "chunks" / "000005.npz"
    raw = bytearray(chunk5.read_bytes())
    raw[-30] ^= 0xFF  # one flipped byte
    chunk5.write_bytes(bytes(raw))
    store = ScoreStore(path)
    assert store.done_chunks() == set(range(store.n_chunks)) - {3, 5}
    info = store.info()
    assert info["state"] == "corrupt" and not info["complete"]
    assert info["corrupt_chunks"] == [3, 5] and info["chunks_done"] == store.n_chunks - 2
    with pytest.raises(StoreError, match="chunks 3, 5 are missing or corrupt.*--resume"):
        store.read()
    rerun = score(_workers.mlp_signals, params, data, batch_size=16, store=store,
                  progress=False)
    np.testing.assert_array_equal(rerun.read()["logits"], first["logits"])
    assert rerun.info()["state"] == "complete"


def test_info_tells_corrupt_from_not_yet_written_chunks(tmp_path, data, params):
    """In an unfinished store a chunk without a record is still to come (missing); one
    whose file no longer matches its record is corrupt. In a finished store a chunk
    whose files were deleted is corrupt too."""
    path = tmp_path / "s"
    score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
          store=ScoreStore(path, chunk_size=64))
    store = ScoreStore(path)
    (path / "chunks" / "000007.npz").unlink()
    assert store.info()["corrupt_chunks"] == [7]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["complete"] = False  # as if the run were still going
    (path / "manifest.json").write_text(json.dumps(manifest))
    for index in (9, 10):
        (path / "chunks" / f"{index:06d}.json").unlink()
    info = store.info()
    assert info["state"] == "corrupt" and info["corrupt_chunks"] == [7]
    assert info["missing_chunks"] == [9, 10]
    (path / "chunks" / "000007.json").unlink()
    assert store.info()["state"] == "incomplete"
    assert store.info()["missing_chunks"] == [7, 9, 10]


def _fails_at(example: int):
    """A validator refusing the batch that holds ``example`` (as a bad label would)."""
    def validate(fields, indices):
        if example in indices:
            raise InputError(f"bad example {example}")

    return validate


@pytest.mark.parametrize("where", ["new nested folder", "empty folder made by the user"])
def test_a_run_failing_before_its_first_chunk_leaves_nothing(tmp_path, data, params, where):
    path = tmp_path / "a" / "b" / "s" if where == "new nested folder" else tmp_path / "s"
    if where != "new nested folder":
        path.mkdir()
    with pytest.raises(InputError, match="bad example 3"):
        score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
              store=ScoreStore(path, chunk_size=64), validate=_fails_at(3))
    if where == "new nested folder":
        assert list(tmp_path.iterdir()) == []
    else:
        assert list(path.iterdir()) == []
    # The corrected run starts clean (it is not refused as another run's store).
    stored = score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
                   store=ScoreStore(path, chunk_size=64)).read()
    np.testing.assert_allclose(stored["loss"], reference_loss(data, params), rtol=1e-5,
                               atol=1e-5)


def test_a_run_failing_after_some_chunks_keeps_them_to_resume(tmp_path, data, params):
    path = tmp_path / "s"
    with pytest.raises(InputError, match="bad example 300"):
        score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
              store=ScoreStore(path, chunk_size=64), validate=_fails_at(300))
    store = ScoreStore(path)
    assert store.info()["state"] == "incomplete"
    assert store.done_chunks() == {0, 1, 2, 3}  # examples [0, 256): before the bad batch
    resumed = score(_workers.mlp_signals, params, data, batch_size=16, progress=False,
                    store=ScoreStore(path)).read()
    clean = score(_workers.mlp_signals, params, data, batch_size=16, progress=False)
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key])


def test_a_store_without_finished_chunks_is_replaced_and_overwrite_replaces_any(
        tmp_path, data, params):
    path = tmp_path / "s"
    # A run killed before its first chunk leaves a manifest and nothing else.
    killed = ScoreStore(path, chunk_size=32)
    killed.begin({"function": {"name": "killed"}}, 7, 16)
    killed.release()
    stored = score(_workers.mlp_signals, params, data, batch_size=16, store=path,
                   progress=False).read()
    np.testing.assert_allclose(stored["loss"], reference_loss(data, params), rtol=1e-5,
                               atol=1e-5)
    other = _workers.make_params(seed=99)
    with pytest.raises(StoreError, match=r"differs in: params.*overwrite"):
        score(_workers.mlp_signals, other, data, batch_size=16, store=path, progress=False)
    replaced = score(_workers.mlp_signals, other, data, batch_size=16, progress=False,
                     store=ScoreStore(path, overwrite=True)).read()
    np.testing.assert_allclose(replaced["loss"], reference_loss(data, other), rtol=1e-5,
                               atol=1e-5)


def test_a_refused_start_leaves_the_other_store_untouched(tmp_path, data, params):
    path = tmp_path / "s"
    score(_workers.mlp_signals, params, data, batch_size=16, store=path, progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in path.rglob("*"))
    with pytest.raises(StoreError, match="different run"):
        score(_workers.mlp_signals, params, data, batch_size=32, store=path, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.rglob("*")) == before
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        score(_workers.mlp_signals, params, data, batch_size=16, store=path, progress=False)
    assert (path / "chunks" / "000000.npz").is_file()


@pytest.mark.parametrize("manifest, message", [
    ([1, 2], "holds a list"),
    ({"format_version": 1, "fingerprint": {}, "n_examples": "3", "chunk_size": 4},
     r"bad or missing \['n_examples'\]"),
    ({"format_version": 2, "fingerprint": {}, "n_examples": 3, "chunk_size": 4},
     "format version 2; this memjax reads version 1"),
])
def test_a_manifest_that_is_not_a_store_manifest_is_refused(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for action in (ScoreStore(tmp_path).info, ScoreStore(tmp_path).read):
        with pytest.raises(StoreError, match=message):
            action()


def test_incomplete_store_cannot_be_read(tmp_path, data, params):
    store = ScoreStore(tmp_path / "s", chunk_size=32)
    with pytest.raises(StoreError, match="no manifest"):
        store.read()
    store.begin({"x": 1}, 100, 16)
    store.release()
    with pytest.raises(StoreError, match=r"incomplete \(0/4 chunks done\)"):
        store.read()


def test_killed_run_resumes_to_identical_scores(tmp_path, seed):
    """SIGKILL a scoring subprocess at a random point, resume, compare with a clean run."""
    store_path, out = tmp_path / "killed", tmp_path / "resumed.npz"
    cmd = [sys.executable, "-m", "tests._workers", "store", str(store_path), str(out), "0.01"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env())
    n_chunks = -(-_workers.N_EXAMPLES // 32)
    stop_after = random.Random(seed).randint(2, n_chunks - 5)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((store_path / "chunks").glob("*.json"))) >= stop_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ScoreStore(store_path)
    assert not partial.complete and 0 < len(partial.done_chunks()) < n_chunks
    subprocess.run(cmd, cwd=REPO, env=worker_env(), check=True, timeout=300)
    resumed = dict(np.load(out))
    clean = score(_workers.mlp_signals, _workers.make_params(), _workers.make_data(),
                  batch_size=16, progress=False)
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_by_four_devices_equal_one_device(tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (gloo), 4 CPU devices each."""
    port, out = free_port(), tmp_path / "multihost.npz"
    procs = [subprocess.Popen([sys.executable, "-m", "tests._workers", "multihost", str(i),
                               str(port), str(out), str(tmp_path / "store")],
                              cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    multi = dict(np.load(out))
    single = score(_workers.mlp_signals, _workers.make_params(), _workers.make_data(),
                   batch_size=24, progress=False, mesh=make_mesh(devices=jax.devices()[:1]))
    np.testing.assert_array_equal(multi["id"], single["id"])
    assert np.abs(multi["loss"] - single["loss"]).max() <= 1e-6
    assert np.abs(multi["logits"] - single["logits"]).max() <= 1e-6


def test_params_sharded_over_model_axis_stay_sharded():
    mesh = make_mesh(model=4)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    from memjax.engine import param_shardings

    shardings = param_shardings({"a": jnp.zeros((4, 8)), "b": jnp.zeros(3)}, mesh,
                                [("^a$", jax.P(None, "model"))])
    assert shardings["a"].spec == jax.P(None, "model")
    assert shardings["b"].spec == jax.P()
    with pytest.raises(InputError, match="positive divisor"):
        make_mesh(model=3)


def test_text_fields_and_string_ids_stay_on_the_host(tmp_path, rng):
    """A JSONL source: the fn sees token ids only; string ids come back in order."""
    from memjax.data import JsonlTextSource

    words = ["alpha", "beta", "gamma", "delta"]
    lines = [{"text": " ".join(rng.choice(words, size=rng.integers(1, 9))), "name": f"doc-{i}"}
             for i in range(37)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    vocab = {w: i + 1 for i, w in enumerate(words)}
    source = JsonlTextSource(path, tokenizer=lambda text: [vocab[w] for w in text.split()],
                             max_length=8, id_field="name")
    seen = []

    def count_tokens(params, example):
        seen.append(sorted(example))
        return {"n": jnp.sum(example["attention_mask"]), "total": jnp.sum(example["input_ids"])}

    result = score(count_tokens, {}, source, batch_size=8, progress=False)
    assert seen[0] == ["attention_mask", "input_ids"]
    assert result["id"].tolist() == [line["name"] for line in lines]
    assert result["n"].tolist() == [len(line["text"].split()) for line in lines]
    assert result["total"].tolist() == [sum(vocab[w] for w in line["text"].split())
                                        for line in lines]
    store = score(count_tokens, {}, source, batch_size=8, progress=False,
                  store=str(tmp_path / "store"))
    assert store.read()["id"].tolist() == result["id"].tolist()


def test_validate_hook_sees_only_real_rows(data, params):
    calls = []

    def validate(fields, indices):
        calls.append(indices.copy())
        if (fields["label"] == 3).sum() > 100:
            raise InputError("too many threes")

    score(_workers.mlp_signals, params, data, batch_size=64, progress=False, validate=validate)
    # Reader threads validate batches concurrently: every real row exactly once, any order.
    np.testing.assert_array_equal(np.sort(np.concatenate(calls)), np.arange(len(data["x"])))
    data["label"][:] = 3
    with pytest.raises(InputError, match="too many threes"):
        score(_workers.mlp_signals, params, data, batch_size=128, progress=False,
              validate=validate)


def test_partition_rules_name_nnx_params_and_skip_uneven_dims():
    """NNX variables are named without their '/value' leaf; uneven dims stay replicated."""
    from flax import nnx

    from memjax.engine import param_shardings

    class Tiny(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
            self.embed = nnx.Param(jnp.zeros((7, 4)))

    state = nnx.split(Tiny())[1]
    rules = [(r"proj/kernel$", jax.P(None, "model")), (r"^embed$", jax.P("model", None))]
    shardings = param_shardings(state, make_mesh(model=2), rules)
    specs = {name: s.spec for name, s in zip(
        ["embed", "proj/bias", "proj/kernel"], jax.tree.leaves(
            shardings, is_leaf=lambda x: hasattr(x, "spec")), strict=True)}
    assert specs == {"embed": jax.P(None, None), "proj/bias": jax.P(),
                     "proj/kernel": jax.P(None, "model")}


def test_grain_read_ahead_gives_the_same_scores(data, params):
    """prefetch > 0 reads batches in grain threads; order and values are unchanged."""
    inline = score(_workers.mlp_signals, params, data, batch_size=32, progress=False,
                   prefetch=0)
    threaded = score(_workers.mlp_signals, params, data, batch_size=32, progress=False,
                     prefetch=3)
    for key in inline:
        np.testing.assert_array_equal(threaded[key], inline[key])


def test_batch_of_one_scores_like_larger_batches(data, params):
    """batch_size=1 traces the function unbatched (no size-1 vmap); same scores."""
    small = {k: v[:21] for k, v in data.items()}
    one = score(_workers.mlp_signals, params, small, batch_size=1, progress=False,
                mesh=make_mesh(devices=jax.devices()[:1]))
    eight = score(_workers.mlp_signals, params, small, batch_size=8, progress=False)
    for key in one:
        assert one[key].shape == eight[key].shape
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-6, atol=1e-6)


def test_ids_prepare_and_batched_modes_equal_the_plain_per_example_function(data, params):
    """with_ids hands fn the example ids (int32); prepare runs as its own stage; batched fn
    takes a device's rows at once. On 8 devices with a padded last batch, each equals the
    plain per-example computation."""
    n = len(data["x"])
    ids = score(lambda p, ex: ex["id"], params, data, batch_size=24, with_ids=True,
                progress=False)
    np.testing.assert_array_equal(ids["score"], data["id"])
    assert ids["score"].dtype == np.int32
    plain = score(_workers.mlp_signals, params, data, batch_size=24, progress=False)

    def doubled(example):  # a parameter-free stage: a new field from the example
        return {"x2": 2.0 * example["x"]}

    def from_stage(p, example):
        return _workers.mlp_signals(p, {**example, "x": 0.5 * example["x2"]})

    staged = score(from_stage, params, data, batch_size=24, prepare=doubled, progress=False)

    def rows_fn(p, rows):  # the same function, over a device's rows
        return jax.vmap(lambda ex: _workers.mlp_signals(p, ex))(rows)

    rows = score(rows_fn, params, data, batch_size=24, batched=True, progress=False)
    assert n % 24 and jax.device_count() == 8  # a padded last batch, 3 rows a device
    for key, value in plain.items():
        np.testing.assert_allclose(staged[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(rows[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
