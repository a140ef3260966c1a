"""K-FAC and EK-FAC curvature factors for the dense layers of a memjax MLP classifier.

K-FAC (Martens & Grosse 2015) approximates the Fisher / Gauss–Newton block of one dense
layer by a Kronecker product. For one example, the layer computes ``s = W ã`` with ``ã`` the
input activation with a 1 appended (the bias column of ``W``), and ``g = dL/ds`` is the
pre-activation gradient; the weight gradient is ``G = g ãᵀ`` [out, in+1]. With the
column-stacking ``vec`` (``vec(G) = ã ⊗ g``),

    E[vec(G) vec(G)ᵀ] = E[ã ãᵀ ⊗ g gᵀ] ≈ A ⊗ S,    A = E[ã ãᵀ],  S = E[g gᵀ].

EK-FAC (George et al. 2018; Grosse et al. 2023) keeps the eigenbasis ``Q_A ⊗ Q_S`` of
``A ⊗ S`` and refits the eigenvalues to the per-example gradients:
``Λ_ij = E[(Q_Sᵀ G Q_A)_ij²]`` [out, in+1].

The model is the params layout :mod:`memjax.models.classifier` and :mod:`memjax.train`
build for an MLP, ``{"layers": [{"w": [in, out], "b": [out]}, ...]}`` with ReLU between
layers and logits from the last one, under softmax cross-entropy. Working on that layout
(rather than a generic ``apply_with_taps``) lets the pre-activation gradients come from one
``jax.grad`` with respect to zero offsets added to every pre-activation, and lets
:func:`precondition` take ``jax.grad`` of the loss in the params' own layout.

Labels for ``g``: ``fisher="true"`` samples them from the model's predictive distribution
(the true Fisher, whose expectation over labels is the Gauss–Newton matrix of softmax
cross-entropy; kronfluence's default), ``fisher="empirical"`` uses the given labels.

Statistics stream: :func:`kfac_batch_stats` / :func:`ekfac_batch_stats` return sums and a
count for one batch, :func:`merge_stats` adds two, :func:`kfac_factors` /
:func:`ekfac_factors` turn the totals into factors.

Damping rule (:func:`precondition`, ``damping=None``): per layer, λ = 0.1 × the mean
eigenvalue of that layer's approximate curvature — the mean of ``λ_S λ_Aᵀ`` for K-FAC
(= mean(λ_S)·mean(λ_A)), the mean of ``Λ`` for EK-FAC. This is the heuristic kronfluence
uses when no damping factor is given; a float overrides it for every layer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from memjax.errors import InputError

FISHER_KINDS = ("true", "empirical")
METHODS = ("kfac", "ekfac")
DAMPING_HEURISTIC = 0.1  # λ = 0.1 × mean eigenvalue of the layer's curvature


class KfacStats(NamedTuple):
    """Streaming sums for K-FAC: per layer ``a_sums[k]`` = Σ w_i ã ãᵀ [in+1, in+1],
    ``s_sums[k]`` = Σ w_i g gᵀ [out, out]; ``count`` = Σ w_i (scalar)."""

    a_sums: list[jax.Array]
    s_sums: list[jax.Array]
    count: jax.Array


class EkfacStats(NamedTuple):
    """Streaming sums for EK-FAC: per layer ``sq_sums[k]`` = Σ w_i (Q_Sᵀ G_i Q_A)² [out, in+1];
    ``count`` = Σ w_i."""

    sq_sums: list[jax.Array]
    count: jax.Array


class DenseFactors(NamedTuple):
    """One dense layer's factors: eigenvalues [in+1] / eigenvectors (columns) [in+1, in+1] of
    A, of S ([out], [out, out]), and EK-FAC's corrected eigenvalues Λ [out, in+1] (None
    until :func:`ekfac_factors`)."""

    a_eigvals: jax.Array
    a_eigvecs: jax.Array
    s_eigvals: jax.Array
    s_eigvecs: jax.Array
    corrected: jax.Array | None = None


def _mlp_layers(params: dict[str, Any]) -> list[dict[str, jax.Array]]:
    if not isinstance(params, dict) or "layers" not in params or params.get("convs"):
        raise InputError("params: expected an MLP classifier's params {'layers': [{'w', 'b'}, "
                         "...]} without 'convs' (K-FAC here covers dense-only models)")
    return list(params["layers"])


def _forward(layers, x, offsets):
    """Logits [C] of one example x [...] and every layer's input with a 1 appended
    (``ã`` [in+1]); ``offsets[k]`` [out_k] is added to layer k's pre-activation."""
    h = jnp.ravel(x).astype(layers[0]["w"].dtype)
    inputs = []
    for k, layer in enumerate(layers):
        inputs.append(jnp.concatenate([h, jnp.ones((1,), h.dtype)]))
        s = h @ layer["w"] + layer["b"] + offsets[k]
        h = s if k == len(layers) - 1 else jax.nn.relu(s)
    return h, inputs


