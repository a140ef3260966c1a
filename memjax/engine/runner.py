"""The sharded scoring runner: one example's score function -> scores for a whole source.

``score`` vmaps a per-example function, splits each fixed-size batch over the mesh's
``data`` axis, jits once per (function, shapes, shardings) and reuses the compiled
executable for every full and padded batch, streams batches from the source with
grain's threaded prefetch, and either returns the scores in example order or writes them
chunk by chunk to a resumable :class:`~memjax.engine.store.ScoreStore`.

Multi-host (``jax.distributed``): every process runs the same call; each reads only its
own rows of each global batch and builds global arrays with
``jax.make_array_from_process_local_data``. Outputs are replicated (they are small:
per-example scalars or short vectors), so every process can return them; process 0
writes the store.

Length buckets: a score function over sequences may declare its :class:`SequenceLayout`
(``fn.sequence_layout``). The runner then reads batches in windows sorted by length, so
each batch holds sequences of similar length, trims the batch's sequence fields to the
smallest bucket (``quantum * 2**k``, or the source's length) that holds its longest real
sequence, and pads the per-position outputs back with zeros: a corpus of mostly short
texts at a long ``max_length`` no longer spends most of its work on padding. Scores come
back and are stored in source order.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memjax._checks import check_positive_int, to_device_dtype
from memjax.data.base import (
    ID_FIELD,
    ArraySource,
    SliceSource,
    Source,
    as_source,
    example_ids,
    integer_ids,
    source_ids,
)
from memjax.engine.cache import value_key
from memjax.engine.fingerprint import describe_function, run_fingerprint
from memjax.engine.mesh import (
    DATA_AXIS,
    PartitionRules,
    make_mesh,
    param_shardings,
    path_name,
    place_params,
)
from memjax.engine.progress import Progress
from memjax.engine.store import ID_COLUMN, ScoreStore
from memjax.errors import InputError

ScoreFn = Callable[[Any, dict[str, jax.Array]], Any]
# Called on the host with each batch's real rows (fields, example indices); raises
# InputError for bad values that cannot be checked inside jit (e.g. labels out of range).
Validator = Callable[[dict[str, np.ndarray], np.ndarray], None]

# Compiled executables by (function, shapes, shardings, mesh), least recently used first;
# bounded so a long session scoring many functions does not keep every executable alive.
_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_MAX_COMPILED = 64
_CACHE_STATS = {"compiles": 0, "hits": 0}


def compile_cache_info() -> dict[str, int]:
    """How many score executables were compiled and how often a cached one was reused."""
    return dict(_CACHE_STATS, size=len(_COMPILED))


def clear_compile_cache() -> None:
    _COMPILED.clear()
    _CACHE_STATS.update(compiles=0, hits=0)


#: Batches read and sorted by length together (never across a store chunk): enough for
#: homogeneous batches, few enough that the window's fields fit in host memory.
SORT_WINDOW_BATCHES = 16


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where a score function's inputs and outputs run along a sequence axis, so the engine
    may run a batch at a shorter length (a *bucket*) than the source's and get the same
    scores (``score(..., length_buckets=True)``).

    The function declares it as ``fn.sequence_layout`` and promises, per example of
    ``length`` real tokens (right-padded to ``T``): its outputs do not change when the
    sequence fields are cut to any ``bucket`` in ``[length, T]`` (a causal model: nothing
    reads a later position, and an output that would, such as the last real token's
    next-token log-probability, is set to 0 there), and each per-position output is 0
    (False) at every position ``>= length``. The engine then pads the trimmed outputs
    back with zeros and gets the untrimmed run's values, up to float summation order.

    Attributes:
      fields: example fields whose first axis (after the batch axis) is the position
        ``[T]``; trimmed to ``[bucket]``.
      length_field: the attention mask among ``fields`` (nonzero = real token). Only
        right padding (``1..1 0..0``) is trimmed: a batch with any other row (left
        padding) runs at full length.
      outputs: output names (as :func:`score` returns them) whose first axis is the
        position; padded back from ``[bucket]`` to ``[T]`` with zeros.
      quantum: the smallest bucket; buckets are ``quantum * 2**k`` below ``T``, and
        ``T``, so at most ``log2(T / quantum) + 1`` programs compile.
    """

    fields: tuple[str, ...]
    length_field: str
    outputs: tuple[str, ...]
    quantum: int = 64

    def __post_init__(self):
        check_positive_int(self.quantum, "SequenceLayout.quantum")
        if self.length_field not in self.fields:
            raise InputError(f"SequenceLayout.length_field={self.length_field!r}: expected one "
                             f"of its fields {list(self.fields)}")


