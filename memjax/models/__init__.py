"""Flax NNX ports of open architectures; importing this registers their converters."""

from memjax.models import gpt2  # noqa: F401
from memjax.models.taps import Taps, tap, with_taps

__all__ = ["Taps", "tap", "with_taps"]
