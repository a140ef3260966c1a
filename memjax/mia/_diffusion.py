"""Per-example membership features of a diffusion model over a data source.

:func:`diffusion_features` runs the features of :mod:`memjax.signals` (denoising losses,
SecMI, PIA/PIAN, gradient masking, noise optimisation; their definitions and references
are there) over every example of a source through :func:`memjax.engine.score`, vmapped
and sharded by the engine. They are the per-example features CDI (Dubiński et al. 2025)
aggregates into dataset inference.

Noise: example i's noise comes from ``jax.random.fold_in(jax.random.key(seed), id_i)``
with the example's id from the engine (``score(with_ids=True)``), then one stream per
feature family (:data:`STREAMS`), so the features of an example do not depend on the batch
size, the device count, a resume point, or which other features are computed.

Inputs: the source's image field ([N, H, W, C], NHWC): uint8 in [0, 255] or floats in
[0, 1], both mapped to [-1, 1] (``pixel_range="auto"``), or floats already in [-1, 1]
(``pixel_range="signed"``); any other dtype or range is refused, naming the example. A
class-conditional model (one reading ``class_labels``) reads the label field. With a VAE
(latent diffusion): x₀ = (E(x) − shift) · scaling, E(x) the posterior MEAN (deterministic,
no sampling from the posterior; diffusers' convention of ``scaling_factor`` and
``shift_factor``).

Features are raw values, not membership scores (the losses, SecMI's t-error and PIA's
distance are lower for members in their papers; CDI's aggregator learns each feature's
direction). The columns are named stably (they become Parquet columns): ``loss_t{t}``
(mean over K draws),
``gm_loss_t{t}`` for each timestep, ``secmi``, ``pia``, ``pian``, ``noise_opt_loss``,
``noise_opt_delta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memjax._checks import check_choice, check_positive_int
from memjax.data.base import ID_FIELD, as_source
from memjax.engine import ScoreStore, score
from memjax.errors import InputError
from memjax.models import Model
from memjax.signals import (
    NoiseSchedule,
    denoising_losses,
    epsilon_from_prediction,
    gradient_masked_loss,
    noise_optimization,
    pia_scores,
    secmi_error,
)

DIFFUSION_FEATURES = ("loss", "secmi", "pia", "gm_loss", "noise_opt")
PIXEL_RANGES = ("auto", "signed")
#: fold_in constants of each feature family's noise stream (never renumber: stored
#: features depend on them).
STREAMS = {"loss": 0, "gm_loss": 1, "noise_opt": 2}


def feature_columns(features: Sequence[str], timesteps: Sequence[int]) -> list[str]:
    """The output columns of ``features`` (in order), e.g. ``["loss_t100", "secmi"]``."""
    names: list[str] = []
    for feature in features:
        if feature in ("loss", "gm_loss"):
            names += [f"{feature}_t{t}" for t in timesteps]
        elif feature == "pia":
            names += ["pia", "pian"]
        elif feature == "noise_opt":
            names += ["noise_opt_loss", "noise_opt_delta"]
        else:
            names.append(feature)
    return names


def to_signed_pixels(image: jax.Array, pixel_range: str) -> jax.Array:
    """[H, W, C] image -> float32 in [-1, 1]: uint8 x ↦ x/127.5 − 1, floats in [0, 1]
    x ↦ 2x − 1 (``"auto"``), floats as they are (``"signed"``)."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) / 127.5 - 1.0
    if pixel_range == "signed":
        return image.astype(jnp.float32)
    return 2.0 * image.astype(jnp.float32) - 1.0