def bucket_length(longest: int, full: int, quantum: int) -> int:
    """The smallest of ``quantum * 2**k`` (below ``full``) and ``full`` that is >= ``longest``."""
    length = quantum
    while length < longest:
        length *= 2
    return min(length, full)


def right_padded_lengths(mask: np.ndarray) -> np.ndarray | None:
    """[B] real tokens per row of ``mask`` [B, T] when every row is ``1..1 0..0`` (right
    padding, nonzero = real), else None."""
    real = np.asarray(mask) != 0
    lengths = real.sum(axis=1)
    if not np.array_equal(real, np.arange(real.shape[1])[None, :] < lengths[:, None]):
        return None
    return lengths


def _sequence_fields(fields: dict[str, np.ndarray], layout: SequenceLayout) -> int | None:
    """The batch's sequence length T when every layout field is there as [B, T, ...]."""
    lengths = {fields[k].shape[1] if k in fields and fields[k].ndim >= 2 else None
               for k in (*layout.fields, layout.length_field)}
    return lengths.pop() if len(lengths) == 1 else None


def trim_to_bucket(fields: dict[str, np.ndarray], layout: SequenceLayout
                   ) -> tuple[dict[str, np.ndarray], int | None]:
    """(fields with the sequence fields cut to the batch's bucket, the untrimmed length T)
    or (fields, None) when they run untrimmed: no shorter bucket holds the longest row,
    a field is missing, or a row is not right-padded."""
    full = _sequence_fields(fields, layout)
    if full is None:
        return fields, None
    lengths = right_padded_lengths(fields[layout.length_field])
    if lengths is None:
        return fields, None
    length = bucket_length(int(lengths.max(initial=1)), full, layout.quantum)
    if length >= full:
        return fields, None
    return {k: v[:, :length] if k in layout.fields else v for k, v in fields.items()}, full


def pad_positions(outputs: dict[str, np.ndarray], layout: SequenceLayout, length: int,
                  full: int) -> dict[str, np.ndarray]:
    """Per-position outputs [B, length, ...] -> [B, full, ...], zeros after ``length``."""
    padded = dict(outputs)
    for name in layout.outputs:
        value = outputs.get(name)
        if value is None or value.ndim < 2 or value.shape[1] != length:
            raise InputError(f"score function output {name!r}: its sequence_layout says it is "
                             f"per position; expected shape [batch, {length}, ...], got "
                             f"{None if value is None else value.shape}")
        pad = [(0, 0), (0, full - length)] + [(0, 0)] * (value.ndim - 2)
        padded[name] = np.pad(value, pad)
    return padded


