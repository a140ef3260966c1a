"""Activation taps: named intermediate activations from the same forward pass.

Every model's ``__call__`` takes ``taps: Taps | None``. Modules report their
intermediates with ``tap(taps, name, value)``; a :class:`Taps` keeps the ones whose dotted
name matches one of its patterns (shell-style, e.g. ``"layers.*.mlp_hidden"``) and records
every name it saw, so an unknown pattern gets an error listing the available names.
Recording happens while tracing, so taps work under ``jit`` and ``vmap``: the caller
returns ``taps.values`` from the traced function.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from memjax.errors import InputError


class Taps:
    """Collects activations whose names match ``patterns`` (fnmatch syntax)."""

    def __init__(self, patterns: Sequence[str]):
        if isinstance(patterns, str):
            patterns = [patterns]
        self.patterns = tuple(patterns)
        self.values: dict[str, Any] = {}
        self.seen: list[str] = []

    def __call__(self, name: str, value: Any) -> Any:
        self.seen.append(name)
        if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            self.values[name] = value
        return value

    def check(self) -> None:
        """Raise if a pattern matched no activation, listing the available names."""
        unmatched = [p for p in self.patterns
                     if not any(fnmatch.fnmatchcase(n, p) for n in self.seen)]
        if unmatched:
            raise InputError(
                f"layer pattern(s) {unmatched} match no activation of this model; available: "
                f"{', '.join(self.seen)}"
            )


def tap(taps: Taps | None, name: str, value: Any) -> Any:
    """Report ``value`` under ``name`` to ``taps`` (if any); returns ``value`` unchanged."""
    if taps is not None:
        taps(name, value)
    return value


def child(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def with_taps(call: Callable[..., Any], patterns: Sequence[str], *args: Any,
              **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``call(*args, taps=Taps(patterns), **kwargs)`` -> (output, {name: activation})."""
    taps = Taps(patterns)
    output = call(*args, taps=taps, **kwargs)
    taps.check()
    return output, taps.values
