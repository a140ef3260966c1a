"""Forward-INF benchmarks (issue 5): memjax vs the reference notebook's per-test-example loop.

- Digits, T = 64 test examples, N = 1,797 training examples, an MLP 64-128-10 trained with
  ``fit_classifier`` (weights copied into PyTorch), Adam lr 5e-3, gradient ascent, |δ|:
  * ``memjax``: ``forward_inf(..., mode="finite", optimizer="adam", score="abs")`` (warm:
    compile time reported separately), at forward_inf's default batch (two equal batches of
    904 rows here, each scored in blocks of 64 rows) and at 256.
  * ``torch_reference``: written the way reds-lab/Forward-INF's notebook does it: for each
    test example ``copy.deepcopy(model)``, one ``torch.optim.Adam`` step minimising −CE on
    the copy, then a pass over the training set in minibatches of 256 computing the copy's
    losses AND the original model's losses again (the notebook recomputes them per test
    example), |δ|.
  * ``torch_batched``: the fair peer: base losses once; the T updated parameter sets from
    per-example gradients written as batched matmuls and Adam's first step, stacked, and
    evaluated over the training set in blocks of 256 with ``baddbmm``.
  All three must agree (allclose) before timing. Also ``memjax_first_order`` (jvp mode),
  and diagnostics: the T updates alone, the score function jitted over all N in one call
  (no engine), and both PyTorch peers on one thread (immune to OpenMP spinning under load).
- The floor: matmul FLOPs of the work ((T + 1)·N forward passes + T single-example
  updates) over the matmul peak measured in the same run; each row's time / floor.
- Streaming: N = 1,000,000 and 100,000 synthetic examples (64-d inputs generated from
  their indices, so nothing materialises) into a ``ScoreStore``, T = 8, batch 1,024, each
  N in a fresh subprocess: examples/s and peak RSS (the kernel's high-water mark reset
  after a warm-up run that compiles).

Run: ``PYTHONPATH=. python -m bench.influence`` (writes bench/results/influence.json).
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import (
    finish_ceilings,
    machine_ceilings,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    set_torch_threads,
    summarize,
    time_interleaved,
    write_json,
)
from memjax.train.classifier import classifier_logits

T, LR, REF_BATCH = 64, 5e-3, 256
SIZES = (64, 128, 10)
# Matmul FLOPs of one forward pass of the MLP on one example.
FORWARD_FLOPS = sum(2 * a * b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
# One update on one test example: forward + backward (weight gradients of both layers,
# input gradient of the second only).
UPDATE_FLOPS = FORWARD_FLOPS + sum(2 * a * b for a, b in zip(SIZES[:-1], SIZES[1:],
                                                             strict=True)) \
    + 2 * SIZES[1] * SIZES[2]
STREAM_T, STREAM_BATCH = 8, 1024


def loss_fn(params, example):
    """Cross-entropy of ONE example (module level: forward_inf caches on this object)."""
    logits = classifier_logits(params, example["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def trained_model():
    """The digits MLP 64-128-10 (300 full-batch Adam steps), its data and T test rows."""
    from memjax.data import digits
    from memjax.train import MLPConfig, fit_classifier

    source = digits()
    images, labels = source.arrays["image"], source.arrays["label"]
    config = MLPConfig(images.shape[1:], 10, hidden=(SIZES[1],))
    params = jax.jit(functools.partial(fit_classifier, config=config, steps=300,
                                       learning_rate=2e-3))(
        jax.random.key(0), images, labels, np.ones(len(labels), np.float32))
    params = jax.tree.map(np.asarray, params)
    rows = np.random.default_rng(0).choice(len(labels), T, replace=False)
    test = {"image": images[rows], "label": labels[rows]}
    train = {"image": images, "label": labels}
    return params, train, test


def flops(t: int, n: int, base_per_test: bool) -> float:
    base = t * n if base_per_test else n
    return float(t * n * FORWARD_FLOPS + base * FORWARD_FLOPS + t * UPDATE_FLOPS)


# ---- PyTorch peers ------------------------------------------------------------------

def torch_model(params):
    import torch

    layers = params["layers"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZES[0], SIZES[1]),
                                torch.nn.ReLU(), torch.nn.Linear(SIZES[1], SIZES[2]))
    with torch.no_grad():
        for linear, layer in zip((model[1], model[3]), layers, strict=True):
            linear.weight.copy_(torch.from_numpy(np.asarray(layer["w"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
    return model


def torch_reference(model, test, train):
    """The reference notebook's loop: a deep copy and an Adam step per test example, then
    the copy's losses and the base losses recomputed over the training set in batches."""
    import torch
    import torch.nn.functional as F

    x_test, y_test = test
    x_train, y_train = train
    n = len(y_train)
    scores = torch.empty(len(y_test), n)
    for t in range(len(y_test)):
        copied = copy.deepcopy(model)
        optimizer = torch.optim.Adam(copied.parameters(), lr=LR)
        optimizer.zero_grad()
        loss = -F.cross_entropy(copied(x_test[t:t + 1]), y_test[t:t + 1])  # ascent
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for lo in range(0, n, REF_BATCH):
                xb, yb = x_train[lo:lo + REF_BATCH], y_train[lo:lo + REF_BATCH]
                new = F.cross_entropy(copied(xb), yb, reduction="none")
                base = F.cross_entropy(model(xb), yb, reduction="none")
                scores[t, lo:lo + REF_BATCH] = (new - base).abs()
    return scores.numpy()


