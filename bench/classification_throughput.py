"""Classification-signal throughput (examples/s): memjax vs PyTorch, same weights, one run.

For each model (an MLP on scikit-learn digits, a ~4.8M-parameter ViT on random 32x32
images) the same per-example signals (loss, p_true, phi, hinge, entropy, correct) are
computed by:

- ``memjax``: ``memjax.engine.score(fn, params, data, batch_size=B, progress=False)`` with
  ``fn = model forward + memjax.signals.classification`` (engine defaults otherwise).
- ``jax_raw_jit``: ``jax.jit(jax.vmap(fn))`` over the same padded batches, already on the
  device; results fetched to NumPy. The engine's own cost is memjax minus this row.
- ``torch_batched``: the fair PyTorch peer: batches of B sliced from in-memory tensors,
  ``cross_entropy(reduction='none')`` and the other fields batched, ``inference_mode``.
- ``torch_batch1``: reference-style research code: a Python loop at batch size 1 with a
  ``.item()`` per field. Timed on a subset and extrapolated to examples/s.

Diagnostics (MLP only; cheap) split the engine overhead: a raw loop fed host NumPy
batches, the engine without the NaN/Inf input and output checks, without prefetch, and a
one-batch call (the fixed cost of a ``score`` call).

Outputs of memjax and torch_batched are checked to agree (≤ 1e-4) before timing. Run
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
                flops_per_example: int, repeats: int, batch1_n: int, machine: dict,
                diagnostics: bool) -> dict:
    """All rows for one model (see module docstring); timings interleaved round-robin."""
    n = len(data["label"])
    n_batches = -(-n // batch)
    fn = lambda p, ex: memjax.signals.classification(jax_logits(p, ex["image"]), ex["label"])
    device_params = jax.device_put(params)
    tparams = models.to_torch(params)
    # int64 labels: what cross_entropy and gather take (converted once, outside timing).
    timages = torch.from_numpy(data["image"])
    tlabels = torch.from_numpy(data["label"].astype(np.int64))
    host_batches = padded_batches(data, batch)
    device_batches = jax.device_put(host_batches)
    step = jax.jit(jax.vmap(fn, in_axes=(None, 0)))

    # Same weights, same math: logits within 1e-4 on the first batch, then every signal.
    logits_jax = np.asarray(jax.jit(jax.vmap(jax_logits, (None, 0)))(
        device_params, device_batches[0]["image"]))
    with torch.inference_mode():
        logits_torch = torch_logits(tparams, timages[:batch]).numpy()
    logit_diff = max_abs_diff(logits_jax[: min(batch, n)], logits_torch)
    assert logit_diff <= TOLERANCE, f"{name}: JAX and PyTorch logits differ by {logit_diff}"

    runs = {
        "memjax": lambda: run_memjax(fn, device_params, data, batch),
        "jax_raw_jit": lambda: run_jax_loop(step, device_params, device_batches, n),
        "torch_batched": lambda: run_torch_batched(torch_logits, tparams, timages, tlabels,
                                                   batch),
        "torch_batch1": lambda: run_torch_batch1(torch_logits, tparams, timages, tlabels,
                                                 batch1_n),
    }
    examples = {"memjax": n, "jax_raw_jit": n, "torch_batched": n, "torch_batch1": batch1_n}
    if diagnostics:
        one_batch = {k: v[:batch] for k, v in data.items()}
        runs |= {
            "jax_loop_host_batches": lambda: run_jax_loop(step, device_params, host_batches, n),
            "memjax_check_finite_off": lambda: run_memjax(fn, device_params, data, batch,
                                                          check_finite=False),
            "memjax_prefetch_0": lambda: run_memjax(fn, device_params, data, batch,
                                                    prefetch=0),
            "memjax_one_batch_call": lambda: run_memjax(fn, device_params, one_batch, batch),
            "jax_raw_one_batch": lambda: run_jax_loop(step, device_params,
                                                      device_batches[:1], batch),
        }
        examples |= {"jax_loop_host_batches": n, "memjax_check_finite_off": n,
                     "memjax_prefetch_0": n, "memjax_one_batch_call": batch,
                     "jax_raw_one_batch": batch}

    # Warm-up: compiles (the engine caches its executable per fn), first-touch allocations.
    outputs = {name_: run() for name_, run in runs.items()}
    agreement = {
        "logits_max_abs_diff": logit_diff,
        "memjax_vs_torch_batched": check_agreement(outputs["torch_batched"],
                                                   outputs["memjax"]),
        "jax_raw_vs_memjax": check_agreement(outputs["memjax"], outputs["jax_raw_jit"]),
        "torch_batch1_vs_batched_loss": max_abs_diff(
            outputs["torch_batch1"]["loss"], outputs["torch_batched"]["loss"][:batch1_n]),
    }
    del outputs

    times = common.time_interleaved(runs, repeats)
    peak = machine["peak"]["peak_flops"]
    rows = {}
    for row, ts in times.items():
        stats = common.summarize(ts)
        rate = examples[row] / stats["median_s"]
        rows[row] = {
            "examples": examples[row],
            "examples_per_s": rate,
            "flops_per_s": rate * flops_per_example,
            "fraction_of_peak": rate * flops_per_example / peak,
            **stats,
        }
    torch_rate = rows["torch_batched"]["examples_per_s"]
    for row in rows.values():
        row["ratio_vs_torch_batched"] = row["examples_per_s"] / torch_rate
    # Paired per-repeat ratios: each pair ran back to back, so machine drift mostly cancels.
    paired = [t / m for t, m in zip(times["torch_batched"], times["memjax"], strict=True)]

    param_bytes = 4 * models.param_count(params)
    compulsory_bytes = data["image"].nbytes + data["label"].nbytes + param_bytes + n * 6 * 4
    floor_s = max(n * flops_per_example / peak,
                  compulsory_bytes / machine["bandwidth"]["bandwidth_bytes_per_s"])
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
        "memjax_over_torch_batched_paired_median": statistics.median(paired),
        "goal_1p5x_met": rows["memjax"]["ratio_vs_torch_batched"] >= 1.5,
        "floor_s": floor_s,
        "memjax_time_over_floor": rows["memjax"]["median_s"] / floor_s,
        "engine_overhead_s": engine_overhead_s,
        "engine_overhead_per_batch_ms": 1e3 * engine_overhead_s / n_batches,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    torch_threads = common.set_torch_threads()
    machine = {
        "info": common.machine_info(),
        "torch_threads_note": f"torch.set_num_threads({torch_threads}) = cores JAX uses",
        "peak": common.measure_matmul_peak(1024 if args.quick else 2048),
        "bandwidth": common.measure_bandwidth(64 if args.quick else 512),
    }
    print(f"peak {machine['peak']['peak_flops'] / 1e9:.1f} GFLOP/s, bandwidth "
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
        repeats=3 if args.quick else 7,
        batch1_n=128 if args.quick else 512,
        machine=machine,
        diagnostics=True,
    ))
    print_model(results[-1])

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
        machine=machine,
        diagnostics=False,
    ))
    results[-1]["config"] = vars(cfg)
    print_model(results[-1])

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
        },
        "models": results,
        "wall_s": time.perf_counter() - start,
    }
    path = common.write_json("classification_throughput", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s")
    return payload


def print_model(result: dict) -> None:
    print(f"\n{result['model']}: N={result['n_examples']}, batch {result['batch_size']}, "
          f"{result['flops_per_example'] / 1e6:.2f} MFLOP/example")
    for row, r in result["rows"].items():
        print(f"  {row:26s} {r['examples_per_s']:12.0f} ex/s  x{r['ratio_vs_torch_batched']:.2f}"
              f"  {100 * r['fraction_of_peak']:6.2f}% peak  spread {100 * r['spread']:.0f}%")
    print(f"  engine overhead {result['engine_overhead_per_batch_ms']:.2f} ms/batch; "
          f"memjax time / floor {result['memjax_time_over_floor']:.1f}", flush=True)


if __name__ == "__main__":
    main()
