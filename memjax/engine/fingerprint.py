"""Run fingerprints: what makes two scoring runs produce the same scores.

A score store records the fingerprint of the run that made it; resuming with a different
fingerprint is refused. The fingerprint covers the score function (qualified name, source
code, partial arguments and simple closure values; for a callable dataclass such as
``memjax.signals.signal_function``'s, its class and every field), the parameters (a
content hash), the data (the source's ``spec()``) and the batch size. The device count is
not part of it: scores agree across device and process counts (tested to 1e-6).

Everything is described by content, never by where it was loaded from: a value without a
content description of its own (e.g. an NNX ``GraphDef``) is described by its type and a
hash of its ``repr`` when that ``repr`` holds no memory address (which would differ
between runs), else by its type alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import re
from typing import Any

import jax
import numpy as np

from memjax.data.base import hash_array, hash_params, path_name  # noqa: F401 - re-exported

# "<function f at 0x7f...>": a repr that changes from run to run describes nothing.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _source_digest(obj: Any) -> str | None:
    try:
        return _digest(inspect.getsource(obj))
    except (OSError, TypeError):
        return None


def describe_value(value: Any) -> Any:
    """A JSON-able, content-based description of a closure or partial argument."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return {"array": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return {"array": hash_array(np.asarray(value))}
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    own = getattr(value, "fingerprint", None)  # memjax.Model: a content hash of its own
    if isinstance(own, str):
        return {"type": _type_name(type(value)), "fingerprint": own}
    if callable(value):
        return describe_function(value)
    return _describe_object(value)


def _is_dataclass_value(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _describe_object(value: Any) -> dict[str, Any]:
    """Type, plus a hash of the repr when the repr is the same in every run (else, for a
    dataclass, its fields' descriptions)."""
    description: dict[str, Any] = {"type": _type_name(type(value))}
    text = repr(value)
    if not _ADDRESS.search(text):
        description["repr"] = _digest(text)
    elif _is_dataclass_value(value):
        description["fields"] = {f.name: describe_value(getattr(value, f.name))
                                 for f in dataclasses.fields(value)}
    return description


def describe_function(fn: Any) -> dict[str, Any]:
    """Name, source hash and bound arguments of a score function (partials unwrapped).

    A dataclass instance (the value-hashable score functions of ``memjax.signals`` and
    ``memjax.Model.apply``) is described by its class (name and source) and each field's
    description, so equal settings give equal fingerprints in every run and the name
    stays short (``memjax info`` shows it).
    """
    if isinstance(fn, functools.partial):
        return {
            "partial": describe_function(fn.func),
            "args": [describe_value(a) for a in fn.args],
            "keywords": {k: describe_value(v) for k, v in sorted(fn.keywords.items())},
        }
    if _is_dataclass_value(fn):
        cls = type(fn)
        return {"name": _type_name(cls), "source": _source_digest(cls),
                "fields": {f.name: describe_value(getattr(fn, f.name))
                           for f in dataclasses.fields(fn)}}
    target = inspect.unwrap(fn) if callable(fn) else fn
    if not (inspect.isroutine(target) or isinstance(target, type)):  # a callable object
        return {**_describe_object(target), "name": _type_name(type(target)),
                "source": _source_digest(type(target))}
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    description: dict[str, Any] = {"name": name, "source": _source_digest(target)}
    closure = getattr(target, "__closure__", None)
    code = getattr(target, "__code__", None)
    if closure and code is not None:
        description["closure"] = {
            var: describe_value(cell.cell_contents)
            for var, cell in zip(code.co_freevars, closure, strict=True)
            if var != target.__name__  # a recursive function's own cell
        }
    return description


def function_name(description: dict[str, Any]) -> str:
    """A short name of a described function (``describe_function``'s output)."""
    if "partial" in description:
        return f"functools.partial({function_name(description['partial'])})"
    # Stores made before callable dataclasses were described field by field hold their
    # whole repr as the name: keep its class name.
    return str(description.get("name", "?")).split("(", 1)[0]


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
