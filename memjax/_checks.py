"""Shared argument checks: every layer's "expected ..." messages come from here.

The bottom layer of the package (imports nothing from memjax but :mod:`memjax.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memjax.errors import InputError


def check_choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``, else an InputError naming ``name``."""
    if value not in options:
        raise InputError(f"{name}={value!r}: expected one of {list(options)}")
    return value


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


def device_dtype(dtype: Any) -> np.dtype:
    """The dtype JAX keeps a host array in without x64: 64-bit floats -> float32, 64-bit
    integers -> int32, everything else unchanged."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize > 4:
        return np.dtype(np.float32)
    if dtype.kind in "iu" and dtype.itemsize > 4:
        return np.dtype(np.int32)
    return dtype


def to_device_dtype(name: str, value: np.ndarray) -> np.ndarray:
    """``value`` cast by :func:`device_dtype`; integers outside int32 raise, naming ``name``."""
    target = device_dtype(value.dtype)
    if target == value.dtype:
        return value
    if target.kind == "i":
        info = np.iinfo(np.int32)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise InputError(f"{name}: integer values outside the int32 range; expected "
                             "values that fit in int32")
    return value.astype(target)
