"""Dense layers of any JAX model, found in its jaxpr, and their K-FAC inputs and gradients.

K-FAC (Martens & Grosse 2015) needs, per dense layer ``s = W a``, the layer's input
activations ``a`` and pre-activation gradients ``g = dL/ds`` at every position the weight is
applied at (tokens, patches; one position for an MLP layer). Models loaded by
:func:`memjax.load` do not announce their layers, so, as kfac-jax does, the layers are read
from the jaxpr of ``loss_fn(params, example)`` for ONE example:

- the jaxpr is walked recursively, looking inside nested ``jit`` / ``closed_call`` /
  ``custom_jvp_call`` / ``custom_vjp_call`` equations;
- a *view* of a params leaf is the leaf through ``convert_element_type``, ``reshape``,
  ``squeeze``, ``transpose`` or ``copy`` (bijections of its elements);
- a *dense use* is a ``dot_general`` without batch dimensions whose one operand is a view of
  a leaf and whose other operand is not;
- a leaf is a dense layer only if its ONLY use is one dense use. Tied embeddings (a gather
  and a dot), weights applied twice, leaves inside ``scan`` / ``while`` / ``cond`` / remat,
  convolutions and gathers do not qualify: :mod:`memjax.influence._generic_kfac` gives them
  a diagonal Fisher instead;
- a bias leaf is paired with a layer when its only use is being added (possibly through
  views and a ``broadcast_in_dim`` over positions) to that dot's output, and that output is
  used by nothing else; any other bias is a leaf of its own.

Shapes: the kernel operand K has contracting axes c_K and free axes f_K; the layer's matrix
is W = transpose(K, c_K + f_K).reshape(in, out), the activation operand X gives
a = transpose(X, f_X + c_X).reshape(S, in) and the dot's output gradient
g [S, out], so that ∇W = aᵀ g = Σ_s a_s g_sᵀ (S = product of X's free axes).

:func:`layer_inputs_and_output_grads` re-evaluates the jaxpr with an interpreter that
records each layer's ``a`` and adds a zero *probe* to each layer's output; one ``jax.grad``
with respect to the probes gives every ``g`` (one forward and one backward pass). It is a
pure function of traced values, so it runs under ``jax.vmap`` over examples and ``jit``.
Equations without a layer inside are bound unchanged (custom derivative rules kept).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from memjax.engine.mesh import path_name
from memjax.errors import InputError

VIEW_PRIMITIVES = ("convert_element_type", "reshape", "squeeze", "transpose", "copy", "copy_p")
CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                   "custom_vjp_call")

LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One dense layer found in the jaxpr (module docstring for the shapes).

    path / index: the kernel leaf's ``param_paths`` name and position in ``jax.tree.leaves``;
    in_dim / out_dim: W's shape [in, out]; kernel_views: the views from the leaf to the dot's
    operand K, as ``("reshape", from_shape, to_shape)`` / ``("transpose", perm)`` steps;
    kernel_contract / kernel_free: K's contracting / free axes; bias_path / bias_index /
    bias_views: the paired bias leaf (None when the layer has none) and its views to shape
    K.shape[f_K]."""

    path: str
    index: int
    in_dim: int
    out_dim: int
    kernel_views: tuple
    kernel_contract: tuple[int, ...]
    kernel_free: tuple[int, ...]
    bias_path: str | None = None
    bias_index: int | None = None
    bias_views: tuple = ()

    @property
    def has_bias(self) -> bool:
        return self.bias_path is not None


@dataclasses.dataclass(frozen=True)
class _Origin:
    """A value that is a view of params leaf ``leaf``; ``broadcast`` = broadcast_in_dim's
    (dims, shape) once broadcast (then it may only be added to a layer's output)."""

    leaf: int
    views: tuple
    shape: tuple[int, ...]
    broadcast: tuple | None = None


@dataclasses.dataclass
class _Dot:
    loc: tuple[int, ...]
    origin: _Origin
    kernel_side: int  # 0: K is dot_general's lhs, 1: its rhs
    contract: tuple[int, ...]
    free: tuple[int, ...]
    other_contract: tuple[int, ...]
    other_free: tuple[int, ...]
    out_shape: tuple[int, ...]
    outvar: Any = None


@dataclasses.dataclass
class _Scan:
    uses: dict[int, list] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    dots: dict[tuple, _Dot] = dataclasses.field(default_factory=dict)


def _inner(eqn) -> jcore.ClosedJaxpr | None:
    """The sub-jaxpr of a call equation this module inlines, else None."""
    if eqn.primitive.name not in CALL_PRIMITIVES:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, jcore.Jaxpr):
        inner = jcore.ClosedJaxpr(inner, ())
    if not isinstance(inner, jcore.ClosedJaxpr) or len(inner.jaxpr.invars) != len(eqn.invars):
        return None
    return inner


