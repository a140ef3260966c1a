"""Membership-inference attacks over per-example signals (higher = more likely member).

- :func:`loss`, :func:`min_k`, :func:`min_k_plus_plus`, :func:`zlib`, :func:`reference`:
  attacks on one model's signals.
- :func:`lira` (Carlini et al. 2022) and :func:`rmia` / :func:`choose_a` (Zarifzadeh et al.
  2024): attacks calibrated by reference models; :func:`attack_suite` runs them all
  against one model of a stack scored with :func:`all_model_signals`, and
  :func:`attack_metrics` reports AUC and TPR at low FPR.
- :func:`csa`, :func:`aea`, :func:`wsa` and the control :func:`text_only_baseline`
  (Ko et al. 2023): attacks on CLIP-style image and text embeddings.
- :func:`attacks_from_signals`: every attack a stored signal bundle supports (what
  ``memjax mia --scores`` runs), with :func:`member_flags` and :func:`jsonl_texts` to
  read membership and texts by example id.
- :func:`dataset_inference` (Maini et al. 2024): a t-test over aggregated attack features.
"""

from memjax.mia._clip import aea, csa, text_only_baseline, wsa
from memjax.mia._inference import DatasetInferenceResult, dataset_inference
from memjax.mia._lira import lira
from memjax.mia._rmia import choose_a, rmia
from memjax.mia._stored import attacks_from_signals, jsonl_texts, member_flags, token_mask
from memjax.mia._suite import all_model_signals, attack_metrics, attack_suite
from memjax.mia._tokens import loss, min_k, min_k_plus_plus, reference, zlib

__all__ = [
    "DatasetInferenceResult",
    "aea",
    "all_model_signals",
    "attack_metrics",
    "attack_suite",
    "attacks_from_signals",
    "choose_a",
    "csa",
    "dataset_inference",
    "jsonl_texts",
    "lira",
    "loss",
    "member_flags",
    "min_k",
    "min_k_plus_plus",
    "reference",
    "rmia",
    "text_only_baseline",
    "token_mask",
    "wsa",
    "zlib",
]
