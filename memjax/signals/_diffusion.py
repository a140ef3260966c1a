"""Noise schedules and per-example membership features of diffusion models.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): betas β_t for
t = 0..T-1, ᾱ_t = ∏_{s≤t} (1 − β_s), the forward process
x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with ε ~ N(0, I), and an ε-predictor ``eps_fn(x_t, t) -> ε̂``.

Schedules (:func:`make_schedule`, :func:`schedule_from_config`) are computed exactly as
``diffusers``' ``DDPMScheduler`` / ``DDIMScheduler`` compute ``alphas_cumprod`` (float32,
torch's linspace and its float64-accumulated cumprod; tested equal).

Features of ONE example (no batch axis; the engine vmaps), each a pure function of
``eps_fn``, the clean input ``x0`` [H, W, C] and explicit noise, so a float64 reference fed
the same noise gives the same number. They are the features CDI (Dubiński et al. 2025,
"CDI: Copyrighted Data Identification in Diffusion Models", reference code
sprintml/copyrighted_data_identification) aggregates:

- :func:`denoising_losses` -- the denoising loss at chosen timesteps with K noise draws
  (CDI's "Denoising Loss" / "Multiple Loss"; Carlini et al. 2023's loss threshold).
- :func:`secmi_error` -- SecMI's t-error (Duan et al. 2023, "Are Diffusion Models
  Vulnerable to Membership Inference Attacks?", ICML).
- :func:`pia_scores` -- PIA and PIAN (Kong et al. 2024, "An Efficient Membership Inference
  Attack for the Diffusion Model by Proximal Initialization", ICLR).
- :func:`gradient_masked_loss` -- CDI's gradient-masking feature.
- :func:`noise_optimization` -- CDI's noise-optimisation feature.

Reductions (stated once; where the reference code differs it is said at the function):
the denoising losses are the MEAN over elements of the squared error (the DDPM training
loss); CDI's code takes the L2 norm ‖·‖₂ = √(n · mean) instead, a monotone function of it
for a fixed input size (same ranking, same AUC).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.errors import InputError

#: ``eps_fn(x_t [H, W, C], t: int) -> ε̂ [H, W, C]``; t is a Python int (static).
EpsFn = Callable[[jax.Array, int], jax.Array]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: scheduler_config.json keys that change only how samples are GENERATED (the reverse
#: chain: clipping and thresholding of x̂₀, the inference timestep grid and its offset,
#: ᾱ at the final step, the sampling variance, Karras sigmas, PNDM's Runge-Kutta warm-up)
#: or are bookkeeping; the features use only the forward process ᾱ_t and the model's
#: prediction at a training timestep, which none of them changes.
NEUTRAL_KEYS = frozenset({
    "_class_name", "_diffusers_version", "clip_sample", "clip_sample_range",
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "set_alpha_to_one",
    "steps_offset", "timestep_spacing", "variance_type", "skip_prk_steps",
    "use_karras_sigmas", "interpolation_type", "timestep_type", "final_sigmas_type",
})
#: Keys of the forward process memjax implements.
SCHEDULE_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                           "trained_betas", "prediction_type", "rescale_betas_zero_snr"})


# --------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion model's forward process (hashable: its floats are tuples).

    Attributes:
      betas: [T] β_t as float32 values (stored as Python floats).
      alphas_cumprod: [T] ᾱ_t = ∏_{s≤t}(1 − β_s), float32 as diffusers computes it.
      prediction_type: what the model predicts: ``"epsilon"`` (ε), ``"v_prediction"``
        (v = √ᾱ ε − √(1−ᾱ) x₀) or ``"sample"`` (x₀); :func:`epsilon_from_prediction`
        converts the last two to ε exactly.
      name: the beta schedule's name (``"trained"`` for given betas).
    """

    betas: tuple[float, ...]
    alphas_cumprod: tuple[float, ...]
    prediction_type: str = "epsilon"
    name: str = "linear"

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t for a training timestep 0 ≤ t < T (InputError otherwise)."""
        t = _timestep(t, self.num_train_timesteps)
        return self.alphas_cumprod[t]


def _timestep(t: Any, n: int, what: str = "timestep") -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < n:
        raise InputError(f"{what}: expected an integer in [0, {n}) (the schedule's training "
                         f"timesteps), got {t!r}")
    return int(t)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) value for value: the step in
    float32, the first half counted from ``start``, the second half back from ``end``,
    each value one fused multiply-add (torch's vectorised CPU kernel): the product
    step · i is exact in float64 and the sum is rounded once to float32."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    low = np.float64(start32) + step * i[:half]
    high = np.float64(end32) - step * (steps - 1 - i[half:])
    return np.concatenate([low, high]).astype(np.float32)


def _cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021's cosine schedule (diffusers' ``squaredcos_cap_v2``):
    β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999) with ᾱ(s) = cos²((s + 0.008)/1.008 · π/2),
    in float64 Python math, then float32."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
             for i in range(steps)]
    return np.asarray(betas, np.float64).astype(np.float32)


def make_schedule(beta_schedule: str = "linear", *, num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001, beta_end: float = 0.02,
                  trained_betas: Sequence[float] | None = None,
                  prediction_type: str = "epsilon") -> NoiseSchedule:
    """The noise schedule diffusers' DDPM/DDIM schedulers build from these settings.

    - ``"linear"`` (Ho et al. 2020): β = linspace(beta_start, beta_end, T).
    - ``"scaled_linear"`` (latent diffusion): β = linspace(√beta_start, √beta_end, T)².
    - ``"squaredcos_cap_v2"`` (Nichol & Dhariwal 2021, cosine): see :func:`_cosine_betas`.
    - ``trained_betas`` given: those betas (the schedule name is then ``"trained"``).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got "
                         f"{prediction_type!r}")
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas < 1)):
            raise InputError("trained_betas: expected a non-empty list of betas in (0, 1)")
        name = "trained"
    else:
        steps = num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"num_train_timesteps: expected a positive integer, got {steps!r}")
        if beta_schedule == "linear":
            betas = _torch_linspace_f32(beta_start, beta_end, int(steps))
        elif beta_schedule == "scaled_linear":
            betas = _torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, int(steps)) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(int(steps))
        else:
            raise InputError(f"beta_schedule: {beta_schedule!r} is not implemented (memjax "
                             f"knows {list(BETA_SCHEDULES)} and trained_betas)")
        name = beta_schedule
    alphas = (np.float32(1) - betas).astype(np.float32)
    # torch's CPU cumprod of float32 accumulates in float64 (ATen's acc_type) and rounds
    # each partial product to float32.
    cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return NoiseSchedule(tuple(float(b) for b in betas), tuple(float(a) for a in cumprod),
                         prediction_type, name)


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The schedule of a diffusers ``scheduler_config.json`` (its dict).

    Refused by name: ``rescale_betas_zero_snr: true`` (Lin et al. 2024's rescaling to zero
    terminal SNR, not implemented), an unknown ``beta_schedule`` or ``prediction_type``,
    and any key neither implemented nor known to be neutral (:data:`NEUTRAL_KEYS`: they
    change only sampling, see there).
    """
    if not isinstance(config, Mapping):
        raise InputError(f"scheduler config: expected a JSON object, got "
                         f"{type(config).__name__}")
    unknown = sorted(set(config) - SCHEDULE_KEYS - NEUTRAL_KEYS)
    if unknown:
        raise InputError(f"scheduler config: keys {unknown} are not known to memjax; they may "
                         "change the noise schedule, so they are refused (remove them if they "
                         "only change sampling)")
    if config.get("rescale_betas_zero_snr", False):
        raise InputError("scheduler config: rescale_betas_zero_snr=true is not implemented "
                         "(it changes every ᾱ_t)")
    return make_schedule(
        config.get("beta_schedule", "linear"),
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        trained_betas=config.get("trained_betas"),
        prediction_type=config.get("prediction_type", "epsilon"))


def epsilon_from_prediction(prediction: jax.Array, x_t: jax.Array, t: int,
                            schedule: NoiseSchedule) -> jax.Array:
    """ε̂ from a model's output at (x_t, t), exactly, for each ``prediction_type``:

    - epsilon: the output.
    - v_prediction (Salimans & Ho 2022): v = √ᾱ ε − √(1−ᾱ) x₀ and x_t = √ᾱ x₀ + √(1−ᾱ) ε
      give ε = √ᾱ v + √(1−ᾱ) x_t.
    - sample: ε = (x_t − √ᾱ x̂₀) / √(1−ᾱ) (refused at a timestep with ᾱ_t = 1).
    """
    if schedule.prediction_type == "epsilon":
        return prediction
    a = schedule.alpha_bar(t)
    if schedule.prediction_type == "v_prediction":
        return math.sqrt(a) * prediction + math.sqrt(1 - a) * x_t
    if a >= 1:
        raise InputError(f"timestep {t}: ᾱ_t = 1, so a sample prediction does not determine ε")
    return (x_t - math.sqrt(a) * prediction) / math.sqrt(1 - a)


# --------------------------------------------------------------------------- features


def noisy_sample(x0: jax.Array, noise: jax.Array, alpha_bar: float) -> jax.Array:
    """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (Ho et al. 2020, Eq. 4), any shape."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def denoising_losses(eps_fn: EpsFn, x0: jax.Array, noises: jax.Array,
                     timesteps: Sequence[int], schedule: NoiseSchedule) -> jax.Array:
    """The denoising loss mean((ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t))²) for each timestep and
    noise draw (the same K draws at every timestep, as CDI's "Multiple Loss").

    Args:
      x0: [H, W, C] the clean input (pixels in [-1, 1], or a scaled latent).
      noises: [K, H, W, C] standard normal draws.
      timesteps: training timesteps (Python ints).

    Returns:
      [len(timesteps), K] float32: the mean over the H·W·C elements (CDI's code: the L2
      norm, √(H·W·C · loss)).
    """
    rows = []
    for t in timesteps:
        a = schedule.alpha_bar(t)

        def one(noise, t=t, a=a):
            return _mse(noise, eps_fn(noisy_sample(x0, noise, a), t))
        rows.append(jax.vmap(one)(noises))
    return jnp.stack(rows)


