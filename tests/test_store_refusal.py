"""A score store refuses a resume by a run that would give other scores, naming the cause.

The README promises refusal for a different function, params, data or batch size; the params
and batch-size cases are in test_engine. Here: the function (its code, a closure value, a
partial argument) and the data (one value of one example, one example fewer, a memmap file
rewritten in place). Every refusal leaves the store as it was, and the unchanged run still
resumes it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable

import numpy as np
import pytest

from memjax.data import memmap_source
from memjax.engine import ScoreStore, score
from memjax.errors import StoreError
from tests import _workers

# Strict dtype promotion: these code paths promote no dtype implicitly (conftest).
pytestmark = pytest.mark.strict_dtypes

BATCH = 16


@pytest.fixture
def data(seed):
    return _workers.make_data(seed=seed)


@pytest.fixture
def params(seed):
    return _workers.make_params(seed=seed + 1)


def _refused(fn, params, data, path, *, differs: list[str]) -> None:
    """Scoring into ``path`` is refused and the message names exactly ``differs``."""
    store = ScoreStore(path)
    try:
        with pytest.raises(StoreError, match="made by a different run") as info:
            score(fn, params, data, batch_size=BATCH, store=store, progress=False)
    finally:
        store.release()  # see test_a_refused_resume_leaves_the_store_unlocked
    named = re.search(r"\(differs in: (.*?)\)", str(info.value)).group(1).split(", ")
    assert named == differs, str(info.value)


def _unchanged(path, reference: dict[str, np.ndarray]) -> None:
    stored = ScoreStore(path).read()
    np.testing.assert_array_equal(stored["id"], reference["id"])
    np.testing.assert_array_equal(stored["loss"], reference["loss"])


def _scaled(scale):
    def scaled_loss(params, example):
        return {"loss": scale * _workers.mlp_signals(params, example)["loss"]}

    return scaled_loss


def _loss(params, example, *, scale):
    return {"loss": scale * _workers.mlp_signals(params, example)["loss"]}


def test_a_different_closure_value_is_refused(tmp_path, data, params):
    path = tmp_path / "s"
    first = score(_scaled(1.0), params, data, batch_size=BATCH, store=path,
                  progress=False).read()
    _refused(_scaled(2.0), params, data, path, differs=["function.closure.scale"])
    _unchanged(path, first)
    # The same closure value rebuilt is the same run: it resumes (nothing to recompute).
    again = score(_scaled(1.0), params, data, batch_size=BATCH, store=path, progress=False)
    _unchanged(again.path, first)


def test_a_different_partial_argument_is_refused(tmp_path, data, params):
    path = tmp_path / "s"
    first = score(functools.partial(_loss, scale=1.0), params, data, batch_size=BATCH,
                  store=path, progress=False).read()
    _refused(functools.partial(_loss, scale=3.0), params, data, path,
             differs=["function.keywords.scale"])
    _refused(_workers.mlp_signals, params, data, path,
             differs=["function.args", "function.keywords", "function.name",
                      "function.partial", "function.source"])
    _unchanged(path, first)


def _load_module(folder, body: str):
    """A fresh import of score_module.score_fn from ``folder`` with the given code."""
    file = folder / "score_module.py"
    file.write_text("import jax\n\n\ndef score_fn(params, example):\n" + body)
    spec = importlib.util.spec_from_file_location("score_module", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score_fn


def test_edited_function_code_under_the_same_name_is_refused(tmp_path, data, params,
                                                             monkeypatch):
    """The same qualified name with another body (the function edited between runs)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "code").mkdir()
    plain = "    h = jax.numpy.tanh(example['x'] @ params['w1'])\n" \
            "    z = h @ params['w2']\n" \
            "    return {'loss': jax.nn.logsumexp(z) - z[example['label']]}\n"
    fn = _load_module(tmp_path / "code", plain)
    path = tmp_path / "s"
    first = score(fn, params, data, batch_size=BATCH, store=path, progress=False).read()
    np.testing.assert_allclose(first["loss"], score(_workers.mlp_signals, params, data,
                                                    batch_size=BATCH,
                                                    progress=False)["loss"], rtol=1e-6)
    edited = _load_module(tmp_path / "code", plain.replace("jax.nn.logsumexp(z)",
                                                           "jax.nn.logsumexp(2.0 * z)"))
    assert edited.__qualname__ == fn.__qualname__ and edited.__module__ == fn.__module__
    _refused(edited, params, data, path, differs=["function.source"])
    _unchanged(path, first)


