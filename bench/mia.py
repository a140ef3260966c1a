"""Membership-inference benchmarks (issue 4): RMIA sort vs naive, LiRA vectorised vs a loop,
and training M classifiers with one vmap vs one after another.

- RMIA at N = Z = 50,000, M = 8: ``memjax.mia._rmia`` (sort + searchsorted, O((N+Z) log Z))
  vs the naive N×Z comparison the reference code materialises (computed in row blocks of
  1,000 so the naive peer fits in memory; its full matrix would be N·Z bytes = 2.5 GB as
  bool). Time, and the peak memory each allocates beyond its inputs (tracemalloc, which
  sees NumPy's buffers), in a fresh subprocess each.
- LiRA at N = 50,000, M = 64: ``memjax.mia._lira`` vs the reference code's per-example
  Python loop (NumPy), timed on 2,000 examples and extrapolated.
- Training M = 16 digits MLPs: ``memjax.train.train_classifiers`` (one vmapped program,
  each model on its kept rows) vs ``fit_classifier`` called once per model (jitted once,
  reused) on the same rows, and on all rows weighted by the mask (the earlier
  formulation): models/s, and the matmul-FLOP floor at the measured peak.

Run: ``PYTHONPATH=. python -m bench.mia`` (writes bench/results/mia.json).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bench.common import machine_info, summarize, write_json

RESULT = Path(__file__).parent / "results" / "mia.json"


def _rmia_inputs(n: int, z: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref_in = rng.random((m, n)) < 0.5
    ref_in[0], ref_in[1] = True, False  # every example has IN and OUT models
    return (rng.random(n), rng.random((m, n)), ref_in, rng.random(z), rng.random((m, z)))


def rmia_naive(target_p, ref_p, ref_in, pop_target_p, pop_ref_p, a=1.0, gamma=1.0,
               block=1000):
    """The reference code's N×Z comparison, in row blocks (offline, a-corrected)."""
    out = np.where(ref_in, np.nan, ref_p)
    p_x = (1 + a) / 2 * np.nanmean(out, axis=0) + (1 - a) / 2
    p_z = (1 + a) / 2 * pop_ref_p.mean(axis=0) + (1 - a) / 2
    ratio_x, ratio_z = target_p / p_x, pop_target_p / p_z
    scores = np.empty(len(ratio_x))
    for start in range(0, len(ratio_x), block):
        rows = ratio_x[start:start + block, None] / ratio_z[None, :] > gamma
        scores[start:start + block] = rows.mean(axis=1)
    return scores


def _child_rmia(kind: str) -> None:
    """Run one RMIA variant; print its time and the peak of the NumPy memory it allocates
    beyond its inputs (tracemalloc sees NumPy's buffers), in a fresh process."""
    import tracemalloc

    from memjax.mia import rmia

    inputs = _rmia_inputs(50_000, 50_000, 8)
    run = (lambda: rmia(*inputs)) if kind == "sort" else (lambda: rmia_naive(*inputs))
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    scores = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 2**20,
                      "checksum": float(np.sum(scores))}))


