"""Hugging Face checkpoints -> memjax Flax NNX models, and orbax save/restore.

``load_pretrained(path)`` reads config.json + safetensors (single or sharded), detects the
architecture, maps keys and layouts, and reports every missing, unexpected or mis-shaped
tensor; ``save``/``restore`` round-trip converted models through orbax-checkpoint.
"""

from memjax.convert.checkpoint import TensorReader, read_config, read_tensors
from memjax.convert.core import (
    ARCHITECTURES,
    Architecture,
    check_config,
    load_pretrained,
    partition_rules,
    register,
)
from memjax.convert.orbax_io import cast, is_converted, restore, save


def load(path, **kwargs):
    """A model from a converted folder (memjax convert) or a Hugging Face folder."""
    if is_converted(path):
        return restore(path, dtype=kwargs.get("dtype"))
    return load_pretrained(path, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "TensorReader",
    "cast",
    "check_config",
    "is_converted",
    "load",
    "load_pretrained",
    "partition_rules",
    "read_config",
    "read_tensors",
    "register",
    "restore",
    "save",
]
