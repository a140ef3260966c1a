"""A checkpoint's image preprocessing (``preprocessor_config.json``), reproduced exactly.

:class:`ImageProcessor` is built from the dict a Hugging Face checkpoint ships as
``preprocessor_config.json`` (``Model.preprocess``) and turns one decoded RGB image
(uint8 [H, W, 3], see :func:`memjax.data.decode_image`) into the float32 [H', W', 3]
array the model takes (memjax models are NHWC; transformers returns CHW).

It reproduces the PIL backend of transformers' image processors (``CLIPImageProcessorPil``
and friends in transformers 5.x, the "slow" processors of 4.x) step by step and in the same
dtypes, so the results are bit-identical to theirs:

1. resize with PIL (``Image.resize`` on the uint8 RGB image, the checkpoint's ``resample``
   filter) to the size ``size`` asks for: ``{"height", "width"}``, ``{"shortest_edge"}``
   (aspect kept, the long side ``int(short * long / short_in)``), ``{"shortest_edge",
   "longest_edge"}`` or ``{"max_height", "max_width"}``; ConvNeXt's processor (what the
   ``microsoft/resnet-*`` checkpoints ship) resizes the short side to
   ``int(shortest_edge / crop_pct)`` and centre-crops ``shortest_edge`` when
   ``shortest_edge < 384``, and warps to a square otherwise;
2. centre crop to ``crop_size`` (zero-padding an image smaller than the crop, as
   transformers does);
3. rescale: ``(x.astype(float64) * rescale_factor).astype(float32)``;
4. normalise: ``(x - mean) / std`` in float32.

Differences from transformers, on purpose:

- The image is always RGB: :func:`memjax.data.decode_image` converts every mode with
  transformers' ``convert_to_rgb`` rule (transparency composited onto white). Processors
  whose ``do_convert_rgb`` is unset (ViT, ConvNeXt, DeiT) would otherwise hand a grey or
  RGBA image's own channels to the model (and fail in ``normalize``); for an RGB image the
  two are the same.
- ``image_processor_type`` names ending in ``Fast`` are computed with the PIL algorithm
  too. transformers 5 runs those (and the plain names when torchvision is installed) on
  its torchvision backend, whose antialiased tensor resize differs from PIL's by up to
  about 1/255 before normalisation; memjax has one, PIL-exact, path.
- The output is channels-last ([H, W, C]), whatever ``data_format`` says.

Options this module does not implement are refused, not ignored: ``do_pad``, size dicts
``{"longest_edge"}`` / ``{"min_pixels", "max_pixels"}``, CLIP's ``use_square_size``, and
every processor type outside :data:`PROCESSOR_DEFAULTS` (their PIL classes override the
steps above).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from memjax.errors import InputError

#: PIL's resampling filters by the integer a config stores (``PIL.Image.Resampling``).
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                    5: "hamming"}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_BASE = {"do_convert_rgb": None, "do_resize": True, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "do_center_crop": None,
         "crop_size": None, "do_pad": None, "default_to_square": True}


def _defaults(**values: Any) -> dict[str, Any]:
    return {**_BASE, **values}


#: The class defaults of the transformers PIL image processors memjax reproduces
#: (``<Type>Pil`` in transformers 5.x; tests check every entry against those classes).
#: A config value of None (or a missing key) falls back to these, as in transformers.
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _defaults(
        do_convert_rgb=True, size={"shortest_edge": 224}, default_to_square=False,
        crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "ChineseCLIPImageProcessor": _defaults(
        do_convert_rgb=True, size={"shortest_edge": 224}, default_to_square=False,
        crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "BitImageProcessor": _defaults(
        do_convert_rgb=True, size={"shortest_edge": 224}, default_to_square=False,
        crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "BlipImageProcessor": _defaults(
        do_convert_rgb=True, size={"height": 384, "width": 384}, resample=3,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "OwlViTImageProcessor": _defaults(
        do_convert_rgb=True, size={"height": 768, "width": 768},
        crop_size={"height": 768, "width": 768}, do_center_crop=False, resample=3,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "SiglipImageProcessor": _defaults(
        do_convert_rgb=True, size={"height": 224, "width": 224}, default_to_square=False,
        resample=3, image_mean=_HALF, image_std=_HALF),
    "ViTImageProcessor": _defaults(
        size={"height": 224, "width": 224}, resample=2, image_mean=_HALF, image_std=_HALF),
    "DeiTImageProcessor": _defaults(
        size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224},
        do_center_crop=True, resample=3, image_mean=_HALF, image_std=_HALF),
    "MobileNetV1ImageProcessor": _defaults(
        size={"shortest_edge": 256}, default_to_square=False,
        crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=2,
        image_mean=_HALF, image_std=_HALF),
    "PvtImageProcessor": _defaults(
        size={"height": 224, "width": 224}, resample=3, image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD),
    "ConvNextImageProcessor": _defaults(
        size={"shortest_edge": 384}, default_to_square=False, resample=3,
        image_mean=_HALF, image_std=_HALF, crop_pct=224 / 256),
}

#: The keys of a config that transformers' PIL processors read (``ImagesKwargs``); every
#: other key is ignored by transformers too (it only becomes an attribute).
_READ_KEYS = ("do_convert_rgb", "do_resize", "size", "default_to_square", "crop_size",
              "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
              "image_std", "do_pad", "do_center_crop")
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"},
              {"max_height", "max_width"})
_UNSUPPORTED_SIZE_KEYS = ({"longest_edge"}, {"min_pixels", "max_pixels"})


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """A checkpoint's image preprocessing as a value (see the module docstring).

    Build it with :meth:`from_config`. Call it on one RGB image, uint8 [H, W, 3]; it
    returns float32 [H', W', 3]. Equal configs give equal (and equally hashed) processors.

    Attributes:
      processor_type: the transformers class it reproduces, e.g. ``"CLIPImageProcessor"``.
      size: the resize target as sorted ``(key, value)`` pairs of transformers' size dict.
      resample: PIL filter number (see :data:`RESAMPLE_FILTERS`).
      crop_pct: ConvNeXt's resize-then-crop ratio (None for every other type).
      crop_size: (height, width) of the centre crop, or None without one.
      image_mean, image_std: per-channel normalisation (3 values each).
    """

    processor_type: str
    do_resize: bool
    size: tuple[tuple[str, int], ...] | None
    resample: int
    crop_pct: float | None
    do_center_crop: bool
    crop_size: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *,
                    where: str = "preprocessor_config.json") -> ImageProcessor:
        """The processor a ``preprocessor_config.json`` dict describes.

        ``where`` names the file in error messages. Type: ``image_processor_type``, else
        the legacy ``feature_extractor_type`` (``CLIPFeatureExtractor`` ->
        ``CLIPImageProcessor``); a ``Fast`` or ``Pil`` suffix is dropped.
        """
        if not isinstance(config, Mapping):
            raise InputError(f"{where}: expected a JSON object, got {type(config).__name__}")
        processor_type = _processor_type(config, where)
        values = dict(PROCESSOR_DEFAULTS[processor_type])
        settings = dict(config)
        if processor_type == "OwlViTImageProcessor" and "rescale" in settings:
            settings.setdefault("do_rescale", settings.pop("rescale"))  # its old key
        if processor_type == "CLIPImageProcessor" and settings.get("use_square_size"):
            raise InputError(f"{where}: use_square_size=true is not supported; expected a "
                             "config without it (or with size {height, width})")
        keys = _READ_KEYS + (("crop_pct",) if "crop_pct" in values else ())
        for key in keys:
            if settings.get(key) is not None:  # None falls back to the class default
                values[key] = settings[key]
        return cls._resolve(processor_type, values, where)

    @classmethod
    def _resolve(cls, processor_type: str, values: dict[str, Any],
                 where: str) -> ImageProcessor:
        where = f"{where} ({processor_type})"
        if values["do_pad"]:
            raise InputError(f"{where}: do_pad=true is not supported by memjax's image "
                             "preprocessing; expected do_pad false or absent")
        do_resize = _flag(values["do_resize"], "do_resize", where)
        do_center_crop = _flag(values["do_center_crop"], "do_center_crop", where)
        do_rescale = _flag(values["do_rescale"], "do_rescale", where)
        do_normalize = _flag(values["do_normalize"], "do_normalize", where)
        default_to_square = _flag(values["default_to_square"], "default_to_square", where)
        size = None
        if do_resize:
            size = _size_dict(values.get("size"), default_to_square, "size", where)
            if values.get("crop_pct") is not None and "shortest_edge" not in size:
                raise InputError(f"{where}: size must have 'shortest_edge', got {size}")
        crop_size = None
        if do_center_crop:
            crop = _size_dict(values.get("crop_size"), True, "crop_size", where)
            if set(crop) != {"height", "width"}:
                raise InputError(f"{where}: crop_size must have 'height' and 'width', "
                                 f"got {crop}")
            crop_size = (crop["height"], crop["width"])
        resample = values.get("resample")
        if do_resize and (isinstance(resample, bool) or resample not in RESAMPLE_FILTERS):
            raise InputError(f"{where}: resample must be a PIL filter number "
                             f"{RESAMPLE_FILTERS}, got {resample!r}")
        factor = values.get("rescale_factor")
        if do_rescale and not _is_number(factor):
            raise InputError(f"{where}: rescale_factor must be a number with do_rescale, "
                             f"got {factor!r}")
        mean = std = None
        if do_normalize:
            mean = _channels(values.get("image_mean"), "image_mean", where)
            std = _channels(values.get("image_std"), "image_std", where)
            if any(s == 0 for s in std):
                raise InputError(f"{where}: image_std has a zero: {list(std)}")
        crop_pct = values.get("crop_pct")
        if crop_pct is not None and not (_is_number(crop_pct) and crop_pct > 0):
            raise InputError(f"{where}: crop_pct must be a positive number, got {crop_pct!r}")
        return cls(
            processor_type=processor_type, do_resize=do_resize,
            size=tuple(sorted(size.items())) if size is not None else None,
            resample=int(resample) if do_resize else 0,
            crop_pct=float(crop_pct) if crop_pct is not None else None,
            do_center_crop=do_center_crop, crop_size=crop_size, do_rescale=do_rescale,
            rescale_factor=float(factor) if do_rescale else 1.0, do_normalize=do_normalize,
            image_mean=mean, image_std=std)

    # ----------------------------------------------------------------- use

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One RGB image uint8 [H, W, 3] -> float32 [H', W', 3] (module docstring steps)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"{self.processor_type}: expected an RGB image uint8 [H, W, 3], "
                             f"got {image.dtype} {image.shape} (decode it with decode_image)")
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop:
            image = center_crop(image, *self.crop_size)
        pixels: np.ndarray = image
        if self.do_rescale:  # transformers: upcast to float64, multiply, then float32
            pixels = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32)
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            pixels = (pixels - mean) / std
        return np.asarray(pixels, np.float32)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        size = dict(self.size)
        height, width = image.shape[:2]
        if self.crop_pct is not None:  # ConvNeXt: resize the short side, then crop
            edge = size["shortest_edge"]
            if edge >= 384:
                return pil_resize(image, (edge, edge), self.resample)
            resized = pil_resize(image, shortest_edge_size(height, width,
                                                           int(edge / self.crop_pct)),
                                 self.resample)
            return center_crop(resized, edge, edge)
        return pil_resize(image, resize_target(height, width, size), self.resample)

    def output_shape(self) -> tuple[int, int, int] | None:
        """(height, width, 3) of every output when the config fixes it, else None (the
        shape then follows each image's aspect ratio)."""
        if self.do_center_crop:
            return (*self.crop_size, 3)
        if not self.do_resize:
            return None
        size = dict(self.size)
        if self.crop_pct is not None:
            return size["shortest_edge"], size["shortest_edge"], 3
        if set(size) == {"height", "width"}:
            return size["height"], size["width"], 3
        return None

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description (run fingerprints): every resolved setting."""
        return {"kind": "image_processor", "type": self.processor_type,
                "do_resize": self.do_resize,
                "size": dict(self.size) if self.size is not None else None,
                "resample": RESAMPLE_FILTERS[self.resample] if self.do_resize else None,
                "crop_pct": self.crop_pct, "do_center_crop": self.do_center_crop,
                "crop_size": list(self.crop_size) if self.crop_size else None,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean) if self.image_mean else None,
                "image_std": list(self.image_std) if self.image_std else None}


# --------------------------------------------------------------------------- steps


def pil_resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 [H, W, 3] resized to ``size`` = (height, width) by PIL's ``Image.resize``
    with filter ``resample`` (transformers' ``image_transforms.resize`` on uint8)."""
    from PIL import Image

    height, width = size
    if height <= 0 or width <= 0:
        raise InputError(f"cannot resize an image of {image.shape[0]}x{image.shape[1]} to "
                         f"{height}x{width}: the size must be positive")
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """(height, width) with the short side ``edge`` and the long side
    ``int(edge * long / short)`` (transformers' ``get_resize_output_image_size``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def resize_target(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """The (height, width) a transformers size dict asks for an image of height x width
    (``PilBackend.resize``)."""
    keys = set(size)
    if keys == {"shortest_edge", "longest_edge"}:
        return _size_with_aspect_ratio(height, width, size["shortest_edge"],
                                       size["longest_edge"])
    if keys == {"shortest_edge"}:
        return shortest_edge_size(height, width, size["shortest_edge"])
    if keys == {"max_height", "max_width"}:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    return size["height"], size["width"]


def _size_with_aspect_ratio(height: int, width: int, size: int,
                            max_size: int) -> tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio`` (short side ``size``, long side at
    most ``max_size``)."""
    raw_size = None
    short_in, long_in = float(min(height, width)), float(max(height, width))
    if long_in / short_in * size > max_size:
        raw_size = max_size * short_in / long_in
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        new_height = int(raw_size * height / width) if raw_size is not None else int(
            size * height / width)
        return new_height, size
    new_width = int(raw_size * width / height) if raw_size is not None else int(
        size * width / height)
    return size, new_width


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre ``height`` x ``width`` of ``image`` [H, W, C]; an image smaller than the
    crop is zero-padded first (transformers' ``image_transforms.center_crop``)."""
    in_height, in_width = image.shape[:2]
    top, left = (in_height - height) // 2, (in_width - width) // 2
    if top >= 0 and left >= 0 and top + height <= in_height and left + width <= in_width:
        return image[top:top + height, left:left + width]
    new_height, new_width = max(height, in_height), max(width, in_width)
    padded = np.zeros((new_height, new_width, *image.shape[2:]), image.dtype)
    top_pad = math.ceil((new_height - in_height) / 2)
    left_pad = math.ceil((new_width - in_width) / 2)
    padded[top_pad:top_pad + in_height, left_pad:left_pad + in_width] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_height, top + height),
                  max(0, left):min(new_width, left + width)]


