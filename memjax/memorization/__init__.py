"""Localising memorization in SSL encoders: UnitMem (and, merged separately, SSLMem and
déjà vu)."""

from memjax.memorization.unitmem import (
    LayerUnitMem,
    RunningStats,
    UnitMemResult,
    batch_stats,
    combine,
    unitmem,
    unitmem_from_activations,
    unitmem_from_stats,
    unitmem_ratio,
)

__all__ = [
    "LayerUnitMem",
    "RunningStats",
    "UnitMemResult",
    "batch_stats",
    "combine",
    "unitmem",
    "unitmem_from_activations",
    "unitmem_from_stats",
    "unitmem_ratio",
]