def length_order(mask: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Rows ``real`` (indices into ``mask`` [R, T]) shortest first (stable: ties keep their
    order), or unchanged when ``mask`` is not right-padded."""
    lengths = right_padded_lengths(mask[real])
    if lengths is None:
        return real
    return real[np.argsort(lengths, kind="stable")]


def _active_layout(fn: Any, length_buckets: bool, prepare: Callable | None
                   ) -> SequenceLayout | None:
    """The function's SequenceLayout when buckets apply to this run (see ``score``)."""
    layout = getattr(fn, "sequence_layout", None)
    if not length_buckets or prepare is not None or jax.process_count() > 1:
        return None
    if layout is not None and not isinstance(layout, SequenceLayout):
        raise InputError(f"fn.sequence_layout: expected a memjax.engine.SequenceLayout, got "
                         f"{type(layout).__name__}")
    return layout


def _sort_windows(batches: list[int], plan: BatchPlan, chunk_size: int) -> list[list[int]]:
    """``batches`` grouped into windows sorted together: at most SORT_WINDOW_BATCHES
    consecutive batches of one store chunk (``chunk_size`` examples; 0 without a store),
    placed the same in every run so a resumed store recomputes identical chunks."""
    per_chunk = chunk_size // plan.batch_size if chunk_size else SORT_WINDOW_BATCHES

    def window(batch: int) -> tuple[int, int]:
        chunk, offset = divmod(batch, per_chunk)
        return chunk, offset // SORT_WINDOW_BATCHES

    return [list(group) for _, group in itertools.groupby(batches, key=window)]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples each global batch holds and which rows this process reads.

    Global batch ``b`` holds examples ``b*batch_size + [0, batch_size)``; rows past the
    last example are padding (masked out), filled with a copy of a real example so the
    score function never sees garbage. This process reads rows ``[lo, hi)`` of every batch.
    """

    n_examples: int
    batch_size: int
    lo: int
    hi: int

    @property
    def n_batches(self) -> int:
        return -(-self.n_examples // self.batch_size)

    def global_indices(self, batch: int) -> np.ndarray:
        return batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)

    def local_rows(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices to read, validity mask) for this process's rows of ``batch``."""
        indices = self.global_indices(batch)[self.lo:self.hi]
        valid = indices < self.n_examples
        # Padding reads the batch's first example (always a real one), so every row is data.
        return np.where(valid, indices, batch * self.batch_size), valid

    def n_valid(self, batch: int) -> int:
        return min(self.batch_size, self.n_examples - batch * self.batch_size)


def _process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of a [batch_size] array that this process holds."""
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                    for index in index_map.values()})
    lo, hi = spans[0]
    for start, stop in spans[1:]:
        if start > hi:
            raise InputError("mesh: this process's devices do not hold a contiguous block of "
                             "the data axis; build the mesh with memjax.engine.make_mesh")
        hi = max(hi, stop)
    return lo, hi


def _is_float(dtype: np.dtype) -> bool:
    """NumPy floats and ml_dtypes' (bfloat16, float8: NumPy calls their kind 'V')."""
    return dtype.kind in "fc" or jnp.issubdtype(dtype, jnp.floating)


def _check_finite_inputs(fields: dict[str, np.ndarray], valid: np.ndarray,
                         indices: np.ndarray) -> None:
    for name, value in fields.items():
        if _is_float(value.dtype) and valid.any():
            rows = value[valid]
            bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
            if bad.any():
                where = int(indices[valid][np.argmax(bad)])
                raise InputError(f"input field {name!r} has NaN or Inf at example index "
                                 f"{where}; expected finite numbers")


def _check_finite_outputs(fields: dict[str, np.ndarray], ids: np.ndarray) -> None:
    for name, value in fields.items():
        if value.dtype.kind in "fc" and value.size:
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            if bad.any():
                raise InputError(
                    f"score {name!r} is NaN or Inf for example id {ids[np.argmax(bad)]}: the "
                    "model produced non-finite outputs (check its params and inputs); "
                    "pass check_finite=False to keep such scores"
                )


def _flatten_outputs(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return {"score": np.asarray(leaves[0][1])}
    return {path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _device_fields(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fields the score function sees: numeric and boolean ones (bfloat16 included),
    without the id."""
    return {k: to_device_dtype(f"input field {k!r}", v) for k, v in batch.items()
            if k != ID_FIELD and (v.dtype.kind in "biu" or _is_float(v.dtype))}


def _example_ids(source: Source, indices: np.ndarray) -> np.ndarray:
    """Ids of examples ``indices``: the source's ``ids()``, else its ``id`` field, else index."""
    return _storable_ids(source_ids(source, indices))


def _storable_ids(ids: np.ndarray) -> np.ndarray:
    # Object arrays (Python strings) would need pickle to store: use fixed-width text.
    if ids.dtype == object:
        return np.asarray([str(i) for i in ids.tolist()])
    return ids


def _per_device(fn: Callable, mesh: Mesh, local_batch: int, batched: bool = False
                ) -> Callable:
    """``fn(params, example)`` over a batch sharded on the mesh's data axis: each device
    vmaps over its own rows (``jax.shard_map``, manual over ``data`` only, so params
    sharded over ``model`` stay automatic).

    Why not one jit-level vmap left to XLA's SPMD partitioner: XLA:CPU partitions a
    vmapped per-example convolution *gradient* (batch-grouped convolution) over a sharded
    batch wrongly: every device but the first returns zeros (seen with JAX 0.10.2 on 8
    CPU devices; tests/test_model_protocol.py, self-influence of a ResNet). Per-device
    vmaps never ask the partitioner to split a batched op. ``check_vma=False``: params are
    replicated over ``data``, and a gradient with respect to them inside ``fn`` is each
    example's own (with VMA checks on, JAX would sum it over the devices).

    A per-device batch of 1 is squeezed instead of vmapped (XLA:CPU runs a vmap over a
    size-1 axis up to 15x slower, bench/). ``batched``: ``fn`` takes the device's rows
    itself (no vmap).
    """
    def local(p, b):
        if batched:
            return fn(p, b)
        if local_batch == 1:
            out = fn(p, jax.tree.map(lambda x: x[0], b))
            return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
        return jax.vmap(lambda x: fn(p, x))(b)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
                         out_specs=PartitionSpec(DATA_AXIS), axis_names={DATA_AXIS},
                         check_vma=False)


def _compile(key: Any, build: Callable[[], Any]) -> Any:
    if key in _COMPILED:
        _CACHE_STATS["hits"] += 1
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = build()
    _COMPILED[key] = compiled
    if len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    _CACHE_STATS["compiles"] += 1
    return compiled


def _batch_spec(batch: dict[str, jax.Array]) -> str:
    return str(sorted((k, (v.shape, v.dtype, v.sharding)) for k, v in batch.items()))


def _local_batch(batch: dict[str, jax.Array], mesh: Mesh) -> int:
    return next(iter(batch.values())).shape[0] // mesh.shape[DATA_AXIS]


def _compiled_prepare(prepare: Callable, batch: dict[str, jax.Array], mesh: Mesh):
    """The compiled preparation stage (no params), its outputs sharded like the batch over
    the data axis (cached by the function's value and the batch's shapes)."""
    key = ("prepare", value_key(prepare), _batch_spec(batch), mesh)

    def build():
        step = _per_device(lambda _, x: {**x, **prepare(x)}, mesh, _local_batch(batch, mesh))
        out = jax.eval_shape(lambda b: step((), b), batch)
        shardings = jax.tree.map(lambda o: NamedSharding(
            mesh, PartitionSpec(DATA_AXIS, *[None] * (o.ndim - 1))), out)
        jitted = jax.jit(lambda b: step((), b),
                         in_shardings=({k: v.sharding for k, v in batch.items()},),
                         out_shardings=shardings)
        return jitted.lower(batch).compile()

    return _compile(key, build)


def _compiled_step(fn: ScoreFn, params: Any, batch: dict[str, jax.Array], mesh: Mesh,
                   batched: bool = False):
    """The compiled step for these shapes and shardings (cached)."""
    param_spec = jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), params)
    # The function by value: a re-created closure with equal settings reuses the executable.
    key = (value_key(fn), batched, jax.tree.structure(params), str(param_spec),
           _batch_spec(batch), mesh)

    def build():
        replicated = NamedSharding(mesh, PartitionSpec())
        jitted = jax.jit(
            _per_device(fn, mesh, _local_batch(batch, mesh), batched),
            in_shardings=(jax.tree.map(lambda a: a.sharding, params),
                          {k: v.sharding for k, v in batch.items()}),
            out_shardings=replicated,
        )
        return jitted.lower(params, batch).compile()

    return _compile(key, build)


def _in_memory(source: Source) -> bool:
    if isinstance(source, SliceSource):  # a chunk of a source: as in memory as its source
        return _in_memory(source.source)
    return isinstance(source, ArraySource) and not any(
        isinstance(a, np.memmap) for a in source.arrays.values())


def _global_batch(fields: dict[str, np.ndarray], sharding: NamedSharding,
                  batch_size: int) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the data axis."""
    shardings = {k: sharding.update(spec=PartitionSpec(DATA_AXIS, *[None] * (v.ndim - 1)))
                 for k, v in fields.items()}
    if jax.process_count() == 1:
        # One batched transfer for every field: cheaper per batch than one call per field.
        return jax.device_put(fields, shardings)
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size, *v.shape[1:]))
            for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """One batch as read: this process's device fields (sequence fields maybe trimmed),
    the ids and source indices of its real rows (None when this process reads only part
    of each batch), and the untrimmed length T (None when not trimmed)."""

    batch: int
    fields: dict[str, np.ndarray]
    ids: np.ndarray | None
    indices: np.ndarray | None
    full_length: int | None


def _window_rows(plan: BatchPlan, window: list[int], mask: np.ndarray | None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows of the window's read, validity) for each batch of ``window``: in batch order,
    or, given the window's length mask, its real rows sorted by length (the short last
    batch of the source keeps its size and repeats its first row as padding)."""
    size = plan.hi - plan.lo
    if mask is None:
        return [(np.arange(i * size, (i + 1) * size), plan.local_rows(b)[1])
                for i, b in enumerate(window)]
    valid = np.concatenate([plan.local_rows(b)[1] for b in window])
    order = length_order(mask, np.flatnonzero(valid))
    rows, start = [], 0
    for batch in window:
        n = plan.n_valid(batch)
        taken = order[start:start + n]
        start += n
        rows.append((np.concatenate([taken, np.full(size - n, taken[0])]),
                     np.arange(size) < n))
    return rows


def _load_batches(source: Source, plan: BatchPlan, windows: list[list[int]],
                  check_finite: bool, prefetch: int, validate: Validator | None,
                  with_ids: bool = False, layout: SequenceLayout | None = None
                  ) -> Iterator[_Loaded]:
    """This process's rows of each batch, one window of batches per read, read ahead by
    grain threads. With a ``layout``, each window's real rows are sorted by length before
    they are cut into batches, and each batch is trimmed to its bucket."""
    whole_batches = plan.lo == 0 and plan.hi == plan.batch_size

    def one_batch(batch: int, raw: dict[str, np.ndarray], indices: np.ndarray,
                  valid: np.ndarray) -> _Loaded:
        ids = _storable_ids(example_ids(raw, indices)[valid]) if whole_batches else None
        fields = _device_fields(raw)
        if not fields:
            raise InputError("data: the source has no numeric fields to score (fields are "
                             f"{sorted(source.read(indices[:1]))})")
        if check_finite:
            _check_finite_inputs(fields, valid, indices)
        if validate is not None:
            validate({k: v[valid] for k, v in fields.items()}, indices[valid])
        if with_ids:  # padding rows repeat the batch's first example, id included
            fields[ID_FIELD] = integer_ids(example_ids(raw, indices))
        full = None
        if layout is not None:
            fields, full = trim_to_bucket(fields, layout)
        return _Loaded(batch, fields, ids, indices[valid] if whole_batches else None, full)

    def load(position: int) -> list[_Loaded]:
        window = windows[position]
        parts = [plan.local_rows(b) for b in window]
        indices = np.concatenate([i for i, _ in parts])
        raw = source.read(indices)
        mask = raw.get(layout.length_field) if layout is not None else None
        sortable = mask is not None and np.ndim(mask) == 2
        loaded = []
        for batch, (rows, valid) in zip(window, _window_rows(plan, window,
                                                             mask if sortable else None),
                                        strict=True):
            batch_raw = raw if len(window) == 1 and not sortable else \
                {k: np.asarray(v)[rows] for k, v in raw.items()}
            loaded.append(one_batch(batch, batch_raw, indices[rows], valid))
        return loaded

    if prefetch <= 0:
        for i in range(len(windows)):
            yield from load(i)
        return
    import grain  # only for read-ahead: in-memory scoring (prefetch 0) never needs it

    dataset = grain.MapDataset.range(len(windows)).map(load)
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=2 * prefetch)
    for loaded in dataset.to_iter_dataset(options):
        yield from loaded