def bench_rmia() -> dict:
    rows = {}
    for kind in ("sort", "naive"):
        out = subprocess.run([sys.executable, "-m", "bench.mia", "--child-rmia", kind],
                             capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(rows["sort"]["checksum"] - rows["naive"]["checksum"]) < 1e-6
    rows["speedup"] = rows["naive"]["seconds"] / rows["sort"]["seconds"]
    return rows


def lira_loop(target, ref, ref_in):
    """Per-example loop as the reference code writes it (online, mean, per-example std)."""
    from scipy.stats import norm

    scores = np.empty(len(target))
    for n in range(len(target)):
        inside, outside = ref[ref_in[:, n], n], ref[~ref_in[:, n], n]
        scores[n] = (norm.logpdf(target[n], inside.mean(), inside.std() + 1e-30)
                     - norm.logpdf(target[n], outside.mean(), outside.std() + 1e-30))
    return scores


def bench_lira(n: int = 50_000, m: int = 64, loop_n: int = 2_000) -> dict:
    from memjax.mia import lira

    rng = np.random.default_rng(1)
    ref_in = rng.random((m, n)) < 0.5
    ref_in[0], ref_in[1] = True, False
    target, ref = rng.normal(size=n), rng.normal(size=(m, n))
    start = time.perf_counter()
    vectorised = lira(target, ref, ref_in)
    vec_s = time.perf_counter() - start
    start = time.perf_counter()
    looped = lira_loop(target[:loop_n], ref[:, :loop_n], ref_in[:, :loop_n])
    loop_s = (time.perf_counter() - start) * n / loop_n
    np.testing.assert_allclose(vectorised[:loop_n], looped, rtol=1e-9, atol=1e-9)
    return {"vectorised_s": vec_s, "loop_s_extrapolated": loop_s, "speedup": loop_s / vec_s}


def training_flops(keep: np.ndarray, sizes: tuple[int, ...], steps: int) -> float:
    """Matmul FLOPs of full-batch training on each model's kept rows: forward 2·R·a·b per
    dense layer, backward the same for the weight gradient and for the input gradient
    (none for the first layer: the data is not differentiated)."""
    rows = float(keep.sum())  # summed over models
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    per_row = sum(6 * a * b for a, b in pairs) - 2 * sizes[0] * sizes[1]
    return rows * per_row * steps


def bench_training(m: int = 16, steps: int = 300, repeats: int = 3) -> dict:
    from bench.common import measure_matmul_peak, time_interleaved
    from memjax.data import digits
    from memjax.train import MLPConfig, balanced_keep, fit_classifier, train_classifiers
    from memjax.train.reference import kept_rows

    source = digits()
    images, labels = source.arrays["image"], source.arrays["label"]
    keep = balanced_keep(m, len(labels), seed=0)
    config = MLPConfig(images.shape[1:], 10, hidden=(128,))
    key = jax.random.key(0)
    one = jax.jit(functools.partial(fit_classifier, config=config, steps=steps,
                                    learning_rate=2e-3))
    keys = jax.random.split(key, m)
    rows, weight = kept_rows(keep)
    subsets = [(images[rows[i]], labels[rows[i]], weight[i]) for i in range(m)]
    runs = {
        # Same work as the vmapped program: each model on its own kept rows.
        "sequential_kept_rows": lambda: [jax.block_until_ready(one(keys[i], *subsets[i]))
                                         for i in range(m)],
        # The earlier formulation: every model's loss over all N rows, weighted by its mask.
        "sequential_masked_all_rows": lambda: [
            jax.block_until_ready(one(keys[i], images, labels, keep[i])) for i in range(m)],
        "vmapped": lambda: train_classifiers(key, images, labels, keep, config=config,
                                             steps=steps, learning_rate=2e-3),
    }
    for run in runs.values():
        run()  # compile
    peak = measure_matmul_peak()["peak_flops"]
    times = time_interleaved(runs, repeats)
    peak = max(peak, measure_matmul_peak()["peak_flops"])
    out = {name: summarize(t) for name, t in times.items()}
    flops = training_flops(keep, (config.input_dim, *config.hidden, 10), steps)
    out["matmul_flops"] = flops
    out["peak_flops"] = peak
    out["floor_s"] = flops / peak
    out["fraction_of_peak"] = {name: out["floor_s"] / out[name]["median_s"] for name in times}
    out["models_per_s"] = {name: m / out[name]["median_s"] for name in times}
    out["speedup"] = out["sequential_kept_rows"]["median_s"] / out["vmapped"]["median_s"]
    out["speedup_vs_masked"] = (out["sequential_masked_all_rows"]["median_s"]
                                / out["vmapped"]["median_s"])
    # The best any program could do against the fair sequential peer: run at peak.
    out["speedup_bound_at_peak"] = out["sequential_kept_rows"]["median_s"] / out["floor_s"]
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-rmia":
        _child_rmia(sys.argv[2])
        return
    only = sys.argv[1:] == ["--training"]
    previous = json.loads(RESULT.read_text()) if only and RESULT.exists() else {}
    results = {"machine": machine_info(),
               "rmia_n50k_z50k_m8": previous.get("rmia_n50k_z50k_m8") or bench_rmia(),
               "lira_n50k_m64": previous.get("lira_n50k_m64") or bench_lira(),
               "train_16_mlps_digits": bench_training()}
    path = write_json("mia", results)
    r, li, tr = (results[k] for k in ("rmia_n50k_z50k_m8", "lira_n50k_m64",
                                      "train_16_mlps_digits"))
    print(f"RMIA sort {r['sort']['seconds']:.2f} s / {r['sort']['peak_mib']:.0f} MiB vs naive "
          f"{r['naive']['seconds']:.2f} s / {r['naive']['peak_mib']:.0f} MiB "
          f"({r['speedup']:.1f}x)")
    print(f"LiRA vectorised {li['vectorised_s']:.3f} s vs loop {li['loop_s_extrapolated']:.1f} "
          f"s ({li['speedup']:.0f}x)")
    print(f"training 16 MLPs: vmapped {tr['models_per_s']['vmapped']:.2f} models/s vs "
          f"sequential {tr['models_per_s']['sequential_kept_rows']:.2f} ({tr['speedup']:.2f}x; "
          f"{tr['speedup_vs_masked']:.2f}x vs masked all rows; bound at peak "
          f"{tr['speedup_bound_at_peak']:.2f}x)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
