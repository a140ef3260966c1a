"""The audit's reference-model section: LOSS vs LiRA vs RMIA on digits.

One vmapped program trains a target MLP and M reference MLPs with the same recipe (LiRA's
setting, Carlini et al. 2022). A population set (a fifth of the target's non-members) is
never trained on by any model: RMIA compares against it (Zarifzadeh et al. 2024). Every
example is scored under every model in one engine call (vmap over models inside the
per-example function); the attacks then run on the evaluation set (everything else).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from memjax.engine import score
from memjax.metrics import plot_roc, roc_auc, tpr_at_fpr
from memjax.mia import choose_a, lira, rmia
from memjax.report import Section
from memjax.signals import classification
from memjax.train import MLPConfig, balanced_keep, classifier_logits, save_models, train_classifiers

TITLE = "Membership inference with reference models: LOSS vs LiRA vs RMIA"


def split_population(n: int, seed: int, fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """(target keep [N], population mask [N]): the target trains on a random half; a
    ``fraction`` of the other half is the population no model trains on."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    target = np.zeros(n, bool)
    target[order[: n // 2]] = True
    population = np.zeros(n, bool)
    population[order[n // 2: n // 2 + int(fraction * (n - n // 2))]] = True
    return target, population


def all_model_signals(params, example):
    """Classification signals of one example under every stacked model: fields [M+1]."""
    return jax.vmap(lambda p: classification(classifier_logits(p, example["image"]),
                                             example["label"]))(params)


def attack_suite(signals: dict[str, np.ndarray], keep: np.ndarray, population: np.ndarray,
                 target: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """LOSS, LiRA (online, fixed variance, offline) and RMIA against model ``target``.

    Args:
      signals: the engine's :func:`all_model_signals` output: ``phi``, ``p_true``, ``loss``
        each [N, M] (M models, the target among them).
      keep: [M, N] bool training masks; population: [N] bool examples no model trained on
        (RMIA's population; RMIA is left out when there are none).
      target: which model is attacked; the others are its reference models.

    Returns:
      ({attack name: scores over the non-population examples}, is_member there).
    """
    phi, p_true, loss = (np.asarray(signals[k], np.float64).T for k in ("phi", "p_true",
                                                                       "loss"))
    refs = np.arange(keep.shape[0]) != target
    evaluation = ~population
    is_member = keep[target, evaluation]
    ref_in = keep[refs][:, evaluation]
    ref_phi, ref_p = phi[refs][:, evaluation], p_true[refs][:, evaluation]
    target_phi = phi[target, evaluation]
    attacks = {
        "LOSS": -loss[target, evaluation],
        "LiRA online": lira(target_phi, ref_phi, ref_in, online=True),
        "LiRA online, fixed variance": lira(target_phi, ref_phi, ref_in, online=True,
                                            fixed_variance=True),
        "LiRA offline": lira(target_phi, ref_phi, ref_in, online=False),
    }
    if population.any():
        pop_ref_p = p_true[refs][:, population]
        a = choose_a(ref_p, ref_in, pop_ref_p)
        attacks[f"RMIA offline (a={a:.1f})"] = rmia(p_true[target, evaluation], ref_p, ref_in,
                                                    p_true[target, population], pop_ref_p,
                                                    a=a)
    return attacks, is_member


def attack_metrics(attacks: dict[str, np.ndarray], is_member: np.ndarray) -> list[tuple]:
    """(name, value) rows: AUC, TPR@1%FPR and TPR@0.1%FPR of every attack."""
    rows = []
    for name, s in attacks.items():
        rows += [(f"{name} AUC", roc_auc(s, is_member)),
                 (f"{name} TPR@1%FPR", tpr_at_fpr(s, is_member, 0.01)),
                 (f"{name} TPR@0.1%FPR", tpr_at_fpr(s, is_member, 0.001))]
    return rows


def membership_section(images: np.ndarray, labels: np.ndarray, folder: Path, *, seed: int,
                       n_refs: int = 16, steps: int = 300, batch_size: int = 256,
                       mesh=None, progress: bool = False) -> Section:
    """Train target + ``n_refs`` reference models, run the attacks, plot; one Section."""
    n = len(labels)
    target_keep, population = split_population(n, seed)
    evaluation = ~population
    ref_keep = np.zeros((n_refs, n), bool)
    ref_keep[:, evaluation] = balanced_keep(n_refs, int(evaluation.sum()), seed + 1)
    keep = np.vstack([target_keep[None], ref_keep])
    config = MLPConfig(input_shape=images.shape[1:], num_classes=10, hidden=(128,))

    start = time.perf_counter()
    params = train_classifiers(jax.random.key(seed), images, labels, keep, config=config,
                        steps=steps, learning_rate=2e-3)
    train_seconds = time.perf_counter() - start
    save_models(folder / "reference_models", params, keep, config,
                training={"steps": steps, "learning_rate": 2e-3, "seed": seed,
                          "population": np.flatnonzero(population).tolist()})
    signals = score(all_model_signals, params, {"image": images, "label": labels},
                    batch_size=batch_size, mesh=mesh, progress=progress)

    attacks, is_member = attack_suite(signals, keep, population)
    plot_roc({name: (s, is_member) for name, s in attacks.items()},
             folder / "roc_reference.png", title=f"Digits: target MLP, {n_refs} reference models")
    metrics = [("reference models (trained with the target in one vmapped program)", n_refs),
               ("training seconds (all models)", round(train_seconds, 2)),
               ("evaluation examples", int(evaluation.sum())),
               ("population examples (no model trains on them)", int(population.sum()))]
    metrics += attack_metrics(attacks, is_member)
    return Section(
        TITLE,
        f"A target MLP {config.input_dim}-{config.hidden[0]}-10 and {n_refs} reference MLPs "
        f"with the same recipe (full-batch Adam, {steps} steps) trained at once with jax.vmap; "
        "every evaluation example is IN for exactly half of the reference models. LiRA fits "
        "per-example Gaussians of the logit-scaled confidence φ over IN and OUT models; "
        "RMIA compares the likelihood ratio p(x|target)/p(x) against population examples, "
        "with a chosen on the reference models.",
        metrics, figures=[("roc_reference.png", "Log-log ROC of LOSS, LiRA and RMIA")],
        files=[("reference_models", "target (model 0) and reference models with their keep "
                "masks: memjax mia --models reference_models reruns the attacks")],
    )
