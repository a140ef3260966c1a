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
