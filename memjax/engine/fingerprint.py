"""Run fingerprints: what makes two scoring runs produce the same scores.

A score store records the fingerprint of the run that made it; resuming with a different
fingerprint is refused. The fingerprint covers the score function (qualified name, source
code, partial arguments and simple closure values), the parameters (a content hash), the
data (the source's ``spec()``) and the batch size. The device count is not part of it:
scores agree across device and process counts (tested to 1e-6).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from typing import Any

import jax
import numpy as np

from memjax.data.base import hash_array, hash_params, path_name  # noqa: F401 - re-exported


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def describe_value(value: Any) -> Any:
    """A JSON-able, content-based description of a closure or partial argument."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (np.ndarray, np.generic)) or (
        isinstance(value, jax.Array) and value.is_fully_addressable
    ):
        return {"array": hash_array(np.asarray(value))}
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    if callable(value):
        return describe_function(value)
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}"}


def describe_function(fn: Any) -> dict[str, Any]:
    """Name, source hash and bound arguments of a score function (partials unwrapped)."""
    if isinstance(fn, functools.partial):
        return {
            "partial": describe_function(fn.func),
            "args": [describe_value(a) for a in fn.args],
            "keywords": {k: describe_value(v) for k, v in sorted(fn.keywords.items())},
        }
    target = inspect.unwrap(fn) if callable(fn) else fn
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    try:
        source = _digest(inspect.getsource(target))
    except (OSError, TypeError):
        source = None
    description: dict[str, Any] = {"name": name, "source": source}
    closure = getattr(target, "__closure__", None)
    code = getattr(target, "__code__", None)
    if closure and code is not None:
        description["closure"] = {
            var: describe_value(cell.cell_contents)
            for var, cell in zip(code.co_freevars, closure, strict=True)
            if var != target.__name__  # a recursive function's own cell
        }
    return description


def run_fingerprint(fn: Any, params: Any, data_spec: dict[str, Any], batch_size: int,
                    params_fingerprint: str | None = None) -> dict[str, Any]:
    """The fingerprint dict recorded in a store's manifest."""
    return {
        "function": describe_function(fn),
        "params": params_fingerprint or hash_params(params),
        "data": data_spec,
        "batch_size": int(batch_size),
    }


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return _digest(json.dumps(fingerprint, sort_keys=True, default=str))


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(fingerprint_diff(a, b, where + "."))
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True,
                                                                      default=str):
            diffs.append(where)
    return diffs