def _view_step(eqn, shape):
    name, out_shape = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
    if name == "transpose":
        return ("transpose", tuple(eqn.params["permutation"]))
    if name in ("reshape", "squeeze"):
        if name == "reshape" and eqn.params.get("dimensions") is not None:
            return None
        return ("reshape", tuple(shape), out_shape)
    return ()  # convert_element_type, copy: no change of layout


def _dot_use(eqn, loc: tuple, ins: list) -> _Dot | None:
    """The dense use of a leaf view in a ``dot_general``, or None (batch dimensions, both
    or neither operand a view, a broadcast kernel)."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    if lhs_b or rhs_b or (ins[0] is None) == (ins[1] is None):
        return None
    side = 0 if ins[0] is not None else 1
    origin = ins[side]
    if origin.broadcast is not None:
        return None
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    contracts = [tuple(int(c) for c in lhs_c), tuple(int(c) for c in rhs_c)]
    frees = [tuple(d for d in range(len(shapes[k])) if d not in contracts[k]) for k in (0, 1)]
    return _Dot(loc, origin, side, contracts[side], frees[side], contracts[1 - side],
                frees[1 - side], tuple(eqn.outvars[0].aval.shape), outvar=eqn.outvars[0])


def _bias_use(dots_here: dict, origin: _Origin, other: Any) -> tuple | None:
    """(dot, origin) when ``origin`` (a bias view) is added onto a layer's output ``other``."""
    dot = dots_here.get(other) if isinstance(other, jcore.Var) else None
    if dot is None:
        return None
    out_positions = _kernel_out_positions(dot)
    free_shape = tuple(dot.origin.shape[d] for d in dot.free)
    if origin.broadcast is None:
        ok = origin.shape == free_shape and dot.out_shape == free_shape
    else:
        dims, shape = origin.broadcast
        ok = origin.shape == free_shape and tuple(dims) == out_positions \
            and tuple(shape) == dot.out_shape
    return (dot, origin) if ok else None


def _kernel_out_positions(dot: _Dot) -> tuple[int, ...]:
    """The dot output's axes that come from K's free axes."""
    n_other = len(dot.other_free)
    if dot.kernel_side == 1:
        return tuple(range(n_other, n_other + len(dot.free)))
    return tuple(range(len(dot.free)))