def ddim_step(eps_fn: EpsFn, x: jax.Array, t_from: int, t_to: int,
              schedule: NoiseSchedule) -> jax.Array:
    """One deterministic DDIM step (Song et al. 2021, η = 0) from timestep ``t_from`` to
    ``t_to`` (either direction), as SecMI writes it (Duan et al. 2023, Sec. 4):

        f_θ(x, t) = (x − √(1−ᾱ_t) ε_θ(x, t)) / √ᾱ_t
        x_{t_to} = √ᾱ_{t_to} f_θ(x, t_from) + √(1−ᾱ_{t_to}) ε_θ(x, t_from)

    (SecMI's deterministic reverse φ_θ when t_to > t_from, its denoise ψ_θ otherwise.)
    """
    a_from, a_to = schedule.alpha_bar(t_from), schedule.alpha_bar(t_to)
    eps = eps_fn(x, t_from)
    x0_hat = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0_hat + math.sqrt(1 - a_to) * eps


def ddim_invert(eps_fn: EpsFn, x0: jax.Array, t: int, interval: int,
                schedule: NoiseSchedule) -> jax.Array:
    """x̃_t: x₀ carried to timestep ``t`` by deterministic DDIM steps 0 → k → 2k → … → t
    (k = ``interval``; the first step reads ε_θ(x₀, 0) and ᾱ_0, as SecMI's and CDI's code
    do). ``t`` must be a positive multiple of ``interval``."""
    if interval < 1 or t < interval or t % interval:
        raise InputError(f"secmi_t: expected a positive multiple of secmi_interval "
                         f"({interval}), got {t}")
    x = x0
    for start in range(0, t, interval):
        x = ddim_step(eps_fn, x, start, start + interval, schedule)
    return x