def torch_batched(weights, test, train, block: int = REF_BATCH):
    """The fair peer: per-test-example gradients by hand (batched matmuls), Adam's first
    step applied to all T at once, the T copies stacked and evaluated with ``baddbmm`` over
    the training set in blocks of ``block`` (blocks keep the [T, block, 128] activations in
    cache: ~1.5x faster than the whole set at once); base losses once."""
    import torch
    import torch.nn.functional as F

    w1, b1, w2, b2 = weights  # [64, 128], [128], [128, 10], [10]
    x_test, y_test = test
    x_train, y_train = train
    with torch.no_grad():
        # Gradients of −CE (ascent) for each test example: d(−CE)/dlogits = onehot − p.
        z1 = torch.addmm(b1, x_test, w1)
        h = torch.relu(z1)
        dlogits = F.one_hot(y_test, w2.shape[1]).float() - torch.softmax(h @ w2 + b2, -1)
        dz1 = (dlogits @ w2.T) * (z1 > 0)
        grads = (x_test[:, :, None] * dz1[:, None, :], dz1,
                 h[:, :, None] * dlogits[:, None, :], dlogits)
        # Adam's first step from fresh state: m̂ = g, v̂ = g², θ' = θ − lr·g/(|g| + eps).
        new = [p[None] - LR * g / (g.abs() + 1e-8) for p, g in zip(weights, grads,
                                                                  strict=True)]
        w1t, b1t, w2t, b2t = new[0], new[1][:, None], new[2], new[3][:, None]
        t, n = len(y_test), len(y_train)
        scores = torch.empty(t, n)
        for lo in range(0, n, block):
            xb, yb = x_train[lo:lo + block], y_train[lo:lo + block]
            base = F.cross_entropy(torch.relu(torch.addmm(b1, xb, w1)) @ w2 + b2, yb,
                                   reduction="none")
            hidden = torch.relu_(torch.baddbmm(b1t, xb[None].expand(t, -1, -1), w1t))
            logits = torch.baddbmm(b2t, hidden, w2t)  # [T, block, 10]
            updated = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(t),
                                      reduction="none").reshape(t, -1)
            scores[:, lo:lo + block] = (updated - base).abs()
        return scores.numpy()


# ---- digits benchmark ---------------------------------------------------------------

def one_thread(run):
    def wrapped():
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run()
        finally:
            torch.set_num_threads(threads)

    return wrapped


