"""Image decoding for every source, and folders of images (with or without classes).

:func:`decode_image` is the one place an image file becomes pixels: every image source
(:class:`ImageFolderSource`, :class:`memjax.data.PairsSource`,
:class:`memjax.data.WebDatasetSource`) calls it, then hands the uint8 RGB array to an
:class:`ImageLoader` (a checkpoint's :class:`memjax.data.ImageProcessor`, any other
transform, or the default: float [0, 1] at one size).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from memjax.data._util import check_index, existing_path, hash_json
from memjax.data.base import RandomAccessSource
from memjax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
    """An image file (a path, or its bytes) as RGB uint8 [H, W, 3].

    Modes become RGB the way transformers' ``convert_to_rgb`` does (so a checkpoint's
    processor sees what transformers would give it): an image with an alpha band (LA,
    RGBA, PA) or a ``transparency`` entry (P, L or RGB with a tRNS chunk) is converted to
    RGBA and alpha-composited onto white; every other mode (L, 1, P, CMYK, YCbCr, ...)
    goes through PIL's ``convert("RGB")``. Where memjax differs, on purpose:

    - 16-bit grey (``I;16*``, and ``I``, PIL's 32-bit integer mode, which memjax reads as
      16-bit data: values must lie in 0..65535) is scaled to 8 bits as
      ``round(v * 255 / 65535)`` (= ``round(v / 257)``); PIL's ``convert`` (and so
      transformers) clips it to 0..255 instead, which turns most of a 16-bit image white.
    - 32-bit float grey (``F``) follows transformers' rule for float arrays: whole values
      in 0..255 are taken as they are, values in [0, 1] are scaled by 255 (then rounded);
      anything else (or NaN/inf) is refused.
    - 16-bit RGB PNGs are reduced to 8 bits by Pillow's decoder itself (it keeps each
      sample's high byte, ``v >> 8``) before memjax sees them; that is up to 1 below
      ``round(v / 257)``.

    EXIF orientation is not applied (transformers does not apply it either). Multi-frame
    files (GIF, TIFF) give their first frame.

    Raises:
      InputError: naming ``name`` (default: the path) when the file is not an image PIL
        can read.
    """
    from PIL import Image, UnidentifiedImageError

    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    label = name if name is not None else ("<image bytes>" if is_bytes else os.fspath(source))
    try:
        with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as image:
            return to_rgb(image, label)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError) as error:
        raise InputError(f"cannot read image {label}: {error}") from None


def to_rgb(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image as RGB uint8 [H, W, 3] (the rules of :func:`decode_image`)."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_sixteen_to_eight(np.asarray(image), image.mode, name))
    if image.mode == "F":
        return _grey_to_rgb(_float_to_eight(np.asarray(image), name))
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:  # transformers' convert_to_rgb: composite onto white
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def _sixteen_to_eight(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(f"image {name}: mode {mode} pixels span {values.min()}..{values.max()}; "
                         "expected 16-bit values in 0..65535")
    # v / 257 is never exactly k + 1/2 for an integer v, so rounding has no ties.
    return np.rint(values / 257.0).astype(np.uint8)


def _float_to_eight(values: np.ndarray, name: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"image {name}: mode F image has NaN or infinite pixels")
    if values.size and values.min() >= 0 and values.max() <= 255 and \
            np.array_equal(values, np.round(values)):
        return values.astype(np.uint8)
    if values.size and values.min() >= 0 and values.max() <= 1:
        return np.rint(values * 255).astype(np.uint8)
    raise InputError(f"image {name}: mode F pixels span {values.min()}..{values.max()}; "
                     "expected whole values in 0..255 or values in [0, 1]")


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def transform_spec(transform: Callable[..., Any]) -> dict[str, Any]:
    """A fingerprint of an image transform: its ``spec()`` when it has one (an
    :class:`memjax.data.ImageProcessor`), else its qualified name."""
    spec = getattr(transform, "spec", None)
    if callable(spec):
        return spec()
    kind = transform if hasattr(transform, "__qualname__") else type(transform)
    return {"kind": "callable",
            "name": f"{getattr(kind, '__module__', '?')}.{kind.__qualname__}"}


@dataclasses.dataclass(frozen=True)
class ImageLoader:
    """Decoded image -> the array a source returns.

    With ``transform`` (e.g. a checkpoint's :class:`memjax.data.ImageProcessor`): its
    output on the uint8 RGB image [H, W, 3], as float32. Without one: float32 [H, W, 3]
    in [0, 1] (pixel / 255), bilinearly resized to ``size`` = (height, width) when
    ``resize``; without ``resize`` every image must already be ``size``.
    """

    transform: Callable[[np.ndarray], np.ndarray] | None = None
    size: tuple[int, int] | None = None
    resize: bool = True

    def __call__(self, source: str | bytes, name: str, where: str) -> np.ndarray:
        try:
            pixels = decode_image(source, name=name)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        if self.transform is not None:
            return np.asarray(self.transform(pixels), dtype=np.float32)
        height, width = self.size
        if pixels.shape[:2] != (height, width):
            if not self.resize:
                raise InputError(
                    f"{where}: image {name} is {pixels.shape[0]}x{pixels.shape[1]} (HxW) but "
                    f"the first image is {height}x{width}; pass size=(height, width) to "
                    "resize all images (or a model / image_transform that resizes them)")
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).resize((width, height),
                                                               Image.Resampling.BILINEAR))
        return pixels.astype(np.float32) / np.float32(255.0)

    def spec(self) -> dict[str, Any]:
        if self.transform is not None:
            return {"transform": transform_spec(self.transform)}
        return {"size": list(self.size), "scale": "1/255"}


def image_loader(transform: Callable | None, size: Any, first: Callable[[], tuple[int, int]],
                 where: str) -> ImageLoader:
    """The loader of a source: ``transform``, else [0, 1] at ``size`` (resized), else at
    the size of the first image (``first()`` reads it; every image must match)."""
    if transform is not None:
        if size is not None:
            raise InputError(f"{where}: pass size= or image_transform=, not both (the "
                             "transform decides the output size)")
        if not callable(transform):
            raise InputError(f"{where}: image_transform must be callable uint8 [H, W, 3] "
                             f"-> array, got {type(transform).__name__}")
        return ImageLoader(transform=transform)
    if size is None:
        return ImageLoader(size=first(), resize=False)
    return ImageLoader(size=check_size(size, where))


def image_size(source: str | bytes, name: str, where: str) -> tuple[int, int]:
    """(height, width) of one image, read from its header."""
    from PIL import Image, UnidentifiedImageError

    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    try:
        with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{where}: cannot read image {name}: {error}") from None
    return height, width


def check_size(size: Any, where: str) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"{where}: size must be (height, width), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise InputError(f"{where}: size must be positive, got {size!r}")
    return height, width


class ImageFolderSource(RandomAccessSource):
    """Images in a folder, decoded with :func:`decode_image` on each read.

    Two layouts: ``root/<class_name>/<image files>`` (labels: classes are the sorted
    sub-folder names, label = position in :attr:`classes`; files found recursively under
    each class folder) or a flat ``root/<image files>`` (no labels). A folder with both
    top-level images and class folders holding images is refused as ambiguous. Files are
    sorted by relative path; hidden files and folders (names starting with ".") are
    ignored, and so is every file without an image extension.

    Args:
      root: the folder.
      size: (height, width) every image is resized to (bilinear), without a transform.
        None keeps the images' own size, which must then be the same for all (the first
        image's size is used).
      extensions: file suffixes counted as images (case-insensitive).
      transform: a callable uint8 RGB [H, W, 3] -> array applied instead of the [0, 1]
        scaling, e.g. a checkpoint's :class:`memjax.data.ImageProcessor`.

    Records: ``image`` float32 [H, W, 3] (in [0, 1] without a transform), ``label`` int32
    (class layout only), ``id`` int64 = the index. :meth:`names` gives the relative paths.
    """

    def __init__(self, root: str | os.PathLike, *, size: tuple[int, int] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.root = existing_path(root, "ImageFolderSource")
        if not os.path.isdir(self.root):
            raise InputError(f"ImageFolderSource: {self.root} is not a folder; expected "
                             "root/<class_name>/<image files> or root/<image files>")
        self.extensions = tuple(sorted({e.lower() for e in extensions}))
        self.classes, self.files, labels = _scan(self.root, self.extensions)
        self.labelled = bool(self.classes)
        self._labels = np.asarray(labels, dtype=np.int32)
        where = f"ImageFolderSource({self.root})"
        first = os.path.join(self.root, self.files[0])
        self.loader = image_loader(transform, size, lambda: image_size(first, first, where),
                                   where)
        self.size = self.loader.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self.files), f"ImageFolderSource({self.root})")
        path = os.path.join(self.root, self.files[i])
        record = {"image": self.loader(path, path, "ImageFolderSource")}
        if self.labelled:
            record["label"] = self._labels[i]
        record["id"] = np.int64(i)
        return record

    def names(self) -> list[str]:
        """Each example's path relative to the root ("/"-separated), in index order."""
        return [rel.replace(os.sep, "/") for rel in self.files]

    def spec(self) -> dict[str, Any]:
        listing = []
        for rel in self.files:
            stat = os.stat(os.path.join(self.root, rel))
            listing.append([rel, stat.st_size, stat.st_mtime_ns])
        return {
            "kind": "image_folder",
            "root": self.root,
            "classes": list(self.classes),
            "labelled": self.labelled,
            "n": len(self.files),
            "size": list(self.size) if self.size is not None else None,
            "image": self.loader.spec(),
            "files_hash": hash_json(listing),
        }

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.root!r}, n={len(self.files)}, "
                f"classes={len(self.classes)}, size={self.size})")


