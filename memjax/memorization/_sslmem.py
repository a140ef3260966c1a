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

Views are produced by a caller-supplied pure function ``views_fn(image [H, W, C],
example_id, aug_id) -> view [h, w, C]``, keyed by the example's id (the source's ``id``
field, else its index) so f and g see the same views for any batch size or device count.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memjax._checks import check_positive_int
from memjax.data.base import as_source, example_ids
from memjax.engine import score
from memjax.errors import InputError
from memjax.signals._contrastive import EPS, contrastive

DISTANCES = ("l2", "sq_l2")
PAIRINGS = ("views", "clean")
#: Device field carrying each example's id into the score function (the engine keeps the
#: ``id`` field on the host), so views are keyed by identity, not by batch position.
EXAMPLE_ID_FIELD = "_memjax_example_id"

ViewsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Apply = Callable[[Any, jax.Array], Any]


class ClipApply(NamedTuple):
    """The two encoders of a CLIP-style model (pure functions of one example)."""

    image: Callable[[Any, jax.Array], jax.Array]  # (params, image [h, w, C]) -> [D]
    text: Callable[[Any, jax.Array], jax.Array]  # (params, tokens [T]) -> [D]


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


def _view_batch(views_fn: ViewsFn, image: jax.Array, example_id: jax.Array, n_aug: int,
                pairing: str) -> jax.Array:
    """The images to encode: 2K views (pairs 2k, 2k+1), or [clean, K views] (code variant)."""
    n_views = 2 * n_aug if pairing == "views" else n_aug
    aug_ids = jnp.arange(n_views, dtype=jnp.int32)
    views = jax.vmap(views_fn, in_axes=(None, None, 0))(image, example_id, aug_ids)
    if pairing == "clean":
        views = jnp.concatenate([image[None].astype(views.dtype), views])
    return views


def _pair_split(reps: jax.Array, pairing: str) -> tuple[jax.Array, jax.Array]:
    if pairing == "views":
        return reps[0::2], reps[1::2]
    return jnp.broadcast_to(reps[:1], reps[1:].shape), reps[1:]


def alignment_losses(apply: Apply, params: Any, image: jax.Array, example_id: jax.Array, *,
                     views_fn: ViewsFn, n_aug: int, layers: tuple[str, ...] | None,
                     distance: str = "l2", pairing: str = "views") -> jax.Array:
    """L_align of one encoder on ONE example, for each requested layer.

    Args:
      apply: ``apply(params, image) -> representation`` or ``{layer: activation}``.
      image: [H, W, C] the clean example; example_id: int scalar keying its views.
      layers: names to read from ``apply``'s dict output, or None for a bare array output.

    Returns:
      [L] float32 (L = len(layers), or 1 when ``layers`` is None): mean distance over the
      K view pairs, each layer read from the same forward pass of every view.
    """
    batch = _view_batch(views_fn, image, example_id, n_aug, pairing)
    out = jax.vmap(apply, in_axes=(None, 0))(params, batch)
    reps = [out] if layers is None else [out[name] for name in layers]
    dist = jax.vmap(functools.partial(view_distance, distance=distance))
    return jnp.stack([jnp.mean(dist(*_pair_split(r, pairing))) for r in reps])


def clip_alignment(apply: ClipApply, params: Any, image: jax.Array, text: jax.Array,
                   example_id: jax.Array, *, views_fn: ViewsFn, n_aug: int,
                   alignment: Callable[[jax.Array, jax.Array], jax.Array] = cosine_alignment
                   ) -> jax.Array:
    """Mean over K augmented views (ids 0..K-1) of ``alignment(image_emb, text_emb)``; scalar."""
    aug_ids = jnp.arange(n_aug, dtype=jnp.int32)
    views = jax.vmap(views_fn, in_axes=(None, None, 0))(image, example_id, aug_ids)
    img = jax.vmap(apply.image, in_axes=(None, 0))(params, views)
    txt = apply.text(params, text)
    return jnp.mean(jax.vmap(alignment, in_axes=(0, None))(img, txt)).astype(jnp.float32)


def range_normalize(raw: np.ndarray) -> np.ndarray:
    """``raw / (max - min)`` along axis 0 (per column), float64; 0 where the range is 0."""
    raw = np.asarray(raw, dtype=np.float64)
    span = raw.max(axis=0) - raw.min(axis=0)
    # An all-equal set carries no ranking; 0 instead of 0/0.
    return np.divide(raw, span, out=np.zeros_like(raw), where=span > 0)


# --------------------------------------------------------------------------- f and g


