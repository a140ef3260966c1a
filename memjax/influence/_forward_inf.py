"""Forward-INF: mirrored influence from forward passes (Ko et al., CVPR 2024).

Ko, Kang, Zeng, Jia. "The Mirrored Influence Hypothesis: Efficient Data Influence
Estimation by Harnessing Forward Passes", CVPR 2024. The hypothesis: the effect of
removing training example i on test example t's loss mirrors the effect of learning
(or unlearning) t on i's loss. So instead of N retrainings per test example, one update
of θ on t and one forward pass per training example suffice:

    δ(t, i) = L(θ'_t; z_i) − L(θ; z_i),   θ'_t = θ updated on t's loss.

The ``oriented`` score is positive when i supports t (i's loss moves with t's): for
gradient ascent (unlearn t) δ ≈ +lr·g_i·g_t, for descent (learn t) δ ≈ −lr·g_i·g_t, and
``oriented`` is δ resp. −δ, so both directions agree at first order. ``abs`` (|δ|) is the
reference code's choice; ``delta`` is the raw δ.

Layout of the work: the T updated parameter sets (only their trainable leaves) are
computed at the edge and stacked; the training set is batched and sharded over the mesh by
:func:`memjax.engine.score` (``batched=True``: the score function gets a device's rows).
Each device walks its rows in blocks of :data:`BLOCK_ROWS` (``lax.map``, one compiled loop)
and scores a block as ``vmap`` over the T copies (outer) of ``vmap`` over the block's rows
(inner): the base losses once per row, and for a dense first layer the T copies' product
is one [rows, in] × [in, T·out] matrix product. Blocks bound the live activations
([T, BLOCK_ROWS, ...]) to what a 64-row batch used before, while engine batches can be large
(cheap examples: up to :data:`MAX_BATCH_ROWS` rows per device), so the per-batch host work
(transfers, output collection) is paid a few times instead of N/64 times. T is split into
chunks whose stacked copies fit ``memory_budget`` bytes.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memjax._checks import check_choice, device_dtype
from memjax.data.base import ID_FIELD, as_source
from memjax.engine import make_mesh
from memjax.engine import score as engine_score
from memjax.engine.cache import cached_jit
from memjax.engine.mesh import DATA_AXIS, path_name
from memjax.engine.store import ScoreStore
from memjax.errors import InputError

MODES = ("finite", "first_order")
DIRECTIONS = ("ascent", "descent")
OPTIMIZERS = ("sgd", "adam", "sign")
SCORES = ("oriented", "delta", "abs")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of stacked updated parameters per chunk of T
# Rows of a device's batch scored together (the activations of BLOCK_ROWS × T copies live at
# once); 64 rows per device was the previous default engine batch, so peak activation memory
# is unchanged.
BLOCK_ROWS = 64
# Default engine batch, per data device: as many rows as fit BATCH_BYTES of inputs and
# scores, between BLOCK_ROWS and MAX_BATCH_ROWS. On the digits MLP (bench/influence.py) the
# previous default, 29 batches of 64 rows, spent about a third of each call on per-batch
# host work (transfers, output collection; cProfile).
MAX_BATCH_ROWS = 1024
BATCH_BYTES = 16 << 20

LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]


# ---- trainable leaves ---------------------------------------------------------------

def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_paths(params: Any) -> list[str]:
    """The path name of every array leaf of ``params`` (``jax.tree.leaves`` order), e.g.
    ``"vit/layers/0/fc1/kernel"``: what :func:`trainable_mask`'s patterns match."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def glob_predicate(params: Any, patterns: Any) -> Callable[[str], bool]:
    """``path -> bool``: does any of the fnmatch ``patterns`` match the parameter path.

    A pattern matching no parameter path is an ``InputError`` that lists every path, so a
    misspelt ``--trainable`` never silently freezes the whole model. ``*`` also matches
    ``/`` (``"classifier*"`` selects ``classifier/kernel`` and ``classifier/bias``).
    """
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise InputError(f"trainable: expected non-empty glob patterns over parameter "
                         f"paths, got {patterns!r}")
    paths = param_paths(params)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(x, p) for x in paths)]
    if unmatched:
        raise InputError(f"trainable: the pattern(s) {unmatched} match no parameter; the "
                         f"parameter paths are: {', '.join(paths)}")
    return functools.partial(_matches_any, patterns=patterns)


