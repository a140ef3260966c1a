"""LiRA: the likelihood-ratio membership inference attack (Carlini et al. 2022).

"Membership Inference Attacks From First Principles", IEEE S&P 2022. For every example the
attack fits one Gaussian to the logit-scaled confidence φ of the reference models that
trained on it (IN) and one to those that did not (OUT), then asks how much better the
target model's φ is explained by the IN Gaussian (online) or how far it lies above the OUT
Gaussian (offline).

Definitions (per example n and augmentation/query a; all in float64):

- location μ: the mean (``estimator="mean"``, the paper) or the median
  (``estimator="median"``, the reference code) of φ over the IN / OUT reference models;
  an even count takes the midpoint of the two middle values, as ``np.median`` does.
- scale σ: the population standard deviation (ddof=0, as ``np.std``) over the same models,
  per example and augmentation; with ``fixed_variance=True`` one global σ_in (and σ_out):
  the standard deviation of *all* IN (OUT) values of every example, model and augmentation
  around their grand mean, which is how the reference code pools it (``np.std(dat_in)``).
  The reference code then also uses σ_in for OUT (a bug); memjax uses the OUT values.
  Unlike the reference, no example's reference models are truncated to the smallest count.
- floor: σ = max(σ, ``std_floor``) (default 1e-30, the reference code adds 1e-30), so a
  single reference model or identical values give a finite, very confident score instead
  of a division by zero.
- online: log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out).
- offline, ``offline_test="one_sided"`` (the paper: the target's φ is larger than the OUT
  distribution): log Φ((φ − μ_out)/σ_out), computed with ``scipy.special.log_ndtr`` so
  members far in the upper tail stay distinguishable. ``offline_test="density"`` is the
  reference code's two-sided variant: −log N(φ; μ_out, σ_out).
- A > 1 augmentations: the per-augmentation scores are averaged (the reference code;
  the paper's diagonal Gaussian sums them, which ranks examples identically).

Missing reference models. With a random keep matrix and few reference models, some
examples have no IN or no OUT reference model (8 models trained on independent random
halves leave 2⁻⁸ of the examples without each). ``lira`` never stops for them;
``missing`` says what they get:

- ``"offline"`` (default): online, an example without IN models gets the offline test
  (``offline_test``) on its OUT fit, so it is still scored; note the two tests' scores
  are on different scales (a log likelihood ratio vs a log tail probability), so rank
  such examples with care — their number is reported (:func:`missing_references`).
- ``"skip"``: online, an example without IN models gets NaN.
- Either way, an example without OUT models gets NaN: both tests compare the target
  with the OUT Gaussian, and there is nothing to compare with. NaN scores are dropped
  from the metrics (:func:`memjax.mia.attack_metrics`) and counted there.

The pooled σ of ``fixed_variance`` uses the examples that have the models it pools.
The reference code has no such rule: it truncates every example to the smallest IN/OUT
count and fails when that is 0.

Higher score = more likely member.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike
from scipy.special import log_ndtr

from memjax.errors import InputError

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def _finite(name: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(f"{name}: {int(bad.sum())} NaN/Inf values; expected finite numbers")


def _bool_mask(name: str, mask: ArrayLike) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise InputError(f"{name}: dtype {mask.dtype}; expected a boolean array")
    return mask


MISSING = ("offline", "skip")


def missing_references(ref_in: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(no_in, no_out): [N] bool, examples that no reference model trained on (no IN
    model) and examples that every reference model trained on (no OUT model).

    Args:
      ref_in: [M, N] bool, whether reference model m trained on example n.
    """
    ref_in = _bool_mask("ref_in", ref_in)
    if ref_in.ndim != 2:
        raise InputError(f"ref_in {ref_in.shape}: expected [M, N]")
    return ~ref_in.any(0), ref_in.all(0)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of ``values`` [M, ...] where ``mask`` [M, ...] is true (NaN where
    the count is 0)."""
    count = mask.sum(0)
    return np.where(mask, values, 0.0).sum(0) / np.where(count > 0, count, np.nan)


def masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median over axis 0 of ``values`` [M, ...] where ``mask`` is true (count > 0).

    Vectorised: masked-out entries are sorted to the end as +inf, then the two middle
    elements of each column's k valid values are averaged (equal when k is odd). Columns
    with k = 0 give +inf; callers mask them.
    """
    k = np.maximum(mask.sum(0), 1)
    ordered = np.sort(np.where(mask, values, np.inf), axis=0)
    lo = np.take_along_axis(ordered, ((k - 1) // 2)[None], axis=0)[0]
    hi = np.take_along_axis(ordered, (k // 2)[None], axis=0)[0]
    return 0.5 * (lo + hi)


def masked_std(values: np.ndarray, mask: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Population std (ddof=0) over axis 0 around the masked mean ``mean`` (NaN where the
    count is 0)."""
    count = mask.sum(0)
    squares = np.where(mask, (values - np.nan_to_num(mean)) ** 2, 0.0).sum(0)
    return np.sqrt(squares / np.where(count > 0, count, np.nan))


def _log_normal(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI


def _fit(values: np.ndarray, mask: np.ndarray, estimator: str, fixed_variance: bool,
         std_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ), each [N, A], of ``values`` [M, N, A] over the models where ``mask`` [M, N, 1];
    NaN for examples without any such model."""
    mask = np.broadcast_to(mask, values.shape)
    mean = masked_mean(values, mask)
    mu = mean if estimator == "mean" else masked_median(values, mask)
    if fixed_variance:
        # The reference code's pooled σ: np.std of every selected value, around the grand mean.
        pooled = values[mask].std() if mask.any() else np.nan
        sigma = np.full(mu.shape, pooled)
    else:
        sigma = masked_std(values, mask, mean)
    empty = ~mask.any(0)
    return np.where(empty, np.nan, mu), np.where(empty, np.nan, np.maximum(sigma, std_floor))


def lira(target: ArrayLike, ref: ArrayLike, ref_in: ArrayLike, *, online: bool = True,
         fixed_variance: bool = False, estimator: str = "mean",
         offline_test: str = "one_sided", std_floor: float = 1e-30,
         missing: str = "offline") -> np.ndarray:
    """LiRA scores (Carlini et al. 2022); see the module docstring for the exact definition.

    Args:
      target: [N] or [N, A] φ of the target model (A augmentations / queries per example).
      ref: [M, N] or [M, N, A] φ of M reference models on the same examples and queries.
      ref_in: [M, N] bool, whether reference model m trained on example n.
      online: compare IN vs OUT Gaussians; offline uses the OUT models only.
      fixed_variance: one global σ_in / σ_out pooled over all examples (reference code).
      estimator: "mean" (paper) or "median" (reference code) for the Gaussian's location.
      offline_test: "one_sided" (paper, log Φ of the OUT z-score) or "density" (reference
        code, −log N under the OUT Gaussian). Ignored when online.
      std_floor: lower bound on every σ, so degenerate reference values stay finite.
      missing: online, what an example without IN reference models gets: "offline" (the
        offline test on its OUT fit) or "skip" (NaN). Examples without OUT reference
        models get NaN whatever ``missing`` says (module docstring).

    Returns:
      [N] float64 scores, higher = more likely member; NaN for the examples the module
      docstring's rules leave unscored (count them with :func:`missing_references`).

    Raises:
      InputError: mismatched shapes, non-boolean ``ref_in``, NaN/Inf values or an unknown
        option.
    """
    if estimator not in ("mean", "median"):
        raise InputError(f"estimator={estimator!r}: expected 'mean' or 'median'")
    if offline_test not in ("one_sided", "density"):
        raise InputError(f"offline_test={offline_test!r}: expected 'one_sided' or 'density'")
    if missing not in MISSING:
        raise InputError(f"missing={missing!r}: expected 'offline' or 'skip'")
    if not (np.isfinite(std_floor) and std_floor > 0):
        raise InputError(f"std_floor={std_floor}: expected a positive finite number")
    target = np.asarray(target, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    ref_in = _bool_mask("ref_in", ref_in)
    if target.ndim not in (1, 2) or target.shape[0] == 0:
        raise InputError(f"target {target.shape}: expected [N] or [N, A] with N >= 1")
    if ref.ndim != target.ndim + 1 or ref.shape[1:] != target.shape or ref.shape[0] == 0:
        raise InputError(f"ref {ref.shape}: expected [M, *target.shape] = [M, "
                         f"{', '.join(map(str, target.shape))}] with M >= 1")
    if ref_in.shape != ref.shape[:2]:
        raise InputError(f"ref_in {ref_in.shape}: expected [M, N] = {ref.shape[:2]}")
    _finite("target", target)
    _finite("ref", ref)

    # Work in [N, A] / [M, N, A] throughout; a 1-D target is one query per example.
    if target.ndim == 1:
        target, ref = target[:, None], ref[..., None]
    mask_in = ref_in[..., None]
    no_in, no_out = missing_references(ref_in)
    with np.errstate(invalid="ignore"):  # NaN fits of examples without models stay NaN
        mu_out, sd_out = _fit(ref, ~mask_in, estimator, fixed_variance, std_floor)
        if offline_test == "one_sided":
            offline = log_ndtr((target - mu_out) / sd_out).mean(1)
        else:
            offline = -_log_normal(target, mu_out, sd_out).mean(1)
        if not online:
            return np.where(no_out, np.nan, offline)
        mu_in, sd_in = _fit(ref, mask_in, estimator, fixed_variance, std_floor)
        ratio = (_log_normal(target, mu_in, sd_in)
                 - _log_normal(target, mu_out, sd_out)).mean(1)
    fallback = offline if missing == "offline" else np.full_like(offline, np.nan)
    return np.where(no_out, np.nan, np.where(no_in, fallback, ratio))
