"""Differentially private prototypes (DPPL): Wahdany, Jagielski, Dziedzic, Boenisch,
"Beyond the Mean: Differentially Private Prototypes for Private Transfer Learning"
(NeurIPS 2024; arXiv 2406.08039).

A public encoder embeds a private labelled set; each class is represented by one released
prototype and a test example gets the class of its nearest prototype by cosine similarity.

* DPPL-Mean (:func:`dppl_mean`), two estimators of the private class mean:

  - ``estimator="sum"`` (default): the Gaussian mechanism on the class *sum* of clipped
    embeddings (each L2-normalised to radius C, or clipped to it). Neighbouring datasets
    differ by adding or removing one private example (its embedding and label): one
    class's sum moves by at most C (L2 sensitivity Δ = C), the other classes not at all
    (disjoint subsets: parallel composition, every class spends the whole budget). The
    prototype is the noisy sum's *direction*: nearest-prototype classification by cosine
    similarity does not depend on a class's scale, so no count is released or needed
    (dividing by a public count gives the same predictions; a noisy count would spend
    budget for nothing).
  - ``estimator="coinpress"`` (the paper's): CoinPress (Biswas, Dong, Kamath, Ullman,
    NeurIPS 2020), :func:`coinpress_mean`, on each class's raw embeddings: t steps, each
    clipping the points to a ball around the current centre, releasing their noisy mean
    (Gaussian mechanism, replace-one sensitivity 2·radius/n) and shrinking the ball; the
    zCDP budget split over the steps as the reference code does (5/64, 7/64, 52/64),
    starting from the ball of radius sqrt(d) around 0. Its guarantee is CoinPress's:
    neighbours replace one example's embedding within its class, the class counts n are
    public (CoinPress divides by n), ρ-zCDP per class by composition of the steps.

  σ from "ε" by ``accountant``: "zcdp" ((ε, δ)-DP via ρ = Δ²/(2σ²),
  ε = ρ + 2·sqrt(ρ·log(1/δ))), "analytic" (Balle & Wang's exact (ε, δ) σ; sum only) or
  "pure-zcdp" (ρ = ε²/2, the reference code's scale); :mod:`memjax.prototypes._accounting`.
* DPPL-Public (:func:`dppl_public`): for each class, one public example chosen by the
  exponential mechanism. The utility of public candidate j for class c is, as in the
  reference code, u_c(j) = Σ_{i in class c} (clip(1 + cos(z_i, p_j), a, b) − a)/(b − a)
  with 0 <= a < b <= 2 (``min_score``, ``max_score``; default 0 and 2, i.e. (1 + cos)/2;
  a = 1 counts only positive similarity): each private example contributes a value in
  [0, 1], so adding or removing one changes every utility by at most Δ = 1 (and only in
  class c's selection: parallel composition).
  Selection with probability ∝ exp(ε·u/(2Δ)) (McSherry & Talwar's general rule, the
  default) or ∝ exp(ε·u/Δ) with ``monotone=True``: under add/remove-one every candidate's
  utility moves in the same direction (up when adding), which is the monotone case of
  their theorem. Sampled exactly by the Gumbel-max trick.
* The empirical privacy check (:func:`prototype_membership_scores`): a membership score per
  example = cosine similarity of its embedding to its class's released prototype; the
  AUC of members (the private set) against non-members (held out, same distribution).

Not implemented: DPPL-Top-K, and CoinPress with an unknown covariance (the steps here
assume the class's embeddings have covariance at most the identity, as the reference code
does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax._checks import check_choice, check_float_array, check_positive_int
from memjax.errors import InputError
from memjax.prototypes._accounting import (
    exponential_mechanism_scale,
    gaussian_sigma,
    zcdp_budget,
)

METHODS = ("mean", "public")
ESTIMATORS = ("sum", "coinpress")
#: The reference code's CoinPress budget split over t = 3 steps (fractions of ρ).
COINPRESS_SPLIT = (5 / 64, 7 / 64, 52 / 64)
#: CoinPress's failure probability β of the Gaussian tail bound (its code's 0.01).
COINPRESS_BETA = 0.01


def _check_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise InputError(f"{name}: expected {n} integer class labels [N], got "
                         f"{labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{name}: labels must lie in 0..{num_classes - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return labels


def _check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and not math.isnan(epsilon)):
        raise InputError(f"epsilon={epsilon!r}: expected a number > 0 (inf: not private)")
    return float(epsilon)


def normalize_rows(x: jax.Array) -> jax.Array:
    """Rows of ``x`` [N, D] scaled to unit L2 norm (a zero row stays zero)."""
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norms > 0, norms, 1.0)


def clip_embeddings(x: jax.Array, radius: float, *, normalize: bool = True) -> jax.Array:
    """Embeddings [N, D] bounded to L2 norm ``radius`` = C: ``normalize`` gives every
    nonzero row norm exactly C (x·C/‖x‖), otherwise rows longer than C are shrunk to C
    (x·min(1, C/‖x‖)). Either way one row moves a sum by at most C."""
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    safe = jnp.where(norms > 0, norms, 1.0)
    factor = radius / safe if normalize else jnp.minimum(1.0, radius / safe)
    return x * factor


@functools.partial(jax.jit, static_argnames=("num_classes",))
def class_sums(x: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """[num_classes, D]: the sum of the rows of ``x`` [N, D] with each label."""
    return jax.ops.segment_sum(x, labels, num_segments=num_classes)


def gaussian_noise(key: jax.Array, shape: tuple[int, ...], sigma: float) -> jax.Array:
    """σ·N(0, I) of ``shape`` from ``key`` (the Gaussian mechanism's noise, float32)."""
    return sigma * jax.random.normal(key, shape, jnp.float32)


def gaussian_tailbound(d: int, beta: float) -> float:
    """sqrt(d + 2·sqrt(d·log(1/β)) + 2·log(1/β)): with probability 1 − β a standard normal
    vector in d dimensions is shorter (Laurent & Massart 2000; CoinPress's γ)."""
    log_inv = math.log(1.0 / beta)
    return math.sqrt(d + 2.0 * math.sqrt(d * log_inv) + 2.0 * log_inv)


def coinpress_step(key: jax.Array, x: jax.Array, center: jax.Array, radius: float,
                   rho: float, beta: float = COINPRESS_BETA
                   ) -> tuple[jax.Array, float, float]:
    """One CoinPress mean step (Biswas et al. 2020, Algorithm 1 with covariance I, the
    clipping radius of its code).

    Clip the rows of ``x`` [n, d] to the ball B(center, R), R = min(sqrt(r² + 6r + γ²),
    r + γ), γ = :func:`gaussian_tailbound` (d, β); release their mean + N(0, σ²I),
    σ = Δ/sqrt(2ρ), Δ = 2R/n (replace-one sensitivity of the mean: ρ-zCDP); the new
    radius is γ·sqrt(1/n + σ²). Returns (new center [d], new radius, σ).
    """
    n, d = x.shape
    gamma = gaussian_tailbound(d, beta)
    clip_radius = min(math.sqrt(radius ** 2 + 6.0 * radius + gamma ** 2), radius + gamma)
    sigma = 0.0 if math.isinf(rho) else 2.0 * clip_radius / n / math.sqrt(2.0 * rho)
    offset = x - center[None, :]
    norms = jnp.linalg.norm(offset, axis=-1, keepdims=True)
    scale = jnp.minimum(1.0, clip_radius / jnp.where(norms > 0, norms, 1.0))
    mean = jnp.mean(center[None, :] + offset * scale, axis=0)
    new_center = mean + gaussian_noise(key, (d,), sigma)
    return new_center, gamma * math.sqrt(1.0 / n + sigma ** 2), sigma


def coinpress_mean(key: jax.Array, x: Any, rhos: Any, *, center: Any = None,
                   radius: float | None = None, beta: float = COINPRESS_BETA
                   ) -> tuple[np.ndarray, np.ndarray]:
    """CoinPress's private mean of ``x`` [n, d]: t = len(``rhos``) :func:`coinpress_step`
    steps from the ball B(``center`` (default 0), ``radius`` (default sqrt(d))), step i
    spending ρ_i-zCDP with noise key ``fold_in(key, i)``; Σ ρ_i-zCDP in total.

    Returns (the mean estimate [d], the σ of each step [t]).
    """
    x = jnp.asarray(x, jnp.float32)
    n, d = x.shape
    c = jnp.zeros(d, jnp.float32) if center is None else jnp.asarray(center, jnp.float32)
    r = math.sqrt(d) if radius is None else float(radius)
    sigmas = []
    for step, rho in enumerate(rhos):
        c, r, sigma = coinpress_step(jax.random.fold_in(key, step), x, c, r, float(rho), beta)
        sigmas.append(sigma)
    return np.asarray(c), np.asarray(sigmas)


def dppl_mean(key: jax.Array, embeddings: Any, labels: Any, num_classes: int, *,
              epsilon: float, delta: float = 1e-5, clip: float = 1.0,
              normalize: bool = True, accountant: str = "zcdp", estimator: str = "sum",
              rho_split: tuple[float, ...] = COINPRESS_SPLIT,
              radius: float | None = None) -> dict[str, Any]:
    """DPPL-Mean prototypes (module docstring).

    Args:
      key: PRNG key of the noise (``"sum"``: one draw [num_classes, D]; ``"coinpress"``:
        class c's steps from ``fold_in(key, c)``).
      embeddings: [N, D] private embeddings; labels: [N] ints in 0..num_classes-1.
      epsilon, delta: the privacy budget of the release (per class = in total, parallel
        composition; ``accountant`` says what it means); ``epsilon=inf``: no noise (the
        non-private class means).
      clip, normalize: ``"sum"``: radius C of :func:`clip_embeddings` (the L2 sensitivity).
      accountant: "zcdp", "analytic" (sum only) or "pure-zcdp".
      estimator: "sum" (Gaussian mechanism on clipped class sums) or "coinpress".
      rho_split, radius: ``"coinpress"``: fractions of ρ per step (summing to 1) and the
        initial ball's radius around 0 (default sqrt(D)).

    Returns:
      ``{"prototypes": [num_classes, D] unit rows (a zero estimate stays zero),
      "estimates": the noisy sums ("sum") or means ("coinpress") [num_classes, D],
      "sigma": σ ("sum") or each class's σ per step [num_classes, t] ("coinpress"),
      "noise": σ, or the largest last-step σ of CoinPress}``.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    x = check_float_array(embeddings, "embeddings", ndim=2, shape_doc="[N, D]")
    labels = _check_labels(labels, len(x), num_classes)
    epsilon = _check_epsilon(epsilon)
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "coinpress":
        return _coinpress_prototypes(key, x, labels, num_classes, epsilon, delta, accountant,
                                     rho_split, radius)
    if not clip > 0:
        raise InputError(f"clip={clip!r}: expected a radius > 0")
    sigma = gaussian_sigma(epsilon, delta, clip, accountant)
    clipped = clip_embeddings(jnp.asarray(x, jnp.float32), clip, normalize=normalize)
    sums = class_sums(clipped, jnp.asarray(labels), num_classes)
    noisy = sums + gaussian_noise(key, sums.shape, sigma)
    return {"prototypes": np.asarray(normalize_rows(noisy)), "estimates": np.asarray(noisy),
            "sigma": sigma, "noise": sigma}


def _coinpress_prototypes(key, x, labels, num_classes, epsilon, delta, accountant,
                          rho_split, radius) -> dict[str, Any]:
    split = np.asarray(rho_split, np.float64)
    if split.ndim != 1 or not len(split) or (split <= 0).any() or abs(split.sum() - 1) > 1e-9:
        raise InputError(f"rho_split={rho_split!r}: expected positive fractions summing to 1")
    if radius is not None and not radius > 0:
        raise InputError(f"radius={radius!r}: expected a number > 0")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise InputError(f"labels: class {int(np.flatnonzero(counts == 0)[0])} has no private "
                         "examples (CoinPress needs each class's count n >= 1)")
    rho = zcdp_budget(epsilon, delta, accountant)
    means, sigmas = [], []
    for c in range(num_classes):
        rows = x[labels == c]
        if math.isinf(rho):  # no noise: the class mean itself
            means.append(rows.astype(np.float64).mean(0).astype(np.float32))
            sigmas.append(np.zeros(len(split)))
            continue
        mean, sigma = coinpress_mean(jax.random.fold_in(key, c), rows, rho * split,
                                     radius=radius)
        means.append(mean)
        sigmas.append(sigma)
    estimates = np.stack(means)
    sigmas = np.stack(sigmas)
    return {"prototypes": np.asarray(normalize_rows(jnp.asarray(estimates))),
            "estimates": estimates, "sigma": sigmas, "noise": float(sigmas[:, -1].max())}


@functools.partial(jax.jit, static_argnames=("num_classes",))
def public_utilities(private: jax.Array, labels: jax.Array, public: jax.Array,
                     num_classes: int, min_score: float = 0.0,
                     max_score: float = 2.0) -> jax.Array:
    """[num_classes, M] utilities of the public candidates ``public`` [M, D] for the
    classes of ``private`` [N, D]: u_c(j) = Σ_{i: label i = c} (clip(1 + cos(z_i, p_j),
    a, b) − a) / (b − a), a = ``min_score``, b = ``max_score`` (each term in [0, 1])."""
    similarity = 1.0 + normalize_rows(private) @ normalize_rows(public).T
    score = (jnp.clip(similarity, min_score, max_score) - min_score) / (max_score - min_score)
    return jax.ops.segment_sum(score, labels, num_segments=num_classes)


def exponential_mechanism(key: jax.Array, utilities: jax.Array, scale: float) -> jax.Array:
    """One candidate per row of ``utilities`` [K, M], chosen with P(j) ∝ exp(scale·u_j)
    (Gumbel-max: argmax_j scale·u_j + G_j, G_j iid standard Gumbel, is an exact sample);
    ``scale = inf``: the argmax. Returns [K] int32 indices."""
    if math.isinf(scale):
        return jnp.argmax(utilities, axis=-1).astype(jnp.int32)
    gumbel = jax.random.gumbel(key, utilities.shape, jnp.float32)
    return jnp.argmax(scale * utilities + gumbel, axis=-1).astype(jnp.int32)


def dppl_public(key: jax.Array, embeddings: Any, labels: Any, public: Any,
                num_classes: int, *, epsilon: float, monotone: bool = False,
                min_score: float = 0.0, max_score: float = 2.0,
                accountant: str = "pure") -> dict[str, Any]:
    """DPPL-Public prototypes: per class, one public embedding chosen by the exponential
    mechanism on :func:`public_utilities` (module docstring; sensitivity Δ = 1).

    Args:
      key: PRNG key of the selection.
      embeddings: [N, D] private embeddings; labels: [N]; public: [M, D] candidates.
      epsilon: ε of the (pure ε-DP) release; inf: the highest-utility candidate.
      monotone: use exp(ε·u/Δ) (valid for add/remove-one neighbours, where the utility is
        monotone) instead of exp(ε·u/(2Δ)).
      min_score, max_score: a and b of :func:`public_utilities`, 0 <= a < b <= 2.
      accountant: "pure" (ε-DP) or "pure-zcdp" (the reference code's scale: ρ = ε²/2-zCDP,
        run at ε' = sqrt(8ρ); :func:`memjax.prototypes.exponential_mechanism_scale`).

    Returns:
      ``{"prototypes": [num_classes, D] unit rows, "indices": [num_classes] rows of
      ``public``, "utilities": [num_classes, M], "scale": ε/(2Δ) or ε/Δ}``.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    x = check_float_array(embeddings, "embeddings", ndim=2, shape_doc="[N, D]")
    labels = _check_labels(labels, len(x), num_classes)
    candidates = check_float_array(public, "public", ndim=2, shape_doc="[M, D]")
    if candidates.shape[1] != x.shape[1]:
        raise InputError(f"public: embeddings of size {candidates.shape[1]}, but the private "
                         f"ones have {x.shape[1]}")
    if not 0.0 <= min_score < max_score <= 2.0:
        raise InputError(f"min_score={min_score!r}, max_score={max_score!r}: expected "
                         "0 <= min_score < max_score <= 2 (bounds on 1 + cosine)")
    scale = exponential_mechanism_scale(_check_epsilon(epsilon), 1.0, monotone=monotone,
                                        accountant=accountant)
    utilities = public_utilities(jnp.asarray(x, jnp.float32), jnp.asarray(labels),
                                 jnp.asarray(candidates, jnp.float32), num_classes,
                                 float(min_score), float(max_score))
    indices = np.asarray(exponential_mechanism(key, utilities, scale))
    prototypes = np.asarray(normalize_rows(jnp.asarray(candidates[indices], jnp.float32)))
    return {"prototypes": prototypes, "indices": indices,
            "utilities": np.asarray(utilities), "scale": scale}


@jax.jit
def cosine_to_prototypes(embeddings: jax.Array, prototypes: jax.Array) -> jax.Array:
    """[N, K] cosine similarities of embeddings [N, D] to prototypes [K, D]."""
    return normalize_rows(embeddings) @ normalize_rows(prototypes).T


def classify(embeddings: Any, prototypes: Any) -> np.ndarray:
    """[N] int: the nearest prototype of each embedding by cosine similarity."""
    x = check_float_array(embeddings, "embeddings", ndim=2, shape_doc="[N, D]")
    p = check_float_array(prototypes, "prototypes", ndim=2, shape_doc="[K, D]")
    if p.shape[1] != x.shape[1]:
        raise InputError(f"prototypes: size {p.shape[1]}, embeddings {x.shape[1]}")
    similarity = cosine_to_prototypes(jnp.asarray(x, jnp.float32), jnp.asarray(p, jnp.float32))
    return np.asarray(jnp.argmax(similarity, axis=-1))


def prototype_membership_scores(embeddings: Any, labels: Any, prototypes: Any) -> np.ndarray:
    """[N] membership scores: the cosine similarity of each embedding [N, D] to the
    prototype of its own class (``prototypes[labels]``); higher = more member-like."""
    p = check_float_array(prototypes, "prototypes", ndim=2, shape_doc="[K, D]")
    x = check_float_array(embeddings, "embeddings", ndim=2, shape_doc="[N, D]")
    labels = _check_labels(labels, len(x), len(p))
    similarity = cosine_to_prototypes(jnp.asarray(x, jnp.float32), jnp.asarray(p, jnp.float32))
    return np.asarray(jnp.take_along_axis(similarity, jnp.asarray(labels)[:, None], 1)[:, 0])


def private_prototypes(key: jax.Array, method: str, embeddings: Any, labels: Any,
                       num_classes: int, *, epsilon: float, public: Any = None,
                       **options: Any) -> dict[str, Any]:
    """:func:`dppl_mean` (``method="mean"``) or :func:`dppl_public` (``"public"``, needs
    ``public``) with that function's keyword ``options``; ``"noise"`` in the result: σ
    (mean; CoinPress: the largest last-step σ) or the exponential mechanism's factor
    (public)."""
    check_choice("method", method, METHODS)
    if method == "mean":
        if public is not None:
            raise InputError("public: only DPPL-Public (method='public') reads it")
        return dppl_mean(key, embeddings, labels, num_classes, epsilon=epsilon, **options)
    if public is None:
        raise InputError("public: DPPL-Public needs public candidate embeddings")
    out = dppl_public(key, embeddings, labels, public, num_classes, epsilon=epsilon,
                      **options)
    return {**out, "noise": out["scale"]}


def evaluate_prototypes(key: jax.Array, method: str, private: Any, private_labels: Any,
                        test: Any, test_labels: Any, num_classes: int, *,
                        epsilons: tuple[float, ...], nonmembers: Any = None,
                        nonmember_labels: Any = None, **options: Any) -> list[dict]:
    """For each ε: the prototypes (:func:`private_prototypes`, key folded with the ε's
    position), test accuracy, and the membership AUC of the private set (members) against
    ``nonmembers`` (default: the test set) scored by :func:`prototype_membership_scores`.

    Returns:
      One dict per ε: ``epsilon``, ``accuracy``, ``auc``, ``noise``, ``prototypes``
      [K, D], ``predictions`` [N_test], ``member_scores``, ``nonmember_scores`` (and
      ``indices`` for DPPL-Public).
    """
    from memjax.metrics import roc_auc

    if nonmembers is None:
        nonmembers, nonmember_labels = test, test_labels
    test_labels = _check_labels(test_labels, len(np.asarray(test)), num_classes, "test labels")
    results = []
    for position, epsilon in enumerate(epsilons):
        out = private_prototypes(jax.random.fold_in(key, position), method, private,
                                 private_labels, num_classes, epsilon=epsilon, **options)
        predictions = classify(test, out["prototypes"])
        members = prototype_membership_scores(private, private_labels, out["prototypes"])
        others = prototype_membership_scores(nonmembers, nonmember_labels, out["prototypes"])
        is_member = np.concatenate([np.ones(len(members), bool), np.zeros(len(others), bool)])
        row = {"epsilon": float(epsilon),
               "accuracy": float(np.mean(predictions == test_labels)),
               "auc": roc_auc(np.concatenate([members, others]), is_member),
               "noise": out["noise"], "prototypes": out["prototypes"],
               "predictions": predictions, "member_scores": members,
               "nonmember_scores": others}
        if "indices" in out:
            row["indices"] = out["indices"]
        results.append(row)
    return results


@dataclasses.dataclass(frozen=True)
class _Embedding:
    """The engine's per-example function of :func:`embed` (a frozen value, so equal calls
    share one compiled program)."""

    forward: Any
    layer: str | None
    label_field: str | None
    name: str

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = self.forward(params, example)
        if self.layer is not None:
            if self.layer not in out:
                raise InputError(f"layer={self.layer!r}: the model has no such tap")
            out = out[self.layer]
        if isinstance(out, dict):
            raise InputError(f"{self.name} returns several outputs {sorted(out)}; choose "
                             "one with layer=")
        result = {"embedding": jnp.ravel(out).astype(jnp.float32)}
        if self.label_field is not None:
            result["label"] = example[self.label_field]
        return result


def embed(model: Any, source: Any, *, batch_size: int = 256, layer: str | None = None,
          label_field: str | None = "label", mesh: Any = None,
          progress: bool = False) -> dict[str, np.ndarray]:
    """Embeddings of every example of ``source`` through the engine.

    Args:
      model: a :class:`memjax.Model`: an encoder (its output), any model with ``layer``
        (that tap's activation, flattened), or a CLIP (its ``"image"`` tower).
      source: a dict of arrays or a ``memjax.data`` source with the model's inputs.
      label_field: also return this field (``None``: no labels).

    Returns:
      ``{"embedding": [N, D] float32}`` (+ ``"label"`` [N] int).
    """
    from memjax.engine import score

    if getattr(model, "kind", None) == "clip":
        model = model.tower("image")
    forward = model.apply if layer is None else model.activations(layer)

    if label_field is not None:
        first = source if isinstance(source, dict) else source.read(np.arange(1))
        if label_field not in first:
            raise InputError(f"source: no {label_field!r} field (fields: {sorted(first)})")
    fn = _Embedding(forward, layer, label_field, model.name)
    out = score(fn, model.params, source, batch_size=batch_size, mesh=mesh,
                progress=progress)
    return {name: np.asarray(value) for name, value in out.items()}
