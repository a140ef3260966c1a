"""Image-caption pairs listed in a JSONL, CSV or TSV file (``pairs:FILE``)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from memjax.data._util import check_index, existing_path, hash_json
from memjax.data.base import RandomAccessSource
from memjax.data.images import image_loader, image_size, stack_images
from memjax.data.text import (
    TokenizedTexts,
    Tokenizer,
    check_text,
    parse_json_line,
    text_tokens,
)
from memjax.errors import InputError

PAIR_FORMATS = (".jsonl", ".csv", ".tsv")


class PairsSource(TokenizedTexts, RandomAccessSource):
    """Images and their captions, one pair per row of a ``.jsonl``, ``.csv`` or ``.tsv``
    file (CSV/TSV: a header row naming the columns).

    Each row has an ``image_field`` column (a path relative to the file's folder, or an
    absolute path) and a ``text_field`` column (the caption). Opening parses every row
    and checks that each image file exists; images are decoded when read
    (:func:`memjax.data.decode_image`).

    Args:
      path: the ``.jsonl`` / ``.csv`` / ``.tsv`` file.
      text_field, image_field: the column names.
      tokenizer, max_length, pad_id: tokenise the captions (see
        :class:`memjax.data.TextTokens`); without a tokenizer only ``text`` is returned.
      transform: a callable uint8 RGB [H, W, 3] -> array (e.g. a checkpoint's
        :class:`memjax.data.ImageProcessor`); without one images are float [0, 1].
      size: (height, width) to resize to without a transform; None: every image must
        have the first one's size.
      text_prefix: prepended to every caption before it is tokenised (CLIPScore's "A photo
        depicts ", Hessel et al. 2021); part of the source's identity.

    Records: ``image`` float32 [H, W, 3], ``text`` (str, an object array when stacked),
    ``id`` int64 = the row's index; with a tokenizer also ``input_ids`` and
    ``attention_mask`` int32 [max_length]. :meth:`names` gives each row's image path as
    written in the file, with ``#k`` appended to the k-th repeat (k >= 1) of an image
    listed several times (several captions per image), so names are unique.
    """

    def __init__(self, path: str | os.PathLike, *, text_field: str = "text",
                 image_field: str = "image", tokenizer: Tokenizer | None = None,
                 max_length: int | None = None, pad_id: int | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 size: tuple[int, int] | None = None, text_prefix: str = ""):
        self.path = existing_path(path, "PairsSource")
        if not isinstance(text_prefix, str):
            raise InputError(f"text_prefix: expected a string, got {type(text_prefix).__name__}")
        self.text_prefix = text_prefix
        self.where = f"PairsSource({self.path})"
        if not self.path.lower().endswith(PAIR_FORMATS):
            raise InputError(f"{self.where}: expected a {', '.join(PAIR_FORMATS)} file")
        self.text_field, self.image_field = text_field, image_field
        self.tokens = text_tokens(tokenizer, max_length, pad_id, self.where)
        with open(self.path, "rb") as file:
            content = file.read()
        self._content_hash = hashlib.blake2b(content, digest_size=16).hexdigest()
        rows = _parse(content, self.path, text_field, image_field)
        if not rows:
            raise InputError(f"{self.where}: no rows; expected one {image_field!r} and "
                             f"{text_field!r} pair per row")
        folder = os.path.dirname(self.path)
        self.written = [image for _, image, _ in rows]
        self.captions = [text_prefix + text for _, _, text in rows]
        self.files, self._stats = [], []
        for line, image, _ in rows:
            file = os.path.normpath(os.path.join(folder, os.path.expanduser(image)))
            try:
                stat = os.stat(file)
            except OSError:
                raise InputError(f"{self.where}, line {line}: image file {image!r} not "
                                 f"found: {file}") from None
            self.files.append(file)
            self._stats.append([image, stat.st_size, stat.st_mtime_ns])
        self.loader = image_loader(
            transform, size, lambda: image_size(self.files[0], self.files[0], self.where),
            self.where)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self.files), self.where)
        return {key: value[0] for key, value in self.read(np.asarray([i])).items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [check_index(i, len(self.files), self.where)
                for i in np.asarray(indices).reshape(-1)]
        images = [self.loader(self.files[i], self.files[i], self.where) for i in rows]
        out: dict[str, np.ndarray] = {"image": stack_images(images, self.where)}
        out.update(self.text_fields([self.captions[i] for i in rows]))
        out["id"] = np.asarray(rows, dtype=np.int64)
        return out

    def names(self) -> list[str]:
        """Each row's image path as written (``#k`` on the k-th repeat of an image)."""
        return unique_names(self.written)

    def texts(self, chunk: int = 4096):
        """Every caption, in order, as lists of up to ``chunk``."""
        for start in range(0, len(self.captions), chunk):
            yield self.captions[start:start + chunk]

    def spec(self) -> dict[str, Any]:
        # No path: the file's contents and the images' stats identify the data.
        return {"kind": "pairs", "n": len(self.files),
                "content_hash": self._content_hash, "images_hash": hash_json(self._stats),
                "text_field": self.text_field, "image_field": self.image_field,
                "text_prefix": self.text_prefix, "image": self.loader.spec(),
                "tokens": self.tokens.spec() if self.tokens else None}

    def __repr__(self) -> str:
        return f"PairsSource({self.path!r}, n={len(self.files)})"


def unique_names(names: list[str]) -> list[str]:
    """``names`` with ``#k`` appended to the k-th repeat (k >= 1) of a name."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}#{k}")
    return out


def _parse(content: bytes, path: str, text_field: str,
           image_field: str) -> list[tuple[int, str, str]]:
    """(line number, image path, text) of every row."""
    if path.lower().endswith(".jsonl"):
        return _parse_jsonl(content, path, text_field, image_field)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"PairsSource({path}): not UTF-8 text ({error})") from None
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    missing = [c for c in (image_field, text_field) if c not in columns]
    if missing:
        raise InputError(f"PairsSource({path}): missing column(s) {missing}; the header "
                         f"has {columns} (set text_field= for another caption column)")
    rows = []
    try:
        for record in reader:
            line = reader.line_num
            image, caption = record.get(image_field), record.get(text_field)
            if image is None or caption is None:
                raise InputError(f"PairsSource({path}), line {line}: expected "
                                 f"{len(columns)} columns, got fewer")
            rows.append((line, _image_path(image, path, line), caption))
    except csv.Error as error:
        raise InputError(f"PairsSource({path}), line {reader.line_num}: {error}") from None
    return rows


def _parse_jsonl(content: bytes, path: str, text_field: str,
                 image_field: str) -> list[tuple[int, str, str]]:
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"PairsSource({path}), line {number}"
        record = parse_json_line(line, where)
        if image_field not in record:
            raise InputError(f"{where}: missing image field {image_field!r} (keys: "
                             f"{sorted(record)})")
        caption = check_text(record, text_field, where)
        rows.append((number, _image_path(record[image_field], path, number), caption))
    return rows


def _image_path(value: Any, path: str, line: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"PairsSource({path}), line {line}: image path must be a "
                         f"non-empty string, got {value!r}")
    return value
