"""Per-example membership signals: pure functions of one example's model outputs.

Each signal takes one example (no batch axis) and returns a dict of float32 jax arrays
(``correct`` and ``scored`` are bool); batch with :func:`jax.vmap`. Nothing here is
jitted: the engine jits at the edge. Shape and dtype errors raise
:class:`memjax.errors.InputError` at trace time; value checks that need the data (label
ranges) are done on the host with :func:`check_labels`. :func:`signal_function` gives the
signal function of any :class:`memjax.Model` (what ``memjax score`` runs).
"""

from memjax.kernels import EPS
from memjax.signals._classification import check_labels, classification
from memjax.signals._contrastive import contrastive
from memjax.signals._model import (
    SIGNAL_KINDS,
    CausalLMTokenSignals,
    ClassificationSignals,
    ContrastiveSignals,
    signal_function,
)
from memjax.signals._tokens import causal_lm_tokens, tokens

__all__ = ["EPS", "SIGNAL_KINDS", "CausalLMTokenSignals", "ClassificationSignals",
           "ContrastiveSignals", "causal_lm_tokens", "check_labels", "classification",
           "contrastive", "signal_function", "tokens"]
