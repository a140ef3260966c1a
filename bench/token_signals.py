"""Token signals at GPT-2-small scale: vocab-chunked streaming vs the naive full softmax.

``memjax.signals._tokens`` computes per-position ``logp``, ``mu``, ``sigma``, ``entropy``,
``lse`` from final hidden states [T, D] and the unembedding [D, V]. The naive path
(``chunk_size=None``) materialises float32 logits [B, T, V]; the chunked path streams the
vocabulary ``chunk_size`` columns at a time and never holds more than [B, T, chunk].
Both run as ``jax.jit(jax.vmap(partial(tokens, chunk_size=...)))``. The PyTorch peer is the
naive computation (``log_softmax`` over [B, T, V] and the same statistics).

Two phases:

1. Time: one process builds the inputs per batch size, compiles and warms every variant,
   checks that all variants agree, then times them interleaved (median, spread).
2. Memory: one fresh subprocess per (variant, batch size), so peaks never mix. Each reports
   (i) XLA's ``compiled.memory_analysis()``: temp + argument + output bytes, and
   (ii) peak RSS: the high-water mark after one run minus the RSS before it, once the
   inputs are allocated, the function compiled and run once (warm-up) and the warm-up's
   buffers released. The kernel's
   high-water mark is reset (``/proc/self/clear_refs``) just before the measured run so the
   compiler's peak is not counted, and read as ``VmHWM``: ``ru_maxrss`` is recorded too but
   Linux folds the pre-reset peak back into it when any thread exits. The worker runs with
   a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so buffers freed after the
   warm-up go back to the OS instead of hiding the next run's peak in a cached heap.

Timing-only diagnostic rows: ``memjax_engine_chunk_4096`` (the same signal through
``memjax.engine.score`` with batch_size = B) and, at B=1, ``*_novmap`` (the function jitted on
one sequence without vmap), which exposes XLA:CPU's slow size-1 batch axis (README).

FLOPs: the unembedding matmul, 2 B T D V (the softmax statistics are O(B T V), ~1/D of
that, and left out). Run ``python -m bench.token_signals [--quick]``; writes
``bench/results/token_signals.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench import common

VOCAB, SEQ, DIM = 50_257, 512, 768  # GPT-2 small
QUICK = {"vocab": 8_209, "seq": 128, "dim": 256}
BATCHES = (1, 4)
CHUNKS = (4096, 8192)
LOGIT_STD = 3.0
FIELDS = ("logp", "mu", "sigma", "entropy", "lse", "mean_loss", "n_tokens")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- inputs


def make_inputs(batch: int, seq: int, dim: int, vocab: int, seed: int = 0):
    """Random hidden [B, T, D] ~ N(0, 1), unembedding [D, V] scaled so logits have std ~3.

    float32 drawn directly (no float64 temporaries that would raise the RSS baseline).
    """
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, seq, dim), dtype=np.float32)
    unembedding = rng.standard_normal((dim, vocab), dtype=np.float32)
    unembedding *= LOGIT_STD / np.sqrt(dim)  # std of sum_d h_d w_dv = sqrt(D) * scale
    targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    return hidden, unembedding, targets


# ---------------------------------------------------------------------------- variants


def jax_variant(chunk_size: int | None):
    """``jax.jit(jax.vmap(tokens))`` over sequences, the unembedding shared (not mapped)."""
    import jax

    from memjax.signals import tokens

    def one(hidden, targets, unembedding):
        return partial(tokens, chunk_size=chunk_size)(
            targets=targets, hidden=hidden, unembedding=unembedding)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def torch_naive(hidden, unembedding, targets) -> dict:
    """The naive PyTorch peer: full float32 log-softmax over [B, T, V], same statistics."""
    import torch

    with torch.inference_mode():
        z = hidden @ unembedding
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        mu = (p * log_p).sum(-1)
        sigma = (p * (log_p - mu[..., None]).square()).sum(-1).sqrt()
        logp = log_p.gather(-1, targets[..., None])[..., 0]
        return {
            "logp": logp,
            "mu": mu,
            "sigma": sigma,
            "entropy": -mu,
            "lse": torch.logsumexp(z, dim=-1),
            "mean_loss": -logp.mean(-1),
            "n_tokens": torch.full((z.shape[0],), float(z.shape[1])),
        }


def variant_names() -> list[str]:
    """The variants compared for time and memory."""
    return ["jax_naive", *[f"jax_chunk_{c}" for c in CHUNKS], "torch_naive"]


def diagnostic_names(batch: int) -> list[str]:
    """Timing-only rows: the engine's path, and (B=1) the same function without vmap."""
    rows = [f"memjax_engine_chunk_{CHUNKS[0]}"]
    if batch == 1:
        rows += ["jax_naive_novmap", f"jax_chunk_{CHUNKS[0]}_novmap"]
    return rows