@dataclasses.dataclass(frozen=True)
class DiffusionFeatureFn:
    """The engine's per-example function (a frozen dataclass: cached and fingerprinted by
    value). ``params``: ``{"model": ..., "vae": ...}`` (``vae`` only with a VAE)."""

    model_apply: Any
    schedule: NoiseSchedule
    features: tuple[str, ...]
    timesteps: tuple[int, ...]
    noise_draws: int
    seed: int
    image_field: str = "image"
    label_field: str | None = None
    pixel_range: str = "auto"
    vae_apply: Any = None
    vae_scaling: float = 1.0
    vae_shift: float = 0.0
    secmi_t: int = 100
    secmi_interval: int = 10
    pia_t: int = 200
    pia_p: float = 4.0
    gm_fraction: float = 0.2
    noise_opt_t: int = 100
    noise_opt_steps: int = 5
    noise_opt_lr: float = 0.01

    def clean_input(self, params: Any, example: dict[str, jax.Array]) -> jax.Array:
        """x₀: the image in [-1, 1], or its scaled VAE latent mean."""
        x = to_signed_pixels(example[self.image_field], self.pixel_range)
        if self.vae_apply is None:
            return x
        latent = self.vae_apply(params["vae"], {"image": x}).astype(jnp.float32)
        return (latent - self.vae_shift) * self.vae_scaling

    def eps_fn(self, params: Any, example: dict[str, jax.Array]):
        label = None if self.label_field is None else example[self.label_field]

        def eps(x_t: jax.Array, t: int) -> jax.Array:
            inputs = {"sample": x_t, "timestep": jnp.asarray(t, jnp.int32)}
            if label is not None:
                inputs["class_labels"] = label.astype(jnp.int32)
            out = self.model_apply(params["model"], inputs)
            if out.shape != x_t.shape:
                raise InputError(f"model: a diffusion model must return ε with the sample's "
                                 f"shape {x_t.shape}, got {out.shape}")
            return epsilon_from_prediction(out.astype(jnp.float32), x_t, t, self.schedule)
        return eps

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        x0 = self.clean_input(params, example)
        eps = self.eps_fn(params, example)
        key = jax.random.fold_in(jax.random.key(self.seed), example[ID_FIELD])

        def draws(stream: str, n: int) -> jax.Array:
            k = jax.random.fold_in(key, STREAMS[stream])
            return jax.random.normal(k, (n, *x0.shape), jnp.float32)

        out: dict[str, jax.Array] = {}
        for feature in self.features:
            if feature == "loss":
                losses = denoising_losses(eps, x0, draws("loss", self.noise_draws),
                                          self.timesteps, self.schedule)
                for t, row in zip(self.timesteps, losses, strict=True):
                    out[f"loss_t{t}"] = jnp.mean(row)
            elif feature == "gm_loss":
                noise = draws("gm_loss", 1)[0]
                for t in self.timesteps:
                    out[f"gm_loss_t{t}"] = gradient_masked_loss(
                        eps, x0, noise, t, self.schedule, fraction=self.gm_fraction)
            elif feature == "secmi":
                out["secmi"] = secmi_error(eps, x0, self.schedule, t=self.secmi_t,
                                           interval=self.secmi_interval)
            elif feature == "pia":
                out.update(pia_scores(eps, x0, self.schedule, t=self.pia_t, p=self.pia_p))
            elif feature == "noise_opt":
                result = noise_optimization(eps, x0, draws("noise_opt", 1)[0],
                                            self.noise_opt_t, self.schedule,
                                            steps=self.noise_opt_steps,
                                            learning_rate=self.noise_opt_lr)
                out["noise_opt_loss"] = result["loss"]
                out["noise_opt_delta"] = result["delta"]
        return out


# --------------------------------------------------------------------------- checks


def _check_model(model: Any, kind: str, what: str) -> None:
    if not isinstance(model, Model):
        raise InputError(f"{what}: expected a memjax.Model, got {type(model).__name__}")
    if model.kind != kind:
        raise InputError(f"{what}: expected a model of kind {kind!r}, got {model.kind!r} "
                         f"({model.name})")


def _int_tuple(values: Any, what: str, n: int) -> tuple[int, ...]:
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = (values,)
    try:
        items = tuple(values)
    except TypeError:
        raise InputError(f"{what}: expected integers, got {values!r}") from None
    if not items:
        raise InputError(f"{what}: expected at least one timestep")
    out = []
    for t in items:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n:
            raise InputError(f"{what}: expected integers in [0, {n}) (the schedule's "
                             f"training timesteps), got {t!r}")
        out.append(int(t))
    if len(set(out)) != len(out):
        raise InputError(f"{what}: repeated timesteps {out}")
    return tuple(out)


def _check_timestep(t: Any, what: str, n: int) -> int:
    return _int_tuple((t,), what, n)[0]


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"{what}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not np.isfinite(value):
        raise InputError(f"{what}: expected a positive number, got {value!r}")
    return float(value)