def bench_digits(peak_flops_start: float, repeats: int = 5) -> dict:
    import torch

    from memjax.influence._forward_inf import _finite_score_fn, _per_test_fn, forward_inf

    params, train, test = trained_model()
    model = torch_model(params)
    flat = lambda a: torch.from_numpy(a.reshape(len(a), -1))  # noqa: E731
    tt = (flat(test["image"]), torch.from_numpy(test["label"]).long())
    tr = (flat(train["image"]), torch.from_numpy(train["label"]).long())
    weights = [torch.from_numpy(np.array(params["layers"][0]["w"])),
               torch.from_numpy(np.array(params["layers"][0]["b"])),
               torch.from_numpy(np.array(params["layers"][1]["w"])),
               torch.from_numpy(np.array(params["layers"][1]["b"]))]
    settings = dict(direction="ascent", optimizer="adam", lr=LR, score="abs")

    def mj(mode="finite", batch_size=None):
        return lambda: forward_inf(loss_fn, params, test, train, mode=mode,
                                   batch_size=batch_size, **settings)

    # forward_inf's own (cached) jitted pieces, for the diagnostic rows below.
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    mask = (True,) * len(leaves)
    per_test = _per_test_fn(loss_fn, treedef, mask, "finite", 1.0, "adam", LR, 1, False)
    stacked = per_test(leaves, test)
    score_fn = _finite_score_fn(loss_fn, treedef, mask, "abs", 1.0)
    # The score function takes a device's rows (engine batched=True) and blocks them itself.
    raw = jax.jit(lambda lv, st, rows: score_fn((lv, st), rows))

    runs = {"memjax": mj(), "memjax_batch256": mj(batch_size=256),
            "memjax_first_order": mj("first_order"),
            "torch_reference": lambda: torch_reference(model, tt, tr),
            "torch_batched": lambda: torch_batched(weights, tt, tr),
            # Diagnostics: where memjax's time goes. The T updates alone (forward_inf's
            # jitted per-test function), and the score function jitted over the whole
            # training set in one call (no engine), given the updated copies.
            "jax_updates_only": lambda: jax.block_until_ready(per_test(leaves, test)),
            "jax_raw_one_call": lambda: np.asarray(raw(leaves, stacked, train)).T,
            # Diagnostics: PyTorch's OpenMP threads spin and starve each other when another
            # job holds a core (bench/README.md, "Noise"); one thread is immune to that.
            "torch_reference_1_thread": one_thread(lambda: torch_reference(model, tt, tr)),
            "torch_batched_1_thread": one_thread(lambda: torch_batched(weights, tt, tr))}
    first_call = {}
    outputs = {}
    for name, run in runs.items():
        start = time.perf_counter()
        outputs[name] = run()
        first_call[name] = time.perf_counter() - start
    # Agreement (float32): every peer of the finite update against memjax.
    agreement = {}
    for name in ("memjax_batch256", "torch_reference", "torch_batched", "jax_raw_one_call",
                 "torch_reference_1_thread", "torch_batched_1_thread"):
        diff = np.abs(outputs[name] - outputs["memjax"])
        agreement[name] = {"max_abs": float(diff.max()),
                           "max_rel": float((diff / np.maximum(np.abs(outputs["memjax"]),
                                                               1e-3)).max())}
        np.testing.assert_allclose(outputs[name], outputs["memjax"], rtol=1e-3, atol=1e-4)
    fo, fin = outputs["memjax_first_order"].ravel(), outputs["memjax"].ravel()
    agreement["first_order_vs_finite"] = {
        "pearson": float(np.corrcoef(fo, fin)[0, 1]),
        "median_rel_diff": float(np.median(np.abs(fo - fin) / np.maximum(fin, 1e-6)))}
    agreement["score_scale"] = {"median_abs_delta": float(np.median(fin)),
                                "max_abs_delta": float(fin.max())}
    del outputs

    times = time_interleaved(runs, repeats)
    out = {name: summarize(t) for name, t in times.items()}
    n = len(train["label"])
    medians = {name: out[name]["median_s"] for name in times}
    # First call minus a warm call: tracing + XLA compilation (memjax rows only).
    compile_s = {name: first_call[name] - medians[name] for name in runs
                 if name.startswith(("memjax", "jax"))}
    work = flops(T, n, base_per_test=False)
    return {"rows": out, "T": T, "N": n, "agreement": agreement,
            "first_call_s": first_call, "compile_s": compile_s,
            "flops_min": work,
            "flops_reference": flops(T, n, base_per_test=True),
            "speedup_vs_reference": medians["torch_reference"] / medians["memjax"],
            "speedup_vs_reference_batch256": (medians["torch_reference"]
                                              / medians["memjax_batch256"]),
            "speedup_vs_torch_batched": medians["torch_batched"] / medians["memjax"],
            "speedup_vs_reference_1_thread": (medians["torch_reference_1_thread"]
                                              / medians["memjax"]),
            "speedup_vs_torch_batched_1_thread": (medians["torch_batched_1_thread"]
                                                  / medians["memjax"]),
            "speedup_vs_torch_batched_batch256": (medians["torch_batched"]
                                                  / medians["memjax_batch256"]),
            "first_order_over_finite": medians["memjax_first_order"] / medians["memjax"],
            "paired_reference_over_memjax": float(np.median(
                np.asarray(times["torch_reference"]) / np.asarray(times["memjax"]))),
            "peak_flops_start": peak_flops_start, "_medians": medians}


def add_floor(result: dict, peak: float) -> None:
    medians = result.pop("_medians")
    result["peak_flops"] = peak
    result["floor_s"] = result["flops_min"] / peak
    result["time_over_floor"] = {k: v / result["floor_s"] for k, v in medians.items()}
    result["fraction_of_floor"] = {k: result["floor_s"] / v for k, v in medians.items()}
    result["goal_20x_met"] = result["speedup_vs_reference"] >= 20


# ---- streaming ----------------------------------------------------------------------

