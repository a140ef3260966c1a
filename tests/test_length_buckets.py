"""Length buckets in the engine: sorted, trimmed batches give the untrimmed scores.

``score(..., length_buckets=True)`` (the default) reads windows of batches, sorts their
examples by length, trims each batch's sequence fields to its bucket and pads the
per-position outputs back with zeros. Checked against ``length_buckets=False`` (the
untrimmed, source-order run) and, for the mean loss, against Hugging Face's PyTorch GPT-2.

Tolerances: a trimmed batch runs the same per-example computation on shorter arrays, so
only float32 summation order may differ (attention's softmax sums over fewer masked keys
that contribute exactly 0, matmul blocking over a different T): per-position fields and
per-example scalars within 1e-6 (a few float32 ulps of values of order 1..10), integer and
boolean fields exactly. Against PyTorch: 1e-5 (two fp32 implementations, sums of a few
hundred terms in a different order, as in tests/test_models_llama.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memjax
from memjax.data import ArraySource
from memjax.engine import ScoreStore, SequenceLayout, clear_compile_cache, make_mesh, score
from memjax.engine.runner import bucket_length, right_padded_lengths, trim_to_bucket
from memjax.errors import InputError
from memjax.signals import signal_function
from tests.hf_tiny import cached

torch = pytest.importorskip("torch")

MAX_LENGTH = 256
TOL = 1e-6  # float32 summation order only (module docstring)
HF_TOL = 1e-5  # two fp32 implementations


def skewed_tokens(rng: np.random.Generator, n: int, vocab: int, max_length: int = MAX_LENGTH
                  ) -> dict[str, np.ndarray]:
    """n right-padded sequences, shuffled: 90% short (2 to max_length / 6 tokens), 10% long
    (0.4 to 1 x max_length)."""
    long = rng.random(n) < 0.1
    lengths = np.where(long, rng.integers(int(0.4 * max_length), max_length + 1, n),
                       rng.integers(2, max_length // 6 + 1, n))
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(0, vocab, (n, max_length)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (vocab 300, 256 positions) as a memjax model and as HF PyTorch."""
    folder, hf = cached(tmp_path_factory, "gpt2", n_positions=MAX_LENGTH)
    return memjax.load(folder), hf


@pytest.fixture(scope="module")
def gpt2_scores(gpt2):
    """One skewed corpus (fixed seed: module-scoped, shared by the tests below) scored
    with and without buckets on 8 devices."""
    model, _ = gpt2
    fn, validate = signal_function(model, "tokens")
    data = skewed_tokens(np.random.default_rng(14), 75, model.config.vocab_size)
    clear_compile_cache()
    kwargs = dict(batch_size=16, progress=False, validate=validate)
    plain = score(fn, model.params, data, length_buckets=False, **kwargs)
    programs = memjax.engine.compile_cache_info()["compiles"]
    bucketed = score(fn, model.params, data, **kwargs)
    return data, plain, bucketed, memjax.engine.compile_cache_info()["compiles"] - programs