def _matches_any(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def trainable_mask(params: Any, trainable: Any = None) -> list[bool]:
    """One bool per array leaf of ``params`` (``jax.tree.leaves`` order): updated or not.

    Args:
      params: a pytree of arrays (dicts, Flax NNX ``State``, ...).
      trainable: None (every float leaf), a pytree of bools with the structure of
        ``params`` (for an NNX state, one bool per ``Variable`` also works), a predicate
        ``trainable(path) -> bool`` on the leaf's path name (e.g. ``"layers/0/kernel"``),
        or glob patterns over those path names (a string or a list/tuple of strings, see
        :func:`glob_predicate`; a pattern that matches nothing is an error).

    Non-float leaves and NNX ``BatchStat`` variables are never trainable: Forward-INF
    measures the effect of a gradient step, and BatchNorm running statistics are not
    parameters of the loss (the reference code lets them drift in train mode).
    """
    nodes = jax.tree.leaves(params, is_leaf=_is_variable)
    allowed, per_node = [], []
    for node in nodes:
        arrays = jax.tree.leaves(node)
        per_node.append(len(arrays))
        frozen = isinstance(node, nnx.BatchStat)
        allowed.extend(not frozen and jnp.issubdtype(jnp.result_type(a), jnp.floating)
                       for a in arrays)
    if isinstance(trainable, str) or (isinstance(trainable, (list, tuple)) and trainable
                                      and all(isinstance(t, str) for t in trainable)):
        trainable = glob_predicate(params, trainable)
    if trainable is None:
        user = [True] * len(allowed)
    elif callable(trainable):
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        user = [bool(trainable(path_name(p))) for p, _ in paths]
    else:
        leaves, treedef = jax.tree.flatten(trainable)
        if any(not isinstance(v, (bool, np.bool_)) for v in leaves):
            raise InputError("trainable: expected a pytree of Python/NumPy bools, a predicate "
                             "on the parameter path, or None")
        if treedef == jax.tree.structure(params):
            user = [bool(v) for v in leaves]
        elif treedef == jax.tree.structure(params, is_leaf=_is_variable):
            user = [bool(v) for v, n in zip(leaves, per_node, strict=True) for _ in range(n)]
        else:
            raise InputError(f"trainable: its structure {treedef} does not match params "
                             f"{jax.tree.structure(params)}; expected one bool per parameter")
    mask = [u and a for u, a in zip(user, allowed, strict=True)]
    if not any(mask):
        raise InputError("trainable: no float parameter is selected for the update; expected "
                         "at least one trainable float leaf (BatchStat and integer leaves are "
                         "always frozen)")
    return mask


def select_trainable(leaves: list, mask: tuple[bool, ...]) -> list:
    """The trainable leaves (``mask`` from :func:`trainable_mask`), in order."""
    return [leaf for leaf, m in zip(leaves, mask, strict=True) if m]


def merge_trainable(leaves: list, mask: tuple[bool, ...], train: list) -> list:
    """All leaves, with the trainable ones replaced by ``train`` (in order)."""
    it = iter(train)
    return [next(it) if m else leaf for leaf, m in zip(leaves, mask, strict=True)]


# ---- the update on test examples (pure) ---------------------------------------------

def loss_at(loss_fn: LossFn, treedef: Any, leaves: list, mask: tuple[bool, ...],
            train: list, example: dict[str, jax.Array]) -> jax.Array:
    """``loss_fn`` of one example at the parameters ``leaves`` with the trainable ones
    replaced by ``train``."""
    return loss_fn(jax.tree.unflatten(treedef, merge_trainable(leaves, mask, train)), example)


def trainable_grad(loss_fn: LossFn, treedef: Any, leaves: list, mask: tuple[bool, ...],
                   example: dict[str, jax.Array]) -> list:
    """∇ of ``loss_fn`` on one example with respect to the trainable leaves (a list in
    ``select_trainable`` order), the frozen ones held at ``leaves``."""
    return jax.grad(lambda train: loss_at(loss_fn, treedef, leaves, mask, train, example))(
        select_trainable(leaves, mask))


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """SGD, Adam (fresh state per test example) or the sign step θ ← θ − lr·sign(g)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    return optax.chain(optax.scale_by_sign(), optax.scale(-lr))


def update_params(objective: Callable[[list], jax.Array], train: list,
                  tx: optax.GradientTransformation, steps: int,
                  transform_grad: Callable[[list], list] | None = None) -> list:
    """``steps`` optimizer steps minimizing ``objective`` from ``train`` (a list of leaves).

    ``transform_grad`` (list of leaves -> list of leaves), when given, maps each gradient
    before the optimizer sees it (e.g. an inverse-curvature preconditioner)."""
    def step(carry, _):
        w, state = carry
        grad = jax.grad(objective)(w)
        if transform_grad is not None:
            grad = transform_grad(grad)
        updates, state = tx.update(grad, state, w)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.lax.scan(step, (train, tx.init(train)), None, length=steps)
    return w


def small_step_tangent(grad: list, optimizer: str, lr: float, steps: int) -> list:
    """The direction of ``steps`` small optimizer steps from θ, as a list of leaves."""
    # The small-step limit of `steps` steps from θ: every step moves along the first one.
    # Adam's first step is lr·g/(|g|+eps): a sign step up to eps.
    if optimizer == "sgd":
        return [steps * lr * g for g in grad]
    return [steps * lr * jnp.sign(g) for g in grad]


def precondition_trainable(precondition: Callable[[Any], Any], treedef: Any, leaves: list,
                           mask: tuple[bool, ...], grad: list) -> list:
    """``precondition`` applied to a gradient given as its trainable leaves.

    ``precondition`` sees the gradient in the params layout (``treedef``), with zeros on the
    frozen leaves, and must return the same layout; its frozen leaves are dropped.
    """
    zeros = [jnp.zeros_like(leaf) for leaf in leaves]
    full = jax.tree.unflatten(treedef, merge_trainable(zeros, mask, grad))
    out = precondition(full)
    out_leaves, out_def = jax.tree.flatten(out)
    if out_def != treedef:
        raise InputError(f"precondition: expected it to return the params layout {treedef}, "
                         f"got {out_def}")
    return [o.astype(g.dtype) for o, g in zip(select_trainable(out_leaves, mask), grad,
                                              strict=True)]


# ---- per training example functions (run by the engine) -----------------------------

def _finish(oriented_or_delta: jax.Array, score: str, orient: float, is_delta: bool):
    delta = oriented_or_delta if is_delta else orient * oriented_or_delta
    if score == "delta":
        return delta
    if score == "abs":
        return jnp.abs(delta)
    return orient * delta  # orient = ±1, so this is δ for ascent and −δ for descent


def in_blocks(block_fn: Callable[[dict[str, jax.Array]], jax.Array],
              rows: dict[str, jax.Array], block_rows: int) -> jax.Array:
    """``block_fn`` over ``rows`` in blocks of ``block_rows`` rows, concatenated.

    Args:
      block_fn: ``{field: [b, ...]} -> [b, ...]``, rows independent of each other.
      rows: fields with a common leading axis n.
      block_rows: rows per block (> 0).

    Returns:
      ``block_fn(rows)`` computed block by block: the ``n // block_rows`` full blocks in one
      ``lax.map`` (one compiled loop body), the remainder as one smaller block (no padding).
      Fewer than two full blocks (n < 2·block_rows) run as one block.
    """
    n = next(iter(rows.values())).shape[0]
    full, rest = divmod(n, block_rows)
    if full <= 1:
        return block_fn(rows)
    head = jax.tree.map(lambda x: x[:full * block_rows].reshape(full, block_rows, *x.shape[1:]),
                        rows)
    mapped = jax.lax.map(block_fn, head)
    out = mapped.reshape(full * block_rows, *mapped.shape[2:])
    if rest:
        tail = block_fn(jax.tree.map(lambda x: x[full * block_rows:], rows))
        out = jnp.concatenate([out, tail], axis=0)
    return out


def _finite_block(loss_fn: LossFn, treedef: Any, mask: tuple[bool, ...], score: str,
                  orient: float, leaves: list, stacked: list,
                  rows: dict[str, jax.Array]) -> jax.Array:
    """Scores [b, Tc] of b training rows against the Tc updated copies ``stacked``."""
    base = jax.vmap(lambda ex: loss_fn(jax.tree.unflatten(treedef, leaves), ex))(rows)

    def losses_of_copy(train):  # [b]: one updated copy on every row
        return jax.vmap(lambda ex: loss_at(loss_fn, treedef, leaves, mask, train, ex))(rows)

    updated = jax.vmap(losses_of_copy)(stacked)  # [Tc, b]: copies outer, rows inner
    return _finish(updated.T - base[:, None], score, orient, is_delta=True)


def _first_order_block(loss_fn: LossFn, treedef: Any, mask: tuple[bool, ...], score: str,
                       orient: float, leaves: list, tangents: list,
                       rows: dict[str, jax.Array]) -> jax.Array:
    """Oriented scores g_i·v_t [b, Tc] of b training rows against the Tc ``tangents``."""
    train0 = select_trainable(leaves, mask)

    def dot(example, tangent):  # g_i·v_t by one jvp; g_i is never formed
        def loss_of(train):
            return loss_at(loss_fn, treedef, leaves, mask, train, example)

        return jax.jvp(loss_of, (train0,), (tangent,))[1]

    def dots_of_tangent(tangent):  # [b]; the primal does not depend on the tangent, so
        return jax.vmap(lambda ex: dot(ex, tangent))(rows)  # vmap computes it once

    dots = jax.vmap(dots_of_tangent)(tangents)  # [Tc, b]
    return _finish(dots.T, score, orient, is_delta=False)


# The makers below build fresh closures; the engine keys compiled programs by value, so
# equal losses and settings reuse their compilations across calls.
def _finite_score_fn(loss_fn: LossFn, treedef: Any, mask: tuple[bool, ...], score: str,
                     orient: float) -> Callable:
    """``fn((leaves, stacked), rows) -> [b, Tc]`` for the engine's ``batched=True``."""
    def fn(p, rows):
        leaves, stacked = p  # all base leaves; trainable leaves of Tc updated copies [Tc, ...]
        block = functools.partial(_finite_block, loss_fn, treedef, mask, score, orient,
                                  leaves, stacked)
        return in_blocks(block, rows, BLOCK_ROWS)

    return fn


def _first_order_score_fn(loss_fn: LossFn, treedef: Any, mask: tuple[bool, ...], score: str,
                          orient: float) -> Callable:
    """``fn((leaves, tangents), rows) -> [b, Tc]`` for the engine's ``batched=True``."""
    def fn(p, rows):
        leaves, tangents = p  # tangents: [Tc, ...] per trainable leaf
        block = functools.partial(_first_order_block, loss_fn, treedef, mask, score, orient,
                                  leaves, tangents)
        return in_blocks(block, rows, BLOCK_ROWS)

    return fn


def default_batch_size(n_examples: int, row_bytes: int, n_data: int, fixed: bool) -> int:
    """The engine batch when the caller gives none (rows over all ``n_data`` devices).

    Per device: as many rows as fit ``BATCH_BYTES`` at ``row_bytes`` each (inputs and
    scores), a multiple of ``BLOCK_ROWS`` between ``BLOCK_ROWS`` and ``MAX_BATCH_ROWS``.
    ``fixed`` (a store: its chunks are multiples of the batch and a resume must see the same
    batch) returns that; otherwise the fewest batches of at most that size, made equal
    (rounded up to a multiple of 8 rows per device) so the padded last batch is nearly full.
    """
    per_device = min(MAX_BATCH_ROWS, max(BLOCK_ROWS, BATCH_BYTES // max(row_bytes, 1)))
    per_device -= per_device % BLOCK_ROWS
    if fixed:
        return per_device * n_data
    n_batches = -(-n_examples // (per_device * n_data))
    rows = -(-n_examples // (n_batches * n_data))
    return n_data * min(per_device, 8 * -(-rows // 8))


# ---- validation ---------------------------------------------------------------------

def _host_array(name: str, value: Any) -> np.ndarray:
    value = np.asarray(value)
    # The engine feeds training examples as float32/int32; test examples must match.
    return value.astype(device_dtype(value.dtype))


def _check_test(test: Any) -> dict[str, np.ndarray]:
    if not isinstance(test, Mapping):
        raise InputError(f"test: expected a dict of arrays (field -> [T, ...]), got "
                         f"{type(test).__name__}")
    fields = {k: _host_array(k, v) for k, v in test.items() if k != ID_FIELD}
    fields = {k: v for k, v in fields.items() if v.dtype.kind in "biuf"}
    if not fields:
        raise InputError("test: expected at least one numeric field")
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in fields.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise InputError(f"test: every field needs the same leading axis T, got {sizes}")
    if next(iter(sizes.values())) == 0:
        raise InputError("test: T = 0 test examples; expected at least one")
    return fields


def _check_matching(test: dict[str, np.ndarray], train_example: dict[str, np.ndarray]) -> None:
    train = {k: v for k, v in train_example.items() if k != ID_FIELD and v.dtype.kind in "biuf"}
    if set(test) != set(train):
        raise InputError(f"test fields {sorted(test)} do not match train fields "
                         f"{sorted(train)}; expected the same numeric fields")
    for k in test:
        if test[k].shape[1:] != train[k].shape[1:]:
            raise InputError(f"test field {k!r} has per-example shape {test[k].shape[1:]} but "
                             f"train has {train[k].shape[1:]}; expected the same shape")


def _check_loss(loss_fn: Any, params: Any, test: dict[str, np.ndarray]) -> None:
    if not callable(loss_fn):
        raise InputError(f"loss_fn: expected a function loss_fn(params, example), got "
                         f"{type(loss_fn).__name__}")
    example = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in test.items()}
    out = jax.eval_shape(loss_fn, params, example)
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)):
        raise InputError(f"loss_fn: expected a float scalar loss for ONE example, got "
                         f"{jax.tree.map(lambda s: (s.shape, s.dtype), out)}")


def _check_positive(name: str, value: Any, integer: bool) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value <= 0:
        kind = "integer" if integer else "number"
        raise InputError(f"{name}={value!r}: expected a positive finite {kind}")


def check_settings(*, mode: str, optimizer: str, lr: Any, steps: Any,
                   precondition: Any = None) -> None:
    """InputError unless mode, optimizer, lr > 0, steps >= 1 and precondition (None, or a
    function used with ``optimizer="sgd"``) are valid."""
    check_choice("mode", mode, MODES)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_positive("lr", lr, integer=False)
    _check_positive("steps", steps, integer=True)
    if precondition is not None:
        if not callable(precondition):
            raise InputError(f"precondition: expected a function grads -> preconditioned "
                             f"grads (params layout), got {type(precondition).__name__}")
        if optimizer != "sgd":
            raise InputError(f"precondition: defined for optimizer='sgd' only (θ' = θ ± "
                             f"lr·P∇L(t)), got optimizer={optimizer!r}; a sign or Adam step "
                             "would discard the preconditioned magnitudes")


# ---- entry point --------------------------------------------------------------------

def forward_inf(
    loss_fn: LossFn,
    params: Any,
    test: Mapping[str, Any],
    train: Any,
    *,
    mode: str = "finite",
    direction: str = "ascent",
    optimizer: str = "sgd",
    lr: float,
    steps: int = 1,
    group: bool = False,
    score: str = "oriented",
    trainable: Any = None,
    precondition: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
    store: ScoreStore | str | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> np.ndarray | ScoreStore:
    """Forward-INF influence of every training example on every test example.

    Ko et al., "The Mirrored Influence Hypothesis: Efficient Data Influence Estimation by
    Harnessing Forward Passes", CVPR 2024.

    For test example t, θ'_t is θ after ``steps`` steps of ``optimizer`` (fresh state) on
    t's loss (``ascent``: unlearn t; ``descent``: learn t); then every training example i
    gets δ = L(θ'_t; z_i) − L(θ; z_i). Base losses L(θ; z_i) are computed once per training
    example per chunk of T (once when all T fit ``memory_budget``), never per test example.

    ``first_order`` computes the same oriented quantity in the small-step limit with a
    ``jax.jvp`` per training example vmapped over all test tangents v_t (its primal,
    independent of the tangent, is computed once per training example)
    (``steps·lr·g_t`` for sgd, ``steps·lr·sign(g_t)`` for sign and Adam, whose first step is
    a sign step up to eps): oriented = g_i·v_t, δ = ±g_i·v_t. No per-example gradient of
    a training example is ever formed.

    ``precondition`` (a pure, traceable ``grads -> P grads`` on the params layout, e.g.
    :func:`dense_preconditioner`, :func:`cg_preconditioner`, :func:`ekfac_preconditioner`)
    replaces each test gradient g_t by P g_t before the update (SGD only): θ' = θ ± lr·P g_t,
    and at first order oriented = lr·steps·g_i·P g_t. With P = (H + λI)⁻¹, H the Hessian of
    the training objective, this is the influence-function score (Koh & Liang, ICML 2017)
    up to the factor 1/n, computed with forward passes over the training set. In finite mode
    the fixed P multiplies every step's gradient (taken at that step's parameters).

    Differences from the reference code (reds-lab/Forward-INF): BatchNorm statistics
    (NNX ``BatchStat``) are frozen rather than drifting in train mode; base losses are not
    recomputed per test example; its |δ| is ``score="abs"`` here, not the default.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      params: pytree of arrays (e.g. an NNX ``State``; ``loss_fn`` merges it).
      test: dict of arrays field -> [T, ...], the same numeric fields as ``train``.
      train: any engine source (dict of arrays [N, ...] or a ``memjax.data`` source).
      mode: ``"finite"`` (real update) or ``"first_order"`` (jvp, small-step limit).
      direction: ``"ascent"`` (unlearn t) or ``"descent"`` (learn t).
      optimizer: ``"sgd"``, ``"adam"`` or ``"sign"``.
      lr: step size (> 0).
      steps: number of update steps (> 0).
      group: one update on the mean loss of all T test examples; returns [N].
      score: ``"oriented"`` (positive = supports), ``"delta"`` (raw δ) or ``"abs"`` (|δ|).
      trainable: which leaves are updated (see :func:`trainable_mask`).
      precondition: None (plain step) or ``grads -> P grads``; it receives the gradient
        in the params layout with zeros on frozen leaves. ``optimizer="sgd"`` only.
      batch_size: training examples per engine batch (default: per data device, as many
        rows as fit 16 MiB of inputs and scores, 64 to 1,024; without a store, the fewest
        such batches made equal, see :func:`default_batch_size`). Each device scores its
        rows in blocks of :data:`BLOCK_ROWS`, so the batch size sets the host round trips,
        not the activation memory.
      mesh: the engine mesh (default: every device on ``data``).
      store: a :class:`ScoreStore` or folder: scores stream there (field ``score``,
        [N, T] or [N]) and the store is returned. All T copies must fit ``memory_budget``.
      memory_budget: bytes of stacked updated (trainable) parameters per chunk of T.
      progress: print training examples/s.

    Returns:
      float32 [T, N] (or [N] with ``group=True``), or the completed store.
    """
    check_settings(mode=mode, optimizer=optimizer, lr=lr, steps=steps,
                   precondition=precondition)
    direction = check_choice("direction", direction, DIRECTIONS)
    score = check_choice("score", score, SCORES)
    _check_positive("memory_budget", memory_budget, integer=True)
    test = _check_test(test)
    source = as_source(train, name="train")
    _check_matching(test, source.read(np.zeros(1, dtype=np.int64)))
    _check_loss(loss_fn, params, test)
    mask = trainable_mask(params, trainable)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    mesh = make_mesh() if mesh is None else mesh

    n_test = next(iter(test.values())).shape[0]
    n_copies = 1 if group else n_test
    copy_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in select_trainable(leaves, mask))
    chunk = max(1, min(n_copies, memory_budget // max(copy_bytes, 1)))
    if batch_size is None:
        row_bytes = sum(v[0].nbytes for v in test.values()) + 4 * chunk
        batch_size = default_batch_size(len(source), row_bytes, mesh.shape[DATA_AXIS],
                                        fixed=store is not None)
    if store is not None and chunk < n_copies:
        raise InputError(f"store: the {n_copies} updated parameter copies ({copy_bytes} bytes "
                         f"each) exceed memory_budget={memory_budget}; with store=, pass at "
                         f"most {chunk} test examples per call (one store per call) or raise "
                         "memory_budget")

    orient = 1.0 if direction == "ascent" else -1.0
    make_fn = _finite_score_fn if mode == "finite" else _first_order_score_fn
    # One function object for every chunk, so the engine compiles it once.
    fn = make_fn(loss_fn, treedef, tuple(mask), score, orient)
    per_test = _per_test_fn(loss_fn, treedef, tuple(mask), mode, orient, optimizer,
                            float(lr), int(steps), group, precondition)

    results = []
    for lo in range(0, n_copies, chunk):
        hi = min(lo + chunk, n_copies)
        # Pad the last chunk with copies of its first example: one compile for all chunks.
        rows = np.minimum(np.arange(lo, lo + chunk), hi - 1) if not group else None
        batch = test if group else {k: v[rows] for k, v in test.items()}
        stacked = per_test(leaves, batch)
        out = engine_score(fn, (leaves, stacked), source, batch_size=batch_size, mesh=mesh,
                           store=store, progress=progress, batched=True)
        if store is not None:
            return out
        results.append(np.asarray(out["score"])[:, :hi - lo].T)
    scores = np.concatenate(results, axis=0)
    return scores[0] if group else scores


def _per_test_fn(loss_fn: LossFn, treedef: Any, mask: tuple[bool, ...], mode: str,
                 orient: float, optimizer: str, lr: float, steps: int, group: bool,
                 precondition: Callable[[Any], Any] | None = None,
                 ) -> Callable[[list, dict[str, np.ndarray]], list]:
    """(base leaves, batch of test examples) -> stacked trainable leaves (finite) or
    tangents (first order).

    With ``group`` the whole batch is one "test example" (mean loss) and the result has a
    leading axis of 1. Jitted here, at the entry point (shared by equal settings:
    :func:`memjax.engine.cached_jit`).
    """
    def loss_on(leaves, train, example):
        return loss_at(loss_fn, treedef, leaves, mask, train, example)

    def test_loss(leaves, train, examples):
        if group:
            return jnp.mean(jax.vmap(loss_on, in_axes=(None, None, 0))(leaves, train,
                                                                       examples))
        return loss_on(leaves, train, examples)

    def one(leaves, examples):
        train0 = select_trainable(leaves, mask)
        transform = None
        if precondition is not None:
            transform = functools.partial(precondition_trainable, precondition, treedef,
                                          leaves, mask)
        if mode == "first_order":
            grad = jax.grad(test_loss, argnums=1)(leaves, train0, examples)
            if transform is not None:
                grad = transform(grad)
            return small_step_tangent(grad, optimizer, lr, steps)
        # Ascent maximizes the test loss: minimize orient·(−loss) = −loss.
        objective = lambda w: -orient * test_loss(leaves, w, examples)  # noqa: E731
        return update_params(objective, train0, make_optimizer(optimizer, lr), steps,
                             transform)

    if group:
        return cached_jit(lambda leaves, batch: jax.tree.map(lambda x: x[None],
                                                             one(leaves, batch)))
    return cached_jit(jax.vmap(one, in_axes=(None, 0)))