def architecture_mismatch(f: Any, g: Any, params_f: Any, params_g: Any) -> str | None:
    """Why f and g cannot be evaluated as one stacked model, or None when they can."""
    if not (f is g or f == g):
        return (f"f and g are different apply functions ({_name(f)} vs {_name(g)}); "
                "stacking needs one function with two parameter sets")
    leaves_f, tree_f = jax.tree_util.tree_flatten_with_path(params_f)
    leaves_g, tree_g = jax.tree_util.tree_flatten_with_path(params_g)
    if tree_f != tree_g:
        return f"params_f and params_g have different pytree structures: {tree_f} vs {tree_g}"
    for (path, a), (_, b) in zip(leaves_f, leaves_g, strict=True):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            return (f"parameter {jax.tree_util.keystr(path)} is {np.shape(a)} "
                    f"{jnp.result_type(a)} in params_f but {np.shape(b)} "
                    f"{jnp.result_type(b)} in params_g")
    return None


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _plan_models(f, g, params_f, params_g, stack: bool | None) -> tuple[bool, Any]:
    """(stacked?, params for the score function): one vmapped model axis when possible."""
    if stack not in (None, True, False):
        raise InputError(f"stack: expected None (auto), True or False, got {stack!r}")
    mismatch = architecture_mismatch(f, g, params_f, params_g)
    if stack is True and mismatch is not None:
        raise InputError(f"stack=True: f and g do not share an architecture: {mismatch}")
    stacked = mismatch is None if stack is None else stack
    if stacked:
        return True, jax.tree.map(lambda a, b: jnp.stack([a, b]), params_f, params_g)
    return False, {"f": params_f, "g": params_g}


def _both(f, g, stacked: bool, per_model: Callable[[Any, Any], jax.Array], params: Any
          ) -> dict[str, jax.Array]:
    if stacked:
        # One model axis: f and g run as one vmapped computation (bigger, fewer kernels).
        out = jax.vmap(lambda p: per_model(f, p))(params)
        return {"f": out[0], "g": out[1]}
    return {"f": per_model(f, params["f"]), "g": per_model(g, params["g"])}


# Score functions are cached by their (hashable) configuration so repeated calls reuse
# the engine's compiled executable, which is keyed by function identity.
@functools.lru_cache(maxsize=32)
def _sslmem_fn(f, g, stacked, views_fn, n_aug, layers, distance, pairing, image_field):
    def fn(params, example):
        def per_model(apply, p):
            return alignment_losses(apply, p, example[image_field], example[EXAMPLE_ID_FIELD],
                                    views_fn=views_fn, n_aug=n_aug, layers=layers,
                                    distance=distance, pairing=pairing)
        return _both(f, g, stacked, per_model, params)
    return fn


@functools.lru_cache(maxsize=32)
def _clipmem_fn(f, g, stacked, views_fn, n_aug, alignment, image_field, text_field):
    def fn(params, example):
        def per_model(apply, p):
            return clip_alignment(apply, p, example[image_field], example[text_field],
                                  example[EXAMPLE_ID_FIELD], views_fn=views_fn, n_aug=n_aug,
                                  alignment=alignment)
        return _both(f, g, stacked, per_model, params)
    return fn


# --------------------------------------------------------------------------- the source


class _KeyedSource:
    """``source`` plus each example's integer id as a device field (to key its views)."""

    def __init__(self, source: Any):
        self.source = source
        if callable(getattr(source, "ids", None)):
            self.ids = source.ids

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = dict(self.source.read(indices))
        if EXAMPLE_ID_FIELD in batch:
            raise InputError(f"source: field name {EXAMPLE_ID_FIELD!r} is reserved by memjax")
        ids = np.asarray(example_ids(batch, np.asarray(indices)))
        if ids.dtype.kind not in "iu":
            raise InputError(f"source: example ids have dtype {ids.dtype}; views are keyed "
                             "by id, so expected integer ids (or no 'id' field)")
        batch[EXAMPLE_ID_FIELD] = ids.astype(np.int64)
        return batch

    def spec(self) -> dict[str, Any]:
        return {"kind": "keyed_by_id", "source": self.source.spec()}


# --------------------------------------------------------------------------- validation


