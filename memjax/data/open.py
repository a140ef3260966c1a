"""From the CLI's data argument to a source, and from a source to grain."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from memjax.data.base import Source
from memjax.errors import InputError

FORMS = (
    "digits (scikit-learn's bundled 8x8 digits)",
    "PATH.npz, PATH.npy or a FOLDER of .npy files (one per field)",
    "tfds:NAME:SPLIT or tfds:NAME:SPLIT@DATA_DIR (a prepared ArrayRecord TFDS dataset)",
    "images:FOLDER (FOLDER/<class_name>/<image files>)",
    "jsonl:FILE (one JSON object with a 'text' field per line)",
)


def open_source(spec: str | os.PathLike, *, tokenizer: Any = None,
                max_length: int | None = None) -> Source:
    """The source a data argument names (see :data:`FORMS`).

    ``tokenizer`` and ``max_length`` apply to JSONL text (see :class:`JsonlTextSource`).

    ``tfds:`` takes an optional version after the name (``tfds:mnist:3.0.1:train``) and
    any TFDS split (``tfds:mnist:train[:1000]``). A bare ``PATH.jsonl`` is read like
    ``jsonl:PATH.jsonl``.
    """
    from memjax.data.arrays import digits, memmap_source
    from memjax.data.images import ImageFolderSource
    from memjax.data.text import JsonlTextSource

    if not isinstance(spec, str | os.PathLike):
        raise InputError(f"data: expected a string, got {type(spec).__name__}; {_accepted()}")
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"data: expected a data argument, got {spec!r}; {_accepted()}")
    if text == "digits":
        return digits()
    if text.startswith("tfds:"):
        return _open_tfds(text)
    if text.startswith("images:"):
        return ImageFolderSource(_existing(text[len("images:"):], text))
    if text.startswith("jsonl:"):
        return JsonlTextSource(_existing(text[len("jsonl:"):], text), tokenizer=tokenizer,
                               max_length=max_length)
    if text.endswith(".jsonl"):
        return JsonlTextSource(_existing(text, text), tokenizer=tokenizer,
                               max_length=max_length)
    if text.endswith((".npz", ".npy")) or os.path.isdir(text):
        return memmap_source(_existing(text, text))
    if os.sep in text or os.path.exists(text):
        if not os.path.exists(text):
            raise InputError(f"data {text!r}: no such file or folder: {os.path.abspath(text)}")
        raise InputError(f"data {text!r}: cannot tell what kind of data this file is; "
                         f"{_accepted()}")
    hint = f" (for a TFDS dataset: tfds:{text}:train)" if re.fullmatch(r"[\w/.-]+", text) else ""
    raise InputError(f"data {text!r}: unknown data argument{hint}; {_accepted()}")


def _accepted() -> str:
    return "accepted forms: " + "; ".join(FORMS)


def _existing(path: str, spec: str) -> str:
    if not path:
        raise InputError(f"data {spec!r}: missing path; {_accepted()}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise InputError(f"data {spec!r}: no such file or folder: {os.path.abspath(path)}")
    return path


def _open_tfds(text: str) -> Source:
    from memjax.data.tfds_source import TFDSSource

    body, _, data_dir = text[len("tfds:"):].partition("@")
    name, *rest = body.split(":")
    # A version right after the name belongs to it ("mnist:3.0.1"); the rest is the split,
    # which may itself contain ":" ("train[:100]").
    if len(rest) > 1 and re.fullmatch(r"\d+\.\d+\.\d+", rest[0]):
        name, rest = f"{name}:{rest[0]}", rest[1:]
    split = ":".join(rest)
    if not name or not split:
        raise InputError(f"data {text!r}: expected tfds:NAME:SPLIT or "
                         "tfds:NAME:SPLIT@DATA_DIR (e.g. tfds:mnist:train@/data/tfds)")
    data_dir = os.path.expanduser(data_dir)
    if data_dir and not os.path.isdir(data_dir):
        raise InputError(f"data {text!r}: no such TFDS data folder: {os.path.abspath(data_dir)}")
    return TFDSSource(name, split=split, data_dir=data_dir or None)


def grain_source(source: Any) -> Any:
    """An object ``grain.MapDataset.source(...)`` accepts, reading from ``source``.

    memjax sources already satisfy grain's ``RandomAccessDataSource`` protocol
    (``__len__`` and ``__getitem__(i) -> record``), so they are returned unchanged; a
    source that only has ``read(indices)`` is wrapped to read one row at a time.
    """
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return source
    if isinstance(source, Source):
        return _RowReader(source)
    raise InputError(f"grain_source: expected a memjax source (__len__, read, spec), got "
                     f"{type(source).__name__}")


class _RowReader:
    """``__getitem__`` over a source that only implements ``read(indices)``."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self.source)
        if not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        batch = self.source.read(np.asarray([int(index) % n]))
        return {key: value[0] for key, value in batch.items()}

    def __repr__(self) -> str:  # grain checkpoints use the repr
        return f"grain_source({self.source!r})"
