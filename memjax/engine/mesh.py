"""Device mesh over every global device: axis ``data`` (examples) and ``model`` (params)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from memjax.data.base import path_name  # noqa: F401 - re-exported
from memjax.errors import InputError

DATA_AXIS = "data"
MODEL_AXIS = "model"

# A partition rule maps a regular expression over a parameter's path ("layers/0/kernel")
# to the PartitionSpec of that parameter. The first rule whose pattern matches wins;
# parameters that no rule matches are replicated.
PartitionRules = Sequence[tuple[str, PartitionSpec]]


def make_mesh(model: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh ``(data, model)`` over ``devices`` (default: every global device).

    Args:
      model: size of the ``model`` axis (params sharded over it by partition rules);
        the rest of the devices form the ``data`` axis that examples are split over.
      devices: the devices to use; every process must pass the same global list.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``("data", "model")`` and Auto axis types.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise InputError("devices: expected at least one device, got an empty list")
    if model < 1 or len(devices) % model:
        raise InputError(
            f"model={model}: expected a positive divisor of the number of devices "
            f"({len(devices)})"
        )
    return jax.make_mesh(
        (len(devices) // model, model),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def param_shardings(params: Any, mesh: Mesh, rules: PartitionRules | None = None) -> Any:
    """A pytree of ``NamedSharding`` for ``params``: by the first matching rule, else replicated.

    A dimension that the rule's mesh axes do not divide evenly stays replicated.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in (rules or ())]

    def sharding_for(path, leaf):
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if len(spec) > np.ndim(leaf):
                    raise InputError(
                        f"partition rule {pattern.pattern!r} -> {spec} has more axes than "
                        f"parameter {name!r} of shape {np.shape(leaf)}"
                    )
                return NamedSharding(mesh, _divisible(spec, np.shape(leaf), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding_for, params)


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` with dimensions that the named mesh axes do not divide left replicated
    (e.g. GPT-2's 50,257-token vocabulary over an even ``model`` axis)."""
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                         strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        entries.append(axes if dim % size == 0 else None)
    return PartitionSpec(*entries)


def place_params(params: Any, shardings: Any) -> Any:
    """Put params on the mesh; host arrays are placed shard by shard (works multi-host)."""

    def place(leaf, sharding):
        if isinstance(leaf, jax.Array):
            if leaf.sharding == sharding:
                return leaf
            if leaf.is_fully_addressable:
                return jax.device_put(leaf, sharding)
            raise InputError(
                "params: a parameter is a global array with a different sharding than the "
                "partition rules ask for; pass host (NumPy) params or params placed by the rules"
            )
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params, shardings)
