"""UnitMem: per-unit memorization of an SSL vision encoder.

Wang et al. 2024, "Localizing Memorization in SSL Vision Encoders" (NeurIPS). For unit
``u`` of a layer and training example ``i``, ``mu[i, u]`` is the unit's activation
averaged over ``K`` SimCLR augmentations of ``x_i`` (conv channels averaged over space,
token units averaged over tokens). With ``mu_max = max_i mu[i, u]`` and ``mu_-max`` the
mean (the paper's text) or median (the reference code) of ``mu[., u]`` over the OTHER
examples::

    UnitMem(u) = (mu_max - mu_-max) / (mu_max + mu_-max)

A unit close to 1 fires for one example far more than for the rest. Unlike the reference
code (sprintml/LocalizingMemorizationInSSL): augmentation happens in [0, 1] space before the
model's own normalisation, BatchNorm uses running statistics (the model's ``train=False``), and the
ratio is eps-guarded so a dead unit scores exactly 0.

Text encoders (a model reading ``input_ids``, e.g. BERT): the views are a text view of
the tokens (e.g. :class:`memjax.augment.TokenMaskView`) and a unit's activation is averaged
over the REAL tokens of each view (``attention_mask``), not over padding; a tap whose
positions are not the tokens (a pooled output) is averaged over all its positions. The
paper studies vision encoders only; this is the same definition with tokens in place of
spatial positions.

Negative activations (GELU, pre-activation taps): UnitMem assumes non-negative
(post-ReLU) activations, else the ratio can leave [0, 1] or blow up when the denominator
crosses 0. ``negative="clamp"`` (default) clamps ``mu`` at 0 — the value a ReLU would give
the averaged unit; ``negative="shift"`` subtracts each unit's minimum over examples
(``mu - min_i mu[i, u]``), which keeps the ordering of examples for units that are
negative everywhere. Both leave post-ReLU activations unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax import kernels
from memjax._checks import check_choice, check_positive_int, device_dtype
from memjax.augment import SimCLRView, check_image_shape, keyed_views, output_size
from memjax.data.base import ID_FIELD, SliceSource, as_source
from memjax.engine import make_mesh, param_shardings, score
from memjax.engine.mesh import place_params
from memjax.errors import InputError
from memjax.models import Model

OTHERS = ("mean", "median")
SPATIAL = ("mean", "max")
NEGATIVE = ("clamp", "shift")
ViewsFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------- formula

def _check_eps(eps: float) -> float:
    if not np.isfinite(eps) or eps < 0:
        raise InputError(f"eps={eps!r}: expected a finite number >= 0")
    return float(eps)


def unitmem_ratio(mu_max: np.ndarray, mu_others: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``(mu_max - mu_others) / (mu_max + mu_others + eps)``, exactly 0 where both are 0.

    For non-negative inputs the denominator is 0 only for a dead unit; it scores 0 (not
    NaN) even with ``eps=0``.
    """
    mu_max = np.asarray(mu_max, np.float64)
    mu_others = np.asarray(mu_others, np.float64)
    den = mu_max + mu_others
    live = den > 0
    return np.where(live, (mu_max - mu_others) / np.where(live, den + eps, 1.0), 0.0)


def _non_negative(mu: np.ndarray, negative: str) -> np.ndarray:
    """``mu [N, U]`` made non-negative as documented in the module docstring."""
    if negative == "clamp":
        return np.maximum(mu, 0.0)
    return mu - mu.min(axis=0, keepdims=True)


