"""Text examples from a JSON Lines file, and texts -> fixed-length token ids.

:class:`TextTokens` is how every text-bearing source (:class:`JsonlTextSource`,
:class:`memjax.data.PairsSource`, :class:`memjax.data.WebDatasetSource`) tokenises: one
tokenizer, one length, right padding, and a count of the texts the length cuts.
"""

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

#: Files of a Hugging Face tokenizer folder that decide how text is tokenised; their
#: contents (never their folder's path) fingerprint a tokenizer loaded from a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def load_tokenizer(folder: str | os.PathLike, *, where: str = "tokenizer") -> Tokenizer:
    """``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)``.

    Raises:
      InputError: naming the folder when it is missing, holds no tokenizer files
        (:data:`TOKENIZER_FILES`), or its files cannot be loaded (broken JSON, a missing
        vocabulary, ...); never a traceback from transformers.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(path):
        raise InputError(f"{where}: {path} is not a folder; expected a tokenizer folder "
                         f"(one of {list(TOKENIZER_FILES[:2])}, ...)")
    if not tokenizer_files(path):
        raise InputError(f"{where}: {path} has no tokenizer files; expected the "
                         f"checkpoint's tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # JSONDecodeError, OSError, ValueError, KeyError, ...
        message = " ".join(str(error).split())[:300]
        raise InputError(f"{where}: cannot load the tokenizer files in {path} "
                         f"({type(error).__name__}: {message})") from None


def tokenizer_files(folder: str) -> list[str]:
    """The :data:`TOKENIZER_FILES` present in ``folder``."""
    return [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]


def files_hash(folder: str, names: Sequence[str]) -> str:
    """Hash of the named files' names and contents (not of the folder's path)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class TextTokens:
    """Texts -> token ids [n, max_length] and their attention mask, right-padded.

    Args:
      tokenizer: a ``transformers`` tokenizer (called with ``truncation=True,
        max_length=max_length``: special tokens are kept when a text is cut), a folder
        holding one (loaded with :func:`load_tokenizer`), a ``tokenizers.Tokenizer``, or
        any callable ``text -> list[int]`` (its output is cut to ``max_length``).
      max_length: the token length every example is padded or truncated to.
      pad_id: the id used for padding; default: the tokenizer's pad token id, else 0.
      where: names the source in messages.

    Padding is always on the right (the token signals read positions left to right),
    also for a tokenizer whose ``padding_side`` is "left"; with a right-padding tokenizer
    the ids equal ``tokenizer(text, padding="max_length", truncation=True,
    max_length=max_length)``.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: Any, *, pad_id: int | None = None,
                 where: str = "tokenizer"):
        self.where = where
        self.folder_hash = None
        if isinstance(tokenizer, str | os.PathLike):
            folder = os.path.abspath(os.path.expanduser(os.fspath(tokenizer)))
            tokenizer = load_tokenizer(folder, where=where)
            self.folder_hash = files_hash(folder, tokenizer_files(folder))
        if max_length is None:
            raise InputError(f"{where}: max_length is required with a tokenizer (every "
                             "example is padded or truncated to it)")
        check_positive_int(max_length, f"{where}: max_length")
        if not (callable(tokenizer) or hasattr(tokenizer, "encode_batch")):
            raise InputError(
                f"{where}: tokenizer must be a transformers tokenizer, a tokenizers."
                f"Tokenizer, a tokenizer folder or a callable text -> list[int]; got "
                f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = _pad_id(tokenizer) if pad_id is None else int(pad_id)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 [n, max_length] (right-padded with pad_id) and the mask."""
        length = self.max_length
        sequences = _encode(self.tokenizer, texts, length)
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), length), dtype=np.int32)
        for row, seq in enumerate(sequences):
            seq = _check_ids(seq, self.tokenizer, self.where)[:length]
            ids[row, : seq.size] = seq
            mask[row, : seq.size] = 1
        return ids, mask

    def lengths(self, texts: list[str]) -> np.ndarray:
        """Each text's full token count (special tokens included, nothing cut), int64."""
        if _is_transformers(self.tokenizer):
            sequences = self.tokenizer(texts, verbose=False)["input_ids"]
        else:
            sequences = _encode(self.tokenizer, texts, None)
        return np.asarray([len(seq) for seq in sequences], dtype=np.int64)

    def count_truncated(self, batches: Any) -> tuple[int, int]:
        """(texts longer than max_length, texts) over an iterable of lists of texts."""
        count = total = 0
        for texts in batches:
            if texts:
                count += int(np.sum(self.lengths(list(texts)) > self.max_length))
                total += len(texts)
        return count, total

    def spec(self) -> dict[str, Any]:
        spec = {"tokenizer": tokenizer_spec(self.tokenizer), "max_length": self.max_length,
                "pad_id": self.pad_id}
        if self.folder_hash is not None:
            spec["tokenizer"]["files_hash"] = self.folder_hash
        return spec


def text_tokens(tokenizer: Tokenizer | TextTokens | None, max_length: Any,
                pad_id: int | None, where: str) -> TextTokens | None:
    """A :class:`TextTokens` from a source's arguments (None without a tokenizer)."""
    if tokenizer is None or isinstance(tokenizer, TextTokens):
        return tokenizer
    return TextTokens(tokenizer, max_length, pad_id=pad_id, where=where)


