"""Metrics against brute-force float64 definitions on fresh random inputs, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from memjax.errors import InputError
from memjax.metrics import (
    advantage,
    auc_confidence_interval,
    balanced_accuracy,
    plot_roc,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)


def brute_auc(scores, labels) -> float:
    """P(member score > non-member score) + ½ P(equal), over all pairs."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def brute_tpr_at_fpr(scores, labels, target) -> float:
    """Max TPR over thresholds t ('member' iff score >= t) with FPR <= target."""
    best = 0.0
    for t in np.r_[np.inf, np.unique(scores)]:
        predicted = scores >= t
        fpr = predicted[~labels].mean()
        if fpr <= target:
            best = max(best, predicted[labels].mean())
    return best


@pytest.fixture(params=["continuous", "ties"])
def case(request, rng):
    n = int(rng.integers(50, 400))
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 0.7 * labels
    if request.param == "ties":
        scores = np.round(scores * 2) / 2  # many equal scores across classes
    return scores, labels


def test_auc_is_mann_whitney_with_half_ties(case):
    scores, labels = case
    assert roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.1, 0.5, 1.0])
def test_tpr_at_fpr_uses_fpr_at_most_target(case, target):
    scores, labels = case
    assert tpr_at_fpr(scores, labels, target) == pytest.approx(
        brute_tpr_at_fpr(scores, labels, target), abs=1e-12)


def test_roc_curve_points_and_trapezoid_area(case):
    scores, labels = case
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thresholds) == len(np.unique(scores)) + 1  # one point per distinct score
    # With ties kept together, the trapezoid area is exactly the Mann–Whitney AUC.
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(brute_auc(scores, labels), abs=1e-12)


def test_perfect_and_inverted_attacks():
    labels = np.array([True] * 5 + [False] * 5)
    scores = np.arange(10, 0, -1.0)
    assert roc_auc(scores, labels) == 1.0 and tpr_at_fpr(scores, labels, 0.0) == 1.0
    assert roc_auc(-scores, labels) == 0.0 and tpr_at_fpr(-scores, labels, 0.0) == 0.0
    assert roc_auc(np.zeros(10), labels) == 0.5


@pytest.mark.parametrize("scores, labels, message", [
    (np.zeros(3), np.array([True, False]), "same length"),
    (np.array([0.0, np.nan]), np.array([True, False]), "NaN"),
    (np.zeros(2), np.array([True, True]), "at least one member and one non-member"),
    (np.zeros(2), np.array([2, 0]), "booleans"),
])
def test_bad_inputs(scores, labels, message):
    with pytest.raises(InputError, match=message):
        roc_auc(scores, labels)


def test_bad_fpr():
    with pytest.raises(InputError, match=r"fpr=1.5"):
        tpr_at_fpr(np.zeros(2), np.array([True, False]), 1.5)


def test_plot_roc_writes_png(tmp_path, case):
    scores, labels = case
    plot_roc({"a": (scores, labels), "b": (-scores, labels)}, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def brute_best_balanced(scores, labels) -> tuple[float, float]:
    """(max balanced accuracy, max TPR − FPR) over every threshold, by brute force."""
    best_bal, best_adv = 0.0, -1.0
    for t in np.r_[np.inf, np.unique(scores), -np.inf]:
        predicted = scores >= t
        tpr, fpr = predicted[labels].mean(), predicted[~labels].mean()
        best_bal, best_adv = max(best_bal, (tpr + 1 - fpr) / 2), max(best_adv, tpr - fpr)
    return best_bal, best_adv


def test_balanced_accuracy_and_advantage(case):
    scores, labels = case
    bal, adv = brute_best_balanced(scores, labels)
    assert balanced_accuracy(scores, labels) == pytest.approx(bal, abs=1e-12)
    assert advantage(scores, labels) == pytest.approx(adv, abs=1e-12)
    assert advantage(scores, labels) == pytest.approx(2 * bal - 1, abs=1e-12)


def test_auc_bootstrap_interval(case):
    scores, labels = case
    low, high = auc_confidence_interval(scores, labels, n_boot=400, seed=3)
    assert low <= roc_auc(scores, labels) <= high
    assert (low, high) == auc_confidence_interval(scores, labels, n_boot=400, seed=3)
    # Against a plain loop of stratified resamples with the same generator draws.
    rng = np.random.default_rng(3)
    pos, neg = scores[labels], scores[~labels]
    pos_draw = pos[rng.integers(0, len(pos), (400, len(pos)))]
    neg_draw = neg[rng.integers(0, len(neg), (400, len(neg)))]
    aucs = [brute_auc(np.r_[p, n], np.r_[np.ones(len(p), bool), np.zeros(len(n), bool)])
            for p, n in zip(pos_draw, neg_draw, strict=True)]
    assert (low, high) == pytest.approx((np.quantile(aucs, 0.025), np.quantile(aucs, 0.975)),
                                        abs=1e-12)


def test_bootstrap_interval_excludes_chance_for_a_real_signal():
    rng = np.random.default_rng(0)
    labels = rng.random(600) < 0.5
    scores = rng.normal(size=600) + 0.5 * labels
    low, _ = auc_confidence_interval(scores, labels)
    assert low > 0.5
