"""LiRA and RMIA against independent float64 NumPy loops, ties, edge cases and errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from memjax.errors import InputError
from memjax.mia._arrays import (
    lira_attacks,
    load_signals,
    phi_from_logits,
    reference_signals,
    rmia_attacks,
)
from memjax.mia._lira import lira, missing_references
from memjax.mia._rmia import choose_a, rmia

FLOOR = 1e-30


# ----------------------------------------------------------------------------- LiRA


def naive_lira(target, ref, ref_in, *, online=True, fixed_variance=False, estimator="mean",
               offline_test="one_sided", missing="offline"):
    target = np.asarray(target, np.float64)
    ref = np.asarray(ref, np.float64)
    if target.ndim == 1:
        target, ref = target[:, None], ref[..., None]
    m, n, n_aug = ref.shape
    loc = np.mean if estimator == "mean" else np.median
    all_in = [ref[i, j, k] for i in range(m) for j in range(n) for k in range(n_aug)
              if ref_in[i, j]]
    all_out = [ref[i, j, k] for i in range(m) for j in range(n) for k in range(n_aug)
               if not ref_in[i, j]]
    scores = np.zeros(n)
    for j in range(n):
        per_aug = []
        for k in range(n_aug):
            xin = np.array([ref[i, j, k] for i in range(m) if ref_in[i, j]])
            xout = np.array([ref[i, j, k] for i in range(m) if not ref_in[i, j]])
            if xout.size == 0 or (online and xin.size == 0 and missing == "skip"):
                per_aug.append(np.nan)  # no OUT model: no test; no IN model: skipped
                continue
            sd_out = max(np.std(all_out) if fixed_variance else np.std(xout), FLOOR)
            t = target[j, k]
            if online and xin.size:
                sd_in = max(np.std(all_in) if fixed_variance else np.std(xin), FLOOR)
                s = norm.logpdf(t, loc(xin), sd_in) - norm.logpdf(t, loc(xout), sd_out)
            elif offline_test == "one_sided":  # offline, or online without IN models
                s = norm.logcdf(t, loc(xout), sd_out)
            else:
                s = -norm.logpdf(t, loc(xout), sd_out)
            per_aug.append(s)
        scores[j] = np.mean(per_aug)
    return scores


def random_membership(rng, m, n, *, min_in=1, min_out=1):
    """[M, N] bool with at least min_in IN and min_out OUT models per example."""
    while True:
        ref_in = rng.random((m, n)) < 0.5
        if (ref_in.sum(0) >= min_in).all() and ((~ref_in).sum(0) >= min_out).all():
            return ref_in


def lira_case(rng, m=8, n=40, n_aug=None):
    ref_in = random_membership(rng, m, n)
    shape = (n,) if n_aug is None else (n, n_aug)
    base = rng.normal(size=shape)
    extra = (1,) * (len(shape) - 1)
    ref = base + rng.normal(size=(m, *shape)) + 1.5 * ref_in.reshape(m, n, *extra)
    target = base + rng.normal(size=shape) + rng.integers(0, 2, size=(n, *extra))
    return target, ref, ref_in


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed_variance", [False, True])
@pytest.mark.parametrize("estimator", ["mean", "median"])
@pytest.mark.parametrize("n_aug", [None, 1, 3])
def test_lira_matches_loops(online, fixed_variance, estimator, n_aug, rng):
    target, ref, ref_in = lira_case(rng, m=int(rng.integers(4, 10)), n_aug=n_aug)
    got = lira(target, ref, ref_in, online=online, fixed_variance=fixed_variance,
               estimator=estimator)
    want = naive_lira(target, ref, ref_in, online=online, fixed_variance=fixed_variance,
                      estimator=estimator)
    assert got.shape == (target.shape[0],) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["mean", "median"])
def test_lira_offline_density_variant(estimator, rng):
    target, ref, ref_in = lira_case(rng, n_aug=2)
    got = lira(target, ref, ref_in, online=False, offline_test="density", estimator=estimator)
    want = naive_lira(target, ref, ref_in, online=False, offline_test="density",
                      estimator=estimator)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_lira_one_in_one_out_model_is_finite_and_floored(rng):
    n = 12
    ref_in = np.zeros((2, n), bool)
    ref_in[rng.integers(0, 2, n), np.arange(n)] = True  # exactly one IN and one OUT each
    ref = rng.normal(size=(2, n))
    target = rng.normal(size=n)
    for online in (True, False):
        got = lira(target, ref, ref_in, online=online)
        assert np.isfinite(got).all()
        want = naive_lira(target, ref, ref_in, online=online)
        np.testing.assert_allclose(got, want, rtol=1e-9)
    # Closer to the single IN value than to the single OUT value -> positive online score.
    closer_in = (np.abs(target - ref[ref_in.argmax(0), np.arange(n)])
                 < np.abs(target - ref[(~ref_in).argmax(0), np.arange(n)]))
    np.testing.assert_array_equal(lira(target, ref, ref_in) > 0, closer_in)


def test_lira_few_models_ragged_counts_with_median(rng):
    m, n = 5, 30
    ref_in = np.zeros((m, n), bool)
    # 1..4 IN models per example, rest OUT: odd and even counts for the median.
    for j in range(n):
        ref_in[rng.permutation(m)[: 1 + j % 4], j] = True
    ref = rng.normal(size=(m, n, 2))
    target = rng.normal(size=(n, 2))
    for online in (True, False):
        got = lira(target, ref, ref_in, online=online, estimator="median")
        want = naive_lira(target, ref, ref_in, online=online, estimator="median")
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_lira_ties_and_identical_reference_values(rng):
    m, n = 4, 3
    ref_in = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 1, 0]], bool)
    ref = np.ones((m, n))  # every reference value coincides: σ hits the floor
    target = np.array([1.0, 1.0, 2.0])
    got = lira(target, ref, ref_in)
    # IN and OUT Gaussians coincide: the likelihood ratio is exactly 0, never NaN.
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])
    off = lira(target, ref, ref_in, online=False)
    assert np.isfinite(off).all()
    assert off[0] == off[1] == np.log(0.5) and off[2] == 0.0  # at μ_out: log Φ(0); above: 0
    # Two identical examples get identical scores (ties stay ties).
    t, r, ri = lira_case(rng)
    t[1], r[:, 1], ri[:, 1] = t[0], r[:, 0], ri[:, 0]
    s = lira(t, r, ri)
    assert s[0] == s[1]


def test_lira_direction_members_score_higher(rng):
    m, n = 16, 400
    ref_in = random_membership(rng, m, n, min_in=2, min_out=2)
    base = rng.normal(size=n)
    ref = base + 0.3 * rng.normal(size=(m, n)) + 2.0 * ref_in
    is_member = rng.random(n) < 0.5
    target = base + 0.3 * rng.normal(size=n) + 2.0 * is_member
    for online in (True, False):
        s = lira(target, ref, ref_in, online=online)
        # Medians, not means: a σ fitted on two IN models can be tiny, and one member far
        # from its IN mean then gets a score of -1e5 that drags a mean below the other's
        # (seed 2127061867 did).
        assert np.median(s[is_member]) > np.median(s[~is_member])


def keep_with_gaps(rng, m, n, *, no_in=3, no_out=2):
    """[M, N] random halves (an ordinary keep matrix), with at least ``no_in`` examples
    that no model trained on and ``no_out`` that every model trained on."""
    ref_in = rng.random((m, n)) < 0.5
    cols = rng.permutation(n)
    ref_in[:, cols[:no_in]] = False
    ref_in[:, cols[no_in:no_in + no_out]] = True
    return ref_in


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("missing", ["offline", "skip"])
@pytest.mark.parametrize("fixed_variance", [False, True])
@pytest.mark.parametrize("n_aug", [None, 2])
def test_lira_missing_reference_models_match_loops(online, missing, fixed_variance, n_aug,
                                                   rng):
    # 8 reference models, a random keep matrix: some examples lack IN or OUT models.
    m, n = 8, 60
    ref_in = keep_with_gaps(rng, m, n)
    shape = (n,) if n_aug is None else (n, n_aug)
    extra = (1,) * (len(shape) - 1)
    ref = rng.normal(size=(m, *shape)) + 1.5 * ref_in.reshape(m, n, *extra)
    target = rng.normal(size=shape)
    got = lira(target, ref, ref_in, online=online, missing=missing,
               fixed_variance=fixed_variance)
    want = naive_lira(target, ref, ref_in, online=online, missing=missing,
                      fixed_variance=fixed_variance)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)  # NaN where NaN
    no_in, no_out = missing_references(ref_in)
    np.testing.assert_array_equal(no_in, ref_in.sum(0) == 0)
    np.testing.assert_array_equal(no_out, ref_in.sum(0) == m)
    skipped = no_out | (no_in & online & (missing == "skip"))
    np.testing.assert_array_equal(np.isnan(got), skipped)
    if online and missing == "offline":  # the fallback is exactly the offline test
        offline = lira(target, ref, ref_in, online=False, fixed_variance=fixed_variance)
        np.testing.assert_array_equal(got[no_in], offline[no_in])


@pytest.mark.parametrize("online", [True, False])
def test_lira_missing_reference_models_with_the_median(online, rng):
    m, n = 8, 40
    ref_in = keep_with_gaps(rng, m, n)
    ref = rng.normal(size=(m, n, 2)) + 1.5 * ref_in[..., None]
    target = rng.normal(size=(n, 2))
    got = lira(target, ref, ref_in, online=online, estimator="median")
    want = naive_lira(target, ref, ref_in, online=online, estimator="median")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_lira_without_any_in_model_is_all_offline(rng):
    ref_in = np.zeros((4, 10), bool)
    ref = rng.normal(size=(4, 10))
    target = rng.normal(size=10)
    for fixed_variance in (False, True):  # no IN value anywhere to pool: still defined
        got = lira(target, ref, ref_in, fixed_variance=fixed_variance)
        np.testing.assert_array_equal(got, lira(target, ref, ref_in, online=False,
                                                fixed_variance=fixed_variance))
    assert np.isnan(lira(target, ref, ref_in, missing="skip")).all()


def test_lira_errors(rng):
    target, ref, ref_in = lira_case(rng, m=4, n=6)
    with pytest.raises(InputError, match="ref_in: dtype"):
        lira(target, ref, ref_in.astype(int))
    with pytest.raises(InputError, match=r"ref \("):
        lira(target, ref[:, :5], ref_in)
    with pytest.raises(InputError, match=r"ref_in \("):
        lira(target, ref, ref_in[:, :5])
    with pytest.raises(InputError, match="target"):
        lira(np.zeros((6, 2, 2)), ref, ref_in)
    bad = ref.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="ref: 1 NaN/Inf"):
        lira(target, bad, ref_in)
    with pytest.raises(InputError, match="target: 1 NaN/Inf"):
        lira(np.r_[np.inf, target[1:]], ref, ref_in)
    with pytest.raises(InputError, match="missing="):
        lira(target, ref, ref_in, missing="drop")
    with pytest.raises(InputError, match="estimator"):
        lira(target, ref, ref_in, estimator="mode")
    with pytest.raises(InputError, match="offline_test"):
        lira(target, ref, ref_in, online=False, offline_test="two")


# ----------------------------------------------------------------------------- RMIA


def privacy_meter_population_mean(pop_ref_p):
    """Privacy Meter's mean_out_z (modules/mia/attacks/rmia.py: run_rmia's default
    num_reference_models = max(M // 2, 1), get_out_ref_signals with no memberships), in
    its samples x models layout."""
    signals = pop_ref_p.T  # (num_samples, num_models)
    k = max(signals.shape[1] // 2, 1)
    if k > 1:
        signals = -np.sort(-signals, axis=1)[:, :k]
    return np.mean(signals, axis=1)


def naive_rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, *, a=1.0, gamma=1.0,
               online=False, missing="online", population_variant="paper"):
    m, n = ref_p.shape
    z = pop_target_p.shape[0]
    p_x = np.zeros(n)
    for j in range(n):
        outs = [ref_p[i, j] for i in range(m) if not ref_in[i, j]]
        if online or not outs:  # online, or offline without OUT models (missing="online")
            p_x[j] = np.mean(ref_p[:, j])
        else:
            p_x[j] = (1 + a) / 2 * np.mean(outs) + (1 - a) / 2
    if population_variant == "paper":
        p_z = np.array([np.mean(pop_ref_p[:, k]) for k in range(z)])
    else:
        p_z = privacy_meter_population_mean(pop_ref_p)
    if not online:
        p_z = (1 + a) / 2 * p_z + (1 - a) / 2
    ratio_x = target_p / p_x
    ratio_z = pop_target_p / p_z
    wins = ratio_x[:, None] > gamma * ratio_z[None, :]  # the N x Z matrix
    scores = wins.mean(1)
    if missing == "skip" and not online:
        scores[ref_in.all(0)] = np.nan
    return scores, ratio_x, ratio_z


def rmia_case(rng, m=6, n=50, z=80):
    ref_in = random_membership(rng, m, n, min_in=0)
    ref_p = rng.uniform(0.01, 1.0, size=(m, n))
    target_p = rng.uniform(0.01, 1.0, size=n)
    pop_ref_p = rng.uniform(0.01, 1.0, size=(m, z))
    pop_target_p = rng.uniform(0.01, 1.0, size=z)
    return target_p, ref_p, ref_in, pop_target_p, pop_ref_p


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("a,gamma", [(1.0, 1.0), (0.3, 1.0), (0.0, 2.0), (0.7, 0.5)])
def test_rmia_matches_naive_matrix(online, a, gamma, rng):
    args = rmia_case(rng)
    got = rmia(*args, a=a, gamma=gamma, online=online)
    want, _, _ = naive_rmia(*args, a=a, gamma=gamma, online=online)
    np.testing.assert_array_equal(got, want)


def test_rmia_ties_are_not_counted(rng):
    m, n, z = 3, 40, 60
    ref_in = random_membership(rng, m, n, min_in=0)
    # Dyadic probabilities with p(x) = p(z) = 1/2 make many ratios exactly equal.
    ref_p = np.full((m, n), 0.5)
    pop_ref_p = np.full((m, z), 0.5)
    levels = np.arange(1, 9) / 8
    target_p = rng.choice(levels, n)
    pop_target_p = rng.choice(levels, z)
    for gamma in (1.0, 2.0, 0.5):
        got = rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, gamma=gamma)
        want, rx, rz = naive_rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p,
                                  gamma=gamma)
        assert (rx[:, None] == gamma * rz[None, :]).any()  # the case really has ties
        np.testing.assert_array_equal(got, want)
        # Division form of the definition agrees on these exact ties.
        np.testing.assert_array_equal(got, (rx[:, None] / rz[None, :] > gamma).mean(1))
    # All ratios equal: nobody is strictly greater.
    flat = rmia(np.full(n, 0.25), ref_p, ref_in, np.full(z, 0.25), pop_ref_p)
    np.testing.assert_array_equal(flat, np.zeros(n))


def test_rmia_zero_probabilities_follow_the_strict_definition(rng):
    target_p, ref_p, ref_in, pop_target_p, pop_ref_p = rmia_case(rng, n=10, z=20)
    target_p[:3] = 0.0
    pop_target_p[:5] = 0.0
    got = rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a=0.5)
    want, _, _ = naive_rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a=0.5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:3], 0.0)  # 0 > γ·ratio_z never holds
    assert (got[3:] >= 5 / 20).all()  # positive ratios beat the five zero ratio_z


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("missing", ["online", "skip"])
@pytest.mark.parametrize("population_variant", ["paper", "privacy-meter"])
@pytest.mark.parametrize("m", [2, 3, 4, 7, 8])
def test_rmia_missing_and_population_variant_match_naive(online, missing,
                                                         population_variant, m, rng):
    n, z = 50, 40
    ref_in = keep_with_gaps(rng, m, n)
    ref_p = rng.uniform(0.01, 1.0, size=(m, n))
    target_p = rng.uniform(0.01, 1.0, size=n)
    pop_ref_p = rng.uniform(0.01, 1.0, size=(m, z))
    pop_target_p = rng.uniform(0.01, 1.0, size=z)
    args = (target_p, ref_p, ref_in, pop_target_p, pop_ref_p)
    options = dict(a=0.4, online=online, missing=missing,
                   population_variant=population_variant)
    got = rmia(*args, **options)
    want, _, _ = naive_rmia(*args, **options)
    np.testing.assert_array_equal(got, want)  # exact: the same comparisons of the same ratios
    assert np.isnan(got).sum() == (ref_in.all(0).sum() if missing == "skip" and not online
                                   else 0)


def test_rmia_privacy_meter_population_is_the_top_half(rng):
    # A constructed case: 6 models, p(z) under the reference code = mean of the 3 largest.
    pop_ref_p = np.array([[0.1], [0.9], [0.2], [0.8], [0.3], [0.7]])
    target_p, pop_target_p = np.array([0.5]), np.array([0.4])
    ref_p, ref_in = np.full((6, 1), 0.5), np.zeros((6, 1), bool)
    _, _, ratio_z = naive_rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p,
                               population_variant="privacy-meter")
    assert ratio_z[0] == pytest.approx(0.4 / 0.8)  # (0.9 + 0.8 + 0.7) / 3
    # 0.5 / 0.5 = 1 beats 0.4 / 0.8 = 0.5 (privacy-meter) and 0.4 / 0.5 = 0.8 (paper).
    for variant in ("paper", "privacy-meter"):
        assert rmia(target_p, ref_p, ref_in, pop_target_p, pop_ref_p,
                    population_variant=variant)[0] == 1.0


def test_rmia_errors(rng):
    t, r, ri, pt, pr = rmia_case(rng, m=4, n=6, z=5)
    with pytest.raises(InputError, match="ref_in: dtype"):
        rmia(t, r, ri.astype(np.int8), pt, pr)
    with pytest.raises(InputError, match=r"ref_p \("):
        rmia(t, r[:, :5], ri, pt, pr)
    with pytest.raises(InputError, match=r"ref_in \("):
        rmia(t, r, ri[:3], pt, pr)
    with pytest.raises(InputError, match=r"pop_ref_p \("):
        rmia(t, r, ri, pt, pr[:, :4])
    with pytest.raises(InputError, match="target_p: 1 NaN/Inf"):
        rmia(np.r_[np.nan, t[1:]], r, ri, pt, pr)
    with pytest.raises(InputError, match="pop_target_p: values outside"):
        rmia(t, r, ri, np.r_[1.5, pt[1:]], pr)
    with pytest.raises(InputError, match="missing="):
        rmia(t, r, ri, pt, pr, missing="offline")
    with pytest.raises(InputError, match="population_variant="):
        rmia(t, r, ri, pt, pr, population_variant="top-k")
    with pytest.raises(InputError, match="a="):
        rmia(t, r, ri, pt, pr, a=1.5)
    with pytest.raises(InputError, match="gamma="):
        rmia(t, r, ri, pt, pr, gamma=0.0)
    zero = r.copy()
    zero[:, 2] = 0.0
    with pytest.raises(InputError, match=r"ref_p: the reference probability p is 0 .*index 2"):
        rmia(t, zero, ri, pt, pr, a=1.0)
    assert np.isfinite(rmia(t, zero, ri, pt, pr, a=0.9)).all()  # (1 − a)/2 keeps p > 0


# ----------------------------------------------------------------------------- choose_a


def naive_twice_u(scores, labels):
    """2 × the Mann–Whitney U (ties 1/2): an integer, so equal AUCs compare equal."""
    pos, neg = scores[labels], scores[~labels]
    return sum(2 * int(p > q) + int(p == q) for p in pos for q in neg)


def test_choose_a_returns_the_naive_argmax(rng):
    m, n, z = 5, 60, 50
    ref_in = random_membership(rng, m, n, min_in=0, min_out=2)
    difficulty = rng.uniform(0.05, 0.9, n)
    ref_p = np.clip(difficulty + 0.3 * ref_in + 0.05 * rng.normal(size=(m, n)), 0.01, 1)
    pop_ref_p = rng.uniform(0.05, 0.95, (m, z))
    k = int(rng.integers(0, m))
    grid = np.linspace(0, 1, 11)
    rest = np.arange(m) != k
    aucs = [naive_twice_u(naive_rmia(ref_p[k], ref_p[rest], ref_in[rest], pop_ref_p[k],
                                 pop_ref_p[rest], a=a)[0], ref_in[k]) for a in grid]
    best = grid[int(np.argmax(aucs))]
    assert choose_a(ref_p, ref_in, pop_ref_p, target_index=k, grid=grid) == best
    # The default grid is 0, 0.1, ..., 1 (the reference code's).
    assert choose_a(ref_p, ref_in, pop_ref_p, target_index=k) == pytest.approx(best)


@pytest.mark.parametrize("members_easy", [True, False])
def test_choose_a_constructed(members_easy, rng):
    # Members and non-members differ in how likely the OUT models find them: a = 0 ignores
    # the reference models and a = 1 trusts them fully, so one end of the grid wins.
    m, n, z = 4, 40, 200
    is_member = np.arange(n) < n // 2
    ref_in = np.zeros((m, n), bool)
    ref_in[0] = is_member  # model 0 plays the target; models 1..3 are OUT everywhere
    hi_t, hi_out, lo_t, lo_out = 0.9, 0.85, 0.5, 0.2
    if members_easy:  # members: high p but also high OUT p -> only a = 0 ranks them first
        t = np.where(is_member, hi_t, lo_t)
        out = np.where(is_member, hi_out, lo_out)
    else:
        t = np.where(is_member, lo_t, hi_t)
        out = np.where(is_member, lo_out, hi_out)
    ref_p = np.vstack([t, np.tile(out, (m - 1, 1))]) + rng.uniform(0, 1e-3, (m, n))
    pop_ref_p = np.full((m, z), 0.5)
    pop_ref_p[0] = np.linspace(0.01, 0.99, z)
    a = choose_a(ref_p, ref_in, pop_ref_p, grid=[0.0, 1.0])
    assert a == (0.0 if members_easy else 1.0)
    # Not a tie: the chosen end separates members perfectly, the other end inverts them.
    twice_u = [naive_twice_u(naive_rmia(ref_p[0], ref_p[1:], ref_in[1:], pop_ref_p[0],
                                        pop_ref_p[1:], a=x)[0], is_member) for x in (a, 1 - a)]
    assert twice_u == [2 * (n // 2) ** 2, 0]


def test_choose_a_errors(rng):
    _, r, ri, _, pr = rmia_case(rng, m=3, n=8, z=5)
    with pytest.raises(InputError, match="M >= 2"):
        choose_a(r[:1], ri[:1], pr[:1])
    with pytest.raises(InputError, match="target_index"):
        choose_a(r, ri, pr, target_index=3)
    with pytest.raises(InputError, match="grid"):
        choose_a(r, ri, pr, grid=[0.5, 2.0])
    all_in = ri.copy()
    all_in[0] = True
    with pytest.raises(InputError, match="members and non-members"):
        choose_a(r, all_in, pr)
    with pytest.raises(InputError, match="ref_in: dtype"):
        choose_a(r, ri.astype(int), pr)


@pytest.mark.parametrize("missing", ["online", "skip"])
def test_choose_a_with_missing_out_models_matches_naive(missing, rng):
    m, n, z = 8, 80, 30
    ref_in = keep_with_gaps(rng, m, n, no_in=2, no_out=4)
    ref_p = np.clip(rng.uniform(0.05, 0.9, n) + 0.3 * ref_in
                    + 0.05 * rng.normal(size=(m, n)), 0.01, 1)
    pop_ref_p = rng.uniform(0.05, 0.95, (m, z))
    k = int(rng.integers(0, m))
    grid = np.linspace(0, 1, 11)
    rest = np.arange(m) != k
    scored = ~ref_in[rest].all(0) if missing == "skip" else np.ones(n, bool)
    aucs = []
    for a in grid:
        s = naive_rmia(ref_p[k], ref_p[rest], ref_in[rest], pop_ref_p[k], pop_ref_p[rest],
                       a=a, missing=missing)[0]
        aucs.append(naive_twice_u(s[scored], ref_in[k, scored]))
    got = choose_a(ref_p, ref_in, pop_ref_p, target_index=k, grid=grid, missing=missing)
    assert got == grid[int(np.argmax(aucs))]


def test_choose_a_messages_say_what_to_do(rng):
    _, r, ri, _, pr = rmia_case(rng, m=3, n=8, z=5)
    with pytest.raises(InputError, match=r"at least 2 reference models.*give a yourself"):
        choose_a(r[:1], ri[:1], pr[:1])
    none_in = ri.copy()
    none_in[1] = False
    with pytest.raises(InputError, match=r"ref_in\[1\]: the held-out reference model .* "
                       r"trained on 0 of the 8 .*hold out another model .*or give a"):
        choose_a(r, none_in, pr, target_index=1)


# ----------------------------------------------------------------------------- arrays


def naive_phi(logits, label):
    """log p_y − log Σ_{y'≠y} p_y' in float64, with the softmax written out."""
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return np.log(p[label]) - np.log(np.delete(p, label).sum())


def test_phi_from_logits_matches_naive_and_is_stable(rng):
    m, n, c = 3, 20, 5
    logits = rng.normal(size=(m, n, c)) * 3
    labels = rng.integers(0, c, n)
    got = phi_from_logits(logits, labels)
    want = np.array([[naive_phi(logits[i, j], labels[j]) for j in range(n)]
                     for i in range(m)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Two classes at ±1e4: φ = z_y − z_other exactly, where 1 − p_y underflows to 0.
    big = np.array([[[1e4, -1e4], [-1e4, 1e4]]])
    np.testing.assert_array_equal(phi_from_logits(big, np.array([0, 0])), [[2e4, -2e4]])


def signal_case(rng, m=6, n=40, n_aug=None, population=5):
    keep = rng.random((m, n)) < 0.5
    keep[:, :population] = False
    shape = (m, n) if n_aug is None else (m, n, n_aug)
    phi = rng.normal(size=shape) + 2.0 * keep.reshape(m, n, *(1,) * (len(shape) - 2))
    return phi, keep


@pytest.mark.parametrize("n_aug", [None, 3])
def test_reference_signals_from_logits_equal_phi_and_derived_fields(n_aug, rng, tmp_path):
    m, n, c = 4, 30, 3
    shape = (m, n, c) if n_aug is None else (m, n, n_aug, c)
    logits = rng.normal(size=shape) * 2
    labels = rng.integers(0, c, n)
    keep = rng.random((m, n)) < 0.5
    np.savez(tmp_path / "s.npz", logits=logits, labels=labels, keep=keep)
    loaded = load_signals(tmp_path / "s.npz")
    # The augmentation axis stays after N; each query's φ is its own logits' φ.
    want_phi = np.array([[[naive_phi(logits[i, j] if n_aug is None else logits[i, j, q],
                                     labels[j]) for q in range(n_aug or 1)]
                          for j in range(n)] for i in range(m)])
    np.testing.assert_allclose(loaded.phi, want_phi, rtol=1e-12, atol=1e-12)
    # p_true is the softmax's true class (mean over queries), the loss its −log.
    z = logits if n_aug is not None else logits[:, :, None]
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    p_y = np.take_along_axis(p, labels[None, :, None, None], axis=-1)[..., 0]
    np.testing.assert_allclose(loaded.p_true, p_y.mean(-1), rtol=1e-12)
    # The loss as log1p(Σ_{y'≠y} exp(z_y' − z_y)): −log(p_y) itself loses ~1e-16 / loss of
    # relative precision when p_y is near 1 (seed 1948654342: loss 4.5e-5, off by 1.1e-12).
    z_y = np.take_along_axis(z, labels[None, :, None, None], axis=-1)
    others = np.arange(c) != labels[:, None, None]  # [N, 1, C]
    want_loss = np.log1p(np.where(others, np.exp(z - z_y), 0.0).sum(-1))
    np.testing.assert_allclose(loaded.loss, want_loss.mean(-1), rtol=1e-12)
    np.testing.assert_array_equal(loaded.population, ~keep.any(0))


def test_lira_and_rmia_attacks_equal_the_functions(rng):
    phi, keep = signal_case(rng, m=8, n=60, n_aug=2)
    stack = reference_signals(keep, phi=phi)
    target = int(rng.integers(0, 8))
    refs, ev = np.arange(8) != target, np.flatnonzero(~stack.population)
    result = lira_attacks(stack, target, missing="skip")
    np.testing.assert_array_equal(result.evaluation, ev)
    np.testing.assert_array_equal(result.is_member, keep[target, ev])
    np.testing.assert_array_equal(result.scores["LiRA online"], lira(
        phi[target][ev], phi[refs][:, ev], keep[refs][:, ev], missing="skip"))
    np.testing.assert_array_equal(result.scores["LiRA offline"], lira(
        phi[target][ev], phi[refs][:, ev], keep[refs][:, ev], online=False))
    p = 1 / (1 + np.exp(-phi))
    np.testing.assert_allclose(result.scores["LOSS"], np.log(p[target, ev]).mean(-1),
                               rtol=1e-12)
    out = rmia_attacks(stack, target, a=0.3, population_variant="privacy-meter")
    pop = stack.population
    np.testing.assert_array_equal(out.scores["RMIA offline (a=0.3)"], rmia(
        p[target, ev].mean(-1), p[refs][:, ev].mean(-1), keep[refs][:, ev],
        p[target, pop].mean(-1), p[refs][:, pop].mean(-1), a=0.3,
        population_variant="privacy-meter"))
    chosen = rmia_attacks(stack, target)
    a = choose_a(p[refs][:, ev].mean(-1), keep[refs][:, ev], p[refs][:, pop].mean(-1))
    assert f"RMIA offline (a={a:g})" in chosen.scores


def test_signal_files_are_validated(rng, tmp_path):
    phi, keep = signal_case(rng)

    def refused(match, **arrays):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        with pytest.raises(InputError, match=match):
            load_signals(path)

    refused(r"bad.npz.*keep: dtype int64; expected a boolean", phi=phi,
            keep=keep.astype(np.int64))
    refused(r"no 'keep' key", phi=phi)
    refused(r"unknown key\(s\) \['keeps'\]", phi=phi, keep=keep, keeps=keep)
    refused(r"phi: 6 NaN/Inf values \(first at \(0, 3\)\)",
            phi=np.where(np.arange(40) == 3, np.nan, phi), keep=keep)
    refused(r"phi \(6, 39\): expected \[M, N\(, A\)\]", phi=phi[:, :39], keep=keep)
    refused(r"phi: dtype int64", phi=phi.astype(np.int64), keep=keep)
    refused(r"exactly one of 'phi'", phi=phi, logits=phi[..., None], keep=keep)
    refused(r"'logits' needs 'labels'", logits=np.stack([phi, -phi], -1), keep=keep)
    refused(r"labels\[2\] = 7; expected classes in \[0, 2\)",
            logits=np.stack([phi, -phi], -1), labels=np.r_[0, 1, 7, np.zeros(37, int)],
            keep=keep)
    refused(r"M >= 2 models", phi=phi[:1], keep=keep[:1])
    pop = np.zeros(40, bool)
    pop[-1] = True
    keep[:, -1] = True
    refused(r"population: 1 population examples are in some model's training set",
            phi=phi, keep=keep, population=pop)
    with pytest.raises(InputError, match="no such file"):
        load_signals(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="cannot read it"):
        load_signals(tmp_path / "text.npz")
    stack = reference_signals(keep, phi=phi)
    with pytest.raises(InputError, match=r"--target 6: expected a model index in \[0, 6\)"):
        lira_attacks(stack, 6)
    no_population = reference_signals(keep | (np.arange(6)[:, None] == 0), phi=phi)
    with pytest.raises(InputError, match="RMIA needs population examples"):
        rmia_attacks(no_population, 1)