class TokenizedTexts:
    """What sources of texts share (JSONL, image-caption pairs, WebDataset captions): the
    text fields of a batch and the truncation count. A subclass sets ``tokens`` (a
    :class:`TextTokens` or None) and implements ``texts()``, every text in order as lists
    of strings, and ``__len__``."""

    tokens: TextTokens | None = None
    _truncated: tuple[int, int, int | None] | None = None

    def text_fields(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``text`` (object array of the strings) and, with a tokenizer, ``input_ids`` and
        ``attention_mask`` int32 [n, max_length]."""
        out: dict[str, np.ndarray] = {}
        if self.tokens is not None:
            out["input_ids"], out["attention_mask"] = self.tokens.encode(texts)
        column = np.empty(len(texts), dtype=object)
        column[:] = texts
        out["text"] = column
        return out

    def truncated(self) -> tuple[int, int, int | None]:
        """(texts longer than max_length tokens, texts, max_length); (0, n, None) without
        a tokenizer. Tokenises every text once, then cached."""
        if self.tokens is None:
            return 0, len(self), None
        if self._truncated is None:
            count, total = self.tokens.count_truncated(self.texts())
            self._truncated = (count, total, self.tokens.max_length)
        return self._truncated


class JsonlTextSource(TokenizedTexts, RandomAccessSource):
    """One example per non-blank line of a JSONL file, read by random access.

    Opening scans the file once to record each line's byte offset (and hash the content
    for the run fingerprint); lines are parsed only when read. A line that is not a JSON
    object with a string ``text_field`` raises InputError naming the file and line number
    when it is read (``validate=True`` parses every line up front instead).

    Args:
      path: the ``.jsonl`` file.
      text_field: the key holding the text.
      tokenizer: None, or a tokenizer :class:`TextTokens` takes (a ``transformers``
        tokenizer, a tokenizer folder, a ``tokenizers.Tokenizer`` or a callable
        ``text -> list[int]``), or a :class:`TextTokens`.
      max_length: the token length every example is padded or truncated to; required with
        a tokenizer.
      id_field: the key holding each example's id (int or str); default: the index.
      pad_id: the id used for padding; default: the tokenizer's pad token id, else 0.
      validate: parse every line when opening.

    Records: ``text`` (str; stacked as an object array) and ``id`` (int64 index, or the
    ``id_field`` value); with a tokenizer also ``input_ids`` and ``attention_mask``, int32
    [max_length], right-padded (see :class:`TextTokens`).
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
        self.tokens = text_tokens(tokenizer, max_length, pad_id,
                                  f"JsonlTextSource({self.path})")
        if self.tokens is None and max_length is not None:
            check_positive_int(max_length, f"JsonlTextSource({self.path}): max_length")
        self.max_length = self.tokens.max_length if self.tokens else max_length
        self._offsets, self._lines, self._content_hash = _index_lines(self.path)
        if len(self._offsets) == 0:
            raise InputError(f"JsonlTextSource: {self.path} has no examples (no non-blank "
                             "lines); expected one JSON object per line")
        if validate:
            for start in range(0, len(self._offsets), 4096):
                self._records(range(start, min(start + 4096, len(self._offsets))))

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.tokens.tokenizer if self.tokens else None

    @property
    def pad_id(self) -> int:
        return self.tokens.pad_id if self.tokens else 0

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
        out = self.text_fields(texts)
        out["id"] = _ids_array(ids) if self.id_field else np.asarray(rows, dtype=np.int64)
        return out

    def texts(self, chunk: int = 4096):
        """Every text, in order, as lists of up to ``chunk`` texts."""
        for start in range(0, len(self._offsets), chunk):
            yield self._records(range(start, min(start + chunk, len(self._offsets))))[0]

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
        record = parse_json_line(line, where)
        check_text(record, self.text_field, where)
        if self.id_field and not isinstance(record.get(self.id_field), int | str):
            raise InputError(
                f"{where}: id field {self.id_field!r} is missing or not an int or string "
                f"(keys: {sorted(record)})"
            )
        return record

    def spec(self) -> dict[str, Any]:
        tokens = self.tokens.spec() if self.tokens else {}
        return {
            "kind": "jsonl",  # no path: the contents identify the data, wherever it lies
            "n": len(self._offsets),
            "content_hash": self._content_hash,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "max_length": self.max_length,
            "pad_id": tokens.get("pad_id", 0),
            "tokenizer": tokens.get("tokenizer"),
        }

    def __repr__(self) -> str:
        return f"JsonlTextSource({self.path!r}, n={len(self._offsets)})"


