"""The source protocol: random access to examples, read in batches.

A source is anything with ``__len__``, ``read(indices) -> dict[str, np.ndarray]`` (fields
stacked along a new first axis, one row per index, in the order given) and ``spec()``
(a JSON-serialisable description used to fingerprint runs in a score store). Sources
also implement ``__getitem__(i)`` for one record, so they plug straight into grain as a
``RandomAccessDataSource``.

Example ids: a field named ``id`` is the example id; sources without one use the index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from memjax._checks import to_device_dtype
from memjax.errors import InputError

ID_FIELD = "id"


@runtime_checkable
class Source(Protocol):
    """Random-access examples (see module docstring)."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...

    def spec(self) -> dict[str, Any]: ...


class RandomAccessSource:
    """Base class: implement ``__len__``, ``__getitem__`` and ``spec``; ``read`` stacks records."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [self[int(i)] for i in np.asarray(indices)]
        return stack_records(records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)})"


def stack_records(records: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack a list of per-example dicts into a dict of arrays [n, ...]."""
    if not records:
        raise InputError("cannot stack an empty list of records")
    keys = list(records[0])
    out = {}
    for key in keys:
        values = [np.asarray(r[key]) for r in records]
        shapes = {v.shape for v in values}
        if len(shapes) != 1:
            raise InputError(
                f"field {key!r} has different shapes across examples {sorted(shapes)}; "
                "expected one fixed shape per field (pad or resize in the source)"
            )
        out[key] = np.stack(values)
    return out


def hash_array(array: np.ndarray) -> str:
    """Content hash of an array (dtype, shape and bytes), for run fingerprints."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype.kind == "O":
        for item in array.reshape(-1):
            digest.update(repr(item).encode())
    else:
        digest.update(array.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


def path_name(path: tuple[Any, ...]) -> str:
    """'a/b/0/kernel' from a pytree key path (dict keys, attributes and sequence indices).

    A Flax NNX variable flattens to its ``value`` leaf; that last component is dropped so
    rules and fingerprints name the parameter itself ('layers/0/c_fc/kernel').
    """
    if len(path) > 1 and getattr(path[-1], "name", getattr(path[-1], "key", None)) == "value":
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def hash_params(params: Any) -> str:
    """Content hash of a params pytree: paths, shapes, dtypes and values.

    Global arrays that this process cannot fully address hash their addressable shards
    (with their indices); pass ``params_fingerprint`` to ``score`` to override.
    """
    digest = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        digest.update(path_name(path).encode())
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            for shard in sorted(leaf.addressable_shards, key=lambda s: str(s.index)):
                digest.update(str(shard.index).encode())
                digest.update(hash_array(np.asarray(shard.data)).encode())
        else:
            digest.update(hash_array(np.asarray(leaf)).encode())
    return digest.hexdigest()


class ArraySource(RandomAccessSource):
    """Examples held as a dict of arrays (in memory or ``np.memmap``), first axis = examples.

    Args:
      arrays: field name -> array [N, ...]. Every field must have the same N >= 1.
      name: a label used in messages and in the run fingerprint.
      hash_content: fingerprint by content (default for in-memory arrays). For memmaps the
        fingerprint uses the file path, size and modification time instead of reading it all.
    """

    def __init__(self, arrays: Mapping[str, Any], *, name: str = "arrays",
                 hash_content: bool | None = None):
        if not isinstance(arrays, Mapping) or not arrays:
            raise InputError(
                f"source {name!r}: expected a non-empty dict of arrays (field -> [N, ...]), "
                f"got {type(arrays).__name__} {'(empty)' if not arrays else ''}".rstrip()
            )
        self.name = name
        self.arrays: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if not isinstance(key, str):
                raise InputError(f"source {name!r}: field names must be strings, got {key!r}")
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.ndim == 0:
                raise InputError(
                    f"source {name!r}: field {key!r} is a scalar; expected an array whose "
                    "first axis indexes examples"
                )
            self.arrays[key] = array
        lengths = {key: a.shape[0] for key, a in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(
                f"source {name!r}: fields have different numbers of examples {lengths}; "
                "expected the same first-axis length for every field"
            )
        self._n = next(iter(lengths.values()))
        if self._n == 0:
            raise InputError(f"source {name!r} is empty: expected at least one example")
        if hash_content is None:
            hash_content = not any(isinstance(a, np.memmap) for a in self.arrays.values())
        self._hash_content = hash_content

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: a[index] for key, a in self.arrays.items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.intp)  # np.asarray([]) is float64: not an index
        # Sorted contiguous runs read as one slice (fast for memmaps); otherwise fancy-index.
        # Only for runs inside [0, n): a slice would silently drop out-of-range rows and
        # turn negative runs such as [-2, -1] into the empty slice [-2:0].
        if indices.size and np.all(np.diff(indices) == 1):
            start, stop = int(indices[0]), int(indices[-1]) + 1
            if 0 <= start and stop <= self._n:
                return {key: np.asarray(a[start:stop]) for key, a in self.arrays.items()}
        return {key: np.asarray(a[indices]) for key, a in self.arrays.items()}

    def ids(self, indices: np.ndarray) -> np.ndarray:
        """Example ids of ``indices``: the ``id`` field if present, else the indices."""
        if ID_FIELD in self.arrays:
            return np.asarray(self.arrays[ID_FIELD][np.asarray(indices)])
        return np.asarray(indices, dtype=np.int64)

    def spec(self) -> dict[str, Any]:
        fields = {}
        for key, a in self.arrays.items():
            entry: dict[str, Any] = {"shape": list(a.shape), "dtype": a.dtype.str}
            if self._hash_content:
                entry["hash"] = hash_array(np.asarray(a))
            elif isinstance(a, np.memmap) and a.filename is not None:
                import os

                stat = os.stat(a.filename)
                entry["file"] = {"path": os.path.abspath(a.filename), "size": stat.st_size,
                                 "mtime_ns": stat.st_mtime_ns}
            fields[key] = entry
        return {"kind": "arrays", "name": self.name, "n": self._n, "fields": fields}


def numeric_fields(rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The fields a traced function can take: booleans and numbers, in the dtypes the device
    keeps (:func:`memjax._checks.to_device_dtype`, unless x64 is enabled: then float64
    stays float64); texts, names and the ``id`` field are dropped."""
    arrays = {k: np.asarray(v) for k, v in rows.items() if k != ID_FIELD}
    arrays = {k: v for k, v in arrays.items() if v.dtype.kind in "biuf"}
    if jax.config.jax_enable_x64:
        return arrays
    return {k: to_device_dtype(k, v) for k, v in arrays.items()}


