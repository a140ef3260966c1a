"""``load_pretrained``: a checkpoint folder -> a memjax Flax NNX model, strictly.

The architectures register themselves in :mod:`memjax.models.registry` (config guard, key
map, partition rules); this module reads the folder and fills the module's parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from memjax.convert.checkpoint import TensorReader, read_config, read_tensors
from memjax.models.registry import (  # noqa: F401 - the registry's names, as before
    ARCHITECTURES,
    COMMON_DEFAULTS,
    NEUTRAL_CONFIG_KEYS,
    Architecture,
    architecture_of,
    check_config,
    detect_architecture,
    fill_params,
    partition_rules,
    register,
    tree_size,
)


def load_pretrained(path: str | Path, *, dtype: Any = jnp.float32,
                    allow_pickle: bool = False) -> tuple[nnx.Module, Any]:
    """Load a Hugging Face checkpoint folder (or one written by memjax convert).

    Args:
      path: folder with config.json and model.safetensors (or a sharded index).
      dtype: parameter dtype of the returned model (float32, bfloat16, float16).
      allow_pickle: accept .bin/.pt weights (loaded with torch.load(weights_only=True)).

    Returns:
      (model, config): the Flax NNX module and the port's config dataclass.
    """
    import memjax.models  # noqa: F401 - registers the architectures

    hf_config = read_config(path)
    arch = detect_architecture(hf_config)
    config = arch.from_hf_config(hf_config)
    reader = TensorReader(read_tensors(path, allow_pickle=allow_pickle), ignore=arch.ignore)
    config = arch.refine_config(config, frozenset(reader.tensors))
    params = arch.convert(reader, config)
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    return fill_params(abstract, params, reader, dtype, arch.name), config


def from_torch_state_dict(state_dict: dict[str, Any], config: Any, *,
                          dtype: Any = jnp.float32) -> nnx.Module:
    """A module of the architecture registered for ``config`` with PyTorch weights
    (tensors or arrays by key, e.g. a CIFAR ResNet's ``state_dict()``), strictly: every
    missing, unexpected or mis-shaped tensor is reported in one InputError."""
    import numpy as np

    from memjax.convert.checkpoint import torch_to_numpy

    arch = architecture_of(config)
    # Copy: NumPy views of torch tensors (and jnp arrays made from them on CPU) would
    # otherwise share memory with a module whose statistics PyTorch updates in place.
    tensors = {k: np.array(torch_to_numpy(v) if hasattr(v, "detach") else v, copy=True)
               for k, v in state_dict.items()}
    reader = TensorReader(tensors, ignore=arch.ignore)
    config = arch.refine_config(config, frozenset(tensors))
    params = arch.convert(reader, config)
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    return fill_params(abstract, params, reader, dtype, arch.name)