def chunk_of(name: str) -> int | None:
    """The chunk size a variant name asks for (None: naive)."""
    name = name.removesuffix("_novmap")
    return int(name.rsplit("_", 1)[1]) if "_chunk_" in name else None


def engine_fn(chunk_size: int | None):
    """The per-sequence score function handed to ``memjax.engine.score``."""
    from memjax.signals import tokens

    def fn(params, example):
        return tokens(targets=example["targets"], hidden=example["hidden"],
                      unembedding=params["unembedding"], chunk_size=chunk_size)

    return fn


def make_runner(name: str, hidden, unembedding, targets):
    """(run() -> host outputs, compiled or None) for one variant, inputs already placed."""
    if name == "torch_naive":
        import torch

        h, w = torch.from_numpy(hidden), torch.from_numpy(unembedding)
        t = torch.from_numpy(targets.astype(np.int64))
        return (lambda: {k: v.numpy() for k, v in torch_naive(h, w, t).items()}), None
    import jax

    h, w, t = jax.device_put((hidden, unembedding, targets))
    if name.startswith("memjax_engine"):
        import memjax.engine

        fn, data, batch = engine_fn(chunk_of(name)), {"hidden": hidden, "targets": targets}, len(t)
        return (lambda: memjax.engine.score(fn, {"unembedding": w}, data, batch_size=batch,
                                            progress=False)), None
    if name.endswith("_novmap"):  # one sequence, no batch axis at all
        from memjax.signals import tokens

        single = jax.jit(partial(tokens, chunk_size=chunk_of(name)))
        return (lambda: jax.device_get(
            jax.tree.map(lambda a: a[None], single(targets=t[0], hidden=h[0], unembedding=w)))
        ), None
    compiled = jax_variant(chunk_of(name)).lower(h, t, w).compile()
    return (lambda: jax.device_get(compiled(h, t, w))), compiled


