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
- p(z): population points are non-members of every reference model, so p(z) is the mean
  over all reference models, with the same ((1+a)/2, (1−a)/2) correction offline (as the
  reference code, ml_privacy_meter, does) and none online.
- ratio_x = target_p / p(x), ratio_z = pop_target_p / p(z).
- score(x) = #{z : ratio_x / ratio_z > γ} / Z, strictly greater, evaluated as
  ratio_x > γ·ratio_z (identical for γ = 1, and defined when ratio_z = 0). Computed by
  sorting γ·ratio_z once and ``np.searchsorted`` (side="left" counts the strictly smaller
  thresholds): O((N + Z) log Z) time and O(N + Z) memory, never an N×Z matrix.

Higher score = more likely member.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

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


def _validated(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a, gamma, online):
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
    if not online:
        no_out = np.flatnonzero(ref_in.all(0))
        if no_out.size:
            raise InputError(f"ref_in: {no_out.size} examples have no OUT reference model "
                             f"(first: index {int(no_out[0])}); offline RMIA needs one each")
    return target_p, ref_p, ref_in, pop_target_p, pop_ref_p


def rmia(target_p: ArrayLike, ref_p: ArrayLike, ref_in: ArrayLike, pop_target_p: ArrayLike,
         pop_ref_p: ArrayLike, *, a: float = 1.0, gamma: float = 1.0,
         online: bool = False) -> np.ndarray:
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

    Returns:
      [N] float64 scores in [0, 1], higher = more likely member.

    Raises:
      InputError: mismatched shapes, non-boolean ``ref_in``, NaN/Inf or values outside
        [0, 1], a or γ out of range, an example without an OUT model (offline), or p = 0.
    """
    target_p, ref_p, ref_in, pop_target_p, pop_ref_p = _validated(
        target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a, gamma, online)
    if online:
        p_x = ref_p.mean(0)
        p_z = pop_ref_p.mean(0)
    else:
        out = ~ref_in
        p_x = (1 + a) / 2 * (np.where(out, ref_p, 0.0).sum(0) / out.sum(0)) + (1 - a) / 2
        p_z = (1 + a) / 2 * pop_ref_p.mean(0) + (1 - a) / 2
    _positive("ref_p", p_x)
    _positive("pop_ref_p", p_z)
    thresholds = np.sort(gamma * (pop_target_p / p_z))
    # side="left": the number of thresholds strictly below ratio_x, i.e. "> γ" strictly.
    wins = np.searchsorted(thresholds, target_p / p_x, side="left")
    return wins / thresholds.size


def choose_a(ref_p: ArrayLike, ref_in: ArrayLike, pop_ref_p: ArrayLike, *,
             target_index: int = 0, grid: ArrayLike | None = None,
             gamma: float = 1.0) -> float:
    """Pick RMIA's offline ``a`` by attacking one reference model with the others.

    Zarifzadeh et al. (2024) tune a without extra models: reference model ``target_index``
    plays the target (its ``ref_in`` row is the ground truth), the remaining M − 1 models
    are the references, and the offline attack's AUC (memjax.metrics.roc_auc, ties 1/2) is
    computed for every a in ``grid``. The reference code also leaves out the model paired
    with the target (trained on the complementary half); memjax leaves out only the target.

    Args:
      ref_p: [M, N] Pr(x | reference model m), M >= 2.
      ref_in: [M, N] bool membership of the reference models.
      pop_ref_p: [M, Z] population probabilities under the reference models.
      target_index: which reference model plays the target.
      grid: candidate values of a in [0, 1]; default 0, 0.1, ..., 1 (the reference code's).
      gamma: γ of the attack.

    Returns:
      The a with the largest AUC; the first (smallest index in ``grid``) among equals.

    Raises:
      InputError: as :func:`rmia`, M < 2, a bad ``target_index`` or ``grid``, or a target
        row without both members and non-members.
    """
    from memjax.metrics import roc_auc

    ref_p = np.asarray(ref_p, dtype=np.float64)
    ref_in = np.asarray(ref_in)
    pop_ref_p = np.asarray(pop_ref_p, dtype=np.float64)
    if ref_p.ndim != 2 or ref_p.shape[0] < 2:
        raise InputError(f"ref_p {ref_p.shape}: expected [M, N] with M >= 2")
    if ref_in.shape != ref_p.shape or pop_ref_p.ndim != 2 or pop_ref_p.shape[0] != len(ref_p):
        raise InputError(f"ref_in {ref_in.shape}, pop_ref_p {pop_ref_p.shape}: expected "
                         f"[M, N] = {ref_p.shape} and [M, Z]")
    if not (isinstance(target_index, int | np.integer) and 0 <= target_index < len(ref_p)):
        raise InputError(f"target_index={target_index}: expected an int in [0, {len(ref_p)})")
    grid = np.round(np.arange(11) / 10, 10) if grid is None else np.asarray(grid, np.float64)
    if grid.ndim != 1 or grid.size == 0 or not ((grid >= 0) & (grid <= 1)).all():
        raise InputError(f"grid: expected a non-empty 1-D array of values in [0, 1], got "
                         f"shape {grid.shape}")
    members = ref_in[target_index]
    if ref_in.dtype == bool and (members.all() or not members.any()):
        raise InputError(f"ref_in[{target_index}]: the target reference model needs both "
                         "members and non-members to compute an AUC")
    rest = np.arange(len(ref_p)) != target_index
    aucs = [roc_auc(rmia(ref_p[target_index], ref_p[rest], ref_in[rest],
                         pop_ref_p[target_index], pop_ref_p[rest], a=float(a), gamma=gamma),
                    members)
            for a in grid]
    return float(grid[int(np.argmax(aucs))])