def secmi_error(eps_fn: EpsFn, x0: jax.Array, schedule: NoiseSchedule, *, t: int = 100,
                interval: int = 10) -> jax.Array:
    """SecMI's t-error (Duan et al. 2023, Sec. 4, the "naive" statistic SecMI_stat):

        x̃_t = φ_θ(…φ_θ(x₀, 0)…, t − k)          (deterministic inversion, stride k)
        ℓ_{t,x₀} = ‖ψ_θ(φ_θ(x̃_t, t), t + k) − x̃_t‖²

    one deterministic step forward to t + k and one back to t. Defaults: SecMI's setting
    for DDPM (T = 1000), t_SEC = 100 and k = 10. Lower = member.

    Returns:
      float32 scalar: the SUM of squares over x₀'s elements (the paper's ‖·‖²).
    """
    x_t = ddim_invert(eps_fn, x0, t, interval, schedule)
    forward = ddim_step(eps_fn, x_t, t, t + interval, schedule)
    back = ddim_step(eps_fn, forward, t + interval, t, schedule)
    return jnp.sum(jnp.square(back.astype(jnp.float32) - x_t.astype(jnp.float32)))


def gaussian_normalized(eps: jax.Array) -> jax.Array:
    """PIAN's ε₀ made Gaussian-like: scaled so its mean absolute value is √(2/π), the
    mean of |z| for z ~ N(0, 1) (Kong et al. 2024, PIAN; their code divides by the mean
    |ε| and multiplies by √(2/π)). CDI's code multiplies by √(π/2) instead, a factor π/2
    larger than a standard normal's; memjax follows the PIA paper."""
    return eps / jnp.mean(jnp.abs(eps)) * math.sqrt(2 / math.pi)


def _lp(diff: jax.Array, p: float) -> jax.Array:
    flat = jnp.abs(diff.astype(jnp.float32)).reshape(-1)
    return jnp.sum(flat ** p) ** (1 / p)


