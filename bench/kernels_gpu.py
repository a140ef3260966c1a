"""GPU rows for ``memjax.kernels.token_stats``: Pallas kernel vs XLA reference vs PyTorch.

PENDING: no GPU was lent when the kernels were written, so these rows have not been
measured and ``memjax.kernels.MEASURED_FASTER`` is empty (``MEMJAX_KERNELS=auto`` picks
the XLA reference everywhere). The Pallas kernel has only run in interpret mode on CPU;
whether it compiles under Mosaic GPU (and with which tiles) is unverified. Run this on a
GPU and add a ``("gpu", "token_stats")`` row to ``MEASURED_FASTER`` only if the kernel
beats the reference there.

Token statistics (log p(target), logsumexp, mu and sigma of log p) for a GPT-2-sized
unembedding (V = 50,257, D = 768) at several token counts N:

- ``pallas_kernel``: ``kernels.token_stats(impl="kernel")`` (Mosaic GPU; its tiles are
  ``--block-rows`` x ``--block-vocab``).
- ``xla_reference``: ``kernels.token_stats(impl="reference")`` (lax.scan over vocabulary
  chunks of ``--chunk``).
- ``xla_naive``: float32 logits [N, V] and a full log-softmax.
- ``torch_naive``: the same naive computation in PyTorch (``log_softmax`` over [N, V]).
  With ``--dtype bfloat16`` PyTorch's matmul returns bf16 logits (rounded to 8 bits),
  whereas the JAX rows accumulate and return float32 logits: expect its deviation from
  ``xla_naive`` to be ~1e-2 relative, not ~1e-6.

Per row: tokens/s (median of interleaved repeats), peak device memory (JAX: the
compiled executable's ``memory_analysis``; PyTorch: ``max_memory_allocated``) and the
largest deviation from ``xla_naive``. A variant that fails (e.g. a Mosaic GPU lowering
error) is recorded with its error and the others still run.

``--smoke`` runs tiny shapes on CPU (the kernel in Pallas interpret mode, PyTorch on CPU)
so the script itself is exercised without a GPU; it prints its rows and writes nothing.
Otherwise it writes ``bench/results/kernels_gpu.json``.
Run ``PYTHONPATH=. python -m bench.kernels_gpu [--smoke]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from functools import partial

import numpy as np

from bench import common

VOCAB, DIM = 50_257, 768
TOKENS = (2_048, 8_192, 32_768)
SMOKE = {"vocab": 1_003, "dim": 32, "tokens": (24,), "block_rows": 8, "block_vocab": 256,
         "chunk": 300}


def make_inputs(n: int, dim: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, dim), dtype=np.float32)
    weight = rng.standard_normal((dim, vocab), dtype=np.float32) * (3.0 / np.sqrt(dim))
    bias = rng.standard_normal(vocab, dtype=np.float32)
    return hidden, weight.astype(np.float32), bias, rng.integers(0, vocab, n).astype(np.int32)


def jax_runner(variant: str, inputs, dtype: str, blocks: tuple[int, int], chunk: int):
    """(run() -> dict of host arrays, peak bytes from XLA's memory analysis)."""
    import jax
    import jax.numpy as jnp

    from memjax import kernels
    from memjax.signals._tokens import _full_vocab

    hidden, weight, bias, targets = inputs
    cast = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    args = (jnp.asarray(hidden, cast), jnp.asarray(weight, cast), jnp.asarray(targets),
            jnp.asarray(bias))
    if variant == "xla_naive":
        def fn(h, w, t, b):
            logp, mu, sigma, lse = _full_vocab(kernels.project_logits(h, w, b), t)
            return {"logp": logp, "lse": lse, "mu": mu, "sigma": sigma}
    else:
        impl = "kernel" if variant == "pallas_kernel" else "reference"
        fn = partial(kernels.token_stats, chunk_size=chunk, impl=impl,
                     block_rows=blocks[0], block_vocab=blocks[1])
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)

    def run():
        return {k: np.asarray(v) for k, v in compiled(*args).items()}

    return run, peak


