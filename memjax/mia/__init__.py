"""Membership-inference attacks over per-example signals (higher = more likely member).

- :func:`loss`, :func:`min_k`, :func:`min_k_plus_plus`, :func:`zlib`, :func:`reference`:
  attacks on one model's signals (memjax.mia._tokens).
- :func:`lira` (Carlini et al. 2022) and :func:`rmia` / :func:`choose_a` (Zarifzadeh et al.
  2024): attacks calibrated by reference models.
- :mod:`memjax.mia._clip`: CSA, AEA, WSA and the text-only control (Ko et al. 2023).
- :func:`dataset_inference` (Maini et al. 2024): a t-test over aggregated attack features.
"""

from memjax.mia import _clip as clip
from memjax.mia._inference import DatasetInferenceResult, dataset_inference
from memjax.mia._lira import lira
from memjax.mia._rmia import choose_a, rmia
from memjax.mia._tokens import loss, min_k, min_k_plus_plus, reference, zlib

__all__ = [
    "DatasetInferenceResult",
    "choose_a",
    "clip",
    "dataset_inference",
    "lira",
    "loss",
    "min_k",
    "min_k_plus_plus",
    "reference",
    "rmia",
    "zlib",
]
