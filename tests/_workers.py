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


def _status_bytes(field: str) -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def gpt2_checkpoint_key(path: tuple) -> str:
    """The Hugging Face key of a memjax GPT-2 parameter path (written out independently of
    memjax.models.gpt2.convert, to check what the loader put where)."""
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj",
             "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
    if path[0] == "layers":
        _, i, module, leaf = path
        return f"transformer.h.{i}.{names[module]}.{'bias' if leaf == 'bias' else 'weight'}"
    if path[0] == "ln_f":
        return f"transformer.ln_f.{'bias' if path[1] == 'bias' else 'weight'}"
    return f"transformer.{path[0]}.weight"


def run_sharded_load(process_id: int, port: int, folder: str, out_path: str) -> None:
    """One of two processes (4 CPU devices each) loading a GPT-2 checkpoint onto a mesh with
    ``model=8`` spanning both; records its peak RSS increase during the load, the bytes it
    read from the checkpoint, the bytes its devices hold, and checks every block it holds
    against ``safetensors``' own reading of the file."""
    import json
    from pathlib import Path

    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    from flax import nnx
    from safetensors import safe_open

    import memjax.convert.checkpoint as checkpoint
    from memjax.convert import load_pretrained
    from memjax.engine import make_mesh

    mesh = make_mesh(model=8)
    assert mesh.shape["model"] == 8 and jax.local_device_count() == 4
    read_bytes = []
    read_block = checkpoint.read_block

    def counting_read_block(stored, bounds):
        block = read_block(stored, bounds)
        read_bytes.append(block.nbytes)
        return block

    checkpoint.read_block = counting_read_block
    baseline = _status_bytes("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        reset = False  # VmHWM keeps an earlier peak: the increase is overstated, not hidden
    module, _ = load_pretrained(folder, mesh=mesh)
    jax.block_until_ready(nnx.state(module))
    peak = _status_bytes("VmHWM")
    checkpoint.read_block = read_block

    held, specs = 0, {}
    with safe_open(str(Path(folder) / "model.safetensors"), framework="np") as file:
        for path, var in nnx.to_flat_state(nnx.state(module)):
            array, key = var.get_value(), gpt2_checkpoint_key(path)
            specs[".".join(map(str, path))] = [a for a in array.sharding.spec]
            blocks = {}
            for shard in array.addressable_shards:
                blocks[str(shard.index)] = shard.data.nbytes
                expected = file.get_slice(key)[shard.index]
                np.testing.assert_array_equal(np.asarray(shard.data), expected, err_msg=key)
            held += sum(blocks.values())
    Path(out_path).write_text(json.dumps({
        "rss_before": baseline, "peak": peak, "peak_reset": reset,
        "read_bytes": sum(read_bytes), "held_bytes": held, "specs": specs}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "store":
        run_store(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif mode == "multihost":
        run_multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif mode == "sharded_load":
        run_sharded_load(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
