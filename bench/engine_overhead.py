"""What ``memjax.engine.score`` spends per batch and per call, outside the compiled step.

A diagnostic for ``classification_throughput``'s MLP row, where the engine, not the model,
sets the pace; plus XLA:CPU's cost for a vmapped batch of one (``token_signals``' B=1
rows). Each host-side step of the runner is timed alone, on the MLP benchmark's shapes
(batch 256 of 64 floats + an int label; six scalar outputs), using the runner's own helpers,
so the numbers track the code as it changes (they are private: if one is renamed this
script needs the same rename). Run ``python -m bench.engine_overhead``; writes
``bench/results/engine_overhead.json``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import memjax.signals
from bench import common, models
from memjax.engine import make_mesh, runner
from memjax.engine.mesh import DATA_AXIS, param_shardings, place_params

BATCH = 256


def per_call_us(fn, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls, in µs."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(samples)


def measure(calls: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    fields = {"image": rng.random((BATCH, 64), dtype=np.float32),
              "label": rng.integers(0, 10, BATCH).astype(np.int32)}
    mesh = make_mesh()
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    to_global = lambda: {k: jax.make_array_from_process_local_data(sharding, v, v.shape)
                         for k, v in fields.items()}
    params = jax.device_put(models.init_mlp(0, (64, 256, 256, 10)))
    vit_params = jax.device_put(models.init_vit(0, models.ViTConfig()))
    fn = lambda p, ex: memjax.signals.classification(models.mlp(p, ex["image"]), ex["label"])
    placed = place_params(params, param_shardings(params, mesh))
    batch = to_global()
    step = runner._compiled_step(fn, placed, batch, mesh)
    out = step(placed, batch)
    jax.block_until_ready(out)
    host_out = runner._flatten_outputs(out)
    valid, ids = np.ones(BATCH, bool), np.arange(BATCH)
    source = runner.as_source({k: np.concatenate([v] * 8) for k, v in fields.items()})
    plan = runner.BatchPlan(len(source), BATCH, 0, BATCH)

    def read_batch():  # what each grain read does: rows, read, dtype conversion
        indices, _ = plan.local_rows(3)
        return runner._device_fields(source.read(indices))

    def grain_call():  # the read-ahead pipeline a score() call starts, over 8 trivial items
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        list(grain.MapDataset.range(8).map(lambda i: i).to_iter_dataset(options))

    return {
        # Per batch.
        "compiled_step_mlp_batch": per_call_us(
            lambda: jax.block_until_ready(step(placed, batch)), calls),
        "read_batch_from_arrays": per_call_us(read_batch, calls),
        "host_to_device_2_fields": per_call_us(to_global, calls),
        "device_put_2_fields_one_call": per_call_us(
            lambda: jax.device_put(fields, {k: sharding for k in fields}), calls),
        "fetch_outputs_6_leaves": per_call_us(lambda: runner._flatten_outputs(out), calls),
        "fetch_outputs_one_device_get": per_call_us(lambda: jax.device_get(out), calls),
        "check_finite_inputs": per_call_us(
            lambda: runner._check_finite_inputs(fields, valid, ids), calls),
        "check_finite_outputs": per_call_us(
            lambda: runner._check_finite_outputs(host_out, ids), calls),
        # Per score() call.
        "make_mesh": per_call_us(make_mesh, calls // 10),
        "place_params_mlp": per_call_us(
            lambda: place_params(params, param_shardings(params, mesh)), calls // 10),
        "place_params_vit": per_call_us(
            lambda: place_params(vit_params, param_shardings(vit_params, mesh)), calls // 10),
        "compile_cache_lookup_mlp": per_call_us(
            lambda: runner._compiled_step(fn, placed, batch, mesh), calls // 10),
        "grain_pipeline_start_8_items": per_call_us(grain_call, calls // 10),
    }


def size1_axis(calls: int) -> dict[str, float]:
    """XLA:CPU on a vmapped batch of ONE: the token signal's per-chunk reductions.

    ``memjax.kernels.chunk_stats``, the token signal's per-chunk statistics (max, exp,
    three weighted sums over a [T, chunk] block of logits) on the same 512 x 4096 floats
    with no batch axis, under ``vmap`` with a batch of 1 (what ``score(..., batch_size=1)``
    compiles on one device) and, for scale, a batch of 4.
    """
    tokens_module = importlib.import_module("memjax.kernels")
    z = np.random.default_rng(0).standard_normal((4, 512, 4096), dtype=np.float32) * 3
    z1, z4 = jax.device_put(z[:1]), jax.device_put(z)
    plain = jax.jit(tokens_module.chunk_stats)
    batched = jax.jit(jax.vmap(tokens_module.chunk_stats))
    return {
        "chunk_stats_512x4096_no_batch_axis": per_call_us(
            lambda: jax.block_until_ready(plain(z1[0])), calls),
        "chunk_stats_vmap_batch_1": per_call_us(
            lambda: jax.block_until_ready(batched(z1)), calls),
        "chunk_stats_vmap_batch_4": per_call_us(
            lambda: jax.block_until_ready(batched(z4)), calls),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.calls) | size1_axis(max(args.calls // 10, 5))
    for name, us in rows.items():
        print(f"{name:32s} {us:9.1f} µs", flush=True)
    payload = {"benchmark": "engine_overhead", "machine": {"info": common.machine_info()},
               "batch": BATCH, "microseconds": rows, "wall_s": time.perf_counter() - start}
    common.write_json("engine_overhead", payload)
    return payload


if __name__ == "__main__":
    main()
