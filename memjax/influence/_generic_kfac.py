"""K-FAC / EK-FAC for any model of the model protocol: dense layers found in the jaxpr.

K-FAC for dense layers, diagonal for the rest. :func:`fit_kfac` finds the dense layers of
``loss_fn(params, example)`` with :func:`memjax.influence._capture.find_dense_layers` (every
``dot_general`` whose one operand is a params leaf used nowhere else: attention and MLP
projections of BERT, ViT, GPT-2, Llama, CLIP, the dense layers of an MLP) and accumulates,
over a data source in one streamed pass of jitted batch functions, per layer

    A = E[Σ_s ã_s ã_sᵀ] [in(+1), in(+1)],   S = E[Σ_s g_s g_sᵀ] [out, out]

(Martens & Grosse 2015; positions s = tokens / patches summed as in the sequence-layer
convention of :mod:`memjax.influence._kfac`; ã = a with a 1 appended when a bias is
paired). EK-FAC (George et al. 2018; Grosse et al. 2023) adds a second pass for the
corrected eigenvalues Λ = E[(Q_Sᵀ G Q_A)²] of the per-example weight gradient
G = Σ_s g_s ã_sᵀ. Every other floating leaf (embeddings, LayerNorm scales, tied or reused
weights, convolutions) gets the diagonal Fisher E[∇_leaf²] from per-example gradients taken
in the same backward pass.

Fisher: ``fisher="empirical"`` differentiates the loss of the example as given;
``fisher="true"`` first replaces the example by ``sample_fn(params, example, key)`` (ONE
example, a per-example key folded from ``key`` and the example's index; EK-FAC's second pass
draws fresh labels from ``fold_in(key, 1)``), which should
draw the target from the model's own predictive distribution, e.g. for a classifier::

    def sample_fn(params, example, key):
        logits = logits_fn(params, example["image"])
        return {**example, "label": jax.random.categorical(key, logits)}

(the true Fisher, whose expectation over labels is the Gauss–Newton matrix of softmax
cross-entropy).

Damping (:func:`curvature_preconditioner`, ``damping=None``): per dense layer the rule of
:mod:`memjax.influence._kfac` (0.1 × the mean eigenvalue of the layer's curvature); per
diagonal leaf 0.1 × the mean of that leaf's diagonal; a block whose curvature is exactly
zero (a leaf the loss does not depend on) gets λ = 1, i.e. the identity. A float overrides
all of them.

Sharding: each batch is split over the mesh's ``data`` axis (``jax.shard_map``; every
device vmaps over its rows, as the engine does) and the sums are ``psum``-ed, so they come
back replicated; they are accumulated on the host in float64.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from memjax._checks import check_choice, check_positive_int
from memjax._io import atomic_write_bytes, atomic_write_json
from memjax.data.base import as_source, hash_params, numeric_fields
from memjax.engine import make_mesh
from memjax.engine.cache import cached_jit
from memjax.engine.mesh import DATA_AXIS
from memjax.engine.progress import Progress
from memjax.errors import InputError
from memjax.influence._capture import (
    DenseLayer,
    find_dense_layers,
    grad_matrix,
    layer_and_leaf_grads,
    layer_inputs_and_output_grads,
    set_grad_matrix,
)
from memjax.influence._forward_inf import param_paths
from memjax.influence._kfac import (
    DAMPING_HEURISTIC,
    DenseFactors,
    EkfacStats,
    KfacStats,
    ekfac_factors,
    kfac_factors,
    positions_ekfac_stats,
    positions_kfac_stats,
)
from memjax.influence._kfac import _layer_damping as layer_damping
from memjax.influence._kfac import _precondition_matrix as precondition_in_eigenbasis
from memjax.influence._preconditioners import check_damping

METHODS = ("ekfac", "kfac")
FISHERS = ("empirical", "true")
CHECKPOINT_VERSION = 1


class CurvatureFactors(NamedTuple):
    """K-FAC / EK-FAC factors of a model: ``layers[k]`` (:class:`DenseLayer`) has factors
    ``dense[k]`` (:class:`DenseFactors`, corrected eigenvalues when ``method="ekfac"``);
    ``diagonal`` maps every other floating leaf's path to its diagonal Fisher E[∇²]
    (leaf-shaped); ``count`` is the number of examples."""

    method: str
    layers: tuple[DenseLayer, ...]
    dense: tuple[DenseFactors, ...]
    diagonal: dict[str, jax.Array]
    count: float


# ---- per-batch sums (jitted, sharded) ---------------------------------------------------


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _common_float(a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a and g in one dtype, at least float32 (a float32 activation times a float64 kernel
    keeps float64 sums; bfloat16 models accumulate in float32)."""
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, g.dtype), jnp.float32)
    return a.astype(dtype), g.astype(dtype)