def as_source(data: Any, *, name: str = "arrays") -> Source:
    """A :class:`Source` from a source or a plain dict of arrays; anything else is refused."""
    if isinstance(data, Mapping):
        return ArraySource(data, name=name)
    if isinstance(data, Source):
        if len(data) == 0:
            raise InputError(f"source {data!r} is empty: expected at least one example")
        return data
    raise InputError(
        f"data: expected a dict of arrays (field -> [N, ...]) or a memjax.data source with "
        f"__len__, read(indices) and spec(); got {type(data).__name__}"
    )


def example_ids(batch: Mapping[str, np.ndarray], indices: np.ndarray) -> np.ndarray:
    """Ids of the examples in a batch: the ``id`` field if present, else their indices."""
    if ID_FIELD in batch:
        return np.asarray(batch[ID_FIELD])
    return np.asarray(indices, dtype=np.int64)


def source_ids(source: Any, indices: np.ndarray) -> np.ndarray:
    """Ids of examples ``indices`` of a source: its ``ids(indices)`` method when it has one
    (array sources: no other field is read), else :func:`example_ids` of a full read."""
    ids = getattr(source, "ids", None)
    return np.asarray(ids(indices)) if callable(ids) else example_ids(source.read(indices),
                                                                      indices)


def integer_ids(ids: np.ndarray) -> np.ndarray:
    """Example ids as int32, for the device (keys of augmentations and noise draws).

    Integer ids are kept as they are (they must fit in int32); any other id (text) maps to
    a stable 31-bit hash of its string form, the same in every process and run.
    """
    ids = np.asarray(ids)
    if ids.dtype.kind in "iub":
        info = np.iinfo(np.int32)
        if ids.size and (ids.min() < info.min or ids.max() > info.max):
            raise InputError("example ids: integer ids outside the int32 range; expected ids "
                             "that fit in int32 (they key augmentations on the device)")
        return ids.astype(np.int32)
    digest = lambda v: int.from_bytes(
        hashlib.blake2b(str(v).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF
    return np.asarray([digest(v) for v in ids.tolist()], np.int32)


class SliceSource:
    """Examples ``[start, stop)`` of ``source``, keeping their ids (a source without an
    ``id`` field has ids = its row numbers, so row r of the slice reports ``start + r``).

    Methods that stream a long source chunk by chunk score one slice per engine call.
    """

    def __init__(self, source: Source, start: int, stop: int):
        if not 0 <= start <= stop <= len(source):
            raise InputError(f"slice [{start}, {stop}) of a source of {len(source)} examples")
        self.source, self.start, self.stop = source, int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def ids(self, indices: np.ndarray) -> np.ndarray:
        return source_ids(self.source, self.start + np.asarray(indices, np.int64))

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.start + np.asarray(indices, np.int64)
        fields = dict(self.source.read(rows))
        fields.setdefault(ID_FIELD, rows)
        return fields

    def spec(self) -> dict[str, Any]:
        return {"kind": "slice", "source": self.source.spec(), "start": self.start,
                "stop": self.stop}
