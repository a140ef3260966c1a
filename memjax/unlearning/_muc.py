"""Black-box unlearning audits of contrastive encoders: EMIA and CMIA (MUC).

Wang, Lu, Zhang, Boenisch, Dziedzic, Yu, Gao, "MUC: Machine Unlearning for Contrastive
Learning with Black-box Evaluation" (2024; TMLR 2025; reference code
EhanW/Alignment-Calibration, ``mia/emia_threshold.py`` and ``mia/svc_mia.py``). An encoder
trained on a retain set plus a forget set is asked to unlearn the forget set; the audits
ask how many forget examples a membership attack still calls members. A retrained encoder
(retain set only) is the target: its forget examples look like test examples.

- EMIA (encoder-level MIA): the alignment score of an example is the mean cosine similarity
  of its V augmented views' embeddings over all V(V-1)/2 pairs (the code's 10 views);
  a threshold on the score is chosen at the best accuracy separating members (retain
  examples) from non-members (test examples), an example is flagged when its score is
  >= the threshold, and the audit reports the flagged fraction of the forget set.
- CMIA: a linear probe (softmax regression) is fitted on the encoder's clean embeddings of
  the retain set with their labels; the attack feature is the probe's probability of the
  true label (the code's ``SVC_MIA`` feature), thresholded at best accuracy on retain vs
  test (default) or classified by the code's RBF SVC (``attack="svc"``: scikit-learn's
  ``SVC(C=3, gamma="auto")`` fitted on retain vs test, as ``SVC_fit_predict``); the forget
  set's flagged fraction as above.

Reported per model: ``flagged_fraction`` (members among the forget set; lower = better
forgotten) and ``efficacy = 1 - flagged_fraction`` (the paper's "MIA efficacy", the
fraction predicted non-member, x100 in its tables).

Deviations from the reference code, each a limit or a simplification of it: the threshold
is searched over every observed score (the exact best-accuracy threshold) instead of a grid
of 501 points in [0, 1]; CMIA's default attack is that same best-accuracy threshold on the
1-D confidence instead of the code's RBF SVC (C = 3) on it (on one feature the SVC's member
region is a union of intervals, the threshold the monotone case of it; ``attack="svc"``
runs the code's SVC); the probe is fitted on
L2-normalised clean embeddings as a ridge-regularised logistic regression solved by L-BFGS
(:func:`memjax.robustness.fit_linear_probe`; the code trains a linear layer on augmented
images with SGD for 100 epochs). Members for the thresholds are the first
``len(test)`` retain examples (the code's ``retain_indices[:num_test_samples]``), so the two
classes are balanced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax._checks import check_choice, check_positive_int
from memjax.augment import keyed_views
from memjax.data import ID_FIELD, as_source, source_ids
from memjax.engine import score
from memjax.errors import InputError
from memjax.kernels import unit_rows
from memjax.models import Model
from memjax.robustness import fit_linear_probe
from memjax.signals import EPS

ViewsFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------- formulas


def pairwise_alignment(embeddings: jax.Array) -> jax.Array:
    """EMIA's alignment score of one example: the mean cosine similarity of its views.

    Args:
      embeddings: [V, ...] the encoder's outputs for V >= 2 views (flattened per view).

    Returns:
      float32 scalar: mean over the V(V-1)/2 pairs i < j of cos(z_i, z_j), with norms
      clamped at EPS (the reference's ``CosineSimilarity(eps=1e-6)``).
    """
    flat = embeddings.reshape(embeddings.shape[0], -1).astype(jnp.float32)
    unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), EPS)
    cos = unit @ unit.T
    n = flat.shape[0]
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    return jnp.sum(jnp.where(upper, cos, 0.0)) / (n * (n - 1) / 2)


def best_accuracy_threshold(members: np.ndarray, nonmembers: np.ndarray
                            ) -> tuple[float, float]:
    """The threshold t (member iff score >= t) with the best accuracy on the two sets.

    Every observed score (and +inf: nobody flagged) is a candidate; ties in accuracy go to
    the smallest t. Args: members [M], nonmembers [K] finite scores.

    Returns:
      (t, accuracy) with accuracy = (#members >= t + #nonmembers < t) / (M + K).
    """
    members = np.asarray(members, np.float64)
    nonmembers = np.asarray(nonmembers, np.float64)
    candidates = np.append(np.unique(np.concatenate([members, nonmembers])), np.inf)
    m_sorted, n_sorted = np.sort(members), np.sort(nonmembers)
    members_at = len(members) - np.searchsorted(m_sorted, candidates, side="left")
    nonmembers_below = np.searchsorted(n_sorted, candidates, side="left")
    accuracy = (members_at + nonmembers_below) / (len(members) + len(nonmembers))
    best = int(np.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])


def probe_confidence(weights: np.ndarray, bias: np.ndarray, embeddings: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """CMIA's attack feature: the probe's softmax probability of each example's label.

    Args: weights [D, C], bias [C], embeddings [N, D] (normalised here), labels [N].
    Returns: [N] float64.
    """
    features = unit_rows(jnp.asarray(embeddings, jnp.float32))
    probs = jax.nn.softmax(features @ jnp.asarray(weights) + jnp.asarray(bias)[None, :],
                           axis=-1)
    labels = jnp.asarray(labels, jnp.int32)
    return np.asarray(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0], np.float64)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class MembershipAudit:
    """One attack on one encoder.

    Attributes:
      attack: "emia" or "cmia" ("cmia-svc" with the reference code's SVC).
      threshold: member iff score >= threshold (chosen on retain vs test); NaN for the SVC.
      attack_accuracy: the attack's accuracy on the balanced retain/test sets it was fitted
        on.
      scores: [N] the attack score of every scored row (alignment or probe confidence).
      flagged: [N] bool, scores >= threshold (the SVC: its prediction).
      split: [N] str, each row's set: "forget", "retain", "test" (or "" for none).
      extra: attack-specific numbers (CMIA: probe accuracy on the retain and test sets).
    """

    attack: str
    threshold: float
    attack_accuracy: float
    scores: np.ndarray
    flagged: np.ndarray
    split: np.ndarray
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def flagged_fraction(self) -> float:
        """Fraction of the forget set flagged as members (lower = better forgotten)."""
        return float(self.flagged[self.split == "forget"].mean())

    @property
    def efficacy(self) -> float:
        """The paper's MIA efficacy: fraction of the forget set predicted non-member."""
        return 1.0 - self.flagged_fraction


#: CMIA's member/non-member classifiers: the exact best-accuracy threshold, or the
#: reference code's RBF SVC (``SVC(C=3, gamma="auto", kernel="rbf")``).
ATTACKS = ("threshold", "svc")


def audit_from_scores(attack: str, scores: np.ndarray, forget: np.ndarray,
                      retain: np.ndarray, test: np.ndarray,
                      extra: dict[str, float] | None = None, *,
                      classifier: str = "threshold") -> MembershipAudit:
    """Classify ``scores`` [N] as member or not, fitted on retain (members) vs test
    (non-members), and flag every row; ``forget``/``retain``/``test`` are row indices into
    ``scores``. Members are the first ``len(test)`` retain rows (balanced classes, as the
    reference code). ``classifier``: one of :data:`ATTACKS`."""
    check_choice("attack", classifier, ATTACKS)
    scores = np.asarray(scores, np.float64)
    member_rows, test = np.asarray(retain)[:len(test)], np.asarray(test)
    members, nonmembers = scores[member_rows], scores[test]
    if classifier == "threshold":
        threshold, accuracy = best_accuracy_threshold(members, nonmembers)
        flagged = scores >= threshold
    else:
        from sklearn.svm import SVC

        svc = SVC(C=3, gamma="auto", kernel="rbf")
        svc.fit(np.concatenate([members, nonmembers])[:, None],
                np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))]))
        flagged = svc.predict(scores[:, None]) == 1
        threshold, attack = float("nan"), f"{attack}-svc"
        accuracy = float((flagged[member_rows].sum() + (~flagged[test]).sum())
                         / (2 * len(test)))
    split = np.full(len(scores), "", dtype=object)
    for name, rows in (("forget", forget), ("retain", retain), ("test", test)):
        split[np.asarray(rows)] = name
    return MembershipAudit(attack, threshold, accuracy, scores, flagged,
                           split.astype(str), dict(extra or {}))


