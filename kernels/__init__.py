"""Hand-written Pallas kernels for memjax's hot paths, installed as ``memjax.kernels``.

Each kernel will have a pure-XLA reference that defines it; dispatch picks the kernel on
GPU/TPU where it is faster and the reference elsewhere. This folder is installed as
``memjax.kernels`` (see setup.cfg ``package_dir``) and is never importable as a bare
top-level ``kernels`` module, which would clash with an unrelated PyPI package.
"""

KERNELS: dict[str, object] = {}
