"""Membership inference against CLIP-style contrastive models.

Ko et al. 2023, "Practical Membership Inference Attacks Against Large-Scale Multi-Modal
Models: A Pilot Study" (ICCV; reference code reds-lab/CLIP-MIA):

- :func:`csa` -- cosine similarity attack: the cosine of a pair's image and text embeddings.
- :func:`aea` -- augmentation attack: CSA aggregated over K augmented views of the image.
- :func:`wsa` -- weakly supervised attack: pseudo-label a candidate pool with a threshold
  set on known non-members, then train a classifier on ``[img_emb, txt_emb]``.
- :func:`text_only_baseline` -- a distribution-shift control (CLIP-MIA-Bench caveat): the
  same classifier on text embeddings alone, separating the pool from the known non-members.
- :func:`embed_pairs` -- the embeddings these attacks take, of any CLIP :class:`memjax.Model`
  on a pairs source, with AEA's augmented views (:class:`AEAView`) keyed by example id.

And the image-text quality metric computed from the same embeddings:

- :func:`clip_score` / :func:`clipscore` -- CLIPScore (Hessel et al. 2021, EMNLP, "CLIPScore:
  A Reference-free Evaluation Metric for Image Captioning"; reference code jmhessel/clipscore):
  ``2.5 * max(cos(image, "A photo depicts " + caption), 0)`` per pair.

Higher score = more likely member, for every attack. The attacks take embeddings computed
elsewhere (the engine's ``contrastive`` signal, or any CLIP encoder); cosines are computed
in float32 (the reference code's fp16 autocast is not copied).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from memjax._checks import check_choice, check_float_array, check_positive_int
from memjax.augment import horizontal_flip, keyed_views, random_resized_crop
from memjax.errors import InputError
from memjax.kernels import unit_rows
from memjax.metrics import roc_auc
from memjax.models import Model
from memjax.signals import contrastive

AGGREGATIONS = ("mean", "max", "min", "median")
CLASSIFIERS = ("logistic", "mlp")
FEATURES = ("concat", "concat_product")
#: Hidden widths of the reference code's attack MLP (in -> 512 -> 256 -> 128 -> out).
MLP_HIDDEN = (512, 256, 128)


# --------------------------------------------------------------------------- validation


def _pairs(image_emb: ArrayLike, text_emb: ArrayLike, img_name: str, txt_name: str
           ) -> tuple[np.ndarray, np.ndarray]:
    img = check_float_array(image_emb, img_name, ndim=2, shape_doc="[N, D]")
    txt = check_float_array(text_emb, txt_name, ndim=2, shape_doc="[N, D]")
    if img.shape != txt.shape:
        raise InputError(f"{img_name} {img.shape} and {txt_name} {txt.shape} must have the "
                         "same shape [N, D]")
    return img, txt


def _training_args(classifier: str, epochs: int, lr: float, batch_size: int) -> None:
    check_choice("classifier", classifier, CLASSIFIERS)
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr={lr!r}: expected a finite positive learning rate")


def _features(img: np.ndarray, txt: np.ndarray, features: str) -> jax.Array:
    x, y = _unit(img), _unit(txt)
    parts = [x, y] if features == "concat" else [x, y, x * y]
    return jnp.concatenate(parts, axis=1)


def _unit(x: np.ndarray) -> jax.Array:
    # Same normalisation as the contrastive signal: norm clamped at EPS, float32.
    return unit_rows(jnp.asarray(x, jnp.float32))


# --------------------------------------------------------------------------- CSA / AEA


def csa(image_emb: ArrayLike, text_emb: ArrayLike) -> jax.Array:
    """Cosine similarity attack (CSA; Ko et al. 2023, Sec. 4.1).

    Args:
        image_emb: [N, D] float image embeddings.
        text_emb: [N, D] float text embeddings of the paired captions.

    Returns:
        [N] float32 cosine similarity of each pair (``memjax.signals.contrastive``, vmapped:
        norms clamped at ``memjax.kernels.EPS``, clipped to [-1, 1]). Higher = more likely
        member.

    Raises:
        InputError: if the inputs are not non-empty, finite, float [N, D] of equal shape.
    """
    img, txt = _pairs(image_emb, text_emb, "image_emb", "text_emb")
    return jax.vmap(contrastive)(jnp.asarray(img), jnp.asarray(txt))["cosine"]


def aea(image_embs: ArrayLike, text_emb: ArrayLike, *, aggregate: str = "mean") -> jax.Array:
    """Augmentation-enhanced attack (AEA; Ko et al. 2023, Sec. 4.2).

    The CSA of each of K augmented views of the image against the (unaugmented) caption,
    aggregated over the views. The released reference code has no implementation of this
    attack; this follows the paper's description (aggregate cosine over transformations).
    The views' embeddings are computed by the caller (e.g. ``memjax.signals`` augmentation,
    keyed by example id); with K=1 every aggregation equals :func:`csa`.

    Args:
        image_embs: [N, K, D] float embeddings of K augmented views of each image.
        text_emb: [N, D] float text embeddings.
        aggregate: "mean" (default), "max", "min" or "median" over the K views.

    Returns:
        [N] float32 aggregated cosine similarity. Higher = more likely member.

    Raises:
        InputError: on bad shapes, dtypes, NaN/Inf, empty input or an unknown ``aggregate``.
    """
    check_choice("aggregate", aggregate, AGGREGATIONS)
    imgs = check_float_array(image_embs, "image_embs", ndim=3, shape_doc="[N, K, D]")
    txt = check_float_array(text_emb, "text_emb", ndim=2, shape_doc="[N, D]")
    if imgs.shape[0] != txt.shape[0] or imgs.shape[2] != txt.shape[1]:
        raise InputError(f"image_embs {imgs.shape} and text_emb {txt.shape}: expected "
                         "[N, K, D] and [N, D] with the same N and D")
    # Inner vmap over views (text broadcast), outer over pairs.
    per_view = jax.vmap(jax.vmap(contrastive, in_axes=(0, None)))
    cos = per_view(jnp.asarray(imgs), jnp.asarray(txt))["cosine"]  # [N, K]
    reduce = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min, "median": jnp.median}
    return reduce[aggregate](cos, axis=1)


# --------------------------------------------------------------------------- classifiers


def _init(key: jax.Array, d_in: int, classifier: str) -> list[tuple[jax.Array, jax.Array]]:
    widths = (d_in, *(MLP_HIDDEN if classifier == "mlp" else ()), 1)
    params = []
    for k, (fan_in, fan_out) in zip(jax.random.split(key, len(widths) - 1),
                                    zip(widths[:-1], widths[1:], strict=True), strict=True):
        # PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the
        # reference MLP uses.
        bound = 1.0 / math.sqrt(fan_in)
        kw, kb = jax.random.split(k)
        params.append((jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
                       jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)))
    return params


def _logits(params, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b[None])
    w, b = params[-1]
    return (x @ w + b[None])[..., 0]


def _fit(x: jax.Array, y: jax.Array, *, classifier: str, key: jax.Array, epochs: int,
         lr: float, batch_size: int):
    """Minibatch Adam on binary cross-entropy for a fixed number of epochs.

    Deterministic given ``key``: epoch e shuffles with ``split(key_shuffle, epochs)[e]``.
    The last, short minibatch is padded and masked so every example counts once per epoch.
    """
    k_init, k_shuffle = jax.random.split(key)
    params = _init(k_init, x.shape[1], classifier)
    opt = optax.adam(lr)
    n = x.shape[0]
    b = min(batch_size, n)
    n_batches = -(-n // b)
    mask = (jnp.arange(n_batches * b) < n).reshape(n_batches, b)

    def loss_fn(p, idx, m):
        per = optax.sigmoid_binary_cross_entropy(_logits(p, x[idx]), y[idx])
        return jnp.sum(per * m) / jnp.sum(m)

    def step(carry, batch):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    def epoch(carry, k):
        perm = jax.random.permutation(k, n)
        idx = jnp.concatenate([perm, jnp.zeros(n_batches * b - n, perm.dtype)])
        carry, losses = jax.lax.scan(step, carry, (idx.reshape(n_batches, b), mask))
        return carry, losses.mean()

    (params, _), losses = jax.lax.scan(epoch, (params, opt.init(params)),
                                       jax.random.split(k_shuffle, epochs))
    return params, losses


# --------------------------------------------------------------------------- WSA


class WSAResult(NamedTuple):
    """Output of :func:`wsa`.

    Attributes:
        scores: [M] float32 classifier logit per pool item (higher = more likely member;
            ranks like ``prob`` without float32 saturation ties).
        prob: [M] float32 member probability, ``sigmoid(scores)``.
        csa: [M] float32 raw CSA of each pool item (the pseudo-labelling score).
        tau: the threshold ``mean + lam * std`` of the known non-members' CSA (float64).
        n_pseudo: number of pool items with CSA >= tau (pseudo-members, label 1).
        losses: [epochs] float32 mean training loss per epoch.
    """

    scores: jax.Array
    prob: jax.Array
    csa: jax.Array
    tau: float
    n_pseudo: int
    losses: jax.Array


def wsa(candidates_img: ArrayLike, candidates_txt: ArrayLike,
        known_nonmember_img: ArrayLike, known_nonmember_txt: ArrayLike, *,
        lam: float = 1.5, classifier: str = "mlp", seed: int = 0, epochs: int = 15,
        lr: float = 1e-3, batch_size: int = 32, features: str = "concat") -> WSAResult:
    """Weakly supervised attack (WSA; Ko et al. 2023, Sec. 4.3).

    1. CSA of the known non-members; ``tau = mean + lam * std`` (population std, ddof=0).
    2. Pool items with CSA >= tau are pseudo-members (label 1); known non-members are
       label 0; other pool items are not used for training.
    3. A classifier on ``[unit(img), unit(txt)]`` (each embedding L2-normalised as in CSA,
       concatenated: 2D features; the paper's and code's input), standardised with the
       training set's per-feature mean and std (a memjax choice), is trained with Adam on
       binary cross-entropy, then scores every pool item.

    ``classifier="mlp"`` (default) is the reference attack model, in -> 512 -> 256 -> 128
    with ReLU; ``"logistic"`` is one linear layer. Deviations from the reference code,
    which trains a 2-way softmax head for <= 15 epochs with early stopping: one logit with
    sigmoid BCE (the same model family: the logit is the difference of the two softmax
    logits), a fixed number of epochs and no early stopping (no validation split is
    taken from the few pseudo-members), deterministic given ``seed``. Note that a linear
    classifier on concatenated embeddings cannot represent the image-text alignment (a
    product of the two); it can only pick up where the embeddings lie, which is mostly
    distribution shift -- compare with :func:`text_only_baseline`. ``features=
    "concat_product"`` (a memjax option, not in the paper) appends the elementwise product
    ``unit(img) * unit(txt)`` (3D features, whose sum is the CSA), so even the logistic
    model can represent, and re-weight per dimension, the alignment.

    Args:
        candidates_img: [M, D] image embeddings of the candidate pool (unknown membership).
        candidates_txt: [M, D] text embeddings of the pool.
        known_nonmember_img: [Q, D] image embeddings of known non-members (Q >= 2).
        known_nonmember_txt: [Q, D] text embeddings of known non-members.
        lam: threshold multiplier lambda (paper and code: 1.5).
        classifier: "mlp" or "logistic".
        seed: PRNG seed for initialisation and shuffling.
        epochs: training epochs (fixed).
        lr: Adam learning rate (reference: 1e-3).
        batch_size: minibatch size (reference: 32).
        features: "concat" (reference) or "concat_product" (adds ``img * txt``).

    Returns:
        :class:`WSAResult`; ``scores`` are the pool's member logits.

    Raises:
        InputError: on bad shapes, NaN/Inf, empty sets, bad hyper-parameters, or if no pool
            item reaches tau (use a smaller ``lam``).
    """
    c_img, c_txt = _pairs(candidates_img, candidates_txt, "candidates_img", "candidates_txt")
    n_img, n_txt = _pairs(known_nonmember_img, known_nonmember_txt, "known_nonmember_img",
                          "known_nonmember_txt")
    if c_img.shape[1] != n_img.shape[1]:
        raise InputError(f"candidates have D={c_img.shape[1]} but known non-members have "
                         f"D={n_img.shape[1]}; expected the same embedding size")
    if n_img.shape[0] < 2:
        raise InputError(f"known_nonmember_img has {n_img.shape[0]} rows; expected >= 2 to "
                         "estimate the threshold's standard deviation")
    if not (isinstance(lam, int | float) and math.isfinite(lam)):
        raise InputError(f"lam={lam!r}: expected a finite number")
    _training_args(classifier, epochs, lr, batch_size)
    check_choice("features", features, FEATURES)
    seed = int(seed)

    pool_csa = csa(c_img, c_txt)
    non_csa = np.asarray(csa(n_img, n_txt), np.float64)
    tau = float(non_csa.mean() + lam * non_csa.std())
    pseudo = np.asarray(pool_csa, np.float64) >= tau
    n_pseudo = int(pseudo.sum())
    if n_pseudo == 0:
        raise InputError(f"no candidate has CSA >= tau = {tau:.4f} (mean + {lam} * std of the "
                         f"known non-members; pool max {float(jnp.max(pool_csa)):.4f}); "
                         "use a smaller lam")

    pool_x = _features(c_img, c_txt, features)
    non_x = _features(n_img, n_txt, features)
    x = jnp.concatenate([pool_x[np.flatnonzero(pseudo)], non_x])
    y = jnp.concatenate([jnp.ones(n_pseudo), jnp.zeros(non_x.shape[0])])
    # Standardise with the training set's statistics: product features are O(1/D) while
    # concat features are O(1/sqrt(D)); unscaled, the small block barely moves under Adam.
    mu, sd = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-6
    x, pool_x = (x - mu) / sd, (pool_x - mu) / sd
    params, losses = _fit(x, y, classifier=classifier, key=jax.random.key(seed),
                          epochs=epochs, lr=lr, batch_size=batch_size)
    scores = _logits(params, pool_x)
    return WSAResult(scores=scores, prob=jax.nn.sigmoid(scores), csa=pool_csa, tau=tau,
                     n_pseudo=n_pseudo, losses=losses)


# --------------------------------------------------------------------------- control


class TextOnlyResult(NamedTuple):
    """Output of :func:`text_only_baseline`.

    Attributes:
        auc: cross-fitted AUC of the text-only classifier, pool (positive) vs known
            non-members. ~0.5: the sets are not distinguishable from captions alone.
        scores: [M + Q] float32 held-out logits, pool items first, then known non-members.
        is_pool: [M + Q] bool, True for pool items.
    """

    auc: float
    scores: np.ndarray
    is_pool: np.ndarray


def text_only_baseline(candidates_txt: ArrayLike, known_nonmember_txt: ArrayLike, *,
                       classifier: str = "mlp", seed: int = 0, epochs: int = 15,
                       lr: float = 1e-3, batch_size: int = 32, n_folds: int = 2
                       ) -> TextOnlyResult:
    """Distribution-shift control for WSA: can captions alone tell the sets apart?

    CLIP-MIA-Bench found that with distribution-matched non-members these attacks fall to
    ~51% AUC. Here the WSA classifier is trained on L2-normalised text embeddings alone to
    separate the candidate pool (label 1) from the known non-members (label 0), with
    stratified ``n_folds`` cross-fitting so every item is scored by a model that did not
    see it. Report its AUC next to the attack's: if a text-only classifier separates the
    sets, the attack may be detecting distribution shift (e.g. caption dates or sources),
    not membership. Not a method of Ko et al. 2023; a control added by memjax.

    Args:
        candidates_txt: [M, D] text embeddings of the candidate pool.
        known_nonmember_txt: [Q, D] text embeddings of the known non-members.
        classifier, seed, epochs, lr, batch_size: as in :func:`wsa`.
        n_folds: number of cross-fitting folds (>= 2; each set needs >= n_folds rows).

    Returns:
        :class:`TextOnlyResult` with the held-out AUC and scores.

    Raises:
        InputError: on bad shapes, NaN/Inf, too few rows or bad hyper-parameters.
    """
    pool = check_float_array(candidates_txt, "candidates_txt", ndim=2, shape_doc="[M, D]")
    non = check_float_array(known_nonmember_txt, "known_nonmember_txt", ndim=2,
                            shape_doc="[Q, D]")
    if pool.shape[1] != non.shape[1]:
        raise InputError(f"candidates_txt {pool.shape} and known_nonmember_txt {non.shape}: "
                         "expected the same embedding size D")
    _training_args(classifier, epochs, lr, batch_size)
    if check_positive_int(n_folds, "n_folds") < 2:
        raise InputError(f"n_folds={n_folds}: expected >= 2")
    if min(pool.shape[0], non.shape[0]) < n_folds:
        raise InputError(f"candidates_txt has {pool.shape[0]} and known_nonmember_txt "
                         f"{non.shape[0]} rows; each needs >= n_folds={n_folds}")

    x = jnp.concatenate([_unit(pool), _unit(non)])
    is_pool = np.concatenate([np.ones(pool.shape[0], bool), np.zeros(non.shape[0], bool)])
    # Stratified folds, deterministic in seed: shuffle each set, deal rows round-robin.
    rng = np.random.default_rng(seed)
    fold = np.empty(is_pool.size, np.int64)
    for rows in (np.flatnonzero(is_pool), np.flatnonzero(~is_pool)):
        fold[rng.permutation(rows)] = np.arange(rows.size) % n_folds
    scores = np.empty(is_pool.size, np.float32)
    key = jax.random.key(int(seed))
    for f in range(n_folds):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        params, _ = _fit(x[train], jnp.asarray(is_pool[train], jnp.float32),
                         classifier=classifier, key=jax.random.fold_in(key, f),
                         epochs=epochs, lr=lr, batch_size=batch_size)
        scores[test] = np.asarray(_logits(params, x[test]))
    return TextOnlyResult(auc=roc_auc(scores, is_pool), scores=scores, is_pool=is_pool)


# --------------------------------------------------------------------------- embeddings


@dataclasses.dataclass(frozen=True)
class AEAView:
    """One augmented view for AEA: a random resized crop of at least ``min_scale`` of the
    area (aspect 3/4..4/3, resampled bilinearly to the image's size) and a horizontal flip
    with probability 1/2 (torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip``,
    :mod:`memjax.augment`).

    Only geometric operations: they act on the model's *preprocessed* image, and bilinear
    resampling (weights summing to 1) and flips commute with the checkpoint's per-channel
    normalisation ``(x − mean) / std``, so the view equals the normalised view of the raw
    image. Colour changes would not (they need [0, 1] pixels), so none are used. Ko et al.
    2023 do not fix the transformations; these are memjax's.
    """

    min_scale: float = 0.5

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        k_crop, k_flip = jax.random.split(key)
        view = random_resized_crop(k_crop, image, scale=(self.min_scale, 1.0))
        return horizontal_flip(k_flip, view)


@dataclasses.dataclass(frozen=True)
class PairEmbeddings:
    """``fn(params, example)`` for the engine: a pair's ``image_emb`` [D] and ``text_emb``
    [D] from a CLIP's towers and, with ``n_views`` > 0, ``view_emb`` [n_views, D], the
    image embeddings of views 0..n_views-1 of :class:`AEAView` keyed by
    ``view_key(seed, example id, view)`` (needs ``score(..., with_ids=True)``)."""

    image: Callable[[Any, Any], jax.Array]
    text: Callable[[Any, Any], jax.Array]
    image_field: str
    n_views: int = 0
    seed: int = 0

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = {"image_emb": self.image(params, example), "text_emb": self.text(params, example)}
        if self.n_views:
            views = keyed_views(AEAView(), example[self.image_field], self.seed,
                                example["id"], self.n_views)
            out["view_emb"] = jax.vmap(
                lambda view: self.image(params, {**example, self.image_field: view}))(views)
        return out


def embed_pairs(model: Model, source: Any, *, n_views: int = 0, seed: int = 0,
                batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """Image and text embeddings of every pair of ``source`` under a CLIP ``model``.

    Args:
      model: a :class:`memjax.Model` of kind ``"clip"`` (with ``"image"`` and ``"text"``
        towers), e.g. ``memjax.load`` of a Hugging Face CLIP checkpoint.
      source: pairs prepared for the model (``memjax.data.open_source("pairs:...",
        model=model)``): the towers' input fields.
      n_views: AEA's augmented views per image (0: none).
      seed: seeds the views.

    Returns:
      ``id`` [N], ``image_emb`` [N, D], ``text_emb`` [N, D] (float32, unnormalised) and,
      with views, ``view_emb`` [N, n_views, D].
    """
    from memjax.engine import score

    if not isinstance(model, Model) or model.kind != "clip":
        raise InputError(f"model: expected a CLIP memjax.Model (kind 'clip'), got "
                         f"{getattr(model, 'kind', type(model).__name__)!r}")
    if n_views:
        check_positive_int(n_views, "n_views")
    image, text = model.tower("image"), model.tower("text")
    missing = [f for f in dict.fromkeys((*image.inputs, *text.inputs))
               if f not in _fields(source)]
    if missing:
        raise InputError(f"--data: the CLIP's towers read field(s) {missing}; the source has "
                         f"{sorted(_fields(source))} (expected image-text pairs, e.g. "
                         "pairs:FILE, opened for this model)")
    fn = PairEmbeddings(image.apply, text.apply, image.inputs[0], int(n_views), int(seed))
    return score(fn, model.params, source, batch_size=batch_size, progress=progress,
                 with_ids=bool(n_views), param_rules=list(model.partition_rules))


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """``fn(params, example)`` for the engine: a caption's ``text_emb`` [D] from a CLIP's
    text tower (no image is read: RefCLIPScore's references)."""

    text: Callable[[Any, Any], jax.Array]

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"text_emb": self.text(params, example)}


def _fields(source: Any) -> set[str]:
    if isinstance(source, dict):
        return set(source)
    return set(source.read(np.zeros(1, np.int64)))


# --------------------------------------------------------------------------- CLIPScore

#: CLIPScore's weight w (Hessel et al. 2021, Sec. 3: it rescales the cosine to about [0, 1]).
CLIPSCORE_WEIGHT = 2.5
#: The caption prefix of the reference code (``CLIPCapDataset(prefix='A photo depicts')``,
#: a space appended); the paper reports its numbers with it.
CLIPSCORE_PREFIX = "A photo depicts "


def clip_score(image_emb: ArrayLike, text_emb: ArrayLike, *,
               weight: float = CLIPSCORE_WEIGHT) -> jax.Array:
    """CLIPScore of each pair: ``weight * max(cos(image_emb, text_emb), 0)``.

    Hessel et al. 2021, Eq. 1 (w = 2.5). The cosine is :func:`csa`'s (float32, norms
    clamped at ``memjax.kernels.EPS``); the reference code normalises float32 features the
    same way (no clamping: it divides by the norm). torchmetrics' ``CLIPScore`` reports
    ``100 * max(cos, 0)`` on raw captions: ``weight=100`` and ``prefix=""`` reproduce it.

    Args:
        image_emb: [N, D] float image embeddings.
        text_emb: [N, D] float text embeddings of the (prefixed) captions.
        weight: w > 0.

    Returns:
        [N] float32 scores in [0, weight].
    """
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise InputError(f"weight: expected a positive number, got {weight!r}")
    return jnp.float32(weight) * jnp.maximum(csa(image_emb, text_emb), 0.0)


def best_reference_cosine(text_emb: ArrayLike, ref_emb: ArrayLike,
                          candidate_of_ref: ArrayLike, ref_of: ArrayLike) -> jax.Array:
    """Each candidate's highest cosine to one of its references.

    Args:
      text_emb: [N, D] candidate caption embeddings; ref_emb: [R, D] reference embeddings.
      candidate_of_ref, ref_of: [P] int, the (candidate, reference) pairs to compare
        (every candidate in at least one; :func:`reference_pairs`).

    Returns:
      [N] float32 (cosines as :func:`csa`'s).
    """
    text_emb = jnp.asarray(text_emb)
    candidate_of_ref = jnp.asarray(candidate_of_ref)
    cos = csa(text_emb[candidate_of_ref], jnp.asarray(ref_emb)[jnp.asarray(ref_of)])
    return jax.ops.segment_max(cos, candidate_of_ref, num_segments=text_emb.shape[0])


def ref_clip_score(clip_scores: ArrayLike, reference_cosine: ArrayLike) -> jax.Array:
    """RefCLIPScore: the harmonic mean of a candidate's CLIPScore and
    ``max(max_r cos(candidate, r), 0)`` over its references r (Hessel et al. 2021, Eq. 2).

    The reference code (``get_refonlyclipscore``) does not clip the reference side at 0;
    the paper does, and so does this (equal whenever some reference has a positive cosine).
    The harmonic mean of two zeros is 0 (the code divides 0 by 0).

    Args:
      clip_scores: [N] CLIPScores (:func:`clip_score`, w included; the text side is not
        rescaled, as in the paper and code).
      reference_cosine: [N] :func:`best_reference_cosine`.

    Returns:
      [N] float32.
    """
    clip_scores = jnp.asarray(clip_scores, jnp.float32)
    text_side = jnp.maximum(jnp.asarray(reference_cosine, jnp.float32), 0.0)
    total = clip_scores + text_side
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, 2 * clip_scores * text_side / safe, 0.0)