def _scan(jaxpr: jcore.Jaxpr, origins: list, prefix: tuple, state: _Scan, biases: list):
    """Walk ``jaxpr`` with ``origins`` for its invars; record every use of a leaf view."""
    env: dict = dict(zip(jaxpr.invars, origins, strict=True))
    readers = collections.Counter(v for e in jaxpr.eqns for v in e.invars
                                  if isinstance(v, jcore.Var))
    readers.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
    dots_here: dict = {}

    def origin_of(v):
        return env.get(v) if isinstance(v, jcore.Var) else None

    for i, eqn in enumerate(jaxpr.eqns):
        loc = prefix + (i,)
        ins = [origin_of(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(o is not None for o in ins):
            continue
        if name in VIEW_PRIMITIVES and ins[0] is not None and ins[0].broadcast is None:
            step = _view_step(eqn, ins[0].shape)
            if step is not None:
                views = ins[0].views + ((step,) if step else ())
                env[eqn.outvars[0]] = _Origin(ins[0].leaf, views,
                                              tuple(eqn.outvars[0].aval.shape))
                continue
        if name == "broadcast_in_dim" and ins[0] is not None and ins[0].broadcast is None \
                and readers[eqn.outvars[0]] == 1:
            env[eqn.outvars[0]] = dataclasses.replace(ins[0], broadcast=(
                tuple(eqn.params["broadcast_dimensions"]), tuple(eqn.params["shape"])))
            continue
        inner = _inner(eqn)
        if inner is not None:
            outs = _scan(inner.jaxpr, ins, loc, state, biases)
            for var, origin in zip(eqn.outvars, outs, strict=True):
                if origin is not None:
                    env[var] = origin
            continue
        if name == "dot_general":
            dot = _dot_use(eqn, loc, ins)
            if dot is not None:
                state.dots[loc] = dot
                state.uses[dot.origin.leaf].append(("dot", loc))
                if readers[eqn.outvars[0]] == 1:
                    dots_here[eqn.outvars[0]] = dot
                continue
        if name == "add" and len(ins) == 2 and sum(o is not None for o in ins) == 1:
            k = 0 if ins[0] is not None else 1
            found = _bias_use(dots_here, ins[k], eqn.invars[1 - k])
            if found is not None:
                state.uses[ins[k].leaf].append(("bias", found[0].loc))
                biases.append(found)
                continue
        for origin in ins:
            if origin is not None:
                state.uses[origin.leaf].append(("other", loc))
    return [origin_of(v) for v in jaxpr.outvars]


def _trace(loss_fn: LossFn, params: Any, example: Any):
    leaves, treedef = jax.tree.flatten(params)
    ex_leaves, ex_def = jax.tree.flatten(example)

    def flat_loss(param_leaves, example_leaves):
        return loss_fn(jax.tree.unflatten(treedef, param_leaves),
                       jax.tree.unflatten(ex_def, example_leaves))

    def spec(x):
        dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(dtype))

    specs = [[spec(x) for x in group] for group in (leaves, ex_leaves)]
    closed = jax.make_jaxpr(flat_loss)(*specs)
    if len(closed.jaxpr.outvars) != 1 or closed.out_avals[0].shape != ():
        raise InputError(f"loss_fn: expected a scalar loss for one example, got "
                         f"{[a.shape for a in closed.out_avals]}")
    return closed, leaves, treedef


def _analyse(closed, leaves, treedef) -> tuple[list[DenseLayer], dict[str, _Dot]]:
    n = len(leaves)
    origins = [_Origin(k, (), tuple(np.shape(x))) for k, x in enumerate(leaves)]
    origins += [None] * (len(closed.jaxpr.invars) - n)
    state, biases = _Scan(), []
    outs = _scan(closed.jaxpr, origins, (), state, biases)
    for origin in outs:
        if origin is not None:
            state.uses[origin.leaf].append(("other", ()))
    paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(treedef, leaves))[0]]
    bias_of = {dot.loc: origin for dot, origin in biases
               if state.uses[origin.leaf] == [("bias", dot.loc)]}
    layers, dots = [], {}
    for leaf in range(n):
        uses = state.uses.get(leaf, [])
        if len(uses) != 1 or uses[0][0] != "dot":
            continue
        dot = state.dots[uses[0][1]]
        bias = bias_of.get(dot.loc)
        shape = dot.origin.shape
        layers.append(DenseLayer(
            path=paths[leaf], index=leaf,
            in_dim=math.prod(shape[d] for d in dot.contract),
            out_dim=math.prod(shape[d] for d in dot.free),
            kernel_views=dot.origin.views, kernel_contract=dot.contract, kernel_free=dot.free,
            bias_path=None if bias is None else paths[bias.leaf],
            bias_index=None if bias is None else bias.leaf,
            bias_views=() if bias is None else bias.views))
        dots[paths[leaf]] = dot
    return layers, dots


def find_dense_layers(loss_fn: LossFn, params: Any, example: Any) -> list[DenseLayer]:
    """The dense layers of ``loss_fn(params, example)`` (ONE example, no batch axis), in
    ``jax.tree.leaves(params)`` order of their kernels (module docstring for what counts).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, pure JAX (e.g.
        ``functools.partial(memjax.influence.causal_lm_loss, model.apply)``).
      params: the params pytree (arrays or ShapeDtypeStructs).
      example: one example (a dict of arrays, or ShapeDtypeStructs).
    """
    closed, leaves, treedef = _trace(loss_fn, params, example)
    return _analyse(closed, leaves, treedef)[0]


# ---- recording interpreter -------------------------------------------------------------


def _activation_matrix(x: jax.Array, dot: _Dot) -> jax.Array:
    """X (the dot's non-kernel operand) as [S, in], in W's row order."""
    return jnp.transpose(x, dot.other_free + dot.other_contract).reshape(
        -1, math.prod(x.shape[d] for d in dot.other_contract))


def _output_matrix(y: jax.Array, dot: _Dot) -> jax.Array:
    """The dot's output [..] as [S, out] (positions first, K's free axes last)."""
    k_pos = _kernel_out_positions(dot)
    rest = tuple(d for d in range(y.ndim) if d not in k_pos)
    return jnp.transpose(y, rest + k_pos).reshape(-1, math.prod(y.shape[d] for d in k_pos))


def _evaluate(jaxpr: jcore.Jaxpr, consts, args, prefix: tuple, hooks: dict, probes: dict,
              record: dict):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for i, eqn in enumerate(jaxpr.eqns):
        loc = prefix + (i,)
        invals = [read(v) for v in eqn.invars]
        inner = _inner(eqn)
        if inner is not None and any(h[:len(loc)] == loc and len(h) > len(loc) for h in hooks):
            outs = _evaluate(inner.jaxpr, inner.consts, invals, loc, hooks, probes, record)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if loc in hooks:
                path, dot = hooks[loc]
                record[path] = _activation_matrix(invals[1 - dot.kernel_side], dot)
                outs = [outs[0] + probes[path].astype(outs[0].dtype)]
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def layer_inputs_and_output_grads(loss_fn: LossFn, params: Any, example: Any,
                                  layers: list[DenseLayer]) -> dict[str, tuple]:
    """Per layer ``path -> (a [S, in], g [S, out])`` for ONE example: the activations the
    layer's weight is applied at and the loss gradient with respect to the layer's output
    (before its bias), from one forward and one backward pass (module docstring), so that
    ∇W = aᵀ g. ``layers``: from :func:`find_dense_layers` (same ``loss_fn``, same shapes).
    Traceable: use under ``jax.vmap`` over examples and ``jax.jit``."""
    return layer_and_leaf_grads(loss_fn, params, example, layers, ())[0]


