"""Localising memorization: which examples a model memorizes, and in which units and layers.

- :func:`unitmem`, :func:`unitmem_from_activations` (Wang et al. 2024, NeurIPS): per-unit
  memorization, streamed over examples.
- :func:`sslmem`, :func:`layermem`, :func:`clipmem` (Wang et al. 2024 ICLR, 2025): the
  leave-out alignment gap of an encoder trained with an example vs one trained without,
  per layer from one pass, and on image–caption pairs.
- :func:`background_crop` (the largest rectangle outside the object boxes), :func:`knn`,
  :func:`label_inference`, :func:`dejavu` and :func:`dejavu_sets` (Meehan et al. 2023;
  Jayaraman et al. 2024): déjà vu label inference from background crops;
  :func:`crop_embeddings` (with :func:`center_box`, :func:`periphery_box`) embeds crops
  of images with a model.
"""

from memjax.memorization._dejavu import (
    accuracy_by_confidence,
    background_box,
    background_crop,
    center_box,
    classifier_inference,
    crop_embeddings,
    dejavu,
    dejavu_sets,
    knn,
    label_inference,
    neighbour_objects,
    periphery_box,
    set_precision_recall,
)
from memjax.memorization._sslmem import clipmem, layermem, resolve_layers, sslmem
from memjax.memorization._unitmem import (
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
    "accuracy_by_confidence",
    "background_box",
    "background_crop",
    "batch_stats",
    "center_box",
    "classifier_inference",
    "clipmem",
    "combine",
    "crop_embeddings",
    "dejavu",
    "dejavu_sets",
    "knn",
    "label_inference",
    "layermem",
    "neighbour_objects",
    "periphery_box",
    "resolve_layers",
    "set_precision_recall",
    "sslmem",
    "unitmem",
    "unitmem_from_activations",
    "unitmem_from_stats",
    "unitmem_ratio",
]