def reference_pairs(candidates: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    """(candidate row, reference row) of every pair showing the same image file.

    Both sources are ``pairs:`` files (:class:`memjax.data.PairsSource`); images match by
    their resolved path. A candidate without a reference is refused, by name."""
    files = [getattr(s, "files", None) for s in (candidates, references)]
    if files[0] is None or files[1] is None:
        raise InputError("references: RefCLIPScore matches references to candidates by image "
                         "file, so both must be pairs:FILE sources")
    rows: dict[str, list[int]] = {}
    for j, file in enumerate(files[1]):
        rows.setdefault(file, []).append(j)
    missing = [i for i, file in enumerate(files[0]) if file not in rows]
    if missing:
        names = candidates.names()
        raise InputError(f"references: no reference caption for {len(missing)} candidate "
                         f"image(s), e.g. {[names[i] for i in missing[:3]]}; every "
                         "candidate's image needs at least one row in the references file")
    pairs = [(i, j) for i, file in enumerate(files[0]) for j in rows[file]]
    candidate_of_ref, ref_of = (np.asarray(column, np.int64) for column in zip(*pairs,
                                                                              strict=True))
    return candidate_of_ref, ref_of


def _open_pairs(model: Model, pairs: Any, prefix: str | None, max_length: int | None,
                name: str) -> Any:
    """``pairs`` opened for ``model`` with the caption prefix, or checked to carry it."""
    from memjax.data import open_source

    if prefix is not None and not isinstance(prefix, str):
        raise InputError(f"prefix: expected a string or None, got {type(prefix).__name__}")
    if isinstance(pairs, str | os.PathLike):
        return open_source(pairs, model=model, max_length=max_length, text_prefix=prefix or "")
    carried = getattr(pairs, "text_prefix", None)
    if carried is None and prefix:
        raise InputError(
            f"{name}: a source of already tokenised captions cannot take the prefix "
            f"{prefix!r}; pass the pairs file (\"pairs:FILE\"), open it with "
            f"open_source(..., text_prefix={prefix!r}), or pass prefix=None to score the "
            "captions as they are")
    if carried is not None and carried != (prefix or ""):
        raise InputError(f"{name}: the source was opened with text_prefix={carried!r} but "
                         f"prefix={prefix!r} was asked for")
    return pairs


def clipscore(model: Model, pairs: Any, *, weight: float = CLIPSCORE_WEIGHT,
              prefix: str | None = CLIPSCORE_PREFIX, max_length: int | None = None,
              references: Any = None, batch_size: int = 64,
              progress: bool = False) -> dict[str, np.ndarray]:
    """CLIPScore (Hessel et al. 2021) of every image-caption pair under a CLIP ``model``.

    Args:
      model: a :class:`memjax.Model` of kind ``"clip"`` (e.g. ``memjax.load`` of a Hugging
        Face CLIP checkpoint): its own image preprocessing and tokenizer are used.
      pairs: a ``"pairs:FILE"`` spec (opened here, ``prefix`` prepended to each caption before
        tokenising, truncated to ``max_length``, default the model's context, as the
        reference's ``clip.tokenize(..., truncate=True)``), or a source already opened for
        the model (a ``pairs:`` source must have been opened with ``text_prefix=prefix``;
        tokenised arrays only with ``prefix=None``).
      weight: w (2.5 as the paper).
      prefix: the caption prefix; None or "" for raw captions.
      references: for RefCLIPScore, a ``"pairs:FILE"`` of reference captions (or such a
        source opened with the same prefix): every row whose image file is a candidate's
        is one of its references (e.g. COCO's five human captions per image). References
        are prefixed and truncated as the candidates, as the reference code's
        ``get_refonlyclipscore``; ``pairs`` must then be a pairs file too.

    Returns:
      ``id`` [N] int64, ``clipscore`` [N] float32 and ``cosine`` [N] float32; with
      references also ``refclipscore`` [N] float32 (:func:`ref_clip_score`) and
      ``reference_cosine`` [N] float32 (the best reference's cosine, unclipped).
    """
    source = _open_pairs(model, pairs, prefix, max_length, "pairs")
    refs = None
    if references is not None:
        refs = _open_pairs(model, references, prefix, max_length, "references")
        candidate_of_ref, ref_of = reference_pairs(source, refs)
    emb = embed_pairs(model, source, batch_size=batch_size, progress=progress)
    scores = clip_score(emb["image_emb"], emb["text_emb"], weight=weight)
    out = {"id": np.asarray(emb["id"]), "clipscore": np.asarray(scores),
           "cosine": np.asarray(csa(emb["image_emb"], emb["text_emb"]))}
    if refs is not None:
        ref_emb = _embed_texts(model, refs, batch_size, progress)
        best = best_reference_cosine(emb["text_emb"], ref_emb, candidate_of_ref, ref_of)
        out["refclipscore"] = np.asarray(ref_clip_score(scores, best))
        out["reference_cosine"] = np.asarray(best)
    return out


def _embed_texts(model: Model, refs: Any, batch_size: int, progress: bool) -> jax.Array:
    """[R, D] text embeddings of every caption of a pairs source (images not decoded)."""
    from memjax.engine import score

    text = model.tower("text")
    fields = refs.text_fields([text for chunk in refs.texts() for text in chunk])
    tokens = {name: fields[name] for name in text.inputs}
    emb = score(TextEmbeddings(text.apply), model.params, tokens, batch_size=batch_size,
                progress=progress, param_rules=list(model.partition_rules))
    return jnp.asarray(emb["text_emb"])
