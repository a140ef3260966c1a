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

__all__ = [
    "MLPConfig",
    "classification_signals",
    "fit_mlp",
    "init_mlp",
    "load_model",
    "mlp_logits",
    "save_model",
]