class _Results:
    """Collects per-batch outputs, puts them back in source order and flushes full chunks
    to a store."""

    def __init__(self, source: Source, plan: BatchPlan, store: ScoreStore | None,
                 chunk_size: int, write: bool, check_finite: bool, progress: Progress):
        self.source, self.plan, self.store = source, plan, store
        self.chunk_size, self.write, self.check_finite = chunk_size, write, check_finite
        self.progress = progress
        self.pending: dict[int, list[_Part]] = {}
        self.all: list[_Part] = []

    def add(self, batch: int, outputs: dict[str, np.ndarray], ids: np.ndarray | None,
            indices: np.ndarray | None = None) -> None:
        """``indices``: the source indices of the batch's real rows (None: the batch's own
        contiguous examples, in order)."""
        n = self.plan.n_valid(batch)
        if indices is None:
            indices = self.plan.global_indices(batch)[:n]
        if ids is None:
            ids = _example_ids(self.source, indices)
        fields = {k: v[:n] for k, v in outputs.items()}
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != self.plan.batch_size:
                raise InputError(f"score function output {name!r} has shape {value.shape}; "
                                 "expected one value (or array) per example")
        if self.check_finite:
            _check_finite_outputs(fields, ids)
        self.progress.update(n)
        if self.store is None:
            self.all.append((indices, ids, fields))
            return
        chunk = batch * self.plan.batch_size // self.chunk_size
        parts = self.pending.setdefault(chunk, [])
        parts.append((indices, ids, fields))
        rows = sum(len(i) for i, _, _ in parts)
        if rows == min(self.chunk_size, self.plan.n_examples - chunk * self.chunk_size):
            ids_c, fields_c = _concat(self.pending.pop(chunk))
            if self.write:
                self.store.write_chunk(chunk, ids_c, fields_c)

    def result(self) -> dict[str, np.ndarray]:
        ids, fields = _concat(self.all)
        return {ID_COLUMN: ids, **fields}