def unitmem_from_activations(mu: Any, *, others: str = "mean", eps: float = 1e-8,
                             negative: str = "clamp") -> tuple[np.ndarray, np.ndarray]:
    """UnitMem of every unit from materialised mean activations.

    Args:
      mu: ``[N, U]`` per-example (augmentation-averaged) unit activations, N >= 2.
      others: ``"mean"`` (paper) or ``"median"`` (reference code) over the non-argmax rows.
      eps: added to the denominator; a dead unit (all zeros) scores 0 whatever eps.
      negative: ``"clamp"`` or ``"shift"`` (module docstring).

    Returns:
      ``(scores [U] float64 in [0, 1], argmax [U] int64)``; ties in the maximum go to the
      first (lowest) row index, as ``np.argmax``.
    """
    check_choice("others", others, OTHERS)
    check_choice("negative", negative, NEGATIVE)
    eps = _check_eps(eps)
    mu = np.asarray(mu, np.float64)
    if mu.ndim != 2 or mu.shape[0] < 2 or mu.shape[1] < 1:
        raise InputError(f"mu shape {mu.shape}: expected [N, U] with N >= 2 examples and "
                         "U >= 1 units")
    if not np.isfinite(mu).all():
        raise InputError("mu has NaN or Inf; expected finite activations")
    mu = _non_negative(mu, negative)
    n = mu.shape[0]
    argmax = np.argmax(mu, axis=0)
    mu_max = mu[argmax, np.arange(mu.shape[1])]
    if others == "mean":
        mu_others = (mu.sum(axis=0) - mu_max) / (n - 1)
    else:
        rest = np.ones_like(mu, dtype=bool)
        rest[argmax, np.arange(mu.shape[1])] = False
        mu_others = np.median(mu.T[rest.T].reshape(mu.shape[1], n - 1), axis=1)
    return unitmem_ratio(mu_max, mu_others, eps), argmax.astype(np.int64)


# --------------------------------------------------------------------------- streaming

@dataclasses.dataclass(frozen=True)
class RunningStats:
    """Per-unit running statistics of ``mu`` over the examples seen so far.

    ``max``/``argmax`` (first index on ties), ``sum`` and ``min`` are float64 ``[U]``;
    ``count`` is the number of examples. Merged by :func:`combine`, associatively, so
    batches, chunks or shards can be folded in any grouping.
    """

    max: np.ndarray
    argmax: np.ndarray
    sum: np.ndarray
    min: np.ndarray
    count: int


def batch_stats(mu: np.ndarray, offset: int) -> RunningStats:
    """Statistics of the rows ``mu [b, U]`` whose first row is example index ``offset``."""
    mu = np.asarray(mu, np.float64)
    argmax = np.argmax(mu, axis=0)
    return RunningStats(max=mu[argmax, np.arange(mu.shape[1])], argmax=argmax + offset,
                        sum=mu.sum(axis=0), min=mu.min(axis=0), count=mu.shape[0])


def combine(a: RunningStats | None, b: RunningStats) -> RunningStats:
    """Merge two statistics; on equal maxima the lower example index wins."""
    if a is None:
        return b
    take_b = (b.max > a.max) | ((b.max == a.max) & (b.argmax < a.argmax))
    return RunningStats(max=np.where(take_b, b.max, a.max),
                        argmax=np.where(take_b, b.argmax, a.argmax),
                        sum=a.sum + b.sum, min=np.minimum(a.min, b.min),
                        count=a.count + b.count)


def unitmem_from_stats(stats: RunningStats, *, eps: float = 1e-8,
                       negative: str = "clamp") -> np.ndarray:
    """UnitMem ``[U]`` with the MEAN over the other examples, from running statistics.

    ``negative="clamp"`` expects the statistics of already-clamped ``mu``; ``"shift"``
    subtracts ``min`` here (max and mean shift by it; the argmax does not move).
    """
    if stats.count < 2:
        raise InputError(f"UnitMem needs at least 2 examples, got {stats.count}")
    mu_max, total = stats.max, stats.sum
    if negative == "shift":
        mu_max, total = mu_max - stats.min, total - stats.count * stats.min
    return unitmem_ratio(mu_max, (total - mu_max) / (stats.count - 1), eps)


# --------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class LayerUnitMem:
    """UnitMem of one layer: ``scores [U]``, the argmax example per unit (``argmax``: its
    index in the source, ``argmax_id``: its id), ``summary`` and ``mu [N, U]`` if asked."""

    scores: np.ndarray
    argmax: np.ndarray
    argmax_id: np.ndarray
    summary: dict[str, float]
    mu: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class UnitMemResult:
    """Per-layer UnitMem (``layers[name]``), with the run's settings; ``ids [N]`` are the
    example ids of the rows of each ``mu`` (None unless μ was returned)."""

    layers: dict[str, LayerUnitMem]
    n_examples: int
    n_aug: int
    others: str
    ids: np.ndarray | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: layer.summary for name, layer in self.layers.items()}


