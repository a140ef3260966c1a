"""Unlearning audits of contrastive encoders (MUC, Wang et al. 2024): EMIA (alignment of
augmented views, thresholded) and CMIA (a threshold on a linear probe's confidence), each
reporting the fraction of the forget set still flagged as members; see :mod:`._muc`."""

from memjax.unlearning._muc import (
    MembershipAudit,
    alignment_scores,
    audit_from_scores,
    best_accuracy_threshold,
    cmia,
    embeddings,
    emia,
    pairwise_alignment,
    plot_alignment_gap,
    probe_confidence,
)

__all__ = [
    "MembershipAudit",
    "alignment_scores",
    "audit_from_scores",
    "best_accuracy_threshold",
    "cmia",
    "embeddings",
    "emia",
    "pairwise_alignment",
    "plot_alignment_gap",
    "probe_confidence",
]
