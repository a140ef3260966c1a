"""Per-example membership signals: pure functions of one example's model outputs.

Each signal takes one example (no batch axis) and returns a dict of float32 jax arrays
(``correct`` is bool); batch with :func:`jax.vmap`. Nothing here is jitted: the engine jits
at the edge. Shape and dtype errors raise :class:`memjax.errors.InputError` at trace time;
value checks that need the data (label ranges) are done on the host with
:func:`check_labels`.
"""

from memjax.signals._classification import check_labels, classification
from memjax.signals._contrastive import contrastive
from memjax.signals._tokens import tokens

SIGNALS = {
    "classification": classification,
    "tokens": tokens,
    "contrastive": contrastive,
}

__all__ = ["SIGNALS", "check_labels", "classification", "contrastive", "tokens"]
