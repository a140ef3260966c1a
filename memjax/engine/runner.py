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
"""

from __future__ import annotations

import collections
import dataclasses
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


def _load_batches(source: Source, plan: BatchPlan, batches: list[int], check_finite: bool,
                  prefetch: int, validate: Validator | None, with_ids: bool = False
                  ) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray | None]]:
    """This process's rows of each batch in ``batches``, read ahead by grain threads.

    Yields (batch, device fields, ids of the batch's real examples or None when this
    process reads only part of each batch).
    """
    whole_batches = plan.lo == 0 and plan.hi == plan.batch_size

    def load(position: int):
        batch = batches[position]
        indices, valid = plan.local_rows(batch)
        raw = source.read(indices)
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
        return batch, fields, ids

    if prefetch <= 0:
        yield from (load(i) for i in range(len(batches)))
        return
    import grain  # only for read-ahead: in-memory scoring (prefetch 0) never needs it

    dataset = grain.MapDataset.range(len(batches)).map(load)
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=2 * prefetch)
    yield from dataset.to_iter_dataset(options)


class _Results:
    """Collects per-batch outputs in example order and flushes full chunks to a store."""

    def __init__(self, source: Source, plan: BatchPlan, store: ScoreStore | None,
                 chunk_size: int, write: bool, check_finite: bool, progress: Progress):
        self.source, self.plan, self.store = source, plan, store
        self.chunk_size, self.write, self.check_finite = chunk_size, write, check_finite
        self.progress = progress
        self.pending: dict[int, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        self.all: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []

    def add(self, batch: int, outputs: dict[str, np.ndarray], ids: np.ndarray | None) -> None:
        n = self.plan.n_valid(batch)
        if ids is None:
            ids = _example_ids(self.source, self.plan.global_indices(batch)[:n])
        fields = {k: v[:n] for k, v in outputs.items()}
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != self.plan.batch_size:
                raise InputError(f"score function output {name!r} has shape {value.shape}; "
                                 "expected one value (or array) per example")
        if self.check_finite:
            _check_finite_outputs(fields, ids)
        self.progress.update(n)
        if self.store is None:
            self.all.append((ids, fields))
            return
        chunk = batch * self.plan.batch_size // self.chunk_size
        parts = self.pending.setdefault(chunk, [])
        parts.append((ids, fields))
        rows = sum(len(i) for i, _ in parts)
        if rows == min(self.chunk_size, self.plan.n_examples - chunk * self.chunk_size):
            ids_c, fields_c = _concat(self.pending.pop(chunk))
            if self.write:
                self.store.write_chunk(chunk, ids_c, fields_c)

    def result(self) -> dict[str, np.ndarray]:
        ids, fields = _concat(self.all)
        return {ID_COLUMN: ids, **fields}


def _concat(parts):
    ids = np.concatenate([i for i, _ in parts])
    fields = {k: np.concatenate([f[k] for _, f in parts]) for k in parts[0][1]}
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
        in_flight: list[tuple[int, Any]] = []
        step = prep = None
        for batch, fields, ids in _load_batches(source, plan, todo, check_finite, prefetch,
                                                validate, with_ids):
            global_batch = _global_batch(fields, batch_sharding, batch_size)
            if prepare is not None:  # its own program: XLA fuses the two stages worse
                prep = prep or _compiled_prepare(prepare, global_batch, mesh)
                global_batch = prep(global_batch)
            step = step or _compiled_step(fn, placed, global_batch, mesh, batched)
            in_flight.append((batch, step(placed, global_batch), ids))
            # Keep one batch in flight so the device computes while the host collects.
            if len(in_flight) > 1:
                done_batch, out, done_ids = in_flight.pop(0)
                results.add(done_batch, _flatten_outputs(out), done_ids)
        for done_batch, out, done_ids in in_flight:
            results.add(done_batch, _flatten_outputs(out), done_ids)
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