# --------------------------------------------------------------------------- engine


class _Rows:
    """Rows ``rows`` of ``source`` as a source, keeping their ids."""

    def __init__(self, source: Any, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self, indices: np.ndarray) -> np.ndarray:
        return source_ids(self.source, self.rows[np.asarray(indices, np.int64)])

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.rows[np.asarray(indices, np.int64)]
        fields = dict(self.source.read(rows))
        fields.setdefault(ID_FIELD, rows)
        return fields

    def spec(self) -> dict[str, Any]:
        digest = hashlib.blake2b(self.rows.tobytes(), digest_size=8).hexdigest()
        return {"kind": "rows", "source": self.source.spec(), "rows": digest}


@dataclasses.dataclass(frozen=True)
class _AlignmentFn:
    """Per-example EMIA score (a value: the engine caches its program by value)."""

    apply: Any
    views_fn: Any
    n_views: int
    seed: int
    image_field: str
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> jax.Array:
        views = keyed_views(self.views_fn, example[self.image_field], self.seed,
                            example[ID_FIELD], self.n_views)
        views = _normalized(views, self.normalize)
        return pairwise_alignment(jax.vmap(self.apply, in_axes=(None, 0))(params, views))


@dataclasses.dataclass(frozen=True)
class _EmbedFn:
    apply: Any
    image_field: str
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> jax.Array:
        image = _normalized(example[self.image_field], self.normalize)
        return self.apply(params, image).reshape(-1).astype(jnp.float32)


