"""``load_pretrained``: a checkpoint folder -> a memjax Flax NNX model, strictly and lazily.

The architectures register themselves in :mod:`memjax.models.registry` (config guard, key
map, partition rules); this module opens the folder's tensors unread
(:func:`memjax.convert.checkpoint.open_tensors`), lets the architecture's converter map
them to parameter paths (transposes and unit-axis reshapes stay lazy views), and fills the
module's parameters one tensor at a time: whole onto the default device, or, with a mesh,
each block straight onto the device that holds it, read from the file and nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from memjax.convert.checkpoint import TensorReader, open_tensors, read_config
from memjax.models.registry import (  # noqa: F401 - the registry's names, as before
    ARCHITECTURES,
    COMMON_DEFAULTS,
    NEUTRAL_CONFIG_KEYS,
    Architecture,
    architecture_of,
    check_config,
    detect_architecture,
    fill_params,
    param_shardings,
    partition_rules,
    register,
    tree_size,
)


def load_pretrained(path: str | Path, *, dtype: Any = jnp.float32, allow_pickle: bool = False,
                    mesh: Mesh | None = None) -> tuple[nnx.Module, Any]:
    """Load a Hugging Face checkpoint folder (or one written by memjax convert).

    Args:
      path: folder with config.json and model.safetensors (or a sharded index).
      dtype: parameter dtype of the returned model (float32, bfloat16, float16).
      allow_pickle: accept .bin/.pt weights (loaded with torch.load(weights_only=True)).
      mesh: a mesh with a ``model`` axis (``memjax.engine.make_mesh(model=N)``): every
        parameter is created directly with the sharding the architecture's partition
        rules give it (what ``memjax.engine.score`` would place it on), and each process
        reads from the checkpoint only the blocks its own devices hold. Every process of
        a multi-host run calls this with the same mesh. None: unsharded, on the default
        device.

    Returns:
      (model, config): the Flax NNX module (its params ``jax.Array``s, sharded over
      ``mesh`` when given) and the port's config dataclass.
    """
    import memjax.models  # noqa: F401 - registers the architectures

    hf_config = read_config(path)
    arch = detect_architecture(hf_config)
    config = arch.from_hf_config(hf_config)
    reader = TensorReader(open_tensors(path, allow_pickle=allow_pickle), ignore=arch.ignore)
    config = arch.refine_config(config, frozenset(reader.tensors))
    params = arch.convert(reader, config)
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    rules = arch.partition_rules(config) if mesh is not None else ()
    module = fill_params(abstract, params, reader, dtype, arch.name, mesh=mesh, rules=rules)
    return module, config


def from_torch_state_dict(state_dict: dict[str, Any], config: Any, *,
                          dtype: Any = jnp.float32, mesh: Mesh | None = None) -> nnx.Module:
    """A module of the architecture registered for ``config`` with PyTorch weights
    (tensors or arrays by key, e.g. a CIFAR ResNet's ``state_dict()``), strictly: every
    missing, unexpected or mis-shaped tensor is reported in one InputError. ``mesh``: as
    in :func:`load_pretrained`."""
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
    rules = arch.partition_rules(config) if mesh is not None else ()
    return fill_params(abstract, params, reader, dtype, arch.name, mesh=mesh, rules=rules)
