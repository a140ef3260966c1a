"""The reference-model attack suite: LOSS, LiRA and RMIA against one model of a stack.

A stack of M models trained with known keep masks (a target and its reference models, as
``memjax.train.train_classifiers`` trains them) is scored once, every example under every
model (:func:`all_model_signals`); :func:`attack_suite` then attacks any one of them with
the others as its references (Carlini et al. 2022, "Membership Inference Attacks From
First Principles"; Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference
Attacks"), and :func:`attack_metrics` reports AUC and TPR at low FPR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from memjax.metrics import roc_auc, tpr_at_fpr
from memjax.mia._lira import lira
from memjax.mia._rmia import choose_a, rmia
from memjax.signals import classification


def all_model_signals(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                      example: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Classification signals of one example under every model of a stack: fields [M].

    Args:
      logits_fn: ``logits_fn(params_m, image) -> [C]`` logits of one model (e.g.
        ``memjax.train.classifier_logits``).
      params: the stacked params (every leaf has a leading axis M).
      example: one example with fields ``image`` and ``label``.

    Bind ``logits_fn`` once (``functools.partial(all_model_signals, logits_fn)``, at module
    level) to get the engine's per-example function.
    """
    return jax.vmap(lambda p: classification(logits_fn(p, example["image"]),
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
