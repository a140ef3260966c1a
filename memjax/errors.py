"""Errors that memjax raises for bad input.

Every user-facing entry point raises a subclass of :class:`MemjaxError` with a message
that names the offending input and what was expected. The CLI prints these messages
without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MemjaxError(ValueError):
    """Base class of the errors a user can cause and fix (bad input, bad configuration)."""


class InputError(MemjaxError):
    """An input (array, file, argument) does not have the shape, type or values expected."""


class StoreError(MemjaxError):
    """A score store cannot be used as asked (different configuration, incomplete, corrupt)."""


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1 (Python or NumPy integer, not bool), or an InputError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_float_array(x: Any, name: str, *, ndim: int, shape_doc: str,
                      integers: bool = False) -> np.ndarray:
    """``x`` as a numpy array, checked to be a non-empty, finite ``ndim``-D array of reals.

    Args:
      x: the input (anything ``np.asarray`` takes).
      name: the input's name, which every message starts with.
      ndim: the number of dimensions expected.
      shape_doc: the expected shape as written in messages, e.g. ``"[N, D]"``.
      integers: also accept integer dtypes (default: floating dtypes only).

    Returns:
      ``np.asarray(x)``, dtype unchanged.

    Raises:
      InputError: on another number of dimensions, an empty axis, another dtype, or NaN/Inf.
    """
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D {shape_doc}, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} must be non-empty {shape_doc}, got shape {arr.shape}")
    if arr.dtype.kind not in ("fiu" if integers else "f"):
        kinds = "an integer or floating" if integers else "a floating"
        raise InputError(f"{name} must have {kinds} dtype, got {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"{name} has {int(bad.sum())} NaN/Inf values; expected finite numbers")
    return arr
