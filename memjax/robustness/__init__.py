"""Adversarial robustness of image encoders (Kowalczuk et al. 2024): embedding-space and
downstream PGD per example, linear probes, robust accuracy against the L∞ radius."""

from memjax.robustness._pgd import (
    ImageEncoder,
    RobustnessScore,
    attack_keys,
    check_head,
    default_step_sizes,
    downstream_pgd,
    embedding_pgd,
    embedding_shift,
    encode_images,
    encoder_robustness,
    fit_linear_probe,
    image_encoder,
    linear_logits,
    model_normalization,
    probe_objective,
    project,
    random_start,
    representation,
)

__all__ = [
    "ImageEncoder",
    "RobustnessScore",
    "attack_keys",
    "check_head",
    "default_step_sizes",
    "downstream_pgd",
    "embedding_pgd",
    "embedding_shift",
    "encode_images",
    "encoder_robustness",
    "fit_linear_probe",
    "image_encoder",
    "linear_logits",
    "model_normalization",
    "probe_objective",
    "project",
    "random_start",
    "representation",
]
