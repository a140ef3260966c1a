"""Training small models for demonstrations and reference models (vmappable, optax)."""

from memjax.train.classifier import (
    MLPConfig,
    classification_signals,
    fit_mlp,
    init_mlp,
    load_model,
    mlp_logits,
    save_model,
)
from memjax.train.reference import (
    balanced_keep,
    load_models,
    save_models,
    train_mlps,
)

__all__ = [
    "MLPConfig",
    "balanced_keep",
    "classification_signals",
    "fit_mlp",
    "init_mlp",
    "load_model",
    "load_models",
    "mlp_logits",
    "save_model",
    "save_models",
    "train_mlps",
]