def _example_for_fisher(params, example, index, key, fisher, sample_fn):
    if fisher == "empirical":
        return example
    return sample_fn(params, example, jax.random.fold_in(key, index))


def _kfac_local(params, batch, key, *, loss_fn, layers, diag_leaves, fisher, sample_fn):
    """Pass 1 on one device's rows: K-FAC sums per layer, diagonal sums per leaf."""

    def one(example, index):
        example = _example_for_fisher(params, example, index, key, fisher, sample_fn)
        return layer_and_leaf_grads(loss_fn, params, example, list(layers), diag_leaves)

    record, leaf_grads = jax.vmap(one)(batch["example"], batch["index"])
    weight = batch["weight"]
    a_sums, s_sums = [], []
    for layer in layers:
        a, g = _common_float(*record[layer.path])
        stats = positions_kfac_stats(a, g, weight.astype(a.dtype), bias=layer.has_bias)
        a_sums.append(stats.a_sums[0])
        s_sums.append(stats.s_sums[0])
    diag = [jnp.einsum("b,b...->...", weight.astype(g.dtype), _at_least_f32(g) ** 2)
            for g in leaf_grads]
    out = {"a": a_sums, "s": s_sums, "diag": diag, "count": jnp.sum(weight)}
    return jax.lax.psum(out, DATA_AXIS)


def _ekfac_local(params, batch, key, bases, *, loss_fn, layers, fisher, sample_fn):
    """Pass 2 on one device's rows: Σ w (Q_Sᵀ G Q_A)² per layer."""

    def one(example, index):
        example = _example_for_fisher(params, example, index, key, fisher, sample_fn)
        return layer_inputs_and_output_grads(loss_fn, params, example, list(layers))

    record = jax.vmap(one)(batch["example"], batch["index"])
    weight = batch["weight"]
    sq = []
    for layer, base in zip(layers, bases, strict=True):
        a, g = _common_float(*record[layer.path])
        sq.append(positions_ekfac_stats(base, a, g, weight.astype(a.dtype),
                                        bias=layer.has_bias).sq_sums[0])
    return jax.lax.psum({"sq": sq, "count": jnp.sum(weight)}, DATA_AXIS)


def _sharded_call(local: Callable, mesh, n_replicated: int, params, batch, *replicated):
    """``local(params, batch, *replicated)`` over the mesh: the batch split over ``data``,
    everything else replicated, the psum-ed sums replicated."""
    specs = (PartitionSpec(), PartitionSpec(DATA_AXIS)) + (PartitionSpec(),) * n_replicated
    mapped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                           axis_names={DATA_AXIS}, check_vma=False)
    return mapped(params, batch, *replicated)


def _sharded(local: Callable, mesh, n_replicated: int) -> Callable:
    """The jitted :func:`_sharded_call`, shared by equal settings (cached by value, so a
    rerun or a resumed run reuses the compiled program)."""
    return cached_jit(functools.partial(_sharded_call, local, mesh, n_replicated))


# ---- the streamed pass -----------------------------------------------------------------


