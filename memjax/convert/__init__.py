"""Checkpoint folders -> memjax models, and the one on-disk model format.

- :func:`load` (``memjax.load``): any model folder memjax understands -> :class:`memjax.Model`.
- :func:`load_pretrained`: a Hugging Face folder (config.json + safetensors, single or
  sharded) -> (NNX module, config), reporting every missing, unexpected or mis-shaped
  tensor; :func:`save` / :func:`restore` round-trip ported modules (``memjax convert``).
- :mod:`memjax.convert.saved`: the folder format every model memjax writes uses.
"""

from memjax.convert.checkpoint import TensorReader, read_config, read_tensors
from memjax.convert.core import (
    ARCHITECTURES,
    Architecture,
    check_config,
    from_torch_state_dict,
    load_pretrained,
    partition_rules,
    register,
)
from memjax.convert.loading import from_port, interface, load, pipeline_component
from memjax.convert.orbax_io import cast, is_converted, restore, save
from memjax.convert.saved import is_model_folder, read_meta, write_model

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "TensorReader",
    "cast",
    "check_config",
    "from_port",
    "pipeline_component",
    "from_torch_state_dict",
    "interface",
    "is_converted",
    "is_model_folder",
    "load",
    "load_pretrained",
    "partition_rules",
    "read_config",
    "read_meta",
    "read_tensors",
    "register",
    "restore",
    "save",
    "write_model",
]