def layer_and_leaf_grads(loss_fn: LossFn, params: Any, example: Any, layers: list[DenseLayer],
                         wrt_leaves: tuple[int, ...]) -> tuple[dict[str, tuple], list]:
    """:func:`layer_inputs_and_output_grads` and, from the same backward pass, the plain
    gradients of the leaves ``wrt_leaves`` (indices into ``jax.tree.leaves(params)``)."""
    closed, leaves, treedef = _trace(loss_fn, params, example)
    found, dots = _analyse(closed, leaves, treedef)
    for layer in layers:
        if layer.path not in dots:
            raise InputError(f"layers: {layer.path!r} is not a dense layer of this loss_fn "
                             f"(found: {sorted(dots)})")
    hooks = {dots[layer.path].loc: (layer.path, dots[layer.path]) for layer in layers}
    probes = {path: jnp.zeros(dot.out_shape, dot.outvar.aval.dtype)
              for path, dot in hooks.values()}
    ex_leaves = jax.tree.leaves(example)
    extra = [leaves[k] for k in wrt_leaves]

    def run(probe_values, extra_values):
        current = list(leaves)
        for k, value in zip(wrt_leaves, extra_values, strict=True):
            current[k] = value
        record: dict = {}
        out = _evaluate(closed.jaxpr, closed.consts, current + ex_leaves, (), hooks,
                        probe_values, record)
        return out[0], record

    (g_probes, g_leaves), record = jax.grad(run, argnums=(0, 1), has_aux=True)(probes, extra)
    result = {path: (record[path], _output_matrix(g_probes[path], dot))
              for path, dot in hooks.values()}
    return result, list(g_leaves)


# ---- the layer's matrix view of a leaf gradient --------------------------------------


def _apply_views(x: jax.Array, views: tuple) -> jax.Array:
    for step in views:
        x = jnp.transpose(x, step[1]) if step[0] == "transpose" else x.reshape(step[2])
    return x


def _view_shape(shape: tuple, views: tuple) -> tuple:
    for step in views:
        shape = tuple(shape[d] for d in step[1]) if step[0] == "transpose" else step[2]
    return tuple(shape)


def _invert_views(x: jax.Array, views: tuple) -> jax.Array:
    for step in reversed(views):
        x = jnp.transpose(x, np.argsort(step[1])) if step[0] == "transpose" \
            else x.reshape(step[1])
    return x


def grad_matrix(layer: DenseLayer, leaves: list) -> jax.Array:
    """The layer's weight gradient as G [out, in(+1)] (bias last column when paired) from
    the gradient's leaves (``jax.tree.leaves`` order): the matrix K-FAC factors act on."""
    kernel = _apply_views(leaves[layer.index], layer.kernel_views)
    w = jnp.transpose(kernel, layer.kernel_contract + layer.kernel_free).reshape(
        layer.in_dim, layer.out_dim)
    if layer.has_bias:
        bias = _apply_views(leaves[layer.bias_index], layer.bias_views).reshape(1, -1)
        w = jnp.concatenate([w, bias.astype(w.dtype)], axis=0)
    return w.T


def set_grad_matrix(layer: DenseLayer, leaves: list, matrix: jax.Array) -> None:
    """Inverse of :func:`grad_matrix`: write G [out, in(+1)] back into ``leaves`` (in place)."""
    w = matrix.T
    kernel_shape = _view_shape(np.shape(leaves[layer.index]), layer.kernel_views)
    order = layer.kernel_contract + layer.kernel_free
    kernel = w[:layer.in_dim].reshape(tuple(kernel_shape[d] for d in order))
    kernel = jnp.transpose(kernel, np.argsort(order))
    leaves[layer.index] = _invert_views(kernel, layer.kernel_views).astype(
        leaves[layer.index].dtype)
    if layer.has_bias:
        free_shape = tuple(kernel_shape[d] for d in layer.kernel_free)
        bias = w[layer.in_dim].reshape(free_shape)
        leaves[layer.bias_index] = _invert_views(bias, layer.bias_views).astype(
            leaves[layer.bias_index].dtype)