def _logits(layers, x):
    return _forward(layers, x, [jnp.zeros_like(layer["b"]) for layer in layers])[0]


def _per_example(layers, x, y):
    """Per-example ``ã_k`` [in_k+1] and ``g_k = dL/ds_k`` [out_k] for softmax cross-entropy
    with label y (scalar int)."""
    zeros = [jnp.zeros_like(layer["b"]) for layer in layers]

    def loss(offsets):
        logits, inputs = _forward(layers, x, offsets)
        return -jax.nn.log_softmax(logits)[y], inputs

    grads, inputs = jax.grad(loss, has_aux=True)(zeros)
    return inputs, grads


@jax.jit
def _sample_labels(layers, x, key):
    return jax.random.categorical(key, jax.vmap(_logits, in_axes=(None, 0))(layers, x), axis=-1)


def sample_labels(params: dict[str, Any], x: jax.Array, key: jax.Array) -> jax.Array:
    """Labels [B] drawn from the model's predictive distribution softmax(logits) for the
    examples x [B, ...] (the true Fisher's labels)."""
    return _sample_labels(_mlp_layers(params), x, key)


def _labels(layers, x, y, fisher, key):
    if fisher not in FISHER_KINDS:
        raise InputError(f"fisher: expected one of {FISHER_KINDS}, got {fisher!r}")
    if fisher == "empirical":
        if y is None:
            raise InputError("y: the empirical Fisher needs the true labels")
        if jnp.shape(y) != (len(x),):
            raise InputError(f"y: expected labels of shape ({len(x)},), got {jnp.shape(y)}")
        return jnp.asarray(y)
    if key is None:
        raise InputError("key: the true Fisher samples labels and needs a PRNG key")
    return _sample_labels(layers, x, key)


def _weights(x, weights, dtype):
    if weights is None:
        return jnp.ones((len(x),), dtype)
    weights = jnp.asarray(weights, dtype)
    if weights.shape != (len(x),):
        raise InputError(f"weights: expected shape ({len(x)},), got {weights.shape}")
    return weights


@jax.jit
def _kfac_sums(layers, x, y, weights):
    inputs, grads = jax.vmap(_per_example, in_axes=(None, 0, 0))(layers, x, y)
    a_sums = [jnp.einsum("b,bi,bj->ij", weights, a, a) for a in inputs]
    s_sums = [jnp.einsum("b,bi,bj->ij", weights, g, g) for g in grads]
    return KfacStats(a_sums, s_sums, jnp.sum(weights))


def kfac_batch_stats(params: dict[str, Any], x: jax.Array, y: jax.Array | None = None, *,
                     fisher: str = "true", key: jax.Array | None = None,
                     weights: jax.Array | None = None) -> KfacStats:
    """K-FAC sums over one batch x [B, ...] (labels y [B] int; sampled when
    ``fisher="true"``, which needs ``key``). ``weights`` [B] (default 1) weight each
    example, e.g. to take an exact expectation over labels by listing every label."""
    layers = _mlp_layers(params)
    labels = _labels(layers, x, y, fisher, key)
    return _kfac_sums(layers, x, labels, _weights(x, weights, layers[0]["w"].dtype))


def merge_stats(first, second):
    """Sum of two :class:`KfacStats` (or two :class:`EkfacStats`): the stats of both batches."""
    return jax.tree.map(jnp.add, first, second)


def kfac_factors(stats: KfacStats) -> list[DenseFactors]:
    """Eigendecompositions of A = a_sums / count and S = s_sums / count, per layer."""
    factors = []
    for a_sum, s_sum in zip(stats.a_sums, stats.s_sums, strict=True):
        a_vals, a_vecs = jnp.linalg.eigh(a_sum / stats.count)
        s_vals, s_vecs = jnp.linalg.eigh(s_sum / stats.count)
        factors.append(DenseFactors(a_vals, a_vecs, s_vals, s_vecs))
    return factors