def pia_scores(eps_fn: EpsFn, x0: jax.Array, schedule: NoiseSchedule, *, t: int = 200,
               p: float = 4.0) -> dict[str, jax.Array]:
    """PIA and PIAN (Kong et al. 2024): proximal initialisation with the model's own
    ε₀ = ε_θ(x₀, 0), x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε₀, and the distance

        R_{t,p} = ‖ε_θ(x_t, t) − ε₀‖_p

    (PIAN: the same with ε₀ replaced by :func:`gaussian_normalized` (ε₀) in both places).
    Lower = member. ``t`` default 200 and ``p`` default 4 are memjax's defaults (CDI reads
    both from its attack config).

    Returns:
      ``{"pia": scalar, "pian": scalar}`` float32.
    """
    a = schedule.alpha_bar(t)
    eps0 = eps_fn(x0, 0)

    def distance(e0):
        return _lp(eps_fn(noisy_sample(x0, e0, a), t) - e0, p)
    return {"pia": distance(eps0), "pian": distance(gaussian_normalized(eps0))}


def top_gradient_mask(gradient: jax.Array, fraction: float) -> jax.Array:
    """bool mask of the ⌊n · fraction⌋ elements of largest |gradient| (n = its size), as
    CDI's ``get_masks`` (``torch.topk`` over the flattened |gradient|)."""
    flat = jnp.abs(gradient).reshape(-1)
    k = int(flat.size * fraction)
    if k < 1:
        raise InputError(f"gm_fraction: {fraction} of {flat.size} elements masks none; "
                         "raise it")
    _, index = jax.lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[index].set(True).reshape(gradient.shape)


def gradient_masked_loss(eps_fn: EpsFn, x0: jax.Array, noise: jax.Array, t: int,
                         schedule: NoiseSchedule, *, fraction: float = 0.2) -> jax.Array:
    """CDI's gradient-masking feature (Dubiński et al. 2025), as its code defines it:

    1. x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; g = ∂‖ε_θ(x_t, t) − ε‖₂ / ∂x_t.
    2. M = the ⌊n · fraction⌋ elements of largest |g| (:func:`top_gradient_mask`).
    3. x̃ = x₀ with the elements in M replaced by ε; ε̂ = ε_θ(x̃, t).
    4. loss = mean over M of ((ε − x₀) − ε̂)², the code's target on the mask.

    The code differentiates with respect to x_t; x_t = √ᾱ_t x₀ + …, so |∂/∂x₀| = √ᾱ_t |∂/∂x_t|
    and the mask is the same. The code's gradient is of the batch mean of the norms,
    1/B times each example's: the same mask. CDI reports the L2 norm over M (√(|M| · loss)).
    ``fraction`` default 0.2 is memjax's (CDI reads ``masking_ratio`` from its config).

    Returns:
      float32 scalar.
    """
    a = schedule.alpha_bar(t)
    x_t = noisy_sample(x0, noise, a)

    def norm_loss(x):
        return jnp.linalg.norm((eps_fn(x, t) - noise).astype(jnp.float32).reshape(-1))
    mask = top_gradient_mask(jax.grad(norm_loss)(x_t), fraction)
    masked_input = jnp.where(mask, noise, x0)
    residual = (noise - x0) - eps_fn(masked_input, t)
    squared = jnp.where(mask, jnp.square(residual.astype(jnp.float32)), 0.0)
    return jnp.sum(squared) / jnp.sum(mask)


def noise_optimization(eps_fn: EpsFn, x0: jax.Array, noise: jax.Array, t: int,
                       schedule: NoiseSchedule, *, steps: int = 5,
                       learning_rate: float = 0.01) -> dict[str, jax.Array]:
    """CDI's noise-optimisation feature: how far the noised input must move to be
    denoised well. With x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε and δ₀ = 0, ``steps`` gradient steps

        δ ← δ − lr · ∇_δ ½‖ε − ε_θ(x_t + δ, t)‖²

    then the loss mean((ε − ε_θ(x_t + δ, t))²) and ‖δ‖₂.

    Differs from CDI's code, which runs scipy's L-BFGS-B (``max_iter`` from its config) on
    the batch's mean L2 norm: one optimisation over the whole batch, so an example's
    result depends on the others in its batch (and on the batch size); memjax optimises
    each example alone with plain gradient steps, so features do not depend on batching.
    CDI's final loss call also passes the noise again, which re-noises x_t + δ; memjax
    evaluates at x_t + δ, the point that was optimised.

    Returns:
      ``{"loss": scalar, "delta": scalar}`` float32.
    """
    a = schedule.alpha_bar(t)
    x_t = noisy_sample(x0, noise, a)

    def half_sq(delta):
        r = (noise - eps_fn(x_t + delta, t)).astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(r))

    delta = jnp.zeros_like(x_t)
    for _ in range(steps):
        delta = delta - learning_rate * jax.grad(half_sq)(delta)
    return {"loss": _mse(noise, eps_fn(x_t + delta, t)),
            "delta": jnp.linalg.norm(delta.astype(jnp.float32).reshape(-1))}
