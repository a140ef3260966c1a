"""The scoring runtime: device mesh, sharded runner, resumable score store."""

from memjax.engine.mesh import DATA_AXIS, MODEL_AXIS, make_mesh, param_shardings
from memjax.engine.runner import (
    SequenceLayout,
    clear_compile_cache,
    compile_cache_info,
    score,
)
from memjax.engine.store import ScoreStore

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "ScoreStore",
    "SequenceLayout",
    "clear_compile_cache",
    "compile_cache_info",
    "make_mesh",
    "param_shardings",
    "score",
]
