"""Test setup: 8 forced CPU devices, so multi-device code runs on any machine.

``jax_num_cpu_devices`` must be set before JAX initialises a backend, so it happens here,
at conftest import, before any test module touches jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
