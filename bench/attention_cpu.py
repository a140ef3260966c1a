"""The CPU attention gap: memjax's attention formulations vs PyTorch's, and XLA:CPU flags.

Issue 14's benchmark: the ViT of ``classification_throughput`` runs at 0.67x batched PyTorch,
its attention 2.7x slower than PyTorch's fused ``scaled_dot_product_attention`` (SDPA).
This times, in one process and interleaved, for three shapes (the benchmark ViT, a
ViT-B/16 and a Llama-like causal layer at T = 2,048, 32 heads, Dh = 64):

- ``memjax``: ``memjax.models.layers.attention`` as the ports call it (dense when the
  scores fit its budget, query-blocked otherwise);
- ``einsum_bqhd``: the dense einsum formula on [B, T, H, Dh] (memjax before issue 14),
  with the causal mask materialised as ``causal_mask`` does;
- ``einsum_bhqd``: the same on [B, H, T, Dh] inputs (transposes hoisted out of the timing)
  and ``einsum_bhqd_transposed`` (the transposes inside, as a port would need them);
- ``dpa_xla``: ``jax.nn.dot_product_attention(implementation="xla")``;
- ``blocked_<n>``: memjax's query-blocked path with n queries per block (long shapes);
- ``memjax_no_causal_skip``: the blocked path with ``CAUSAL_GROUPS = 1`` (every block
  against all keys), to show what skipping the causally masked key ranges buys;
- ``torch_sdpa`` (``is_causal`` for the causal shape: its CPU flash kernel skips the masked
  half) and ``torch_naive`` (matmul, mask, softmax, matmul) on contiguous [B, H, T, Dh].

JAX functions are written per example and vmapped, as in the engine. Every row states its
largest difference from ``torch_naive`` (all float32). Ratios are ``time / torch_sdpa``.

Then each XLA:CPU flag setting (``FLAG_SETTINGS``; flags exist in jaxlib 0.10.2, checked
against its flag table) runs in its own process (``XLA_FLAGS`` is read once per process),
timing ``memjax`` and ``einsum_bqhd`` (the formula before issue 14) against ``torch_sdpa``
in that process.

Run ``python -m bench.attention_cpu [--quick] [--no-flags]``; writes
``bench/results/attention_cpu.json`` (``attention_cpu_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench import common

# name -> (batch, tokens, heads, head_dim, causal); --quick shrinks the ViT batches.
SHAPES = {
    "vit_bench": (128, 65, 8, 32, False),  # classification_throughput's ViT
    "vit_b16": (32, 197, 12, 64, False),
    "llama_2048": (1, 2048, 32, 64, True),
}
QUICK_BATCH = {"vit_bench": 32, "vit_b16": 8, "llama_2048": 1}

FLAG_SETTINGS = {
    "default": "",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_dot_eltwise": ("--xla_cpu_use_onednn=true "
                           "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    "xnn_fusion_dot_eltwise_reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn_dot_eltwise_reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    # Not exact (reassociation, approximate exp): measured to size the gap, never adopted.
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
FLAG_VARIANTS = ("memjax", "einsum_bqhd", "torch_sdpa")


def jax_variants(causal: bool, tokens: int) -> dict:
    """name -> (per-example fn, True if it takes [H, T, Dh] inputs)."""
    import jax
    import jax.numpy as jnp

    from memjax.models import layers

    def dense_mask():
        return layers.causal_mask(None, tokens) if causal else None

    def memjax_fn(q, k, v, **kw):
        mask = layers.AttentionMask(causal=True) if causal else None
        return layers.attention(q[None], k[None], v[None], mask, q.shape[-1] ** -0.5,
                                implementation="xla", **kw)[0]

    def einsum_bqhd(q, k, v):
        s = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32)
        s = s * q.shape[-1] ** -0.5
        mask = dense_mask()
        if mask is not None:
            s = jnp.where(mask[0], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v)

    def einsum_bhqd(q, k, v):
        s = jnp.einsum("hqd,hkd->hqk", q, k, preferred_element_type=jnp.float32)
        s = s * q.shape[-1] ** -0.5
        mask = dense_mask()
        if mask is not None:
            s = jnp.where(mask[0], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, axis=-1), v)

    def einsum_bhqd_transposed(q, k, v):
        q, k, v = (jnp.swapaxes(x, 0, 1) for x in (q, k, v))
        return jnp.swapaxes(einsum_bhqd(q, k, v), 0, 1)

    def dpa_xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    out = {"memjax": (memjax_fn, False), "einsum_bqhd": (einsum_bqhd, False),
           "einsum_bhqd": (einsum_bhqd, True),
           "einsum_bhqd_transposed": (einsum_bhqd_transposed, False),
           "dpa_xla": (dpa_xla, False)}
    if causal and tokens >= 1024:
        def no_skip(q, k, v):  # blocked, but every block against all keys
            groups, layers.CAUSAL_GROUPS = layers.CAUSAL_GROUPS, 1
            try:  # read while tracing (the first call)
                return memjax_fn(q, k, v)
            finally:
                layers.CAUSAL_GROUPS = groups

        out["memjax_no_causal_skip"] = (no_skip, False)
    if tokens >= 1024:
        for block in (128, 512):
            out[f"blocked_{block}"] = (
                lambda q, k, v, block=block: memjax_fn(q, k, v, block_size=block), False)
    return out


def torch_variants(causal: bool) -> dict:
    import torch
    import torch.nn.functional as F

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def naive(q, k, v):
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            t = q.shape[-2]
            keep = torch.ones(t, t, dtype=torch.bool).tril()
            s = s.masked_fill(~keep, torch.finfo(torch.float32).min)
        return torch.softmax(s, dim=-1) @ v

    return {"torch_sdpa": sdpa, "torch_naive": naive}


def time_settled(runs: dict, repeats: int, settle_s: float = 0.3) -> dict[str, list]:
    """``common.time_interleaved`` with an untimed pause before every call.

    PyTorch's OpenMP workers spin for a while after each parallel region; without the
    pause whichever JAX function runs right after a PyTorch call shares the cores with
    them (seen here: the same JAX function 2x slower in that slot than in another).
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(settle_s)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def attention_flops(batch: int, tokens: int, heads: int, head_dim: int) -> float:
    """Two [T, T, Dh] matmuls per head, the whole square (a causal kernel may skip half)."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def measure_shape(name: str, quick: bool, only: tuple[str, ...] | None) -> dict:
    """Time every variant on one shape; differences from ``torch_naive`` and ratios."""
    import jax
    import torch

    batch, tokens, heads, head_dim, causal = SHAPES[name]
    if quick:
        batch = QUICK_BATCH[name]
    rng = np.random.default_rng(0)
    bqhd = [rng.standard_normal((batch, tokens, heads, head_dim), dtype=np.float32)
            for _ in range(3)]
    bhqd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in bqhd]
    runs, outputs = {}, {}
    with torch.inference_mode():
        torch_in = [torch.from_numpy(x) for x in bhqd]
        for key, fn in torch_variants(causal).items():
            if only is None or key in only:  # the naive output is the reference anyway
                runs[key] = lambda fn=fn: fn(*torch_in)
            if key in runs or key == "torch_naive":
                outputs[key] = fn(*torch_in).numpy().transpose(0, 2, 1, 3)
        for key, (fn, heads_first) in jax_variants(causal, tokens).items():
            if only is not None and key not in only:
                continue
            compiled = jax.jit(jax.vmap(fn))
            args = [jax.device_put(x) for x in (bhqd if heads_first else bqhd)]
            runs[key] = lambda c=compiled, a=args: c(*a).block_until_ready()
            out = np.asarray(runs[key]())
            outputs[key] = out.transpose(0, 2, 1, 3) if heads_first else out
        times = time_settled(runs, repeats=3 if quick else 10)
    sdpa = np.median(times["torch_sdpa"])
    flops = attention_flops(batch, tokens, heads, head_dim)
    rows = {}
    for key, spent in times.items():
        summary = common.summarize(spent)
        rows[key] = {**summary, "vs_torch_sdpa": summary["median_s"] / sdpa,
                     "gflop_per_s": flops / summary["median_s"] / 1e9,
                     "max_abs_diff_vs_torch_naive":
                         float(np.abs(outputs[key] - outputs["torch_naive"]).max())}
    return {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": head_dim,
            "causal": causal, "rows": rows}


def child(quick: bool, only: tuple[str, ...] | None) -> dict:
    common.set_torch_threads()
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
            "shapes": {name: measure_shape(name, quick, only) for name in SHAPES}}


def run_in_process(flags: str, quick: bool, only: tuple[str, ...] | None) -> dict:
    """This script's child mode in a fresh process with ``XLA_FLAGS=flags``."""
    cmd = [sys.executable, "-m", "bench.attention_cpu", "--child"]
    cmd += ["--quick"] if quick else []
    cmd += ["--only", ",".join(only)] if only else []
    env = {**os.environ, "XLA_FLAGS": flags}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"xla_flags": flags, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, 3 repeats")
    parser.add_argument("--no-flags", action="store_true", help="skip the XLA flag sweep")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = tuple(args.only.split(",")) if args.only else None
    if args.child:
        print(json.dumps(child(args.quick, only)))
        return {}
    result = {"machine": common.machine_info(), "quick": args.quick,
              "variants": run_in_process("", args.quick, None), "flags": {}}
    if not args.no_flags:
        for name, flags in FLAG_SETTINGS.items():
            result["flags"][name] = run_in_process(flags, args.quick, FLAG_VARIANTS)
    path = common.write_json(common.result_name("attention_cpu", args.quick), result)
    print_summary(result)
    print(f"wrote {path}")
    return result


def print_summary(result: dict) -> None:
    for shape, table in result["variants"].get("shapes", {}).items():
        print(f"{shape}: B={table['batch']} T={table['tokens']} H={table['heads']} "
              f"Dh={table['head_dim']} causal={table['causal']}")
        for key, row in table["rows"].items():
            print(f"  {key:24s} {row['median_s'] * 1e3:9.2f} ms  x{row['vs_torch_sdpa']:.2f} "
                  f"sdpa  diff {row['max_abs_diff_vs_torch_naive']:.1e}")
    for name, run in result["flags"].items():
        if "error" in run:
            print(f"flags {name}: error {run['error'][-200:]}")
            continue
        cells = [f"{shape} " + " ".join(f"{k}=x{r['vs_torch_sdpa']:.2f}"
                                          for k, r in t["rows"].items() if k != "torch_sdpa")
                 for shape, t in run["shapes"].items()]
        print(f"flags {name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
