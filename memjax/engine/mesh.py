"""Device mesh over every global device: axis ``data`` (examples) and ``model`` (params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from memjax.data.base import path_name  # noqa: F401 - re-exported
from memjax.errors import InputError
from memjax.models.registry import param_shardings  # noqa: F401 - re-exported

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