@jax.jit
def _ekfac_sums(layers, factors, x, y, weights):
    inputs, grads = jax.vmap(_per_example, in_axes=(None, 0, 0))(layers, x, y)
    sq_sums = []
    for a, g, f in zip(inputs, grads, factors, strict=True):
        # Q_Sᵀ (g ãᵀ) Q_A = (Q_Sᵀ g)(Q_Aᵀ ã)ᵀ: its square is the outer product of squares.
        g_rot, a_rot = g @ f.s_eigvecs, a @ f.a_eigvecs
        sq_sums.append(jnp.einsum("b,bi,bj->ij", weights, g_rot**2, a_rot**2))
    return EkfacStats(sq_sums, jnp.sum(weights))


def ekfac_batch_stats(params: dict[str, Any], factors: list[DenseFactors], x: jax.Array,
                      y: jax.Array | None = None, *, fisher: str = "true",
                      key: jax.Array | None = None,
                      weights: jax.Array | None = None) -> EkfacStats:
    """EK-FAC sums of squared per-example gradients in the K-FAC eigenbasis over one batch
    (arguments as :func:`kfac_batch_stats`; ``factors`` from :func:`kfac_factors`)."""
    layers = _mlp_layers(params)
    if len(factors) != len(layers):
        raise InputError(f"factors: {len(factors)} layers for a model with {len(layers)}")
    labels = _labels(layers, x, y, fisher, key)
    bases = [f._replace(corrected=None) for f in factors]
    return _ekfac_sums(layers, bases, x, labels, _weights(x, weights, layers[0]["w"].dtype))


def ekfac_factors(factors: list[DenseFactors], stats: EkfacStats) -> list[DenseFactors]:
    """The K-FAC factors with EK-FAC's corrected eigenvalues Λ = sq_sums / count."""
    return [f._replace(corrected=sq / stats.count)
            for f, sq in zip(factors, stats.sq_sums, strict=True)]


def _layer_damping(factor: DenseFactors, method: str, damping: float | None):
    if damping is not None:
        return damping
    if method == "kfac":
        return DAMPING_HEURISTIC * jnp.mean(factor.s_eigvals) * jnp.mean(factor.a_eigvals)
    return DAMPING_HEURISTIC * jnp.mean(factor.corrected)


def _precondition_matrix(grad_matrix, factor: DenseFactors, method: str, damping):
    """(curvature + λI)⁻¹ applied to G [out, in+1], in the eigenbasis Q_A ⊗ Q_S."""
    rotated = factor.s_eigvecs.T @ grad_matrix @ factor.a_eigvecs
    if method == "kfac":
        curvature = factor.s_eigvals[:, None] * factor.a_eigvals[None, :]
    else:
        curvature = factor.corrected
    return factor.s_eigvecs @ (rotated / (curvature + damping)) @ factor.a_eigvecs.T


def precondition(grads: dict[str, Any], factors: list[DenseFactors], damping: float | None = None,
                 *, method: str = "ekfac") -> dict[str, Any]:
    """(F̂ + λI)⁻¹ ∇ per dense layer, F̂ = A ⊗ S (``method="kfac"``; eigenvalues λ_A λ_S) or
    EK-FAC's Q diag(Λ) Qᵀ (``"ekfac"``). ``grads``: the gradient of the loss in the params
    layout ``{"layers": [{"w": [in, out], "b": [out]}]}`` (e.g. ``jax.grad``); returns the
    same layout. ``damping``: λ for every layer, or None for the per-layer rule of the
    module docstring."""
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if damping is not None and not damping >= 0:
        raise InputError(f"damping: expected a number >= 0 or None, got {damping!r}")
    layers = _mlp_layers(grads)
    if len(factors) != len(layers):
        raise InputError(f"factors: {len(factors)} layers for gradients of {len(layers)}")
    if method == "ekfac" and any(f.corrected is None for f in factors):
        raise InputError("factors: EK-FAC needs corrected eigenvalues (ekfac_factors)")
    return {**grads, "layers": _precondition_layers(layers, factors, damping, method)}


@functools.partial(jax.jit, static_argnames="method")
def _precondition_layers(layers, factors, damping, method):
    out = []
    for layer, factor in zip(layers, factors, strict=True):
        matrix = jnp.concatenate([layer["w"], layer["b"][None, :]], axis=0).T  # [out, in+1]
        lam = _layer_damping(factor, method, damping)
        result = _precondition_matrix(matrix, factor, method, lam).T
        out.append({"w": result[:-1], "b": result[-1]})
    return out
