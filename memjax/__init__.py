"""memjax: a JAX engine that scores training data.

Per-example signals, membership inference, influence and memorization, sharded over every
device it is given. Start from:

- :func:`load` — any model folder (Hugging Face, ``memjax convert``, ``memjax.train``) as
  a :class:`Model`, the one protocol every method takes;
- :func:`score`, :class:`ScoreStore`, :func:`make_mesh` — the engine: a per-example
  function over a data source, batched, sharded and resumable;
- the methods: :mod:`memjax.signals`, :mod:`memjax.mia`, :mod:`memjax.influence`,
  :mod:`memjax.memorization`, :mod:`memjax.unlearning`, :mod:`memjax.robustness`,
  :mod:`memjax.prototypes`; data sources in :mod:`memjax.data`; small models to train
  in :mod:`memjax.train`; metrics in :mod:`memjax.metrics`.

See ARCHITECTURE.md for the layout and the import rule.
"""

__version__ = "0.1.0"

from memjax import (
    data,
    engine,
    influence,
    memorization,
    metrics,
    mia,
    models,
    prototypes,
    robustness,
    signals,
    unlearning,
)
from memjax.convert import load
from memjax.engine import ScoreStore, make_mesh, score
from memjax.errors import InputError, MemjaxError, StoreError
from memjax.models import Model

__all__ = [
    "InputError",
    "MemjaxError",
    "Model",
    "ScoreStore",
    "StoreError",
    "data",
    "engine",
    "influence",
    "load",
    "make_mesh",
    "memorization",
    "metrics",
    "mia",
    "models",
    "prototypes",
    "robustness",
    "score",
    "signals",
    "unlearning",
]
