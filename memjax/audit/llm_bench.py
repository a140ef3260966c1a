"""The audit's LLM benchmark section: ``memjax mia bench`` on the users' path.

The text section's byte-level GPT-2 target and a tiny Llama-family decoder (GQA, RMSNorm,
rotary, SwiGLU: :mod:`memjax.models.llama`) trained on the same member docstrings are
saved as model folders with a byte-level Hugging Face tokenizer
(:func:`memjax.train.lm.save_byte_tokenizer`), the members and non-members are written as
JSONL files, and :func:`memjax.mia.run_bench` scores the grid 2 models x 2 datasets (full
texts, and their first 16 bytes) into resumable stores and runs LOSS, zlib, Min-K%,
Min-K%++ and dataset inference on each cell: what a user runs with ``memjax mia bench
CONFIG.toml`` on their own checkpoints and JSONL files (the section writes that TOML).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from memjax.convert import save
from memjax.metrics import plot_roc
from memjax.mia import DATASET_INFERENCE, bench_config, run_bench
from memjax.models.llama import LlamaConfig, LlamaForCausalLM
from memjax.report import Section
from memjax.train.lm import byte_tokens, fit_causal_lm, gpt2_graph, save_byte_tokenizer

TITLE = "Membership-inference benchmark: GPT-2 and Llama targets x two datasets (mia bench)"
LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=64, tie_word_embeddings=True)
ATTACKS = ["LOSS", "zlib", "Min-K%", "Min-K%++", DATASET_INFERENCE]
SHORT = 16  # bytes of the second dataset's texts


def _llama(config: LlamaConfig, rngs) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, rngs=rngs)


def train_llama(texts: list[str], is_member: np.ndarray, length: int, seed: int, *,
                steps: int, learning_rate: float):
    """The tiny Llama's NNX state, trained (full batch) on the member texts only."""
    ids, mask = byte_tokens([t for t, m in zip(texts, is_member, strict=True) if m], length)
    train = jax.jit(functools.partial(fit_causal_lm, build=functools.partial(_llama, LLAMA),
                                      steps=steps, learning_rate=learning_rate))
    return train(jax.random.key(seed + 1), ids, mask, np.ones(len(ids), bool))


def _save_lm(module_graph, params, config, folder: Path) -> str:
    from flax import nnx

    save(nnx.merge(module_graph, params), config, folder)
    save_byte_tokenizer(folder)
    return str(folder)


def write_grid(root: Path, demo: dict, llama_params, *, length: int, gpt2_config) -> Path:
    """Model folders, JSONL datasets and the grid's TOML under ``root``; returns the TOML."""
    from flax import nnx

    texts, is_member = demo["texts"], demo["is_member"]
    llama_graph = nnx.split(nnx.eval_shape(lambda: _llama(LLAMA, nnx.Rngs(0))))[0]
    models = {"gpt2": _save_lm(gpt2_graph(gpt2_config), demo["params"], gpt2_config,
                               root / "models" / "gpt2"),
              "llama": _save_lm(llama_graph, llama_params, LLAMA, root / "models" / "llama")}
    for part, rows in (("members", is_member), ("nonmembers", ~is_member)):
        lines = "".join(json.dumps({"text": t}) + "\n" for t, m in zip(texts, rows, strict=True)
                        if m)
        (root / f"{part}.jsonl").write_text(lines)
    grid = {"out": "result", "attacks": ATTACKS, "k": 0.2, "batch_size": 64,
            "models": [{"name": name, "path": f"models/{name}"} for name in models],
            "datasets": [{"name": name, "members": "members.jsonl",
                          "nonmembers": "nonmembers.jsonl", "max_length": max_length}
                         for name, max_length in (("docstrings", length),
                                                  (f"first-{SHORT}-bytes", SHORT))]}
    toml = root / "grid.toml"
    toml.write_text(_toml(grid))
    return toml


def _toml(grid: dict) -> str:
    """The grid as TOML (json.dumps writes valid TOML strings, lists and numbers)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in grid.items()
             if not isinstance(value, list) or not value or not isinstance(value[0], dict)]
    for table in ("models", "datasets"):
        for row in grid[table]:
            lines += ["", f"[[{table}]]", *(f"{k} = {json.dumps(v)}" for k, v in row.items())]
    return "\n".join(lines) + "\n"


def bench_section(folder: Path, demo: dict, *, seed: int, length: int, gpt2_config,
                  steps: int, learning_rate: float, progress: bool = False) -> Section:
    """Train the Llama, write the grid under ``folder/llm-bench`` and run it; one Section."""
    import tomllib

    root = Path(folder) / "llm-bench"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    llama = jax.block_until_ready(train_llama(demo["texts"], demo["is_member"], length, seed,
                                              steps=steps, learning_rate=learning_rate))
    train_seconds = time.perf_counter() - start
    toml = write_grid(root, demo, llama, length=length, gpt2_config=gpt2_config)
    start = time.perf_counter()
    result = run_bench(bench_config(tomllib.loads(toml.read_text()), root),
                       progress=progress, log=lambda line: None)
    bench_seconds = time.perf_counter() - start
    (root / "table.csv").write_text(result.to_csv())
    figures = []
    for i, (cell, curves) in enumerate(result.curves.items()):
        name = f"bench_roc_{i}.png"
        plot_roc(curves, Path(folder) / name, title=cell)
        figures.append((name, f"ROC (log-log): {cell}"))
    metrics = [("Llama training seconds", round(train_seconds, 2)),
               ("grid seconds (4 cells scored into stores + attacks)", round(bench_seconds, 2))]
    for row in result.rows:
        cell = f"{row['model']} / {row['dataset']} / {row['attack']}"
        if row["attack"] == DATASET_INFERENCE:
            metrics.append((f"{cell} p-value", f"{row['p-value']:.3g}"))
        else:
            metrics.append((f"{cell} AUC [95% CI]",
                            f"{row['AUC']:.3f} [{row['AUC low']:.3f}, {row['AUC high']:.3f}]"))
    text = (f"The GPT-2 of the previous section and a {LLAMA.num_hidden_layers}-layer Llama "
            f"(hidden {LLAMA.hidden_size}, {LLAMA.num_attention_heads} query / "
            f"{LLAMA.num_key_value_heads} key-value heads, SwiGLU, RMSNorm, rotary) trained "
            f"for {steps} steps on the same members, saved as model folders with a "
            "byte-level tokenizer and run by memjax mia bench (llm-bench/grid.toml: rerun it "
            f"with `memjax mia bench llm-bench/grid.toml`). The second dataset cuts every "
            f"text to its first {SHORT} bytes: less text, weaker attacks. AUC intervals: "
            "95% stratified bootstrap.")
    return Section(TITLE, text, metrics, figures=figures,
                   files=[("llm-bench/grid.toml", "the grid (models, datasets, attacks)"),
                          ("llm-bench/table.csv", "the table (memjax mia bench writes it "
                           "to llm-bench/result/table.csv)")])
