"""K-FAC and EK-FAC curvature factors: dense layers, convolutions, sequence layers, embeddings.

Covered: every dense layer of a memjax MLP classifier (:func:`kfac_batch_stats`); the conv
and dense layers of the plain (non-residual) CNN classifier (:func:`cnn_kfac_batch_stats`,
KFC convention of Grosse & Martens 2016); any layer applied at T positions, from per-example
activations and pre-activation gradients that any model provides, e.g. through taps
(:func:`positions_kfac_stats`: attention projections per token, convolution patches); and
embedding tables, whose A is diagonal (:func:`embedding_kfac_stats`). The conventions of
the last three are in the comments above their sections.

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


def _precondition_matrix(grad_matrix, factor: DenseFactors, method: str, damping,
                         power: float = -1.0):
    """(curvature + λI)^power applied to G [out, in+1], in the eigenbasis Q_A ⊗ Q_S
    (power -1: the inverse; -0.5: its symmetric square root, for whitening)."""
    rotated = factor.s_eigvecs.T @ grad_matrix @ factor.a_eigvecs
    if method == "kfac":
        curvature = factor.s_eigvals[:, None] * factor.a_eigvals[None, :]
    else:
        curvature = factor.corrected
    scaled = rotated / (curvature + damping) if power == -1.0 else \
        rotated * (curvature + damping) ** power
    return factor.s_eigvecs @ scaled @ factor.a_eigvecs.T


def _check_method_and_damping(method: str, damping: float | None) -> None:
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if damping is not None and not damping >= 0:
        raise InputError(f"damping: expected a number >= 0 or None, got {damping!r}")


def precondition(grads: dict[str, Any], factors: list[DenseFactors], damping: float | None = None,
                 *, method: str = "ekfac") -> dict[str, Any]:
    """(F̂ + λI)⁻¹ ∇ per dense layer, F̂ = A ⊗ S (``method="kfac"``; eigenvalues λ_A λ_S) or
    EK-FAC's Q diag(Λ) Qᵀ (``"ekfac"``). ``grads``: the gradient of the loss in the params
    layout ``{"layers": [{"w": [in, out], "b": [out]}]}`` (e.g. ``jax.grad``); returns the
    same layout. ``damping``: λ for every layer, or None for the per-layer rule of the
    module docstring."""
    _check_method_and_damping(method, damping)
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


# --- Layers that share weights across positions: tokens, convolution patches ----------------
#
# A layer applied at T positions of one example (a dense layer per token, e.g. an attention
# projection; a convolution per output pixel on its im2col patch) has weight gradient
# G = Σ_t g_t ã_tᵀ [out, in+1]. Assuming activations and pre-activation gradients at
# different positions uncorrelated (Grosse & Martens 2016, KFC),
#     E[vec(G) vec(G)ᵀ] ≈ Σ_t E[ã_t ã_tᵀ ⊗ g_t g_tᵀ] ≈ A ⊗ S,  A = E[Σ_t ã_t ã_tᵀ],
# and S = E[Σ_t g_t g_tᵀ] / T for a convolution (KFC's Γ: T = spatial positions; the 1/T
# makes A ⊗ S = T E_t[ã ãᵀ] ⊗ E_t[g gᵀ], the sum over positions of one product each) and
# S = E[Σ_t g_t g_tᵀ] for tokens (the brief for sequence layers; a constant factor on S is
# absorbed by the per-layer damping heuristic, which scales with the curvature).
# EK-FAC's Λ = E[(Q_Sᵀ G Q_A)²] uses the summed G, which is no longer rank one.


def _with_bias_column(a):
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _check_positions(a, g, weights, bias):
    a, g = jnp.asarray(a), jnp.asarray(g)
    if a.ndim != 3:
        raise InputError(f"a: expected activations [B, T, in], got shape {a.shape}")
    if g.ndim != 3 or g.shape[:2] != a.shape[:2]:
        raise InputError(f"g: expected gradients [B, T, out] with B, T = {a.shape[:2]}, "
                         f"got shape {g.shape}")
    a = _with_bias_column(a) if bias else a
    return a, g, _weights(a, weights, a.dtype)


@functools.partial(jax.jit, static_argnames="normalise_s")
def _positions_kfac_sums(a, g, weights, normalise_s):
    s_sum = jnp.einsum("b,bti,btj->ij", weights, g, g)
    if normalise_s:
        s_sum = s_sum / a.shape[1]
    return KfacStats([jnp.einsum("b,bti,btj->ij", weights, a, a)], [s_sum], jnp.sum(weights))


def positions_kfac_stats(a: jax.Array, g: jax.Array, weights: jax.Array | None = None, *,
                         bias: bool = True, average_s_over_positions: bool = False) -> KfacStats:
    """K-FAC sums of one layer applied at T positions, from per-example activations
    a [B, T, in] and pre-activation gradients g [B, T, out] (from any model, e.g. through
    taps): ``a_sums[0]`` = Σ_i w_i Σ_t ã ãᵀ [in+1, in+1] (ã: a with a 1 appended when
    ``bias``), ``s_sums[0]`` = Σ_i w_i Σ_t g gᵀ [out, out], divided by T when
    ``average_s_over_positions`` (KFC's convolution convention, Grosse & Martens 2016; see
    the comment above). Feed :func:`kfac_factors` for one :class:`DenseFactors`; T = 1
    is a plain dense layer."""
    a, g, weights = _check_positions(a, g, weights, bias)
    return _positions_kfac_sums(a, g, weights, average_s_over_positions)


@jax.jit
def _positions_ekfac_sums(factor, a, g, weights):
    # Q_Sᵀ (Σ_t g_t ã_tᵀ) Q_A per example [B, out, in+1]
    rotated = jnp.einsum("bto,bti->boi", g @ factor.s_eigvecs, a @ factor.a_eigvecs)
    return EkfacStats([jnp.einsum("b,boi->oi", weights, rotated**2)], jnp.sum(weights))


def positions_ekfac_stats(factor: DenseFactors, a: jax.Array, g: jax.Array,
                          weights: jax.Array | None = None, *, bias: bool = True) -> EkfacStats:
    """EK-FAC sums ``sq_sums[0]`` = Σ_i w_i (Q_Sᵀ G_i Q_A)² [out, in+1] with the summed
    weight gradient G_i = Σ_t g_t ã_tᵀ (arguments as :func:`positions_kfac_stats`;
    ``factor`` from :func:`kfac_factors`). Feed ``ekfac_factors([factor], stats)``."""
    a, g, weights = _check_positions(a, g, weights, bias)
    if factor.a_eigvecs.shape[0] != a.shape[-1] or factor.s_eigvecs.shape[0] != g.shape[-1]:
        raise InputError(f"factor: sized for in+1={factor.a_eigvecs.shape[0]}, "
                         f"out={factor.s_eigvecs.shape[0]}; got {a.shape[-1]}, {g.shape[-1]}")
    return _positions_ekfac_sums(factor._replace(corrected=None), a, g, weights)


def precondition_matrix(grad_matrix: jax.Array, factor: DenseFactors,
                        damping: float | None = None, *, method: str = "ekfac") -> jax.Array:
    """(F̂ + λI)⁻¹ vec(G) for one layer's gradient G [out, in+1] (bias last column; for a
    convolution, :func:`conv_weight_matrix`'s layout), F̂ and ``damping`` as in
    :func:`precondition`. Returns [out, in+1]."""
    _check_method_and_damping(method, damping)
    if method == "ekfac" and factor.corrected is None:
        raise InputError("factor: EK-FAC needs corrected eigenvalues (ekfac_factors)")
    lam = _layer_damping(factor, method, damping)
    return _precondition_matrix(jnp.asarray(grad_matrix), factor, method, lam)


# --- 3x3 SAME convolutions of memjax.models.classifier's CNN -----------------------------


def conv_patches(image: jax.Array) -> jax.Array:
    """im2col of a 3x3 SAME (zero-padded) convolution: image [H, W, C] -> patches
    [H*W, 9*C], ordered (row offset, column offset, channel) like the kernel
    [3, 3, C, C_out].reshape(9*C, C_out) of ``memjax.models.classifier.conv3x3_same``."""
    height, width, _ = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[i:i + height, j:j + width]
                               for i in range(3) for j in range(3)], axis=-1)
    return patches.reshape(height * width, -1)


def conv_weight_matrix(conv: dict[str, jax.Array]) -> jax.Array:
    """A conv layer {"w": [3, 3, C_in, C_out], "b": [C_out]} as W [C_out, 9*C_in+1] (bias
    last column), the matrix K-FAC's factors act on: pre-activation = W ã per patch."""
    kernel = conv["w"].reshape(-1, conv["w"].shape[-1])
    return jnp.concatenate([kernel, conv["b"][None, :]], axis=0).T


