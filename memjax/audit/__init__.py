"""``memjax audit``: the end-to-end demonstration on bundled real data.

With no arguments it trains an MLP on a random half of scikit-learn's digits (1,797 real
8×8 handwritten digits), scores every example with the sharded engine, runs the LOSS
membership-inference attack (Yeom et al. 2018: score = −loss, higher = more likely
member) and writes a report folder: index.html, roc.png, scores.parquet, metrics.json and
the trained model. Later capabilities add sections.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np

from memjax.data import digits
from memjax.engine import make_mesh, score
from memjax.engine.mesh import DATA_AXIS
from memjax.engine.store import write_parquet
from memjax.metrics import plot_roc, roc_auc, tpr_at_fpr
from memjax.report import Section, write_report
from memjax.signals import check_labels
from memjax.train import MLPConfig, classification_signals, fit_classifier, save_model

DEFAULT_OUT = "memjax-report"


def member_mask(n: int, seed: int) -> np.ndarray:
    """A random half of ``n`` examples (the training set), reproducible by seed."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(n, dtype=bool)
    keep[rng.permutation(n)[: n // 2]] = True
    return keep


def audit_batch_size(mesh, target: int = 256) -> int:
    n_data = mesh.shape[DATA_AXIS]
    return n_data * max(1, target // n_data)


def _sections(made: Section | list[Section]) -> list[Section]:
    """A section function's result as a list (the text section makes two)."""
    return made if isinstance(made, list) else [made]


def run_audit(out_dir: str | Path = DEFAULT_OUT, *, seed: int = 0, steps: int = 600,
              progress: bool = True, models: bool = True, references: int = 16,
              reference_steps: int = 300, demos: bool = True) -> Path:
    """Run the audit and write its report folder; returns the folder.

    ``models=False`` leaves out the open-weight model section (see memjax.audit.models);
    ``references=0`` the reference-model attacks (see memjax.audit.mia); ``demos=False``
    the CLIP (with CLIPScore) and language-model membership demonstrations (a tiny GPT-2
    and a prompted one), and the influence, memorization, image-generator, unlearning,
    encoder robustness and private-prototype sections (memjax.audit.clip,
    memjax.audit.text, memjax.audit.icl, memjax.audit.influence, memjax.audit.memorization,
    memjax.audit.generators, memjax.audit.unlearning, memjax.audit.robustness,
    memjax.audit.prototypes).
    """
    source = digits()
    images, labels = source.arrays["image"], source.arrays["label"]
    check_labels(labels, 10)
    keep = member_mask(len(labels), seed)
    config = MLPConfig(input_shape=images.shape[1:], num_classes=10, hidden=(256, 256))

    start = time.perf_counter()
    train = jax.jit(functools.partial(fit_classifier, config=config, steps=steps,
                                      learning_rate=1e-3))
    params = jax.block_until_ready(train(jax.random.key(seed), images, labels, keep))
    train_seconds = time.perf_counter() - start

    mesh = make_mesh()
    start = time.perf_counter()
    signals = score(classification_signals, params, source, batch_size=audit_batch_size(mesh),
                    mesh=mesh, progress=progress)
    score_seconds = time.perf_counter() - start
    loss_attack = -signals["loss"]  # LOSS attack: low loss = member
    # The loss saturates at 0 in float32 for confidently fitted examples (ties at the top
    # of the ranking); LiRA's logit-scaled confidence φ keeps ranking them.
    phi_attack = signals["phi"]
    reference_section = None
    if references:
        from memjax.audit.mia import membership_section

        reference_section = functools.partial(
            membership_section, images, labels, seed=seed, n_refs=references,
            steps=reference_steps, batch_size=audit_batch_size(mesh), mesh=mesh,
            progress=progress)
    demo_sections = []
    if demos:
        from memjax.audit.clip import clip_section
        from memjax.audit.generators import generators_section
        from memjax.audit.icl import icl_section
        from memjax.audit.influence import influence_section
        from memjax.audit.memorization import memorization_section
        from memjax.audit.prototypes import prototypes_section
        from memjax.audit.robustness import robustness_section
        from memjax.audit.text import text_section
        from memjax.audit.unlearning import unlearning_section

        demo_sections += [functools.partial(section, seed=seed, progress=progress)
                          for section in (clip_section, text_section, icl_section,
                                          influence_section, memorization_section,
                                          generators_section, unlearning_section,
                                          robustness_section, prototypes_section)]
    extra_sections = []
    if models:
        from memjax.audit.models import models_section

        extra_sections.append(models_section(progress=progress))

    def build(folder: Path) -> list[Section]:
        plot_roc({"LOSS": (loss_attack, keep), "confidence φ": (phi_attack, keep)},
                 folder / "roc.png",
                 title="Membership inference on digits (MLP)")
        write_parquet([{**signals, "member": keep}], folder / "scores.parquet")
        save_model(folder / "model", params, config)
        correct = signals["correct"].astype(bool)
        return [
            Section(
                "Data and model",
                f"scikit-learn digits ({len(labels)} real 8×8 handwritten digits). An MLP "
                f"{config.input_dim}-{'-'.join(map(str, config.hidden))}-10 trained with "
                f"full-batch Adam for {steps} steps on a random half (seed {seed}); the other "
                "half are non-members.",
                [("examples", len(labels)), ("members (training set)", int(keep.sum())),
                 ("train accuracy", float(correct[keep].mean())),
                 ("held-out accuracy", float(correct[~keep].mean())),
                 ("training seconds", round(train_seconds, 2)),
                 ("devices", jax.device_count()),
                 ("scoring examples/s", round(len(labels) / score_seconds, 1))],
            ),
            Section(
                "Membership inference: LOSS attack",
                "Score = −cross-entropy loss of each example under the trained model "
                "(higher = more likely a member; Yeom et al. 2018). Beside it, a threshold "
                "on LiRA's logit-scaled confidence φ = log p_y − log Σ_{y'≠y} p_y' "
                "(Carlini et al. 2022), which does not saturate. TPR@FPR is the largest TPR "
                "among ROC points with FPR at most the target.",
                [("AUC", roc_auc(loss_attack, keep)),
                 ("TPR@1%FPR", tpr_at_fpr(loss_attack, keep, 0.01)),
                 ("TPR@0.1%FPR", tpr_at_fpr(loss_attack, keep, 0.001)),
                 ("confidence φ attack AUC", roc_auc(phi_attack, keep)),
                 ("confidence φ attack TPR@1%FPR", tpr_at_fpr(phi_attack, keep, 0.01)),
                 ("mean loss, members", float(signals["loss"][keep].mean())),
                 ("mean loss, non-members", float(signals["loss"][~keep].mean()))],
                figures=[("roc.png", "Log-log ROC of the LOSS and confidence attacks")],
                files=[("scores.parquet", "every example's signals and membership"),
                       ("model", "the trained model (memjax score --model)")],
            ),
            *([reference_section(folder)] if reference_section else []),
            *(part for section in demo_sections for part in _sections(section(folder))),
            *extra_sections,
        ]

    return write_report(out_dir, "memjax audit", build)
