"""Score functions as values: compile-cache keys that compare functions by what they compute.

The engine caches compiled programs. Keying them by function *identity* recompiles every
time a caller builds a fresh closure with the same settings (a builder called twice, a
user's ``lambda`` in a loop), which pushed every method module into ``lru_cache``-wrapped
builders. Here a function is keyed by *value*, like big_vision's cacheable partial and
equinox's ``filter_jit``:

- a plain Python function by its code object, its globals, defaults and the values in its
  closure cells (recursively);
- a ``functools.partial`` by its function, arguments and keywords;
- a bound method by its function and its object;
- arrays (NumPy or fully addressable JAX) by shape, dtype and a content hash;
- hashable objects (frozen dataclasses, NNX graph definitions, strings, numbers) by
  themselves, with their type (so ``1``, ``1.0`` and ``True`` differ);
- anything else by identity (the key holds a reference, so the identity stays valid).

Two functions with equal keys compute the same thing on the same inputs, so they can share
a compiled executable. What a function reads from module globals is not part of the key
(as with identity caching).
"""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from memjax.data.base import hash_array

_MAX_DEPTH = 12


class _Identity:
    """Compares by ``is``; holds the object so its id is never reused while cached."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _array_key(value: Any) -> tuple:
    array = np.asarray(value)
    return ("array", array.shape, str(array.dtype), hash_array(array))


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: a name bound later in the enclosing scope
        return _EMPTY


_EMPTY = object()


def value_key(value: Any, _depth: int = 0) -> Any:
    """A hashable key equal for values that compute alike (see the module docstring)."""
    if _depth > _MAX_DEPTH:
        return _Identity(value)
    deeper = functools.partial(value_key, _depth=_depth + 1)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(deeper(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((deeper(k), deeper(v)) for k, v in value.items()))
    if isinstance(value, (np.ndarray, np.generic)):
        return _array_key(value)
    if isinstance(value, jax.Array):
        if isinstance(value, jax.core.Tracer) or not value.is_fully_addressable:
            return _Identity(value)
        return _array_key(value)
    if isinstance(value, functools.partial):
        return ("partial", deeper(value.func), deeper(value.args), deeper(value.keywords))
    if isinstance(value, types.MethodType):
        return ("method", deeper(value.__func__), deeper(value.__self__))
    if isinstance(value, types.FunctionType):
        closure = tuple(deeper(_cell_value(c)) for c in value.__closure__ or ())
        return ("function", value.__code__, _Identity(value.__globals__),
                deeper(value.__defaults__), deeper(value.__kwdefaults__), closure)
    try:
        hash(value)
    except TypeError:
        return _Identity(value)
    return (type(value), value)


# --------------------------------------------------------------------------- jit cache

_JITTED: collections.OrderedDict[Any, Callable] = collections.OrderedDict()
_MAX_JITTED = 64


def cached_jit(fn: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn, **jit_kwargs)``, shared by every ``fn`` of equal :func:`value_key`.

    For the programs a method runs outside :func:`memjax.engine.score` (e.g. Forward-INF's
    updates on the test examples): a re-created closure with the same settings reuses the
    first one's jitted function and so its compiled executables.
    """
    key = (value_key(fn), value_key(jit_kwargs))
    if key in _JITTED:
        _JITTED.move_to_end(key)
        return _JITTED[key]
    jitted = jax.jit(fn, **jit_kwargs)
    _JITTED[key] = jitted
    if len(_JITTED) > _MAX_JITTED:
        _JITTED.popitem(last=False)
    return jitted
