"""The hot paths behind ``memjax.kernels`` on CPU: streamed XLA references vs naive forms.

No GPU was lent when the Pallas kernels were written, so on CPU (where Pallas only
interprets) this measures what ``MEMJAX_KERNELS=auto`` runs today, the XLA references, each
against the naive formulation that materialises the big intermediate:

- ``token_stats``: N = 512 tokens, D = 768, V = 50,257 (GPT-2 small). ``streamed_chunk_8192``
  (``kernels.token_stats`` reference: lax.scan over vocab chunks, no [N, V] tensor) vs
  ``naive_log_softmax`` (float32 logits [N, V] and a full log-softmax, the
  ``chunk_size=None`` path of ``memjax.signals._tokens``).
- ``knn``: Q = 512 queries, P = 50,000 public rows, D = 128, k = 100 (déjà vu's k), squared
  L2. ``blockwise_1024`` (``knn_scan``: 1,024 public rows per step, running top-k) vs
  ``full_matrix_top_k`` (the [Q, P] score matrix, then one ``lax.top_k``).
- ``unit_stats``: N = 50,000 examples, U = 512 units. ``jax_reference_f32`` (the kernel's
  float32 jnp reference on a device array), ``host_f64_materialised`` (UnitMem's
  ``batch_stats`` on all of [N, U] at once, float64 copy) and ``host_f64_streamed``
  (``batch_stats`` + ``combine`` over chunks of 4,096 examples, what ``unitmem`` does).

Per row: median time of interleaved repeats, the cost floor ``max(FLOPs / peak, bytes /
bandwidth)`` with the peak and bandwidth measured in the same run (bench/common.py), time
as a multiple of that floor, XLA's ``memory_analysis`` (JAX rows) and the peak RSS above
the inputs measured in a fresh subprocess per row (``VmHWM`` reset before the run).
FLOPs: token_stats 2 N D V (the unembedding matmul; the softmax statistics are ~1/D of
it); knn 2 Q P D; unit_stats N U (one compare/add per element per statistic is below
the memory floor anyway). Bytes: the inputs read once (the floor of any formulation).

Run ``PYTHONPATH=. python -m bench.kernels [--quick]``; writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np

from bench import common

REPO = Path(__file__).resolve().parents[1]
FULL = {"token_stats": {"n": 512, "dim": 768, "vocab": 50_257},
        "knn": {"q": 512, "p": 50_000, "dim": 128, "k": 100},
        "unit_stats": {"n": 50_000, "units": 512}}
QUICK = {"token_stats": {"n": 128, "dim": 256, "vocab": 8_209},
         "knn": {"q": 128, "p": 8_000, "dim": 64, "k": 50},
         "unit_stats": {"n": 8_000, "units": 256}}
VARIANTS = {"token_stats": ("streamed_chunk_8192", "naive_log_softmax"),
            "knn": ("blockwise_1024", "full_matrix_top_k"),
            "unit_stats": ("jax_reference_f32", "host_f64_materialised", "host_f64_streamed")}
BASELINE = {"token_stats": "naive_log_softmax", "knn": "full_matrix_top_k",
            "unit_stats": "host_f64_materialised"}
UNIT_CHUNK = 4096


# ---------------------------------------------------------------------------- inputs


def make_inputs(case: str, shape: dict, seed: int = 0) -> tuple[np.ndarray, ...]:
    """float32 inputs drawn directly (no float64 temporaries in the RSS baseline)."""
    rng = np.random.default_rng(seed)
    if case == "token_stats":
        hidden = rng.standard_normal((shape["n"], shape["dim"]), dtype=np.float32)
        weight = rng.standard_normal((shape["dim"], shape["vocab"]), dtype=np.float32)
        weight *= 3.0 / np.sqrt(shape["dim"])  # logits with std ~3, as bench/token_signals
        targets = rng.integers(0, shape["vocab"], shape["n"]).astype(np.int32)
        return hidden, weight, targets
    if case == "knn":
        return (rng.standard_normal((shape["q"], shape["dim"]), dtype=np.float32),
                rng.standard_normal((shape["p"], shape["dim"]), dtype=np.float32))
    return (rng.standard_normal((shape["n"], shape["units"]), dtype=np.float32),)


def cost(case: str, shape: dict) -> tuple[float, float]:
    """(FLOPs, bytes read) of the computation, as in the module docstring."""
    if case == "token_stats":
        n, d, v = shape["n"], shape["dim"], shape["vocab"]
        return 2.0 * n * d * v, 4.0 * (n * d + d * v + n)
    if case == "knn":
        q, p, d = shape["q"], shape["p"], shape["dim"]
        return 2.0 * q * p * d, 4.0 * (q + p) * d
    n, u = shape["n"], shape["units"]
    return float(n * u), 4.0 * n * u


# ---------------------------------------------------------------------------- variants


def make_runner(case: str, variant: str, inputs: tuple[np.ndarray, ...], shape: dict):
    """(run() -> host result dict, compiled XLA executable or None)."""
    import jax
    import jax.numpy as jnp

    from memjax import kernels
    from memjax.memorization._unitmem import batch_stats, combine
    from memjax.signals._tokens import _full_vocab

    if case == "unit_stats" and variant.startswith("host"):
        (mu,) = inputs
        chunk = mu.shape[0] if variant == "host_f64_materialised" else UNIT_CHUNK

        def host():
            stats = None
            for start in range(0, mu.shape[0], chunk):
                stats = combine(stats, batch_stats(mu[start:start + chunk], start))
            return {"max": stats.max, "argmax": stats.argmax, "sum": stats.sum}

        return host, None

    if case == "token_stats":
        if variant == "naive_log_softmax":
            def fn(h, w, t):
                logp, mu, sigma, lse = _full_vocab(kernels.project_logits(h, w, None), t)
                return {"logp": logp, "mu": mu, "sigma": sigma, "lse": lse}
        else:
            fn = partial(kernels.token_stats, chunk_size=8192, impl="reference")
    elif case == "knn":
        k = shape["k"]
        if variant == "full_matrix_top_k":
            def fn(q, p):
                vals, idx = jax.lax.top_k(kernels.block_scores(q, p, "l2"), k)
                return {"values": vals, "indices": idx}
        else:
            def fn(q, p):
                vals, idx = kernels.knn_scores(q, p, k, "l2", 1024, impl="reference")
                return {"values": vals, "indices": idx}
    else:
        def fn(mu):
            out = kernels.unit_stats(mu, impl="reference")
            return {"max": out["max"], "argmax": out["argmax"], "sum": out["sum"]}

    args = [jnp.asarray(x) for x in inputs]
    compiled = jax.jit(fn).lower(*args).compile()

    def run():
        return {name: np.asarray(v) for name, v in compiled(*args).items()}

    return run, compiled


def agreement(case: str, outputs: dict[str, dict]) -> dict[str, float]:
    """Largest deviation of each variant from the case's baseline (asserted small)."""
    base = outputs[BASELINE[case]]
    diffs = {}
    for name, out in outputs.items():
        if name == BASELINE[case]:
            continue
        worst = 0.0
        for key, ref in base.items():
            if key in ("indices", "argmax"):
                worst = max(worst, float(np.mean(out[key] != ref)))  # fraction differing
            else:
                scale = np.maximum(np.abs(ref), 1.0)
                worst = max(worst, float(np.max(np.abs(out[key] - ref) / scale)))
        diffs[name] = worst
        # float32 vs float32 (or vs float64): relative 1e-4 of values >= 1; no index moves.
        assert worst < 1e-4, f"{case}: {name} disagrees with {BASELINE[case]} ({worst})"
    return diffs