# --------------------------------------------------------------------------- checks


def _processor_type(config: Mapping[str, Any], where: str) -> str:
    name = config.get("image_processor_type")
    if name is None and isinstance(config.get("feature_extractor_type"), str):
        name = config["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    if not isinstance(name, str):
        raise InputError(f"{where}: no image_processor_type (or feature_extractor_type); "
                         f"expected one of {sorted(PROCESSOR_DEFAULTS)}")
    base = name.removesuffix("Fast").removesuffix("Pil")
    if base not in PROCESSOR_DEFAULTS:
        raise InputError(
            f"{where}: image processor type {name!r} is not supported (its transformers "
            f"class has its own steps that memjax does not reproduce); supported: "
            f"{sorted(PROCESSOR_DEFAULTS)}. Preprocess the images yourself and pass "
            "image_transform=, or convert them to one of these processors' settings")
    return base


def _flag(value: Any, name: str, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _size_dict(value: Any, default_to_square: bool, name: str, where: str) -> dict[str, int]:
    """transformers' ``get_size_dict``: an int is a square (or the shortest edge when
    ``default_to_square`` is false), a pair is (height, width), a dict is kept."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = {"height": value, "width": value} if default_to_square else \
            {"shortest_edge": value}
    elif isinstance(value, list | tuple) and len(value) == 2:
        size = {"height": value[0], "width": value[1]}
    elif isinstance(value, Mapping):
        size = dict(value)
    else:
        raise InputError(f"{where}: {name} must be an int, [height, width] or a dict, got "
                         f"{value!r}")
    keys = set(size)
    if keys in _UNSUPPORTED_SIZE_KEYS:
        raise InputError(f"{where}: {name} {size} is not supported; expected keys "
                         f"{[sorted(k) for k in _SIZE_KEYS]}")
    if keys not in _SIZE_KEYS:
        raise InputError(f"{where}: {name} {size} has unknown keys; expected one of "
                         f"{[sorted(k) for k in _SIZE_KEYS]}")
    for key, item in size.items():
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise InputError(f"{where}: {name}[{key!r}] must be a positive int, got {item!r}")
    return size


def _channels(value: Any, name: str, where: str) -> tuple[float, float, float]:
    values = [value] * 3 if _is_number(value) else value
    if not isinstance(values, list | tuple) or len(values) != 3 or \
            not all(_is_number(v) for v in values):
        raise InputError(f"{where}: {name} must be a number or 3 numbers (R, G, B), got "
                         f"{value!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]
