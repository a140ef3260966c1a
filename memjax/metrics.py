"""Attack metrics: ROC curve, AUC, TPR at a fixed FPR, and a log-log ROC plot.

Conventions: a higher score means "more likely member"; ``tpr_at_fpr`` is the largest TPR
among ROC points whose FPR is <= the target (tied scores are never split), the low-FPR
operating point that Carlini et al. 2022 ("Membership Inference Attacks From First
Principles") argue for, with log-log ROC curves; AUC is the Mann–Whitney statistic with
ties counted as 1/2.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jax.typing import ArrayLike

from memjax.errors import InputError


def _validated(scores: ArrayLike, is_member: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise InputError(f"scores {scores.shape} and is_member {labels.shape}: expected two "
                         "1-D arrays of the same length")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise InputError("is_member: expected booleans (or 0/1)")
        labels = labels.astype(bool)
    if not np.isfinite(scores).all():
        raise InputError(f"scores: {int((~np.isfinite(scores)).sum())} NaN/Inf values; "
                         "expected finite numbers")
    if labels.all() or not labels.any():
        raise InputError("is_member: expected at least one member and one non-member")
    return scores, labels


def roc_curve(scores: ArrayLike, is_member: ArrayLike
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points over every distinct threshold, from (0, 0) to (1, 1).

    Args:
      scores: [N] attack scores, higher = more likely member.
      is_member: [N] bool ground truth.

    Returns:
      (fpr, tpr, thresholds), each [K + 1]; point k predicts "member" for scores >=
      thresholds[k]; the first point has threshold +inf.
    """
    scores, labels = _validated(scores, is_member)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: ties move together.
    last = np.flatnonzero(np.r_[np.diff(sorted_scores) != 0, True])
    tp = np.cumsum(sorted_labels)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / (~labels).sum()]
    tpr = np.r_[0.0, tp / labels.sum()]
    return fpr, tpr, np.r_[np.inf, sorted_scores[last]]


def roc_auc(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Area under the ROC curve = Mann–Whitney U / (n_members · n_nonmembers), ties = 1/2."""
    from scipy.stats import rankdata

    scores, labels = _validated(scores, is_member)
    ranks = rankdata(scores)  # average ranks give ties 1/2
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: ArrayLike, is_member: ArrayLike, fpr: float) -> float:
    """The largest TPR among ROC points with FPR <= ``fpr`` (LiRA's low-FPR metric)."""
    if not 0.0 <= fpr <= 1.0:
        raise InputError(f"fpr={fpr}: expected a rate in [0, 1]")
    curve_fpr, curve_tpr, _ = roc_curve(scores, is_member)
    return float(curve_tpr[curve_fpr <= fpr].max())


def balanced_accuracy(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Best balanced accuracy over thresholds: max_t (TPR(t) + 1 − FPR(t)) / 2.

    Thresholds range over every ROC point (ties never split), including "nobody is a
    member" and "everybody is", so the value is at least 0.5.
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def advantage(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Membership advantage max_t TPR(t) − FPR(t) (Yeom et al. 2018) = 2·balanced − 1."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.max(tpr - fpr))


def auc_confidence_interval(scores: ArrayLike, is_member: ArrayLike, *, level: float = 0.95,
                            n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members
    separately (stratified, so every resample has both classes); deterministic by seed.

    Returns:
      (low, high) at the given confidence ``level``.
    """
    from scipy.stats import rankdata

    scores, labels = _validated(scores, is_member)
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise InputError(f"level={level}, n_boot={n_boot}: expected 0 < level < 1 and "
                         "n_boot >= 1")
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels], scores[~labels]
    pos_draw = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    neg_draw = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    # Mann–Whitney per resample, all at once: average ranks within each resampled row.
    ranks = rankdata(np.concatenate([pos_draw, neg_draw], axis=1), axis=1)
    n_pos, n_neg = len(pos), len(neg)
    aucs = (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(aucs, tail)), float(np.quantile(aucs, 1.0 - tail))


def plot_roc(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path, *,
             title: str = "Membership inference ROC") -> None:
    """Log-log ROC plot of several attacks: ``{name: (scores, is_member)}`` -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=120)
    floor = 1.0
    for name, (scores, is_member) in curves.items():
        fpr, tpr, _ = roc_curve(scores, is_member)
        n_neg = int((~np.asarray(is_member, dtype=bool)).sum())
        floor = min(floor, 1.0 / n_neg)
        auc = roc_auc(scores, is_member)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([floor, 1], [floor, 1], color="gray", linestyle="--", linewidth=0.8,
            label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1),
           xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
