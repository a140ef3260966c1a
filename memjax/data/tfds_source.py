"""TensorFlow Datasets, read by random access from ArrayRecord files (no TensorFlow needed).

``tfds.data_source`` decodes records with numpy and PIL, so a dataset prepared with
``file_format="array_record"`` is read without TensorFlow installed. memjax never downloads
or prepares data: the dataset must already be on disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memjax.data._util import check_index, file_stat, hash_json, text_scalar
from memjax.data.base import RandomAccessSource, stack_records
from memjax.errors import InputError


class TFDSSource(RandomAccessSource):
    """One split of a prepared TFDS dataset (ArrayRecord format), read by random access.

    Args:
      name_or_dir: a registered or previously prepared dataset name (``"mnist"``,
        ``"mnist:3.0.1"``, ``"name/config"``), looked up under ``data_dir``; or the path of
        a prepared dataset version folder (the one holding ``dataset_info.json``).
      split: a TFDS split string (``"train"``, ``"test[:1000]"``...).
      data_dir: the TFDS data folder (default: TFDS's own, ``~/tensorflow_datasets``).
        Ignored when ``name_or_dir`` is a folder.
      fields: the features to keep (default: all). Nested features are flattened to
        ``"parent/child"`` keys; a top-level name keeps its whole subtree. Features left
        out are not decoded.
      decode: TFDS decoders passed through to ``tfds.data_source`` (e.g.
        ``{"image": tfds.decode.SkipDecoding()}`` keeps encoded bytes).
      image_scale: convert ``uint8`` image features to float32 in [0, 1] (NHWC, as
        stored); with False they stay uint8 in [0, 255].

    Records: numpy arrays; text features become Python ``str`` (object arrays when
    stacked), raw bytes stay ``bytes``; class labels become int32. The ``id`` field, if
    the dataset has one, is the example id; otherwise the index in the split is.
    """

    def __init__(self, name_or_dir: str | os.PathLike, *, split: str,
                 data_dir: str | os.PathLike | None = None,
                 fields: Sequence[str] | None = None,
                 decode: Mapping[str, Any] | None = None, image_scale: bool = True):
        import tensorflow_datasets as tfds

        self.split = split
        self.image_scale = bool(image_scale)
        builder = _builder(tfds, name_or_dir, data_dir)
        where = f"tfds dataset {builder.info.full_name!r}"
        self._kinds = _feature_kinds(tfds, builder.info.features)
        self.fields = _select_fields(list(self._kinds), fields, where)
        self.name = builder.info.name
        self._decode_names = sorted(decode) if decode else []
        decoders = _decoders(tfds, self._kinds, self.fields, decode)
        try:
            self._data = builder.as_data_source(split=split, decoders=decoders)
        except (ValueError, KeyError) as error:  # unknown or malformed split
            raise InputError(f"{where}: cannot read split {split!r}: {error}") from None
        except NotImplementedError as error:  # prepared as TFRecord only
            raise InputError(
                f"{where}: no random-access files; expected the dataset prepared with "
                f"file_format='array_record' (TFDS says: {str(error).splitlines()[0]})"
            ) from None
        self._info = builder.info
        self._data_dir = os.path.abspath(os.fspath(builder.data_dir))
        self._n = len(self._data)
        if self._n == 0:
            raise InputError(f"{where}: split {split!r} is empty; expected examples")

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, self._n, f"tfds {self.name}:{self.split}")
        return self._convert(self._data[i])

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        keys = [check_index(i, self._n, f"tfds {self.name}:{self.split}")
                for i in np.asarray(indices).reshape(-1)]
        # __getitems__ reads all requested records in one ArrayRecord call, in key order.
        return stack_records([self._convert(r) for r in self._data.__getitems__(keys)])

    def _convert(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        flat = _flatten(record)
        out = {}
        for key in self.fields:
            value, kind = flat[key], self._kinds[key]
            if isinstance(value, bytes):
                value = text_scalar(value.decode("utf-8") if kind == "text" else value)
            elif kind == "label":
                value = np.asarray(value, dtype=np.int32)
            elif kind == "image" and self.image_scale and np.asarray(value).dtype == np.uint8:
                value = np.asarray(value, dtype=np.float32) / np.float32(255.0)
            else:
                value = np.asarray(value)
            out[key] = value
        return out

    def spec(self) -> dict[str, Any]:
        # The prepared files (shards, dataset_info.json) by name, size and mtime: changes
        # when the dataset is prepared again, without reading the shards.
        files = []
        for name in sorted(os.listdir(self._data_dir)):
            path = os.path.join(self._data_dir, name)
            if os.path.isfile(path):
                stat = file_stat(path)
                files.append([name, stat["size"], stat["mtime_ns"]])
        return {
            "kind": "tfds",
            "name": self.name,
            "full_name": self._info.full_name,
            "version": str(self._info.version),
            "split": self.split,
            "n": self._n,
            "data_dir": self._data_dir,
            "fields": list(self.fields),
            "image_scale": self.image_scale,
            "decode": self._decode_names,
            "files_hash": hash_json(files),
        }

    def __repr__(self) -> str:
        return f"TFDSSource({self._info.full_name!r}, split={self.split!r}, n={self._n})"


def _builder(tfds: Any, name_or_dir: str | os.PathLike, data_dir: Any) -> Any:
    """A prepared TFDS builder, or InputError saying what is missing (never downloads)."""
    text = os.path.expanduser(os.fspath(name_or_dir))
    if os.path.isdir(text):
        try:
            return tfds.builder_from_directory(os.path.abspath(text))
        except Exception as error:  # DatasetInfoFileError (an OSError), ValueError
            raise InputError(
                f"tfds: folder {os.path.abspath(text)} is not a prepared TFDS dataset "
                f"version folder (expected dataset_info.json in it): {error}"
            ) from None
    # A path, not a name ("mnist", "name/config:1.0.0"): say the folder is missing.
    if os.path.isabs(text) or text.startswith("."):
        raise InputError(f"tfds: no such dataset folder: {os.path.abspath(text)}")
    try:
        root = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
        builder = tfds.builder(text, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise InputError(
            f"tfds: dataset {text!r} is neither registered nor prepared under data_dir "
            f"{data_dir}: {str(error).splitlines()[0]}"
        ) from None
    except (ValueError, ImportError) as error:  # bad version / config, missing extras
        raise InputError(f"tfds: cannot open dataset {text!r}: {error}") from None
    if not builder.is_prepared():
        raise InputError(
            f"tfds: dataset {text!r} is not prepared under {builder.data_dir}; memjax never "
            "downloads data: prepare it first (builder.download_and_prepare with "
            "file_format='array_record') or pass the data_dir that holds it"
        )
    return builder


def _feature_kinds(tfds: Any, features: Any, prefix: str = "") -> dict[str, str]:
    """Flattened feature name -> "image" | "text" | "label" | "other"."""
    kinds: dict[str, str] = {}
    for key, feature in features.items():
        name = f"{prefix}{key}"
        if isinstance(feature, tfds.features.FeaturesDict):
            kinds.update(_feature_kinds(tfds, feature, f"{name}/"))
        elif isinstance(feature, tfds.features.Image):
            kinds[name] = "image"
        elif isinstance(feature, tfds.features.Text):
            kinds[name] = "text"
        elif isinstance(feature, tfds.features.ClassLabel):
            kinds[name] = "label"
        else:
            kinds[name] = "other"
    return kinds


def _select_fields(names: list[str], fields: Sequence[str] | None, where: str) -> list[str]:
    """Flattened names kept: exact matches, or every name under a top-level prefix."""
    if fields is None:
        return names
    if isinstance(fields, str):
        fields = [fields]
    out: list[str] = []
    for field in fields:
        matched = [n for n in names if n == field or n.startswith(f"{field}/")]
        if not matched:
            raise InputError(f"{where}: field {field!r} not found; available fields: {names}")
        out.extend(m for m in matched if m not in out)
    return out


def _decoders(tfds: Any, kinds: Mapping[str, str], fields: Sequence[str],
              decode: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """User decoders, plus SkipDecoding for top-level features not kept (saves decoding)."""
    decoders = dict(decode or {})
    kept = {f.split("/", 1)[0] for f in fields}
    # Only leaf features (no "/" in the name): SkipDecoding does not apply to a dict.
    for top in (n for n in kinds if "/" not in n):
        if top not in kept and top not in decoders:
            decoders[top] = tfds.decode.SkipDecoding()
    return decoders or None


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