def summarize(scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Mean, median, max of a layer's UnitMem and the fraction of units above threshold."""
    scores = np.asarray(scores, np.float64)
    return {"n_units": float(scores.size), "mean": float(scores.mean()),
            "median": float(np.median(scores)), "max": float(scores.max()),
            f"frac_above_{threshold}": float((scores > threshold).mean()),
            "frac_zero": float((scores == 0).mean())}


# --------------------------------------------------------------------------- engine glue


def unit_means(activation: jax.Array, spatial: str = "mean",
               weights: jax.Array | None = None) -> jax.Array:
    """``[K, ..., U]`` activations of K views -> ``[U]``: each view reduced over every
    axis but the last (space or tokens) by ``spatial``, then averaged over views.

    ``weights`` ``[K, P]`` (a text view's ``attention_mask``): when the activation has
    exactly P positions per view, only positions with weight > 0 count (masked mean, or
    max over them; a view with no real token gives 0); other activations ignore it.
    """
    # float32 before reducing: a bf16 mean over thousands of positions loses digits.
    flat = activation.astype(jnp.float32).reshape(activation.shape[0], -1,
                                                  activation.shape[-1])
    if weights is not None and weights.shape == flat.shape[:2]:
        real = (weights > 0)[..., None]
        if spatial == "mean":
            count = jnp.maximum(jnp.sum(real, axis=1).astype(jnp.float32), 1.0)
            per_view = jnp.sum(jnp.where(real, flat, 0.0), axis=1) / count
        else:
            top = jnp.max(jnp.where(real, flat, -jnp.inf), axis=1)
            per_view = jnp.where(jnp.any(real, axis=1), top, 0.0)
        return per_view.mean(axis=0)
    per_view = flat.mean(axis=1) if spatial == "mean" else flat.max(axis=1)
    return per_view.mean(axis=0)


VIEWS_FIELD = "_unitmem_views"


def is_text_model(model: Model) -> bool:
    """Does the model read tokens (``input_ids``) rather than an image?"""
    return "input_ids" in model.inputs


def _text_views_stage(views_fn: ViewsFn, n_aug: int, seed: int, fields: tuple[str, ...]):
    """prepare(example) -> K text views, one field ``VIEWS_FIELD/<name>`` [K, T] per model
    input (``views_fn`` maps the dict of the example's model inputs to a view of it)."""
    def prepare(example):
        views = keyed_views(views_fn, {f: example[f] for f in fields}, seed,
                            example[ID_FIELD], n_aug)
        return {f"{VIEWS_FIELD}/{f}": views[f] for f in fields}
    return prepare


def _text_unit_means_fn(activations, layers: tuple[str, ...], spatial: str,
                        fields: tuple[str, ...]):
    """As :func:`_unit_means_fn` for text views: b*K views through the encoder as one flat
    batch, each unit averaged over the real tokens of each view (``attention_mask``)."""
    def fn(params, rows):
        views = {f: rows[f"{VIEWS_FIELD}/{f}"] for f in fields}
        b, k = views["input_ids"].shape[:2]
        flat = {f: v.reshape(b * k, *v.shape[2:]) for f, v in views.items()}
        acts = jax.vmap(activations, in_axes=(None, 0))(params, flat)
        weights = views.get("attention_mask")
        out = []
        for name in layers:
            a = acts[name].reshape(b, k, *acts[name].shape[1:])
            if weights is None:
                out.append(jax.vmap(lambda x: unit_means(x, spatial))(a))
            else:
                out.append(jax.vmap(lambda x, w: unit_means(x, spatial, w))(a, weights))
        return tuple(out)
    return fn


def _views_stage(views_fn: ViewsFn, n_aug: int, seed: int, image_field: str,
                 normalize: tuple[np.ndarray, np.ndarray] | None):
    """prepare(example) -> the example's K views [K, h, w, C] (the engine runs this as its
    own program per batch, before the encoder: measured faster than one fused program)."""
    def prepare(example):
        image = example[image_field]
        if image.dtype == jnp.uint8:
            image = image.astype(jnp.float32) / 255.0
        views = keyed_views(views_fn, image, seed, example[ID_FIELD], n_aug)
        if normalize is not None:  # after augmentation: jitter/clip act in [0, 1] space
            mean, std = (_channels_last(v, views.ndim) for v in normalize)
            views = (views - mean) / std
        return {VIEWS_FIELD: views}
    return prepare


def _channels_last(value: np.ndarray, ndim: int) -> np.ndarray:
    """A (mean or std) value [C] (or scalar) shaped to broadcast over ``[..., C]`` arrays of
    ``ndim`` axes (explicitly: memjax runs with rank promotion disallowed)."""
    value = np.asarray(value, np.float32)
    return value.reshape((1,) * (ndim - value.ndim) + value.shape)


def _unit_means_fn(activations, layers: tuple[str, ...], spatial: str):
    """fn(params, rows) -> tuple of mu [b, U_l] per layer for a device's rows of views
    [b, K, h, w, C]: all b*K views through the encoder as one flat batch (the engine's
    ``batched`` mode; 3.3x faster on XLA:CPU than nesting a vmap over views in a vmap over
    examples), then each example's views reduced by :func:`unit_means`."""
    def fn(params, rows):
        views = rows[VIEWS_FIELD]
        b, k = views.shape[:2]
        acts = jax.vmap(activations, in_axes=(None, 0))(params,
                                                        views.reshape(b * k, *views.shape[2:]))
        return tuple(jax.vmap(lambda a: unit_means(a, spatial))(
            acts[name].reshape(b, k, *acts[name].shape[1:])) for name in layers)
    return fn


def _check_layers(model: Model, view: Any, layers: Sequence[str]) -> tuple[str, ...]:
    """Layer names or fnmatch patterns resolved against the model's activations (shapes
    only, no compute); a name or pattern matching none lists every activation name."""
    if isinstance(layers, str):
        layers = [layers]
    layers = tuple(layers)
    if not layers:
        raise InputError("layers: expected at least one layer name")
    available = model.activation_names(view)
    unknown = [name for name in layers
               if not any(fnmatch.fnmatchcase(a, name) for a in available)]
    if unknown:
        raise InputError(f"layers {unknown} are not among the model's activations; "
                         f"available: {', '.join(available)}")
    layers = tuple(dict.fromkeys(a for name in layers for a in available
                                 if fnmatch.fnmatchcase(a, name)))
    shapes = jax.eval_shape(model.activations(layers), model.params, view)
    for name in layers:
        if len(shapes[name].shape) < 1:
            raise InputError(f"layer {name!r} is a scalar; expected [..., units]")
    return layers


def _check_images(image_field: str):
    def validate(fields: dict[str, np.ndarray], indices: np.ndarray) -> None:
        images = fields[image_field]
        if images.dtype.kind == "f" and images.size and (images.min() < 0 or images.max() > 1):
            bad = ((images < 0) | (images > 1)).reshape(len(images), -1).any(axis=1)
            raise InputError(f"field {image_field!r}: example index {indices[np.argmax(bad)]} "
                             "has values outside [0, 1]; expected un-normalised images in "
                             "[0, 1] (pass normalize=(mean, std) for the model's own)")
    return validate


def chunk_stats(mu: np.ndarray, offset: int) -> RunningStats:
    """:func:`batch_stats` of one chunk with max / argmax / min from the ``unit_stats``
    kernel dispatch (``memjax.kernels``; exact in float32, as ``mu`` is) and the sum
    accumulated in float64 on the host: a float32 sum moves the scores by ~1e-7 relative
    (measured in tests/test_unitmem.py), above the 1e-12 agreement with the float64
    formula that memjax keeps."""
    mu = np.asarray(mu)
    device = kernels.unit_stats(jnp.asarray(mu, jnp.float32))
    return RunningStats(max=np.asarray(device["max"], np.float64),
                        argmax=np.asarray(device["argmax"], np.int64) + offset,
                        sum=mu.astype(np.float64).sum(axis=0),
                        min=np.asarray(device["min"], np.float64), count=mu.shape[0])


def unitmem(model: Model, source: Any, *, layers: Sequence[str], n_aug: int,
            views_fn: ViewsFn | None = None, seed: int = 0, others: str = "mean",
            spatial: str = "mean", eps: float = 1e-8, size=None, batch_size: int, mesh=None,
            return_mu: bool = False, image_field: str = "image",
            normalize: tuple[Any, Any] | None = None, negative: str = "clamp",
            chunk_size: int | None = None, progress: bool = False) -> UnitMemResult:
    """UnitMem of every unit of ``layers`` over the examples of ``source``.

    Args:
      model: a :class:`memjax.Model` image encoder (any port through ``memjax.load``, a
        memjax.train encoder, or ``Model.from_apply``); ``layers`` name its activations.
      source: a dict of arrays or a memjax source with ``image_field`` ``[H, W, C]`` in
        [0, 1] (float) or uint8 (divided by 255); example ids key the augmentations.
      layers: activation names of the model (``model.activation_names``) or fnmatch
        patterns over them (``"layers.*.out"``), resolved in the model's order.
      n_aug: views per example (the reference code uses 10).
      views_fn: ``views_fn(image, key) -> view``; default: the SimCLR view
        (:class:`memjax.augment.SimCLRView`) at ``size`` (default: the image size). For
        a text model (it reads ``input_ids``): required, ``views_fn(inputs, key)`` on the
        dict of the model's input fields (e.g. :class:`memjax.augment.TokenMaskView`);
        ``image_field``, ``size`` and ``normalize`` do not apply.
      seed: view k of example id i uses ``view_key(seed, i, k)``.
      others: ``"mean"`` (paper; streamed) or ``"median"`` (reference code; materialises
        ``mu [N, U]`` on the host, as a median needs every value).
      spatial: reduce each view's activation over space/tokens by ``"mean"`` or ``"max"``.
      eps, negative: see :func:`unitmem_from_activations`.
      batch_size, mesh, progress: passed to :func:`memjax.engine.score`.
      return_mu: also return ``mu [N, U]`` per layer (materialised on the host).
      normalize: ``(mean, std)`` applied to each view after augmentation.
      chunk_size: examples per engine call (a multiple of ``batch_size``; default 64
        batches): with ``others="mean"`` only one chunk of ``mu`` exists at a time.

    The engine makes each batch's views in one program (``score(prepare=...)``) and runs
    the encoder on them in a second (vmapped, sharded on the mesh's data axis); each
    chunk's ``mu`` is reduced to per-unit max/argmax/sum/min (:func:`chunk_stats`) and
    merged into the running statistics (:func:`combine`). Activations are never kept
    beyond a chunk.

    Returns:
      :class:`UnitMemResult`.
    """
    if not isinstance(model, Model):
        raise InputError(f"model: expected a memjax.Model (memjax.load, Model.from_classifier, "
                         f"Model.from_apply), got {type(model).__name__}")
    check_choice("others", others, OTHERS)
    check_choice("spatial", spatial, SPATIAL)
    check_choice("negative", negative, NEGATIVE)
    eps = _check_eps(eps)
    n_aug = check_positive_int(n_aug, "n_aug")
    batch_size = check_positive_int(batch_size, "batch_size")
    source = as_source(source)
    n = len(source)
    if n < 2:
        raise InputError(f"source has {n} example; UnitMem compares each unit's top example "
                         "with the others and needs at least 2")
    first = source.read(np.zeros(1, np.int64))
    text = is_text_model(model)
    if text:
        missing = [f for f in model.inputs if f not in first]
        if missing:
            raise InputError(f"source: the text model reads {list(model.inputs)}; missing "
                             f"{missing} (fields: {sorted(first)})")
        if views_fn is None:
            raise InputError("views_fn: a text model needs a text view, e.g. "
                             "memjax.augment.TokenMaskView(mask_id=tokenizer.mask_token_id)")
        fields = tuple(model.inputs)
        view = jax.eval_shape(views_fn, {f: jax.ShapeDtypeStruct(np.shape(first[f])[1:],
                                                                  device_dtype(first[f].dtype))
                                         for f in fields}, jax.random.key(0))
        layers = _check_layers(model, view, layers)
        prepare = _text_views_stage(views_fn, n_aug, int(seed), fields)
        fn = _text_unit_means_fn(model.activations(layers), layers, spatial, fields)
        validate = None
    else:
        layers, prepare, fn, validate = _image_setup(model, first, layers=layers,
                                                     n_aug=n_aug, views_fn=views_fn,
                                                     seed=seed, spatial=spatial, size=size,
                                                     image_field=image_field,
                                                     normalize=normalize)
    chunk = chunk_size or batch_size * 64
    if chunk % batch_size:
        raise InputError(f"chunk_size={chunk_size}: expected a multiple of batch_size="
                         f"{batch_size}")
    mesh = make_mesh() if mesh is None else mesh
    params = place_params(model.params, param_shardings(model.params, mesh))  # once
    return _run_unitmem(fn, params, source, n, layers=layers, chunk=chunk, mesh=mesh,
                        batch_size=batch_size, progress=progress, validate=validate,
                        prepare=prepare, negative=negative, others=others, eps=eps,
                        return_mu=return_mu, n_aug=n_aug)


def _image_setup(model: Model, first: dict[str, np.ndarray], *, layers, n_aug, views_fn,
                 seed, spatial, size, image_field, normalize):
    """(layers, prepare, fn, validate) of UnitMem on images."""
    if image_field not in first:
        raise InputError(f"image_field={image_field!r} not in the source; fields: "
                         f"{sorted(first)}")
    image_shape = np.shape(first[image_field])[1:]
    if len(image_shape) != 3:
        raise InputError(f"field {image_field!r} has per-example shape {image_shape}; "
                         "expected one image [H, W, C]")
    check_image_shape(image_shape, f"field {image_field!r}")
    if views_fn is None:
        h, w = output_size(size, image_shape, "unitmem")
        views_fn = SimCLRView(None if size is None else (h, w))
    view = jax.eval_shape(views_fn, jax.ShapeDtypeStruct(image_shape, jnp.float32),
                          jax.random.key(0))
    layers = _check_layers(model, jax.ShapeDtypeStruct(view.shape, jnp.float32), layers)
    if normalize is not None:
        normalize = tuple(np.asarray(v, np.float32) for v in normalize)
    prepare = _views_stage(views_fn, n_aug, int(seed), image_field, normalize)
    fn = _unit_means_fn(model.activations(layers), layers, spatial)
    return layers, prepare, fn, _check_images(image_field)


def _run_unitmem(fn, params, source, n: int, *, layers, chunk, mesh, batch_size, progress,
                 validate, prepare, negative, others, eps, return_mu, n_aug) -> UnitMemResult:
    """Stream the chunks of ``source`` through the engine and fold the statistics."""
    keep_mu = return_mu or others == "median"
    stats: list[RunningStats | None] = [None] * len(layers)
    mus: list[list[np.ndarray]] = [[] for _ in layers]
    ids = []
    for start in range(0, n, chunk):
        out = score(fn, params, SliceSource(source, start, min(n, start + chunk)),
                    batch_size=batch_size, mesh=mesh, progress=progress,
                    validate=validate, with_ids=True, prepare=prepare,
                    batched=True)
        ids.append(out[ID_FIELD])
        for l_idx in range(len(layers)):
            mu = np.asarray(out[str(l_idx)])
            clamped = np.maximum(mu, 0.0) if negative == "clamp" else mu
            stats[l_idx] = combine(stats[l_idx], chunk_stats(clamped, start))
            if keep_mu:  # raw mu: unitmem_from_activations(mu, ...) reproduces the scores
                mus[l_idx].append(np.asarray(mu, np.float64))

    all_ids = np.concatenate(ids)
    results = {}
    for l_idx, name in enumerate(layers):
        mu = np.concatenate(mus[l_idx]) if keep_mu else None
        if others == "mean":
            scores = unitmem_from_stats(stats[l_idx], eps=eps, negative=negative)
            argmax = stats[l_idx].argmax
        else:
            scores, argmax = unitmem_from_activations(mu, others="median", eps=eps,
                                                      negative=negative)
        results[name] = LayerUnitMem(scores=scores, argmax=argmax.astype(np.int64),
                                     argmax_id=all_ids[argmax], summary=summarize(scores),
                                     mu=mu if return_mu else None)
    return UnitMemResult(layers=results, n_examples=n, n_aug=int(n_aug), others=others,
                         ids=all_ids if return_mu else None)
