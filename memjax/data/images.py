"""A folder of images, one sub-folder per class (``root/<class_name>/<image files>``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from memjax.data._util import check_index, existing_path, hash_json
from memjax.data.base import RandomAccessSource
from memjax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolderSource(RandomAccessSource):
    """Images under ``root/<class_name>/``, decoded with PIL on each read.

    Classes are the sorted sub-folder names (label = position in :attr:`classes`); files
    are every image found (recursively) under each class folder, sorted by relative path.
    Hidden files and folders (names starting with ".") are ignored.

    Args:
      root: the folder holding one sub-folder per class.
      size: (height, width) every image is resized to (bilinear). None keeps the images'
        own size, which must then be the same for all (the first image's size is used).
      extensions: file suffixes counted as images (case-insensitive).

    Records: ``image`` float32 [H, W, 3] in [0, 1] (converted to RGB), ``label`` int32,
    ``id`` int64 = the index.
    """

    def __init__(self, root: str | os.PathLike, *, size: tuple[int, int] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = existing_path(root, "ImageFolderSource")
        if not os.path.isdir(self.root):
            raise InputError(f"ImageFolderSource: {self.root} is not a folder; expected "
                             "root/<class_name>/<image files>")
        self.extensions = tuple(sorted({e.lower() for e in extensions}))
        self.classes, self.files, labels = _scan(self.root, self.extensions)
        self._labels = np.asarray(labels, dtype=np.int32)
        # Without a size, images are not resized: they must all share the first one's size.
        self._resize = size is not None
        if size is None:
            size = _image_size(os.path.join(self.root, self.files[0]))
        self.size = _check_size(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self.files), f"ImageFolderSource({self.root})")
        return {
            "image": self._load(os.path.join(self.root, self.files[i])),
            "label": self._labels[i],
            "id": np.int64(i),
        }

    def _load(self, path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        height, width = self.size
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (width, height):
                    if not self._resize:
                        raise InputError(
                            f"ImageFolderSource: image {path} is {image.size[1]}x"
                            f"{image.size[0]} (HxW) but the first image is {height}x{width}; "
                            "pass size=(height, width) to resize all images"
                        )
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except InputError:  # a ValueError: keep it from the clause below
            raise
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputError(f"ImageFolderSource: cannot read image {path}: {error}") from None
        return array.astype(np.float32) / np.float32(255.0)

    def spec(self) -> dict[str, Any]:
        listing = []
        for rel in self.files:
            stat = os.stat(os.path.join(self.root, rel))
            listing.append([rel, stat.st_size, stat.st_mtime_ns])
        return {
            "kind": "image_folder",
            "root": self.root,
            "classes": list(self.classes),
            "n": len(self.files),
            "size": list(self.size),
            "files_hash": hash_json(listing),
        }

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.root!r}, n={len(self.files)}, "
                f"classes={len(self.classes)}, size={self.size})")


def _scan(root: str, extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[int]]:
    """Sorted class names, image paths relative to root, and their labels."""
    classes = sorted(
        d for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for folder, subdirs, names in os.walk(os.path.join(root, name)):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(
                os.path.relpath(os.path.join(folder, f), root) for f in names
                if not f.startswith(".") and f.lower().endswith(extensions)
            )
        found.sort()
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise InputError(
            f"ImageFolderSource: no images found in {root}; expected "
            f"root/<class_name>/<image files> with extensions {list(extensions)} "
            f"(class folders found: {classes})"
        )
    return classes, files, labels


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of one image, read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"ImageFolderSource: cannot read image {path}: {error}") from None
    return height, width


def _check_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"ImageFolderSource: size must be (height, width), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise InputError(f"ImageFolderSource: size must be positive, got {size!r}")
    return height, width
