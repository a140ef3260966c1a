"""Text examples from a JSON Lines file, optionally tokenized to fixed-length ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memjax._checks import check_positive_int
from memjax.data._util import check_index, existing_path, hash_json
from memjax.data.base import RandomAccessSource
from memjax.errors import InputError

Tokenizer = Any  # a transformers tokenizer, a tokenizers.Tokenizer, or text -> list[int]


class JsonlTextSource(RandomAccessSource):
    """One example per non-blank line of a JSONL file, read by random access.

    Opening scans the file once to record each line's byte offset (and hash the content
    for the run fingerprint); lines are parsed only when read. A line that is not a JSON
    object with a string ``text_field`` raises InputError naming the file and line number
    when it is read (``validate=True`` parses every line up front instead).

    Args:
      path: the ``.jsonl`` file.
      text_field: the key holding the text.
      tokenizer: None, a ``transformers`` tokenizer (called on the batch's texts with
        truncation to ``max_length``), a ``tokenizers.Tokenizer``, or any callable
        ``text -> list[int]`` (its output is cut to ``max_length``).
      max_length: the token length every example is padded or truncated to; required with
        a tokenizer.
      id_field: the key holding each example's id (int or str); default: the index.
      pad_id: the id used for padding; default: the tokenizer's pad token id, else 0.
      validate: parse every line when opening.

    Records: ``text`` (str; stacked as an object array) and ``id`` (int64 index, or the
    ``id_field`` value); with a tokenizer also ``input_ids`` and ``attention_mask``, int32
    [max_length], right-padded.
    """

    def __init__(self, path: str | os.PathLike, *, text_field: str = "text",
                 tokenizer: Tokenizer | None = None, max_length: int | None = None,
                 id_field: str | None = None, pad_id: int | None = None,
                 validate: bool = False):
        self.path = existing_path(path, "JsonlTextSource")
        if os.path.isdir(self.path):
            raise InputError(f"JsonlTextSource: {self.path} is a folder; expected a .jsonl file")
        self.text_field = text_field
        self.id_field = id_field
        self.tokenizer = tokenizer
        self.max_length = _check_max_length(max_length, tokenizer, self.path)
        self.pad_id = _pad_id(tokenizer) if pad_id is None else int(pad_id)
        self._offsets, self._lines, self._content_hash = _index_lines(self.path)
        if len(self._offsets) == 0:
            raise InputError(f"JsonlTextSource: {self.path} has no examples (no non-blank "
                             "lines); expected one JSON object per line")
        if validate:
            for start in range(0, len(self._offsets), 4096):
                self._records(range(start, min(start + 4096, len(self._offsets))))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self._offsets), f"JsonlTextSource({self.path})")
        return {key: value[0] for key, value in self.read(np.asarray([i])).items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n = len(self._offsets)
        rows = [check_index(i, n, f"JsonlTextSource({self.path})")
                for i in np.asarray(indices).reshape(-1)]
        texts, ids = self._records(rows)
        out: dict[str, np.ndarray] = {}
        if self.tokenizer is not None:
            out["input_ids"], out["attention_mask"] = self._tokenize(texts)
        text = np.empty(len(texts), dtype=object)
        text[:] = texts
        out["text"] = text
        out["id"] = _ids_array(ids) if self.id_field else np.asarray(rows, dtype=np.int64)
        return out

    def _records(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        """Parse the given rows: their texts and (if ``id_field``) ids, in order."""
        texts, ids = [], []
        with open(self.path, "rb") as file:
            for row in rows:
                file.seek(int(self._offsets[row]))
                line = file.readline()
                record = self._parse(line, int(self._lines[row]))
                texts.append(record[self.text_field])
                if self.id_field:
                    ids.append(record[self.id_field])
        return texts, ids

    def _parse(self, line: bytes, line_number: int) -> dict[str, Any]:
        where = f"JsonlTextSource: {self.path}, line {line_number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{where}: invalid JSON ({error})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get(self.text_field), str):
            found = ("missing" if self.text_field not in record
                     else f"a {type(record[self.text_field]).__name__}")
            raise InputError(
                f"{where}: text field {self.text_field!r} is {found}; expected a string "
                f"(keys: {sorted(record)})"
            )
        if self.id_field and not isinstance(record.get(self.id_field), int | str):
            raise InputError(
                f"{where}: id field {self.id_field!r} is missing or not an int or string "
                f"(keys: {sorted(record)})"
            )
        return record

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [n, max_length] (right-padded with pad_id) and the attention mask."""
        length = self.max_length
        sequences = _encode(self.tokenizer, texts, length)
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), length), dtype=np.int32)
        for row, seq in enumerate(sequences):
            seq = np.asarray(seq)
            if seq.ndim != 1 or (seq.size and seq.dtype.kind not in "iu"):
                raise InputError(
                    f"JsonlTextSource({self.path}): tokenizer {_describe(self.tokenizer)} "
                    f"returned {seq.dtype} of shape {seq.shape}; expected a list of ints"
                )
            seq = seq[:length]
            ids[row, : seq.size] = seq
            mask[row, : seq.size] = 1
        return ids, mask

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "jsonl",
            "path": self.path,
            "n": len(self._offsets),
            "content_hash": self._content_hash,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "tokenizer": None if self.tokenizer is None else _tokenizer_spec(self.tokenizer),
        }

    def __repr__(self) -> str:
        return f"JsonlTextSource({self.path!r}, n={len(self._offsets)})"


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Byte offsets and 1-based line numbers of non-blank lines, and a content hash."""
    offsets, lines = [], []
    digest = hashlib.blake2b(digest_size=16)
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            digest.update(line)
            if line.strip():
                offsets.append(offset)
                lines.append(number)
            offset += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64), \
        digest.hexdigest()


def _ids_array(ids: list[Any]) -> np.ndarray:
    """int64 when every id is an int, else an object array of the values."""
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out


def _check_max_length(max_length: Any, tokenizer: Any, path: str) -> int | None:
    if max_length is None:
        if tokenizer is not None:
            raise InputError(
                f"JsonlTextSource({path}): max_length is required with a tokenizer "
                "(every example is padded or truncated to it)"
            )
        return None
    check_positive_int(max_length, f"JsonlTextSource({path}): max_length")
    if tokenizer is not None and not (callable(tokenizer) or hasattr(tokenizer, "encode_batch")):
        raise InputError(
            f"JsonlTextSource({path}): tokenizer must be a transformers tokenizer, a "
            f"tokenizers.Tokenizer or a callable text -> list[int]; got "
            f"{type(tokenizer).__name__}"
        )
    return int(max_length)


def _is_transformers(tokenizer: Any) -> bool:
    # Checked by class name so transformers is never imported just to test this.
    return any(c.__name__ == "PreTrainedTokenizerBase" for c in type(tokenizer).__mro__)


def _encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[Sequence[int]]:
    """Token ids of each text (not padded; may be longer than max_length)."""
    if _is_transformers(tokenizer):
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    out = []
    for text in texts:
        result = tokenizer(text)
        if isinstance(result, Mapping) or hasattr(result, "keys"):
            result = result["input_ids"]
        elif hasattr(result, "ids"):
            result = result.ids
        out.append(result)
    return out


def _pad_id(tokenizer: Tokenizer | None) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and tokenizer is not None and getattr(tokenizer, "padding", None):
        pad = tokenizer.padding.get("pad_id")  # tokenizers.Tokenizer with padding enabled
    return 0 if pad is None else int(pad)


def _describe(tokenizer: Any) -> str:
    if callable(tokenizer) and hasattr(tokenizer, "__qualname__"):
        return f"{getattr(tokenizer, '__module__', '?')}.{tokenizer.__qualname__}"
    return type(tokenizer).__name__


def _tokenizer_spec(tokenizer: Tokenizer) -> dict[str, Any]:
    """A fingerprint of the tokenizer: its vocabulary when it has one, else its name."""
    spec: dict[str, Any] = {"type": _describe(tokenizer)}
    if hasattr(tokenizer, "name_or_path"):
        spec["name_or_path"] = str(tokenizer.name_or_path)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers "fast"
    if hasattr(backend, "to_str"):  # tokenizers.Tokenizer: the full serialized model
        spec["hash"] = hash_json(backend.to_str())
    elif hasattr(tokenizer, "get_vocab"):
        spec["vocab_hash"] = hash_json(sorted(tokenizer.get_vocab().items()))
    return spec


#: Pure-Python standard-library modules whose source docstrings make the corpus of
#: :func:`stdlib_docstrings`.
_DOCSTRING_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "difflib", "dis", "email.message", "email.utils", "enum", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io",
    "ipaddress", "json", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pkgutil", "poplib", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "struct", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)


def stdlib_docstrings(n: int | None = None) -> list[str]:
    """Real English text bundled with Python: first paragraphs of standard-library
    docstrings (sorted, unique, more than three words), the first ``n`` of them.

    The docstrings of a fixed list of pure-Python modules: each module's, and those of
    every class and function (methods and nested ones included) in its source file, read
    with :mod:`ast`. Reading the source, not the imported objects, keeps the corpus
    independent of what else was imported (third-party packages monkeypatch some stdlib
    functions); it is deterministic for a given Python version (a few thousand texts on
    3.11). Whitespace inside a paragraph is collapsed to single spaces.
    """
    import ast
    import sysconfig
    from pathlib import Path

    # The files under the stdlib folder (some modules, e.g. abc, run frozen copies of them).
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    texts = set()
    for name in _DOCSTRING_MODULES:
        path = stdlib.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, documented) else None
            paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if len(paragraph.split()) > 3:
                texts.add(paragraph)
    return sorted(texts)[:n]
