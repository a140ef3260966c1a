"""Errors that memjax raises for bad input.

Every user-facing entry point raises a subclass of :class:`MemjaxError` with a message
that names the offending input and what was expected. The CLI prints these messages
without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MemjaxError(ValueError):
    """Base class of the errors a user can cause and fix (bad input, bad configuration)."""


class InputError(MemjaxError):
    """An input (array, file, argument) does not have the shape, type or values expected."""


class StoreError(MemjaxError):
    """A score store cannot be used as asked (different configuration, incomplete, corrupt)."""