# ---------------------------------------------------------------------------- time


def time_case(case: str, shape: dict, repeats: int) -> dict:
    inputs = make_inputs(case, shape)
    runners, outputs, xla = {}, {}, {}
    for variant in VARIANTS[case]:
        run, compiled = make_runner(case, variant, inputs, shape)
        outputs[variant] = run()  # warm-up
        runners[variant] = run
        if compiled is not None:
            xla[variant] = common.memory_analysis(compiled)
    diffs = agreement(case, outputs)
    del outputs
    gc.collect()
    times = common.time_interleaved(runners, repeats)
    return {"case": case, "shape": shape, "agreement_max_rel_or_index_fraction": diffs,
            "rows": {v: {**common.summarize(times[v]), "xla_memory": xla.get(v)}
                     for v in VARIANTS[case]}}


# ---------------------------------------------------------------------------- memory


def worker(case: str, variant: str, shape: dict) -> dict:
    """Peak RSS of one warm run above the RSS before it (fresh process per row)."""
    inputs = make_inputs(case, shape)
    run, _ = make_runner(case, variant, inputs, shape)
    run()  # compile-time and first-touch allocations happen here
    gc.collect()
    before = common.rss_bytes()
    reset = common.reset_peak_rss()
    run()
    return {"case": case, "variant": variant, "peak_rss_delta_bytes":
            common.peak_rss_bytes() - before, "hwm_reset": reset}


def measure_memory(case: str, variant: str, shape: dict) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    # As bench/token_signals: a fixed mmap threshold returns freed buffers to the OS.
    env = dict(os.environ, PYTHONPATH=path, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, "-m", "bench.kernels", "--worker", case, variant,
           "--shape", json.dumps(shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory worker {case}/{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def summarise(result: dict, peak: float, bandwidth: float) -> None:
    """Add floor, time over floor and ratios to the baseline to every row (in place)."""
    for timing in result["timing"]:
        case = timing["case"]
        flops, nbytes = cost(case, timing["shape"])
        floor = max(flops / peak, nbytes / bandwidth)
        base = timing["rows"][BASELINE[case]]["median_s"]
        mem = {m["variant"]: m["peak_rss_delta_bytes"] for m in result["memory"]
               if m["case"] == case}
        for variant, row in timing["rows"].items():
            row.update(flops=flops, bytes=nbytes, floor_s=floor,
                       time_over_floor=row["median_s"] / floor,
                       floor_fraction=floor / row["median_s"],
                       time_over_baseline=row["median_s"] / base,
                       peak_rss_delta_bytes=mem[variant],
                       rss_over_baseline=mem[variant] / max(mem[BASELINE[case]], 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, json.loads(args.shape))))
        return {}
    shapes = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 7)
    machine = common.machine_ceilings(args.quick)
    result = {"benchmark": "kernels", "quick": args.quick, "repeats": repeats,
              "machine": machine, "timing": [], "memory": []}
    for case, shape in shapes.items():
        result["timing"].append(time_case(case, shape, repeats))
        print(f"timed {case}", file=sys.stderr)
    for case, shape in shapes.items():
        for variant in VARIANTS[case]:
            result["memory"].append(measure_memory(case, variant, shape))
    peak = common.finish_ceilings(machine, args.quick)
    summarise(result, peak, machine["bandwidth"]["bandwidth_bytes_per_s"])
    path = common.write_json(common.result_name("kernels", args.quick), result)
    for timing in result["timing"]:
        for variant, row in timing["rows"].items():
            print(f"{timing['case']:>11} {variant:<22} {row['median_s'] * 1e3:9.1f} ms "
                  f"x{row['time_over_floor']:6.1f} floor  x{row['time_over_baseline']:5.2f} "
                  f"time  rss {row['peak_rss_delta_bytes'] / 2**20:8.1f} MiB")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
