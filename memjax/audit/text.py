"""The audit's text section: membership and dataset inference on a tiny GPT-2.

A byte-level GPT-2 is trained on a random set of real texts (first paragraphs of
standard-library docstrings, :func:`memjax.data.stdlib_docstrings`); every other text of
the corpus is a non-member from the same distribution. The engine scores every text once
(per-token signals, :func:`memjax.signals.causal_lm_tokens`), and from those signals come

- per-example attacks: LOSS (Yeom et al. 2018), Min-K% (Shi et al. 2024), Min-K%++ (Zhang
  et al. 2024) and zlib (Carlini et al. 2021), judged by AUC and TPR at low FPR;
- dataset inference (Maini et al. 2024, "LLM Dataset Inference"): those attacks at several
  k as features, aggregated by a learned linear model, then a t-test of members against
  non-members, and the same procedure on two halves of the non-members (false-positive
  check, whose p-value should be roughly uniform).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from memjax.data import stdlib_docstrings
from memjax.engine import score
from memjax.metrics import plot_roc, roc_auc, tpr_at_fpr
from memjax.mia import DatasetInferenceResult, dataset_inference, loss, min_k, min_k_plus_plus, zlib
from memjax.models.gpt2 import GPT2Config
from memjax.report import Section
from memjax.signals import causal_lm_tokens
from memjax.train.lm import byte_tokens, fit_gpt2, gpt2_graph

TITLE = "Membership inference: tiny GPT-2 on standard-library docstrings"
LENGTH = 48  # bytes per text: most first paragraphs fit, and training stays fast on a CPU
MEMBERS = 500
CONFIG = GPT2Config(vocab_size=256, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=4)
STEPS = 150
LEARNING_RATE = 3e-3
#: Fractions k of Min-K% / Max-K% / Min-K%++ used as dataset-inference features (the
#: range of Maini et al. 2024's feature set).
KS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def split_corpus(n: int, seed: int, members: int = MEMBERS) -> np.ndarray:
    """[n] bool: a seeded random ``members`` texts are members, the rest non-members."""
    is_member = np.zeros(n, bool)
    is_member[np.random.default_rng(seed).permutation(n)[:members]] = True
    return is_member


def train_target(ids: np.ndarray, mask: np.ndarray, is_member: np.ndarray, seed: int,
                 *, steps: int = STEPS):
    """The target GPT-2's NNX state, trained (full batch) on the member rows only.

    Only member rows are passed: non-members would get weight 0 in :func:`fit_gpt2` and
    just cost compute.
    """
    train = jax.jit(functools.partial(fit_gpt2, config=CONFIG, steps=steps,
                                      learning_rate=LEARNING_RATE))
    members = np.flatnonzero(is_member)
    return train(jax.random.key(seed), ids[members], mask[members],
                 np.ones(len(members), bool))


def token_signals(graph, params, example):
    """The engine's per-example token signals: position t scores byte t+1.

    ``scored`` [L] marks positions whose input and target bytes are both real text.
    """
    lm = nnx.merge(graph, params)
    ids, mask = example["input_ids"], example["attention_mask"]
    hidden = lm.hidden_states(ids[None], mask[None])[0]
    return causal_lm_tokens(hidden, lm.unembedding(), ids, mask, chunk_size=64)


def text_signals(params, ids: np.ndarray, mask: np.ndarray, *, batch_size: int = 64,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Token signals of every text through the engine: ``logp``, ``mu``, ``sigma``,
    ``scored`` [N, L] and ``mean_loss`` [N], among others."""
    return score(functools.partial(token_signals, gpt2_graph(CONFIG)), params,
                 {"input_ids": ids, "attention_mask": mask}, batch_size=batch_size,
                 progress=progress)


def text_attacks(signals: dict[str, np.ndarray], texts: list[str],
                 k: float = 0.2) -> dict[str, np.ndarray]:
    """{name: [N] scores, higher = member}: LOSS, Min-K%, Min-K%++ (at ``k``) and zlib."""
    scored = np.asarray(signals["scored"], bool)
    return {"LOSS": loss(signals["mean_loss"]),
            f"Min-K% (k={k})": min_k(signals["logp"], scored, k),
            f"Min-K%++ (k={k})": min_k_plus_plus(signals["logp"], signals["mu"],
                                                 signals["sigma"], scored, k),
            "zlib": zlib(signals["mean_loss"], texts)}


def di_features(signals: dict[str, np.ndarray], texts: list[str]) -> tuple[np.ndarray,
                                                                            list[str]]:
    """Dataset-inference features (Maini et al. 2024): ([N, F] float64, F names).

    LOSS, zlib ratio, and for each k in :data:`KS`: Min-K%, Max-K% (mean of the highest k
    token log-probabilities, i.e. ``-min_k(-logp)``) and Min-K%++. The aggregator learns
    each feature's sign and weight, so orientation does not matter.
    """
    logp = np.asarray(signals["logp"], np.float64)
    scored = np.asarray(signals["scored"], bool)
    columns = {"LOSS": loss(signals["mean_loss"]), "zlib": zlib(signals["mean_loss"], texts)}
    for k in KS:
        columns[f"Min-K% {k}"] = min_k(logp, scored, k)
        columns[f"Max-K% {k}"] = -min_k(-logp, scored, k)
        columns[f"Min-K%++ {k}"] = min_k_plus_plus(logp, signals["mu"], signals["sigma"],
                                                   scored, k)
    return np.stack(list(columns.values()), axis=1), list(columns)