class SyntheticSource:
    """N examples {image [64] float32, label int32} generated from their indices alone."""

    def __init__(self, n: int):
        self.n = n
        self._freq = np.random.default_rng(1).uniform(0.5, 3.0, 64).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def read(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        phase = (idx % 100_003).astype(np.float32)[:, None] * np.float32(1e-3)
        image = 0.5 + 0.5 * np.sin(phase * self._freq + self._freq)
        return {"image": image.astype(np.float32), "label": (idx % 10).astype(np.int32)}

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.read(np.asarray([i])).items()}

    def spec(self):
        return {"kind": "synthetic_bench", "n": self.n}


def _child_stream(n: int) -> None:
    from memjax.engine.store import ScoreStore
    from memjax.influence._forward_inf import forward_inf

    params, _, test = trained_model()
    test = {"image": test["image"][:STREAM_T].reshape(STREAM_T, -1),
            "label": test["label"][:STREAM_T]}
    settings = dict(direction="ascent", optimizer="adam", lr=LR, score="abs",
                    batch_size=STREAM_BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up (compiles) on a small source.
        forward_inf(loss_fn, params, test, SyntheticSource(4 * STREAM_BATCH),
                    store=ScoreStore(f"{tmp}/warm"), **settings)
        gc.collect()
        time.sleep(1.0)
        before = rss_bytes()
        reset_ok = reset_peak_rss()
        start = time.perf_counter()
        store = forward_inf(loss_fn, params, test, SyntheticSource(n),
                            store=ScoreStore(f"{tmp}/run"), **settings)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        total = 0
        rows = 0
        for chunk in store.iter_chunks():
            rows += len(chunk["score"])
            total += float(np.sum(chunk["score"]))
        assert rows == n, rows
    print(json.dumps({"n": n, "T": STREAM_T, "batch_size": STREAM_BATCH, "seconds": seconds,
                      "examples_per_s": n / seconds, "rss_before_mib": before / 2**20,
                      "peak_rss_mib": peak / 2**20,
                      "peak_above_before_mib": (peak - before) / 2**20,
                      "peak_reset": reset_ok, "score_sum": total,
                      "load_average": __import__("os").getloadavg()}))


def bench_stream() -> dict:
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = {}
    for n in (100_000, 1_000_000):
        out = subprocess.run([sys.executable, "-m", "bench.influence", "--child-stream",
                              str(n)], capture_output=True, text=True, check=True, env=env)
        rows[f"n{n}"] = json.loads(out.stdout.strip().splitlines()[-1])
    small, big = rows["n100000"], rows["n1000000"]
    rows["peak_rss_ratio_1m_over_100k"] = big["peak_rss_mib"] / small["peak_rss_mib"]
    rows["flops_per_example"] = (STREAM_T + 1) * FORWARD_FLOPS
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-stream":
        set_torch_threads()
        _child_stream(int(sys.argv[2]))
        return
    set_torch_threads()
    machine = machine_ceilings(quick=False)
    digits_result = bench_digits(machine["peak_start"]["peak_flops"])
    stream = bench_stream()
    peak = finish_ceilings(machine, quick=False)
    add_floor(digits_result, peak)
    stream["gflops_per_s"] = {k: stream[k]["examples_per_s"] * stream["flops_per_example"]
                              / 1e9 for k in ("n100000", "n1000000")}
    stream["fraction_of_peak"] = {k: v * 1e9 / peak for k, v in stream["gflops_per_s"].items()}
    results = {"machine": machine, "digits_t64": digits_result, "stream_t8": stream}
    path = write_json("influence", results)
    d = digits_result
    for name, row in d["rows"].items():
        print(f"{name:20s} {row['median_s'] * 1e3:9.1f} ms  spread {row['spread']:.0%}  "
              f"time/floor {d['time_over_floor'][name]:7.1f}")
    print(f"memjax vs reference {d['speedup_vs_reference']:.1f}x (goal 20x: "
          f"{'met' if d['goal_20x_met'] else 'not met'}); vs torch batched "
          f"{d['speedup_vs_torch_batched']:.2f}x; first_order/finite "
          f"{d['first_order_over_finite']:.2f}; compile {d['compile_s']}")
    print(f"agreement {d['agreement']}")
    for k in ("n100000", "n1000000"):
        s = stream[k]
        print(f"stream {k}: {s['examples_per_s']:,.0f} ex/s, peak RSS {s['peak_rss_mib']:.0f} "
              f"MiB ({s['peak_above_before_mib']:.0f} above before)")
    print(f"peak {peak / 1e9:.1f} GFLOP/s; wrote {path}")


if __name__ == "__main__":
    main()
