"""SimCLR augmentations in JAX, keyed by example identity.

Pure functions of ``(key, image)`` for ONE image ``[H, W, C]`` in ``[0, 1]`` (before any
mean/std normalisation, so clamping never wipes out negative normalised values — a bug of
the UnitMem reference code, sprintml/LocalizingMemorizationInSSL). Batch them with
``jax.vmap``; nothing here calls ``jit``.

Randomness is keyed by identity: view ``k`` of example ``i`` uses
``view_key(seed, i, k) = fold_in(fold_in(key(seed), i), k)``, so a view does not depend on
batch size or composition, device count, resume point or the model looking at it.

The SimCLR pipeline (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", Appendix A) follows torchvision's transforms:
``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``,
``RandomHorizontalFlip(0.5)``, ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``,
``RandomGrayscale(0.2)``. Differences from torchvision, by design:

- resampling is bilinear with half-pixel centres (``align_corners=False``) and no
  antialiasing (torchvision >= 0.17 antialiases when downscaling a tensor);
- the crop's 10 rejection-sampling tries are drawn at once and the first valid one wins,
  with torchvision's centre-crop fallback, so the shape of the computation is static;
- colour jitter applies its four operations in a random order as torchvision does (the
  hue shift computed once, the cheap operations in ``lax.switch`` slots before and after
  it); an operation whose strength is 0 is skipped, exactly as torchvision skips it, so
  all-zero strengths are the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memjax._checks import check_positive_int
from memjax.errors import InputError

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)

Size = int | Sequence[int]


# --------------------------------------------------------------------------- validation

def _check_image(image: jax.Array, where: str) -> None:
    check_image_shape(getattr(image, "shape", None), where)


def check_image_shape(shape, where: str) -> None:
    """InputError naming ``where`` unless ``shape`` is one image ``[H, W, C]``, C in (1, 3)."""
    if shape is None or len(shape) != 3:
        raise InputError(f"{where}: image shape {shape}: expected one image [H, W, C]")
    if shape[0] < 1 or shape[1] < 1 or shape[2] not in (1, 3):
        raise InputError(f"{where}: image shape {tuple(shape)}: expected [H, W, C] with "
                         "H, W >= 1 and C in (1, 3)")


def output_size(size: Size | None, shape: Sequence[int], where: str) -> tuple[int, int]:
    """``size`` as ``(h, w)``; an int means a square; None keeps the image ``shape``'s."""
    if size is None:
        return int(shape[0]), int(shape[1])
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                 and s > 0 for s in pair):
        raise InputError(f"{where}: size={size!r}: expected a positive int or a pair of "
                         "positive ints (h, w)")
    return int(pair[0]), int(pair[1])


