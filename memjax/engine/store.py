"""Resumable on-disk score store: fixed-size chunks plus a manifest.

Layout of a store folder::

    manifest.json            format version, run fingerprint, n_examples, chunk_size,
                             fields (shape per example, dtype), complete flag
    chunks/000012.npz        the scores of examples [12*chunk_size, 13*chunk_size)
    chunks/000012.json       written after the chunk: rows and the chunk file's sha256
    lock                     held (flock) by the run writing the store

Every file is written atomically: to a temporary file in the same folder, flushed and
fsynced, renamed over its final name, and the folder fsynced. A chunk counts as done only
if its record exists, the chunk file's size and sha256 match the record, so a truncated or
corrupt chunk is recomputed. A store made by a run with another fingerprint is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memjax._io import atomic_write_bytes, atomic_write_json, umask_mode
from memjax.engine.fingerprint import fingerprint_diff, fingerprint_hash
from memjax.errors import StoreError

FORMAT_VERSION = 1
ID_COLUMN = "id"
DEFAULT_CHUNK_EXAMPLES = 8192


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_chunk_size(batch_size: int) -> int:
    """The smallest multiple of ``batch_size`` holding at least 8192 examples."""
    return batch_size * max(1, -(-DEFAULT_CHUNK_EXAMPLES // batch_size))


class ScoreStore:
    """A chunked, resumable store of per-example scores (see module docstring).

    Args:
      path: the store folder (created on first use).
      chunk_size: examples per chunk; must be a multiple of the run's batch size. Default:
        the smallest multiple of the batch size holding >= 8192 examples. A resumed store
        keeps the chunk size it was made with.
    """

    def __init__(self, path: str | os.PathLike, *, chunk_size: int | None = None):
        self.path = Path(path)
        self.requested_chunk_size = chunk_size
        self._lock_file = None

    # ---- manifest -------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def chunk_dir(self) -> Path:
        return self.path / "chunks"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(f"score store {str(self.path)!r}: no manifest.json; expected a "
                             "folder written by memjax score")
        try:
            return json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"score store {str(self.path)!r}: manifest.json is not valid "
                             f"JSON ({err})") from None

    @property
    def complete(self) -> bool:
        return self.exists() and bool(self.manifest().get("complete"))

    @property
    def n_chunks(self) -> int:
        m = self.manifest()
        return -(-m["n_examples"] // m["chunk_size"])

    def chunk_rows(self, index: int, manifest: dict[str, Any] | None = None) -> int:
        m = manifest or self.manifest()
        return min(m["chunk_size"], m["n_examples"] - index * m["chunk_size"])

    # ---- writing (used by the engine) ----------------------------------------------
    def begin(self, fingerprint: dict[str, Any], n_examples: int, batch_size: int) -> set[int]:
        """Create the store or check it matches ``fingerprint``; return the done chunks."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"score store {str(self.path)!r} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.chunk_dir.mkdir(exist_ok=True)
        self._acquire_lock()
        try:
            return self._begin_locked(fingerprint, n_examples, batch_size)
        except BaseException:
            # A refused (or failed) start must not keep the lock: the corrected rerun, in
            # this process or another, has to be able to open the store.
            self.release()
            raise

    def _begin_locked(self, fingerprint: dict[str, Any], n_examples: int,
                      batch_size: int) -> set[int]:
        self._remove_temporaries()
        if self.exists():
            manifest = self.manifest()
            diffs = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
            if diffs or manifest.get("n_examples") != n_examples:
                raise StoreError(
                    f"score store {str(self.path)!r} was made by a different run "
                    f"(differs in: {', '.join(diffs) or 'n_examples'}); refusing to mix "
                    "scores. Use a new store path, or delete this one to start over."
                )
            if manifest["chunk_size"] % batch_size:
                raise StoreError(
                    f"score store {str(self.path)!r}: chunk_size {manifest['chunk_size']} is "
                    f"not a multiple of batch_size {batch_size}"
                )
            return self.done_chunks()
        chunk_size = self.requested_chunk_size or default_chunk_size(batch_size)
        if chunk_size < 1 or chunk_size % batch_size:
            raise StoreError(f"chunk_size={chunk_size}: expected a positive multiple of "
                             f"batch_size={batch_size}")
        atomic_write_json(self.manifest_path, {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "n_examples": int(n_examples),
            "chunk_size": int(chunk_size),
            "fields": None,
            "complete": False,
        })
        return set()

    def write_chunk(self, index: int, ids: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        """Atomically write chunk ``index`` (ids [n], each field [n, ...]) and its record."""
        rows = self.chunk_rows(index)
        for name, value in {ID_COLUMN: ids, **fields}.items():
            if len(value) != rows:
                raise StoreError(f"chunk {index}: field {name!r} has {len(value)} rows, "
                                 f"expected {rows}")
        buffer = io.BytesIO()
        np.savez(buffer, **{ID_COLUMN: ids}, **{f"f:{k}": v for k, v in fields.items()})
        data = buffer.getvalue()
        atomic_write_bytes(self._chunk_file(index), data)
        atomic_write_json(self._record_file(index), {
            "rows": rows, "bytes": len(data), "sha256": _sha256(data),
            "fields": {k: {"shape": list(v.shape[1:]), "dtype": v.dtype.str}
                       for k, v in fields.items()},
        })

    def finish(self) -> None:
        """Mark the store complete once every chunk is done and verified."""
        done = self.done_chunks()
        missing = sorted(set(range(self.n_chunks)) - done)
        if missing:
            raise StoreError(f"score store {str(self.path)!r}: chunks {missing[:10]} are "
                             "missing or corrupt; cannot mark complete")
        manifest = self.manifest()
        record = json.loads(self._record_file(0).read_text())
        manifest["fields"] = record["fields"]
        manifest["complete"] = True
        atomic_write_json(self.manifest_path, manifest)
        self.release()

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ---- verification --------------------------------------------------------------
    def _chunk_file(self, index: int) -> Path:
        return self.chunk_dir / f"{index:06d}.npz"

    def _record_file(self, index: int) -> Path:
        return self.chunk_dir / f"{index:06d}.json"

    def _verified_bytes(self, index: int, manifest: dict[str, Any]) -> bytes | None:
        """The chunk file's bytes iff its record exists and matches them, else None."""
        try:
            record = json.loads(self._record_file(index).read_text())
            data = self._chunk_file(index).read_bytes()
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        valid = (record.get("rows") == self.chunk_rows(index, manifest)
                 and len(data) == record["bytes"] and _sha256(data) == record["sha256"])
        return data if valid else None

    def chunk_is_valid(self, index: int) -> bool:
        """True iff the chunk's record exists and its file matches it byte for byte."""
        return self._verified_bytes(index, self.manifest()) is not None

    def done_chunks(self) -> set[int]:
        manifest = self.manifest()
        return {i for i in range(self.n_chunks)
                if self._verified_bytes(i, manifest) is not None}

    def _remove_temporaries(self) -> None:
        for folder in (self.path, self.chunk_dir):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        if self._lock_file is not None:
            return
        lock = open(self.path / "lock", "a+")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreError(f"score store {str(self.path)!r} is being written by another "
                             "process") from None
        self._lock_file = lock

    # ---- reading -------------------------------------------------------------------
    def _require_complete(self) -> None:
        manifest = self.manifest()
        if not manifest.get("complete"):
            done = len(self.done_chunks())
            raise StoreError(
                f"score store {str(self.path)!r} is incomplete ({done}/{self.n_chunks} chunks "
                "done); resume the run (memjax score --resume) before reading it"
            )

    def iter_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Verified chunks of a complete store in example order: {'id': ..., field: ...}."""
        self._require_complete()
        manifest = self.manifest()
        for index in range(self.n_chunks):
            data = self._verified_bytes(index, manifest)  # read once: checked, then parsed
            if data is None:
                raise StoreError(f"score store {str(self.path)!r}: chunk {index} is missing "
                                 "or corrupt; rerun with --resume to recompute it")
            with np.load(io.BytesIO(data)) as npz:
                yield {(k[2:] if k.startswith("f:") else k): npz[k] for k in npz.files}

    def read(self) -> dict[str, np.ndarray]:
        """All scores of a complete store: {'id': [N], field: [N, ...]}."""
        chunks = list(self.iter_chunks())
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def info(self) -> dict[str, Any]:
        manifest = self.manifest()
        return {
            "path": str(self.path),
            "n_examples": manifest["n_examples"],
            "chunk_size": manifest["chunk_size"],
            "chunks_done": len(self.done_chunks()),
            "n_chunks": self.n_chunks,
            "complete": bool(manifest.get("complete")),
            "fields": manifest.get("fields"),
            "function": manifest["fingerprint"]["function"].get("name")
            or manifest["fingerprint"]["function"],
            "data": manifest["fingerprint"]["data"].get("name")
            or manifest["fingerprint"]["data"].get("kind"),
            "batch_size": manifest["fingerprint"]["batch_size"],
        }

    # ---- export --------------------------------------------------------------------
    def to_arrow_table(self):
        import pyarrow as pa

        return pa.Table.from_batches([_chunk_to_arrow(c) for c in self.iter_chunks()])

    def to_pandas(self):
        """A pandas DataFrame, one row per example; per-example arrays become list cells."""
        return self.to_arrow_table().to_pandas()

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the scores to a Parquet file (streamed chunk by chunk, renamed at the end)."""
        return write_parquet(self.iter_chunks(), path)


def write_parquet(chunks: Iterable[dict[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """Write column chunks ({name: [n, ...]}) to one Parquet file, atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_mode())
    os.close(fd)
    writer = None
    try:
        for chunk in chunks:
            batch = _chunk_to_arrow(chunk)
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema)
            writer.write_batch(batch)
        if writer is None:
            raise StoreError(f"{str(path)!r}: nothing to write")
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _chunk_to_arrow(chunk: dict[str, np.ndarray]):
    """A pyarrow RecordBatch; fields with per-example shape become fixed-size lists."""
    import pyarrow as pa

    columns, names, metadata = [], [], {}
    for name, value in chunk.items():
        if value.ndim == 1:
            columns.append(pa.array(value))
        else:
            flat = pa.array(np.ascontiguousarray(value).reshape(-1))
            columns.append(pa.FixedSizeListArray.from_arrays(flat, int(np.prod(value.shape[1:]))))
            metadata[f"shape:{name}"] = json.dumps(list(value.shape[1:]))
        names.append(name)
    schema = pa.schema([pa.field(n, c.type) for n, c in zip(names, columns, strict=True)],
                       metadata=metadata or None)
    return pa.RecordBatch.from_arrays(columns, schema=schema)