def _vae_factors(vae: Model, scaling: Any, shift: Any) -> tuple[float, float]:
    """scaling/shift given, else the VAE config's ``scaling_factor`` / ``shift_factor``."""
    config = vae.config
    read = (config.get if isinstance(config, dict)
            else lambda name, default=None: getattr(config, name, default))
    if scaling is None:
        scaling = read("scaling_factor", None)
        if scaling is None:
            raise InputError("vae_scaling: the VAE's config has no scaling_factor; pass it "
                             "(e.g. 0.18215 for Stable Diffusion 1.x)")
    if shift is None:
        shift = read("shift_factor", None) or 0.0
    return _positive_float(scaling, "vae_scaling"), float(shift)


def _field_of(first: dict[str, np.ndarray], field: str, what: str) -> np.ndarray:
    if field not in first:
        raise InputError(f"{what}: the source has no field {field!r} (fields: "
                         f"{sorted(k for k in first if k != ID_FIELD)})")
    return np.asarray(first[field])


def _check_image(image: np.ndarray, field: str, pixel_range: str) -> None:
    if image.ndim != 3:
        raise InputError(f"{field}: expected images [N, H, W, C] (NHWC), got one example of "
                         f"shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise InputError(f"{field}: expected uint8 pixels in [0, 255] or floats in [0, 1] "
                         f"(or [-1, 1] with pixel_range='signed'), got dtype {image.dtype}")
    if image.dtype == np.uint8 and pixel_range == "signed":
        raise InputError(f"{field}: pixel_range='signed' is for floats in [-1, 1]; these are "
                         "uint8 pixels (use pixel_range='auto')")


def _pixel_validator(field: str, pixel_range: str):
    low = -1.0 if pixel_range == "signed" else 0.0

    def validate(fields: dict[str, np.ndarray], indices: np.ndarray) -> None:
        image = fields[field]
        if image.dtype == np.uint8:
            return
        bad = np.any((image < low) | (image > 1.0), axis=tuple(range(1, image.ndim)))
        if np.any(bad):
            row = int(np.flatnonzero(bad)[0])
            ids = fields.get(ID_FIELD)
            named = "" if ids is None else f"{ids[row]} "
            raise InputError(f"{field}: example {named}(row {int(indices[row])}) has pixels "
                             f"outside [{low:g}, 1] (min {image[row].min():g}, max "
                             f"{image[row].max():g}); floats must be in [0, 1], or in "
                             "[-1, 1] with pixel_range='signed'")
    return validate


# --------------------------------------------------------------------------- entry point


