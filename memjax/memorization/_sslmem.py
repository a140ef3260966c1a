"""SSLMem, LayerMem and CLIPMem: memorization as a leave-out gap in view alignment.

- :func:`sslmem` -- Wang et al. 2024, "Memorization in Self-Supervised Learning Improves
  Downstream Generalization" (ICLR; reference code sprintml/MemorizationSSL). Encoder
  ``f`` was trained WITH example x, ``g`` WITHOUT it; f memorized x when it maps
  augmentations of x closer together than g does.
- :func:`layermem` -- Wang et al. 2024, "Localizing Memorization in SSL Vision Encoders"
  (NeurIPS): SSLMem on every layer's output, and ΔLayerMem between consecutive layers.
  Every layer comes from ONE forward pass per view (activation taps); the reference code
  builds a truncated model per layer, which is slower and drops ResNet skip connections.
- :func:`clipmem` -- Wang et al. 2025, "Captured by Captions: On Memorization and its
  Mitigation in CLIP Models" (ICLR): the same design on image-caption pairs, with the
  cross-modal alignment of augmented image views and the caption.

Alignment loss (the paper's Definition of SSLMem, not the code's variant): for K pairs
of augmented views ``(v_2k, v_2k+1)`` of x,

    L_align(f, x) = 1/K sum_k d(u(f(v_2k)), u(f(v_2k+1))),   u(z) = z / max(|z|_2, EPS)

over the flattened representation ``z``, with ``d`` the L2 distance (``distance="l2"``,
default) or its square (``"sq_l2"``, Wang & Isola's alignment loss with alpha = 2).
``SSLMem(x) = L_align(g, x) - L_align(f, x)``: higher = more memorized by f. The
reference code instead pairs the clean image with one augmented view
(``pairing="clean"``: d(u(f(x)), u(f(v_k))), k < K). Every function also returns the
range-normalised score ``raw / (max - min)`` over the scored set (0 when all are equal).

Models are :class:`memjax.Model` values (any port through ``memjax.load``, a memjax.train
encoder, or ``Model.from_apply``). Views come from a pure ``views_fn(image [H, W, C], key)
-> view [h, w, C]`` (e.g. :class:`memjax.augment.SimCLRView`); view k of example i uses
``view_key(seed, i, k)`` with the example's id from the engine (``score(with_ids=True)``),
so f and g see the same views for any batch size or device count.

Images of a checkpoint that normalises its inputs (mean/std): pass the images in [0, 1]
and ``normalize=(mean, std)``; the views are made in [0, 1] (colour jitter and clipping
assume it) and normalised afterwards, the clean image of ``pairing="clean"`` too.

Text encoders (a model reading ``input_ids``, e.g. BERT; not in the papers, which study
vision encoders): ``views_fn(inputs, key)`` maps the dict of the model's input fields to a
view (e.g. :class:`memjax.augment.TokenMaskView`), and a representation whose positions
are the tokens has its padding positions (``attention_mask == 0``) zeroed before it is
flattened and normalised, so padding never counts in the alignment.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memjax._checks import check_choice, check_positive_int, device_dtype
from memjax.augment import keyed_views
from memjax.data.base import ID_FIELD, as_source
from memjax.engine import score
from memjax.errors import InputError
from memjax.models import Model
from memjax.signals import EPS, contrastive

DISTANCES = ("l2", "sq_l2")
PAIRINGS = ("views", "clean")

ViewsFn = Callable[[jax.Array, jax.Array], jax.Array]
Encode = Callable[[Any, Any], Any]


# --------------------------------------------------------------------------- formulas


def _unit(z: jax.Array) -> jax.Array:
    flat = z.reshape(-1).astype(jnp.float32)
    return flat / jnp.maximum(jnp.linalg.norm(flat), EPS)


def view_distance(a: jax.Array, b: jax.Array, distance: str = "l2") -> jax.Array:
    """Distance of two representations (any shape, flattened) after L2 normalisation.

    Returns a float32 scalar: |u(a) - u(b)|_2 (``"l2"``) or its square (``"sq_l2"``).
    """
    sq = jnp.sum(jnp.square(_unit(a) - _unit(b)))
    return jnp.sqrt(sq) if distance == "l2" else sq


def cosine_alignment(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """CLIPMem's default alignment: cosine of one image and one text embedding ([D] each)."""
    return contrastive(image_emb, text_emb)["cosine"]


