"""WebDataset ``.tar`` shards read by random access (``wds:PATTERN``).

A WebDataset shard is a plain tar file whose members are grouped into examples by key:
``<key>.<ext>``, the key being the member path up to the first "." of its file name
(``a/b/000123.jpg`` and ``a/b/000123.txt`` make example ``a/b/000123``). Opening scans
every shard's tar headers once (``tarfile``: a 512-byte header per member, payloads are
skipped with a seek) into an index of member offsets; reading seeks to the members of
the examples asked for and reads just those bytes, so each process of a sharded run
reads only its own examples' payloads.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np

from memjax.data._util import check_index, hash_json
from memjax.data.base import RandomAccessSource
from memjax.data.images import IMAGE_EXTENSIONS, image_loader, image_size, stack_images
from memjax.data.text import TokenizedTexts, Tokenizer, text_tokens
from memjax.errors import InputError

#: Member extensions read as the example's image (one per example).
WDS_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
#: Member extensions read as the caption: plain UTF-8 text, or a JSON object.
WDS_TEXT_EXTENSIONS = ("txt", "json")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_NONE = -1
_NO_CAPTIONS = ("{}: the examples have no captions (key.txt or key.json) to tokenise; "
                "expected image-caption shards")


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern names, in order: ``{000..009}`` (a numeric range,
    zero-padded to the longer end when either end starts with 0), ``{a,b,c}``
    (alternatives); several braces expand as a product, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0")
                     for end in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        items = [str(v).zfill(width) for v in range(int(first), int(last) + step, step)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def shard_paths(pattern: str | os.PathLike, where: str) -> list[str]:
    """The shard files a pattern names, sorted by path: a folder (its ``*.tar`` files),
    a brace pattern, or a glob (``*``, ``?``, ``[...]``)."""
    text = os.path.expanduser(os.fspath(pattern))
    if os.path.isdir(text):
        paths = glob.glob(os.path.join(glob.escape(text), "*.tar"))
        if not paths:
            raise InputError(f"{where}: folder {os.path.abspath(text)} has no .tar shards")
    else:
        paths = []
        for item in expand_braces(text):
            if glob.has_magic(item):
                found = glob.glob(item)
                if not found:
                    raise InputError(f"{where}: no files match {item!r}")
                paths.extend(found)
            elif not os.path.isfile(item):
                raise InputError(f"{where}: shard not found: {os.path.abspath(item)}")
            else:
                paths.append(item)
    return sorted({os.path.abspath(p) for p in paths})


class WebDatasetSource(TokenizedTexts, RandomAccessSource):
    """Examples of WebDataset tar shards: ``key.jpg|png|webp|...`` images with
    ``key.txt`` or ``key.json`` captions (optional), read by random access.

    Examples are ordered by shard path, then by key within a shard; the id of an example
    is its position in that order, and :meth:`names` its key, both stable across runs
    and processes. Keys must be unique over all shards. Shards must be uncompressed
    tars (a compressed one cannot be read by seeking).

    Args:
      pattern: a brace pattern (``shards/{000..009}.tar``), a glob, a folder of ``.tar``
        files or one file.
      caption_field: the key of the caption in ``key.json`` members; default: "caption",
        else "text". A ``key.txt`` member is used when an example has both.
      tokenizer, max_length, pad_id: tokenise the captions (see
        :class:`memjax.data.TextTokens`).
      transform: a callable uint8 RGB [H, W, 3] -> array (e.g. a checkpoint's
        :class:`memjax.data.ImageProcessor`); without one images are float [0, 1].
      size: (height, width) to resize to without a transform; None: every image must
        have the first one's size.

    Records: ``image`` float32 [H, W, 3], ``id`` int64; with captions ``text`` (str), and
    with a tokenizer ``input_ids`` and ``attention_mask`` int32 [max_length]; when every
    example has a ``key.cls`` member (an integer as text), ``label`` int32. Every example
    needs one image; captions are all there or all absent.
    """

    def __init__(self, pattern: str | os.PathLike, *, caption_field: str | None = None,
                 tokenizer: Tokenizer | None = None, max_length: int | None = None,
                 pad_id: int | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 size: tuple[int, int] | None = None):
        self.pattern = os.fspath(pattern)
        self.where = f"WebDatasetSource({self.pattern})"
        self.shards = shard_paths(pattern, self.where)
        self.caption_field = caption_field
        self._shard_stats = []
        columns: dict[str, list] = {name: [] for name in _COLUMNS}
        for number, shard in enumerate(self.shards):
            stat = os.stat(shard)
            self._shard_stats.append([shard, stat.st_size, stat.st_mtime_ns])
            for key, members in sorted(_index_shard(shard, self.where).items()):
                _add_example(columns, number, shard, key, members, self.where)
        if not columns["key"]:
            raise InputError(f"{self.where}: the shards hold no members named <key>.<ext>")
        self.keys = columns.pop("key")
        _check_unique(self.keys, columns["shard"], self.shards, self.where)
        self._index = {name: np.asarray(values, np.int64) for name, values in columns.items()}
        self.has_text = _all_or_none(self._index["text_offset"], self.keys,
                                     "caption (key.txt or key.json)", self.where)
        self.has_label = bool(np.all(self._index["cls_offset"] != _NONE))
        self.tokens = text_tokens(tokenizer, max_length, pad_id, self.where)
        if self.tokens is not None and not self.has_text:
            raise InputError(_NO_CAPTIONS.format(self.where))
        self.loader = image_loader(transform, size, self._first_size, self.where)

    def with_tokens(self, tokens: Any) -> WebDatasetSource:
        """The same shards (index kept) with captions tokenised by ``tokens`` (a
        :class:`memjax.data.TextTokens`)."""
        if not self.has_text:
            raise InputError(_NO_CAPTIONS.format(self.where))
        copy = object.__new__(WebDatasetSource)
        copy.__dict__.update(self.__dict__, tokens=tokens, _truncated=None)
        return copy

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self.keys), self.where)
        return {key: value[0] for key, value in self.read(np.asarray([i])).items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [check_index(i, len(self.keys), self.where)
                for i in np.asarray(indices).reshape(-1)]
        images, texts, labels = self._members(rows)
        out: dict[str, np.ndarray] = {"image": stack_images(images, self.where)}
        if self.has_label:
            out["label"] = np.asarray(labels, np.int32)
        if self.has_text:
            out.update(self.text_fields(texts))
        out["id"] = np.asarray(rows, dtype=np.int64)
        return out

    def _members(self, rows: list[int]) -> tuple[list[np.ndarray], list[str], list[int]]:
        """Decoded images, captions and labels of ``rows``, in order; each shard is
        opened once and only the rows' own members are read."""
        index = self._index
        images: list[Any] = [None] * len(rows)
        texts: list[Any] = [None] * len(rows)
        labels: list[Any] = [None] * len(rows)
        shard_of = index["shard"][rows] if rows else np.zeros(0, np.int64)
        for shard in np.unique(shard_of):
            path = self.shards[int(shard)]
            with open(path, "rb") as file:
                for position in np.flatnonzero(shard_of == shard):
                    i = rows[position]
                    name = f"{path}:{self.keys[i]}"
                    data = _read(file, index["image_offset"][i], index["image_size"][i])
                    images[position] = self.loader(data, name, self.where)
                    if self.has_text:
                        texts[position] = self._caption(file, i, name)
                    if self.has_label:
                        labels[position] = _label(
                            _read(file, index["cls_offset"][i], index["cls_size"][i]),
                            name, self.where)
        return images, texts, labels

    def _caption(self, file: Any, i: int, name: str) -> str:
        data = _read(file, self._index["text_offset"][i], self._index["text_size"][i])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{self.where}: caption of {name} is not UTF-8 ({error})") from None
        if self._index["text_kind"][i] == 0:
            return text
        return _json_caption(text, self.caption_field, name, self.where)

    def _first_size(self) -> tuple[int, int]:
        with open(self.shards[int(self._index["shard"][0])], "rb") as file:
            data = _read(file, self._index["image_offset"][0], self._index["image_size"][0])
        return image_size(data, f"{self.shards[0]}:{self.keys[0]}", self.where)

    def names(self) -> list[str]:
        """Each example's key, in index order."""
        return list(self.keys)

    def texts(self, chunk: int = 4096):
        """Every caption, in order, as lists of up to ``chunk`` (reads caption members
        only, never images)."""
        for start in range(0, len(self.keys), chunk):
            rows = list(range(start, min(start + chunk, len(self.keys))))
            out = []
            for shard in np.unique(self._index["shard"][rows]):
                path = self.shards[int(shard)]
                with open(path, "rb") as file:
                    out.extend(self._caption(file, i, f"{path}:{self.keys[i]}")
                               for i in rows if self._index["shard"][i] == shard)
            yield out

    def spec(self) -> dict[str, Any]:
        layout = [self.keys, *(self._index[name].tolist() for name in sorted(self._index))]
        return {"kind": "webdataset", "shards": self._shard_stats, "n": len(self.keys),
                "index_hash": hash_json(layout), "caption_field": self.caption_field,
                "image": self.loader.spec(),
                "tokens": self.tokens.spec() if self.tokens else None}

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.pattern!r}, shards={len(self.shards)}, n={len(self)})"


