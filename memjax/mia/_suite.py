"""The reference-model attack suite: LOSS, LiRA and RMIA against one model of a stack.

A stack of M models trained with known keep masks (a target and its reference models, as
``memjax.train.train_classifiers`` trains them) is scored once, every example under every
model (:func:`all_model_signals`); :func:`attack_suite` then attacks any one of them with
the others as its references (Carlini et al. 2022, "Membership Inference Attacks From
First Principles"; Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference
Attacks"), and :func:`attack_metrics` reports AUC and TPR at low FPR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from memjax.errors import InputError
from memjax.metrics import roc_auc, tpr_at_fpr
from memjax.mia._arrays import lira_attacks, reference_signals, rmia_attacks
from memjax.models import Model
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
      ({attack name: scores over the non-population examples}, is_member there). Missing
      reference models are handled by :func:`lira_attacks` / :func:`rmia_attacks`'
      defaults.
    """
    phi, p_true, loss = (np.asarray(signals[k], np.float64).T for k in ("phi", "p_true",
                                                                       "loss"))
    stack = reference_signals(keep, phi=phi, p_true=p_true, loss=loss, population=population,
                              where="signals")
    result = lira_attacks(stack, target)
    attacks = dict(result.scores)
    if population.any():
        attacks.update(rmia_attacks(stack, target).scores)
    return attacks, result.is_member


def model_signals(models: Sequence[Model], sources: Sequence[Any], *, batch_size: int,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """Classification signals of every example under each of ``models``: ``phi``,
    ``p_true``, ``loss`` each [M, N] (float32, the engine's), scored one model at a time
    (any :class:`memjax.Model` classifier: Hugging Face, ``memjax convert``, memjax.train).

    Args:
      models: M classifiers.
      sources: the same N examples for each model, prepared as that model expects (e.g.
        ``memjax.data.open_source(spec, model=model)``: each checkpoint's preprocessing).

    Raises:
      InputError: a model that is not a classifier, sources of different lengths, or data
        a model cannot score (labels, shapes).
    """
    from memjax.engine import score
    from memjax.signals import signal_function

    if len(models) != len(sources) or len({len(s) for s in sources}) > 1:
        raise InputError(f"model_signals: {len(models)} models and {len(sources)} sources of "
                         f"lengths {sorted({len(s) for s in sources})}; expected one source "
                         "per model, all over the same examples")
    fields: dict[str, list[np.ndarray]] = {"phi": [], "p_true": [], "loss": []}
    for model, source in zip(models, sources, strict=True):
        fn, validate = signal_function(model, "classification")
        out = score(fn, model.params, source, batch_size=batch_size, progress=progress,
                    validate=validate, param_rules=list(model.partition_rules))
        for key, values in fields.items():
            values.append(np.asarray(out[key]))
    return {key: np.stack(values) for key, values in fields.items()}


def attack_metrics(attacks: dict[str, np.ndarray], is_member: np.ndarray) -> list[tuple]:
    """(name, value) rows: AUC, TPR@1%FPR and TPR@0.1%FPR of every attack.

    Examples an attack gives no score (NaN: e.g. LiRA without OUT reference models) are
    left out of its metrics, and counted in a row ``"{name} unscored examples"``.
    """
    rows: list[tuple] = []
    is_member = np.asarray(is_member)
    for name, s in attacks.items():
        s = np.asarray(s, np.float64)
        scored = ~np.isnan(s)
        if not scored.all():
            rows.append((f"{name} unscored examples", int((~scored).sum())))
        s, members = s[scored], is_member[scored]
        rows += [(f"{name} AUC", roc_auc(s, members)),
                 (f"{name} TPR@1%FPR", tpr_at_fpr(s, members, 0.01)),
                 (f"{name} TPR@0.1%FPR", tpr_at_fpr(s, members, 0.001))]
    return rows
