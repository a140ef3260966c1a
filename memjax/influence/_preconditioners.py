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
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from memjax._checks import check_choice
from memjax.errors import InputError
from memjax.influence._ihvp import cg_solve, dense_solve, lissa, require_converged
from memjax.influence._kfac import DenseFactors
from memjax.influence._kfac import precondition as kfac_precondition

Preconditioner = Callable[[Any], Any]


def check_damping(damping: Any, allow_none: bool = False) -> None:
    """λ is a finite number >= 0 (or None, the damping rule, where ``allow_none``)."""
    if damping is None and allow_none:
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.number)) \
            or not np.isfinite(damping) or damping < 0:
        raise InputError(f"damping={damping!r}: expected a finite number >= 0"
                         + (" or None" if allow_none else ""))


def dense_preconditioner(matrix: Any, params: Any, damping: float) -> Preconditioner:
    """``g -> (A + λI)⁻¹ g`` by an exact solve (:func:`dense_solve`), for small models.

    Args:
      matrix: A [P, P] in ``jax.flatten_util.ravel_pytree(params)`` order, e.g. from
        :func:`memjax.influence.dense_curvature` (P = number of scalars in ``params``).
      params: a pytree like the gradients the preconditioner will receive.
      damping: λ >= 0.
    """
    check_damping(damping)
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
    check_damping(damping)
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
    check_damping(damping, allow_none=True)
    if not isinstance(factors, (list, tuple)) or not factors \
            or not all(isinstance(f, DenseFactors) for f in factors):
        raise InputError("factors: expected a non-empty list of DenseFactors (kfac_factors / "
                         "ekfac_factors)")
    if method == "ekfac" and any(f.corrected is None for f in factors):
        raise InputError("factors: EK-FAC needs corrected eigenvalues (ekfac_factors)")
    return functools.partial(kfac_precondition, factors=list(factors), damping=damping,
                             method=method)


def lissa_preconditioner(matvec: Callable[[Any], Any], damping: float, *, scale: float,
                         depth: int, tol: float = 1e-3) -> Preconditioner:
    """``g -> (A + λI)⁻¹ g`` by LiSSA's truncated Neumann series
    (:func:`memjax.influence.lissa`, its recursion and convergence condition stated there).

    As for :func:`cg_preconditioner`, convergence cannot be checked inside ``forward_inf``:
    :func:`solver_curvature` checks the same solve on the test gradients first.
    """
    check_damping(damping)
    if not callable(matvec):
        raise InputError(f"matvec: expected a function v -> A v, got {type(matvec).__name__}")
    return functools.partial(_lissa_apply, matvec=matvec, damping=float(damping),
                             scale=float(scale), depth=int(depth), tol=float(tol))


def _lissa_apply(grads: Any, *, matvec, damping: float, scale: float, depth: int,
                 tol: float) -> Any:
    rows = jax.tree.map(lambda g: g[None], grads)
    result = lissa(matvec, rows, damping, scale, depth, tol=tol)
    return jax.tree.map(lambda x: x[0], result.x)


def mean_eigenvalue(matvec: Callable[[Any], Any], params: Any, *, probes: int = 16,
                    seed: int = 0) -> float:
    """Hutchinson's estimate of trace(A)/P, the mean eigenvalue of a symmetric A
    (Hutchinson 1990): mean over ``probes`` Rademacher vectors z of zᵀAz / P, with P the
    number of scalars. Deterministic for a given ``seed``; relative
    standard error about sqrt(2/probes) for a spectrum dominated by a few eigenvalues."""
    flat, unravel = ravel_pytree(params)
    signs = jax.random.rademacher(jax.random.PRNGKey(seed), (probes, flat.shape[0]),
                                  flat.dtype)

    @jax.jit
    def quadratic(z):
        return jnp.vdot(z, ravel_pytree(matvec(unravel(z)))[0])

    total = sum(float(quadratic(z)) for z in signs)
    return total / probes / flat.shape[0]


def largest_eigenvalue(matvec: Callable[[Any], Any], params: Any, *, iterations: int = 50,
                       seed: int = 0) -> float:
    """The largest eigenvalue of a symmetric PSD A by power iteration from a Gaussian start
    (``seed``): the Rayleigh quotient after ``iterations`` products. It approaches λ_max
    from below; :func:`solver_curvature` adds a margin for LiSSA's scale."""
    flat, unravel = ravel_pytree(params)
    start = jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype)

    @jax.jit
    def run(v):
        def step(_, v):
            w = ravel_pytree(matvec(unravel(v)))[0]
            return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)

        v = jax.lax.fori_loop(0, iterations, step, v / jnp.linalg.norm(v))
        return jnp.vdot(v, ravel_pytree(matvec(unravel(v)))[0])

    return float(run(start))


