"""Reading Hugging Face checkpoint folders: config.json and weights, strictly and lazily.

Weights come from ``model.safetensors`` (or several ``*.safetensors``) or a sharded
``model.safetensors.index.json``. :func:`open_tensors` parses only the files' headers and
hands out a :class:`LazyTensor` per key: its shape and dtype, and a read of any block of it
(``tensor[index]``). A read fetches exactly the bytes of that block with ``pread`` into a
fresh buffer, so a host that holds a quarter of a parameter reads a quarter of it, and no
file page is mapped into the process (``safetensors.safe_open(...).get_slice`` reads through
``mmap``: every page it touches counts in the process's RSS until the file is closed, so
reading each host's slices that way costs as much resident memory as the slices again;
measured, reading half of every tensor of a 513 MiB checkpoint into arrays: +607 MiB peak
RSS through ``get_slice``, +256 MiB with ``pread``).

Converters transpose and drop unit axes (PyTorch Linear ``[out, in]`` -> ``[in, out]``,
Conv2d OIHW -> HWIO, ViT's ``[1, 1, D]`` CLS token): a :class:`LazyTensor` records those
as a view and maps a block of the view back to a block of the stored tensor. Any other
reshape is recorded too and is then read whole (one tensor, when placed); any other NumPy
function (``np.array_equal``, ``np.concatenate``) reads the whole tensor through
``__array__`` at that point, as an eager array would.

Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) can run arbitrary code when loaded, so
they are refused unless the caller passes ``allow_pickle=True``; then they are loaded
(whole, eagerly) with ``torch.load(weights_only=True)``. bf16/fp16 tensors keep their dtype
(NumPy dtypes from ml_dtypes) until the model casts them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from memjax.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# safetensors dtype names -> NumPy dtypes (the format is little-endian).
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# A header larger than this is refused before it is read (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000


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


# --------------------------------------------------------------------------- safetensors


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: C-order bytes from ``offset``."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of element 0 in the file


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, from its header alone (no tensor data read).

    Format: an 8-byte little-endian header length N, N bytes of JSON mapping each key to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte
    buffer after the header), then the buffer. Every entry is checked against the file size.
    """
    if not file.is_file():
        raise InputError(f"checkpoint shard {str(file)!r} is missing")
    size = file.stat().st_size

    def bad(why: str) -> InputError:
        return InputError(f"{str(file)!r} is not a readable safetensors file: {why}")

    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise bad("shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start, entries = 8 + length, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r}: expected a known dtype (one of "
                      f"{sorted(SAFETENSORS_DTYPES)}), a shape and data_offsets, got "
                      f"{info!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 \
                or start + end > size:
            raise bad(f"tensor {key!r}: shape {shape} of {info['dtype']} needs {nbytes} "
                      f"bytes; data_offsets {[begin, end]} (file of {size} bytes)")
        entries[key] = StoredTensor(file, dtype, shape, start + begin)
    return entries


def _read_exact(handle: Any, buffer: memoryview, offset: int, file: Path) -> None:
    """Fill ``buffer`` from ``offset`` of an open file (``preadv`` where the OS has it)."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            got = os.preadv(handle.fileno(), [buffer[done:]], offset + done)
        else:  # e.g. Windows
            handle.seek(offset + done)
            got = handle.readinto(buffer[done:])
        if not got:
            raise InputError(f"{str(file)!r} ended early (truncated checkpoint?)")
        done += got


# Blocks at least this large get their own anonymous memory map rather than malloc memory.
MMAP_BYTES = 1 << 18


def _host_buffer(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array for a block read; large ones in their own anonymous mmap.

    Why not ``np.empty``: glibc's malloc raises its mmap threshold (up to 32 MiB) each
    time a large block it mapped is freed, so after the first tensor is placed the next
    read buffers come from the heap, interleave there with the device buffers XLA:CPU
    allocates, and are never returned: measured +130-190 MiB of resident free memory on a
    513 MiB load (1.35x the checkpoint; 1.00x with these buffers). An anonymous map is
    unmapped as soon as the array (or the device buffer aliasing it) is gone.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MMAP_BYTES:
        return np.empty(shape, dtype)
    populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at once
    if populate:  # (a third faster than touching them one by one while reading)
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    else:
        memory = mmap.mmap(-1, nbytes)
    return np.frombuffer(memory, dtype).reshape(shape)


def read_block(stored: StoredTensor, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block ``[start, stop)`` per axis of a stored tensor, read with ``pread``.

    The block is read as runs of contiguous bytes: the trailing axes the block spans
    whole, plus the last axis it cuts, form one run; one ``pread`` per index of the
    leading axes. A row block of a C-order matrix is one read; a column block is one
    read per row.
    """
    out = _host_buffer([stop - start for start, stop in bounds], stored.dtype)
    if out.size == 0:
        return out
    shape, itemsize = stored.shape, stored.dtype.itemsize
    strides = [itemsize * math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    cut = len(shape) - 1  # the last axis the block does not span whole
    while cut > 0 and bounds[cut] == (0, shape[cut]):
        cut -= 1
    run = itemsize * math.prod(out.shape[max(cut, 0):])
    base = stored.offset + sum(start * stride for (start, _), stride in zip(bounds, strides,
                                                                            strict=True))
    raw = memoryview(out.reshape(-1).view(np.uint8))
    with open(stored.file, "rb", buffering=0) as handle:
        for n, outer in enumerate(np.ndindex(*out.shape[:max(cut, 0)])):
            offset = base + sum(i * s for i, s in zip(outer, strides, strict=False))
            _read_exact(handle, raw[n * run:(n + 1) * run], offset, stored.file)
    return out


class LazyTensor:
    """A checkpoint tensor not yet read: ``shape``, ``dtype``, ``key``, and ``tensor[index]``.

    A view of the stored tensor through transposes and unit-axis reshapes (``axes[j]`` is
    the stored axis that view axis ``j`` shows, or None for an inserted unit axis; stored
    axes not shown have size 1). ``tensor[block]`` with a tuple of unit-step slices reads
    just that block (``sliceable``). Other reshapes are recorded in ``deferred`` and read
    the whole tensor; ``np.asarray(tensor)`` reads it whole.
    """

    def __init__(self, stored: StoredTensor, key: str, axes: tuple[int | None, ...] | None = None,
                 deferred: tuple[tuple[str, tuple[int, ...]], ...] = (),
                 shape: tuple[int, ...] | None = None):
        self.stored, self.key = stored, key
        self.axes = tuple(range(len(stored.shape))) if axes is None else tuple(axes)
        self.deferred = deferred
        self.shape = tuple(shape) if shape is not None else tuple(
            1 if a is None else stored.shape[a] for a in self.axes)

    # ------------------------------------------------------------------ array-like
    @property
    def dtype(self) -> np.dtype:
        return self.stored.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def sliceable(self) -> bool:
        """Whether a block of this view is read as a block of the stored tensor."""
        return not self.deferred

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype)

    # ------------------------------------------------------------------ views
    @property
    def T(self) -> LazyTensor:  # noqa: N802 - NumPy's name
        return self.transpose()

    def transpose(self, *axes: Any) -> LazyTensor:
        """``np.transpose`` semantics: no axes reverses them; a tuple or varargs permute."""
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = axes[0]
        perm = tuple(range(self.ndim))[::-1] if axes is None or axes == () else \
            tuple(int(a) % self.ndim if self.ndim else int(a) for a in axes)
        if sorted(perm) != list(range(self.ndim)):
            raise ValueError(f"axes {axes} don't match a tensor of shape {self.shape}")
        shape = tuple(self.shape[p] for p in perm)
        if self.deferred:
            return self._defer(("transpose", perm), shape)
        return LazyTensor(self.stored, self.key, tuple(self.axes[p] for p in perm))

    def reshape(self, *shape: Any) -> LazyTensor:
        """A reshape that only adds or drops unit axes stays a view; others are deferred."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = _resolve_shape(tuple(int(d) for d in shape), self.shape)
        mapped = _unit_reshape(self.axes, self.shape, shape)
        if self.deferred or mapped is None:
            return self._defer(("reshape", shape), shape)
        return LazyTensor(self.stored, self.key, mapped)

    def _defer(self, op: tuple[str, tuple[int, ...]], shape: tuple[int, ...]) -> LazyTensor:
        return LazyTensor(self.stored, self.key, self.axes, (*self.deferred, op), shape)

    # ------------------------------------------------------------------ reading
    def __getitem__(self, index: Any) -> np.ndarray:
        """The block ``index`` of this view as a NumPy array (reads only that block when
        ``index`` is a tuple of unit-step slices and the view is ``sliceable``)."""
        index = index if isinstance(index, tuple) else (index,)
        bounds = _slice_bounds(index, self.shape)
        if self.deferred:
            return self._read_deferred()[index]
        if bounds is None:  # integers, steps, Ellipsis: read the whole view, index it
            return self._read_view(tuple((0, d) for d in self.shape))[index]
        return self._read_view(bounds)

    def _read_view(self, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        """Block ``bounds`` (one per view axis, before deferred ops) of the view."""
        shape = [stop - start for start, stop in bounds]
        if 0 in shape:  # (an empty block of an inserted unit axis has no stored block)
            return np.empty(shape, self.dtype)
        stored_bounds = [(0, 1)] * len(self.stored.shape)
        for view_axis, axis in enumerate(self.axes):
            if axis is not None:
                stored_bounds[axis] = bounds[view_axis]
        block = read_block(self.stored, tuple(stored_bounds))
        shown = sorted(a for a in self.axes if a is not None)
        block = block.reshape([block.shape[a] for a in shown])
        block = block.transpose([shown.index(a) for a in self.axes if a is not None])
        return block.reshape(shape)

    def _read_deferred(self) -> np.ndarray:
        shape = tuple(1 if a is None else self.stored.shape[a] for a in self.axes)
        value = self._read_view(tuple((0, d) for d in shape))
        for op, arg in self.deferred:
            value = value.transpose(arg) if op == "transpose" else value.reshape(arg)
        return value


def _resolve_shape(shape: tuple[int, ...], old: tuple[int, ...]) -> tuple[int, ...]:
    size = math.prod(old)
    if shape.count(-1) == 1:
        known = math.prod(d for d in shape if d != -1)
        if known and size % known == 0:
            shape = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(shape) != size or any(d < 0 for d in shape):
        raise ValueError(f"cannot reshape a tensor of shape {old} into shape {shape}")
    return shape


def _unit_reshape(axes: tuple[int | None, ...], old: tuple[int, ...],
                  new: tuple[int, ...]) -> tuple[int | None, ...] | None:
    """The view axes of ``new`` when it only adds or drops unit axes of ``old``, else None."""
    kept = [a for a, d in zip(axes, old, strict=True) if d != 1]
    if [d for d in old if d != 1] != [d for d in new if d != 1]:
        return None
    it = iter(kept)
    return tuple(None if d == 1 else next(it) for d in new)


def _slice_bounds(index: tuple[Any, ...], shape: tuple[int, ...]
                  ) -> tuple[tuple[int, int], ...] | None:
    """``[start, stop)`` per axis for a tuple of unit-step slices, else None."""
    if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
        return None
    bounds = []
    for axis, dim in enumerate(shape):
        s = index[axis] if axis < len(index) else slice(None)
        start, stop, step = s.indices(dim)
        if step != 1:
            return None
        bounds.append((start, max(start, stop)))
    return tuple(bounds)


def _safetensors_tensors(files: Iterable[Path]) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for file in files:
        for key, stored in read_header(file).items():
            tensors[key] = LazyTensor(stored, key)
    return tensors


def torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


#: Where training checkpoints nest their weights, in the order a state dict is looked for
#: (LlamaGen's sample script reads "model", then "module", then "state_dict").
STATE_DICT_KEYS = ("model", "module", "state_dict")


def _state_dict(state: Any, file: Path) -> dict[str, Any]:
    """The tensors of a loaded pickle: a state dict, or one nested under
    :data:`STATE_DICT_KEYS` (a training checkpoint that also holds optimizer state)."""
    import torch

    def is_state_dict(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(
            isinstance(v, torch.Tensor) for v in value.values())

    if is_state_dict(state):
        return state
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if is_state_dict(state.get(key)):
                return state[key]
    raise InputError(f"{str(file)!r}: expected a state dict of tensors, or a checkpoint "
                     f"holding one under one of {list(STATE_DICT_KEYS)}")


def _read_pickled(files: list[Path]) -> dict[str, np.ndarray]:
    import pickle

    import torch

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # weights_only refuses arbitrary objects (e.g. LlamaGen's training checkpoints
            # keep an argparse.Namespace beside the weights): never unpickle code.
            raise InputError(f"{str(file)!r}: holds objects other than tensors, which memjax "
                             "does not unpickle (weights_only). Re-save just the weights, "
                             "e.g. torch.save(checkpoint['model'], 'model.pt'), or convert "
                             f"them to safetensors ({str(error).splitlines()[0]})") from None
        tensors.update({k: torch_to_numpy(v) for k, v in _state_dict(state, file).items()})
    return tensors


def open_tensors(folder: str | Path, *, allow_pickle: bool = False
                 ) -> dict[str, LazyTensor | np.ndarray]:
    """Every weight tensor of a checkpoint folder by its Hugging Face key, unread.

    safetensors weights (``model.safetensors.index.json`` with its shards, else every
    ``*.safetensors``) come back as :class:`LazyTensor` (headers read, data not); pickled
    weights, only with ``allow_pickle``, as NumPy arrays (read whole).
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{str(index)!r}: expected a 'weight_map' of tensor -> shard file")
        tensors = _safetensors_tensors(sorted({folder / f for f in weight_map.values()}))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise InputError(f"{str(index)!r} lists tensors that its shards lack: {missing[:10]}")
        return tensors
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return _safetensors_tensors(safetensors)
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


def read_tensors(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every weight tensor of a checkpoint folder, by its Hugging Face key, read whole."""
    return {key: np.asarray(value)
            for key, value in open_tensors(folder, allow_pickle=allow_pickle).items()}


class TensorReader:
    """Hands out checkpoint tensors by key and remembers what was asked for.

    A converter reads every tensor it needs with :meth:`take` (a :class:`LazyTensor` or an
    array); afterwards :meth:`problems` lists keys that were asked for but absent (missing)
    and keys never asked for (unexpected), so a load reports every problem at once.
    """

    def __init__(self, tensors: dict[str, Any], *, ignore: Iterable[str] = ()):
        self.tensors = tensors
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.ignore = tuple(ignore)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> Any:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.tensors[key]

    def key_of(self, value: Any) -> str | None:
        """The checkpoint key an array (or a view of it, e.g. a transpose) came from."""
        if isinstance(value, LazyTensor):
            return value.key
        if not isinstance(value, np.ndarray):
            return None
        # Views (transposes, reshapes) share the tensor's memory; only used for messages.
        for key, array in self.tensors.items():
            if isinstance(array, np.ndarray) and array.size == value.size \
                    and np.may_share_memory(array, value):
                return key
        return None

    def unexpected(self) -> list[str]:
        return sorted(k for k in self.tensors if k not in self.used
                      and not any(re.search(p, k) for p in self.ignore))
