"""Adversarial robustness of image encoders: embedding-space and downstream PGD.

The setting of Kowalczuk, Dubiński, Boenisch and Dziedzic, "Benchmarking Robust
Self-Supervised Learning Across Diverse Downstream Tasks" (2024): an encoder ``f`` maps an
image to a representation; the attacker perturbs the image inside an L∞ ball of radius ε
in pixel units (images in ``pixel_range``, e.g. [0, 1] with ε = 8/255) BEFORE the model's
own mean/std normalisation, which runs inside the attacked function.

- Embedding-space PGD (:func:`embedding_pgd`): maximise ||f(x + δ) − f(x)||₂ over
  ||δ||∞ ≤ ε and x + δ in the pixel range. The ascent direction is the sign of the gradient
  of the SQUARED distance: it has the sign of the distance's own gradient (the two differ by
  the positive factor 1 / (2 ||·||₂)) and stays finite where the distance is 0.
- Downstream PGD (:func:`downstream_pgd`): maximise the cross-entropy of a linear head
  ``softmax(W^T f(x + δ) + b)`` with respect to the true label.

Both are Madry et al.'s PGD: a random uniform start δ₀ ~ U[−ε, ε] per pixel (keyed per
example: :func:`attack_keys` splits ``fold_in(fold_in(key(seed), id), radius number)``,
so it does not depend on batch size, device count or resume point), then ``steps`` signed
gradient steps ``δ ← δ + α sign(∇)``, each followed by the projection onto the ball
(clip to [−ε, ε]) and onto the valid pixel range (clip x + δ to ``pixel_range``).

A representation (:class:`ImageEncoder`) is the model's output or one of its taps
(``layer``), taken as it is, except a token sequence [T, D] (ViT's last hidden state, tap
``"final"``), whose first (CLS) token is the representation, as in the paper's ViT
encoders; other shapes are flattened (after dropping the batch axis of 1 that a port's
taps keep).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from memjax._checks import check_positive_int
from memjax.data import ID_FIELD, ImageProcessor, as_source, source_ids
from memjax.engine import score
from memjax.errors import InputError
from memjax.models import Model
from memjax.signals import EPS

Encode = Callable[[Any, jax.Array], jax.Array]


# --------------------------------------------------------------------------- the encoder


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """``encode(params, image) -> representation [D]`` for ONE image in pixel units.

    Attributes:
      apply: ``model.apply`` or ``model.activations((layer,))`` (value-hashable).
      layer: the tap to read from ``apply``'s dict output, or None for its array output.
      mean, std: per-channel normalisation ``(x − mean) / std`` applied inside the forward
        (the checkpoint's own ``image_mean``/``image_std``), or None for none.
    """

    apply: Callable[[Any, Any], Any]
    layer: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, params: Any, image: jax.Array) -> jax.Array:
        x = image
        if self.mean is not None:
            mean = jnp.asarray(self.mean, image.dtype)
            std = jnp.asarray(self.std, image.dtype)
            x = (image - jnp.broadcast_to(mean, image.shape)) / jnp.broadcast_to(std, image.shape)
        out = self.apply(params, x)
        if self.layer is not None:
            out = out[self.layer]
        return representation(out)


def representation(out: jax.Array) -> jax.Array:
    """The vector an encoder output stands for: leading axes of size 1 dropped (the batch
    axis of 1 a port's taps keep), then a token sequence [T, D] -> its first (CLS) token
    [D]; any other shape flattened. At least float32 (float64 stays float64)."""
    out = jnp.asarray(out)
    while out.ndim > 1 and out.shape[0] == 1:
        out = out[0]
    if out.ndim == 2:
        out = out[0]
    return out.reshape(-1).astype(jnp.promote_types(out.dtype, jnp.float32))


# --------------------------------------------------------------------------- PGD


def project(delta: jax.Array, image: jax.Array, epsilon: Any,
            pixel_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """δ projected onto the L∞ ball of radius ε and so that image + δ lies in
    ``pixel_range`` (same shape as ``image``)."""
    delta = jnp.clip(delta, -epsilon, epsilon)
    low, high = pixel_range
    return jnp.clip(image + delta, low, high) - image


def random_start(key: jax.Array, image: jax.Array, epsilon: Any,
                 pixel_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """δ₀ ~ U[−ε, ε] per pixel, projected (:func:`project`); shape of ``image``."""
    noise = jax.random.uniform(key, image.shape, image.dtype, -1.0, 1.0) * epsilon
    return project(noise, image, epsilon, pixel_range)


def _pgd(objective: Callable[[jax.Array], jax.Array], image: jax.Array, key: jax.Array,
         epsilon: Any, step_size: Any, steps: int, pixel_range: tuple[float, float]
         ) -> jax.Array:
    grad = jax.grad(objective)

    def step(delta, _):
        delta = delta + step_size * jnp.sign(grad(delta))
        return project(delta, image, epsilon, pixel_range), None

    delta, _ = jax.lax.scan(step, random_start(key, image, epsilon, pixel_range), None,
                            length=steps)
    return delta


def embedding_pgd(encode: Encode, params: Any, image: jax.Array, key: jax.Array, *,
                  epsilon: Any, step_size: Any, steps: int,
                  pixel_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Embedding-space PGD on ONE image (no batch axis; the engine vmaps).

    Args:
      encode: ``encode(params, image) -> representation [D]`` (e.g. :class:`ImageEncoder`,
        normalisation inside).
      image: [H, W, C] in pixel units within ``pixel_range``; key: the random start's key.
      epsilon, step_size: ε and α in pixel units (scalars, may be traced); steps: int.

    Returns:
      δ [H, W, C] after ``steps`` steps maximising ||f(x + δ) − f(x)||₂ (module docstring).
    """
    clean = jax.lax.stop_gradient(encode(params, image))

    def squared_shift(delta):
        return jnp.sum(jnp.square(encode(params, image + delta) - clean))

    return _pgd(squared_shift, image, key, epsilon, step_size, steps, pixel_range)


def linear_logits(head: Mapping[str, jax.Array], z: jax.Array) -> jax.Array:
    """A linear head's logits ``z @ weight + bias``: z [D], weight [D, C], bias [C] -> [C]."""
    return z @ head["weight"].astype(z.dtype) + head["bias"].astype(z.dtype)


def downstream_pgd(encode: Encode, params: Any, head: Mapping[str, jax.Array],
                   image: jax.Array, label: jax.Array, key: jax.Array, *, epsilon: Any,
                   step_size: Any, steps: int,
                   pixel_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Downstream PGD on ONE image: maximise the cross-entropy of the linear ``head``
    (``{"weight": [D, C], "bias": [C]}``) on f(x + δ) w.r.t. ``label`` (int scalar).
    Other arguments as :func:`embedding_pgd`; returns δ [H, W, C]."""

    def loss(delta):
        logits = linear_logits(head, encode(params, image + delta))
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return _pgd(loss, image, key, epsilon, step_size, steps, pixel_range)


def embedding_shift(clean: jax.Array, adversarial: jax.Array) -> dict[str, jax.Array]:
    """``{"l2": ||a − c||₂, "cosine": cos(a, c)}`` of two representations [D] (at least
    float32)."""
    dtype = jnp.promote_types(jnp.result_type(clean, adversarial), jnp.float32)
    clean, adversarial = clean.astype(dtype), adversarial.astype(dtype)
    norms = jnp.maximum(jnp.linalg.norm(clean) * jnp.linalg.norm(adversarial), EPS)
    return {"l2": jnp.linalg.norm(adversarial - clean),
            "cosine": jnp.sum(clean * adversarial) / norms}


# --------------------------------------------------------------------------- linear probe


def probe_objective(head: Mapping[str, jax.Array], embeddings: jax.Array, labels: jax.Array,
                    l2: float) -> jax.Array:
    """Mean cross-entropy of the linear head plus ``l2 / 2 · ||weight||²`` (bias free)."""
    logits = embeddings @ head["weight"] + head["bias"][None, :]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(loss) + 0.5 * l2 * jnp.sum(jnp.square(head["weight"]))


def fit_linear_probe(embeddings: Any, labels: Any, *, num_classes: int | None = None,
                     l2: float = 1e-3, steps: int = 300) -> dict[str, np.ndarray]:
    """A multinomial logistic-regression head on frozen embeddings (the linear probe).

    Minimises :func:`probe_objective` with L-BFGS (``optax.lbfgs``, zoom line search) for
    ``steps`` iterations from zero.

    Args:
      embeddings: [N, D] float; labels: [N] ints in [0, num_classes).
      num_classes: C (default: max label + 1). l2: the ridge on the weight (> 0 keeps the
        optimum finite on separable data).

    Returns:
      ``{"weight": [D, C], "bias": [C]}`` float32 NumPy arrays.
    """
    x = np.asarray(embeddings, np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise InputError(f"fit_linear_probe: expected embeddings [N, D] and labels [N], got "
                         f"{x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise InputError(f"fit_linear_probe: labels must be non-negative integers, got "
                         f"{y.dtype} with minimum {y.min()}")
    classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.max() >= classes:
        raise InputError(f"fit_linear_probe: label {int(y.max())} >= num_classes {classes}")
    if not (np.isfinite(l2) and l2 >= 0):
        raise InputError(f"fit_linear_probe: l2 must be >= 0, got {l2}")
    head = _lbfgs(jnp.asarray(x), jnp.asarray(y, jnp.int32), classes, float(l2), int(steps))
    return {k: np.asarray(v, np.float32) for k, v in head.items()}


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _lbfgs(x: jax.Array, y: jax.Array, classes: int, l2: float, steps: int) -> dict:
    head = {"weight": jnp.zeros((x.shape[1], classes), x.dtype),
            "bias": jnp.zeros((classes,), x.dtype)}
    solver = optax.lbfgs()

    def objective(h):
        return probe_objective(h, x, y, l2)

    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        h, state = carry
        value, grad = value_and_grad(h, state=state)
        updates, state = solver.update(grad, state, h, value=value, grad=grad,
                                       value_fn=objective)
        return (optax.apply_updates(h, updates), state), None

    (head, _), _ = jax.lax.scan(step, (head, solver.init(head)), None, length=steps)
    return head


def check_head(head: Any, dim: int | None = None) -> dict[str, np.ndarray]:
    """A head ``{"weight": [D, C], "bias": [C]}`` as float32 arrays, refused when
    malformed or when D differs from the representation's ``dim``."""
    if not isinstance(head, Mapping) or not {"weight", "bias"} <= set(head):
        raise InputError("head: expected {'weight': [D, C], 'bias': [C]}, got "
                         f"{sorted(head) if isinstance(head, Mapping) else type(head).__name__}")
    weight = np.asarray(head["weight"], np.float32)
    bias = np.asarray(head["bias"], np.float32)
    if weight.ndim != 2 or bias.shape != (weight.shape[1],):
        raise InputError(f"head: expected weight [D, C] and bias [C], got {weight.shape} and "
                         f"{bias.shape}")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise InputError("head: weight and bias must be finite")
    if dim is not None and weight.shape[0] != dim:
        raise InputError(f"head: weight is {weight.shape} but the representation has "
                         f"{dim} dimensions; expected weight [{dim}, C]")
    return {"weight": weight, "bias": bias}


def default_step_sizes(epsilons: Sequence[float], steps: int) -> np.ndarray:
    """α = 2.5 ε / steps per ε (Madry et al.'s rule: the walk can cross the ball)."""
    return 2.5 * np.asarray(epsilons, np.float64) / steps


# --------------------------------------------------------------------------- the runner


def model_normalization(preprocess: Mapping[str, Any] | None
                        ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` the checkpoint's ``preprocessor_config.json`` normalises pixels in
    [0, 1] with, or None when it does not normalise. A checkpoint that does not rescale
    uint8 pixels by 1/255 takes another pixel scale: refused (give ``normalize=`` and
    ``pixel_range`` explicitly), never converted silently."""
    if preprocess is None:
        return None
    processor = ImageProcessor.from_config(preprocess)
    if not processor.do_rescale or not np.isclose(processor.rescale_factor, 1 / 255):
        raise InputError(
            f"normalize='model': the checkpoint's preprocessing rescales pixels by "
            f"{processor.rescale_factor if processor.do_rescale else 'nothing'}, not 1/255, "
            "so its pixel units are not [0, 1]; pass normalize=(mean, std) and pixel_range "
            "in its units explicitly")
    if not processor.do_normalize:
        return None
    return tuple(processor.image_mean), tuple(processor.image_std)


def image_encoder(model: Model, *, layer: str | None = None,
                  normalize: Any = "model") -> ImageEncoder:
    """The attacked function of a :class:`memjax.Model` (module docstring).

    Args:
      model: an image encoder (``kind="encoder"``: a ViTModel / ResNet without head,
        ``memjax.train.simclr.encoder_model``), a CLIP (its ``"image"`` tower), or a
        classifier with ``layer`` naming the representation tap (``"pooled"`` of a
        ResNet, ``"final"`` of a ViT, ``"dense1"`` of a memjax.train MLP).
      layer: a tap name of the model's forward pass, or None for its output.
      normalize: ``"model"`` (the checkpoint's own mean/std, :func:`model_normalization`),
        None (images go in as given), or an explicit ``(mean, std)``.
    """
    if not isinstance(model, Model):
        raise InputError(f"model: expected a memjax.Model (memjax.load, Model.from_classifier, "
                         f"Model.from_apply), got {type(model).__name__}")
    if model.kind == "clip":
        model = model.tower("image")
    if tuple(model.inputs) != ("image",):
        raise InputError(f"model {model.name}: reads {list(model.inputs)}; expected an image "
                         "encoder reading 'image'")
    if model.kind == "classifier" and layer is None:
        raise InputError(f"model {model.name} is a classifier (its output is logits); pass "
                         "layer= naming its representation tap (e.g. 'pooled' for a ResNet, "
                         "'final' for a ViT, 'dense1' for a memjax.train MLP)")
    if isinstance(normalize, str):
        if normalize != "model":
            raise InputError(f"normalize={normalize!r}: expected 'model', None or (mean, std)")
        stats = model_normalization(model.preprocess)
    elif normalize is None:
        stats = None
    else:
        stats = _mean_std(normalize)
    apply = model.apply if layer is None else model.activations((layer,))
    mean, std = (None, None) if stats is None else stats
    return ImageEncoder(apply, layer, mean, std)


def _mean_std(normalize: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean, std = (np.atleast_1d(np.asarray(v, np.float64)) for v in normalize)
    except (TypeError, ValueError):
        raise InputError(f"normalize: expected (mean, std), got {normalize!r}") from None
    if mean.ndim != 1 or mean.shape != std.shape or not (
            np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise InputError(f"normalize: expected finite per-channel mean and std > 0 of one "
                         f"length, got {normalize!r}")
    return tuple(map(float, mean)), tuple(map(float, std))


def _epsilons(epsilons: Any) -> tuple[float, ...]:
    values = np.atleast_1d(np.asarray(epsilons, np.float64))
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all() \
            or (values < 0).any():
        raise InputError(f"epsilons: expected one or more radii >= 0, got {epsilons!r}")
    return tuple(map(float, values))


def _step_sizes(step_size: Any, epsilons: tuple[float, ...], steps: int) -> tuple[float, ...]:
    if step_size is None:
        return tuple(map(float, default_step_sizes(epsilons, steps)))
    values = np.broadcast_to(np.asarray(step_size, np.float64), (len(epsilons),)) \
        if np.ndim(step_size) == 0 else np.asarray(step_size, np.float64)
    if values.shape != (len(epsilons),) or not np.isfinite(values).all() or (values < 0).any():
        raise InputError(f"step_size: expected a number >= 0 or one per epsilon "
                         f"({len(epsilons)}), got {step_size!r}")
    return tuple(map(float, values))


def attack_keys(seed: int, example_id: jax.Array, index: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(embedding-PGD key, downstream-PGD key) of one example at radius number ``index``:
    ``split(fold_in(fold_in(key(seed), id), index))`` — independent of batch size, device
    count and resume point."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), example_id), index)
    pair = jax.random.split(key)
    return pair[0], pair[1]


@dataclasses.dataclass(frozen=True)
class RobustnessScore:
    """The per-example score function of :func:`encoder_robustness` (a frozen value: the
    engine reuses its compiled program for an equal one)."""

    encode: ImageEncoder
    epsilons: tuple[float, ...]
    step_sizes: tuple[float, ...]
    steps: int
    seed: int
    pixel_range: tuple[float, float]
    with_head: bool
    image_field: str = "image"
    label_field: str = "label"

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        encode, weights, head = self.encode, params["model"], params.get("head")
        image = example[self.image_field].astype(jnp.float32)
        clean = encode(weights, image)
        pgd = {"steps": self.steps, "pixel_range": self.pixel_range}

        def per_radius(args):
            index, epsilon, alpha = args
            key_embedding, key_downstream = attack_keys(self.seed, example[ID_FIELD], index)
            delta = embedding_pgd(encode, weights, image, key_embedding, epsilon=epsilon,
                                  step_size=alpha, **pgd)
            shift = embedding_shift(clean, encode(weights, image + delta))
            out = {"shift_l2": shift["l2"], "shift_cosine": shift["cosine"]}
            if self.with_head:
                label = example[self.label_field]
                delta = downstream_pgd(encode, weights, head, image, label, key_downstream,
                                       epsilon=epsilon, step_size=alpha, **pgd)
                logits = linear_logits(head, encode(weights, image + delta))
                out["adv_correct"] = jnp.argmax(logits) == label
            return out

        radii = (jnp.arange(len(self.epsilons)), jnp.asarray(self.epsilons, jnp.float32),
                 jnp.asarray(self.step_sizes, jnp.float32))
        out = jax.lax.map(per_radius, radii)
        if self.with_head:
            label = example[self.label_field]
            out["clean_correct"] = jnp.argmax(linear_logits(head, clean)) == label
        return out


def _pixel_validator(source: Any, image_field: str, pixel_range: tuple[float, float],
                     label_field: str | None, classes: int | None):
    low, high = pixel_range

    def name(row: np.ndarray) -> str:
        return f"example {int(source_ids(source, np.asarray([row]))[0])} (row {int(row)})"

    def validate(fields: dict[str, np.ndarray], indices: np.ndarray) -> None:
        images = fields[image_field]
        outside = (images < low) | (images > high)
        if outside.any():
            row = int(np.flatnonzero(outside.reshape(len(images), -1).any(axis=1))[0])
            raise InputError(
                f"source: {name(indices[row])} has {image_field} values in "
                f"[{images[row].min():.4g}, {images[row].max():.4g}], outside pixel_range "
                f"{list(pixel_range)}; the attack takes images in pixel units BEFORE the "
                "model's normalisation (which it applies itself)")
        if label_field is not None:
            labels = fields[label_field]
            bad = (labels < 0) | (labels >= classes)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise InputError(f"source: {name(indices[row])} has {label_field} "
                                 f"{int(labels[row])}, not a class of the head (0..{classes - 1})")
    return validate


def _check_fields(source: Any, image_field: str, label_field: str | None) -> np.ndarray:
    first = source.read(np.zeros(1, dtype=np.int64))
    for field in (image_field, label_field):
        if field is not None and field not in first:
            raise InputError(f"source: no field {field!r}; the source has fields {sorted(first)}")
    if label_field is not None and not np.issubdtype(first[label_field].dtype, np.integer):
        raise InputError(f"source: field {label_field!r} must hold integer class labels, got "
                         f"{first[label_field].dtype}")
    return first[image_field][0]


def encode_images(encoder: ImageEncoder, params: Any, source: Any, *, batch_size: int,
                  image_field: str = "image", mesh: Mesh | None = None,
                  progress: bool = True) -> np.ndarray:
    """Clean representations [N, D] of a source's images (pixel units) through the engine,
    e.g. to fit a linear probe (:func:`fit_linear_probe`)."""
    source = as_source(source)
    _check_fields(source, image_field, None)
    out = score(_EncodeField(encoder, image_field), params, source, batch_size=batch_size,
                mesh=mesh, progress=progress)
    return np.asarray(out["embedding"], np.float32)


@dataclasses.dataclass(frozen=True)
class _EncodeField:
    encoder: ImageEncoder
    image_field: str

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"embedding": self.encoder(params, example[self.image_field].astype(jnp.float32))}


def encoder_robustness(model: Model, source: Any, *, epsilons: Any, steps: int = 10,
                       step_size: Any = None, head: Mapping[str, Any] | None = None,
                       seed: int = 0, batch_size: int, layer: str | None = None,
                       normalize: Any = "model", pixel_range: tuple[float, float] = (0.0, 1.0),
                       image_field: str = "image", label_field: str = "label",
                       mesh: Mesh | None = None, progress: bool = True
                       ) -> dict[str, np.ndarray]:
    """Per-example adversarial robustness of an image encoder (Kowalczuk et al. 2024).

    Args:
      model: see :func:`image_encoder` (with ``layer`` and ``normalize``).
      source: dict of arrays or memjax source: images ``[N, H, W, C]`` in pixel units within
        ``pixel_range`` (NOT normalised; other values are refused), and with ``head`` a
        ``label_field`` of ints; its example ids key the random starts
        (:func:`attack_keys`).
      epsilons: [E] L∞ radii in pixel units (e.g. 8/255 for [0, 1]); 0 is allowed.
      steps: PGD steps; step_size: α in pixel units, one for all or one per ε (default
        2.5 ε / steps).
      head: a linear head ``{"weight": [D, C], "bias": [C]}`` on the representation
        (e.g. :func:`fit_linear_probe`), for the downstream attack.

    Returns:
      ``{"id": [N], "epsilon": [E], "step_size": [E], "shift_l2": [N, E], "shift_cosine":
      [N, E], "mean_shift_l2": [E]}`` — L2 distance and cosine similarity between the clean
      and the embedding-PGD representation — and with a head also ``"clean_correct"`` [N],
      ``"adv_correct"`` [N, E] (the head's prediction after downstream PGD),
      ``"clean_accuracy"`` (scalar) and ``"robust_accuracy"`` [E].
    """
    encoder = image_encoder(model, layer=layer, normalize=normalize)
    if model.kind == "clip":
        model = model.tower("image")
    steps = check_positive_int(steps, "steps")
    radii = _epsilons(epsilons)
    alphas = _step_sizes(step_size, radii, steps)
    try:
        low, high = (float(v) for v in pixel_range)
    except (TypeError, ValueError):
        raise InputError(f"pixel_range: expected (low, high), got {pixel_range!r}") from None
    if not low < high:
        raise InputError(f"pixel_range: expected low < high, got {pixel_range!r}")
    source = as_source(source)
    image = _check_fields(source, image_field, label_field if head is not None else None)
    abstract = jax.ShapeDtypeStruct(image.shape, jnp.float32)
    if encoder.mean is not None and len(encoder.mean) not in (1, image.shape[-1]):
        raise InputError(f"normalize: {len(encoder.mean)} channel means for images "
                         f"{image.shape} with {image.shape[-1]} channels")
    if layer is not None and layer not in model.activation_names(abstract):
        raise InputError(f"layer {layer!r} is not a tap of {model.name}; taps: "
                         f"{', '.join(model.activation_names(abstract))}")
    dim = jax.eval_shape(encoder, model.params, abstract).shape[0]
    params: dict[str, Any] = {"model": model.params}
    classes = None
    if head is not None:
        params["head"] = check_head(head, dim)
        classes = params["head"]["weight"].shape[1]
    fn = RobustnessScore(encoder, radii, alphas, steps, int(seed), (low, high),
                         head is not None, image_field, label_field)
    validate = _pixel_validator(source, image_field, (low, high),
                                label_field if head is not None else None, classes)
    out = score(fn, params, source, batch_size=batch_size, mesh=mesh, progress=progress,
                with_ids=True, validate=validate)
    result = {"id": out["id"], "epsilon": np.asarray(radii), "step_size": np.asarray(alphas),
              "shift_l2": np.asarray(out["shift_l2"], np.float64),
              "shift_cosine": np.asarray(out["shift_cosine"], np.float64)}
    result["mean_shift_l2"] = result["shift_l2"].mean(axis=0)
    if head is not None:
        result["clean_correct"] = np.asarray(out["clean_correct"], bool)
        result["adv_correct"] = np.asarray(out["adv_correct"], bool)
        result["clean_accuracy"] = float(result["clean_correct"].mean())
        result["robust_accuracy"] = result["adv_correct"].mean(axis=0)
    return result
