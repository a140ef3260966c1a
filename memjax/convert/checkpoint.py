"""Reading Hugging Face checkpoint folders: config.json and weights, strictly.

Weights come from ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) can run arbitrary code when loaded, so
they are refused unless the caller passes ``allow_pickle=True``; then they are loaded with
``torch.load(weights_only=True)``. bf16/fp16 tensors keep their dtype (NumPy dtypes from
ml_dtypes) until the model casts them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy for safetensors
import numpy as np

from memjax.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict; names the folder if it is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model path {str(folder)!r}: expected a checkpoint folder with "
                         "config.json and *.safetensors")
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"model path {str(folder)!r}: no config.json (expected a Hugging Face "
                         "checkpoint folder, or one written by memjax convert)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{str(path)!r} is not valid JSON: {err}") from None


def _read_safetensors(files: Iterable[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise InputError(f"checkpoint shard {str(file)!r} is missing")
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    tensors[key] = f.get_tensor(key)
        except InputError:
            raise
        except Exception as err:  # safetensors raises its own error types
            raise InputError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    return tensors


def torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_pickled(files: list[Path]) -> dict[str, np.ndarray]:
    import torch

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise InputError(f"{str(file)!r}: expected a state dict of tensors")
        tensors.update({k: torch_to_numpy(v) for k, v in state.items()})
    return tensors


def read_tensors(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every weight tensor of a checkpoint folder, by its Hugging Face key."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{str(index)!r}: expected a 'weight_map' of tensor -> shard file")
        tensors = _read_safetensors(sorted({folder / f for f in weight_map.values()}))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise InputError(f"{str(index)!r} lists tensors that its shards lack: {missing[:10]}")
        return tensors
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return _read_safetensors(safetensors)
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        if not allow_pickle:
            raise InputError(
                f"model path {str(folder)!r} has only pickled weights "
                f"({', '.join(p.name for p in pickled)}); pickles can run code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True (loaded with "
                "torch.load(weights_only=True))"
            )
        return _read_pickled(pickled)
    raise InputError(f"model path {str(folder)!r}: no *.safetensors weights found")


class TensorReader:
    """Hands out checkpoint tensors by key and remembers what was asked for.

    A converter reads every tensor it needs with :meth:`take`; afterwards
    :meth:`problems` lists keys that were asked for but absent (missing) and keys never
    asked for (unexpected), so a load reports every problem at once.
    """

    def __init__(self, tensors: dict[str, np.ndarray], *, ignore: Iterable[str] = ()):
        self.tensors = tensors
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.ignore = tuple(ignore)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> np.ndarray | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.tensors[key]

    def key_of(self, value: Any) -> str | None:
        """The checkpoint key an array (or a view of it, e.g. a transpose) came from."""
        if not isinstance(value, np.ndarray):
            return None
        # Views (transposes, reshapes) share the tensor's memory; only used for messages.
        for key, array in self.tensors.items():
            if array.size == value.size and np.may_share_memory(array, value):
                return key
        return None

    def unexpected(self) -> list[str]:
        import re

        return sorted(k for k in self.tensors if k not in self.used
                      and not any(re.search(p, k) for p in self.ignore))
