"""Array-backed sources: ``.npy`` folders and ``.npz`` files, and the bundled digits."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from memjax.data._util import existing_path
from memjax.data.base import ArraySource
from memjax.errors import InputError


def _select(arrays: dict[str, np.ndarray], fields: Sequence[str] | None,
            where: str) -> dict[str, np.ndarray]:
    """The ``fields`` subset of ``arrays`` (all when None), in the order asked."""
    if fields is None:
        return arrays
    if isinstance(fields, str):
        fields = [fields]
    missing = [f for f in fields if f not in arrays]
    if missing:
        raise InputError(
            f"{where}: fields {missing} not found; available fields: {sorted(arrays)}"
        )
    return {f: arrays[f] for f in fields}


def memmap_source(path_or_dir: str | os.PathLike, *,
                  fields: Sequence[str] | None = None) -> ArraySource:
    """Arrays stored on disk as an :class:`ArraySource`.

    Args:
      path_or_dir: one of
        - a folder of ``.npy`` files, one per field (field name = file stem), each opened
          with ``np.load(mmap_mode="r")``: nothing is read until examples are, and the
          run fingerprint uses each file's path, size and modification time;
        - a single ``.npy`` file: one field named after its stem, memory-mapped;
        - a ``.npz`` file: loaded eagerly into memory (numpy cannot memory-map members of
          a zip archive), and fingerprinted by content.
      fields: the fields to keep (default: all), in this order.

    Every field's first axis indexes examples and must have the same length.
    """
    path = existing_path(path_or_dir, "memmap_source")
    name = os.path.basename(path.rstrip(os.sep))
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".npy"))
        if not files:
            raise InputError(
                f"memmap_source: folder {path} has no .npy files; expected one .npy file "
                "per field (for a folder of images use images:FOLDER / ImageFolderSource)"
            )
        files_by_field = {f[: -len(".npy")]: os.path.join(path, f) for f in files}
        selected = _select(dict(files_by_field), fields, f"memmap_source({path})")
        arrays = {key: _load_npy(file) for key, file in selected.items()}
    elif path.endswith(".npy"):
        stem = os.path.basename(path)[: -len(".npy")]
        arrays = _select({stem: _load_npy(path)}, fields, f"memmap_source({path})")
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = _select({k: k for k in archive.files}, fields, f"memmap_source({path})")
                arrays = {key: archive[key] for key in keys}
        except InputError:
            raise
        except Exception as error:  # zipfile.BadZipFile, ValueError, OSError...
            raise InputError(f"memmap_source: cannot read {path} as .npz: {error}") from None
    else:
        raise InputError(
            f"memmap_source: {path} is neither a folder of .npy files, a .npy nor a .npz file"
        )
    return ArraySource(arrays, name=name)


def _load_npy(path: str) -> np.ndarray:
    """One ``.npy`` file, memory-mapped read-only; InputError naming it if unreadable."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # ValueError (bad header, object arrays), OSError
        raise InputError(f"memmap_source: cannot read {path} as .npy: {error}") from None


def digits() -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (1797 examples, no download).

    Fields: ``image`` float32 [1797, 8, 8, 1] in [0, 1] (pixel / 16), ``label`` int32 in
    0..9, ``id`` int64 = 0..1796.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0)[..., None]
    return ArraySource(
        {
            "image": images,
            "label": np.asarray(data.target, dtype=np.int32),
            "id": np.arange(images.shape[0], dtype=np.int64),
        },
        name="digits",
    )