def memory_analysis(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    out = {k: int(getattr(stats, f"{k}_size_in_bytes"))
           for k in ("temp", "argument", "output", "alias", "generated_code")}
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


# ---------------------------------------------------------------------------- phase 1: time


def time_batch(batch: int, shape: dict, repeats: int) -> dict:
    """Every variant at one batch size, in this process, timed interleaved."""
    hidden, unembedding, targets = make_inputs(batch, shape["seq"], shape["dim"], shape["vocab"])
    runners, outputs, xla_memory = {}, {}, {}
    for name in variant_names() + diagnostic_names(batch):
        run, compiled = make_runner(name, hidden, unembedding, targets)
        outputs[name] = run()  # warm-up (first-touch allocations); compiled above
        runners[name] = run
        if compiled is not None:
            xla_memory[name] = memory_analysis(compiled)
    agreement = {name: {k: float(np.max(np.abs(outputs[name][k] - outputs["jax_naive"][k])))
                        for k in FIELDS}
                 for name in outputs if name != "jax_naive"}
    for name, diffs in agreement.items():
        # float32 over ~50k terms: logp and lse are ~10, allow 1e-3 absolute.
        assert max(diffs.values()) < 1e-3, f"B={batch}: {name} disagrees with jax_naive {diffs}"
    del outputs

    times = common.time_interleaved(runners, repeats)
    flops = 2 * batch * shape["seq"] * shape["dim"] * shape["vocab"]
    compulsory = 4 * (hidden.size + unembedding.size + targets.size + 5 * batch * shape["seq"])
    naive = statistics.median(times["jax_naive"])
    rows = {}
    for name, ts in times.items():
        stats = common.summarize(ts)
        rows[name] = {
            **stats,
            "flops_per_s": flops / stats["median_s"],
            "time_over_jax_naive": stats["median_s"] / naive,
            "time_over_jax_naive_paired_median": statistics.median(
                t / n for t, n in zip(ts, times["jax_naive"], strict=True)),
        }
    return {"batch": batch, "flops": flops, "compulsory_bytes": compulsory,
            "agreement_max_abs_diff_vs_jax_naive": agreement, "xla_memory": xla_memory,
            "rows": rows}


def add_ceiling_fractions(timing: dict, machine: dict) -> None:
    """Fractions of the measured peak and of the floor, once the run's peak is final."""
    peak = machine["peak_flops"]
    timing["floor_s"] = max(timing["flops"] / peak, timing["compulsory_bytes"]
                            / machine["bandwidth"]["bandwidth_bytes_per_s"])
    for row in timing["rows"].values():
        row["fraction_of_peak"] = row["flops_per_s"] / peak
        row["time_over_floor"] = row["median_s"] / timing["floor_s"]


# ---------------------------------------------------------------------------- phase 2: memory


def memory_worker(name: str, batch: int, shape: dict) -> dict:
    """Runs in a fresh process: peak RSS of one run of one variant (see module docstring)."""
    common.set_torch_threads()
    hidden, unembedding, targets = make_inputs(batch, shape["seq"], shape["dim"], shape["vocab"])
    rss_inputs = common.rss_bytes()
    run, compiled = make_runner(name, hidden, unembedding, targets)
    if name != "torch_naive":
        del hidden, unembedding  # the device copies are what the run reads
    run()  # warm-up: lazy library and thread-pool state, not the run's own memory
    # PJRT frees a run's buffers asynchronously: let that finish before the baseline, or
    # a buffer still held would lift the baseline and hide part of the measured peak.
    gc.collect()
    time.sleep(1.0)
    baseline = common.rss_bytes()
    reset = common.reset_peak_rss()
    if not reset:
        baseline = max(baseline, common.peak_rss_bytes())  # can only bound the run's peak
    ru_before = common.ru_maxrss_bytes()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    peak = common.peak_rss_bytes()
    return {
        "variant": name,
        "batch": batch,
        "rss_after_inputs_bytes": rss_inputs,
        "rss_before_run_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - baseline,
        "peak_reset": reset,
        "ru_maxrss_before_run_bytes": ru_before,
        "ru_maxrss_after_run_bytes": common.ru_maxrss_bytes(),
        "run_s": elapsed,
        "xla_memory": memory_analysis(compiled) if compiled is not None else None,
    }


def measure_memory(name: str, batch: int, shape: dict) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    # A fixed threshold also turns off glibc's dynamic one, which would otherwise grow
    # after the warm-up frees its big buffers and keep the next run's in the heap.
    env = dict(os.environ, PYTHONPATH=path, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, "-m", "bench.token_signals", "--worker", name, "--batch", str(batch),
           "--shape", json.dumps(shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory worker {name} B={batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def goals(result: dict) -> dict:
    """Goal: chunked peak <= 1/4 of naive peak at <= 1.2x naive time (per batch, chunk)."""
    out = {}
    for timing in result["timing"]:
        b = timing["batch"]
        mem = {m["variant"]: m for m in result["memory"] if m["batch"] == b}
        naive_rss = mem["jax_naive"]["peak_rss_delta_bytes"]
        naive_xla = mem["jax_naive"]["xla_memory"]
        for c in CHUNKS:
            name = f"jax_chunk_{c}"
            xla = mem[name]["xla_memory"]
            row = {
                "time_over_naive": timing["rows"][name]["time_over_jax_naive"],
                "rss_peak_over_naive": mem[name]["peak_rss_delta_bytes"] / naive_rss,
                "xla_total_over_naive": xla["total"] / naive_xla["total"],
                "xla_temp_over_naive": xla["temp"] / naive_xla["temp"],
            }
            row["met_rss"] = row["rss_peak_over_naive"] <= 0.25 and row["time_over_naive"] <= 1.2
            row["met_xla_total"] = (row["xla_total_over_naive"] <= 0.25
                                    and row["time_over_naive"] <= 1.2)
            out[f"B{b}_{name}"] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.batch, json.loads(args.shape))))
        return {}

    start = time.perf_counter()
    shape = QUICK if args.quick else {"vocab": VOCAB, "seq": SEQ, "dim": DIM}
    torch_threads = common.set_torch_threads()
    machine = common.machine_ceilings(args.quick)
    machine["torch_threads_note"] = f"torch.set_num_threads({torch_threads}) = cores JAX uses"
    print(f"peak {machine['peak_start']['peak_flops'] / 1e9:.1f} GFLOP/s, bandwidth "
          f"{machine['bandwidth']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)

    timing = [time_batch(batch, shape, 3) for batch in BATCHES]
    common.finish_ceilings(machine, args.quick)
    for t in timing:
        add_ceiling_fractions(t, machine)
        for name, row in t["rows"].items():
            print(f"B={t['batch']} {name:26s} {row['median_s'] * 1e3:9.1f} ms  "
                  f"x{row['time_over_jax_naive']:.2f} naive  "
                  f"{100 * row['fraction_of_peak']:5.1f}% peak  spread "
                  f"{100 * row['spread']:.0f}%", flush=True)
    memory = []
    for batch in BATCHES:
        for name in variant_names():
            memory.append(measure_memory(name, batch, shape))
            m = memory[-1]
            xla = m["xla_memory"]["total"] / 2**20 if m["xla_memory"] else float("nan")
            print(f"B={batch} {name:18s} peak RSS +{m['peak_rss_delta_bytes'] / 2**20:8.1f} MiB"
                  f"  XLA total {xla:8.1f} MiB", flush=True)

    result = {
        "benchmark": "token_signals",
        "quick": args.quick,
        "shape": shape,
        "logit_std": LOGIT_STD,
        "machine": machine,
        "notes": {
            "flops": "2*B*T*D*V (unembedding matmul only)",
            "floor": "max(FLOPs / measured matmul peak, compulsory bytes / measured copy "
                     "bandwidth); compulsory bytes = hidden + unembedding + targets + outputs",
            "peak": "matmul peak measured at the start and at the end of the run; the better "
                    "median is used",
            "rss": "fresh subprocess per variant: inputs, compile, one warm-up run, then "
                   "VmHWM over one run (reset via /proc/self/clear_refs right before it) "
                   "minus RSS before it; glibc MALLOC_MMAP_THRESHOLD_=128KiB so freed "
                   "buffers are returned to the OS",
            "xla": "compiled.memory_analysis(): temp + argument + output - alias bytes",
            "timing": "all variants in one process, warmed up, interleaved round-robin",
        },
        "timing": timing,
        "memory": memory,
    }
    result["goals"] = goals(result)
    result["wall_s"] = time.perf_counter() - start
    path = common.write_json(common.result_name("token_signals", args.quick), result)
    for key, row in result["goals"].items():
        print(f"{key}: time x{row['time_over_naive']:.2f}, RSS peak x"
              f"{row['rss_peak_over_naive']:.3f}, XLA total x{row['xla_total_over_naive']:.3f}"
              f" -> goal {'met' if row['met_rss'] else 'NOT met'} (RSS)")
    print(f"wrote {path} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