def _check_range(name: str, value: Sequence[float], where: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (0 < lo <= hi):
        raise InputError(f"{where}: {name}={tuple(value)}: expected 0 < min <= max")
    return lo, hi


def _check_prob(p: float, where: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise InputError(f"{where}: p={p}: expected a probability in [0, 1]")
    return float(p)


# --------------------------------------------------------------------------- keys

def view_key(seed: int, example_id, aug_id) -> jax.Array:
    """Key of augmentation ``aug_id`` of example ``example_id`` (ids may be traced)."""
    key = jax.random.fold_in(jax.random.key(seed), example_id)
    return jax.random.fold_in(key, aug_id)


# --------------------------------------------------------------------------- geometry

def _axis_weights(start, length, n_out: int, n_in: int):
    """Bilinear taps along one axis of the box [start, start+length) resampled to n_out.

    Half-pixel centres (align_corners=False); source coordinates clamped to the box, so
    the box edge is replicated as when resizing the cropped image on its own.
    """
    length = jnp.asarray(length, jnp.float32)
    start = jnp.asarray(start, jnp.float32)
    src = (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (length / n_out) - 0.5
    src = jnp.clip(src, 0.0, length - 1.0)
    lo = jnp.floor(src)
    frac = src - lo
    hi = jnp.minimum(lo + 1.0, length - 1.0)
    to_index = lambda v: jnp.clip((start + v).astype(jnp.int32), 0, n_in - 1)
    return to_index(lo), to_index(hi), frac


def resample_box(image: jax.Array, box, size: tuple[int, int]) -> jax.Array:
    """Bilinearly resample the box ``(top, left, height, width)`` of ``image`` to ``size``.

    The box may be traced (integers or floats); the output shape ``[h, w, C]`` is static.
    """
    top, left, height, width = box
    h_out, w_out = size
    y0, y1, fy = _axis_weights(top, height, h_out, image.shape[0])
    x0, x1, fx = _axis_weights(left, width, w_out, image.shape[1])
    image = image.astype(jnp.float32)
    rows = (image[y0] * (1.0 - fy)[:, None, None] + image[y1] * fy[:, None, None])
    return rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def resize(image: jax.Array, size: Size) -> jax.Array:
    """Bilinear resize of ``image [H, W, C]`` to ``size`` (no antialiasing)."""
    _check_image(image, "resize")
    out = output_size(size, image.shape, "resize")
    return resample_box(image, (0, 0, image.shape[0], image.shape[1]), out)


def center_crop(image: jax.Array, size: Size) -> jax.Array:
    """The central ``size`` window of ``image [H, W, C]`` (torchvision's rounding)."""
    _check_image(image, "center_crop")
    h, w = output_size(size, image.shape, "center_crop")
    H, W = image.shape[:2]
    if h > H or w > W:
        raise InputError(f"center_crop: size {(h, w)} is larger than the image {(H, W)}")
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return image[top:top + h, left:left + w]


def _crop_box(key, H: int, W: int, scale, ratio, tries: int = 10):
    """torchvision's RandomResizedCrop.get_params with all tries drawn at once."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = float(H * W)
    target = area * jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
    log_r = (np.log(ratio[0]), np.log(ratio[1]))
    aspect = jnp.exp(jax.random.uniform(k_ratio, (tries,), minval=log_r[0], maxval=log_r[1]))
    w = jnp.round(jnp.sqrt(target * aspect))
    h = jnp.round(jnp.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = jnp.argmax(ok)  # the first valid try, as torchvision's loop returns
    h, w = h[first], w[first]
    top = jnp.floor(jax.random.uniform(k_top, (tries,))[first] * (H - h + 1))
    left = jnp.floor(jax.random.uniform(k_left, (tries,))[first] * (W - w + 1))
    # Fallback (no valid try): a central crop with the aspect ratio clamped into `ratio`.
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(H * ratio[1])), H
    else:
        fw, fh = W, H
    any_ok = ok.any()
    pick = lambda a, b: jnp.where(any_ok, a, jnp.float32(b))
    return (pick(top, (H - fh) // 2), pick(left, (W - fw) // 2), pick(h, fh), pick(w, fw))


def random_resized_crop(key: jax.Array, image: jax.Array, *, size: Size | None = None,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
    """torchvision's RandomResizedCrop: a random box of ``scale`` x area and aspect
    ``ratio``, resampled bilinearly to ``size`` (default: the image's size)."""
    _check_image(image, "random_resized_crop")
    out = output_size(size, image.shape, "random_resized_crop")
    scale = _check_range("scale", scale, "random_resized_crop")
    ratio = _check_range("ratio", ratio, "random_resized_crop")
    box = _crop_box(key, int(image.shape[0]), int(image.shape[1]), scale, ratio)
    return resample_box(image, box, out)


def horizontal_flip(key: jax.Array, image: jax.Array, p: float = 0.5) -> jax.Array:
    """``image[:, ::-1]`` with probability ``p``."""
    _check_image(image, "horizontal_flip")
    flip = jax.random.bernoulli(key, _check_prob(p, "horizontal_flip"))
    return jnp.where(flip, image[:, ::-1], image)


# --------------------------------------------------------------------------- colour

def grayscale(image: jax.Array) -> jax.Array:
    """BT.601 luma ``[H, W, 1]`` of an RGB image (a 1-channel image is returned as is)."""
    if image.shape[-1] == 1:
        return image
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[..., None]


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    """RGB ``[..., 3]`` in [0, 1] -> HSV ``[..., 3]`` in [0, 1] (torchvision's formulas)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    gray = maxc == minc
    chroma = maxc - minc
    s = chroma / jnp.where(gray, 1.0, maxc)  # gray pixels (incl. black): s = 0, no 0/0
    div = jnp.where(gray, 1.0, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = jnp.where(maxc == r, bc - gc,
                  jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
    """HSV ``[..., 3]`` -> RGB ``[..., 3]`` (inverse of :func:`rgb_to_hsv`)."""
    h, s, v = image[..., 0], image[..., 1], image[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = jnp.mod(i.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # Each channel takes one of v, p, q, t by the sector i (a select, no gather).
    sectors = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    return jnp.stack([jax.lax.select_n(i, *c) for c in sectors], axis=-1)


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    # torchvision blends with the mean of the grayscale image (one scalar per image).
    return _blend(image, jnp.mean(grayscale(image)), factor)


def adjust_saturation(image, factor):
    return _blend(image, grayscale(image), factor)


def adjust_hue(image, shift):
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
    return hsv_to_rgb(hsv)


def _jitter_ops(channels: int, brightness: float, contrast: float, saturation: float,
                hue: float):
    """(op, sample factor) pairs in torchvision's order, skipping zero strengths (and
    saturation/hue on 1-channel images, which torchvision leaves unchanged)."""
    def around_one(s):
        return lambda k: jax.random.uniform(k, minval=max(0.0, 1.0 - s), maxval=1.0 + s)

    ops = []
    if brightness > 0:
        ops.append((adjust_brightness, around_one(brightness)))
    if contrast > 0:
        ops.append((adjust_contrast, around_one(contrast)))
    if saturation > 0 and channels == 3:
        ops.append((adjust_saturation, around_one(saturation)))
    if hue > 0 and channels == 3:
        ops.append((adjust_hue, lambda k: jax.random.uniform(k, minval=-hue, maxval=hue)))
    return ops


def _jitter_slot(image, op, branches):
    """Apply ``branches[op]``; ``op == len(branches)`` is the identity (an empty slot)."""
    return jax.lax.switch(op, [*branches, lambda x: x], image)


def color_jitter(key: jax.Array, image: jax.Array, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8, *, random_order: bool = True) -> jax.Array:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)``.

    Factors are uniform in ``[max(0, 1-s), 1+s]`` (hue shift uniform in ``[-h, h]``, h <=
    0.5); the operations run in a random permutation (``random_order=True``, as
    torchvision) or in the order brightness, contrast, saturation, hue.

    The hue shift (RGB -> HSV -> RGB) is computed once per image even under ``vmap``
    (where a ``lax.switch`` on a batched index evaluates every branch): the cheap
    operations that the permutation puts before the hue run in slots before it, the ones
    after it in slots after it, an empty slot being the identity. Each operation sees the
    same input as in a plain loop over the permutation: the same arithmetic (XLA:CPU may
    still contract a*b+c into an FMA in one fusion and not another, a few float32 ulps).
    """
    _check_image(image, "color_jitter")
    p = _check_prob(p, "color_jitter")
    for name, s in (("brightness", brightness), ("contrast", contrast),
                    ("saturation", saturation)):
        if s < 0:
            raise InputError(f"color_jitter: {name}={s}: expected >= 0")
    if not 0 <= hue <= 0.5:
        raise InputError(f"color_jitter: hue={hue}: expected in [0, 0.5]")
    ops = _jitter_ops(image.shape[-1], brightness, contrast, saturation, hue)
    if not ops or p == 0.0:
        return image
    k_apply, k_order, *k_ops = jax.random.split(key, 2 + len(ops))
    factors = [sample(k) for (_, sample), k in zip(ops, k_ops, strict=True)]
    branches = [lambda x, f=f, op=op: op(x, f) for (op, _), f in zip(ops, factors, strict=True)]
    out = image.astype(jnp.float32)
    if not random_order:
        for branch in branches:
            out = branch(out)
    elif ops[-1][0] is adjust_hue:  # hue, when on, is the last of `ops`
        order = jax.random.permutation(k_order, len(ops))
        *cheap, hue_op = branches
        empty = len(cheap)  # the identity slot; also the hue's index in `order`
        at = jnp.argmax(order == empty)  # the hue's position in the permutation
        for position in range(len(cheap)):  # positions before the hue's
            out = _jitter_slot(out, jnp.where(position < at, order[position], empty), cheap)
        out = hue_op(out)
        for position in range(1, len(ops)):  # positions after the hue's
            out = _jitter_slot(out, jnp.where(position > at, order[position], empty), cheap)
    else:
        order = jax.random.permutation(k_order, len(ops))
        for position in range(len(ops)):
            out = jax.lax.switch(order[position], branches, out)
    return jnp.where(jax.random.bernoulli(k_apply, p), out, image)


def random_grayscale(key: jax.Array, image: jax.Array, p: float = 0.2) -> jax.Array:
    """With probability ``p``: the BT.601 luma repeated over the channels (C kept)."""
    _check_image(image, "random_grayscale")
    gray = jnp.broadcast_to(grayscale(image), image.shape)
    return jnp.where(jax.random.bernoulli(key, _check_prob(p, "random_grayscale")), gray, image)


# --------------------------------------------------------------------------- SimCLR

def simclr_view(key: jax.Array, image: jax.Array, *, size: Size | None = None) -> jax.Array:
    """One SimCLR view ``[h, w, C]`` of ``image [H, W, C]`` in [0, 1] (module docstring)."""
    _check_image(image, "simclr_view")
    k_crop, k_flip, k_jitter, k_gray = jax.random.split(key, 4)
    x = random_resized_crop(k_crop, image.astype(jnp.float32), size=size)
    x = horizontal_flip(k_flip, x)
    x = color_jitter(k_jitter, x)
    x = random_grayscale(k_gray, x)
    return jnp.clip(x, 0.0, 1.0)


def simclr_views(images: jax.Array, ids: jax.Array, n_aug: int, *, seed: int = 0,
                 size: Size | None = None) -> jax.Array:
    """``n_aug`` SimCLR views of each image: ``[B, H, W, C]``, ids ``[B]`` ->
    ``[B, n_aug, h, w, C]``; view ``k`` of image ``b`` is keyed by ``(seed, ids[b], k)``."""
    n_aug = check_positive_int(n_aug, "simclr_views: n_aug")
    if getattr(images, "ndim", None) != 4:
        raise InputError(f"simclr_views: images shape {getattr(images, 'shape', None)}: "
                         "expected [B, H, W, C]")
    if jnp.shape(ids) != images.shape[:1]:
        raise InputError(f"simclr_views: ids shape {jnp.shape(ids)}: expected "
                         f"[{images.shape[0]}], one id per image")
    check_image_shape(images.shape[1:], "simclr_views")
    output_size(size, images.shape[1:], "simclr_views")

    def one(image, example_id):
        keys = jax.vmap(lambda k: view_key(seed, example_id, k))(jnp.arange(n_aug))
        return jax.vmap(lambda k: simclr_view(k, image, size=size))(keys)

    return jax.vmap(one)(images, jnp.asarray(ids))


# --------------------------------------------------------------------------- view functions
# A view function is ``views_fn(image [H, W, C], key) -> view [h, w, C]``: one augmented view
# per key. The memorization methods key view k of example i by ``view_key(seed, i, k)``.
# Frozen dataclasses, so equal settings hash equal (the engine caches compiled programs by
# value).


def keyed_views(views_fn, image: jax.Array, seed: int, example_id, n_views: int) -> jax.Array:
    """Views ``0..n_views-1`` of one example: ``[n_views, h, w, C]``, view k keyed by
    ``view_key(seed, example_id, k)``."""
    keys = jax.vmap(lambda k: view_key(seed, example_id, k))(
        jnp.arange(n_views, dtype=jnp.int32))
    return jax.vmap(views_fn, in_axes=(None, 0))(image, keys)


@dataclasses.dataclass(frozen=True)
class SimCLRView:
    """The SimCLR view (:func:`simclr_view`) as a view function, at any ``size``
    (default: the image's size)."""

    size: tuple[int, int] | int | None = None

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        return simclr_view(key, image, size=self.size)


@dataclasses.dataclass(frozen=True)
class SmallImageView:
    """A SimCLR-style view of a small (e.g. 8×8 digit) image: a random resized crop of at
    least ``min_scale`` of the area (smaller crops of a few pixels leave no object) and
    brightness/contrast jitter with probability ``p`` (grayscale images: no saturation or
    hue). The split of the key into crop and colour keys is part of the definition."""

    min_scale: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    p: float = 0.8

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        k_crop, k_color = jax.random.split(key)
        view = random_resized_crop(k_crop, image, scale=(self.min_scale, 1.0))
        return color_jitter(k_color, view, brightness=self.brightness,
                            contrast=self.contrast, saturation=0.0, hue=0.0, p=self.p)


# --------------------------------------------------------------------------- text views


@dataclasses.dataclass(frozen=True)
class TokenMaskView:
    """A view of a tokenised text: each real, non-special token replaced by ``mask_id``
    with probability ``rate`` (independently per position).

    The SSL memorization papers (SSLMem, Wang et al. ICLR 2024; UnitMem/LayerMem, Wang et
    al. NeurIPS 2024) define views for images only. For a text encoder memjax uses the
    corruption the encoder was pre-trained with: BERT's masked-language-model input
    (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
    Language Understanding", Sec. 3.1), which masks 15% of the tokens (``rate=0.15``).
    Unlike BERT's 80/10/10 rule, a chosen token always becomes ``[MASK]`` (no random or
    unchanged replacements), so a view differs from its text exactly where it is masked.
    Padding (``attention_mask == 0``) and the special tokens ``keep_ids`` ([CLS], [SEP],
    [PAD], ...) are never masked; ``attention_mask`` is returned unchanged.

    Called as ``view(inputs, key)`` with ``inputs = {"input_ids": [T] int,
    "attention_mask": [T]}`` (one text); returns the same dict with masked ``input_ids``.
    """

    mask_id: int
    rate: float = 0.15
    keep_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0.0 <= float(self.rate) <= 1.0:
            raise InputError(f"TokenMaskView: rate={self.rate}: expected a probability in "
                             "[0, 1]")
        if isinstance(self.mask_id, bool) or not isinstance(self.mask_id, (int, np.integer)):
            raise InputError(f"TokenMaskView: mask_id={self.mask_id!r}: expected a token id")

    def __call__(self, inputs, key: jax.Array):
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise InputError("TokenMaskView: expected {'input_ids': [T], 'attention_mask': "
                             f"[T]}} for one text, got {type(inputs).__name__}")
        ids = inputs["input_ids"]
        maskable = jnp.ones(ids.shape, bool)
        if "attention_mask" in inputs:
            maskable = inputs["attention_mask"] > 0
        for special in self.keep_ids:
            maskable = maskable & (ids != special)
        chosen = jax.random.bernoulli(key, float(self.rate), ids.shape) & maskable
        return {**inputs, "input_ids": jnp.where(chosen, jnp.asarray(self.mask_id, ids.dtype),
                                                 ids)}