def _choice(value: str, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise InputError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


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
    dtype = x.dtype
    if dtype.itemsize > 4 and dtype.kind in "fiu":
        dtype = np.dtype(np.float32 if dtype.kind == "f" else np.int32)
    return jax.ShapeDtypeStruct(x.shape, dtype)


def _abstract_view(views_fn: ViewsFn, image: np.ndarray, pairing: str) -> Any:
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    view = jax.eval_shape(views_fn, _abstract(image), scalar, scalar)
    if not hasattr(view, "shape") or len(view.shape) != 3:
        raise InputError(f"views_fn: expected one view [h, w, C] per call, got {view}")
    if pairing == "clean" and tuple(view.shape) != image.shape:
        raise InputError(f"pairing='clean' compares the clean image {image.shape} with its "
                         f"views {tuple(view.shape)}: expected views of the same shape")
    return view


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


def _check_outputs(f, g, params_f, params_g, view, layers: Sequence[str] | None
                   ) -> tuple[str, ...] | None:
    """Trace f and g on one abstract view; resolve ``layers`` against f's outputs."""
    out_f, names_f = _trace_outputs(f, params_f, view)
    out_g, names_g = _trace_outputs(g, params_g, view)
    for name, out in (("f", out_f), ("g", out_g)):
        if layers is None and isinstance(out, Mapping):
            raise InputError(f"{name} returns activations {sorted(out)}; pass layer=... to "
                             "pick the representation")
        if layers is not None and not isinstance(out, Mapping):
            raise InputError(f"layers: {name} returns one array, not {{layer: activation}}; "
                             "return a dict of activations (memjax.models.taps.with_taps)")
    if layers is None:
        return None
    resolved = resolve_layers(names_f, layers)
    missing = [n for n in resolved if n not in out_g]
    if missing:
        raise InputError(f"layers {missing} are outputs of f but not of g; g has: "
                         f"{', '.join(names_g)}")
    return resolved


def _trace_outputs(apply: Apply, params: Any, view: Any) -> tuple[Any, list[str]]:
    """(abstract output, its dict keys in the order ``apply`` built them).

    ``eval_shape`` returns dicts with sorted keys (pytree order); the keys are read while
    tracing instead, so layers keep the model's call order (taps record in call order).
    """
    names: list[str] = []

    def probe(p, v):
        out = apply(p, v)
        if isinstance(out, Mapping):
            names.extend(out)
        return out

    return jax.eval_shape(probe, params, view), names


# --------------------------------------------------------------------------- entry points


def _alignment_run(f, g, params_f, params_g, source, *, views_fn, n_aug, layers, batch_size,
                   mesh, stack, distance, pairing, image_field, progress, single):
    _callables(f=f, g=g, views_fn=views_fn)
    n_aug = check_positive_int(n_aug, "n_aug")
    _choice(distance, "distance", DISTANCES)
    _choice(pairing, "pairing", PAIRINGS)
    source = _KeyedSource(as_source(source))
    image = _first_example(source, [image_field])[image_field]
    view = _abstract_view(views_fn, image, pairing)
    resolved = _check_outputs(f, g, params_f, params_g, view, layers)
    if single and resolved is not None and len(resolved) != 1:
        raise InputError(f"layer {layers[0]!r} matches {len(resolved)} activations "
                         f"{list(resolved)}; sslmem scores one (use layermem for several)")
    stacked, params = _plan_models(f, g, params_f, params_g, stack)
    fn = _sslmem_fn(f, g, stacked, views_fn, n_aug, resolved, distance, pairing, image_field)
    out = score(fn, params, source, batch_size=batch_size, mesh=mesh, progress=progress)
    loss_f = np.asarray(out["f"], np.float64)
    loss_g = np.asarray(out["g"], np.float64)
    raw = loss_g - loss_f
    return out["id"], resolved, loss_f, loss_g, raw


def sslmem(f: Apply, g: Apply, params_f: Any, params_g: Any, source: Any, *,
           views_fn: ViewsFn, n_aug: int = 5, layer: str | None = None, batch_size: int,
           mesh: Mesh | None = None, stack: bool | None = None, distance: str = "l2",
           pairing: str = "views", image_field: str = "image", progress: bool = True
           ) -> dict[str, np.ndarray]:
    """SSLMem of every example of ``source`` (Wang et al. 2024, ICLR).

    Args:
      f, g: ``apply(params, image [h, w, C]) -> representation`` (any shape, flattened),
        or ``-> {layer: activation}`` with ``layer`` naming the representation. f was
        trained WITH the scored examples, g WITHOUT.
      source: dict of arrays or memjax source with an image field ``[N, H, W, C]``.
      views_fn: ``views_fn(image, example_id, aug_id) -> view``, pure and vmappable.
      n_aug: K, the number of view pairs (the paper and code use 5).
      layer: the key of f's dict output to score, or None for a bare array output.
      stack: evaluate f and g as one vmapped model (None: when they share an apply
        function and parameter shapes; True: required, else InputError).
      distance, pairing: see the module docstring (paper defaults).

    Returns:
      ``{"id": [N], "loss_f": [N], "loss_g": [N], "raw": [N], "normalized": [N]}``:
      alignment losses, SSLMem = loss_g - loss_f (higher = more memorized by f), and
      raw / (max - min) over the scored set.
    """
    layers = None if layer is None else (layer,)
    ids, _, loss_f, loss_g, raw = _alignment_run(
        f, g, params_f, params_g, source, views_fn=views_fn, n_aug=n_aug, layers=layers,
        batch_size=batch_size, mesh=mesh, stack=stack, distance=distance, pairing=pairing,
        image_field=image_field, progress=progress, single=True)
    return {"id": ids, "loss_f": loss_f[:, 0], "loss_g": loss_g[:, 0], "raw": raw[:, 0],
            "normalized": range_normalize(raw[:, 0])}


def layermem(f: Apply, g: Apply, params_f: Any, params_g: Any, source: Any, *,
             views_fn: ViewsFn, n_aug: int = 5, layers: Sequence[str], batch_size: int,
             mesh: Mesh | None = None, stack: bool | None = None, distance: str = "l2",
             pairing: str = "views", image_field: str = "image", progress: bool = True
             ) -> dict[str, Any]:
    """LayerMem and ΔLayerMem of every example for every requested layer (Wang et al. 2024).

    ``f``/``g`` return ``{layer: activation}`` for one image (e.g. all taps of a model via
    :func:`memjax.models.taps.with_taps`; XLA drops activations that are not requested).
    ``layers`` are names or fnmatch patterns (``"stages.*.out"``; ``*`` also matches
    dots), resolved in the given order, a pattern's matches in the order f's dict lists
    them (call order for taps); consecutive means consecutive in that resolved order.
    Other arguments as :func:`sslmem`.

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
        f, g, params_f, params_g, source, views_fn=views_fn, n_aug=n_aug, layers=layers,
        batch_size=batch_size, mesh=mesh, stack=stack, distance=distance, pairing=pairing,
        image_field=image_field, progress=progress, single=False)
    normalized = range_normalize(raw)
    return {"id": ids, "layers": resolved, "loss_f": loss_f, "loss_g": loss_g, "raw": raw,
            "normalized": normalized, "delta": _delta(normalized), "delta_raw": _delta(raw)}


def _delta(values: np.ndarray) -> np.ndarray:
    return np.diff(values, axis=1, prepend=0.0)


def clipmem(f: ClipApply, g: ClipApply, params_f: Any, params_g: Any, pairs: Any, *,
            views_fn: ViewsFn, n_aug: int = 5,
            alignment: Callable[[jax.Array, jax.Array], jax.Array] = cosine_alignment,
            batch_size: int, mesh: Mesh | None = None, stack: bool | None = None,
            image_field: str = "image", text_field: str = "text", progress: bool = True
            ) -> dict[str, np.ndarray]:
    """CLIPMem of every image-caption pair (Wang et al. 2025): SSLMem's design on CLIP.

    Args:
      f, g: :class:`ClipApply` encoders; f trained WITH the pairs, g WITHOUT.
      pairs: source with ``image_field`` [N, H, W, C] and ``text_field`` [N, T] (tokens).
      n_aug: K augmented views (ids 0..K-1) of each image.
      alignment: ``alignment(image_emb [D], text_emb [D]) -> scalar`` (default: cosine,
        norms clamped at EPS); higher = better aligned.

    Returns:
      ``{"id": [N], "align_f": [N], "align_g": [N], "raw": [N], "normalized": [N]}`` with
      CLIPMem = align_f - align_g (higher = more memorized by f) and raw / (max - min).
    """
    if not isinstance(f, ClipApply) or not isinstance(g, ClipApply):
        raise InputError("f, g: expected ClipApply(image=..., text=...) encoders, got "
                         f"{type(f).__name__} and {type(g).__name__}")
    _callables(f_image=f.image, f_text=f.text, g_image=g.image, g_text=g.text,
               views_fn=views_fn, alignment=alignment)
    n_aug = check_positive_int(n_aug, "n_aug")
    pairs = _KeyedSource(as_source(pairs))
    first = _first_example(pairs, [image_field, text_field])
    view = _abstract_view(views_fn, first[image_field], "views")
    text = _abstract(first[text_field])
    for name, enc, p in (("f", f, params_f), ("g", g, params_g)):
        out = jax.eval_shape(alignment, jax.eval_shape(enc.image, p, view),
                             jax.eval_shape(enc.text, p, text))
        if getattr(out, "shape", None) != ():
            raise InputError(f"alignment on {name}'s embeddings: expected a scalar, got {out}")
    stacked, params = _plan_models(f, g, params_f, params_g, stack)
    fn = _clipmem_fn(f, g, stacked, views_fn, n_aug, alignment, image_field, text_field)
    out = score(fn, params, pairs, batch_size=batch_size, mesh=mesh, progress=progress)
    align_f = np.asarray(out["f"], np.float64)
    align_g = np.asarray(out["g"], np.float64)
    raw = align_f - align_g
    return {"id": out["id"], "align_f": align_f, "align_g": align_g, "raw": raw,
            "normalized": range_normalize(raw)}
