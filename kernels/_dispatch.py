"""Choosing a Pallas kernel or its XLA reference, and the backend-specific kernel settings.

``MEMJAX_KERNELS`` (read when a dispatching function is called, i.e. at trace time under
``jit``) forces the choice:

- ``auto`` (default): the kernel only where :data:`MEASURED_FASTER` says it was measured
  faster than the reference on this backend; the reference everywhere else.
- ``kernel``: always the kernel; on CPU it runs in Pallas interpret mode (slow: tests only).
- ``reference``: always the XLA reference.
"""

from __future__ import annotations

import os

import jax

from memjax._checks import check_choice
from memjax.errors import InputError

ENV = "MEMJAX_KERNELS"
MODES = ("auto", "kernel", "reference")
IMPLS = ("kernel", "reference")

# (backend, kernel name) -> True where the Pallas kernel was measured faster than its XLA
# reference (bench/kernels_gpu.py). Empty on purpose: no GPU or TPU was available when the
# kernels were written, so the GPU/TPU rows are pending measurement and ``auto`` picks the
# reference everywhere. Add a row only with the benchmark numbers that justify it.
MEASURED_FASTER: dict[tuple[str, str], bool] = {}


def mode() -> str:
    """The value of ``MEMJAX_KERNELS`` (``auto`` when unset), validated."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise InputError(
            f"environment variable {ENV}={os.environ.get(ENV)!r}: expected one of "
            f"{', '.join(MODES)}"
        )
    return value


def resolve(name: str, impl: str | None = None, backend: str | None = None) -> str:
    """``"kernel"`` or ``"reference"`` for kernel ``name``.

    Args:
        name: the kernel (``"token_stats"``, ``"knn"``, ``"unit_stats"``).
        impl: an explicit choice that overrides the environment; None reads ``MEMJAX_KERNELS``.
        backend: the JAX backend; None means ``jax.default_backend()``.
    """
    if check_choice("impl", impl, (*IMPLS, None)) is not None:
        return impl
    chosen = mode()
    if chosen != "auto":
        return chosen
    backend = backend or jax.default_backend()
    return "kernel" if MEASURED_FASTER.get((backend, name), False) else "reference"


def interpret(backend: str | None = None) -> bool:
    """Pallas compiles for GPU (Mosaic GPU) and TPU (Mosaic); anything else interprets."""
    return (backend or jax.default_backend()) not in ("gpu", "cuda", "rocm", "tpu")


def compiler_params(backend: str | None = None):
    """Grid semantics for a (parallel rows, sequential reduction) grid, per backend.

    The second grid axis carries a running state in the resident output block, so it must
    run in order: "sequential" for Mosaic GPU, "arbitrary" for Mosaic TPU. None when
    interpreting. The Triton backend is deprecated and deliberately not targeted.

    Unverified on hardware (no GPU/TPU was available). JAX 0.10.2 warns that
    ``pl.pallas_call`` with Mosaic GPU is deprecated in favour of ``plgpu.kernel``; Mosaic
    GPU needs NVIDIA Hopper or newer and does not support ROCm.
    """
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return plgpu.CompilerParams(dimension_semantics=("parallel", "sequential"))
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
