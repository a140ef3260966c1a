"""Per-token scoring of a Llama-shaped LM on CPU: memjax vs ``transformers`` PyTorch.

The workload of a membership-inference or Min-K%++ study (Zhang et al. 2024, "Min-K%++:
Improved Baseline for Detecting Pre-Training Data from Large Language Models"; Duan et al.
2024, "Do Membership Inference Attacks Work on Large Language Models?", the mimir
repository): for every position t of every sequence, ``log p_t(x_{t+1})`` and the mean
``mu_t = sum_v p log p`` and standard deviation ``sigma_t`` of ``log p_t(v)`` under
``p_t``. The model: 4 decoder layers at Llama-3.2-1B width (hidden 2048, MLP 8192, 32
heads, 8 K/V heads, head_dim 64, "llama3" rotary scaling, V = 128,256, tied embeddings),
random weights, T = 2,048, once with float32 and once with bfloat16 weights.

One ``transformers`` folder (``LlamaConfig`` + ``LlamaForCausalLM``, seeded random init,
``save_pretrained`` as safetensors) is built once in a cache folder, so every system reads
identical weights. Systems (rows), each in its own fresh subprocess so memory peaks never
mix:

- ``torch_mimir``: the reference repositories' way: batch size 1, ``model(ids).logits``,
  ``.float()``, a full ``softmax`` and ``log_softmax`` over V, ``gather`` of the target
  log-probs, ``mu = (p * logp).sum(-1)``, ``sigma^2 = (p * logp^2).sum(-1) - mu^2``; under
  ``torch.inference_mode()``.
- ``torch_batched``: a fair PyTorch peer: batches of B sequences through ``model.model``
  (final hidden states), then the unembedding and statistics 512 rows at a time in float32
  (logits in the model's dtype, as HF computes them, cast to float32), in place where
  possible: at most two float32 [512, V] blocks live at once, never a [T, V] tensor.
- ``memjax``: ``memjax.load(folder, dtype=...)``, ``memjax.signals.signal_function(model,
  "tokens")`` through ``memjax.score`` with the same batch size (the vocabulary-chunked
  statistics of ``memjax.signals.tokens``; no float32 [T, V] tensor).

Every child loads its model, runs the whole dataset once (warm-up: compiles, first-touch
allocations; its outputs are saved for the agreement check), releases the buffers, resets
the kernel's RSS high-water mark (``/proc/self/clear_refs``) and times ``repeats`` passes.
Memory: ``VmHWM`` over the timed passes (the whole process: weights included), and that
minus the RSS before them (the working memory of scoring). glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_``) so freed buffers go back to the OS between passes.

FLOPs per sequence (matmuls only, 2·m·n·k each; norms, rotary, softmax and the statistics
are left out): per layer ``2·T·D·(H·hd + 2·KV·hd) + 2·T·H·hd·D`` (q, k, v, o) ``+
3·2·T·D·I`` (SwiGLU) ``+ 2·2·T²·H·hd`` (scores and mix, the full T×T square, as dense
masked attention computes it), plus the unembedding ``2·T·D·V``. The floor is FLOPs over
the machine's matmul peak measured in this run for the row's dtype (float32 and bfloat16
separately, each the better of ``jax.jit(jnp.matmul)`` and ``torch.mm`` on 2048² inputs).

Run ``python -m bench.llm_scoring [--quick]``; writes ``bench/results/llm_scoring.json``.
The model folder is cached under ``$MEMJAX_BENCH_CACHE`` (default ``~/.cache/memjax_bench``).
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
from pathlib import Path

import numpy as np

from bench import common

REPO = Path(__file__).resolve().parents[1]
#: Llama-3.2-1B's width with 4 layers; V and rotary scaling as Llama 3.2.
FULL = {"layers": 4, "hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8,
        "head_dim": 64, "vocab": 128_256, "seq": 2048}
QUICK = {"layers": 1, "hidden": 256, "intermediate": 1024, "heads": 8, "kv_heads": 2,
         "head_dim": 32, "vocab": 32_000, "seq": 256}
#: Sequences scored per pass, batch size of the batched rows, timed passes.
RUN_FULL = {"n_sequences": 2, "batch": 2, "repeats": 2}
RUN_QUICK = {"n_sequences": 2, "batch": 2, "repeats": 2}
SYSTEMS = ("torch_mimir", "torch_batched", "memjax")
DTYPES = ("float32", "bfloat16")
#: Rows of the batched PyTorch peer's statistics block (float32 [ROWS, V] buffers).
ROWS = 512
FIELDS = ("logp", "mu", "sigma")
SEED = 0


# ---------------------------------------------------------------------------- model folder


def hf_config(shape: dict):
    """The ``transformers.LlamaConfig`` of ``shape``, with Llama 3.2's rotary scaling and
    context length."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=131_072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2)


