"""Resumable on-disk score store: fixed-size chunks plus a manifest.

Layout of a store folder::

    manifest.json            format version, run fingerprint, n_examples, chunk_size,
                             fields (shape per example, dtype), complete flag
    chunks/000012.npz        the scores of examples [12*chunk_size, 13*chunk_size)
    chunks/000012.json       written after the chunk: rows and the chunk file's size and
                             sha256
    lock                     held (flock) by the run writing the store

Every file is written atomically: to a temporary file in the same folder, flushed and
fsynced, renamed over its final name, and the folder fsynced. A chunk counts as done only
if its record exists and the chunk file's size and sha256 match the record, so a truncated
or corrupt chunk is recomputed by the next run (``memjax score --resume``), reported by
:meth:`ScoreStore.info` (state ``corrupt``, naming the chunks) and refused by
:meth:`ScoreStore.read`.

A store holding finished chunks made by a run with another fingerprint is refused; one
holding none (a run that failed or was killed before its first chunk) has nothing to mix
and is replaced, and ``overwrite=True`` replaces any store. A run that fails before its
first chunk removes the store it started (:meth:`ScoreStore.discard_if_empty`), so the
corrected rerun starts clean; one that fails later keeps its chunks for a resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memjax._io import atomic_write_bytes, atomic_write_json, umask_mode
from memjax.engine.fingerprint import fingerprint_diff, fingerprint_hash, function_name
from memjax.errors import InputError, StoreError

FORMAT_VERSION = 1
ID_COLUMN = "id"
DEFAULT_CHUNK_EXAMPLES = 8192
MANIFEST_FILE = "manifest.json"
CHUNK_DIR = "chunks"
LOCK_FILE = "lock"
#: What a store folder holds besides temporary files (``.*.tmp``).
STORE_ENTRIES = (MANIFEST_FILE, CHUNK_DIR, LOCK_FILE)
#: How :meth:`ScoreStore.info` tells the user to repair a store.
RESUME_HINT = ("rerun the same memjax score command with --resume: it recomputes the "
               "chunks that fail verification")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_chunk_size(batch_size: int) -> int:
    """The smallest multiple of ``batch_size`` holding at least 8192 examples."""
    return batch_size * max(1, -(-DEFAULT_CHUNK_EXAMPLES // batch_size))


def _chunk_list(indices: list[int], limit: int = 10) -> str:
    """'3, 5' or '0, 1, ..., 9 and 40 more'."""
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _make_folders(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the ones created, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    return missing


class ScoreStore:
    """A chunked, resumable store of per-example scores (see module docstring).

    Args:
      path: the store folder (created on first use).
      chunk_size: examples per chunk; must be a multiple of the run's batch size. Default:
        the smallest multiple of the batch size holding >= 8192 examples. A resumed store
        keeps the chunk size it was made with.
      overwrite: replace a store already at ``path`` (its scores are deleted when the run
        starts) instead of resuming it or refusing it.
    """

    def __init__(self, path: str | os.PathLike, *, chunk_size: int | None = None,
                 overwrite: bool = False):
        self.path = Path(path)
        self.requested_chunk_size = chunk_size
        self.overwrite = bool(overwrite)
        self._lock_file = None
        self._created: list[Path] = []  # folders this run created, deepest first
        self._holds_scores = False  # a verified chunk was found or written by this run
        self._started = False  # begin() accepted the store (resumed it or wrote a manifest)

    # ---- manifest -------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def chunk_dir(self) -> Path:
        return self.path / CHUNK_DIR

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(f"score store {str(self.path)!r}: no manifest.json; expected a "
                             "folder written by memjax score")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"score store {str(self.path)!r}: manifest.json is not valid "
                             f"JSON ({err})") from None
        except OSError as err:
            raise StoreError(f"score store {str(self.path)!r}: cannot read manifest.json "
                             f"({err.strerror})") from None
        self._check_manifest(manifest)
        return manifest

    def _check_manifest(self, manifest: Any) -> None:
        where = f"score store {str(self.path)!r}: manifest.json"
        if not isinstance(manifest, dict):
            raise StoreError(f"{where} holds a {type(manifest).__name__}; expected the JSON "
                             "object memjax score writes")
        version = manifest.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise StoreError(f"{where} has format version {version}; this memjax reads "
                             f"version {FORMAT_VERSION}: upgrade memjax")
        expected = {"format_version": int, "fingerprint": dict, "n_examples": int,
                    "chunk_size": int}
        wrong = [key for key, kind in expected.items()
                 if not isinstance(manifest.get(key), kind) or isinstance(manifest[key], bool)]
        if wrong or manifest["n_examples"] < 0 or manifest["chunk_size"] < 1:
            raise StoreError(f"{where} is not a score store manifest (bad or missing "
                             f"{wrong or ['n_examples', 'chunk_size']}); expected a folder "
                             "written by memjax score")

    @property
    def complete(self) -> bool:
        """Whether the run that made the store finished (its manifest says so); whether
        every chunk is still intact is :meth:`info`'s ``state``."""
        return self.exists() and bool(self.manifest().get("complete"))

    @property
    def n_chunks(self) -> int:
        m = self.manifest()
        return -(-m["n_examples"] // m["chunk_size"])

    def chunk_rows(self, index: int, manifest: dict[str, Any] | None = None) -> int:
        m = manifest or self.manifest()
        return min(m["chunk_size"], m["n_examples"] - index * m["chunk_size"])

    def other_files(self) -> list[str]:
        """Names in the store folder that no store writes (sorted); [] if no folder."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in STORE_ENTRIES and not p.name.endswith(".tmp"))

    # ---- writing (used by the engine) ----------------------------------------------
    def begin(self, fingerprint: dict[str, Any], n_examples: int, batch_size: int) -> set[int]:
        """Create the store or check it matches ``fingerprint``; return the done chunks.

        A failed start (refused, or the folder cannot be written) leaves no store behind
        that was not there before, and does not keep the lock."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"score store {str(self.path)!r} exists and is not a folder; "
                             "expected a store folder (or a path where one can be made)")
        self._started = self._holds_scores = False  # this run's, even on a reused object
        try:
            self._created = _make_folders(self.path)
            self.chunk_dir.mkdir(exist_ok=True)
            self._acquire_lock()
            return self._begin_locked(fingerprint, n_examples, batch_size)
        except OSError as err:
            self.discard_if_empty()
            raise StoreError(f"score store {str(self.path)!r}: cannot write there "
                             f"({err.strerror}: {err.filename})") from None
        except BaseException:
            # A refused (or failed) start must not keep the lock: the corrected rerun, in
            # this process or another, has to be able to open the store.
            self.discard_if_empty()
            raise

    def _begin_locked(self, fingerprint: dict[str, Any], n_examples: int,
                      batch_size: int) -> set[int]:
        self._remove_temporaries()
        if self.exists() and not self.overwrite:
            manifest = self.manifest()
            done = self.done_chunks()
            self._holds_scores = bool(done)  # a refused start must not discard them
            diffs = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
            if diffs or manifest.get("n_examples") != n_examples:
                if done:
                    raise StoreError(
                        f"score store {str(self.path)!r} was made by a different run "
                        f"(differs in: {', '.join(diffs) or 'n_examples'}); refusing to mix "
                        f"scores ({len(done)}/{self.n_chunks} chunks done). Resume it with "
                        "the same model, data and options, replace it (memjax score "
                        "--overwrite, ScoreStore(..., overwrite=True)), or use a new store "
                        "path."
                    )
                # No finished chunk: nothing to mix. Start over below.
            elif manifest["chunk_size"] % batch_size:
                raise StoreError(
                    f"score store {str(self.path)!r}: chunk_size {manifest['chunk_size']} is "
                    f"not a multiple of batch_size {batch_size}"
                )
            else:
                self._started = True
                return done
        chunk_size = self.requested_chunk_size or default_chunk_size(batch_size)
        if chunk_size < 1 or chunk_size % batch_size:
            raise StoreError(f"chunk_size={chunk_size}: expected a positive multiple of "
                             f"batch_size={batch_size}")
        self._clear()
        atomic_write_json(self.manifest_path, {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "n_examples": int(n_examples),
            "chunk_size": int(chunk_size),
            "fields": None,
            "complete": False,
        })
        self._started = True
        return set()

    def _clear(self) -> None:
        """Delete the store's manifest and chunks (the manifest first: a half-cleared store
        is no store). Other files in the folder are left alone."""
        self.manifest_path.unlink(missing_ok=True)
        if self.chunk_dir.is_dir():
            for file in self.chunk_dir.iterdir():
                if file.suffix in (".npz", ".json", ".tmp") and file.is_file():
                    file.unlink(missing_ok=True)

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
        self._holds_scores = True

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

    def discard_if_empty(self) -> bool:
        """After a failed run: if the store holds no finished chunk, delete it (manifest,
        chunk folder, lock) and the folders this run created, and return True. A folder
        that was there before stays (empty, if it was empty). Only the run holding the
        lock (the one that called :meth:`begin`) discards; the lock is released either way.
        """
        if self._lock_file is None:
            return False
        if self._holds_scores or (not self._started and self.exists()):
            self.release()  # scores to resume, or a store this run refused: untouched
            return False
        self._clear()
        with contextlib.suppress(OSError):
            self.chunk_dir.rmdir()
        lock = self.path / LOCK_FILE
        self.release()
        lock.unlink(missing_ok=True)
        for folder in self._created:  # deepest first; only if nothing else is in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []
        return True

    # ---- verification --------------------------------------------------------------
    def _chunk_file(self, index: int) -> Path:
        return self.chunk_dir / f"{index:06d}.npz"

    def _record_file(self, index: int) -> Path:
        return self.chunk_dir / f"{index:06d}.json"

    def _read_chunk(self, index: int, manifest: dict[str, Any]) -> tuple[str, bytes | None]:
        """(state, bytes): ("done", the chunk file's bytes) iff its record exists and
        matches them; ("missing", None) when the chunk has no record (not written yet);
        ("corrupt", None) when a record exists but the file is gone, truncated or altered
        (or the record itself is unreadable)."""
        try:
            text = self._record_file(index).read_text()
        except FileNotFoundError:
            return "missing", None
        except (OSError, UnicodeDecodeError):
            return "corrupt", None
        try:
            record = json.loads(text)
            data = self._chunk_file(index).read_bytes()
            valid = (record.get("rows") == self.chunk_rows(index, manifest)
                     and len(data) == record["bytes"] and _sha256(data) == record["sha256"])
        except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
            return "corrupt", None
        return ("done", data) if valid else ("corrupt", None)

    def _verified_bytes(self, index: int, manifest: dict[str, Any]) -> bytes | None:
        """The chunk file's bytes iff its record exists and matches them, else None."""
        return self._read_chunk(index, manifest)[1]

    def chunk_is_valid(self, index: int) -> bool:
        """True iff the chunk's record exists and its file matches it byte for byte."""
        return self._verified_bytes(index, self.manifest()) is not None

    def chunk_states(self) -> dict[str, list[int]]:
        """Every chunk verified: {"done": [...], "missing": [...], "corrupt": [...]}.

        In a complete store every chunk was written and verified, so a missing one is
        reported as corrupt (its files were deleted since)."""
        manifest = self.manifest()
        states: dict[str, list[int]] = {"done": [], "missing": [], "corrupt": []}
        for index in range(self.n_chunks):
            states[self._read_chunk(index, manifest)[0]].append(index)
        if manifest.get("complete"):
            states["corrupt"] = sorted(states["corrupt"] + states["missing"])
            states["missing"] = []
        return states

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
        lock = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the run
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

    def _corrupt_error(self) -> StoreError:
        bad = self.chunk_states()["corrupt"]
        return StoreError(f"score store {str(self.path)!r} is corrupt: chunk"
                          f"{'s' if len(bad) != 1 else ''} {_chunk_list(bad)} "
                          f"{'are' if len(bad) != 1 else 'is'} missing or corrupt (size or "
                          f"sha256 differ from the record); {RESUME_HINT}")

    def iter_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Verified chunks of a complete store in example order: {'id': ..., field: ...}.

        Raises StoreError naming every corrupt chunk at the first one met."""
        self._require_complete()
        manifest = self.manifest()
        for index in range(self.n_chunks):
            data = self._verified_bytes(index, manifest)  # read once: checked, then parsed
            if data is None:
                raise self._corrupt_error()
            try:
                with np.load(io.BytesIO(data)) as npz:
                    yield {(k[2:] if k.startswith("f:") else k): npz[k] for k in npz.files}
            except (ValueError, OSError, zipfile.BadZipFile) as err:
                # The record matches the bytes, but they are no chunk: written by hand?
                raise StoreError(f"score store {str(self.path)!r}: chunk {index} matches its "
                                 f"record but is not a score chunk ({err}); "
                                 f"{RESUME_HINT}") from None

    def read(self) -> dict[str, np.ndarray]:
        """All scores of a complete store: {'id': [N], field: [N, ...]}."""
        chunks = list(self.iter_chunks())
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def info(self) -> dict[str, Any]:
        """What the store holds, with every chunk verified.

        ``state``: ``"complete"`` (finished, every chunk intact), ``"incomplete"`` (the run
        has not finished: resume it) or ``"corrupt"`` (chunks ``corrupt_chunks`` fail
        verification: a resume recomputes them); ``complete`` is ``state == "complete"``.
        """
        manifest = self.manifest()
        states = self.chunk_states()
        if states["corrupt"]:
            state = "corrupt"
        else:
            state = "complete" if manifest.get("complete") else "incomplete"
        fingerprint = manifest["fingerprint"]
        function = fingerprint.get("function")
        data = fingerprint.get("data")
        return {
            "path": str(self.path),
            "state": state,
            "complete": state == "complete",
            "n_examples": manifest["n_examples"],
            "chunk_size": manifest["chunk_size"],
            "chunks_done": len(states["done"]),
            "n_chunks": self.n_chunks,
            "corrupt_chunks": states["corrupt"],
            "missing_chunks": states["missing"],
            "fields": manifest.get("fields"),
            "function": function_name(function) if isinstance(function, dict) else function,
            "data": (data.get("name") or data.get("kind")) if isinstance(data, dict) else data,
            "batch_size": fingerprint.get("batch_size"),
        }

    # ---- export --------------------------------------------------------------------
    def to_arrow_table(self):
        import pyarrow as pa

        return pa.Table.from_batches([_chunk_to_arrow(c) for c in self.iter_chunks()])

    def to_pandas(self):
        """A pandas DataFrame, one row per example; per-example arrays become list cells."""
        return self.to_arrow_table().to_pandas()

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the scores to a Parquet file (streamed chunk by chunk, renamed at the end).

        ``path`` must end in ``.parquet`` (the one export format)."""
        path = Path(path)
        if path.suffix.lower() != ".parquet":
            raise InputError(f"{str(path)!r}: expected a file name ending in .parquet "
                             "(Parquet is the only format a store exports to)")
        return write_parquet(self.iter_chunks(), path)


def write_parquet(chunks: Iterable[dict[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """Write column chunks ({name: [n, ...]}) to one Parquet file, atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder; expected a .parquet file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"{str(path)!r}: cannot write a file there ({err.strerror}: "
                         f"{err.filename})") from None
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