def assert_same_scores(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if value.dtype.kind in "fc":
            np.testing.assert_allclose(got[name], value, rtol=TOL, atol=TOL, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_bucket_lengths():
    assert [bucket_length(n, 256, 64) for n in (0, 1, 64, 65, 128, 129, 256)] == \
        [64, 64, 64, 128, 128, 256, 256]
    assert bucket_length(300, 384, 64) == 384  # the source's length is the last bucket
    assert bucket_length(10, 48, 64) == 48  # shorter than one quantum: never trimmed


def test_right_padding_is_detected(rng):
    lengths = rng.integers(0, 9, 5)
    right = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    np.testing.assert_array_equal(right_padded_lengths(right), lengths)
    left = right[:, ::-1].copy()
    left[0] = [0, 0, 0, 1, 1, 1, 1, 1]  # at least one left-padded row
    assert right_padded_lengths(left) is None
    holes = right.copy()
    holes[1] = [1, 0, 1, 0, 0, 0, 0, 0]
    assert right_padded_lengths(holes) is None


def test_gpt2_scores_equal_untrimmed(gpt2, gpt2_scores):
    data, plain, bucketed, programs = gpt2_scores
    position_fields = signal_function(gpt2[0], "tokens")[0].sequence_layout.outputs
    np.testing.assert_array_equal(bucketed["id"], np.arange(75))  # source order
    assert_same_scores(bucketed, plain)
    # Every per-position field is exactly 0 wherever the position is not scored, in both.
    for result in (plain, bucketed):
        for name in position_fields:
            assert not np.any(result[name][~result["scored"]]), name
    lengths = data["attention_mask"].sum(axis=1)
    np.testing.assert_array_equal(bucketed["n_tokens"], np.maximum(lengths - 1, 0))
    # New programs: bucket 64 (and maybe 128); 256 is the untrimmed run's, reused.
    assert 1 <= programs <= 2


def test_gpt2_mean_loss_matches_pytorch(gpt2, gpt2_scores):
    """Independent reference: HF GPT-2 on each example's real tokens alone, no padding."""
    _, hf = gpt2
    data, _, bucketed, _ = gpt2_scores
    for i in range(0, 75, 7):
        n = int(data["attention_mask"][i].sum())
        ids = torch.tensor(data["input_ids"][i:i + 1, :n], dtype=torch.long)
        with torch.no_grad():
            logits = hf(ids).logits.double()
        logp = torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(bucketed["mean_loss"][i], -logp.mean(), rtol=HF_TOL,
                                   atol=HF_TOL)
        np.testing.assert_allclose(bucketed["logp"][i, :n - 1], logp, rtol=HF_TOL,
                                   atol=HF_TOL)


class FailingSource:
    """An array source whose ``fail_at``-th read raises (an interrupted run)."""

    def __init__(self, arrays: dict[str, np.ndarray], fail_at: int | None):
        self.source, self.fail_at, self.reads = ArraySource(arrays), fail_at, 0

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("disk gone")
        return self.source.read(indices)

    def spec(self) -> dict[str, Any]:
        return self.source.spec()


def test_gpt2_store_resumes_to_the_same_scores(gpt2, gpt2_scores, tmp_path):
    model, _ = gpt2
    data, plain, _, _ = gpt2_scores
    fn, validate = signal_function(model, "tokens")
    kwargs = dict(batch_size=16, progress=False, validate=validate, prefetch=2)
    # Chunks of 32 examples (two batches, one sort window each); the 3rd window read fails.
    # Read-ahead off for the interrupted run: with it, the 3rd read could fail before chunk
    # 0 was written, and a store that fails before its first chunk leaves nothing.
    with pytest.raises(OSError, match="disk gone"):
        score(fn, model.params, FailingSource(data, fail_at=3), **{**kwargs, "prefetch": 0},
              store=ScoreStore(tmp_path / "s", chunk_size=32))
    interrupted = ScoreStore(tmp_path / "s")
    # Mid-run: the chunks before the failing window written, not complete.
    assert 0 in interrupted.done_chunks() and not interrupted.complete
    resumed = score(fn, model.params, FailingSource(data, fail_at=None), **kwargs,
                    store=tmp_path / "s").read()
    whole = score(fn, model.params, data, **kwargs,
                  store=ScoreStore(tmp_path / "whole", chunk_size=32)).read()
    for name, value in whole.items():  # the same windows, the same buckets: bit for bit
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert_same_scores({k: np.asarray(v) for k, v in resumed.items()}, plain)


@dataclasses.dataclass(frozen=True)
class PrefixSums:
    """A causal toy signal in exact integer arithmetic: running sums of the real tokens
    (0 past the length), their total, its example's id, and the length it ran at."""

    sequence_layout: ClassVar[SequenceLayout] = SequenceLayout(
        fields=("input_ids", "attention_mask"), length_field="attention_mask",
        outputs=("prefix",), quantum=8)
    traced: ClassVar[list[int]] = []

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.traced.append(example["input_ids"].shape[0])
        real = example["attention_mask"] != 0
        x = jnp.where(real, example["input_ids"], 0) * params["scale"]
        return {"prefix": jnp.where(real, jnp.cumsum(x), 0), "total": jnp.sum(x),
                "example_id": example["id"], "ran_at": jnp.int32(example["input_ids"].shape[0])}


def prefix_sums(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference: NumPy int64 running sums over the real tokens."""
    x = np.where(data["attention_mask"] != 0, data["input_ids"], 0).astype(np.int64) * 3
    prefix = np.where(data["attention_mask"] != 0, np.cumsum(x, axis=1), 0)
    return {"prefix": prefix, "total": x.sum(axis=1)}


@pytest.mark.parametrize("model_axis", [1, 2])
def test_sorted_trimmed_batches_on_a_mesh(rng, model_axis):
    """Any mesh: 8 devices on data, or 4 x model 2; ids stay with their examples."""
    data = skewed_tokens(rng, 203, 50, max_length=64)
    data["id"] = rng.permutation(10_000)[:203]
    clear_compile_cache()
    PrefixSums.traced.clear()
    got = score(PrefixSums(), {"scale": np.int32(3)}, data, batch_size=8, progress=False,
                mesh=make_mesh(model=model_axis), with_ids=True)
    want = prefix_sums(data)
    np.testing.assert_array_equal(got["id"], data["id"])
    np.testing.assert_array_equal(got["example_id"], data["id"])  # what fn saw, re-ordered
    np.testing.assert_array_equal(got["prefix"], want["prefix"])
    np.testing.assert_array_equal(got["total"], want["total"])
    assert set(PrefixSums.traced) <= {8, 16, 32, 64} and min(PrefixSums.traced) < 64
    lengths = data["attention_mask"].sum(axis=1)
    np.testing.assert_array_less(lengths - 1, got["ran_at"])  # each row fit its bucket
    # Sorted by length within windows of 16 batches (128 examples; 2 windows): only the
    # batches holding long rows run at full length. Unsorted, ~57% of the batches of 8
    # would hold one of the ~10% long rows.
    n_long = int(np.sum(lengths > 32))
    assert np.sum(got["ran_at"] == 64) <= n_long + 2 * 8


def test_left_padding_runs_untrimmed(rng):
    data = skewed_tokens(rng, 40, 50, max_length=64)
    data = {k: v[:, ::-1].copy() for k, v in data.items()}  # left-padded
    data["id"] = np.arange(40)
    clear_compile_cache()
    PrefixSums.traced.clear()
    got = score(PrefixSums(), {"scale": np.int32(3)}, data, batch_size=8, progress=False,
                with_ids=True)
    np.testing.assert_array_equal(got["prefix"], prefix_sums(data)["prefix"])
    np.testing.assert_array_equal(got["total"], prefix_sums(data)["total"])
    assert set(PrefixSums.traced) == {64}


def test_trim_to_bucket_leaves_other_fields():
    mask = np.zeros((2, 64), np.int32)
    mask[0, :5], mask[1, :20] = 1, 1
    fields = {"input_ids": mask * 7, "attention_mask": mask, "label": np.ones((2, 64))}
    trimmed, full = trim_to_bucket(fields, PrefixSums.sequence_layout)
    assert full == 64
    assert trimmed["input_ids"].shape == trimmed["attention_mask"].shape == (2, 32)
    assert trimmed["label"].shape == (2, 64)  # not a sequence field of the layout
    _, untrimmed = trim_to_bucket({"input_ids": mask}, PrefixSums.sequence_layout)
    assert untrimmed is None  # the mask is missing: run at full length


def test_a_bad_layout_is_refused(rng):
    @dataclasses.dataclass(frozen=True)
    class NotALayout:
        sequence_layout: ClassVar[Any] = ("input_ids",)

        def __call__(self, params, example):
            return jnp.sum(example["input_ids"])

    data = skewed_tokens(rng, 8, 50, max_length=64)
    with pytest.raises(InputError, match="SequenceLayout"):
        score(NotALayout(), {}, data, batch_size=8, progress=False)
    with pytest.raises(InputError, match="quantum"):
        SequenceLayout(("input_ids", "attention_mask"), "attention_mask", (), quantum=0)
    with pytest.raises(InputError, match="length_field"):
        SequenceLayout(("input_ids",), "attention_mask", ())


def test_llama_scores_equal_untrimmed(tmp_path_factory, rng):
    """Rotary positions, GQA, RMSNorm: a trimmed batch keeps positions 0..bucket-1, so
    the Llama port gives the untrimmed scores too (T = 192: buckets 64, 128, 192)."""
    folder, _ = cached(tmp_path_factory, "llama")
    model = memjax.load(folder)
    fn, validate = signal_function(model, "tokens")
    data = skewed_tokens(rng, 24, model.config.vocab_size, max_length=192)
    kwargs = dict(batch_size=8, progress=False, validate=validate)
    plain = score(fn, model.params, data, length_buckets=False, **kwargs)
    assert_same_scores(score(fn, model.params, data, **kwargs), plain)


def test_dynamic_rope_runs_at_full_length(tmp_path_factory, tmp_path, rng):
    """HF's "dynamic" rotary scaling follows the padded length past the trained context
    (max_position_embeddings 64 here, T = 192), so its token signals declare no sequence
    layout: the engine runs it at full length and the scores are the plain run's."""
    import json
    import shutil

    folder, _ = cached(tmp_path_factory, "llama")
    dynamic = tmp_path / "dynamic"
    shutil.copytree(folder, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    config.pop("rope_parameters", None)
    (dynamic / "config.json").write_text(json.dumps(config))
    model = memjax.load(dynamic)
    fn, validate = signal_function(model, "tokens")
    assert fn.sequence_layout is None
    assert signal_function(memjax.load(folder), "tokens")[0].sequence_layout is not None
    data = skewed_tokens(rng, 16, model.config.vocab_size, max_length=192)
    kwargs = dict(batch_size=8, progress=False, validate=validate)
    got = score(fn, model.params, data, **kwargs)
    want = score(fn, model.params, data, length_buckets=False, **kwargs)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