def model_folder(shape: dict) -> Path:
    """Cache folder of the random-weight checkpoint of ``shape`` (built by :func:`build`)."""
    root = Path(os.environ.get("MEMJAX_BENCH_CACHE", Path.home() / ".cache" / "memjax_bench"))
    name = "llama_" + "_".join(f"{k}{shape[k]}" for k in sorted(shape) if k != "seq")
    return root / f"{name}_seed{SEED}"


def build(shape: dict) -> Path:
    """Write the float32 checkpoint once (seeded init, safetensors); later runs reuse it."""
    folder = model_folder(shape)
    if (folder / "done").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(hf_config(shape)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "done").write_text(json.dumps(shape))
    return folder


def make_inputs(shape: dict, n_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random token ids [N, T] (int32) and an all-ones attention mask."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, shape["vocab"], (n_sequences, shape["seq"])).astype(np.int32)
    return ids, np.ones_like(ids)


# ---------------------------------------------------------------------------- FLOPs


def flops_per_sequence(shape: dict) -> dict[str, int]:
    """Matmul FLOPs of one forward pass over T tokens plus the unembedding (docstring)."""
    t, d, i = shape["seq"], shape["hidden"], shape["intermediate"]
    q_width, kv_width = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    projections = 2 * t * d * (q_width + 2 * kv_width) + 2 * t * q_width * d
    mlp = 3 * 2 * t * d * i
    attention = 2 * 2 * t * t * q_width
    unembedding = 2 * t * d * shape["vocab"]
    layers = shape["layers"] * (projections + mlp + attention)
    return {"projections_per_layer": projections, "mlp_per_layer": mlp,
            "attention_per_layer": attention, "layers": layers, "unembedding": unembedding,
            "total": layers + unembedding}


def measure_bf16_peak(n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """bfloat16 matmul FLOP/s (float32 accumulation inside the libraries): an n³ product
    through ``jax.jit(jnp.matmul)`` and ``torch.mm``, interleaved, median; the better one."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(1)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np, jnp.bfloat16), jnp.asarray(b_np, jnp.bfloat16)
    ta, tb = torch.from_numpy(a_np).bfloat16(), torch.from_numpy(b_np).bfloat16()
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    torch.mm(ta, tb)
    times = common.time_interleaved(
        {"jax": lambda: matmul(a, b).block_until_ready(), "torch": lambda: torch.mm(ta, tb)},
        repeats)
    jax_flops = 2.0 * n**3 / statistics.median(times["jax"])
    torch_flops = 2.0 * n**3 / statistics.median(times["torch"])
    return {"matmul_n": n, "jax_flops": jax_flops, "torch_flops": torch_flops,
            "peak_flops": max(jax_flops, torch_flops)}


# ---------------------------------------------------------------------------- systems


def torch_model(folder: Path, dtype: str):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.eval()


def mimir_scores(model, ids) -> dict[str, np.ndarray]:
    """The reference repositories' computation, one sequence at a time (module docstring).

    Returns float32 [N, T-1] per field: position t scores token t+1.
    """
    import torch
    import torch.nn.functional as F

    out = {k: [] for k in FIELDS}
    with torch.inference_mode():
        for row in ids:
            input_ids = torch.from_numpy(row[None].astype(np.int64))
            logits = model(input_ids).logits[0, :-1].float()
            probs = F.softmax(logits, dim=-1)
            log_probs = F.log_softmax(logits, dim=-1)
            token_log_probs = log_probs.gather(-1, input_ids[0, 1:, None])[:, 0]
            mu = (probs * log_probs).sum(-1)
            sigma = ((probs * torch.square(log_probs)).sum(-1) - torch.square(mu)).sqrt()
            for k, v in zip(FIELDS, (token_log_probs, mu, sigma), strict=True):
                out[k].append(v.numpy())
    return {k: np.stack(v) for k, v in out.items()}


def reference_float64(model, ids) -> dict[str, np.ndarray]:
    """The independent reference: HF's logits (the model's own dtype) cast to float64, then
    ``log_softmax``, the target's log-prob, ``mu`` and the centred ``sigma`` in float64,
    ``ROWS`` positions at a time. Computed once, in the warm-up of ``torch_mimir``."""
    import torch

    out = {k: [] for k in FIELDS}
    with torch.inference_mode():
        for row in ids:
            input_ids = torch.from_numpy(row[None].astype(np.int64))
            logits = model(input_ids).logits[0, :-1]
            stats = [[], [], []]
            for r in range(0, logits.shape[0], ROWS):
                log_p = torch.log_softmax(logits[r:r + ROWS].double(), dim=-1)
                p = log_p.exp()
                mu = (p * log_p).sum(-1)
                sigma = (p * (log_p - mu[:, None]).square()).sum(-1).sqrt()
                logp = log_p.gather(-1, input_ids[0, 1 + r:1 + r + ROWS, None])[:, 0]
                for s, v in zip(stats, (logp, mu, sigma), strict=True):
                    s.append(v)
            for k, s in zip(FIELDS, stats, strict=True):
                out[k].append(torch.cat(s).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def block_statistics(hidden, weight, targets):
    """logp, mu, sigma of ``hidden`` [R, D] rows against ``weight`` [V, D], float32.

    Two float32 [R, V] buffers (log-probs, then probabilities), updated in place; the
    centred second moment ``sum p (logp - mu)^2`` (no cancellation of ``E[x^2] - mu^2``).
    """
    import torch

    log_p = (hidden @ weight.T).float()
    log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
    logp = log_p.gather(-1, targets[:, None])[:, 0]
    p = torch.exp(log_p)
    mu = torch.einsum("rv,rv->r", p, log_p)
    log_p -= mu[:, None]
    log_p.square_()
    sigma = torch.einsum("rv,rv->r", p, log_p).sqrt()
    return logp, mu, sigma


def batched_scores(model, ids, batch: int) -> dict[str, np.ndarray]:
    """The fair PyTorch peer (module docstring): batches of ``batch`` sequences through the
    decoder, then :func:`block_statistics` over ``ROWS`` positions at a time."""
    import torch

    weight = model.get_output_embeddings().weight
    n, t = ids.shape
    out = {k: np.empty((n, t - 1), np.float32) for k in FIELDS}
    with torch.inference_mode():
        for lo in range(0, n, batch):
            input_ids = torch.from_numpy(ids[lo:lo + batch].astype(np.int64))
            hidden = model.model(input_ids).last_hidden_state[:, :-1]
            targets = input_ids[:, 1:]
            for b in range(hidden.shape[0]):
                for r in range(0, t - 1, ROWS):
                    stats = block_statistics(hidden[b, r:r + ROWS], weight,
                                             targets[b, r:r + ROWS])
                    for k, v in zip(FIELDS, stats, strict=True):
                        out[k][lo + b, r:r + ROWS] = v.numpy()
    return out


def memjax_runner(folder: Path, dtype: str, ids, mask, batch: int):
    """run() -> {field: [N, T-1]} through ``memjax.score`` (the engine's defaults)."""
    import jax.numpy as jnp

    import memjax

    model = memjax.load(folder, dtype=None if dtype == "float32" else getattr(jnp, dtype))
    fn, validate = memjax.signals.signal_function(model, "tokens")
    data = {"input_ids": ids, "attention_mask": mask}

    def run():
        scores = memjax.score(fn, model.params, data, batch_size=batch, progress=False,
                              validate=validate)
        return {k: np.asarray(scores[k][:, :-1], np.float32) for k in FIELDS}

    return run


def make_run(system: str, folder: Path, dtype: str, shape: dict, run_cfg: dict):
    ids, mask = make_inputs(shape, run_cfg["n_sequences"])
    if system == "memjax":
        return memjax_runner(folder, dtype, ids, mask, run_cfg["batch"])
    model = torch_model(folder, dtype)
    if system == "torch_mimir":
        def run():
            return mimir_scores(model, ids)

        run.model, run.ids = model, ids  # for reference_float64 in the warm-up
        return run
    return lambda: batched_scores(model, ids, run_cfg["batch"])


def worker(system: str, dtype: str, shape: dict, run_cfg: dict, out_path: Path) -> dict:
    """In a fresh process: load, warm up (outputs saved), then time passes and peak RSS."""
    threads = common.set_torch_threads()
    load_start = os.getloadavg()
    folder = model_folder(shape)
    start = time.perf_counter()
    run = make_run(system, folder, dtype, shape, run_cfg)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = run()
    warmup_s = time.perf_counter() - start
    if system == "torch_mimir":  # the float64 reference, from this dtype's logits
        outputs.update({f"{k}_f64": v for k, v in
                        reference_float64(run.model, run.ids).items()})
    np.savez(out_path, **outputs)
    del outputs
    gc.collect()
    time.sleep(1.0)  # PJRT frees buffers asynchronously
    baseline = common.rss_bytes()
    reset = common.reset_peak_rss()
    if not reset:
        baseline = max(baseline, common.peak_rss_bytes())
    times = []
    for _ in range(run_cfg["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = common.peak_rss_bytes()
    return {"system": system, "dtype": dtype, "torch_threads": threads, "load_s": load_s,
            "warmup_s": warmup_s, **common.summarize(times), "rss_before_run_bytes": baseline,
            "peak_rss_bytes": peak, "peak_rss_delta_bytes": peak - baseline,
            "peak_reset": reset, "ru_maxrss_bytes": common.ru_maxrss_bytes(),
            "load_average_start": load_start, "load_average_end": os.getloadavg()}


def child(args: list[str]) -> dict:
    """Run ``python -m bench.llm_scoring args`` and return the JSON of its last line."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run([sys.executable, "-m", "bench.llm_scoring", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- comparison


def max_abs_diffs(a: dict, b: dict) -> dict[str, float]:
    return {k: float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in FIELDS}


def agreement(outputs: dict, references: dict) -> dict:
    """Max |difference| per field of every row against the float64 statistics of HF's
    logits of the same dtype (:func:`reference_float64`), and of every bf16 row against the
    float32 model's float64 statistics (the total bf16 error)."""
    out = {}
    for dtype in DTYPES:
        for system in SYSTEMS:
            out[f"{system}_{dtype}_vs_f64_of_hf_{dtype}_logits"] = max_abs_diffs(
                outputs[(system, dtype)], references[dtype])
    for system in SYSTEMS:
        out[f"{system}_bfloat16_vs_f64_of_hf_float32_logits"] = max_abs_diffs(
            outputs[(system, "bfloat16")], references["float32"])
    return out


def check_float32(agree: dict) -> list[str]:
    """float32 rows against the float64 statistics of HF's float32 logits: every system's
    logp within 1e-4 (logp is ~ -12, and two float32 forward passes of 4 layers in different
    operation orders differ by ~1e-5 there); memjax's mu and sigma within 1e-4 too (its
    chunked float32 sums run over 8,192 terms at a time, then merge). The PyTorch peers' mu
    and sigma are only reported: torch_mimir's ``E[logp^2] - mu^2`` cancels ~100 against
    ~100 in float32, and both peers sum all V terms of size ~|mu| <= 12 in one float32
    reduction (observed up to ~1e-4 at V = 32,000). Returns the failures (empty: none).
    """
    failures = []
    for system in SYSTEMS:
        diffs = agree[f"{system}_float32_vs_f64_of_hf_float32_logits"]
        checked = diffs if system == "memjax" else {"logp": diffs["logp"]}
        if not max(checked.values()) < 1e-4:
            failures.append(f"{system} float32 disagrees with the float64 reference: {diffs}")
    return failures


def summarise_rows(rows: list[dict], flops: dict, shape: dict, run_cfg: dict,
                   peaks: dict) -> dict:
    """Tokens/s, fraction of peak and of the floor, memjax / PyTorch ratios per dtype."""
    tokens = run_cfg["n_sequences"] * shape["seq"]
    total = flops["total"] * run_cfg["n_sequences"]
    by = {(r["system"], r["dtype"]): r for r in rows}
    ratios = {}
    for r in rows:
        peak = peaks[r["dtype"]]
        r["tokens_per_s"] = tokens / r["median_s"]
        r["flops_per_s"] = total / r["median_s"]
        r["fraction_of_peak"] = r["flops_per_s"] / peak
        r["floor_s"] = total / peak
        r["time_over_floor"] = r["median_s"] / r["floor_s"]
    for dtype in DTYPES:
        mj = by[("memjax", dtype)]
        for peer in SYSTEMS[:2]:
            p = by[(peer, dtype)]
            ratios[f"{dtype}_memjax_over_{peer}"] = {
                "tokens_per_s": mj["tokens_per_s"] / p["tokens_per_s"],
                "peak_rss": mj["peak_rss_bytes"] / p["peak_rss_bytes"],
                "peak_rss_delta": mj["peak_rss_delta_bytes"] / p["peak_rss_delta_bytes"],
            }
            ratio = ratios[f"{dtype}_memjax_over_{peer}"]
            ratio["goal_speed_met"] = ratio["tokens_per_s"] >= 1.5
            ratio["goal_memory_met"] = ratio["peak_rss"] <= 0.25
    return ratios


# ---------------------------------------------------------------------------- breakdown


def breakdown(dtype: str, shape: dict, run_cfg: dict) -> dict:
    """Where each side's time and memory go, in one process (``--breakdown DTYPE``).

    memjax: the decoder alone (``hidden_states``) and the chunked statistics alone (on
    those hidden states), each ``jax.jit(jax.vmap(...))`` over the batch as the engine runs
    them, with XLA's ``memory_analysis()``; PyTorch: ``model.model`` alone and the batched
    peer's 512-row statistics alone. One warm-up, then one timed call each, interleaved.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import memjax
    from memjax.signals import causal_lm_tokens

    common.set_torch_threads()
    folder = build(shape)
    ids, mask = make_inputs(shape, run_cfg["batch"])
    model = memjax.load(folder, dtype=None if dtype == "float32" else getattr(jnp, dtype))
    graphdef = model.forward.graphdef

    def forward(params, i, m):
        return nnx.merge(graphdef, params).hidden_states(i[None], m[None])[0]

    def stats(params, h, i, m):
        lm = nnx.merge(graphdef, params)
        return causal_lm_tokens(h, lm.unembedding(), i, m, chunk_size=8192)

    args = (model.params, jnp.asarray(ids), jnp.asarray(mask))
    fwd = jax.jit(jax.vmap(forward, in_axes=(None, 0, 0))).lower(*args).compile()
    hidden = fwd(*args)
    st = jax.jit(jax.vmap(stats, in_axes=(None, 0, 0, 0))).lower(
        model.params, hidden, *args[1:]).compile()
    tm = torch_model(folder, dtype)
    t_ids = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        t_hidden = tm.model(t_ids).last_hidden_state[:, :-1]
    weight = tm.get_output_embeddings().weight

    def torch_forward():
        with torch.inference_mode():
            return tm.model(t_ids).last_hidden_state

    def torch_stats():
        with torch.inference_mode():
            for b in range(t_hidden.shape[0]):
                for r in range(0, t_hidden.shape[1], ROWS):
                    block_statistics(t_hidden[b, r:r + ROWS], weight, t_ids[b, 1 + r:1 + r + ROWS])

    runs = {"memjax_forward": lambda: fwd(*args).block_until_ready(),
            "memjax_stats": lambda: jax.block_until_ready(st(model.params, hidden, *args[1:])),
            "torch_forward": torch_forward, "torch_stats": torch_stats}
    for run in runs.values():
        run()
    times = common.time_interleaved(runs, 1)
    return {"dtype": dtype, "batch": run_cfg["batch"], "shape": shape,
            "times_s": {k: v[0] for k, v in times.items()},
            "xla_memory": {"memjax_forward": common.memory_analysis(fwd),
                           "memjax_stats": common.memory_analysis(st)},
            "load_average": os.getloadavg()}


# ---------------------------------------------------------------------------- table


def table(result: dict) -> str:
    """Markdown tables of a result (for bench/README.md and ``run_all --summarise``)."""
    lines = ["| dtype | row | s / pass | tokens/s | × torch_mimir | × torch_batched | "
             "% of peak | time / floor | peak RSS GiB | working GiB | spread |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["system"], r["dtype"]): r for r in result["rows"]}
    for r in result["rows"]:
        mimir, batched = by[("torch_mimir", r["dtype"])], by[("torch_batched", r["dtype"])]
        lines.append(
            f"| {r['dtype']} | {r['system']} | {r['median_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / mimir['tokens_per_s']:.2f} | "
            f"{r['tokens_per_s'] / batched['tokens_per_s']:.2f} | "
            f"{100 * r['fraction_of_peak']:.1f} | {r['time_over_floor']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_rss_delta_bytes'] / 2**30:.2f} | "
            f"{100 * r['spread']:.0f}% |")
    lines += ["", "| agreement (max abs diff) | logp | mu | sigma |", "|---|---:|---:|---:|"]
    for key, d in result["agreement"].items():
        lines.append(f"| {key} | {d['logp']:.1e} | {d['mu']:.1e} | {d['sigma']:.1e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    parser.add_argument("--repeats", type=int, help="timed passes per system (default 2/3)")
    parser.add_argument("--table", action="store_true",
                        help="print the markdown tables of the last result and exit")
    parser.add_argument("--breakdown", choices=DTYPES,
                        help="time and memory of the decoder and the statistics separately")
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "DTYPE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    run_cfg = dict(RUN_QUICK if args.quick else RUN_FULL)
    if args.repeats:
        run_cfg["repeats"] = args.repeats
    if args.table:
        path = common.RESULTS_DIR / f"{common.result_name('llm_scoring', args.quick)}.json"
        print(table(json.loads(path.read_text())))
        return {}
    if args.breakdown:
        result = breakdown(args.breakdown, shape, run_cfg)
        name = common.result_name(f"llm_scoring_breakdown_{args.breakdown}", args.quick)
        print(json.dumps(result, indent=1))
        common.write_json(name, result)
        return result
    if args.build:
        print(json.dumps({"folder": str(build(shape))}))
        return {}
    if args.worker:
        print(json.dumps(worker(*args.worker, shape, run_cfg, Path(args.out))))
        return {}

    start = time.perf_counter()
    common.set_torch_threads()
    build_start = time.perf_counter()
    folder = Path(child(["--build", *(["--quick"] if args.quick else [])])["folder"])
    build_s = time.perf_counter() - build_start
    machine = common.machine_ceilings(args.quick)
    n = 1024 if args.quick else 2048
    machine["bf16_peak_start"] = measure_bf16_peak(n)
    print(f"peak f32 {machine['peak_start']['peak_flops'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{machine['bf16_peak_start']['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)

    rows, outputs, references = [], {}, {}
    scratch = common.RESULTS_DIR / ".llm_scoring_outputs"
    scratch.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        for system in SYSTEMS:
            out = scratch / f"{system}_{dtype}.npz"
            extra = [*(["--quick"] if args.quick else []), "--repeats", str(run_cfg["repeats"])]
            rows.append(child(["--worker", system, dtype, "--out", str(out), *extra]))
            with np.load(out) as f:
                outputs[(system, dtype)] = {k: f[k] for k in FIELDS}
                if system == "torch_mimir":
                    references[dtype] = {k: f[f"{k}_f64"] for k in FIELDS}
            out.unlink()
            r = rows[-1]
            print(f"{dtype:8s} {system:14s} {r['median_s']:8.2f} s  spread "
                  f"{100 * r['spread']:.0f}%  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
                  f"(+{r['peak_rss_delta_bytes'] / 2**30:.2f} over the loaded model)",
                  flush=True)
    scratch.rmdir()

    common.finish_ceilings(machine, args.quick)
    machine["bf16_peak_end"] = measure_bf16_peak(n)
    machine["bf16_peak_flops"] = max(machine["bf16_peak_start"]["peak_flops"],
                                     machine["bf16_peak_end"]["peak_flops"])
    peaks = {"float32": machine["peak_flops"], "bfloat16": machine["bf16_peak_flops"]}
    flops = flops_per_sequence(shape)
    agree = agreement(outputs, references)
    failures = check_float32(agree)
    for key, diffs in agree.items():
        print(f"{key}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    ratios = summarise_rows(rows, flops, shape, run_cfg, peaks)
    for r in rows:
        print(f"{r['dtype']:8s} {r['system']:14s} {r['tokens_per_s']:9.1f} tokens/s  "
              f"{100 * r['fraction_of_peak']:5.1f}% of {r['dtype']} peak  time/floor "
              f"{r['time_over_floor']:.2f}")
    for key, ratio in ratios.items():
        print(f"{key}: tokens/s x{ratio['tokens_per_s']:.2f}, peak RSS x{ratio['peak_rss']:.2f}"
              f" (working memory x{ratio['peak_rss_delta']:.2f})")

    result = {
        "benchmark": "llm_scoring",
        "quick": args.quick,
        "shape": shape,
        "run": run_cfg,
        "stats_block_rows": ROWS,
        "model_folder": str(folder),
        "build_s": build_s,
        "flops_per_sequence": flops,
        "machine": machine,
        "notes": {
            "flops": "per sequence: layers * (2TD(H hd + 2 KV hd) + 2T H hd D + 3*2TDI + "
                     "2*2T^2 H hd) + 2TDV; full T x T attention",
            "floor": "FLOPs / measured matmul peak of the row's dtype (float32 or bfloat16; "
                     "better median of start and end, jax or torch)",
            "tokens": "tokens/s counts all T positions of every sequence",
            "rss": "own subprocess per row; VmHWM over the timed passes (reset via "
                   "/proc/self/clear_refs after the warm-up), whole process (weights "
                   "included); delta = that minus RSS before the passes; "
                   "MALLOC_MMAP_THRESHOLD_=128KiB",
            "timing": "rows run one after another (own processes), not interleaved",
            "agreement": "max |diff| over positions 0..T-2 of every sequence, against "
                         "float64 log_softmax statistics of HF's logits (same dtype, and "
                         "float32 for the total bf16 error)",
        },
        "rows": rows,
        "agreement": agree,
        "float32_agreement_failures": failures,
        "ratios": ratios,
    }
    result["wall_s"] = time.perf_counter() - start
    path = common.write_json(common.result_name("llm_scoring", args.quick), result)
    print(f"wrote {path} in {result['wall_s']:.0f} s")
    if failures:
        raise AssertionError("; ".join(failures))
    return result


if __name__ == "__main__":
    main()