def torch_runner(inputs, dtype: str, device: str):
    import torch

    cast = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    hidden, weight, bias, targets = (torch.from_numpy(x).to(device) for x in inputs)
    hidden, weight = hidden.to(cast), weight.to(cast)

    @torch.no_grad()
    def run():
        z = (hidden @ weight).float() + bias
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        mu = (p * log_p).sum(-1)
        sigma = (p * (log_p - mu[:, None]) ** 2).sum(-1).sqrt()
        out = {"logp": log_p.gather(1, targets.long()[:, None])[:, 0],
               "lse": torch.logsumexp(z, -1), "mu": mu, "sigma": sigma}
        return {k: v.cpu().numpy() for k, v in out.items()}

    def peak():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            run()
            return int(torch.cuda.max_memory_allocated())
        return None

    return run, peak


def bench_tokens(n: int, cfg: dict, dtype: str, repeats: int, device: str) -> dict:
    inputs = make_inputs(n, cfg["dim"], cfg["vocab"])
    runners, peaks, errors, outputs = {}, {}, {}, {}
    for variant in ("pallas_kernel", "xla_reference", "xla_naive", "torch_naive"):
        try:
            if variant == "torch_naive":
                run, peak_fn = torch_runner(inputs, dtype, device)
                outputs[variant] = run()
                peaks[variant] = peak_fn()
            else:
                run, peaks[variant] = jax_runner(
                    variant, inputs, dtype, (cfg["block_rows"], cfg["block_vocab"]),
                    cfg["chunk"])
                outputs[variant] = run()
            runners[variant] = run
        except Exception as err:  # a lowering failure must not hide the other rows
            errors[variant] = f"{type(err).__name__}: {err}"[:2000]
            traceback.print_exc(file=sys.stderr)
    times = common.time_interleaved(runners, repeats)
    base = outputs.get("xla_naive")
    rows = {}
    for variant in runners:
        median = statistics.median(times[variant])
        dev = None
        if base is not None:
            dev = max(float(np.max(np.abs(outputs[variant][k] - base[k])
                                   / np.maximum(np.abs(base[k]), 1.0))) for k in base)
        rows[variant] = {**common.summarize(times[variant]), "tokens_per_s": n / median,
                         "peak_bytes": peaks.get(variant), "max_rel_dev_vs_xla_naive": dev}
    return {"tokens": n, "rows": rows, "errors": errors}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU (Pallas interpret mode); writes nothing")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--block-rows", type=int, default=64)
    parser.add_argument("--block-vocab", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    import jax

    backend = jax.default_backend()
    if args.smoke:
        cfg = dict(SMOKE)
        device = "cpu"
    else:
        if backend not in ("gpu", "cuda", "rocm"):
            parser.error(f"needs a GPU (JAX backend is {backend!r}); use --smoke on CPU")
        cfg = {"vocab": VOCAB, "dim": DIM, "tokens": TOKENS, "block_rows": args.block_rows,
               "block_vocab": args.block_vocab, "chunk": args.chunk}
        device = "cuda"
    repeats = args.repeats or (2 if args.smoke else 10)
    common.set_torch_threads()
    result = {"benchmark": "kernels_gpu", "smoke": args.smoke, "backend": backend,
              "dtype": args.dtype, "config": cfg, "machine": common.machine_info(),
              "jax_devices": [str(d) for d in jax.devices()],
              "runs": [bench_tokens(n, cfg, args.dtype, repeats, device)
                       for n in cfg["tokens"]]}
    for run in result["runs"]:
        for variant, row in run["rows"].items():
            peak, dev = row["peak_bytes"], row["max_rel_dev_vs_xla_naive"]
            peak = "-" if peak is None else f"{peak / 2**20:.1f} MiB"
            dev = "-" if dev is None else f"{dev:.2e}"
            print(f"N={run['tokens']:>6} {variant:<14} {row['tokens_per_s']:12.0f} tok/s  "
                  f"peak {peak:>12}  dev {dev}")
        for variant, err in run["errors"].items():
            print(f"N={run['tokens']:>6} {variant:<14} FAILED {err.splitlines()[0]}")
    if not args.smoke:
        print(f"wrote {common.write_json('kernels_gpu', result)}")
    return result


if __name__ == "__main__":
    main()