def _read_batch(source, start: int, batch_size: int, n: int, mesh):
    """Rows [start, start + batch_size) of the first n examples, the tail padded with copies
    of the last row at weight 0, placed with the batch split over ``data``."""
    index = np.arange(start, start + batch_size)
    valid = index < n
    rows = numeric_fields(source.read(np.minimum(index, n - 1)))
    batch = {"example": rows, "index": index.astype(np.int32),
             "weight": valid.astype(np.float32)}
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.device_put(batch, sharding)


def _to_host(tree) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


class _Checkpoint:
    """Running sums and the next batch of one phase, in ``folder`` (atomic writes)."""

    def __init__(self, folder: Any, settings: dict[str, Any] | None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "settings.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != settings:
                diff = sorted(k for k in set(saved) | set(settings)
                              if saved.get(k) != settings.get(k))
                raise InputError(f"checkpoint: {self.folder} holds a K-FAC run with other "
                                 f"settings (differing: {diff}); use another folder or "
                                 f"delete it")
        else:
            atomic_write_json(path, settings)

    def load(self, phase: str):
        """(next batch, sums as a flat list) of ``phase``, or (0, None)."""
        path = None if self.folder is None else self.folder / f"{phase}.npz"
        if path is None or not path.exists():
            return 0, None
        with np.load(path) as data:
            return int(data["next_batch"]), [data[f"x{k}"] for k in range(int(data["n"]))]

    def save(self, phase: str, next_batch: int, sums: list[np.ndarray]) -> None:
        if self.folder is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, next_batch=next_batch, n=len(sums),
                 **{f"x{k}": x for k, x in enumerate(sums)})
        atomic_write_bytes(self.folder / f"{phase}.npz", buffer.getvalue())