def _cnn_parts(params):
    if not isinstance(params, dict) or not params.get("convs") or "layers" not in params:
        raise InputError("params: expected a CNN classifier's params {'convs': [...], "
                         "'layers': [...]}")
    if any("res" in conv for conv in params["convs"]):
        raise InputError("params: residual CNNs (convs with 'res') are not covered by K-FAC "
                         "here; use positions_kfac_stats with the block's activations")
    return list(params["convs"]), list(params["layers"])


def _cnn_forward(convs, layers, image, conv_offsets, dense_offsets):
    """Logits [C] of one image [H, W, C_in] through the plain CNN of
    ``classifier_logits``; every conv layer's patches with a 1 appended [H*W, 9*C+1] and
    every dense layer's ã [in+1]; offsets are added to the pre-activations."""
    h = jnp.asarray(image, convs[0]["w"].dtype)
    patches = []
    for conv, offset in zip(convs, conv_offsets, strict=True):
        height, width, _ = h.shape
        patch = _with_bias_column(conv_patches(h))
        patches.append(patch)
        pre = patch @ conv_weight_matrix(conv).T + offset  # [H*W, C_out]
        h = jax.nn.relu(pre).reshape(height // 2, 2, width // 2, 2, -1).mean(axis=(1, 3))
    logits, inputs = _forward(layers, h, dense_offsets)
    return logits, patches, inputs


def _cnn_per_example(convs, layers, image, y):
    """Per conv layer: patches [H*W, 9*C+1] and g [H*W, C_out]; per dense layer: ã, g."""
    sizes = [image.shape[0] * image.shape[1] // 4**k for k in range(len(convs))]
    conv_zeros = [jnp.zeros((n, c["b"].shape[0]), c["b"].dtype)
                  for n, c in zip(sizes, convs, strict=True)]
    dense_zeros = [jnp.zeros_like(layer["b"]) for layer in layers]

    def loss(conv_offsets, dense_offsets):
        logits, patches, inputs = _cnn_forward(convs, layers, image, conv_offsets,
                                               dense_offsets)
        return -jax.nn.log_softmax(logits)[y], (patches, inputs)

    (conv_g, dense_g), (patches, inputs) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        conv_zeros, dense_zeros)
    return patches, conv_g, inputs, dense_g


@jax.jit
def _cnn_logits(convs, layers, x):
    def one(image):
        return _cnn_forward(convs, layers, image, [0.0] * len(convs),
                            [0.0] * len(layers))[0]
    return jax.vmap(one)(x)


@jax.jit
def _cnn_kfac_sums(convs, layers, x, y, weights):
    patches, conv_g, inputs, dense_g = jax.vmap(_cnn_per_example, in_axes=(None, None, 0, 0))(
        convs, layers, x, y)
    conv_stats = [_positions_kfac_sums(a, g, weights, True)
                  for a, g in zip(patches, conv_g, strict=True)]
    a_sums = [s.a_sums[0] for s in conv_stats]
    a_sums += [jnp.einsum("b,bi,bj->ij", weights, a, a) for a in inputs]
    s_sums = [s.s_sums[0] for s in conv_stats]
    s_sums += [jnp.einsum("b,bi,bj->ij", weights, g, g) for g in dense_g]
    return KfacStats(a_sums, s_sums, jnp.sum(weights))


def cnn_kfac_batch_stats(params: dict[str, Any], x: jax.Array, y: jax.Array | None = None, *,
                         fisher: str = "true", key: jax.Array | None = None,
                         weights: jax.Array | None = None) -> KfacStats:
    """K-FAC sums over one batch x [B, H, W, C] for the plain CNN of
    ``memjax.models.classifier`` ({"convs", "layers"}, no residual blocks): one entry per
    conv layer (KFC convention: A over summed patch outer products [9*C_in+1]², S over
    summed gradient outer products / positions [C_out]²), then one per dense layer as in
    :func:`kfac_batch_stats` (same arguments). Layer order: convs, then layers."""
    convs, layers = _cnn_parts(params)
    labels = _cnn_labels(convs, layers, x, y, fisher, key)
    return _cnn_kfac_sums(convs, layers, x, labels, _weights(x, weights, layers[0]["w"].dtype))


def _cnn_labels(convs, layers, x, y, fisher, key):
    if fisher == "true":
        if key is None:
            raise InputError("key: the true Fisher samples labels and needs a PRNG key")
        return jax.random.categorical(key, _cnn_logits(convs, layers, x), axis=-1)
    return _labels(layers, x, y, fisher, key)


# --- Embedding layers --------------------------------------------------------------------
#
# An embedding table E [V, d] looks up row tok_t at every position: its "input" is the one-hot
# e_{tok_t} and its gradient G = Σ_t g_t e_{tok_t}ᵀ [d, V] (column v: the summed g of the
# positions holding token v). A = E[Σ_t e e ᵀ] is exactly diagonal, the expected count of each
# token per example, so K-FAC needs only the vector of counts and Q_A = I. EK-FAC therefore
# keeps the standard basis on the token side and rotates only the d side:
# Λ_ov = E[(Q_Sᵀ G)_ov²] [d, V], one refitted eigenvalue per (S-eigenvector, token) pair.


class EmbeddingFactors(NamedTuple):
    """One embedding table's factors: A's diagonal [V] (expected token counts per example),
    S's eigenvalues [d] / eigenvectors [d, d], EK-FAC's Λ [d, V] (None until
    :func:`embedding_ekfac_factors`)."""

    a_diag: jax.Array
    s_eigvals: jax.Array
    s_eigvecs: jax.Array
    corrected: jax.Array | None = None


def _check_tokens(tokens, g, vocab_size, weights):
    tokens, g = jnp.asarray(tokens), jnp.asarray(g)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"tokens: expected integer ids [B, T], got {tokens.dtype} "
                         f"{tokens.shape}")
    if g.ndim != 3 or g.shape[:2] != tokens.shape:
        raise InputError(f"g: expected gradients [B, T, d] with B, T = {tokens.shape}, got "
                         f"shape {g.shape}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    return tokens, g, _weights(tokens, weights, g.dtype)


@functools.partial(jax.jit, static_argnames="vocab_size")
def _embedding_kfac_sums(tokens, g, weights, vocab_size):
    counts = jax.vmap(lambda t: jnp.zeros(vocab_size, g.dtype).at[t].add(1.0))(tokens)
    return KfacStats([weights @ counts], [jnp.einsum("b,bti,btj->ij", weights, g, g)],
                     jnp.sum(weights))


def embedding_kfac_stats(tokens: jax.Array, g: jax.Array, vocab_size: int,
                         weights: jax.Array | None = None) -> KfacStats:
    """K-FAC sums of an embedding table from token ids [B, T] and the gradients g [B, T, d]
    with respect to the looked-up rows: ``a_sums[0]`` is the *diagonal* [V] Σ_i w_i counts_i
    (the full A is diag of it), ``s_sums[0]`` = Σ_i w_i Σ_t g gᵀ [d, d]. Merge with
    :func:`merge_stats`; factor with :func:`embedding_factors`."""
    tokens, g, weights = _check_tokens(tokens, g, vocab_size, weights)
    return _embedding_kfac_sums(tokens, g, weights, vocab_size)


def embedding_factors(stats: KfacStats) -> EmbeddingFactors:
    """A's diagonal a_sums / count and S = s_sums / count's eigendecomposition."""
    s_vals, s_vecs = jnp.linalg.eigh(stats.s_sums[0] / stats.count)
    return EmbeddingFactors(stats.a_sums[0] / stats.count, s_vals, s_vecs)


def _token_gradients(tokens, g, vocab_size):
    """Per-example G [B, V, d]: row v sums g over the positions holding token v."""
    return jax.vmap(lambda t, gi: jnp.zeros((vocab_size, gi.shape[-1]), gi.dtype).at[t].add(gi))(
        tokens, g)


@functools.partial(jax.jit, static_argnames="vocab_size")
def _embedding_ekfac_sums(s_eigvecs, tokens, g, weights, vocab_size):
    rotated = _token_gradients(tokens, g, vocab_size) @ s_eigvecs  # [B, V, d]
    return EkfacStats([jnp.einsum("b,bvo->ov", weights, rotated**2)], jnp.sum(weights))


def embedding_ekfac_stats(factors: EmbeddingFactors, tokens: jax.Array, g: jax.Array,
                          weights: jax.Array | None = None) -> EkfacStats:
    """EK-FAC sums ``sq_sums[0]`` = Σ_i w_i (Q_Sᵀ G_i)² [d, V] (module comment; memory
    B·V·d). Feed :func:`embedding_ekfac_factors`."""
    vocab_size = int(factors.a_diag.shape[0])
    tokens, g, weights = _check_tokens(tokens, g, vocab_size, weights)
    return _embedding_ekfac_sums(factors.s_eigvecs, tokens, g, weights, vocab_size)


def embedding_ekfac_factors(factors: EmbeddingFactors, stats: EkfacStats) -> EmbeddingFactors:
    """The embedding factors with EK-FAC's Λ = sq_sums / count [d, V]."""
    return factors._replace(corrected=stats.sq_sums[0] / stats.count)


def precondition_embedding(grad_table: jax.Array, factors: EmbeddingFactors,
                           damping: float | None = None, *, method: str = "ekfac") -> jax.Array:
    """(F̂ + λI)⁻¹ ∇ for an embedding table's gradient [V, d] (the table's own layout), with
    F̂ = diag(a) ⊗ S (``"kfac"``) or (I ⊗ Q_S) diag(Λ) (I ⊗ Q_S)ᵀ (``"ekfac"``); ``damping``
    None: 0.1 × the mean eigenvalue, as :func:`precondition`. Returns [V, d]."""
    _check_method_and_damping(method, damping)
    if method == "ekfac" and factors.corrected is None:
        raise InputError("factors: EK-FAC needs corrected eigenvalues (embedding_ekfac_factors)")
    if method == "kfac":
        curvature = factors.s_eigvals[:, None] * factors.a_diag[None, :]
    else:
        curvature = factors.corrected
    lam = DAMPING_HEURISTIC * jnp.mean(curvature) if damping is None else damping
    rotated = factors.s_eigvecs.T @ jnp.asarray(grad_table).T  # [d, V]
    return (factors.s_eigvecs @ (rotated / (curvature + lam))).T