def run_text_demo(seed: int = 0, *, progress: bool = False) -> dict:
    """Split the corpus, train the target, score every text: the pieces the section and
    the tests share. Returns texts, ``is_member`` [N], params, signals, training seconds."""
    texts = stdlib_docstrings()
    ids, mask = byte_tokens(texts, LENGTH)
    is_member = split_corpus(len(texts), seed)
    start = time.perf_counter()
    params = jax.block_until_ready(train_target(ids, mask, is_member, seed))
    seconds = time.perf_counter() - start
    signals = text_signals(params, ids, mask, progress=progress)
    return {"texts": texts, "is_member": is_member, "params": params, "signals": signals,
            "train_seconds": seconds}


def run_dataset_inference(features: np.ndarray, is_member: np.ndarray, seed: int = 0
                          ) -> tuple[DatasetInferenceResult, DatasetInferenceResult]:
    """(members vs non-members, false-positive check on the non-members) results."""
    suspect, validation = features[is_member], features[~is_member]
    return (dataset_inference(suspect, validation, seed=seed),
            dataset_inference(suspect, validation, seed=seed, false_positive=True))


def plot_p_values(results: dict[str, DatasetInferenceResult], path: Path) -> None:
    """p-value against held-out examples per set (Maini et al. 2024, Fig. 4), log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.0), dpi=120)
    for name, result in results.items():
        ax.plot(result.curve_n, result.curve_p, marker="o", label=name)
    ax.axhline(0.01, color="grey", linestyle="--", label="p = 0.01")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("held-out examples per set")
    ax.set_ylabel("p-value (Welch t-test)")
    ax.set_title("Dataset inference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def text_section(folder: Path, *, seed: int = 0, progress: bool = False) -> list[Section]:
    """Train the tiny GPT-2, attack it per example and by dataset inference, then run the
    benchmark grid of :mod:`memjax.audit.llm_bench` on it and a tiny Llama; two Sections.

    Writes ``roc_text.png``, ``dataset_inference.png``, ``bench_roc_*.png`` and the grid's
    folder ``llm-bench/`` into ``folder``.
    """
    from memjax.audit.llm_bench import bench_section

    demo = run_text_demo(seed, progress=progress)
    return [demo_section(Path(folder), demo, seed),
            bench_section(Path(folder), demo, seed=seed, length=LENGTH, gpt2_config=CONFIG,
                          steps=STEPS, learning_rate=LEARNING_RATE, progress=progress)]


def demo_section(folder: Path, demo: dict, seed: int) -> Section:
    """The section of a finished :func:`run_text_demo` (attacks, dataset inference, plots)."""
    texts, is_member, signals = demo["texts"], demo["is_member"], demo["signals"]
    attacks = text_attacks(signals, texts)
    plot_roc({name: (s, is_member) for name, s in attacks.items()}, folder / "roc_text.png",
             title="Tiny GPT-2 on docstrings")
    features, names = di_features(signals, texts)
    members_vs_rest, false_positive = run_dataset_inference(features, is_member, seed)
    plot_p_values({"suspect = members": members_vs_rest,
                   "false-positive check (non-members)": false_positive},
                  folder / "dataset_inference.png")
    metrics = [("texts (standard-library docstrings)", len(texts)),
               ("members (training texts)", int(is_member.sum())),
               ("bytes per text", LENGTH), ("training steps (full batch)", STEPS),
               ("training seconds", round(demo["train_seconds"], 2))]
    for name, s in attacks.items():
        metrics += [(f"{name} AUC", roc_auc(s, is_member)),
                    (f"{name} TPR@1%FPR", tpr_at_fpr(s, is_member, 0.01)),
                    (f"{name} TPR@0.1%FPR", tpr_at_fpr(s, is_member, 0.001))]
    metrics += [("dataset-inference features", len(names)),
                ("dataset inference p-value (members vs non-members)",
                 f"{members_vs_rest.p_value:.3g}"),
                ("dataset inference p-value (false-positive check, non-members halves)",
                 f"{false_positive.p_value:.3g}")]
    text = (f"A 2-layer byte-level GPT-2 trained for {STEPS} full-batch Adam steps on "
            f"{int(is_member.sum())} random docstring paragraphs; the other "
            f"{int((~is_member).sum())} paragraphs are non-members. Per-example attacks use "
            "the engine's token signals. Dataset inference (Maini et al. 2024) aggregates "
            f"{len(names)} MIA features with a linear model fitted on half of each set and "
            "t-tests the other half; its false-positive check runs the same test on two "
            "halves of the non-members.")
    return Section(TITLE, text, metrics, figures=[
        ("roc_text.png", "ROC of the per-example attacks (log-log)"),
        ("dataset_inference.png", "Dataset inference p-value vs examples per set")])
