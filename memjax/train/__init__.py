"""Training small models for demonstrations and reference models (vmappable, optax)."""

from memjax.train.attribution import loo_retraining, retraining_effects, subset_outputs
from memjax.train.classifier import (
    CNNConfig,
    MLPConfig,
    classification_signals,
    classifier_logits,
    config_from_json,
    fit_classifier,
    load_model,
    save_model,
)
from memjax.train.reference import (
    balanced_keep,
    check_keep,
    load_models,
    save_models,
    train_classifiers,
)

__all__ = [
    "CNNConfig",
    "MLPConfig",
    "balanced_keep",
    "check_keep",
    "classification_signals",
    "classifier_logits",
    "config_from_json",
    "fit_classifier",
    "load_model",
    "load_models",
    "loo_retraining",
    "retraining_effects",
    "save_model",
    "save_models",
    "subset_outputs",
    "train_classifiers",
]
