"""Data sources: random access to examples, read in batches (see :mod:`memjax.data.base`).

Sources: :class:`ArraySource` (arrays in memory or memory-mapped), :func:`memmap_source`
(``.npy`` folders, ``.npz`` files), :func:`digits` (bundled default data),
:class:`TFDSSource` (prepared ArrayRecord TFDS datasets, no TensorFlow needed),
:class:`ImageFolderSource` (with or without class folders), :class:`PairsSource`
(image-caption JSONL/CSV/TSV), :class:`WebDatasetSource` (tar shards, random access) and
:class:`JsonlTextSource`. :func:`open_source` turns the CLI's data argument into one,
prepared for a model: :class:`ImageProcessor` reproduces a checkpoint's
``preprocessor_config.json``, :class:`TextTokens` its tokenizer. :func:`decode_image` is
how every image source reads an image file; :func:`grain_source` hands a source to grain.
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
    numeric_fields,
    source_ids,
    stack_records,
)
from memjax.data.images import IMAGE_EXTENSIONS, ImageFolderSource, ImageLoader, decode_image
from memjax.data.open import FORMS, grain_source, open_source
from memjax.data.pairs import PairsSource
from memjax.data.preprocess import PROCESSOR_DEFAULTS, ImageProcessor
from memjax.data.text import (
    DOCSTRING_TOPICS,
    JsonlTextSource,
    TextTokens,
    load_tokenizer,
    stdlib_docstrings,
    stdlib_docstrings_by_module,
    tokenizer_spec,
)
from memjax.data.tfds_source import TFDSSource
from memjax.data.webdataset import WebDatasetSource, expand_braces

__all__ = [
    "DOCSTRING_TOPICS",
    "FORMS",
    "ID_FIELD",
    "IMAGE_EXTENSIONS",
    "PROCESSOR_DEFAULTS",
    "ArraySource",
    "ImageFolderSource",
    "ImageLoader",
    "ImageProcessor",
    "JsonlTextSource",
    "PairsSource",
    "RandomAccessSource",
    "Source",
    "TFDSSource",
    "TextTokens",
    "WebDatasetSource",
    "as_source",
    "decode_image",
    "digits",
    "example_ids",
    "expand_braces",
    "grain_source",
    "hash_array",
    "load_tokenizer",
    "memmap_source",
    "numeric_fields",
    "open_source",
    "source_ids",
    "stack_records",
    "stdlib_docstrings",
    "stdlib_docstrings_by_module",
    "tokenizer_spec",
]
