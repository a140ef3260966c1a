"""Déjà vu memorization: what a model reveals about an example beyond correlations.

- Meehan et al. 2023, "Do SSL Models Have Déjà Vu? A Case of Unintended Memorization in
  Self-supervised Learning" (NeurIPS; code facebookresearch/DejaVu): embed the background
  crop of a training image (the largest rectangle outside its object boxes) with the
  target SSL model (trained on the image) and a reference model (not trained on it); find
  its k = 100 nearest neighbours (exact L2) in a public labelled set; predict the object
  label from the neighbours' label histogram, with the histogram's entropy as
  (inverse) confidence. Memorization = the accuracy gap target - reference among the
  5/20/100% most confident queries. A *correlation detector* (a classifier that predicts
  the label from the crop itself) can replace the reference model: pass its class
  probabilities as ``reference_probs`` (Meehan et al. Sec. 4; Kokhlikyan et al. 2024,
  "Measuring Déjà vu Memorization Efficiently", use such one-model references).
- Jayaraman et al. 2024, "Déjà Vu Memorization in Vision-Language Models" (NeurIPS; code
  facebookresearch/VLMDejaVu): the same test with object *sets* predicted from the
  captions of neighbouring public images; precision/recall against the true objects and
  population-level gaps (:func:`dejavu_sets`).

:func:`crop_embeddings` embeds crops of images with any :class:`memjax.Model` (background
crops cut with :func:`background_box`, or the :func:`center_box` / :func:`periphery_box`
crops when no boxes are annotated), the inputs of :func:`dejavu`.

The k-NN is exact and blockwise (:func:`knn`): the public set is scanned in blocks with a
running ``lax.top_k`` merge, so memory is O(Q x block), never Q x P. Higher gap = more
memorized by the target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike

from memjax import kernels
from memjax._checks import check_choice, check_positive_int
from memjax.engine.cache import cached_jit
from memjax.engine.mesh import DATA_AXIS, make_mesh
from memjax.errors import InputError

METRICS = ("l2", "cosine")


# --------------------------------------------------------------------------- k-NN


def _knn_program(mesh: Mesh | None, k: int, metric: str, block_size: int, impl: str,
                 block_queries: int | None):
    """Jitted k-NN for one setting (shared by equal settings: ``cached_jit`` keys the
    function by value); with a mesh, each device takes its share of the query rows
    (shard_map over the data axis, the public set replicated): rows are independent, and
    the Pallas kernel is not partitioned by XLA on its own."""
    # impl is part of the key so that a change of MEMJAX_KERNELS builds a new program.
    fn = functools.partial(kernels.knn_scores, k=k, metric=metric, block_size=block_size,
                           impl=impl, block_queries=block_queries)
    if mesh is None:
        return cached_jit(fn)
    rows = PartitionSpec(DATA_AXIS, None)
    # check_vma off: the scan's running top-k starts as a constant (same on every device)
    # and becomes per-device; the rows are independent, so nothing needs a collective.
    return cached_jit(jax.shard_map(fn, mesh=mesh, in_specs=(rows, PartitionSpec()),
                                    out_specs=(rows, rows), check_vma=False))


def knn(queries: ArrayLike, public: ArrayLike, k: int, *, metric: str = "l2",
        block_size: int = 1024, impl: str | None = None,
        block_queries: int | None = None, mesh: Mesh | None = None
        ) -> tuple[jax.Array, jax.Array]:
    """Exact k-NN of each query in a public set, blockwise (never a [Q, P] matrix).

    Args:
      queries: [Q, D] float; public: [P, D] float, P >= k.
      k: neighbours per query. metric: ``"l2"`` or ``"cosine"`` (norms clamped at
        ``memjax.kernels.EPS``).
      block_size: public rows compared per step (memory O(Q x block_size)).
      impl: ``"kernel"`` (Pallas), ``"reference"`` (``memjax.kernels.knn_scan``) or None
        (``MEMJAX_KERNELS``; see ``memjax.kernels``); block_queries: the kernel's query tile.
      mesh: the queries are split over its data axis (default: every local device).

    Returns:
      (values [Q, k], indices [Q, k] int32), nearest first, ties to the lower index.
      ``"l2"``: squared Euclidean distances (faiss IndexFlatL2's convention, computed in
      float32 as |q|^2 + |p|^2 - 2 q.p, clamped at 0); ``"cosine"``: similarities.
    """
    check_choice("metric", metric, METRICS)
    q = _matrix(queries, "queries")
    p = _matrix(public, "public")
    if q.shape[1] != p.shape[1]:
        raise InputError(f"queries and public must have the same dimension D, got "
                         f"{q.shape[1]} and {p.shape[1]}")
    k = check_positive_int(k, "k")
    if k > p.shape[0]:
        raise InputError(f"k={k}: expected at most the public set size ({p.shape[0]})")
    block_size = check_positive_int(block_size, "block_size")
    mesh = make_mesh() if mesh is None else mesh
    n_data, n_q = mesh.shape[DATA_AXIS], q.shape[0]
    # MEMJAX_KERNELS picks the Pallas kernel or kernels.knn_scan (the default today).
    program = _knn_program(mesh if n_data > 1 else None, k, metric, block_size,
                           kernels.resolve("knn", impl), block_queries)
    padded = np.pad(q, ((0, -n_q % n_data), (0, 0)))  # an equal share of rows per device
    vals, idx = program(padded, p)
    vals, idx = vals[:n_q], idx[:n_q]
    if metric == "l2":
        vals = jnp.where(vals == 0, 0.0, -vals)
    return vals, idx


# --------------------------------------------------------------------------- labels


# --------------------------------------------------------------------------- background crops


def _boxes(boxes: ArrayLike, height: int, width: int) -> np.ndarray:
    """Validated object boxes [K, 4] ``(x0, y0, x1, y1)`` clipped to the image (K may be 0)."""
    arr = np.asarray(boxes, np.float64)
    arr = arr.reshape(0, 4) if arr.size == 0 else arr.reshape(1, -1) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.all(np.isfinite(arr)):
        raise InputError(f"boxes: expected finite [K, 4] (x0, y0, x1, y1) pixel boxes, got "
                         f"shape {np.shape(boxes)}")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise InputError("boxes: expected x0 <= x1 and y0 <= y1 in every (x0, y0, x1, y1) "
                         "box")
    return np.clip(arr, 0.0, [width, height, width, height])


def background_box(boxes: ArrayLike, height: int, width: int) -> tuple[int, int, int, int]:
    """The largest axis-aligned rectangle of the image that overlaps no object box.

    Meehan et al. 2023 (déjà vu) query the models with the background only: the largest
    crop outside the annotated object boxes. A maximal empty rectangle has each side on
    the image border or on a box edge, so the candidates are the combinations of those
    coordinates (O(K^4) of them, K boxes: fine for annotation-sized K); ties go to the
    first in (left, right, top, bottom) order.

    Args:
      boxes: [K, 4] (or [4]) object boxes ``(x0, y0, x1, y1)`` in pixels, half-open
        (``x1``/``y1`` exclusive; floats are widened to whole pixels they touch).
      height, width: the image size.

    Returns:
      ``(top, left, crop_height, crop_width)`` in pixels (``resample_box``'s order).

    Raises:
      InputError: bad boxes, or boxes that leave no background pixel.
    """
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    b = _boxes(boxes, height, width)
    # Whole pixels an object touches: floor the start, ceil the end.
    x0, y0 = np.floor(b[:, 0]).astype(int), np.floor(b[:, 1]).astype(int)
    x1, y1 = np.ceil(b[:, 2]).astype(int), np.ceil(b[:, 3]).astype(int)
    solid = (x1 > x0) & (y1 > y0)
    x0, y0, x1, y1 = x0[solid], y0[solid], x1[solid], y1[solid]
    lefts = np.unique(np.concatenate([[0], x1]))
    rights = np.unique(np.concatenate([[width], x0]))
    tops = np.unique(np.concatenate([[0], y1]))
    bottoms = np.unique(np.concatenate([[height], y0]))
    L, R, T, B = np.meshgrid(lefts, rights, tops, bottoms, indexing="ij")
    L, R, T, B = L.ravel(), R.ravel(), T.ravel(), B.ravel()
    proper = (R > L) & (B > T)
    L, R, T, B = L[proper], R[proper], T[proper], B[proper]
    # A candidate is empty if no box overlaps it (overlap: open intervals intersect).
    overlaps = ((L[:, None] < x1[None]) & (x0[None] < R[:, None])
                & (T[:, None] < y1[None]) & (y0[None] < B[:, None]))
    empty = ~overlaps.any(axis=1)
    if not empty.any():
        raise InputError(f"boxes: the object boxes cover the whole {height}x{width} image; "
                         "there is no background to crop")
    area = np.where(empty, (R - L) * (B - T), -1)
    best = int(np.argmax(area))
    return int(T[best]), int(L[best]), int(B[best] - T[best]), int(R[best] - L[best])


def background_crop(image: ArrayLike, boxes: ArrayLike, size: tuple[int, int]) -> jax.Array:
    """The background of ``image [H, W, C]`` (:func:`background_box`) resized to ``size``
    (bilinear, :func:`memjax.augment.resample_box`), ready to embed for :func:`dejavu`."""
    from memjax.augment import check_image_shape, resample_box

    image = jnp.asarray(image)
    check_image_shape(image.shape, "background_crop image")
    box = background_box(boxes, image.shape[0], image.shape[1])
    return resample_box(image, box, tuple(size))


def _entropy(p: jax.Array) -> jax.Array:
    """Natural-log entropy of each row of [Q, C] probabilities; 0 log 0 = 0."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=1)


def _top5(scores: jax.Array) -> jax.Array:
    return lax.top_k(scores, min(5, scores.shape[1]))[1]


def _histogram_predictions(neighbour_labels: jax.Array, num_classes: int):
    # Scatter-add into [Q, C]: a one-hot would materialise [Q, k, C].
    rows = jnp.arange(neighbour_labels.shape[0])[:, None]
    counts = jnp.zeros((neighbour_labels.shape[0], num_classes), jnp.float32)
    counts = counts.at[rows, neighbour_labels].add(1.0)
    # argmax and top_k both take the lowest label among equal counts. The entropy sums the
    # sorted histogram so relabelled histograms get bit-identical confidence (real ties).
    probs = jnp.sort(counts, axis=1) / neighbour_labels.shape[1]
    return jnp.argmax(counts, axis=1), _top5(counts), -_entropy(probs)


_histogram_jit = jax.jit(_histogram_predictions, static_argnames=("num_classes",))


def label_inference(neighbour_labels: ArrayLike, num_classes: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Label prediction from the k nearest public neighbours' labels (Meehan et al. 2023).

    Args:
      neighbour_labels: [Q, k] int labels in [0, num_classes).

    Returns:
      (top-1 [Q], top-5 [Q, min(5, C)] most frequent labels, ties to the lower label;
      confidence [Q] = -entropy (natural log) of the neighbour label histogram).
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    labels = _labels(neighbour_labels, "neighbour_labels", num_classes, ndim=2)
    return _histogram_jit(jnp.asarray(labels, jnp.int32), num_classes=num_classes)


def _probs_predictions(probs: jax.Array):
    return jnp.argmax(probs, axis=1), _top5(probs), -_entropy(probs)


_probs_jit = jax.jit(_probs_predictions)


def classifier_inference(probs: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The same triple from a correlation detector's class probabilities [Q, C].

    Rows are renormalised to sum to 1; confidence = -entropy of the row.
    """
    p = _matrix(probs, "reference_probs")
    if (p < 0).any() or (p.sum(axis=1) <= 0).any():
        raise InputError("reference_probs: expected non-negative rows with a positive sum")
    return _probs_jit(jnp.asarray(p / p.sum(axis=1, keepdims=True), jnp.float32))


def accuracy_by_confidence(confidence: ArrayLike, correct: ArrayLike,
                           fractions: Sequence[float]) -> np.ndarray:
    """Accuracy among the most confident ``round(f * Q)`` queries (>= 1) for each f.

    Confidence ties are broken by query order (stable sort). Returns [F] float64.
    """
    conf = np.asarray(confidence, np.float64)
    hit = np.asarray(correct, np.float64)
    order = np.argsort(-conf, kind="stable")
    counts = [max(1, math.floor(f * len(conf) + 0.5)) for f in fractions]
    return np.array([hit[order[:n]].mean() for n in counts])


def dejavu(target_emb: ArrayLike, reference_emb: ArrayLike | None,
           public_emb: ArrayLike | tuple[ArrayLike, ArrayLike],
           public_labels: ArrayLike, true_labels: ArrayLike, *, k: int = 100,
           fractions: Sequence[float] = (0.05, 0.2, 1.0), num_classes: int | None = None,
           metric: str = "l2", block_size: int = 1024,
           reference_probs: ArrayLike | None = None) -> dict[str, Any]:
    """Déjà vu label-inference test of a target model against a reference (Meehan et al.).

    Args:
      target_emb, reference_emb: [Q, D] embeddings of the same background crops by the
        target and the reference model. ``reference_emb=None`` with ``reference_probs``
        [Q, C]: a correlation detector replaces the reference model.
      public_emb: the public set embedded by each model, as the paper does:
        ``(target_public [P, D], reference_public [P, D'])``; one [P, D] array is used
        for both (only meaningful when the models share an embedding space).
      public_labels: [P] int.
      true_labels: [Q] int true label of each crop's image.
      k: neighbours (paper: 100). fractions: most-confident fractions (paper: 5/20/100%).

    Returns:
      ``{"fractions": [F], "target": m, "reference": m, "gap": {"top1": [F], "top5": [F]}}``
      with each ``m = {"top1": [F], "top5": [F] accuracies, "pred_top1": [Q],
      "pred_top5": [Q, 5], "confidence": [Q]}``; gap = target - reference (higher = more
      déjà vu memorization).
    """
    fractions = _fractions(fractions)
    pub_labels = np.asarray(public_labels)
    truth = np.asarray(true_labels)
    if reference_probs is not None and num_classes is None:
        num_classes = np.shape(reference_probs)[-1]  # the detector's classes
    if num_classes is None:
        num_classes = int(max(_int_max(pub_labels, "public_labels"),
                              _int_max(truth, "true_labels"))) + 1
    num_classes = check_positive_int(num_classes, "num_classes")
    pub_labels = _labels(pub_labels, "public_labels", num_classes, ndim=1)
    truth = _labels(truth, "true_labels", num_classes, ndim=1)
    if isinstance(public_emb, (tuple, list)):
        if len(public_emb) != 2:
            raise InputError("public_emb: expected one [P, D] array or a pair (target's, "
                             f"reference's), got a sequence of {len(public_emb)}")
        publics = {"target": _matrix(public_emb[0], "public_emb[0]"),
                   "reference": _matrix(public_emb[1], "public_emb[1]")}
    else:
        shared = _matrix(public_emb, "public_emb")
        publics = {"target": shared, "reference": shared}
    for public in publics.values():
        if len(pub_labels) != len(public):
            raise InputError(f"public_labels has {len(pub_labels)} labels for {len(public)} "
                             "public embeddings; expected one per row")
    if (reference_emb is None) == (reference_probs is None):
        raise InputError("pass exactly one of reference_emb (a reference model) and "
                         "reference_probs (a correlation detector)")

    def by_knn(emb: ArrayLike, name: str, public: np.ndarray):
        emb = _matrix(emb, name)
        if len(emb) != len(truth):
            raise InputError(f"{name} has {len(emb)} rows for {len(truth)} true_labels")
        _, idx = knn(emb, public, k, metric=metric, block_size=block_size)
        return label_inference(pub_labels[np.asarray(idx)], num_classes)

    results = {"target": by_knn(target_emb, "target_emb", publics["target"])}
    if reference_emb is not None:
        results["reference"] = by_knn(reference_emb, "reference_emb", publics["reference"])
    else:
        if np.shape(reference_probs)[-1] != num_classes:
            raise InputError(f"reference_probs has {np.shape(reference_probs)[-1]} classes; "
                             f"expected num_classes={num_classes}")
        ref = classifier_inference(reference_probs)
        if ref[0].shape[0] != len(truth):
            raise InputError(f"reference_probs has {ref[0].shape[0]} rows for "
                             f"{len(truth)} true_labels")
        results["reference"] = ref
    out: dict[str, Any] = {"fractions": np.asarray(fractions)}
    for name, (top1, top5, conf) in results.items():
        top1, top5, conf = np.asarray(top1), np.asarray(top5), np.asarray(conf)
        hit5 = (top5 == truth[:, None]).any(axis=1)
        out[name] = {"top1": accuracy_by_confidence(conf, top1 == truth, fractions),
                     "top5": accuracy_by_confidence(conf, hit5, fractions),
                     "pred_top1": top1, "pred_top5": top5, "confidence": conf}
    out["gap"] = {m: out["target"][m] - out["reference"][m] for m in ("top1", "top5")}
    return out


# --------------------------------------------------------------------------- VLM sets


def neighbour_objects(public_sets: ArrayLike, indices: ArrayLike, top: int) -> np.ndarray:
    """Predicted object set of each query: the ``top`` objects most frequent among its
    neighbours' object sets (present at least once; ties to the lower object id).

    Args:
      public_sets: [P, C] bool objects of each public image (from its caption).
      indices: [Q, k] neighbour indices (from :func:`knn`).

    Returns:
      [Q, C] bool.
    """
    sets = np.asarray(public_sets)
    idx = np.asarray(indices)
    if sets.ndim != 2 or sets.dtype != bool:
        raise InputError(f"public_sets: expected a [P, C] bool array, got {sets.dtype} "
                         f"{sets.shape}")
    if idx.ndim != 2 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= len(sets):
        raise InputError(f"indices: expected [Q, k] ints in [0, {len(sets)})")
    top = check_positive_int(top, "top")
    counts = np.zeros((len(idx), sets.shape[1]), np.int64)
    for j in range(idx.shape[1]):  # k adds of [Q, C]: never a [Q, k, C] array
        counts += sets[idx[:, j]]
    order = np.argsort(-counts, axis=1, kind="stable")[:, :top]
    chosen = np.zeros_like(sets[:1].repeat(len(idx), 0))
    np.put_along_axis(chosen, order, True, axis=1)
    return chosen & (counts > 0)


def set_precision_recall(predicted: np.ndarray, true: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query precision |P∩T|/|P| and recall |P∩T|/|T| ([Q] each; 0 when P or T empty)."""
    hits = (predicted & true).sum(axis=1).astype(np.float64)
    n_pred = predicted.sum(axis=1)
    n_true = true.sum(axis=1)
    precision = np.divide(hits, n_pred, out=np.zeros_like(hits), where=n_pred > 0)
    recall = np.divide(hits, n_true, out=np.zeros_like(hits), where=n_true > 0)
    return precision, recall


def dejavu_sets(target_sets: ArrayLike, reference_sets: ArrayLike, true_sets: ArrayLike
                ) -> dict[str, Any]:
    """VLM déjà vu (Jayaraman et al. 2024): object-set precision/recall and their gaps.

    Args:
      target_sets, reference_sets: [Q, C] bool objects predicted for each training
        image by the target / reference model (e.g. :func:`neighbour_objects`).
      true_sets: [Q, C] bool ground-truth objects of each image.

    Returns:
      ``{"target": {"precision": [Q], "recall": [Q]}, "reference": {...}, "ppg", "prg",
      "mean_precision_gap", "mean_recall_gap"}`` where the population precision gap
      PPG = (#{q: prec_target > prec_reference} - #{q: prec_reference > prec_target}) / Q
      (the fraction of images the target "remembers better" minus the reverse), PRG the
      same for recall, and the mean gaps are mean(target - reference).
    """
    sets = {name: _bool_sets(x, name) for name, x in
            (("target_sets", target_sets), ("reference_sets", reference_sets),
             ("true_sets", true_sets))}
    shapes = {s.shape for s in sets.values()}
    if len(shapes) != 1:
        raise InputError(f"target_sets, reference_sets and true_sets must have one shape "
                         f"[Q, C], got {[s.shape for s in sets.values()]}")
    truth = sets["true_sets"]
    out: dict[str, Any] = {}
    for name in ("target", "reference"):
        precision, recall = set_precision_recall(sets[f"{name}_sets"], truth)
        out[name] = {"precision": precision, "recall": recall}
    for metric, key in (("precision", "ppg"), ("recall", "prg")):
        diff = out["target"][metric] - out["reference"][metric]
        out[key] = float(np.mean(np.sign(diff)))
        out[f"mean_{metric}_gap"] = float(np.mean(diff))
    return out


# --------------------------------------------------------------------------- validation


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise InputError(f"{name}: expected numbers, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise InputError(f"{name} has NaN or Inf; expected finite numbers")
    return a.astype(np.float32)


def _int_max(labels: np.ndarray, name: str) -> int:
    if labels.size == 0 or labels.dtype.kind not in "iu":
        raise InputError(f"{name}: expected a non-empty integer array, got {labels.dtype} "
                         f"{labels.shape}")
    return int(labels.max())


def _labels(labels: ArrayLike, name: str, num_classes: int, ndim: int) -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim != ndim or a.size == 0 or a.dtype.kind not in "iu":
        raise InputError(f"{name}: expected a non-empty {ndim}-D integer array, got "
                         f"{a.dtype} {a.shape}")
    if a.min() < 0 or a.max() >= num_classes:
        raise InputError(f"{name}: labels must lie in [0, {num_classes}), got "
                         f"[{a.min()}, {a.max()}]")
    return a


def _fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except TypeError as err:
        raise InputError(f"fractions: expected a sequence of numbers, got {fractions!r}") \
            from err
    if not values or any(not 0 < f <= 1 for f in values):
        raise InputError(f"fractions: expected numbers in (0, 1], got {fractions!r}")
    return values


def _bool_sets(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.dtype != bool or a.shape[0] < 1:
        raise InputError(f"{name}: expected a non-empty [Q, C] bool array, got {a.dtype} "
                         f"{a.shape}")
    return a


# --------------------------------------------------------------------------- crops from a model

CROPS = ("none", "center", "periphery")


def center_box(height: int, width: int, fraction: float = 0.5) -> tuple[int, int, int, int]:
    """The central box ``(top, left, h, w)`` covering ``fraction`` of each side (at least one
    pixel; torchvision's centre-crop rounding)."""
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    if not 0 < float(fraction) <= 1:
        raise InputError(f"fraction={fraction!r}: expected a side fraction in (0, 1]")
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    return int(round((height - h) / 2.0)), int(round((width - w) / 2.0)), h, w


def periphery_box(height: int, width: int, fraction: float = 0.5
                  ) -> tuple[int, int, int, int]:
    """The largest rectangle outside the central box of ``fraction`` of each side
    (:func:`background_box` with that box as the object): a stand-in for Meehan et al.'s
    background crop when no object boxes are annotated and objects sit in the middle of
    the picture (as in ImageNet-style photos)."""
    top, left, h, w = center_box(height, width, fraction)
    if h == height and w == width:
        raise InputError(f"fraction={fraction!r}: the central box covers the whole image; "
                         "expected a fraction < 1 for a periphery crop")
    return background_box([left, top, left + w, top + h], height, width)


def _crop_embedding_fn(encode, layer, box, size, normalize, image_field):
    """fn(params, example) -> {"embedding": [D]}: crop, resize to the input size, normalise,
    encode (a tap is averaged over its positions, the model output flattened)."""
    def fn(params, example):
        from memjax.augment import resample_box

        image = example[image_field].astype(jnp.float32)
        if box is not None:
            image = resample_box(image, box, size)
        if normalize is not None:
            mean, std = (jnp.reshape(v, (1,) * (image.ndim - v.ndim) + v.shape)
                         for v in normalize)
            image = (image - mean) / std
        out = encode(params, image)
        if layer is not None:
            rep = out[layer].astype(jnp.float32)
            rep = rep.reshape(-1, rep.shape[-1]).mean(axis=0) if rep.ndim else rep[None]
        else:
            rep = jnp.ravel(out).astype(jnp.float32)
        return {"embedding": rep}
    return fn


def crop_embeddings(model: Any, source: Any, *, crop: str = "none", fraction: float = 0.5,
                    layer: str | None = None, normalize: tuple[Any, Any] | None = None,
                    image_field: str = "image", batch_size: int, mesh: Mesh | None = None,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """Embeddings of (crops of) every image of ``source`` for :func:`dejavu`.

    Meehan et al. 2023 embed the background crop of each training image; here the crop is
    ``"none"`` (the image as given, e.g. a background crop already cut from the original
    with :func:`background_box`), ``"center"`` (:func:`center_box`) or ``"periphery"``
    (:func:`periphery_box`), bilinearly resized back to the image size
    (:func:`memjax.augment.resample_box`), then normalised with ``normalize`` and encoded.

    Args:
      model: a :class:`memjax.Model` image encoder (a CLIP's ``tower("image")``).
      source: images ``[H, W, C]`` (all one size) in ``image_field``; for a model that
        normalises its inputs, pass them in [0, 1] with ``normalize=(mean, std)`` so the
        crop is resampled in pixel space.
      layer: a tap name (its activation averaged over space/tokens to ``[D]``), or None
        for the model's output, flattened.

    Returns:
      ``{"id": [N], "embedding": [N, D] float32}``.
    """
    from memjax.engine import score

    check_choice("crop", crop, CROPS)
    first = source.read(np.zeros(1, np.int64)) if hasattr(source, "read") else \
        {k: np.asarray(v)[:1] for k, v in source.items()}
    if image_field not in first or np.ndim(first[image_field]) != 4:
        raise InputError(f"source: expected an image field {image_field!r} [N, H, W, C], got "
                         f"fields { {k: np.shape(v) for k, v in first.items()} }")
    height, width = np.shape(first[image_field])[1:3]
    box = {"none": None, "center": center_box, "periphery": periphery_box}[crop]
    box = None if box is None else box(height, width, fraction)
    encode = model.apply
    if layer is not None:
        view = jax.ShapeDtypeStruct(np.shape(first[image_field])[1:], jnp.float32)
        available = model.activation_names(view)
        if layer not in available:
            raise InputError(f"layer {layer!r} is not among the model's activations; "
                             f"available: {', '.join(available)}")
        encode = model.activations((layer,))
    if normalize is not None:
        normalize = tuple(np.asarray(v, np.float32) for v in normalize)
    fn = _crop_embedding_fn(encode, layer, box, (int(height), int(width)), normalize,
                            image_field)
    out = score(fn, model.params, source, batch_size=batch_size, mesh=mesh,
                progress=progress)
    return {"id": np.asarray(out["id"]), "embedding": np.asarray(out["embedding"])}
