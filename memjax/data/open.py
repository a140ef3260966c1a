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
    "images:FOLDER (FOLDER/<class_name>/<image files>, or FOLDER/<image files> without "
    "labels)",
    "pairs:FILE (a .jsonl, .csv or .tsv file with 'image' and 'text' columns)",
    "wds:PATTERN (WebDataset .tar shards, e.g. wds:shards/{000..009}.tar)",
    "jsonl:FILE (one JSON object with a 'text' field per line)",
)


def open_source(spec: str | os.PathLike, *, model: Any = None, tokenizer: Any = None,
                max_length: int | None = None, text_field: str = "text",
                image_transform: Any = None, text_prefix: str = "") -> Source:
    """The source a data argument names (see :data:`FORMS`), prepared for ``model``.

    Args:
      spec: the data argument. ``tfds:`` takes an optional version after the name
        (``tfds:mnist:3.0.1:train``) and any TFDS split (``tfds:mnist:train[:1000]``); a
        bare ``PATH.jsonl`` is read like ``jsonl:PATH.jsonl``.
      model: a :class:`memjax.Model`. Images (``images:``, ``pairs:``, ``wds:``) are then
        preprocessed exactly as its checkpoint's ``preprocessor_config.json`` says
        (:class:`memjax.data.ImageProcessor`); a model with a fixed input size
        (``model.image_shape``) but no preprocessing config is refused. When the model
        reads ``input_ids``, texts are tokenised with its tokenizer files
        (``transformers.AutoTokenizer``, local files only). A model without either
        (memjax-trained classifiers) leaves images as float [0, 1] at their own size.
      tokenizer: a tokenizer (or a tokenizer folder) to use instead of the model's; see
        :class:`memjax.data.TextTokens`.
      max_length: tokens per text; default: ``model.context_length``. More than the
        model's context is refused. Required with ``tokenizer`` and no model.
      text_field: the text field of JSONL rows and the caption column of pairs files; for
        WebDataset shards the key of the caption in ``key.json`` members (default there:
        "caption", else "text").
      image_transform: a callable uint8 RGB [H, W, 3] -> array used instead of the
        model's preprocessing.
      text_prefix: prepended to every caption of a ``pairs:`` file before tokenising
        (CLIPScore's "A photo depicts "); refused for other sources.

    Sources that tokenise texts report ``truncated() -> (count, total, max_length)``, the
    texts longer than ``max_length`` tokens.
    """
    from memjax.data.arrays import digits, memmap_source

    if not isinstance(spec, str | os.PathLike):
        raise InputError(f"data: expected a string, got {type(spec).__name__}; {_accepted()}")
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"data: expected a data argument, got {spec!r}; {_accepted()}")
    prepare = _Preparation(model, tokenizer, max_length, text_field, image_transform)
    if text_prefix:
        if not isinstance(text_prefix, str):
            raise InputError(f"text_prefix: expected a string, got {type(text_prefix).__name__}")
        if not text.startswith("pairs:"):
            raise InputError(f"text_prefix {text_prefix!r}: only pairs:FILE captions take a "
                             f"prefix; data {text!r} is not a pairs file")
        prepare.text_prefix = text_prefix
    if text == "digits":
        return digits()
    if text.startswith("tfds:"):
        return _open_tfds(text)
    for prefix, opener in _OPENERS.items():
        if text.startswith(prefix):
            return opener(text[len(prefix):], text, prepare)
    if text.endswith(".jsonl"):
        return _open_jsonl(text, text, prepare)
    if text.endswith((".npz", ".npy")) or os.path.isdir(text):
        return memmap_source(_existing(text, text))
    if os.sep in text or os.path.exists(text):
        if not os.path.exists(text):
            raise InputError(f"data {text!r}: no such file or folder: {os.path.abspath(text)}")
        raise InputError(f"data {text!r}: cannot tell what kind of data this file is; "
                         f"{_accepted()}")
    hint = f" (for a TFDS dataset: tfds:{text}:train)" if re.fullmatch(r"[\w/.-]+", text) else ""
    raise InputError(f"data {text!r}: unknown data argument{hint}; {_accepted()}")


