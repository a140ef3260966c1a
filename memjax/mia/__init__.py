"""Membership-inference attacks over per-example signals (higher = more likely member).

- :func:`loss`, :func:`min_k`, :func:`min_k_plus_plus`, :func:`zlib`, :func:`reference`:
  attacks on one model's signals; :func:`token_features` for dataset inference.
- :func:`lira` (Carlini et al. 2022) and :func:`rmia` / :func:`choose_a` (Zarifzadeh et al.
  2024): attacks calibrated by reference models, with :func:`missing_references` for the
  examples a keep matrix leaves without IN or OUT models. On arrays of M models' signals
  (:func:`load_signals`, :func:`reference_signals`): :func:`lira_attacks` and
  :func:`rmia_attacks`; on model stacks and folders: :func:`all_model_signals`,
  :func:`model_signals`, :func:`attack_suite`; :func:`attack_metrics` reports AUC and TPR
  at low FPR.
- :func:`csa`, :func:`aea`, :func:`wsa` and the control :func:`text_only_baseline`
  (Ko et al. 2023): attacks on CLIP-style image and text embeddings, which
  :func:`embed_pairs` computes for any CLIP model (with AEA's views, :class:`AEAView`).
- :func:`attacks_from_signals`: every attack a stored signal bundle supports (what
  ``memjax mia stored`` runs), with :func:`read_members` (membership by example id from
  the user's files) and :func:`jsonl_texts` to read texts by example id.
- :func:`dataset_inference` (Maini et al. 2024; CDI, Dubiński et al. 2025; Kowalczuk et al.
  2025: ``method="maini"|"cdi"|"iar"``): a t-test over aggregated attack features;
  :func:`p_value_curve` and :func:`smallest_n` read off how many suspect examples reach a
  p-value.
- In-context learning (Duan et al. 2023): :func:`icl_membership` scores the demonstrations
  of a prompted causal LM by their correct label's probability, for one prompt and for an
  ensemble of prompts with disjoint demonstrations (:func:`icl_label_log_probs`,
  :class:`PromptTemplate`).
- :func:`diffusion_features` (CDI and the attacks it aggregates: denoising loss, SecMI,
  PIA/PIAN, gradient-masked loss, noise optimisation) and :func:`iar_features` (Kowalczuk
  et al. 2025: token attacks on conditional, unconditional and CFG-difference logits of
  image autoregressive models): per-example features of image generators.
- :func:`run_bench` (``memjax mia bench``): a grid of causal LMs x text datasets x
  attacks scored into resumable stores, one table (:func:`read_bench_config`,
  :func:`bench_config`); :func:`register_attack` adds a plug-in attack.
"""

from memjax.mia._arrays import (
    AttackResult,
    ReferenceSignals,
    lira_attacks,
    load_signals,
    phi_from_logits,
    reference_signals,
    rmia_attacks,
)
from memjax.mia._bench import (
    ATTACKS,
    DATASET_INFERENCE,
    REFERENCE,
    BenchConfig,
    BenchResult,
    bench_config,
    read_bench_config,
    register_attack,
    run_bench,
    source_texts,
)
from memjax.mia._clip import (
    CLIPSCORE_PREFIX,
    CLIPSCORE_WEIGHT,
    AEAView,
    PairEmbeddings,
    TextEmbeddings,
    aea,
    best_reference_cosine,
    clip_score,
    clipscore,
    csa,
    embed_pairs,
    ref_clip_score,
    reference_pairs,
    text_only_baseline,
    wsa,
)
from memjax.mia._diffusion import (
    DIFFUSION_FEATURES,
    PIXEL_RANGES,
    DiffusionFeatureFn,
    diffusion_features,
    feature_columns,
)
from memjax.mia._iar import (
    IAR_FEATURES,
    IAR_KS,
    IAR_LOGITS,
    IAR_MAX_ENTROPIES,
    cfg_logits,
    iar_camia,
    iar_features,
    iar_features_from_statistics,
    iar_hinge,
    iar_loss,
    iar_min_k,
    iar_min_k_pp,
    iar_surp,
    iar_token_statistics,
    iar_zlib,
)
from memjax.mia._icl import (
    ICL_NORMALIZATIONS,
    IclMembership,
    PromptTemplate,
    build_prompt,
    draw_demonstration_sets,
    icl_correct_label_score,
    icl_ensemble_distribution,
    icl_label_distribution,
    icl_label_log_probs,
    icl_membership,
    icl_scores,
)
from memjax.mia._inference import (
    DatasetInferenceResult,
    dataset_inference,
    p_value_curve,
    smallest_n,
)
from memjax.mia._lira import lira, missing_references
from memjax.mia._rmia import choose_a, rmia
from memjax.mia._stored import (
    attacks_from_signals,
    jsonl_texts,
    members_of,
    read_members,
    token_mask,
)
from memjax.mia._suite import all_model_signals, attack_metrics, attack_suite, model_signals
from memjax.mia._tokens import (
    loss,
    min_k,
    min_k_plus_plus,
    reference,
    token_features,
    zlib,
)

__all__ = [
    "ATTACKS",
    "CLIPSCORE_PREFIX",
    "CLIPSCORE_WEIGHT",
    "DATASET_INFERENCE",
    "DIFFUSION_FEATURES",
    "IAR_FEATURES",
    "IAR_KS",
    "IAR_LOGITS",
    "IAR_MAX_ENTROPIES",
    "ICL_NORMALIZATIONS",
    "PIXEL_RANGES",
    "REFERENCE",
    "AEAView",
    "AttackResult",
    "BenchConfig",
    "BenchResult",
    "DatasetInferenceResult",
    "DiffusionFeatureFn",
    "IclMembership",
    "PairEmbeddings",
    "PromptTemplate",
    "ReferenceSignals",
    "aea",
    "all_model_signals",
    "attack_metrics",
    "attack_suite",
    "attacks_from_signals",
    "bench_config",
    "build_prompt",
    "cfg_logits",
    "choose_a",
    "best_reference_cosine",
    "clip_score",
    "clipscore",
    "ref_clip_score",
    "reference_pairs",
    "TextEmbeddings",
    "csa",
    "dataset_inference",
    "diffusion_features",
    "draw_demonstration_sets",
    "embed_pairs",
    "feature_columns",
    "iar_camia",
    "iar_features",
    "iar_features_from_statistics",
    "iar_hinge",
    "iar_loss",
    "iar_min_k",
    "iar_min_k_pp",
    "iar_surp",
    "iar_token_statistics",
    "iar_zlib",
    "icl_correct_label_score",
    "icl_ensemble_distribution",
    "icl_label_distribution",
    "icl_label_log_probs",
    "icl_membership",
    "icl_scores",
    "jsonl_texts",
    "lira",
    "lira_attacks",
    "load_signals",
    "loss",
    "members_of",
    "min_k",
    "min_k_plus_plus",
    "missing_references",
    "model_signals",
    "p_value_curve",
    "phi_from_logits",
    "read_bench_config",
    "read_members",
    "reference",
    "reference_signals",
    "register_attack",
    "rmia",
    "rmia_attacks",
    "run_bench",
    "smallest_n",
    "source_texts",
    "text_only_baseline",
    "token_features",
    "token_mask",
    "wsa",
    "zlib",
]
