"""Test setup: 8 forced CPU devices, strict rank promotion, one seed fixture.

``jax_num_cpu_devices`` must be set before JAX initialises a backend, so it happens here,
at conftest import, before any test module touches jax.

Rank promotion raises: an operation between arrays of different ranks (``[N] + [N, 1]``)
is an error instead of a silent broadcast, so a missing axis is a failure, not a wrong
answer. Broadcasts in memjax are written out (``x[:, None]``, ``jnp.broadcast_to``).

Strict dtype promotion (``jax_numpy_dtype_promotion="strict"``) is opt-in per test, with
the ``strict_dtypes`` marker: the engine and store, the kernels and their references, the
model ports and ``memjax score``, exact LOO and dejavu pass under it. It cannot be on for
the whole suite: every optax optimizer's ``update`` mixes its int32 step count with
Python-float hyperparameters (memjax.train, dataset inference, WSA, Forward-INF with an
optimizer), ott-jax's Sinkhorn mixes float32 with int32 (LAVA), and WSA's training loss
multiplies float losses by a bool mask and divides by its int32 count.

Random tests take ``rng`` (or ``seed``): a fresh seed per test, printed in the failure
report; ``MEMJAX_TEST_SEED=<seed>`` reruns with that seed.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

SEED_ENV = "MEMJAX_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def _fresh_seed() -> int:
    """The seed from MEMJAX_TEST_SEED, or 32 fresh bits from the OS (short to retype)."""
    value = os.environ.get(SEED_ENV)
    if value:
        return int(value)
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed for this test, reported if the test fails (MEMJAX_TEST_SEED fixes it)."""
    value = _fresh_seed()
    request.node.stash[_SEED_KEY] = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """``np.random.default_rng(seed)`` with this test's fresh seed (see ``seed``)."""
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(
            ("random seed", f"this test drew seed {seed}; rerun it with {SEED_ENV}={seed}"))
    return report


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "strict_dtypes: run under jax_numpy_dtype_promotion='strict' (the code "
        "paths such a test reaches promote no dtype implicitly)")


@pytest.fixture(autouse=True)
def _strict_dtypes(request):
    """Tests marked ``strict_dtypes`` run with strict dtype promotion (see the docstring)."""
    if request.node.get_closest_marker("strict_dtypes") is None:
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield


def pytest_report_header(config):
    if os.environ.get(SEED_ENV):
        return f"{SEED_ENV}={os.environ[SEED_ENV]}: every random test uses this seed"
    return None
