"""Inverse-curvature preconditioners for mirrored influence (issue 15).

Each constructor returns a pure function ``grads -> (C + λI)⁻¹ grads`` on pytrees laid out
like the model's params, for :func:`memjax.influence.forward_inf`'s ``precondition``: the
update on a test example becomes θ' = θ ± lr·(C + λI)⁻¹∇L(t), which turns the mirrored score
g_i·g_t into the influence-function score g_i·(C + λI)⁻¹g_t (Koh & Liang, ICML 2017,
"Understanding Black-box Predictions via Influence Functions"; Ko et al., CVPR 2024, "The
Mirrored Influence Hypothesis"). The functions are traceable (jit/vmap-safe).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from memjax.errors import InputError
from memjax.influence._ihvp import cg_solve, dense_solve
from memjax.influence._kfac import DenseFactors
from memjax.influence._kfac import precondition as kfac_precondition

Preconditioner = Callable[[Any], Any]


def _check_damping(damping: Any, allow_none: bool = False) -> None:
    if damping is None and allow_none:
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.number)) \
            or not np.isfinite(damping) or damping < 0:
        raise InputError(f"damping={damping!r}: expected a finite number >= 0")


def dense_preconditioner(matrix: Any, params: Any, damping: float) -> Preconditioner:
    """``g -> (A + λI)⁻¹ g`` by an exact solve (:func:`dense_solve`), for small models.

    Args:
      matrix: A [P, P] in ``jax.flatten_util.ravel_pytree(params)`` order, e.g. from
        :func:`memjax.influence.dense_curvature` (P = number of scalars in ``params``).
      params: a pytree like the gradients the preconditioner will receive.
      damping: λ >= 0.
    """
    _check_damping(damping)
    matrix = jax.numpy.asarray(matrix)
    size = ravel_pytree(params)[0].shape[0]
    if matrix.shape != (size, size):
        raise InputError(f"matrix: expected [{size}, {size}] (params has {size} scalars), "
                         f"got {list(matrix.shape)}")
    return functools.partial(_dense_apply, matrix=matrix, damping=float(damping))


def _dense_apply(grads: Any, *, matrix: jax.Array, damping: float) -> Any:
    flat, unravel = ravel_pytree(grads)
    solved = dense_solve(matrix.astype(flat.dtype), flat[None], damping)[0]
    return unravel(solved)


def cg_preconditioner(matvec: Callable[[Any], Any], damping: float, *, tol: float = 1e-6,
                      max_iter: int = 100) -> Preconditioner:
    """``g -> (A + λI)⁻¹ g`` by conjugate gradient (:func:`cg_solve`), A symmetric PSD.

    ``matvec`` maps a pytree like the gradients to ``A v`` (e.g. a partial of
    :func:`memjax.influence.hvp`). Inside ``forward_inf`` the solve runs traced, so its
    convergence cannot be checked there: check one representative gradient first with
    ``cg_solve`` and :func:`memjax.influence.require_converged`.
    """
    _check_damping(damping)
    if not callable(matvec):
        raise InputError(f"matvec: expected a function v -> A v, got {type(matvec).__name__}")
    return functools.partial(_cg_apply, matvec=matvec, damping=float(damping), tol=tol,
                             max_iter=max_iter)


def _cg_apply(grads: Any, *, matvec, damping: float, tol: float, max_iter: int) -> Any:
    rows = jax.tree.map(lambda g: g[None], grads)
    result = cg_solve(matvec, rows, damping, tol=tol, max_iter=max_iter)
    return jax.tree.map(lambda x: x[0], result.x)


def ekfac_preconditioner(factors: list[DenseFactors], damping: float | None = None, *,
                         method: str = "ekfac") -> Preconditioner:
    """``g -> (F̂ + λI)⁻¹ g`` per dense layer with K-FAC / EK-FAC factors (George et al.,
    NeurIPS 2018; Grosse et al. 2023), wrapping :func:`memjax.influence.kfac_precondition`.

    Only for the MLP params layout ``{"layers": [{"w": [in, out], "b": [out]}, ...]}``
    (a logistic regression is one layer). ``damping`` None: the per-layer heuristic of
    :mod:`memjax.influence._kfac`; ``method``: ``"ekfac"`` or ``"kfac"``.
    """
    _check_damping(damping, allow_none=True)
    if not isinstance(factors, (list, tuple)) or not factors \
            or not all(isinstance(f, DenseFactors) for f in factors):
        raise InputError("factors: expected a non-empty list of DenseFactors (kfac_factors / "
                         "ekfac_factors)")
    if method == "ekfac" and any(f.corrected is None for f in factors):
        raise InputError("factors: EK-FAC needs corrected eigenvalues (ekfac_factors)")
    return functools.partial(kfac_precondition, factors=list(factors), damping=damping,
                             method=method)
