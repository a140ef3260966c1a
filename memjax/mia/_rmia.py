"""RMIA: the robust membership inference attack (Zarifzadeh et al. 2024).

"Low-Cost High-Power Membership Inference Attacks", ICML 2024. The target model's
probability of x is divided by the reference models' average probability p(x), and the
same ratio is computed for population points z known to be non-members; x scores the
fraction of z it beats by a factor γ.

Definitions (float64):

- p(x), offline (the default): ((1+a)/2)·mean_OUT(ref_p) + (1−a)/2, the paper's linear
  approximation of the missing IN models; mean over the reference models that did not
  train on x.
- p(x), online: the mean over all reference models (IN and OUT), no correction.
- p(z), ``population_variant="paper"`` (default): population points are non-members of
  every reference model, so p(z) is the mean over all M reference models (the paper's
  Pr(z) = average over reference models), with the same ((1+a)/2, (1−a)/2) correction
  offline and none online.
- p(z), ``population_variant="privacy-meter"``: what the reference code does instead
  (ml_privacy_meter, ``modules/mia/attacks/rmia.py``, ``run_rmia`` with its default
  ``num_reference_models = max(M // 2, 1)``): the mean of the K = M // 2 *largest* of the
  M population probabilities of z (its ``get_out_ref_signals`` sorts them and keeps the
  first K, written for M = 2K models of which K are OUT for a training point), and of all
  M when K <= 1 (M < 4: that code path does not sort). Corrected like the paper variant.
  memjax applies it in online mode too (the reference code has no online mode).
- ratio_x = target_p / p(x), ratio_z = pop_target_p / p(z).
- score(x) = #{z : ratio_x / ratio_z > γ} / Z, strictly greater, evaluated as
  ratio_x > γ·ratio_z (identical for γ = 1, and defined when ratio_z = 0). Computed by
  sorting γ·ratio_z once and ``np.searchsorted`` (side="left" counts the strictly smaller
  thresholds): O((N + Z) log Z) time and O(N + Z) memory, never an N×Z matrix.

Where the reference code's p(x) differs: it averages the K largest of the M signals with
the IN models' signals set to 0, which is the OUT mean only when every example has exactly
K OUT models (its paired design); memjax always averages the OUT models themselves.

Missing OUT models (offline only; with a random keep matrix some examples have none):
``missing="online"`` (default) gives such an example the online p(x), the mean over its
reference models (all IN; the estimate is biased high, so its score is conservative),
``missing="skip"`` gives it NaN (dropped from the metrics and counted by
:func:`memjax.mia.attack_metrics`).

Higher score = more likely member.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

from memjax._checks import check_choice
from memjax.errors import InputError


def _probabilities(name: str, x: ArrayLike) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(f"{name}: {int(bad.sum())} NaN/Inf values; expected finite numbers")
    if ((x < 0) | (x > 1)).any():
        raise InputError(f"{name}: values outside [0, 1]; expected probabilities")
    return x


def _positive(name: str, p: np.ndarray) -> None:
    zero = np.flatnonzero(p <= 0)
    if zero.size:
        raise InputError(f"{name}: the reference probability p is 0 for {zero.size} "
                         f"points (first: index {int(zero[0])}); expected p > 0 (use a < 1)")


MISSING = ("online", "skip")
POPULATION_VARIANTS = ("paper", "privacy-meter")


def population_mean(pop_ref_p: np.ndarray, variant: str) -> np.ndarray:
    """[Z] the average reference probability of each population point: over all M models
    (``"paper"``) or over the M // 2 largest when M >= 4 (``"privacy-meter"``; see the
    module docstring)."""
    k = pop_ref_p.shape[0] // 2
    if variant == "paper" or k <= 1:
        return pop_ref_p.mean(0)
    return -np.sort(-pop_ref_p, axis=0)[:k].mean(0)


def _validated(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a, gamma):
    if not 0.0 <= a <= 1.0:
        raise InputError(f"a={a}: expected a number in [0, 1]")
    if not (np.isfinite(gamma) and gamma > 0):
        raise InputError(f"gamma={gamma}: expected a positive finite number")
    target_p = _probabilities("target_p", target_p)
    ref_p = _probabilities("ref_p", ref_p)
    pop_target_p = _probabilities("pop_target_p", pop_target_p)
    pop_ref_p = _probabilities("pop_ref_p", pop_ref_p)
    ref_in = np.asarray(ref_in)
    if ref_in.dtype != bool:
        raise InputError(f"ref_in: dtype {ref_in.dtype}; expected a boolean array")
    if target_p.ndim != 1 or target_p.size == 0:
        raise InputError(f"target_p {target_p.shape}: expected [N] with N >= 1")
    n = target_p.shape[0]
    if ref_p.ndim != 2 or ref_p.shape[1] != n or ref_p.shape[0] == 0:
        raise InputError(f"ref_p {ref_p.shape}: expected [M, N] with N = {n}, M >= 1")
    if ref_in.shape != ref_p.shape:
        raise InputError(f"ref_in {ref_in.shape}: expected [M, N] = {ref_p.shape}")
    if pop_target_p.ndim != 1 or pop_target_p.size == 0:
        raise InputError(f"pop_target_p {pop_target_p.shape}: expected [Z] with Z >= 1")
    if pop_ref_p.shape != (ref_p.shape[0], pop_target_p.shape[0]):
        raise InputError(f"pop_ref_p {pop_ref_p.shape}: expected [M, Z] = "
                         f"{(ref_p.shape[0], pop_target_p.shape[0])}")
    return target_p, ref_p, ref_in, pop_target_p, pop_ref_p


def rmia(target_p: ArrayLike, ref_p: ArrayLike, ref_in: ArrayLike, pop_target_p: ArrayLike,
         pop_ref_p: ArrayLike, *, a: float = 1.0, gamma: float = 1.0,
         online: bool = False, missing: str = "online",
         population_variant: str = "paper") -> np.ndarray:
    """RMIA scores (Zarifzadeh et al. 2024); see the module docstring for the definition.

    Args:
      target_p: [N] Pr(x | θ_target) of each example (e.g. the true-class probability).
      ref_p: [M, N] the same probability under M reference models.
      ref_in: [M, N] bool, whether reference model m trained on example n.
      pop_target_p: [Z] Pr(z | θ_target) of population points z (non-members of all).
      pop_ref_p: [M, Z] the same under the reference models.
      a: offline correction in [0, 1]; a = 1 uses the plain OUT mean. Ignored online.
      gamma: likelihood-ratio threshold γ > 0.
      online: average all reference models for p(x) instead of the corrected OUT mean.
      missing: offline, what an example without OUT reference models gets: "online"
        (the online p(x)) or "skip" (NaN); see the module docstring.
      population_variant: "paper" (p(z) over all reference models) or "privacy-meter"
        (the reference code's mean of the M // 2 largest); see the module docstring.

    Returns:
      [N] float64 scores in [0, 1], higher = more likely member; NaN for the examples
      ``missing="skip"`` leaves unscored.

    Raises:
      InputError: mismatched shapes, non-boolean ``ref_in``, NaN/Inf or values outside
        [0, 1], a or γ out of range, an unknown option, or p = 0.
    """
    check_choice("missing", missing, MISSING)
    check_choice("population_variant", population_variant, POPULATION_VARIANTS)
    target_p, ref_p, ref_in, pop_target_p, pop_ref_p = _validated(
        target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a, gamma)
    p_z = population_mean(pop_ref_p, population_variant)
    p_x = ref_p.mean(0)
    no_out = ref_in.all(0)
    if not online:
        out = ~ref_in
        out_mean = np.where(out, ref_p, 0.0).sum(0) / np.maximum(out.sum(0), 1)
        p_x = np.where(no_out, p_x, (1 + a) / 2 * out_mean + (1 - a) / 2)
        p_z = (1 + a) / 2 * p_z + (1 - a) / 2
    skipped = no_out & (not online) & (missing == "skip")
    _positive("ref_p", np.where(skipped, 1.0, p_x))
    _positive("pop_ref_p", p_z)
    thresholds = np.sort(gamma * (pop_target_p / p_z))
    # side="left": the number of thresholds strictly below ratio_x, i.e. "> γ" strictly.
    wins = np.searchsorted(thresholds, target_p / np.where(skipped, 1.0, p_x), side="left")
    return np.where(skipped, np.nan, wins / thresholds.size)


def choose_a(ref_p: ArrayLike, ref_in: ArrayLike, pop_ref_p: ArrayLike, *,
             target_index: int = 0, grid: ArrayLike | None = None,
             gamma: float = 1.0, missing: str = "online",
             population_variant: str = "paper") -> float:
    """Pick RMIA's offline ``a`` by attacking one reference model with the others.

    Zarifzadeh et al. (2024) tune a without extra models: one reference model is held out
    and plays the target — reference model ``target_index`` (default 0: the first
    reference model, i.e. the first model other than the attacked one in the order the
    caller lists them) — with its ``ref_in`` row as the ground truth and its own
    population probabilities ``pop_ref_p[target_index]``; the remaining M − 1 models are
    its references, and the offline attack's AUC (memjax.metrics.roc_auc, ties 1/2, over
    the examples it scores) is computed for every a in ``grid``.

    Differences from the reference code (ml_privacy_meter's ``tune_offline_a``): it
    attacks the model *paired* with the target (trained on the complementary half) with
    the target's references, one reference model per example (``num_reference_models=1``)
    and the *target's* population probabilities; memjax holds out one reference model,
    attacks it with all the others, and uses the held-out model's own population
    probabilities, so the target model is never looked at.

    Args:
      ref_p: [M, N] Pr(x | reference model m), M >= 2.
      ref_in: [M, N] bool membership of the reference models.
      pop_ref_p: [M, Z] population probabilities under the reference models.
      target_index: which reference model is held out to play the target.
      grid: candidate values of a in [0, 1]; default 0, 0.1, ..., 1 (the reference code's).
      gamma, missing, population_variant: as in :func:`rmia`.

    Returns:
      The a with the largest AUC; the first (smallest index in ``grid``) among equals.

    Raises:
      InputError: as :func:`rmia`; with what to do instead when it cannot run: fewer than
        two reference models, or a held-out model that trained on all or none of the
        examples it would be scored on (pass ``a`` yourself, or hold out another model).
    """
    from memjax.metrics import roc_auc

    ref_p = np.asarray(ref_p, dtype=np.float64)
    ref_in = np.asarray(ref_in)
    pop_ref_p = np.asarray(pop_ref_p, dtype=np.float64)
    if ref_p.ndim != 2 or ref_p.shape[0] < 2:
        raise InputError(f"ref_p {ref_p.shape}: choosing a holds one reference model out to "
                         "play the target and needs at least 2 reference models [M, N], "
                         "M >= 2; with fewer, give a yourself (memjax mia rmia --a, e.g. "
                         "0.3 as the reference code's default)")
    if ref_in.shape != ref_p.shape or pop_ref_p.ndim != 2 or pop_ref_p.shape[0] != len(ref_p):
        raise InputError(f"ref_in {ref_in.shape}, pop_ref_p {pop_ref_p.shape}: expected "
                         f"[M, N] = {ref_p.shape} and [M, Z]")
    if ref_in.dtype != bool:
        raise InputError(f"ref_in: dtype {ref_in.dtype}; expected a boolean array")
    if not (isinstance(target_index, int | np.integer) and 0 <= target_index < len(ref_p)):
        raise InputError(f"target_index={target_index}: expected an int in [0, {len(ref_p)})")
    grid = np.round(np.arange(11) / 10, 10) if grid is None else np.asarray(grid, np.float64)
    if grid.ndim != 1 or grid.size == 0 or not ((grid >= 0) & (grid <= 1)).all():
        raise InputError(f"grid: expected a non-empty 1-D array of values in [0, 1], got "
                         f"shape {grid.shape}")
    rest = np.arange(len(ref_p)) != target_index
    members = ref_in[target_index]
    # The examples the held-out attack scores (with missing="skip", not those without OUT).
    scored = ~ref_in[rest].all(0) if missing == "skip" else np.ones(members.shape, bool)
    if members[scored].all() or not members[scored].any():
        raise InputError(f"ref_in[{target_index}]: the held-out reference model (the one "
                         f"choosing a attacks) trained on {int(members[scored].sum())} of "
                         f"the {int(scored.sum())} examples it is scored on; its AUC needs "
                         "members and non-members: hold out another model (target_index) "
                         "or give a yourself (memjax mia rmia --a)")
    aucs = []
    for a in grid:
        scores = rmia(ref_p[target_index], ref_p[rest], ref_in[rest],
                      pop_ref_p[target_index], pop_ref_p[rest], a=float(a), gamma=gamma,
                      missing=missing, population_variant=population_variant)
        aucs.append(roc_auc(scores[scored], members[scored]))
    return float(grid[int(np.argmax(aucs))])