class _Preparation:
    """How a model (or explicit options) wants images and texts; resolved lazily, so a
    tokenizer is loaded only for data that has text."""

    def __init__(self, model: Any, tokenizer: Any, max_length: Any, text_field: str,
                 image_transform: Any):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.text_field, self.image_transform = text_field, image_transform
        self.text_prefix = ""
        if image_transform is not None and not callable(image_transform):
            raise InputError(f"image_transform: expected a callable uint8 [H, W, 3] -> "
                             f"array, got {type(image_transform).__name__}")

    def transform(self) -> Any:
        """The image transform: explicit, else the model's processor, else None."""
        if self.image_transform is not None or self.model is None:
            return self.image_transform
        model = self.model
        if "image" not in tuple(getattr(model, "inputs", ())):
            return None
        folder = getattr(model, "source", None) or "the model folder"
        shape = getattr(model, "image_shape", None)
        if model.preprocess is None:
            if shape is not None:
                raise InputError(
                    f"model {folder} takes {shape[0]}x{shape[1]} images but has no "
                    "preprocessor_config.json, so memjax cannot know how to resize and "
                    "normalise them; copy the checkpoint's preprocessor_config.json into "
                    "the model folder (or pass image_transform=)")
            return None
        from memjax.data.preprocess import ImageProcessor

        processor = ImageProcessor.from_config(
            model.preprocess, where=os.path.join(folder, "preprocessor_config.json"))
        out = processor.output_shape()
        if shape is not None and out is not None and tuple(out) != tuple(shape):
            raise InputError(
                f"{os.path.join(folder, 'preprocessor_config.json')} makes {out[0]}x{out[1]} "
                f"images but model {folder} takes {shape[0]}x{shape[1]}; expected the "
                "checkpoint's own preprocessor_config.json")
        return processor

    def tokens(self) -> Any:
        """The :class:`TextTokens` for texts, or None when nothing asks to tokenise."""
        from memjax.data.text import TextTokens, load_tokenizer

        model, tokenizer = self.model, self.tokenizer
        context = getattr(model, "context_length", None) if model is not None else None
        if tokenizer is None:
            if model is None or "input_ids" not in tuple(getattr(model, "inputs", ())):
                return None
            folder = getattr(model, "source", None) or "the model folder"
            if model.tokenizer is None:
                raise InputError(
                    f"model {folder} reads input_ids but has no tokenizer files "
                    "(tokenizer.json, tokenizer_config.json, vocab.json, ...); copy the "
                    "checkpoint's tokenizer files into the folder (or give one: --tokenizer "
                    "FOLDER on the command line, tokenizer= in Python)")
            tokenizer = load_tokenizer(model.tokenizer, where=f"model {folder}")
        length = self.max_length if self.max_length is not None else context
        if length is None:
            raise InputError("max_length is required with a tokenizer and no model (every "
                             "text is padded or truncated to it)")
        if context is not None and isinstance(length, int) and length > context:
            raise InputError(f"max_length {length} is more than the model's context of "
                             f"{context} tokens; expected at most {context}")
        return TextTokens(tokenizer, length, where="tokenizer")


def _open_images(path: str, spec: str, prepare: _Preparation) -> Source:
    from memjax.data.images import ImageFolderSource

    return ImageFolderSource(_existing(path, spec), transform=prepare.transform())


def _open_jsonl(path: str, spec: str, prepare: _Preparation) -> Source:
    from memjax.data.text import JsonlTextSource

    return JsonlTextSource(_existing(path, spec), text_field=prepare.text_field,
                           tokenizer=prepare.tokens())


def _open_pairs(path: str, spec: str, prepare: _Preparation) -> Source:
    from memjax.data.pairs import PairsSource

    return PairsSource(_existing(path, spec), text_field=prepare.text_field,
                       tokenizer=prepare.tokens(), transform=prepare.transform(),
                       text_prefix=prepare.text_prefix)


def _open_wds(pattern: str, spec: str, prepare: _Preparation) -> Source:
    from memjax.data.webdataset import WebDatasetSource

    if not pattern:
        raise InputError(f"data {spec!r}: missing shard pattern; {_accepted()}")
    caption = None if prepare.text_field == "text" else prepare.text_field
    transform = prepare.transform()
    source = WebDatasetSource(pattern, caption_field=caption, transform=transform)
    tokens = prepare.tokens() if source.has_text else None
    return source if tokens is None else source.with_tokens(tokens)


_OPENERS = {"images:": _open_images, "jsonl:": _open_jsonl, "pairs:": _open_pairs,
            "wds:": _open_wds}


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