def parse_json_line(line: bytes, where: str) -> dict[str, Any]:
    """One JSONL line as a dict; InputError starting with ``where`` otherwise."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{where}: invalid JSON ({error})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def check_text(record: Mapping[str, Any], field: str, where: str) -> str:
    """``record[field]`` when it is a string; InputError naming the keys otherwise."""
    if not isinstance(record.get(field), str):
        found = "missing" if field not in record else f"a {type(record[field]).__name__}"
        raise InputError(f"{where}: text field {field!r} is {found}; expected a string "
                         f"(keys: {sorted(record)})")
    return record[field]


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


def _is_transformers(tokenizer: Any) -> bool:
    # Checked by class name so transformers is never imported just to test this.
    return any(c.__name__ == "PreTrainedTokenizerBase" for c in type(tokenizer).__mro__)


def _encode(tokenizer: Tokenizer, texts: list[str],
            max_length: int | None) -> list[Sequence[int]]:
    """Token ids of each text; a transformers tokenizer cuts them to ``max_length``
    (keeping its special tokens), the others are cut by the caller."""
    if _is_transformers(tokenizer):
        if max_length is None:
            return tokenizer(texts, verbose=False)["input_ids"]
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


def _check_ids(seq: Any, tokenizer: Tokenizer, where: str) -> np.ndarray:
    seq = np.asarray(seq)
    if seq.ndim != 1 or (seq.size and seq.dtype.kind not in "iu"):
        raise InputError(f"{where}: tokenizer {_describe(tokenizer)} returned {seq.dtype} "
                         f"of shape {seq.shape}; expected a list of ints")
    return seq


def _pad_id(tokenizer: Tokenizer | None) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and tokenizer is not None and getattr(tokenizer, "padding", None):
        pad = tokenizer.padding.get("pad_id")  # tokenizers.Tokenizer with padding enabled
    return 0 if pad is None else int(pad)


def _describe(tokenizer: Any) -> str:
    if callable(tokenizer) and hasattr(tokenizer, "__qualname__"):
        return f"{getattr(tokenizer, '__module__', '?')}.{tokenizer.__qualname__}"
    return type(tokenizer).__name__


def tokenizer_spec(tokenizer: Tokenizer) -> dict[str, Any]:
    """A fingerprint of a tokenizer by content, never by the path it was loaded from
    (``./tok`` and ``tok`` give the same): its serialized model (``tokenizers``), else
    its vocabulary, else its name (a plain callable); plus the contents of its tokenizer
    files when it was loaded from a folder."""
    spec: dict[str, Any] = {"type": _describe(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers "fast"
    if hasattr(backend, "to_str"):  # tokenizers.Tokenizer: the full serialized model
        spec["hash"] = hash_json(backend.to_str())
    elif hasattr(tokenizer, "get_vocab"):
        spec["vocab_hash"] = hash_json(sorted(tokenizer.get_vocab().items()))
    if _is_transformers(tokenizer):
        spec["special_tokens"] = hash_json({k: str(v) for k, v in
                                            sorted(tokenizer.special_tokens_map.items())})
        folder = str(getattr(tokenizer, "name_or_path", "") or "")
        if folder and os.path.isdir(folder) and tokenizer_files(folder):
            spec["files_hash"] = files_hash(folder, tokenizer_files(folder))
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


#: Topics of :func:`stdlib_docstrings_by_module`: label word -> the standard-library
#: modules whose docstrings carry it.
DOCSTRING_TOPICS = {
    "net": ("email.message", "email.utils", "ftplib", "http.client", "http.cookiejar",
            "imaplib", "mailbox", "poplib", "smtplib", "socketserver", "urllib.parse",
            "urllib.request", "ipaddress"),
    "file": ("fileinput", "fnmatch", "glob", "gzip", "lzma", "pathlib", "shutil", "tarfile",
             "tempfile", "zipfile", "shelve"),
    "text": ("base64", "codecs", "csv", "difflib", "json", "quopri", "re", "string",
             "textwrap", "html.parser", "configparser", "pprint"),
    "code": ("abc", "ast", "contextlib", "copy", "dataclasses", "dis", "enum", "functools",
             "inspect", "operator", "types", "typing", "weakref", "traceback"),
}


def stdlib_docstrings_by_module(
        topics: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """A real, offline text classification task: standard-library docstrings labelled by
    the topic of the module they come from.

    Texts are read as in :func:`stdlib_docstrings` (first paragraph of each module, class
    and function docstring of the module's source, more than three words, whitespace
    collapsed), module by module; a text found under two different topics is dropped.

    Args:
      topics: label word -> module names (default :data:`DOCSTRING_TOPICS`: network,
        files, text formats, code introspection).

    Returns:
      (texts sorted, labels [N] int64 indices into the label words, label words).
    """
    import ast
    import sysconfig
    from pathlib import Path

    topics = DOCSTRING_TOPICS if topics is None else topics
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found: dict[str, set[int]] = {}
    names = tuple(topics)
    for label, modules in enumerate(topics.values()):
        for name in modules:
            path = stdlib.joinpath(*name.split("."))
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            if not path.is_file():
                raise InputError(f"topics: no standard-library module {name!r} ({path})")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                doc = ast.get_docstring(node) if isinstance(node, documented) else None
                paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
                if len(paragraph.split()) > 3:
                    found.setdefault(paragraph, set()).add(label)
    texts = sorted(t for t, labels in found.items() if len(labels) == 1)
    return texts, np.asarray([next(iter(found[t])) for t in texts], np.int64), names