def _stream(run: Callable, phase: str, template: Any, source, n: int, batch_size: int, mesh,
            checkpoint: _Checkpoint, every: int, progress: bool) -> Any:
    """Σ over the batches of ``run(batch)``, resumed from and saved to ``checkpoint``."""
    batches = -(-n // batch_size)
    start, flat = checkpoint.load(phase)
    treedef = jax.tree.structure(template)
    total = None if flat is None else jax.tree.unflatten(treedef, flat)
    bar = Progress(n, desc=f"K-FAC {phase}", enabled=progress)
    bar.update(min(start * batch_size, n))
    for b in range(start, batches):
        sums = _to_host(run(_read_batch(source, b * batch_size, batch_size, n, mesh)))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
        bar.update(min(batch_size, n - b * batch_size))
        if (b + 1) % every == 0 or b + 1 == batches:
            checkpoint.save(phase, b + 1, jax.tree.leaves(total))
    bar.close()
    return total


def _settings(method, fisher, batch_size, n, source, params, layers, key) -> dict[str, Any]:
    return {"version": CHECKPOINT_VERSION, "method": method, "fisher": fisher,
            "batch_size": batch_size, "examples": n, "source": json.loads(json.dumps(
                source.spec(), default=str)), "params": hash_params(params),
            "layers": [layer.path for layer in layers],
            "key": None if key is None else np.asarray(jax.random.key_data(key)).tolist()}


def _check_fit_args(method, fisher, sample_fn, key, batch_size, mesh):
    check_choice("method", method, METHODS)
    check_choice("fisher", fisher, FISHERS)
    check_positive_int(batch_size, "batch_size")
    if fisher == "true":
        if not callable(sample_fn):
            raise InputError("sample_fn: fisher='true' needs sample_fn(params, example, key) "
                             "-> example with a target drawn from the model")
        if key is None:
            raise InputError("key: fisher='true' samples targets and needs a PRNG key")
    data = mesh.shape[DATA_AXIS]
    if batch_size % data:
        raise InputError(f"batch_size={batch_size}: expected a multiple of the mesh's data "
                         f"axis ({data} devices)")


def fit_kfac(loss_fn: Callable[[Any, Any], jax.Array], params: Any, source: Any, *,
             method: str = "ekfac", batch_size: int, fisher: str = "empirical",
             sample_fn: Callable | None = None, key: jax.Array | None = None,
             max_examples: int | None = None, mesh: Any = None, progress: bool = False,
             checkpoint: Any = None, checkpoint_every: int = 8) -> CurvatureFactors:
    """K-FAC (``method="kfac"``) or EK-FAC (``"ekfac"``) factors of ``loss_fn`` over a source.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example, pure JAX.
      params: the params pytree.
      source: a memjax data source or a dict of arrays [N, ...] (the examples).
      batch_size: examples per jitted batch; a multiple of the mesh's data axis.
      fisher: ``"empirical"`` or ``"true"`` (module docstring; needs ``sample_fn`` and
        ``key``).
      max_examples: use the first ``max_examples`` examples (default all).
      mesh: a :func:`memjax.engine.make_mesh` mesh (default every device).
      checkpoint: a folder; running sums and the next batch are written there every
        ``checkpoint_every`` batches and at the end of each pass, and a rerun with the same
        settings continues from them. Settings are method, fisher, batch size, number of
        examples, the source's ``spec()``, a hash of ``params``, the layers found and
        ``key``; a run with others is refused. ``loss_fn`` and ``sample_fn`` are not
        fingerprinted: keep them the same across a resume.

    Returns:
      :class:`CurvatureFactors` (count = number of examples used).
    """
    source = as_source(source)
    mesh = make_mesh() if mesh is None else mesh
    _check_fit_args(method, fisher, sample_fn, key, batch_size, mesh)
    check_positive_int(checkpoint_every, "checkpoint_every")
    n = len(source) if max_examples is None else min(
        check_positive_int(max_examples, "max_examples"), len(source))
    first = {k: v[0] for k, v in numeric_fields(source.read(np.arange(1))).items()}
    layers = tuple(find_dense_layers(loss_fn, params, first))
    leaves = jax.tree.leaves(params)
    paths = param_paths(params)
    covered = {i for layer in layers for i in (layer.index, layer.bias_index) if i is not None}
    diag_leaves = tuple(i for i, x in enumerate(leaves)
                        if i not in covered and jnp.issubdtype(jnp.result_type(x), jnp.floating))
    store = _Checkpoint(checkpoint, None if checkpoint is None else _settings(
        method, fisher, batch_size, n, source, params, layers, key))
    key = jax.random.key(0) if key is None else key

    local = functools.partial(_kfac_local, loss_fn=loss_fn, layers=layers,
                              diag_leaves=diag_leaves, fisher=fisher, sample_fn=sample_fn)
    pass1 = _sharded(local, mesh, 1)
    template = {"a": [0] * len(layers), "s": [0] * len(layers), "diag": [0] * len(diag_leaves),
                "count": 0}
    sums = _stream(lambda batch: pass1(params, batch, key), "kfac", template, source, n,
                   batch_size, mesh, store, checkpoint_every, progress)
    stats = KfacStats([jnp.asarray(x) for x in sums["a"]], [jnp.asarray(x) for x in sums["s"]],
                      jnp.asarray(sums["count"]))
    dense = kfac_factors(stats) if layers else []
    count = float(sums["count"])
    if method == "ekfac" and layers:
        local2 = functools.partial(_ekfac_local, loss_fn=loss_fn, layers=layers, fisher=fisher,
                                   sample_fn=sample_fn)
        pass2 = _sharded(local2, mesh, 2)
        # Fresh labels for the eigenvalue correction (true Fisher), as kronfluence does: Λ
        # measured on the very samples that chose the eigenbasis is biased (the basis fits
        # their noise). On the digits MLP (bench/influence_race.py setting, 400 queries):
        # LDS 0.438 with the same labels vs 0.569 with fresh ones.
        key_lambda = jax.random.fold_in(key, 1)
        sq = _stream(lambda batch: pass2(params, batch, key_lambda, dense), "ekfac",
                     {"sq": [0] * len(layers), "count": 0}, source, n, batch_size, mesh,
                     store, checkpoint_every, progress)
        dense = ekfac_factors(dense, EkfacStats([jnp.asarray(x) for x in sq["sq"]],
                                                jnp.asarray(sq["count"])))
    diagonal = {paths[i]: jnp.asarray(d / count) for i, d in zip(diag_leaves, sums["diag"],
                                                                 strict=True)}
    return CurvatureFactors(method, layers, tuple(dense), diagonal, count)


# ---- preconditioning ---------------------------------------------------------------------


def curvature_preconditioner(factors: CurvatureFactors, damping: float | None = None, *,
                             power: float = -1.0) -> Callable[[Any], Any]:
    """``grads -> (F̂ + λI)⁻¹ grads`` in the params layout: K-FAC / EK-FAC per dense layer
    (:func:`memjax.influence.kfac_precondition_matrix` on the layer's G [out, in(+1)]),
    ``grads / (diag + λ)`` per diagonal leaf; leaves in neither (integer leaves) pass
    unchanged. ``damping``: λ for every block, or None for the module docstring's rule.
    ``power=-0.5``: the symmetric square root (F̂ + λI)^(-1/2) instead (same eigenbasis),
    which whitens gradients: (F̂ + λI)^(-1/2) g_i · (F̂ + λI)^(-1/2) g_t = g_iᵀ(F̂ + λI)⁻¹g_t.
    Traceable (jit / vmap safe): ``forward_inf(precondition=...)`` takes it."""
    if not isinstance(factors, CurvatureFactors):
        raise InputError(f"factors: expected CurvatureFactors (fit_kfac), got "
                         f"{type(factors).__name__}")
    check_choice("factors.method", factors.method, METHODS)
    if factors.method == "ekfac" and any(f.corrected is None for f in factors.dense):
        raise InputError("factors: method='ekfac' needs EK-FAC's corrected eigenvalues "
                         "(fit_kfac(..., method='ekfac'))")
    check_damping(damping, allow_none=True)
    if power not in (-1.0, -0.5):
        raise InputError(f"power={power!r}: expected -1 (the inverse) or -0.5 (its square "
                         "root)")
    return functools.partial(_precondition, factors=factors,
                             damping=None if damping is None else float(damping),
                             power=float(power))


def _precondition(grads: Any, *, factors: CurvatureFactors, damping: float | None,
                  power: float = -1.0) -> Any:
    leaves, treedef = jax.tree.flatten(grads)
    paths = param_paths(grads)
    needed = [layer.path for layer in factors.layers] + list(factors.diagonal)
    missing = sorted(set(needed) - set(paths))
    if missing:
        raise InputError(f"grads: expected the params layout the factors were fitted on; "
                         f"missing leaves {missing[:5]}")
    out = list(leaves)
    for layer, factor in zip(factors.layers, factors.dense, strict=True):
        matrix = grad_matrix(layer, leaves).astype(factor.a_eigvecs.dtype)
        lam = damping if damping is not None else _rule_damping(
            layer_damping(factor, factors.method, None))
        set_grad_matrix(layer, out, precondition_in_eigenbasis(matrix, factor, factors.method,
                                                               lam, power))
    for path, diag in factors.diagonal.items():
        k = paths.index(path)
        lam = damping if damping is not None else _rule_damping(
            DAMPING_HEURISTIC * jnp.mean(diag))
        scaled = leaves[k] / (diag + lam) if power == -1.0 else leaves[k] * (diag + lam) ** power
        out[k] = scaled.astype(leaves[k].dtype)
    return jax.tree.unflatten(treedef, out)


def _rule_damping(lam: jax.Array) -> jax.Array:
    """The rule's λ, or 1 for a block whose curvature is exactly zero (a leaf the loss does
    not depend on over the data): there (0 + 1)⁻¹ g = g, the identity, not 0/0."""
    return jnp.where(lam > 0, lam, jnp.ones_like(lam))