_COLUMNS = ("key", "shard", "image_offset", "image_size", "text_offset", "text_size",
            "text_kind", "cls_offset", "cls_size")


def _index_shard(path: str, where: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (payload offset, size)} from one shard's tar headers."""
    examples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            while (member := tar.next()) is not None:
                match = _KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                members = examples.setdefault(key, {})
                if extension in members:
                    raise InputError(f"{where}: {path} has two members {member.name!r}")
                members[extension] = (member.offset_data, member.size)
    except tarfile.ReadError as error:
        raise InputError(f"{where}: {path} is not an uncompressed tar file ({error}); "
                         "expected WebDataset .tar shards (compressed shards cannot be "
                         "read by random access: decompress them)") from None
    except tarfile.TarError as error:
        raise InputError(f"{where}: cannot read the tar file {path} ({error})") from None
    return examples


def _add_example(columns: dict[str, list], number: int, shard: str, key: str,
                 members: dict[str, tuple[int, int]], where: str) -> None:
    images = [e for e in WDS_IMAGE_EXTENSIONS if e in members]
    if len(images) != 1:
        found = sorted(members)
        raise InputError(f"{where}: example {key!r} in {shard} has "
                         f"{'no image' if not images else f'several images {images}'} "
                         f"(members: {found}); expected one of {list(WDS_IMAGE_EXTENSIONS)}")
    image = members[images[0]]
    text_kind = 0 if "txt" in members else 1 if "json" in members else _NONE
    text = members[WDS_TEXT_EXTENSIONS[text_kind]] if text_kind != _NONE else (_NONE, _NONE)
    cls = members.get("cls", (_NONE, _NONE))
    for name, value in zip(_COLUMNS, (key, number, *image, *text, text_kind, *cls),
                           strict=True):
        columns[name].append(value)


