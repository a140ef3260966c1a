"""Classification-signal throughput (examples/s): memjax vs PyTorch, same weights, one run.

For each model (an MLP on scikit-learn digits, a ~4.8M-parameter ViT on random 32x32
images) the same per-example signals (loss, p_true, phi, hinge, entropy, correct) are
computed by:

- ``memjax``: ``memjax.engine.score(fn, params, data, batch_size=B, progress=False)`` with
  ``fn = model forward + memjax.signals._classification`` (engine defaults otherwise).
- ``jax_raw_jit``: ``jax.jit(jax.vmap(fn))`` over the same padded batches, already on the
  device; results fetched to NumPy. The engine's own cost is memjax minus this row.
- ``torch_batched``: the fair PyTorch peer: batches of B sliced from in-memory tensors,
  ``cross_entropy(reduction='none')`` and the other fields batched, ``inference_mode``.
- ``torch_batch1``: reference-style research code: a Python loop at batch size 1 with a
  ``.item()`` per field. Timed on a subset and extrapolated to examples/s.

Diagnostics (MLP only; cheap) split the engine overhead: a raw loop fed host NumPy
batches, the engine without the NaN/Inf input and output checks, without prefetch, and a
one-batch call (the fixed cost of a ``score`` call); plus PyTorch batched on 1 thread.

Logits (first batch) and all outputs of memjax, the raw loop and torch_batched (first two
batches, the warm-up) are checked to agree within 1e-4 before timing. Run
``python -m bench.classification_throughput [--quick]``; writes
``bench/results/classification_throughput.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import jax
import numpy as np
import torch
import torch.nn.functional as F

import memjax.engine
import memjax.signals
from bench import common, models

MLP_SIZES = (64, 256, 256, 10)
FIELDS = ("loss", "p_true", "phi", "hinge", "entropy", "correct")
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------- data


def digits_data(tiles: int) -> dict[str, np.ndarray]:
    """scikit-learn digits, flattened, /16, repeated ``tiles`` times (same real images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.data, np.float32) / 16.0
    labels = np.asarray(digits.target, np.int32)
    return {"image": np.tile(images, (tiles, 1)), "label": np.tile(labels, tiles)}


def random_images(n: int, cfg: models.ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, cfg.image, cfg.image, cfg.channels)
    return {
        "image": rng.standard_normal(shape, dtype=np.float32),
        "label": rng.integers(0, cfg.classes, n).astype(np.int32),
    }