def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(extensions)


def _scan(root: str, extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[int]]:
    """Sorted class names (empty for a flat folder), image paths relative to root, and
    their labels."""
    entries = sorted(os.listdir(root))
    folders = [d for d in entries
               if not d.startswith(".") and os.path.isdir(os.path.join(root, d))]
    top = [f for f in entries
           if os.path.isfile(os.path.join(root, f)) and _is_image(f, extensions)]
    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for name in folders:
        found = []
        for folder, subdirs, names in os.walk(os.path.join(root, name)):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(os.path.relpath(os.path.join(folder, f), root) for f in names
                         if _is_image(f, extensions))
        classes.append(name)
        files.extend(sorted(found))
        labels.extend([len(classes) - 1] * len(found))
    if files and top:
        raise InputError(
            f"ImageFolderSource: {root} has both images at the top ({top[:3]}...) and class "
            f"folders with images ({folders[:3]}...); expected either root/<class_name>/"
            "<image files> (labelled) or root/<image files> (no labels)")
    if top:
        return [], top, []
    if not files:
        raise InputError(
            f"ImageFolderSource: no images found in {root}; expected "
            f"root/<class_name>/<image files> or root/<image files> with extensions "
            f"{list(extensions)} (class folders found: {folders})"
        )
    return classes, files, labels


def stack_images(images: list[np.ndarray], where: str) -> np.ndarray:
    """[n, H, W, C] from one batch's preprocessed images, which must share one shape
    (an empty batch gives [0, 0, 0, 3])."""
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise InputError(f"{where}: images of different shapes {sorted(shapes)} after "
                         "preprocessing; expected one shape (a processor that crops or "
                         "resizes to a fixed size, or size=)")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.float32)