def _check_unique(keys: list[str], shards: list[int], paths: list[str], where: str) -> None:
    first: dict[str, int] = {}
    for key, shard in zip(keys, shards, strict=True):
        if key in first:
            raise InputError(f"{where}: key {key!r} is in {paths[first[key]]} and in "
                             f"{paths[shard]}; expected unique keys over all shards")
        first[key] = shard


def _all_or_none(offsets: np.ndarray, keys: list[str], what: str, where: str) -> bool:
    present = offsets != _NONE
    if present.all():
        return True
    if present.any():
        missing = keys[int(np.flatnonzero(~present)[0])]
        raise InputError(f"{where}: example {missing!r} has no {what} but others do; "
                         "expected every example to have one, or none")
    return False


def _read(file: Any, offset: Any, size: Any) -> bytes:
    file.seek(int(offset))
    return file.read(int(size))


def _json_caption(text: str, field: str | None, name: str, where: str) -> str:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: {name}.json is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: {name}.json is a {type(record).__name__}; expected an "
                         "object with the caption")
    for candidate in ([field] if field else ["caption", "text"]):
        if isinstance(record.get(candidate), str):
            return record[candidate]
    wanted = repr(field) if field else "'caption' or 'text'"
    raise InputError(f"{where}: {name}.json has no string field {wanted} (keys: "
                     f"{sorted(record)}); set the caption field (--text-field)")


def _label(data: bytes, name: str, where: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: {name}.cls is {data[:20]!r}; expected an integer") from None