def padded_batches(data: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """Fixed-size batches; the last one padded with copies of its first row (as the engine)."""
    n = len(data["label"])
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        idx = np.where(idx < n, idx, start)
        out.append({k: v[idx] for k, v in data.items()})
    return out


# ---------------------------------------------------------------------------- peers


def torch_signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six signals for a batch, computed the batched PyTorch way."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    log_p = F.log_softmax(logits, dim=-1)
    z_y = logits.gather(1, labels[:, None])[:, 0]
    # Wrong classes only: the true class masked to -inf.
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return {
        "loss": loss,
        "p_true": torch.exp(-loss),
        "phi": z_y - torch.logsumexp(others, dim=-1),
        "hinge": z_y - others.amax(dim=-1),
        "entropy": -(log_p.exp() * log_p).sum(dim=-1),
        "correct": logits.argmax(dim=-1) == labels,
    }


def run_torch_batched(apply, tparams, images: torch.Tensor, labels: torch.Tensor,
                      batch: int) -> dict[str, np.ndarray]:
    parts = []
    with torch.inference_mode():
        for start in range(0, len(labels), batch):
            logits = apply(tparams, images[start:start + batch])
            parts.append(torch_signals(logits, labels[start:start + batch]))
        return {k: torch.cat([p[k] for p in parts]).numpy() for k in FIELDS}


def run_torch_batch1(apply, tparams, images: torch.Tensor, labels: torch.Tensor,
                     n: int) -> dict[str, np.ndarray]:
    """Research-repo style: one example at a time, a ``.item()`` per field."""
    out: dict[str, list] = {k: [] for k in FIELDS}
    with torch.no_grad():
        for i in range(n):
            logits = apply(tparams, images[i:i + 1])
            y = labels[i:i + 1]
            probs = F.softmax(logits, dim=1)[0]
            p_true = probs[y].item()
            # LiRA's reference code: phi from probabilities, with an epsilon.
            p_wrong = probs.sum().item() - p_true
            wrong = logits[0].clone()
            wrong[y] = -math.inf
            out["loss"].append(F.cross_entropy(logits, y).item())
            out["p_true"].append(p_true)
            out["phi"].append(math.log(p_true + 1e-45) - math.log(p_wrong + 1e-45))
            out["hinge"].append((logits[0, y] - wrong.max()).item())
            out["entropy"].append(-(probs * torch.log(probs)).sum().item())
            out["correct"].append(logits.argmax().item() == y.item())
    return {k: np.asarray(v) for k, v in out.items()}


def run_torch_batched_threads(threads: int, *args) -> dict[str, np.ndarray]:
    """:func:`run_torch_batched` with ``threads`` intra-op threads, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_torch_batched(*args)
    finally:
        torch.set_num_threads(before)


def run_jax_loop(step, params, batches, n: int) -> dict[str, np.ndarray]:
    """The jitted vmapped function over ``batches`` (device or host), fetched to NumPy."""
    outs = [step(params, b) for b in batches]  # async dispatch: all queued, then fetched
    host = jax.device_get(outs)
    return {k: np.concatenate([o[k] for o in host])[:n] for k in FIELDS}


def run_memjax(fn, params, data, batch: int, **kwargs) -> dict[str, np.ndarray]:
    return memjax.engine.score(fn, params, data, batch_size=batch, progress=False, **kwargs)


# ---------------------------------------------------------------------------- checks


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_agreement(reference: dict, other: dict, fields=FIELDS, tol: float = TOLERANCE):
    """Max abs difference per field; raises if any exceeds ``tol`` (``correct``: exact)."""
    diffs = {k: max_abs_diff(reference[k], other[k]) for k in fields}
    bad = {k: d for k, d in diffs.items() if not d <= tol}
    if bad:
        raise AssertionError(f"outputs disagree beyond {tol}: {bad}")
    return diffs


# ---------------------------------------------------------------------------- bench


def bench_model(name: str, *, jax_logits, torch_logits, params: dict, data: dict, batch: int,
                flops_per_example: int, repeats: int, batch1_n: int,
                diagnostics: bool) -> dict:
    """All rows for one model (see module docstring); timings interleaved round-robin."""
    n = len(data["label"])
    n_batches = -(-n // batch)
    fn = lambda p, ex: memjax.signals.classification(jax_logits(p, ex["image"]), ex["label"])
    device_params = jax.device_put(params)
    tparams = models.to_torch(params)
    step = jax.jit(jax.vmap(fn, in_axes=(None, 0)))

    def make_runs(d: dict) -> tuple[dict, dict]:
        """Row -> callable over the data ``d`` and row -> examples it scores.

        Inputs are prepared here, outside the timing: padded device batches for the raw
        loop, int64 label tensors for PyTorch (what ``cross_entropy`` takes).
        """
        m = len(d["label"])
        host_batches = padded_batches(d, batch)
        device_batches = jax.device_put(host_batches)
        timages = torch.from_numpy(d["image"])
        tlabels = torch.from_numpy(d["label"].astype(np.int64))
        b1 = min(batch1_n, m)
        runs = {
            "memjax": lambda: run_memjax(fn, device_params, d, batch),
            "jax_raw_jit": lambda: run_jax_loop(step, device_params, device_batches, m),
            "torch_batched": lambda: run_torch_batched(torch_logits, tparams, timages,
                                                       tlabels, batch),
            "torch_batch1": lambda: run_torch_batch1(torch_logits, tparams, timages, tlabels,
                                                     b1),
        }
        examples = {"memjax": m, "jax_raw_jit": m, "torch_batched": m, "torch_batch1": b1}
        if diagnostics:
            one_batch = {k: v[:batch] for k, v in d.items()}
            runs |= {
                "jax_loop_host_batches": lambda: run_jax_loop(step, device_params,
                                                              host_batches, m),
                "memjax_check_finite_off": lambda: run_memjax(fn, device_params, d, batch,
                                                              check_finite=False),
                "memjax_prefetch_0": lambda: run_memjax(fn, device_params, d, batch,
                                                        prefetch=0),
                "memjax_one_batch_call": lambda: run_memjax(fn, device_params, one_batch,
                                                            batch),
                "jax_raw_one_batch": lambda: run_jax_loop(step, device_params,
                                                          device_batches[:1], batch),
                # OpenMP threads spin-wait: on a busy shared machine 2 threads can lose to 1.
                "torch_batched_1_thread": lambda: run_torch_batched_threads(
                    1, torch_logits, tparams, timages, tlabels, batch),
            }
            examples |= {"jax_loop_host_batches": m, "memjax_check_finite_off": m,
                         "memjax_prefetch_0": m, "memjax_one_batch_call": batch,
                         "jax_raw_one_batch": batch, "torch_batched_1_thread": m}
        return runs, examples

    # Same weights, same math: logits within 1e-4 on the first batch, then every signal.
    first = {k: v[:batch] for k, v in data.items()}
    logits_jax = np.asarray(jax.jit(jax.vmap(jax_logits, (None, 0)))(
        device_params, first["image"]))
    with torch.inference_mode():
        logits_torch = torch_logits(tparams, torch.from_numpy(first["image"])).numpy()
    logit_diff = max_abs_diff(logits_jax, logits_torch)
    assert logit_diff <= TOLERANCE, f"{name}: JAX and PyTorch logits differ by {logit_diff}"

    # Warm-up on two batches (same batch shape, so it compiles every executable the timed
    # runs use: the engine caches its executable per fn), and the agreement check on them.
    warm, _ = make_runs({k: v[:2 * batch] for k, v in data.items()})
    outputs = {row: run() for row, run in warm.items()}
    b1 = len(outputs["torch_batch1"]["loss"])
    agreement = {
        "checked_examples": len(outputs["memjax"]["loss"]),
        "logits_max_abs_diff": logit_diff,
        "memjax_vs_torch_batched": check_agreement(outputs["torch_batched"],
                                                   outputs["memjax"]),
        "jax_raw_vs_memjax": check_agreement(outputs["memjax"], outputs["jax_raw_jit"]),
        "torch_batch1_vs_batched_loss": max_abs_diff(
            outputs["torch_batch1"]["loss"], outputs["torch_batched"]["loss"][:b1]),
    }
    del outputs, warm

    runs, examples = make_runs(data)
    times = common.time_interleaved(runs, repeats)
    rows = {}
    for row, ts in times.items():
        stats = common.summarize(ts)
        rate = examples[row] / stats["median_s"]
        rows[row] = {
            "examples": examples[row],
            "examples_per_s": rate,
            "flops_per_s": rate * flops_per_example,
            **stats,
        }
    torch_rate = rows["torch_batched"]["examples_per_s"]
    for row in rows.values():
        row["ratio_vs_torch_batched"] = row["examples_per_s"] / torch_rate
    # Paired per-repeat ratios: each pair ran back to back, so machine drift mostly cancels.
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b],
                                                                   strict=True))

    param_bytes = 4 * models.param_count(params)
    compulsory_bytes = data["image"].nbytes + data["label"].nbytes + param_bytes + n * 6 * 4
    engine_overhead_s = rows["memjax"]["median_s"] - rows["jax_raw_jit"]["median_s"]
    return {
        "model": name,
        "n_examples": n,
        "batch_size": batch,
        "n_batches": n_batches,
        "params": models.param_count(params),
        "flops_per_example": flops_per_example,
        "agreement": agreement,
        "rows": rows,
        "memjax_over_torch_batched": rows["memjax"]["ratio_vs_torch_batched"],
        "memjax_over_torch_batched_paired_median": paired("torch_batched", "memjax"),
        "memjax_time_over_raw_jit_paired_median": paired("memjax", "jax_raw_jit"),
        "goal_1p5x_met": rows["memjax"]["ratio_vs_torch_batched"] >= 1.5,
        "total_flops": n * flops_per_example,
        "compulsory_bytes": compulsory_bytes,
        "engine_overhead_s": engine_overhead_s,
        "engine_overhead_per_batch_ms": 1e3 * engine_overhead_s / n_batches,
    }


def add_ceiling_fractions(result: dict, machine: dict) -> None:
    """Fractions of the measured peak and the floor, once the run's peak is final."""
    peak = machine["peak_flops"]
    for row in result["rows"].values():
        row["fraction_of_peak"] = row["flops_per_s"] / peak
    result["floor_s"] = max(result["total_flops"] / peak, result["compulsory_bytes"]
                            / machine["bandwidth"]["bandwidth_bytes_per_s"])
    result["memjax_time_over_floor"] = result["rows"]["memjax"]["median_s"] / result["floor_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    torch_threads = common.set_torch_threads()
    machine = common.machine_ceilings(args.quick)
    machine["torch_threads_note"] = f"torch.set_num_threads({torch_threads}) = cores JAX uses"
    print(f"peak {machine['peak_start']['peak_flops'] / 1e9:.1f} GFLOP/s, bandwidth "
          f"{machine['bandwidth']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)

    results = []
    tiles = 1 if args.quick else 8
    results.append(bench_model(
        "mlp_digits",
        jax_logits=models.mlp,
        torch_logits=models.torch_mlp,
        params=models.init_mlp(0, MLP_SIZES),
        data=digits_data(tiles),
        batch=256,
        flops_per_example=models.mlp_flops(MLP_SIZES),
        repeats=3 if args.quick else 15,  # cheap, and the noisiest rows
        batch1_n=128 if args.quick else 512,
        diagnostics=True,
    ))

    cfg = models.ViTConfig(depth=2) if args.quick else models.ViTConfig()
    results.append(bench_model(
        "vit_small",
        jax_logits=partial(models.vit, cfg=cfg),
        torch_logits=partial(models.torch_vit, cfg=cfg),
        params=models.init_vit(0, cfg),
        data=random_images(256 if args.quick else 2048, cfg),
        batch=128,
        flops_per_example=models.vit_flops(cfg),
        repeats=2 if args.quick else 3,
        batch1_n=16 if args.quick else 64,
        diagnostics=False,
    ))
    results[-1]["config"] = vars(cfg)
    common.finish_ceilings(machine, args.quick)
    for result in results:
        add_ceiling_fractions(result, machine)
        print_model(result)

    payload = {
        "benchmark": "classification_throughput",
        "quick": args.quick,
        "machine": machine,
        "notes": {
            "mlp_data": f"sklearn digits (1797 real images, /16) tiled {tiles}x so per-call "
                        "fixed costs are amortised as on a larger dataset; random He weights",
            "vit_data": "random N(0,1) images and random labels; random weights (std 0.02)",
            "torch_batch1": "timed on the first `examples` examples and extrapolated to "
                            "examples/s",
            "timing": "warm-up run of every row first (compiles), then rows interleaved "
                      "round-robin; median and spread=(max-min)/median",
            "flops": "analytic matmul FLOPs (2mnk) of the forward pass, see bench/models.py",
            "floor": "max(FLOPs / measured matmul peak, compulsory bytes / measured copy "
                     "bandwidth); compulsory bytes = inputs + params + outputs, read once",
            "peak": "matmul peak measured at the start and at the end of the run; the better "
                    "median is used",
        },
        "models": results,
        "wall_s": time.perf_counter() - start,
    }
    path = common.write_json(common.result_name("classification_throughput", args.quick), payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s")
    return payload


def print_model(result: dict) -> None:
    print(f"\n{result['model']}: N={result['n_examples']}, batch {result['batch_size']}, "
          f"{result['flops_per_example'] / 1e6:.2f} MFLOP/example")
    for row, r in result["rows"].items():
        print(f"  {row:26s} {r['examples_per_s']:12.0f} ex/s  x{r['ratio_vs_torch_batched']:.2f}"
              f"  {100 * r['fraction_of_peak']:6.2f}% peak  spread {100 * r['spread']:.0f}%")
    print(f"  engine overhead {result['engine_overhead_per_batch_ms']:.2f} ms/batch (memjax / "
          f"raw, paired: {result['memjax_time_over_raw_jit_paired_median']:.2f}); memjax "
          f"time / floor {result['memjax_time_over_floor']:.1f}", flush=True)


if __name__ == "__main__":
    main()
