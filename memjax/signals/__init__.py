"""Per-example membership signals: pure functions of one example's model outputs.

Each signal takes one example (no batch axis) and returns a dict of float32 jax arrays
(``correct`` and ``scored`` are bool); batch with :func:`jax.vmap`. Nothing here is
jitted: the engine jits at the edge. Shape and dtype errors raise
:class:`memjax.errors.InputError` at trace time; value checks that need the data (label
ranges) are done on the host with :func:`check_labels`. :func:`signal_function` gives the
signal function of any :class:`memjax.Model` (what ``memjax score`` runs).
"""

from memjax.kernels import EPS
from memjax.signals._classification import check_labels, classification
from memjax.signals._contrastive import contrastive
from memjax.signals._diffusion import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    NoiseSchedule,
    ddim_invert,
    ddim_step,
    denoising_losses,
    epsilon_from_prediction,
    gaussian_normalized,
    gradient_masked_loss,
    make_schedule,
    noise_optimization,
    noisy_sample,
    pia_scores,
    schedule_from_config,
    secmi_error,
    top_gradient_mask,
)
from memjax.signals._model import (
    SIGNAL_KINDS,
    CausalLMTokenSignals,
    ClassificationSignals,
    ContrastiveSignals,
    signal_function,
)
from memjax.signals._tokens import causal_lm_tokens, tokens

__all__ = ["BETA_SCHEDULES", "EPS", "PREDICTION_TYPES", "SIGNAL_KINDS", "CausalLMTokenSignals",
           "ClassificationSignals", "ContrastiveSignals", "NoiseSchedule", "causal_lm_tokens",
           "check_labels", "classification", "contrastive", "ddim_invert", "ddim_step",
           "denoising_losses", "epsilon_from_prediction", "gaussian_normalized",
           "gradient_masked_loss", "make_schedule", "noise_optimization", "noisy_sample",
           "pia_scores", "schedule_from_config", "secmi_error", "signal_function",
           "tokens", "top_gradient_mask"]