SOLVERS = ("cg", "lissa")
#: λ = DAMPING_FRACTION × the mean eigenvalue of the curvature, when no damping is given:
#: the rule K-FAC uses per layer (memjax.influence._kfac), here for the whole matrix.
DAMPING_FRACTION = 0.1
#: LiSSA's scale = LISSA_SCALE_MARGIN × (estimated λ_max + λ): above the (λ_max + λ)/2 that
#: convergence needs even when power iteration underestimates λ_max by up to 40%.
LISSA_SCALE_MARGIN = 0.7
MAX_LISSA_DEPTH = 20_000


def solver_curvature(method: str, matvec: Callable[[Any], Any], params: Any, test_grads: Any,
                     *, damping: float | None = None, tol: float | None = None,
                     max_iter: int = 500, seed: int = 0) -> tuple[Preconditioner, dict]:
    """A checked matrix-free inverse-curvature preconditioner (CG or LiSSA) for
    ``forward_inf(precondition=...)``.

    Args:
      method: ``"cg"`` or ``"lissa"``.
      matvec: ``v -> A v`` on pytrees like ``params`` with A symmetric PSD (e.g. a partial of
        :func:`memjax.influence.gnhvp` over training examples).
      params: a pytree in the layout ``matvec`` takes (its P scalars are the solve's space).
      test_grads: the test gradients, a pytree like ``params`` with a leading axis T:
        the solve is run on them once here and must converge, so the traced solves inside
        ``forward_inf`` (the same deterministic computation) are known to have converged.
      damping: λ; None = 0.1 × the mean eigenvalue of A (Hutchinson, 16 probes).
      tol: relative residual required (default 1e-4 for CG, 1e-3 for LiSSA).
      max_iter: CG's iteration cap.
      seed: the probes' and power iteration's seed.

    Returns:
      ``(precondition, info)``: ``info`` has ``damping``, ``tol``, the worst relative
      residual and iterations, and for LiSSA ``scale`` = 0.7 × (λ_max + λ) (power
      iteration) and ``depth``, the smallest with (1 − λ/scale)^depth ≤ tol (the bound on
      every eigen-component's error factor; at most 20,000).

    Raises:
      InputError: a solve that does not converge (names the residual and what to raise).
    """
    method = check_choice("curvature method", method, SOLVERS)
    if damping is None:
        mean = mean_eigenvalue(matvec, params, seed=seed)
        if not mean > 0:
            raise InputError(f"curvature: the mean eigenvalue estimate is {mean:.3g}; expected a "
                             "positive semi-definite curvature (pass a damping > 0)")
        damping = DAMPING_FRACTION * mean
    check_damping(damping)
    info: dict[str, Any] = {"method": method, "damping": float(damping)}
    if method == "cg":
        info["tol"] = tol = 1e-4 if tol is None else tol
        solve = functools.partial(cg_solve, matvec, damping=float(damping), tol=tol,
                                  max_iter=max_iter)
        precondition = cg_preconditioner(matvec, damping, tol=tol, max_iter=max_iter)
    else:
        info["tol"] = tol = 1e-3 if tol is None else tol
        top = largest_eigenvalue(matvec, params, seed=seed)
        scale = LISSA_SCALE_MARGIN * (top + damping)
        if not damping > 0:
            raise InputError("lissa: needs damping > 0 (with λ = 0 its error factor on the "
                             "null space of A is 1: it never converges there)")
        depth = int(np.ceil(np.log(tol) / np.log1p(-damping / scale)))
        if depth > MAX_LISSA_DEPTH:
            raise InputError(f"lissa: reaching tol={tol:g} needs {depth} steps (> "
                             f"{MAX_LISSA_DEPTH}): λ_max ≈ {top:.3g} is {top / damping:.0f}× "
                             "the damping; raise the damping or use cg")
        info.update(scale=float(scale), depth=depth, largest_eigenvalue=top)
        solve = functools.partial(lissa, matvec, damping=float(damping), scale=scale,
                                  depth=depth, tol=tol)
        precondition = lissa_preconditioner(matvec, damping, scale=scale, depth=depth, tol=tol)
    result = require_converged(jax.jit(solve)(test_grads), method)
    info["worst_relative_residual"] = float(np.max(np.asarray(result.relative_residual)))
    info["iterations"] = int(np.max(np.asarray(result.iterations)))
    return precondition, info