def test_one_changed_example_is_refused(tmp_path, data, params):
    path = tmp_path / "s"
    first = score(_workers.mlp_signals, params, data, batch_size=BATCH, store=path,
                  progress=False).read()
    for field, change in (("x", lambda a: a.__setitem__((700, 3), a[700, 3] + 1.0)),
                          ("label", lambda a: a.__setitem__(5, (a[5] + 1) % _workers.CLASSES))):
        other = {k: v.copy() for k, v in data.items()}
        change(other[field])
        _refused(_workers.mlp_signals, params, other, path,
                 differs=[f"data.fields.{field}.hash"])
    fewer = {k: v[:-1] for k, v in data.items()}
    _refused(_workers.mlp_signals, params, fewer, path,
             differs=["data.fields.id.hash", "data.fields.id.shape", "data.fields.label.hash",
                      "data.fields.label.shape", "data.fields.x.hash", "data.fields.x.shape",
                      "data.n"])
    _unchanged(path, first)
    again = score(_workers.mlp_signals, params, data, batch_size=BATCH, store=path,
                  progress=False)
    _unchanged(again.path, first)


def test_a_memmap_rewritten_in_place_is_refused(tmp_path, data, params):
    """Memmaps are fingerprinted by path, size and mtime (not read in full): rewriting one
    example of the file changes the mtime, and the resume is refused."""
    folder = tmp_path / "arrays"
    folder.mkdir()
    for key, value in data.items():
        np.save(folder / f"{key}.npy", value)
    path = tmp_path / "s"
    first = score(_workers.mlp_signals, params, memmap_source(folder), batch_size=BATCH,
                  store=path, progress=False).read()
    x = np.load(folder / "x.npy", mmap_mode="r+")
    x[10, 0] += 1.0
    x.flush()
    del x
    stat = os.stat(folder / "x.npy")  # a coarse clock could leave the mtime unchanged
    os.utime(folder / "x.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    _refused(_workers.mlp_signals, params, memmap_source(folder), path,
             differs=["data.fields.x.file.mtime_ns"])
    _unchanged(path, first)


def test_a_refused_resume_leaves_the_store_unlocked(tmp_path, data, params):
    path = tmp_path / "s"
    score(_workers.mlp_signals, params, data, batch_size=BATCH, store=path, progress=False)
    refused = ScoreStore(path)  # kept alive, as a caller's variable or a traceback keeps it
    with pytest.raises(StoreError, match="made by a different run"):
        score(_workers.mlp_signals, params, data, batch_size=2 * BATCH, store=refused,
              progress=False)
    score(_workers.mlp_signals, params, data, batch_size=BATCH, store=path, progress=False)


@dataclasses.dataclass(frozen=True)
class ScaledLoss:
    """A value-hashable score function, like memjax.signals' (a frozen dataclass)."""

    scale: float
    loss: Callable = _workers.mlp_signals

    def __call__(self, params, example):
        return {"loss": self.scale * self.loss(params, example)["loss"]}


def test_a_callable_dataclass_is_fingerprinted_by_its_fields(tmp_path, data, params):
    """Rebuilt with equal fields it resumes; another field value is refused, naming the
    field. Its name in the store is the class, not a repr of every field."""
    path = tmp_path / "s"
    first = score(ScaledLoss(1.0), params, data, batch_size=BATCH, store=path,
                  progress=False).read()
    assert ScoreStore(path).info()["function"] == f"{__name__}.ScaledLoss"
    again = score(ScaledLoss(1.0), params, data, batch_size=BATCH, store=path, progress=False)
    _unchanged(again.path, first)
    _refused(ScaledLoss(2.0), params, data, path, differs=["function.fields.scale"])
    _refused(ScaledLoss(1.0, _scaled(1.0)), params, data, path,
             differs=["function.fields.loss.closure", "function.fields.loss.name",
                      "function.fields.loss.source"])
    _unchanged(path, first)
