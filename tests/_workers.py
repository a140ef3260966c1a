"""Subprocess entry points for engine tests: multi-host scoring and kill-and-resume.

Run as ``python -m tests._workers MODE ...`` from the repo root. Data, params and the
score function are defined here once so the killed, resumed and reference runs agree.
"""

from __future__ import annotations

import sys
import time

import numpy as np

N_EXAMPLES = 1037  # not divisible by any batch size used
DIM, CLASSES = 12, 7


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(N_EXAMPLES, DIM)).astype(np.float32),
        "label": rng.integers(0, CLASSES, N_EXAMPLES).astype(np.int32),
        "id": np.arange(N_EXAMPLES, dtype=np.int64) * 10 + 3,
    }


def make_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(size=(DIM, 32)).astype(np.float32) / 3,
            "w2": rng.normal(size=(32, CLASSES)).astype(np.float32) / 5}


def mlp_signals(params, example):
    """Per-example loss and logits of a 2-layer MLP (one example)."""
    import jax
    import jax.numpy as jnp

    hidden = jnp.tanh(example["x"] @ params["w1"])
    logits = hidden @ params["w2"]
    return {"loss": jax.nn.logsumexp(logits) - logits[example["label"]], "logits": logits}


class SlowSource:
    """Arrays read with a delay, so a run can be killed part-way through."""

    def __init__(self, arrays, delay):
        from memjax.data.base import ArraySource

        self.inner = ArraySource(arrays, name="slow")
        self.delay = delay

    def __len__(self):
        return len(self.inner)

    def read(self, indices):
        time.sleep(self.delay)
        return self.inner.read(indices)

    def ids(self, indices):
        return self.inner.ids(indices)

    def spec(self):
        return self.inner.spec()


def run_store(store_path: str, out_path: str, delay: float) -> None:
    """Score into a store (resuming it if it exists) and save the read-back scores."""
    from memjax.engine import ScoreStore, score

    store = score(mlp_signals, make_params(), SlowSource(make_data(), delay), batch_size=16,
                  store=ScoreStore(store_path, chunk_size=32), progress=False, prefetch=0)
    np.savez(out_path, **store.read())


def run_multihost(process_id: int, port: int, out_path: str, store_path: str) -> None:
    """One of two jax.distributed processes with 4 CPU devices each (gloo on loopback)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    from memjax.engine import score

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    result = score(mlp_signals, make_params(), make_data(), batch_size=24, progress=False)
    store = score(mlp_signals, make_params(), make_data(), batch_size=24, progress=False,
                  store=store_path)
    if process_id == 0:
        np.savez(out_path, **result)
        stored = store.read()
        np.testing.assert_array_equal(stored["loss"], result["loss"])
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "store":
        run_store(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif mode == "multihost":
        run_multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
