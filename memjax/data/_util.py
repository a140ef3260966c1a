"""Small helpers shared by the file-backed sources."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from memjax.errors import InputError


def check_index(index: Any, n: int, name: str) -> int:
    """A Python int in [0, n) from ``index`` (negative counts from the end, like a list).

    Out of range raises ``IndexError`` (not InputError): the sequence protocol, and so
    grain and plain ``for`` loops, rely on it.
    """
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise InputError(f"{name}: index must be an integer, got {index!r}") from None
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{name}: index {index} out of range for {n} examples")
    return i


def existing_path(path: Any, what: str) -> str:
    """The absolute path of ``path``, or InputError naming it when it does not exist."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise InputError(f"{what}: no such file or folder: {path}")
    return path


def file_stat(path: str) -> dict[str, Any]:
    """Path, size and modification time: a cheap fingerprint of a file."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def hash_json(value: Any) -> str:
    """Hash of a JSON-serialisable value (canonical key order)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def text_scalar(value: str) -> np.ndarray:
    """A 0-d object array holding a string, so stacking gives an object array [n].

    Object arrays keep variable-length text without padding every row to the longest
    string (which a fixed-width ``<U`` array would do, at 4 bytes per character).
    """
    out = np.empty((), dtype=object)
    out[()] = value
    return out