# (source indices, ids, fields) of one batch's real rows.
_Part = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


def _concat(parts: list[_Part]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The parts' ids and fields, concatenated in source order."""
    order = np.argsort(np.concatenate([i for i, _, _ in parts]), kind="stable")
    ids = np.concatenate([i for _, i, _ in parts])[order]
    fields = {k: np.concatenate([f[k] for _, _, f in parts])[order] for k in parts[0][2]}
    return ids, fields


def score(
    fn: ScoreFn,
    params: Any,
    source: Any,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    store: ScoreStore | str | os.PathLike | None = None,
    progress: bool = True,
    param_rules: PartitionRules | None = None,
    check_finite: bool = True,
    params_fingerprint: str | None = None,
    prefetch: int | None = None,
    validate: Validator | None = None,
    with_ids: bool = False,
    prepare: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
    batched: bool = False,
    length_buckets: bool = True,
) -> dict[str, np.ndarray] | ScoreStore:
    """Score every example of ``source`` with ``fn(params, example)``.

    Args:
      fn: scores ONE example: ``fn(params, example) -> pytree of arrays`` where ``example``
        is a dict of the source's numeric fields without the batch axis (the ``id`` field
        and non-numeric fields such as raw text stay on the host).
      params: a pytree of arrays (host or device), replicated over the mesh unless a
        ``param_rules`` pattern shards a parameter over the ``model`` axis.
      source: a dict of arrays (field -> [N, ...]) or a ``memjax.data`` source.
      batch_size: examples per global batch; a multiple of the mesh's ``data`` axis size.
        The last batch is padded (and masked) so all batches share one compiled executable.
      mesh: a mesh from :func:`make_mesh` (default: every global device on ``data``).
      store: a :class:`ScoreStore` or folder path; scores are written chunk by chunk and a
        rerun with the same configuration resumes from the finished chunks. A run that
        fails before its first chunk removes the store it started (nothing to resume);
        ``ScoreStore(path, overwrite=True)`` replaces an existing store.
      progress: print examples/s to stderr (process 0 only).
      param_rules: ``[(regex over param path, PartitionSpec), ...]`` (first match wins).
      check_finite: refuse NaN/Inf in float inputs and in the scores, naming the example.
      params_fingerprint: a string identifying the params, instead of hashing them.
      prefetch: grain reader threads reading batches ahead (0: read inline). Default: 0
        for arrays already in memory (a thread costs more than slicing them; measured in
        bench/engine_overhead.py), 2 for every other source (files, memmaps, decoding).
      validate: ``validate(fields, indices)`` called on the host for each batch's real
        rows before scoring; raise ``InputError`` to refuse bad values.
      with_ids: also hand ``fn`` each example's id as ``example["id"]`` (int32 scalar:
        integer ids as they are, other ids by a stable hash; see
        :func:`memjax.data.base.integer_ids`), e.g. to key its augmentations by identity
        so they do not depend on batch size, device count or resume point.
      prepare: ``prepare(example) -> {field: array}``, a parameter-free stage run as its own
        compiled program on each batch (vmapped, sharded over the data axis) before
        ``fn``; its fields are added to the example ``fn`` sees (e.g. augmented views,
        made once per batch). Part of the store fingerprint.
      batched: ``fn(params, rows)`` takes a device's rows at once (every field with a
        leading axis; outputs likewise) instead of one example. For per-example work
        that is itself a batch, e.g. K views of each example through one encoder:
        XLA:CPU runs a flat [rows * K] convolution 3.3x faster than the same convolution
        under two nested vmaps (bench/memorization.py). Rows must stay independent.
      length_buckets: for a function that declares a :class:`SequenceLayout`
        (``fn.sequence_layout``, e.g. the causal-LM token signals): read windows of
        SORT_WINDOW_BATCHES batches (never across a store chunk), score their examples
        shortest first, and run each batch trimmed to the smallest bucket that holds its
        longest sequence (see :class:`SequenceLayout`). Scores are returned and stored in
        source order and equal the untrimmed run's up to float summation order (the
        store's fingerprint does not record the setting: either run resumes the other's
        store). Off (untrimmed, source order) for a function without a layout, with
        ``prepare``, and under multi-process ``jax.distributed`` (each process reads only
        its own rows, so none knows a batch's longest sequence or the window's order).

    Returns:
      Without a store: ``{"id": [N], field: [N, ...]}`` in example order (output pytree
      paths joined with "/"; a bare array output is named ``score``). With a store: the
      completed :class:`ScoreStore`.
    """
    if not callable(fn):
        raise InputError(f"fn: expected a function fn(params, example), got {type(fn).__name__}")
    batch_size = check_positive_int(batch_size, "batch_size")
    source = as_source(source)
    if prefetch is None:
        prefetch = 0 if _in_memory(source) else 2
    mesh = make_mesh() if mesh is None else mesh
    n_data = mesh.shape[DATA_AXIS]
    if batch_size % n_data:
        raise InputError(f"batch_size={batch_size}: expected a multiple of the mesh's data "
                         f"axis ({n_data} devices); try {n_data * -(-batch_size // n_data)}")
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    lo, hi = _process_rows(batch_sharding, batch_size)
    plan = BatchPlan(len(source), batch_size, lo, hi)
    is_writer = jax.process_index() == 0
    todo = list(range(plan.n_batches))

    if isinstance(store, (str, os.PathLike)):
        store = ScoreStore(store)
    chunk_size = 0
    try:
        if store is not None:
            fingerprint = run_fingerprint(fn, params, source.spec(), batch_size,
                                          params_fingerprint)
            if with_ids:  # only then, so stores made before the option existed still resume
                fingerprint["with_ids"] = True
            if prepare is not None:
                fingerprint["prepare"] = describe_function(prepare)
            if batched:
                fingerprint["batched"] = True
            done_mask = np.zeros(plan.n_batches, dtype=np.int32)
            if is_writer:
                done = store.begin(fingerprint, plan.n_examples, batch_size)
                chunk_size = store.manifest()["chunk_size"]
                for chunk in done:
                    first = chunk * chunk_size // batch_size
                    done_mask[first:first + chunk_size // batch_size] = 1
            if jax.process_count() > 1:
                done_mask, chunk_size = multihost_utils.broadcast_one_to_all(
                    (done_mask, np.int32(chunk_size)))
                done_mask, chunk_size = np.asarray(done_mask), int(chunk_size)
            todo = [b for b in todo if not done_mask[b]]

        bar = Progress(plan.n_examples, enabled=progress and is_writer)
        bar.done = plan.n_examples - sum(plan.n_valid(b) for b in todo)
        results = _Results(source, plan, store, chunk_size, is_writer, check_finite, bar)
        placed = place_params(params, param_shardings(params, mesh, param_rules))
        layout = _active_layout(fn, length_buckets, prepare)
        windows = ([[b] for b in todo] if layout is None
                   else _sort_windows(todo, plan, chunk_size))
        in_flight: list[tuple[_Loaded, Any]] = []
        steps: dict[Any, Any] = {}  # by the batch's shapes: one per bucket
        prep = None

        def collect(loaded: _Loaded, out: Any) -> None:
            outputs = _flatten_outputs(out)
            if loaded.full_length is not None:
                length = loaded.fields[layout.length_field].shape[1]
                outputs = pad_positions(outputs, layout, length, loaded.full_length)
            results.add(loaded.batch, outputs, loaded.ids, loaded.indices)

        for loaded in _load_batches(source, plan, windows, check_finite, prefetch,
                                    validate, with_ids, layout):
            global_batch = _global_batch(loaded.fields, batch_sharding, batch_size)
            if prepare is not None:  # its own program: XLA fuses the two stages worse
                prep = prep or _compiled_prepare(prepare, global_batch, mesh)
                global_batch = prep(global_batch)
            shapes = tuple((k, v.shape) for k, v in loaded.fields.items())
            if shapes not in steps:
                steps[shapes] = _compiled_step(fn, placed, global_batch, mesh, batched)
            in_flight.append((loaded, steps[shapes](placed, global_batch)))
            # Keep one batch in flight so the device computes while the host collects.
            if len(in_flight) > 1:
                collect(*in_flight.pop(0))
        for pending in in_flight:
            collect(*pending)
        bar.close()
        if store is None:
            return results.result()
        if is_writer:
            store.finish()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("memjax.score.finished")
        return store
    except BaseException:
        # A run that fails (or is interrupted) before its first chunk leaves no store
        # behind, so the corrected rerun starts clean; a later failure keeps the finished
        # chunks for a resume.
        if store is not None:
            store.discard_if_empty()
        raise
    finally:
        if store is not None:
            store.release()
