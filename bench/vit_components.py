"""Where the ViT's time goes: each transformer-block op, JAX (vmapped) vs PyTorch batched.

A diagnostic for ``classification_throughput``: when the engine adds little over the raw
jitted function, the memjax/PyTorch ratio on the ViT is a kernel comparison (XLA:CPU's
code vs PyTorch's oneDNN/MKL), and this splits it by op at the benchmark's shapes (batch
128, 65 tokens, dim 256, 8 heads, MLP 1024). JAX ops are written per example and vmapped,
exactly as inside the engine. Run ``python -m bench.vit_components``; writes
``bench/results/vit_components.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from bench import common, models


def components(cfg: models.ViTConfig, batch: int) -> dict:
    """name -> (jax fn per example, its args, torch fn on the batch, FLOPs for the batch)."""
    t, d, m, h = cfg.tokens, cfg.dim, cfg.mlp_dim, cfg.heads
    rng = np.random.default_rng(0)
    rand = lambda *shape: 0.1 * rng.standard_normal(shape, dtype=np.float32)
    x, qkv, hid = rand(batch, t, d), rand(batch, t, 3 * d), rand(batch, t, m)
    w_qkv, w_out, w_fc1, w_fc2 = rand(d, 3 * d), rand(d, d), rand(d, m), rand(m, d)
    ln = {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
    tt = torch.from_numpy

    def torch_attention_core(qkv_):
        q, k, v = qkv_.reshape(batch, t, 3, h, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, t, d)

    def torch_attention_unfused(qkv_):  # the same matmul/softmax/matmul as the JAX code
        q, k, v = qkv_.reshape(batch, t, 3, h, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return (probs @ v).transpose(1, 2).reshape(batch, t, d)

    dense = lambda a, w: a @ w
    attention_core = lambda qkv_: models.attention_core(qkv_, h)
    attention_einsum = lambda qkv_: models.attention_core_einsum(qkv_, h)
    return {
        "layer_norm": (lambda a, p: models._layer_norm(a, p, cfg.ln_eps), (x, ln),
                       lambda: F.layer_norm(tt(x), (d,), tt(ln["scale"]), tt(ln["bias"]),
                                            cfg.ln_eps), 0),
        "qkv_dense": (dense, (x, w_qkv), lambda: tt(x) @ tt(w_qkv), 2 * batch * t * d * 3 * d),
        # The model's attention vs PyTorch's fused kernel (what torch_vit uses) ...
        "attention_core": (attention_core, (qkv,), lambda: torch_attention_core(tt(qkv)),
                           4 * batch * t * t * d),
        # ... vs PyTorch computing the same unfused matmul/softmax/matmul ...
        "attention_core_vs_torch_unfused": (attention_core, (qkv,),
                                            lambda: torch_attention_unfused(tt(qkv)),
                                            4 * batch * t * t * d),
        # ... and the einsum formulation flax uses, for the record.
        "attention_core_einsum": (attention_einsum, (qkv,),
                                  lambda: torch_attention_core(tt(qkv)), 4 * batch * t * t * d),
        "out_dense": (dense, (x, w_out), lambda: tt(x) @ tt(w_out), 2 * batch * t * d * d),
        "fc1_dense_gelu": (lambda a, w: jax.nn.gelu(a @ w, approximate=False), (x, w_fc1),
                           lambda: F.gelu(tt(x) @ tt(w_fc1)), 2 * batch * t * d * m),
        "fc2_dense": (dense, (hid, w_fc2), lambda: tt(hid) @ tt(w_fc2), 2 * batch * t * m * d),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    common.set_torch_threads()
    cfg, batch = models.ViTConfig(), 128
    peak = common.measure_matmul_peak()
    peak_flops = peak["peak_flops"]
    rows = {}
    with torch.inference_mode():
        for name, (fn, args_, torch_fn, flops) in components(cfg, batch).items():
            # Per-example args are batched on axis 0; weights and LayerNorm params shared.
            axes = (0,) + (None,) * (len(args_) - 1)
            jitted = jax.jit(jax.vmap(fn, axes))
            placed = jax.device_put(args_)
            jitted(*placed).block_until_ready()
            torch_fn()
            times = common.time_interleaved(
                {"jax": lambda j=jitted, a=placed: j(*a).block_until_ready(), "torch": torch_fn},
                args.repeats)
            jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
            rows[name] = {
                "jax_ms": 1e3 * jax_s,
                "torch_ms": 1e3 * torch_s,
                "jax_over_torch": jax_s / torch_s,
                "jax_spread": common.summarize(times["jax"])["spread"],
                "torch_spread": common.summarize(times["torch"])["spread"],
                "flops": flops,
                "jax_fraction_of_peak": flops / jax_s / peak_flops if flops else None,
                "torch_fraction_of_peak": flops / torch_s / peak_flops if flops else None,
            }
            print(f"{name:30s} jax {rows[name]['jax_ms']:8.2f} ms  torch "
                  f"{rows[name]['torch_ms']:8.2f} ms  jax/torch {rows[name]['jax_over_torch']:.2f}",
                  flush=True)
    block = ("layer_norm", "qkv_dense", "attention_core", "out_dense", "layer_norm",
             "fc1_dense_gelu", "fc2_dense")
    per_block = {fw: sum(rows[c][f"{fw}_ms"] for c in block) for fw in ("jax", "torch")}
    payload = {
        "benchmark": "vit_components",
        "machine": {"info": common.machine_info(), "peak_start": peak, "peak_flops": peak_flops},
        "batch": batch,
        "config": vars(cfg),
        "rows": rows,
        "block_sum_ms": per_block,
        "block_jax_over_torch": per_block["jax"] / per_block["torch"],
        "wall_s": time.perf_counter() - start,
    }
    print(f"one block (sum of ops): jax {per_block['jax']:.1f} ms, torch "
          f"{per_block['torch']:.1f} ms, ratio {payload['block_jax_over_torch']:.2f}")
    common.write_json("vit_components", payload)
    return payload


if __name__ == "__main__":
    main()