def _normalized(images: Any, normalize: tuple[Any, Any] | None) -> Any:
    if normalize is None:
        return images
    mean, std = (jnp.reshape(v, (1,) * (images.ndim - v.ndim) + v.shape) for v in normalize)
    return (images - mean) / std


def _view_batch(views_fn: ViewsFn, image: Any, example_id: jax.Array, n_aug: int,
                pairing: str, seed: int, normalize: tuple[Any, Any] | None = None) -> Any:
    """The inputs to encode: 2K views (pairs 2k, 2k+1), or [clean, K views] (code
    variant); ``image`` may be a dict of text fields (views and the clean input stacked
    field by field); ``normalize`` (images) applies after the views are made."""
    n_views = 2 * n_aug if pairing == "views" else n_aug
    views = keyed_views(views_fn, image, seed, example_id, n_views)
    if pairing == "clean":
        views = jax.tree.map(lambda clean, v: jnp.concatenate([clean[None].astype(v.dtype), v]),
                             image, views)
    return views if isinstance(views, Mapping) else _normalized(views, normalize)


def _token_masked(rep: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``rep`` with its padding positions zeroed, when its positions are the [T] tokens of
    ``mask``; any other representation (pooled, an image's) as it is."""
    if mask is None or rep.ndim == 0:
        return rep
    flat = rep.reshape(-1, rep.shape[-1])
    if flat.shape[0] != mask.shape[0]:
        return rep
    return jnp.where((mask > 0)[:, None], flat, jnp.zeros((), flat.dtype))


def _pair_split(reps: jax.Array, pairing: str) -> tuple[jax.Array, jax.Array]:
    if pairing == "views":
        return reps[0::2], reps[1::2]
    return jnp.broadcast_to(reps[:1], reps[1:].shape), reps[1:]


def alignment_losses(encode: Encode, params: Any, image: Any, example_id: jax.Array, *,
                     views_fn: ViewsFn, n_aug: int, seed: int,
                     layers: tuple[str, ...] | None, distance: str = "l2",
                     pairing: str = "views",
                     normalize: tuple[Any, Any] | None = None) -> jax.Array:
    """L_align of one encoder on ONE example, for each requested layer.

    Args:
      encode: ``encode(params, view) -> representation`` (``model.apply``) or
        ``-> {layer: activation}`` (``model.activations(layers)``).
      image: [H, W, C] the clean example (or, for a text encoder, the dict of its input
        fields ``{"input_ids": [T], "attention_mask": [T]}``); example_id: int scalar
        keying its views.
      layers: names to read from ``encode``'s dict output, or None for a bare array output.
      normalize: ``(mean, std)`` applied to image views after they are made.

    Returns:
      [L] float32 (L = len(layers), or 1 when ``layers`` is None): mean distance over the
      K view pairs, each layer read from the same forward pass of every view.
    """
    batch = _view_batch(views_fn, image, example_id, n_aug, pairing, seed, normalize)
    out = jax.vmap(encode, in_axes=(None, 0))(params, batch)
    reps = [out] if layers is None else [out[name] for name in layers]
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        reps = [jax.vmap(_token_masked)(r, batch["attention_mask"]) for r in reps]
    dist = jax.vmap(functools.partial(view_distance, distance=distance))
    return jnp.stack([jnp.mean(dist(*_pair_split(r, pairing))) for r in reps])


def clip_alignment(image_encode: Encode, text_encode: Encode, params: Any, image: jax.Array,
                   text: Any, example_id: jax.Array, *, views_fn: ViewsFn, n_aug: int,
                   seed: int,
                   alignment: Callable[[jax.Array, jax.Array], jax.Array] = cosine_alignment,
                   normalize: tuple[Any, Any] | None = None) -> jax.Array:
    """Mean over K augmented views (ids 0..K-1) of ``alignment(image_emb, text_emb)``; scalar.
    ``normalize`` (mean, std) applies to the views after they are made."""
    views = _normalized(keyed_views(views_fn, image, seed, example_id, n_aug), normalize)
    img = jax.vmap(image_encode, in_axes=(None, 0))(params, views)
    txt = text_encode(params, text)
    return jnp.mean(jax.vmap(alignment, in_axes=(0, None))(img, txt)).astype(jnp.float32)


def range_normalize(raw: np.ndarray) -> np.ndarray:
    """``raw / (max - min)`` along axis 0 (per column), float64; 0 where the range is 0."""
    raw = np.asarray(raw, dtype=np.float64)
    span = raw.max(axis=0) - raw.min(axis=0)
    # An all-equal set carries no ranking; 0 instead of 0/0.
    return np.divide(raw, span, out=np.zeros_like(raw), where=span > 0)


# --------------------------------------------------------------------------- f and g


def architecture_mismatch(f: Model, g: Model) -> str | None:
    """Why f and g cannot be evaluated as one stacked model, or None when they can."""
    if f.forward != g.forward or f.inputs != g.inputs:
        return (f"f and g are different apply functions ({f.name} vs {g.name}); "
                "stacking needs one function with two parameter sets")
    leaves_f, tree_f = jax.tree_util.tree_flatten_with_path(f.params)
    leaves_g, tree_g = jax.tree_util.tree_flatten_with_path(g.params)
    if tree_f != tree_g:
        return f"params_f and params_g have different pytree structures: {tree_f} vs {tree_g}"
    for (path, a), (_, b) in zip(leaves_f, leaves_g, strict=True):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            return (f"parameter {jax.tree_util.keystr(path)} is {np.shape(a)} "
                    f"{jnp.result_type(a)} in params_f but {np.shape(b)} "
                    f"{jnp.result_type(b)} in params_g")
    return None


def _plan_models(f: Model, g: Model, stack: bool | None) -> tuple[bool, Any]:
    """(stacked?, params for the score function): one vmapped model axis when possible."""
    if stack not in (None, True, False):
        raise InputError(f"stack: expected None (auto), True or False, got {stack!r}")
    mismatch = architecture_mismatch(f, g)
    if stack is True and mismatch is not None:
        raise InputError(f"stack=True: f and g do not share an architecture: {mismatch}")
    stacked = mismatch is None if stack is None else stack
    if stacked:
        return True, jax.tree.map(lambda a, b: jnp.stack([a, b]), f.params, g.params)
    return False, {"f": f.params, "g": g.params}


def _both(encoders_f: Any, encoders_g: Any, stacked: bool,
          per_model: Callable[[Any, Any], jax.Array], params: Any) -> dict[str, jax.Array]:
    if stacked:
        # One model axis: f and g run as one vmapped computation (bigger, fewer kernels).
        out = jax.vmap(lambda p: per_model(encoders_f, p))(params)
        return {"f": out[0], "g": out[1]}
    return {"f": per_model(encoders_f, params["f"]), "g": per_model(encoders_g, params["g"])}


def _sslmem_fn(encode_f, encode_g, stacked, views_fn, n_aug, seed, layers, distance, pairing,
               image_field, text_fields, normalize):
    """The per-example score function (the engine caches it by value: no lru_cache)."""
    def fn(params, example):
        inputs = ({f: example[f] for f in text_fields} if text_fields
                  else example[image_field])

        def per_model(encode, p):
            return alignment_losses(encode, p, inputs, example[ID_FIELD],
                                    views_fn=views_fn, n_aug=n_aug, seed=seed, layers=layers,
                                    distance=distance, pairing=pairing, normalize=normalize)
        return _both(encode_f, encode_g, stacked, per_model, params)
    return fn


def _clipmem_fn(towers_f, towers_g, stacked, views_fn, n_aug, seed, alignment, image_field,
                normalize):
    def fn(params, example):
        def per_model(towers, p):
            image_encode, text_encode = towers
            return clip_alignment(image_encode, text_encode, p, example[image_field], example,
                                  example[ID_FIELD], views_fn=views_fn, n_aug=n_aug,
                                  seed=seed, alignment=alignment, normalize=normalize)
        return _both(towers_f, towers_g, stacked, per_model, params)
    return fn


# --------------------------------------------------------------------------- validation


def _check_models(**models: Any) -> None:
    for name, model in models.items():
        if not isinstance(model, Model):
            raise InputError(f"{name}: expected a memjax.Model (memjax.load, "
                             "Model.from_classifier, Model.from_apply), got "
                             f"{type(model).__name__}")


def _callables(**fns: Any) -> None:
    for name, fn in fns.items():
        if not callable(fn):
            raise InputError(f"{name}: expected a function, got {type(fn).__name__}")


def _first_example(source: Any, fields: Sequence[str]) -> dict[str, np.ndarray]:
    first = source.read(np.zeros(1, dtype=np.int64))
    for field in fields:
        if field not in first:
            raise InputError(f"source: no field {field!r}; the source has fields {sorted(first)}")
    return {k: v[0] for k, v in first.items()}


def _abstract(x: np.ndarray) -> jax.ShapeDtypeStruct:
    # The dtype the engine hands the score function (64-bit host fields become 32-bit).
    return jax.ShapeDtypeStruct(x.shape, device_dtype(x.dtype))


def _abstract_view(views_fn: ViewsFn, image: Any, pairing: str) -> Any:
    if isinstance(image, Mapping):  # a text encoder's input fields
        view = jax.eval_shape(views_fn, {k: _abstract(v) for k, v in image.items()},
                              jax.random.key(0))
        shapes = {k: np.shape(v) for k, v in image.items()}
        if not isinstance(view, Mapping) or any(
                getattr(view.get(k), "shape", None) != shape for k, shape in shapes.items()):
            raise InputError(f"views_fn: expected a text view with the fields and shapes of "
                             f"its input {shapes}, got {view}")
        return view
    view = jax.eval_shape(views_fn, _abstract(image), jax.random.key(0))
    if not hasattr(view, "shape") or len(view.shape) != 3:
        raise InputError(f"views_fn: expected one view [h, w, C] per call "
                         f"views_fn(image, key), got {view}")
    if pairing == "clean" and tuple(view.shape) != image.shape:
        raise InputError(f"pairing='clean' compares the clean image {image.shape} with its "
                         f"views {tuple(view.shape)}: expected views of the same shape")
    return view


def _check_normalize(normalize: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` as float32 arrays (broadcast over the channels), std > 0."""
    if normalize is None:
        return None
    try:
        mean, std = (np.asarray(v, np.float32) for v in normalize)
    except (TypeError, ValueError):
        raise InputError(f"normalize: expected (mean, std), got {normalize!r}") from None
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise InputError(f"normalize: expected finite mean and std > 0, got {normalize!r}")
    return mean, std


def resolve_layers(available: Sequence[str], layers: Sequence[str]) -> tuple[str, ...]:
    """Expand layer names/fnmatch patterns against ``available`` (model order per pattern)."""
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise InputError("layers: expected at least one layer name or pattern")
    resolved: list[str] = []
    for pattern in layers:
        matches = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise InputError(f"layer {pattern!r} is not an output of the encoder; "
                             f"available: {', '.join(available)}")
        resolved += [m for m in matches if m not in resolved]
    return tuple(resolved)


def _check_outputs(f: Model, g: Model, view: Any, layers: Sequence[str] | None
                   ) -> tuple[str, ...] | None:
    """Trace f and g on one abstract view; resolve ``layers`` against f's activations."""
    if layers is None:
        for name, model in (("f", f), ("g", g)):
            out = jax.eval_shape(model.apply, model.params, view)
            if isinstance(out, Mapping):
                raise InputError(f"{name} returns activations {sorted(out)}; pass layer=... "
                                 "to pick the representation")
        return None
    names_f, names_g = f.activation_names(view), g.activation_names(view)
    resolved = resolve_layers(names_f, layers)
    missing = [n for n in resolved if n not in names_g]
    if missing:
        raise InputError(f"layers {missing} are outputs of f but not of g; g has: "
                         f"{', '.join(names_g)}")
    return resolved


# --------------------------------------------------------------------------- entry points


def _alignment_run(f, g, source, *, views_fn, n_aug, seed, layers, batch_size, mesh, stack,
                   distance, pairing, image_field, progress, single, normalize):
    _check_models(f=f, g=g)
    _callables(views_fn=views_fn)
    n_aug = check_positive_int(n_aug, "n_aug")
    check_choice("distance", distance, DISTANCES)
    check_choice("pairing", pairing, PAIRINGS)
    source = as_source(source)
    text_fields = tuple(f.inputs) if "input_ids" in f.inputs else ()
    if text_fields:
        first = _first_example(source, text_fields)
        image = {k: first[k] for k in text_fields}
    else:
        image = _first_example(source, [image_field])[image_field]
    view = _abstract_view(views_fn, image, pairing)
    resolved = _check_outputs(f, g, view, layers)
    if single and resolved is not None and len(resolved) != 1:
        raise InputError(f"layer {layers[0]!r} matches {len(resolved)} activations "
                         f"{list(resolved)}; sslmem scores one (use layermem for several)")
    stacked, params = _plan_models(f, g, stack)
    encode_f, encode_g = ((m.apply if resolved is None else m.activations(resolved))
                          for m in (f, g))
    fn = _sslmem_fn(encode_f, encode_g, stacked, views_fn, n_aug, int(seed), resolved,
                    distance, pairing, image_field, text_fields, _check_normalize(normalize))
    out = score(fn, params, source, batch_size=batch_size, mesh=mesh, progress=progress,
                with_ids=True)
    loss_f = np.asarray(out["f"], np.float64)
    loss_g = np.asarray(out["g"], np.float64)
    raw = loss_g - loss_f
    return out["id"], resolved, loss_f, loss_g, raw


def sslmem(f: Model, g: Model, source: Any, *, views_fn: ViewsFn, n_aug: int = 5,
           seed: int = 0, layer: str | None = None, batch_size: int, mesh: Mesh | None = None,
           stack: bool | None = None, distance: str = "l2", pairing: str = "views",
           image_field: str = "image", normalize: tuple[Any, Any] | None = None,
           progress: bool = True) -> dict[str, np.ndarray]:
    """SSLMem of every example of ``source`` (Wang et al. 2024, ICLR).

    Args:
      f, g: :class:`memjax.Model` encoders; f was trained WITH the scored examples, g
        WITHOUT. The representation is ``model.apply``'s output (flattened), or the
        activation named ``layer``.
      source: dict of arrays or memjax source with an image field ``[N, H, W, C]``; its
        example ids key the views.
      views_fn: ``views_fn(image, key) -> view``, pure and vmappable.
      n_aug: K, the number of view pairs (the paper and code use 5).
      seed: view k of example i uses ``view_key(seed, i, k)``.
      layer: the activation to score (a name or fnmatch pattern matching one), or None.
      stack: evaluate f and g as one vmapped model (None: when they share a forward
        function and parameter shapes; True: required, else InputError).
      distance, pairing: see the module docstring (paper defaults).
      normalize: ``(mean, std)`` applied to image views after they are made (images in
        [0, 1]; the model's own input normalisation).

    Returns:
      ``{"id": [N], "loss_f": [N], "loss_g": [N], "raw": [N], "normalized": [N]}``:
      alignment losses, SSLMem = loss_g - loss_f (higher = more memorized by f), and
      raw / (max - min) over the scored set.
    """
    layers = None if layer is None else (layer,)
    ids, _, loss_f, loss_g, raw = _alignment_run(
        f, g, source, views_fn=views_fn, n_aug=n_aug, seed=seed, layers=layers,
        batch_size=batch_size, mesh=mesh, stack=stack, distance=distance, pairing=pairing,
        image_field=image_field, progress=progress, single=True, normalize=normalize)
    return {"id": ids, "loss_f": loss_f[:, 0], "loss_g": loss_g[:, 0], "raw": raw[:, 0],
            "normalized": range_normalize(raw[:, 0])}


def layermem(f: Model, g: Model, source: Any, *, views_fn: ViewsFn, n_aug: int = 5,
             seed: int = 0, layers: Sequence[str], batch_size: int, mesh: Mesh | None = None,
             stack: bool | None = None, distance: str = "l2", pairing: str = "views",
             image_field: str = "image", normalize: tuple[Any, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """LayerMem and ΔLayerMem of every example for every requested layer (Wang et al. 2024).

    ``layers`` are activation names or fnmatch patterns (``"stages.*.out"``; ``*`` also
    matches dots), resolved in the given order, a pattern's matches in the order f's
    forward pass reports them; consecutive means consecutive in that resolved order. All
    layers come from one forward pass per view. Other arguments as :func:`sslmem`.

    Returns:
      ``{"id": [N], "layers": (L names), "loss_f", "loss_g", "raw", "normalized", "delta",
      "delta_raw": [N, L]}``: LayerMem_l = SSLMem on layer l's output (raw and range-
      normalised per layer); ΔLayerMem_l = LayerMem_l - LayerMem_{l-1} with
      ΔLayerMem_1 = LayerMem_1 (``delta`` from the normalised values, as the paper
      reports them; ``delta_raw`` from the raw ones).
    """
    if layers is None:
        raise InputError("layers: expected layer names or patterns, got None")
    ids, resolved, loss_f, loss_g, raw = _alignment_run(
        f, g, source, views_fn=views_fn, n_aug=n_aug, seed=seed, layers=layers,
        batch_size=batch_size, mesh=mesh, stack=stack, distance=distance, pairing=pairing,
        image_field=image_field, progress=progress, single=False, normalize=normalize)
    normalized = range_normalize(raw)
    return {"id": ids, "layers": resolved, "loss_f": loss_f, "loss_g": loss_g, "raw": raw,
            "normalized": normalized, "delta": _delta(normalized), "delta_raw": _delta(raw)}


def _delta(values: np.ndarray) -> np.ndarray:
    return np.diff(values, axis=1, prepend=0.0)


def clipmem(f: Model, g: Model, pairs: Any, *, views_fn: ViewsFn, n_aug: int = 5,
            seed: int = 0,
            alignment: Callable[[jax.Array, jax.Array], jax.Array] = cosine_alignment,
            batch_size: int, mesh: Mesh | None = None, stack: bool | None = None,
            image_field: str = "image", normalize: tuple[Any, Any] | None = None,
            progress: bool = True) -> dict[str, np.ndarray]:
    """CLIPMem of every image-caption pair (Wang et al. 2025): SSLMem's design on CLIP.

    Args:
      f, g: CLIP :class:`memjax.Model` values with ``"image"`` and ``"text"`` towers
        (``memjax.load`` of a CLIP checkpoint, or ``memjax.train.clip.clip_model``); f
        trained WITH the pairs, g WITHOUT.
      pairs: source with ``image_field`` [N, H, W, C] and the fields the text tower reads
        (``input_ids``/``attention_mask`` for a Hugging Face CLIP, ``text`` for memjax's).
      n_aug: K augmented views (ids 0..K-1) of each image.
      alignment: ``alignment(image_emb [D], text_emb [D]) -> scalar`` (default: cosine,
        norms clamped at EPS); higher = better aligned.
      normalize: ``(mean, std)`` applied to the image views after they are made (images
        in [0, 1]; the CLIP's own input normalisation).

    Returns:
      ``{"id": [N], "align_f": [N], "align_g": [N], "raw": [N], "normalized": [N]}`` with
      CLIPMem = align_f - align_g (higher = more memorized by f) and raw / (max - min).
    """
    _check_models(f=f, g=g)
    towers = {name: (m.tower("image"), m.tower("text")) for name, m in (("f", f), ("g", g))}
    _callables(views_fn=views_fn, alignment=alignment)
    n_aug = check_positive_int(n_aug, "n_aug")
    pairs = as_source(pairs)
    text_fields = towers["f"][1].inputs
    first = _first_example(pairs, [image_field, *text_fields])
    view = _abstract_view(views_fn, first[image_field], "views")
    text = {k: _abstract(first[k]) for k in text_fields}
    for name, (image_tower, text_tower) in towers.items():
        out = jax.eval_shape(alignment,
                             jax.eval_shape(image_tower.apply, image_tower.params, view),
                             jax.eval_shape(text_tower.apply, text_tower.params, text))
        if getattr(out, "shape", None) != ():
            raise InputError(f"alignment on {name}'s embeddings: expected a scalar, got {out}")
    stacked, params = _plan_models(f, g, stack)
    encoders = {name: (image_tower.apply, text_tower.apply)
                for name, (image_tower, text_tower) in towers.items()}
    fn = _clipmem_fn(encoders["f"], encoders["g"], stacked, views_fn, n_aug, int(seed),
                     alignment, image_field, _check_normalize(normalize))
    out = score(fn, params, pairs, batch_size=batch_size, mesh=mesh, progress=progress,
                with_ids=True)
    align_f = np.asarray(out["f"], np.float64)
    align_g = np.asarray(out["g"], np.float64)
    raw = align_f - align_g
    return {"id": out["id"], "align_f": align_f, "align_g": align_g, "raw": raw,
            "normalized": range_normalize(raw)}
