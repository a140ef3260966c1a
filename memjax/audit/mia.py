"""The audit's reference-model section: LOSS vs LiRA vs RMIA on digits.

One vmapped program trains a target MLP and M reference MLPs with the same recipe (LiRA's
setting, Carlini et al. 2022). A population set (a fifth of the target's non-members) is
never trained on by any model: RMIA compares against it (Zarifzadeh et al. 2024). Every
example is scored under every model in one engine call (vmap over models inside the
per-example function); the attacks then run on the evaluation set (everything else).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np

from memjax.engine import score
from memjax.metrics import plot_roc, roc_auc
from memjax.mia import (
    all_model_signals,
    attack_metrics,
    attack_suite,
    lira_attacks,
    reference_signals,
)
from memjax.report import Section
from memjax.train import MLPConfig, balanced_keep, classifier_logits, save_models, train_classifiers

TITLE = "Membership inference with reference models: LOSS vs LiRA vs RMIA"
#: Reference models in the "few references" run: with this few, a random split leaves some
#: examples with no IN (or no OUT) reference, as ordinary keep matrices do.
FEW_REFERENCES = 4
#: The engine's per-example function: classification signals under every stacked MLP.
STACK_SIGNALS = functools.partial(all_model_signals, classifier_logits)


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
    signals = score(STACK_SIGNALS, params, {"image": images, "label": labels},
                    batch_size=batch_size, mesh=mesh, progress=progress)

    attacks, is_member = attack_suite(signals, keep, population)
    # The arrays a user brings from elsewhere (memjax mia lira|rmia --signals): phi [M, N]
    # of every model on every example, and the keep matrix.
    np.savez(folder / "signals.npz", phi=np.asarray(signals["phi"]).T, keep=keep)
    few = few_references(signals, keep, population)
    plot_roc({name: (s, is_member) for name, s in attacks.items()},
             folder / "roc_reference.png", title=f"Digits: target MLP, {n_refs} reference models")
    metrics = [("reference models (trained with the target in one vmapped program)", n_refs),
               ("training seconds (all models)", round(train_seconds, 2)),
               ("evaluation examples", int(evaluation.sum())),
               ("population examples (no model trains on them)", int(population.sum()))]
    metrics += attack_metrics(attacks, is_member)
    metrics += few
    return Section(
        TITLE,
        f"A target MLP {config.input_dim}-{config.hidden[0]}-10 and {n_refs} reference MLPs "
        f"with the same recipe (full-batch Adam, {steps} steps) trained at once with jax.vmap; "
        "every evaluation example is IN for exactly half of the reference models. LiRA fits "
        "per-example Gaussians of the logit-scaled confidence φ over IN and OUT models; "
        "RMIA compares the likelihood ratio p(x|target)/p(x) against population examples, "
        "with a chosen on the reference models. The last rows attack the target with only "
        f"the first {FEW_REFERENCES} reference models, whose random splits leave some "
        "examples with no IN reference: LiRA online falls back to the offline test for "
        "them (default) or leaves them unscored (missing='skip'), and says how many.",
        metrics, figures=[("roc_reference.png", "Log-log ROC of LOSS, LiRA and RMIA")],
        files=[("signals.npz", "phi [M, N] of the target (model 0) and every reference "
                "model, and keep [M, N]: memjax mia lira --signals signals.npz attacks from "
                "these arrays, as from any other codebase's"),
               ("reference_models", "target (model 0) and reference models with their keep "
                "masks: memjax mia lira --models reference_models (and mia rmia) "
                "rerun the attacks")],
    )


def few_references(signals: dict[str, np.ndarray], keep: np.ndarray, population: np.ndarray,
                   count: int = FEW_REFERENCES) -> list[tuple[str, object]]:
    """LiRA online (fixed variance) against model 0 with only reference models
    1..``count``: how many evaluation examples have no IN / no OUT reference, and the AUC
    with the offline fallback and with those examples skipped (metrics rows)."""
    models = slice(0, count + 1)
    stack = reference_signals(keep[models], phi=np.asarray(signals["phi"], np.float64).T[models],
                              population=population, where="signals")
    rows = []
    for missing in ("offline", "skip"):
        result = lira_attacks(stack, 0, missing=missing)
        # Fixed variance: with ~2 IN and ~2 OUT models per example a per-example variance
        # is noise (Carlini et al. 2022 use the global variance with few references).
        scores = result.scores["LiRA online, fixed variance"]
        scored = ~np.isnan(scores)
        if missing == "offline":
            rows += [(f"{count} references: {name}", value) for name, value in result.facts
                     if "without" in name]
        rows.append((f"{count} references: LiRA online, fixed variance AUC "
                     f"(missing={missing!r}, "
                     f"{int(scored.sum())} scored)",
                     roc_auc(scores[scored], result.is_member[scored])))
    return rows
