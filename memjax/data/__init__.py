"""Data sources: random access to examples, read in batches (see :mod:`memjax.data.base`).

Sources: :class:`ArraySource` (arrays in memory or memory-mapped), :func:`memmap_source`
(``.npy`` folders, ``.npz`` files), :func:`digits` (bundled default data),
:class:`TFDSSource` (prepared ArrayRecord TFDS datasets, no TensorFlow needed),
:class:`ImageFolderSource` and :class:`JsonlTextSource`. :func:`open_source` turns the
CLI's data argument into one; :func:`grain_source` hands one to grain.
"""

from memjax.data.arrays import digits, memmap_source
from memjax.data.base import (
    ID_FIELD,
    ArraySource,
    RandomAccessSource,
    Source,
    as_source,
    example_ids,
    hash_array,
    source_ids,
    stack_records,
)
from memjax.data.images import IMAGE_EXTENSIONS, ImageFolderSource
from memjax.data.open import FORMS, grain_source, open_source
from memjax.data.text import JsonlTextSource, stdlib_docstrings
from memjax.data.tfds_source import TFDSSource

__all__ = [
    "FORMS",
    "ID_FIELD",
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "ImageFolderSource",
    "JsonlTextSource",
    "RandomAccessSource",
    "Source",
    "TFDSSource",
    "as_source",
    "digits",
    "example_ids",
    "grain_source",
    "hash_array",
    "memmap_source",
    "open_source",
    "source_ids",
    "stack_records",
    "stdlib_docstrings",
]