def _normalized(images: jax.Array, normalize: Any) -> jax.Array:
    """``(images - mean) / std`` over the trailing channel axis (None: unchanged)."""
    if normalize is None:
        return images
    mean, std = (jnp.asarray(v, jnp.float32) for v in normalize)
    shape = (1,) * (images.ndim - 1) + mean.shape
    return (images - mean.reshape(shape)) / std.reshape(shape)


def _check_normalize(normalize: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` as hashable tuples of floats (std > 0), or None."""
    if normalize is None:
        return None
    try:
        mean, std = (tuple(float(x) for x in np.ravel(v)) for v in normalize)
    except (TypeError, ValueError):
        raise InputError(f"normalize: expected (mean, std), got {normalize!r}") from None
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and min(std) > 0):
        raise InputError(f"normalize: expected finite mean and std > 0, got {normalize!r}")
    return mean, std


def _check_encoder(model: Any, name: str) -> Model:
    if not isinstance(model, Model):
        raise InputError(f"{name}: expected a memjax.Model, got {type(model).__name__}")
    if model.kind == "clip":
        return model.tower("image")
    if model.kind != "encoder":
        raise InputError(f"{name}: {model.name} is a {model.kind!r} model; expected an "
                         "encoder (or a CLIP, whose image tower is audited)")
    return model


def _check_rows(n: int, **sets: Any) -> dict[str, np.ndarray]:
    out = {}
    for name, rows in sets.items():
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
            raise InputError(f"{name}: expected a non-empty 1-D array of row indices, got "
                             f"shape {rows.shape} dtype {rows.dtype}")
        if rows.min() < 0 or rows.max() >= n:
            raise InputError(f"{name}: row indices must be in [0, {n}), got "
                             f"[{rows.min()}, {rows.max()}]")
        out[name] = rows.astype(np.int64)
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(out[a], out[b])
            if shared.size:
                raise InputError(f"{a} and {b} share {shared.size} rows (e.g. {shared[0]}); "
                                 "expected disjoint sets")
    return out


def _scored(source: Any, forget, retain, test) -> tuple[Any, dict[str, np.ndarray]]:
    """(source of forget + retain + test rows, their positions in it)."""
    source = as_source(source)
    rows = _check_rows(len(source), forget=forget, retain=retain, test=test)
    order = np.concatenate([rows["forget"], rows["retain"], rows["test"]])
    starts = np.cumsum([0, len(rows["forget"]), len(rows["retain"])])
    positions = {name: start + np.arange(len(rows[name]))
                 for name, start in zip(("forget", "retain", "test"), starts, strict=True)}
    return _Rows(source, order), positions


def _read_field(source: Any, field: str, chunk: int = 4096) -> np.ndarray | None:
    """One field of every example, read ``chunk`` rows at a time (None if absent)."""
    parts = []
    for start in range(0, len(source), chunk):
        rows = source.read(np.arange(start, min(start + chunk, len(source))))
        if field not in rows:
            return None
        parts.append(np.asarray(rows[field]))
    return np.concatenate(parts)


def alignment_scores(model: Model, source: Any, *, views_fn: ViewsFn, n_views: int = 10,
                     seed: int = 0, batch_size: int = 64, image_field: str = "image",
                     normalize: Any = None, mesh: Any = None,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """EMIA's alignment score of every example (:func:`pairwise_alignment`), on the engine.

    View k of example i is ``views_fn(image, view_key(seed, id_i, k))``, k < ``n_views``:
    every model audited with one seed sees the same views. ``normalize``: ``(mean, std)``
    applied to the views after they are made (images in [0, 1], the checkpoint's own
    input normalisation; colour jitter assumes [0, 1] pixels).

    Returns:
      ``{"id": [N], "alignment": [N] float64}``.
    """
    model = _check_encoder(model, "model")
    n_views = check_positive_int(n_views, "n_views")
    if n_views < 2:
        raise InputError(f"n_views: the alignment compares pairs of views; expected >= 2, "
                         f"got {n_views}")
    if not callable(views_fn):
        raise InputError(f"views_fn: expected a function, got {type(views_fn).__name__}")
    fn = _AlignmentFn(model.apply, views_fn, n_views, int(seed), image_field,
                      _check_normalize(normalize))
    out = score(fn, model.params, source, batch_size=batch_size, mesh=mesh, with_ids=True,
                progress=progress)
    return {"id": np.asarray(out["id"]), "alignment": np.asarray(out["score"], np.float64)}


def embeddings(model: Model, source: Any, *, batch_size: int = 64,
               image_field: str = "image", normalize: Any = None, mesh: Any = None,
               progress: bool = False) -> np.ndarray:
    """[N, D] float32 clean (un-augmented) embeddings of every example, on the engine
    (``normalize`` as :func:`alignment_scores`)."""
    model = _check_encoder(model, "model")
    fn = _EmbedFn(model.apply, image_field, _check_normalize(normalize))
    out = score(fn, model.params, source,
                batch_size=batch_size, mesh=mesh, progress=progress)
    return np.asarray(out["score"], np.float32)


def emia(model: Model, source: Any, *, forget: Any, retain: Any, test: Any,
         views_fn: ViewsFn, n_views: int = 10, seed: int = 0, batch_size: int = 64,
         image_field: str = "image", normalize: Any = None, mesh: Any = None,
         progress: bool = False) -> MembershipAudit:
    """EMIA (MUC, Wang et al. 2024) of one encoder.

    Args:
      model: a :class:`memjax.Model` encoder (a CLIP: its image tower).
      source: dict of arrays or memjax source with ``image_field`` [N, H, W, C].
      forget, retain, test: disjoint 1-D row indices of ``source``; retain rows are the
        members and test rows the non-members the threshold is chosen on.
      views_fn: ``views_fn(image, key) -> view`` (e.g. :class:`memjax.augment.SimCLRView`).
      n_views: V views per example (the reference code's ``mi_augs`` = 10).
      normalize: see :func:`alignment_scores`.

    Returns:
      :class:`MembershipAudit` over the rows forget + retain + test (in that order).
    """
    scored, at = _scored(source, forget, retain, test)
    scores = alignment_scores(model, scored, views_fn=views_fn, n_views=n_views, seed=seed,
                              batch_size=batch_size, image_field=image_field,
                              normalize=normalize, mesh=mesh, progress=progress)["alignment"]
    return audit_from_scores("emia", scores, at["forget"], at["retain"], at["test"])


def cmia(model: Model, source: Any, *, forget: Any, retain: Any, test: Any,
         num_classes: int | None = None, label_field: str = "label", batch_size: int = 64,
         image_field: str = "image", normalize: Any = None, probe_steps: int = 300,
         probe_l2: float = 1e-4, attack: str = "threshold", mesh: Any = None,
         progress: bool = False) -> MembershipAudit:
    """CMIA (MUC, Wang et al. 2024) of one encoder: a linear probe fitted on the retain
    set's clean embeddings and labels, then the best-accuracy threshold on the probe's
    confidence in the true label (retain vs test); the forget set's flagged fraction.

    Args: as :func:`emia`, plus ``label_field`` (ints in [0, num_classes); default
    num_classes = max label + 1), the probe's L-BFGS iterations and ridge
    (:func:`memjax.robustness.fit_linear_probe`), and ``attack`` ("threshold" or "svc",
    the reference code's RBF SVC on the confidence). A class absent from the retain set
    (class unlearning) gets confidence ~0 on every row: its unpenalised bias runs to -inf,
    so those rows are never flagged, and their exact scores follow the optimiser's path.

    Returns:
      :class:`MembershipAudit` (``extra``: probe accuracy on the retain, test and forget
      rows) over the rows forget + retain + test.
    """
    check_choice("attack", attack, ATTACKS)
    scored, at = _scored(source, forget, retain, test)
    labels = _read_field(scored, label_field)
    if labels is None or labels.ndim != 1:
        raise InputError(f"label_field {label_field!r}: the source has no integer label "
                         "field of one value per example (CMIA's probe needs labels)")
    labels = labels.astype(np.int64) if labels.dtype.kind in "iu" else labels
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    emb = embeddings(model, scored, batch_size=batch_size, image_field=image_field,
                     normalize=normalize, mesh=mesh, progress=progress)
    # The probe reads unit-normalised embeddings (scale-free across encoders).
    head = fit_linear_probe(np.asarray(unit_rows(jnp.asarray(emb[at["retain"]]))),
                            labels[at["retain"]], num_classes=num_classes, l2=probe_l2,
                            steps=probe_steps)
    weights, bias = head["weight"], head["bias"]
    confidence = probe_confidence(weights, bias, emb, labels)
    predicted = np.argmax(np.asarray(unit_rows(jnp.asarray(emb))) @ weights + bias[None, :],
                          axis=1)
    extra = {f"probe accuracy ({name})": float(np.mean(predicted[rows] == labels[rows]))
             for name, rows in at.items()}
    return audit_from_scores("cmia", confidence, at["forget"], at["retain"], at["test"], extra,
                             classifier=attack)


# --------------------------------------------------------------------------- figure


def plot_alignment_gap(audits: dict[str, MembershipAudit], path: Any, *,
                       bins: int = 30) -> None:
    """The alignment-gap figure: per model (one panel each), histograms of the EMIA
    alignment of the forget and the test examples, with the member threshold.

    MUC's black-box visualisation shows that an encoder still aligns the forget set's views
    better than unseen examples' (a gap) unless it unlearned them; the retrained encoder
    has no gap. ``audits``: model name -> its EMIA :class:`MembershipAudit`; writes a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not audits:
        raise InputError("audits: expected at least one model's EMIA audit")
    every = np.concatenate([a.scores for a in audits.values()])
    edges = np.linspace(every.min(), every.max(), bins + 1)
    fig, axes = plt.subplots(1, len(audits), figsize=(3.4 * len(audits), 2.8), sharey=True,
                             squeeze=False)
    for ax, (name, audit) in zip(axes[0], audits.items(), strict=True):
        forget = audit.scores[audit.split == "forget"]
        test = audit.scores[audit.split == "test"]
        ax.hist(test, bins=edges, density=True, alpha=0.55, label="test (non-members)")
        ax.hist(forget, bins=edges, density=True, alpha=0.55, label="forget set")
        ax.axvline(audit.threshold, color="k", lw=0.8, ls="--", label="member threshold")
        ax.set_title(f"{name}: gap {forget.mean() - test.mean():+.3f}, "
                     f"flagged {audit.flagged_fraction:.2f}", fontsize=8)
        ax.set_xlabel("alignment (mean cosine of views)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

