"""Reference-model attacks on arrays: M models' signals on N examples and who trained on what.

The layout of the LiRA reference code (Carlini et al. 2022, ``keep`` [M, N] and per-model
scores) and of Privacy Meter (signals and memberships per model): every model scores every
example; model ``target`` is attacked and the other M − 1 are its reference models.
:func:`load_signals` reads such arrays from a ``.npz`` file (``memjax mia lira|rmia
--signals``), :func:`reference_signals` builds them from arrays in memory (or from the
engine's per-model signals), and :func:`lira_attacks` / :func:`rmia_attacks` run LiRA and
RMIA against one of the models.

Signals, in float64:

- φ (LiRA's logit-scaled confidence): given, or from logits and labels as
  ``φ = s_y − logsumexp_{y'≠y} s_{y'}`` with ``s = z − max z`` (DESIGN.md: stable for any
  logit scale; the engine's :func:`memjax.signals.classification` in float64 on the host).
- p_true (RMIA's Pr(x | θ)) = sigmoid(φ), exactly ``softmax(z)_y``, and the loss
  ``−log p_true = softplus(−φ)``. With A augmentations per example, p_true and the loss
  are the means over the A queries (a memjax choice; LiRA uses the A values of φ).

The population (RMIA's z, Zarifzadeh et al. 2024) is the examples no model trained on,
unless given; population examples are not attacked (both attacks are scored on the same
rows, the evaluation examples, so their metrics compare).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike
from scipy.special import expit, logsumexp

from memjax._checks import check_choice
from memjax.errors import InputError
from memjax.mia._lira import MISSING as LIRA_MISSING
from memjax.mia._lira import lira, missing_references
from memjax.mia._rmia import MISSING as RMIA_MISSING
from memjax.mia._rmia import POPULATION_VARIANTS, choose_a, rmia

#: The keys a ``--signals`` file may hold.
SIGNAL_KEYS = ("phi", "logits", "labels", "keep", "population")


@dataclasses.dataclass(frozen=True)
class ReferenceSignals:
    """Signals of M models on N examples, and which models trained on which examples.

    Attributes:
      phi: [M, N, A] float64 φ of every model on every example and query.
      p_true: [M, N] float64 true-class probability (mean over the A queries).
      loss: [M, N] float64 cross-entropy (mean over the A queries).
      keep: [M, N] bool, whether model m trained on example n.
      population: [N] bool, examples no model trained on that RMIA compares against.
    """

    phi: np.ndarray
    p_true: np.ndarray
    loss: np.ndarray
    keep: np.ndarray
    population: np.ndarray

    @property
    def n_models(self) -> int:
        return int(self.keep.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.keep.shape[1])


class AttackResult(NamedTuple):
    """Scores of the attacks on one target model.

    Attributes:
      scores: {attack name: [E] float64}, higher = more likely member; NaN where the
        attack gives no score (see ``missing``).
      is_member: [E] bool, whether the target trained on each evaluation example.
      evaluation: [E] int64 example ids (indices into the N examples) that were attacked.
      facts: (name, value) rows describing the run (models, counts of missing references).
    """

    scores: dict[str, np.ndarray]
    is_member: np.ndarray
    evaluation: np.ndarray
    facts: list[tuple[str, object]]


def phi_from_logits(logits: ArrayLike, labels: ArrayLike, *, name: str = "logits"
                    ) -> np.ndarray:
    """LiRA's φ in float64 from logits ``[..., N, C]`` and labels ``[N]``: ``[..., N]``.

    ``φ = s_y − logsumexp_{y'≠y} s_{y'}`` with ``s = z − max_c z_c``, which equals
    ``log p_y − log(1 − p_y)`` without forming 1 − p_y (exact even when p_y rounds to 1).
    Leading axes (models, and the N axis's augmentation axis if the caller moves it)
    broadcast; labels index the last axis.
    """
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    s = z - z.max(axis=-1, keepdims=True)
    true = np.arange(z.shape[-1]) == labels[..., None]  # [N, C], broadcast over leading axes
    s_y = np.where(true, s, 0.0).sum(-1)
    others = logsumexp(np.where(true, -np.inf, s), axis=-1)
    return s_y - others


def reference_signals(keep: ArrayLike, *, phi: ArrayLike | None = None,
                      logits: ArrayLike | None = None, labels: ArrayLike | None = None,
                      p_true: ArrayLike | None = None, loss: ArrayLike | None = None,
                      population: ArrayLike | None = None,
                      where: str = "signals") -> ReferenceSignals:
    """Validated :class:`ReferenceSignals` from ``phi`` or from ``logits`` and ``labels``.

    Args:
      keep: [M, N] bool training masks (M >= 2: a target and at least one reference).
      phi: [M, N] or [M, N, A] float φ; or
      logits: [M, N, C] or [M, N, A, C] float logits with ``labels`` [N] integer classes.
      p_true, loss: optional [M, N] values to use instead of the ones derived from φ (e.g.
        the engine's own float32 fields, so results match a run that used them).
      population: [N] bool RMIA population, each OUT for every model; default: the
        examples no model trained on.
      where: the input's name in messages (e.g. the file).

    Raises:
      InputError: naming the key and what was expected — shapes, dtypes, NaN/Inf, label
        range, a non-boolean ``keep`` or ``population``, a population example some model
        trained on.
    """
    keep = _bool_array(keep, f"{where}: keep", ndim=2, shape_doc="[M, N]")
    m, n = keep.shape
    if m < 2 or n < 1:
        raise InputError(f"{where}: keep {keep.shape}: expected [M, N] with M >= 2 models (the "
                         "target and at least one reference model) and N >= 1 examples")
    if (phi is None) == (logits is None):
        raise InputError(f"{where}: expected exactly one of 'phi' ([M, N] or [M, N, A]) or "
                         "'logits' ([M, N, C] or [M, N, A, C], with 'labels' [N])")
    if phi is not None:
        if labels is not None:
            raise InputError(f"{where}: 'labels' goes with 'logits'; with 'phi' leave it out")
        phi = _float_array(phi, f"{where}: phi", (2, 3), "[M, N] or [M, N, A]")
        if phi.shape[:2] != (m, n):
            raise InputError(f"{where}: phi {phi.shape}: expected [M, N(, A)] with [M, N] = "
                             f"keep's {keep.shape}")
    else:
        logits = _float_array(logits, f"{where}: logits", (3, 4), "[M, N, C] or [M, N, A, C]")
        if logits.shape[:2] != (m, n) or logits.shape[-1] < 2:
            raise InputError(f"{where}: logits {logits.shape}: expected [M, N(, A), C] with "
                             f"[M, N] = keep's {keep.shape} and C >= 2 classes")
        labels = _labels(labels, n, logits.shape[-1], where)
        # Put the augmentation axis before N so the labels [N] broadcast against [.., N, C].
        moved = logits if logits.ndim == 3 else np.moveaxis(logits, 2, 1)
        phi = phi_from_logits(moved, labels)
        if logits.ndim == 4:
            phi = np.moveaxis(phi, 1, 2)
    if phi.ndim == 2:
        phi = phi[..., None]
    derived_p = expit(phi).mean(-1)
    derived_loss = np.logaddexp(0.0, -phi).mean(-1)
    p_true = derived_p if p_true is None else _float_array(p_true, f"{where}: p_true", (2,),
                                                           "[M, N]")
    loss = derived_loss if loss is None else _float_array(loss, f"{where}: loss", (2,),
                                                          "[M, N]")
    for key, value in (("p_true", p_true), ("loss", loss)):
        if value.shape != (m, n):
            raise InputError(f"{where}: {key} {value.shape}: expected [M, N] = {(m, n)}")
    if population is None:
        population = ~keep.any(0)
    else:
        population = _bool_array(population, f"{where}: population", ndim=1, shape_doc="[N]")
        if population.shape != (n,):
            raise InputError(f"{where}: population {population.shape}: expected [N] = ({n},)")
        trained = np.flatnonzero(population & keep.any(0))
        if trained.size:
            raise InputError(f"{where}: population: {trained.size} population examples are in "
                             f"some model's training set (first: index {int(trained[0])}); "
                             "expected examples that no model trained on (keep all False)")
    return ReferenceSignals(phi=phi, p_true=np.asarray(p_true, np.float64),
                            loss=np.asarray(loss, np.float64), keep=keep,
                            population=population)


def load_signals(path: str | Path) -> ReferenceSignals:
    """:class:`ReferenceSignals` from a ``.npz`` file (``memjax mia lira|rmia --signals``).

    Keys: ``phi`` [M, N] or [M, N, A], or ``logits`` [M, N, C] or [M, N, A, C] with
    ``labels`` [N]; ``keep`` [M, N] bool; optional ``population`` [N] bool. No other keys.

    Raises:
      InputError: naming the file and the key, for anything :func:`reference_signals`
        refuses, an unreadable file or an unknown key.
    """
    path = Path(path)
    where = f"--signals {str(path)!r}"
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(f"{where}: {'no such file' if not path.exists() else 'not a .npz file'}"
                         "; expected a .npz with 'phi' or 'logits' (+ 'labels') and 'keep'")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise InputError(f"{where}: cannot read it as a .npz of arrays ({error})") from None
    unknown = sorted(set(arrays) - set(SIGNAL_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected {list(SIGNAL_KEYS)}")
    if "keep" not in arrays:
        raise InputError(f"{where}: no 'keep' key; expected keep [M, N] bool, whether model m "
                         "trained on example n")
    return reference_signals(arrays["keep"], phi=arrays.get("phi"),
                             logits=arrays.get("logits"), labels=arrays.get("labels"),
                             population=arrays.get("population"), where=where)


def _split(signals: ReferenceSignals, target: int):
    if not (isinstance(target, int | np.integer) and 0 <= target < signals.n_models):
        raise InputError(f"--target {target}: expected a model index in "
                         f"[0, {signals.n_models})")
    refs = np.arange(signals.n_models) != target
    evaluation = np.flatnonzero(~signals.population)
    if evaluation.size == 0:
        raise InputError("every example is in the population (no model trained on any); "
                         "expected some examples in some model's training set")
    is_member = signals.keep[target, evaluation]
    return refs, evaluation, is_member


def _facts(signals: ReferenceSignals, target: int, evaluation: np.ndarray,
           ref_in: np.ndarray) -> list[tuple[str, object]]:
    no_in, no_out = missing_references(ref_in)
    return [("models", signals.n_models), ("target model", int(target)),
            ("evaluation examples", int(evaluation.size)),
            ("population examples", int(signals.population.sum())),
            ("evaluation examples without an IN reference model", int(no_in.sum())),
            ("evaluation examples without an OUT reference model", int(no_out.sum()))]


def lira_attacks(signals: ReferenceSignals, target: int = 0, *, missing: str = "offline",
                 estimator: str = "mean") -> AttackResult:
    """LOSS and LiRA (online, online with fixed variance, offline) against model ``target``
    with the other models as references (Carlini et al. 2022; :func:`memjax.mia.lira`).

    Args:
      signals: :class:`ReferenceSignals`.
      target: the attacked model.
      missing: "offline" or "skip", for examples without an IN reference model (online).
      estimator: "mean" (paper) or "median" (reference code).
    """
    check_choice("missing", missing, LIRA_MISSING)
    refs, evaluation, is_member = _split(signals, target)
    ref_in = signals.keep[refs][:, evaluation]
    target_phi = signals.phi[target, evaluation]
    ref_phi = signals.phi[refs][:, evaluation]
    options = {"estimator": estimator}
    scores = {
        "LOSS": -signals.loss[target, evaluation],
        "LiRA online": lira(target_phi, ref_phi, ref_in, online=True, missing=missing,
                            **options),
        "LiRA online, fixed variance": lira(target_phi, ref_phi, ref_in, online=True,
                                            fixed_variance=True, missing=missing, **options),
        "LiRA offline": lira(target_phi, ref_phi, ref_in, online=False, **options),
    }
    return AttackResult(scores, is_member, evaluation,
                        _facts(signals, target, evaluation, ref_in))


def rmia_attacks(signals: ReferenceSignals, target: int = 0, *, a: float | None = None,
                 gamma: float = 1.0, online: bool = False, missing: str = "online",
                 population_variant: str = "paper") -> AttackResult:
    """LOSS and RMIA against model ``target`` (Zarifzadeh et al. 2024; :func:`memjax.mia.rmia`).

    Args:
      signals: :class:`ReferenceSignals` with population examples.
      target: the attacked model; the others are the references.
      a: the offline correction; None chooses it with :func:`memjax.mia.choose_a`, which
        holds out the first reference model (the lowest-index model other than
        ``target``) and attacks it with the rest. Ignored online.
      gamma, online, missing, population_variant: as in :func:`memjax.mia.rmia`.

    Raises:
      InputError: no population examples, or what :func:`memjax.mia.rmia` and
        :func:`memjax.mia.choose_a` refuse.
    """
    check_choice("missing", missing, RMIA_MISSING)
    check_choice("population_variant", population_variant, POPULATION_VARIANTS)
    refs, evaluation, is_member = _split(signals, target)
    population = signals.population
    if not population.any():
        raise InputError("RMIA needs population examples (Zarifzadeh et al. 2024's z): "
                         "examples that no model trained on (keep all False); none of the "
                         f"{signals.n_examples} examples is; hold some out of every model's "
                         "training set, or give a 'population' mask")
    ref_in = signals.keep[refs][:, evaluation]
    ref_p = signals.p_true[refs][:, evaluation]
    pop_ref_p = signals.p_true[refs][:, population]
    options = {"gamma": gamma, "missing": missing, "population_variant": population_variant}
    facts = _facts(signals, target, evaluation, ref_in)
    if online:
        name, a = "RMIA online", 1.0
    else:
        if a is None:
            a = choose_a(ref_p, ref_in, pop_ref_p, **options)
            facts.append(("a (chosen on reference model "
                          f"{int(np.flatnonzero(refs)[0])} as the target)", a))
        name = f"RMIA offline (a={a:g})"
    scores = {"LOSS": -signals.loss[target, evaluation],
              name: rmia(signals.p_true[target, evaluation], ref_p, ref_in,
                         signals.p_true[target, population], pop_ref_p, a=a, online=online,
                         **options)}
    return AttackResult(scores, is_member, evaluation, facts)


# --------------------------------------------------------------------------- validation


def _bool_array(x: ArrayLike, name: str, *, ndim: int, shape_doc: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != bool:
        raise InputError(f"{name}: dtype {x.dtype}; expected a boolean array {shape_doc} "
                         "(save it with .astype(bool))")
    if x.ndim != ndim:
        raise InputError(f"{name}: shape {x.shape}; expected {shape_doc}")
    return x


def _float_array(x: ArrayLike, name: str, ndims: tuple[int, ...], shape_doc: str
                 ) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise InputError(f"{name}: dtype {x.dtype}; expected floating-point values {shape_doc}")
    if x.ndim not in ndims or x.size == 0:
        raise InputError(f"{name}: shape {x.shape}; expected a non-empty {shape_doc}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: {int(bad.sum())} NaN/Inf values (first at {first}); "
                         "expected finite numbers")
    return x.astype(np.float64)


def _labels(labels: ArrayLike | None, n: int, n_classes: int, where: str) -> np.ndarray:
    if labels is None:
        raise InputError(f"{where}: 'logits' needs 'labels' [N] (the true class of each "
                         "example)")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise InputError(f"{where}: labels dtype {labels.dtype} shape {labels.shape}; "
                         f"expected [N] = ({n},) integer classes")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise InputError(f"{where}: labels[{int(bad[0])}] = {int(labels[bad[0]])}; expected "
                         f"classes in [0, {n_classes}) ({bad.size} out of range)")
    return labels.astype(np.int64)