def diffusion_features(
    model: Model, source: Any, *, schedule: NoiseSchedule,
    features: Sequence[str] = DIFFUSION_FEATURES, timesteps: Sequence[int] | int = (100,),
    noise_draws: int = 4, seed: int = 0, vae: Model | None = None,
    vae_scaling: float | None = None, vae_shift: float | None = None,
    image_field: str = "image", label_field: str = "label", pixel_range: str = "auto",
    secmi_t: int = 100, secmi_interval: int = 10, pia_t: int = 200, pia_p: float = 4.0,
    gm_fraction: float = 0.2, noise_opt_t: int = 100, noise_opt_steps: int = 5,
    noise_opt_lr: float = 0.01, batch_size: int = 64, store: Any = None,
    mesh: Mesh | None = None, progress: bool = True,
) -> dict[str, np.ndarray]:
    """Membership features of every example of ``source`` under a diffusion model.

    Args:
      model: a :class:`memjax.Model` of kind ``"diffusion"``: ``apply(params, {"sample":
        x_t [h, w, c], "timestep": int32 scalar[, "class_labels": int32 scalar]})`` returns
        the model's prediction [h, w, c] (ε, or v / x₀ as ``schedule.prediction_type``
        says; converted to ε exactly).
      source: dict of arrays or memjax source with ``image_field`` [N, H, W, C].
      schedule: the model's :class:`memjax.signals.NoiseSchedule`
        (:func:`memjax.signals.schedule_from_config` of its ``scheduler_config.json``).
      features: any of ``"loss"``, ``"secmi"``, ``"pia"`` (pia and pian), ``"gm_loss"``,
        ``"noise_opt"`` (see :func:`feature_columns` for the column names).
      timesteps: the timesteps of ``loss`` and ``gm_loss``.
      noise_draws: K, noise draws per timestep of ``loss`` (its column is their mean).
      seed: keys the noise with each example's id.
      vae: a model of kind ``"vae"`` (``apply(params, {"image": [H, W, 3] in [-1, 1]})``
        -> the unscaled posterior mean latent): the diffusion model works on latents.
      vae_scaling, vae_shift: x₀ = (latent − shift) · scaling; default the VAE config's
        ``scaling_factor`` / ``shift_factor`` (shift 0 when absent).
      label_field: the class label field, read when ``model.inputs`` has
        ``"class_labels"`` (class-conditional models).
      pixel_range: ``"auto"`` (uint8 [0, 255] or floats in [0, 1]) or ``"signed"`` (floats
        already in [-1, 1]).
      secmi_t, secmi_interval: SecMI's t_SEC and DDIM stride k.
      pia_t, pia_p: PIA's timestep and ℓ_p norm.
      gm_fraction: the fraction of elements the gradient mask keeps.
      noise_opt_t, noise_opt_steps, noise_opt_lr: noise optimisation's timestep, gradient
        steps and step size.
      batch_size: examples per global batch (a multiple of the mesh's data axis).
      store: a :class:`memjax.engine.ScoreStore` or folder: resumable; a rerun resumes.

    Returns:
      ``{"id": [N], column: [N] float32, ...}`` in source order.
    """
    _check_model(model, "diffusion", "model")
    if vae is not None:
        _check_model(vae, "vae", "vae")
    check_choice("pixel_range", pixel_range, PIXEL_RANGES)
    if isinstance(features, str):
        features = (features,)
    features = tuple(dict.fromkeys(features))
    if not features:
        raise InputError(f"features: expected at least one of {list(DIFFUSION_FEATURES)}")
    for feature in features:
        check_choice("features", feature, DIFFUSION_FEATURES)
    if not isinstance(schedule, NoiseSchedule):
        raise InputError(f"schedule: expected a memjax.signals.NoiseSchedule, got "
                         f"{type(schedule).__name__}")
    n = schedule.num_train_timesteps
    timesteps = _int_tuple(timesteps, "timesteps", n)
    secmi_t = _check_timestep(secmi_t, "secmi_t", n)
    secmi_interval = check_positive_int(secmi_interval, "secmi_interval")
    if "secmi" in features and (secmi_t < secmi_interval or secmi_t % secmi_interval
                                or secmi_t + secmi_interval >= n):
        raise InputError(f"secmi_t: expected a positive multiple of secmi_interval "
                         f"({secmi_interval}) with secmi_t + secmi_interval < {n}, got "
                         f"{secmi_t}")
    noise_steps = check_positive_int(noise_opt_steps, "noise_opt_steps")
    source = as_source(source)
    if len(source) == 0:
        raise InputError("source: no examples")
    first = source.read(np.arange(1))
    first = {k: np.asarray(v)[0] for k, v in first.items()}
    image = _field_of(first, image_field, "image_field")
    _check_image(image, image_field, pixel_range)
    labels = None
    if "class_labels" in model.inputs:
        labels = str(label_field)
        label = _field_of(first, labels, "label_field")
        if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
            raise InputError(f"{labels}: expected one integer class label per example, got "
                             f"dtype {label.dtype} shape {label.shape}")
    params: dict[str, Any] = {"model": model.params}
    scaling, shift = 1.0, 0.0
    if vae is not None:
        scaling, shift = _vae_factors(vae, vae_scaling, vae_shift)
        params["vae"] = vae.params
    fn = DiffusionFeatureFn(
        model.apply, schedule, features, timesteps, check_positive_int(noise_draws,
                                                                       "noise_draws"),
        int(seed), image_field, labels, pixel_range,
        None if vae is None else vae.apply, scaling, shift, secmi_t, secmi_interval,
        _check_timestep(pia_t, "pia_t", n), _positive_float(pia_p, "pia_p"),
        _fraction(gm_fraction, "gm_fraction"), _check_timestep(noise_opt_t, "noise_opt_t", n),
        noise_steps, _positive_float(noise_opt_lr, "noise_opt_lr"))
    out = score(fn, params, source, batch_size=batch_size, mesh=mesh, store=store,
                progress=progress, with_ids=True,
                validate=_pixel_validator(image_field, pixel_range))
    if isinstance(out, ScoreStore):
        out = out.read()
    return {"id": np.asarray(out["id"]),
            **{name: np.asarray(out[name]) for name in feature_columns(features, timesteps)}}


__all__ = ["DIFFUSION_FEATURES", "PIXEL_RANGES", "DiffusionFeatureFn",
           "diffusion_features", "feature_columns", "to_signed_pixels"]
