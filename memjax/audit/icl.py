"""The audit's in-context-learning section: membership inference against a prompted LM.

Duan et al. 2023 ("On the privacy risk of in-context learning"; "Flocks of stochastic
parrots", NeurIPS 2023): a causal LM solves a classification task from a prompt of k
demonstrations; the demonstrations leak, because the prompted model is more confident on
them, and ensembling M prompts with disjoint demonstrations dilutes that.

The task is real text: standard-library docstrings labelled by the topic of their module
(:func:`memjax.data.stdlib_docstrings_by_module`: net, file, text, code), each text cut to
its first three lowercase words (``"return the number"``), word triples that occur twice
dropped. Tokens are words hashed into a 256-id vocabulary (:class:`HashedWords`; the label
words and the separator have ids of their own). A prompt is ``w1 w2 w3 LABEL`` lines.

The model is a tiny GPT-2 (2 layers, width 32) trained here, in a few seconds, on prompts
made from the texts that are NOT audited. A model this small learns to read its context
only if training rewards it, so the construction is stated plainly: in 3 of 4 training
prompts the query repeats one of the k demonstrations (its label is then that
demonstration's), and in half the prompts the four label words are permuted at random
(so memorising a text's label does not help and copying from the context does). Large
LMs copy from their context without such help (induction heads; Olsson et al. 2022);
this model only learns a partial version of it (about 60% of repeated queries get the
demonstration's label on held-out texts, against about 40% of fresh queries). Its loss
is on the label tokens and the query's words.

The audit then draws M = 16 prompts of k = 4 disjoint demonstrations from 256 held-out
texts (the 64 demonstrations are the members), queries every text under every prompt
(:func:`memjax.mia.icl_membership`) and reports the attack AUC of the single-prompt
model against the ensemble's, and the task accuracy on the non-members.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memjax.audit.data import read_only
from memjax.data import stdlib_docstrings_by_module
from memjax.errors import InputError
from memjax.metrics import plot_roc
from memjax.mia import PromptTemplate, draw_demonstration_sets, icl_membership
from memjax.models import Model
from memjax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from memjax.report import Section

TITLE = "Membership inference against a prompted LM (in-context learning)"
WORDS = 3  # words per text
K = 4  # demonstrations per prompt
PROMPTS = 16  # M, the ensemble's size
CANDIDATES = 256  # audited texts: K * PROMPTS members, the rest non-members
LABEL_WORDS = ("NET", "FILE", "TEXT", "CODE")  # verbalizers of the four topics
TEMPLATE = PromptTemplate(labels=LABEL_WORDS, query="{text}", answer=" {label}",
                          separator="\n")
VOCAB = 256
CONFIG = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
STEPS = 3000
BATCH = 16
LEARNING_RATE = 3e-3
REPEAT_FRACTION = 0.75  # training prompts whose query repeats a demonstration
PERMUTE_FRACTION = 0.5  # training prompts with randomly permuted label words


@dataclasses.dataclass(frozen=True)
class HashedWords:
    """Word tokenizer: ``text -> ids``. Id 0 is padding, 1 the newline, 2..2+L-1 the
    label words (exact, case-sensitive), every other ``[A-Za-z]+`` word
    ``2 + L + crc32(word) % (vocab - 2 - L)``; other characters are skipped."""

    labels: tuple[str, ...] = LABEL_WORDS
    vocab: int = VOCAB

    def __call__(self, text: str) -> list[int]:
        return [self.token(t) for t in re.findall(r"[A-Za-z]+|\n", text)]

    def token(self, word: str) -> int:
        if word == "\n":
            return 1
        if word in self.labels:
            return 2 + self.labels.index(word)
        first = 2 + len(self.labels)
        return first + zlib.crc32(word.encode()) % (self.vocab - first)


def topic_texts() -> tuple[list[str], np.ndarray]:
    """(texts, labels [N]): the docstring topic task cut to :data:`WORDS` lowercase words
    per text; texts with fewer words, and triples that occur more than once, dropped."""
    texts, labels, names = stdlib_docstrings_by_module()
    if tuple(n.upper() for n in names) != LABEL_WORDS:
        raise InputError(f"topics: expected {LABEL_WORDS}, got {names}")
    short = [" ".join(re.findall(r"[a-z]+", t.lower())[:WORDS]) for t in texts]
    counts: dict[str, int] = {}
    for s in short:
        counts[s] = counts.get(s, 0) + 1
    keep = [i for i, s in enumerate(short) if len(s.split()) == WORDS and counts[s] == 1]
    return [short[i] for i in keep], labels[keep]


def prompt_ids(word_ids: np.ndarray, labels: np.ndarray, demos: np.ndarray,
               query: np.ndarray, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, T] of training prompts (the tokens of :data:`TEMPLATE`'s text of
    ``demos`` [B, K] then ``query`` [B], labels mapped by ``label_map`` [B, 4]) and the
    loss weights [B, T]: 1 on every label token and on the query's 2nd..last words."""
    b = len(query)
    rows = np.arange(b)[:, None]
    line = WORDS + 2
    ids = np.zeros((b, K * line + WORDS + 1), np.int32)
    weight = np.zeros(ids.shape, np.float32)
    for j in range(K):
        ids[:, j * line:j * line + WORDS] = word_ids[demos[:, j]]
        ids[:, j * line + WORDS] = 2 + label_map[rows[:, 0], labels[demos[:, j]]]
        ids[:, j * line + WORDS + 1] = 1
        weight[:, j * line + WORDS] = 1
    start = K * line
    ids[:, start:start + WORDS] = word_ids[query]
    ids[:, start + WORDS] = 2 + label_map[rows[:, 0], labels[query]]
    weight[:, start + 1:start + WORDS + 1] = 1
    return ids, weight


def training_prompts(word_ids: np.ndarray, labels: np.ndarray, pool: np.ndarray, seed: int,
                     steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """[steps, BATCH, T] ids and weights of the training prompts (see the module doc)."""
    rng = np.random.default_rng([seed, 1])
    n = steps * BATCH
    picks = rng.integers(0, len(pool), (n, K + 1))
    for row in np.flatnonzero([len(set(r)) < K + 1 for r in picks.tolist()]):
        picks[row] = rng.choice(len(pool), K + 1, replace=False)  # distinct texts per prompt
    picks = np.asarray(pool)[picks]
    repeat = rng.random(n) < REPEAT_FRACTION
    query = np.where(repeat, picks[np.arange(n), rng.integers(0, K, n)], picks[:, K])
    permute = rng.random(n) < PERMUTE_FRACTION
    label_map = np.where(permute[:, None], rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1),
                         np.arange(4)[None, :])
    ids, weight = prompt_ids(word_ids, labels, picks[:, :K], query, label_map)
    return ids.reshape(steps, BATCH, -1), weight.reshape(steps, BATCH, -1)


def weighted_loss(graph, params, ids: jax.Array, weight: jax.Array) -> jax.Array:
    """Weighted mean next-token cross-entropy (weight on the predicted token's position)."""
    logits = nnx.merge(graph, params)(ids, jnp.ones_like(ids))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -(token * weight[:, 1:]).sum() / weight[:, 1:].sum()


@functools.partial(jax.jit, static_argnums=0)
def _train(graph, params, ids, weight):
    optimizer = optax.adam(LEARNING_RATE)

    def step(carry, batch):
        p, state = carry
        grads = jax.grad(lambda q: weighted_loss(graph, q, *batch))(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), (ids, weight))
    return params


def train_prompted_lm(ids: np.ndarray, weight: np.ndarray, seed: int) -> Model:
    """The tiny GPT-2 trained on the prompts (Adam, one batch per step), as a causal-LM
    ``memjax.Model``."""
    graph, params = nnx.split(GPT2LMHeadModel(CONFIG, rngs=nnx.Rngs(params=seed)))
    params = jax.block_until_ready(_train(graph, params, ids, weight))
    return Model.from_nnx(nnx.merge(graph, params), inputs=("input_ids", "attention_mask"),
                          kind="causal_lm", name="tiny GPT-2 (word tokens)", config=CONFIG)


@functools.lru_cache(maxsize=4)
def icl_demo(seed: int = 0) -> dict:
    """Train the prompted LM and run both attacks on held-out texts (cached, read-only).

    Returns texts, labels [N], is_member [N], prompt_index [N], single_prompt and
    ensemble scores [N], the metrics of :meth:`memjax.mia.IclMembership.metrics`, the
    model and the training seconds.
    """
    texts, labels = topic_texts()
    tokenizer = HashedWords()
    word_ids = np.asarray([tokenizer(t) for t in texts], np.int32)
    order = np.random.default_rng([seed, 0]).permutation(len(texts))
    audited, pool = order[:CANDIDATES], order[CANDIDATES:]
    start = time.perf_counter()
    ids, weight = training_prompts(word_ids, labels, pool, seed)
    model = train_prompted_lm(ids, weight, seed)
    seconds = time.perf_counter() - start
    sets = draw_demonstration_sets(CANDIDATES, K, PROMPTS, seed)
    result = icl_membership(model, [texts[i] for i in audited], labels[audited], TEMPLATE,
                            sets, tokenizer=tokenizer, batch_size=CANDIDATES)
    return read_only({"texts": [texts[i] for i in audited], "labels": result.labels,
                      "is_member": result.is_member, "prompt_index": result.prompt_index,
                      "single_prompt": result.single_prompt, "ensemble": result.ensemble,
                      "metrics": result.metrics(), "model": model, "train_seconds": seconds})


def icl_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """The section: setting, AUC single prompt vs ensemble, task accuracy, ROC figure."""
    demo = icl_demo(seed)
    m = demo["metrics"]
    plot_roc({"single prompt": (demo["single_prompt"], demo["is_member"]),
              f"ensemble of {PROMPTS} prompts": (demo["ensemble"], demo["is_member"])},
             Path(folder) / "icl_roc.png", title="ICL membership inference ROC")
    metrics = [("audited texts (members = demonstrations)", f"{CANDIDATES} "
                f"({int(demo['is_member'].sum())})"),
               ("k demonstrations x M prompts", f"{K} x {PROMPTS}"),
               ("training seconds", round(demo["train_seconds"], 1)),
               ("AUC, single prompt", m["auc_single_prompt"]),
               (f"AUC, ensemble of {PROMPTS} prompts", m["auc_ensemble"]),
               ("accuracy on non-members, single prompt", m["accuracy_single_prompt"]),
               (f"accuracy on non-members, ensemble of {PROMPTS}", m["accuracy_ensemble"]),
               ("chance accuracy (majority topic)",
                float(np.bincount(demo["labels"][~demo["is_member"]]).max()
                      / (~demo["is_member"]).sum()))]
    text = (
        "Duan et al. 2023 ('On the privacy risk of in-context learning'; 'Flocks of "
        "stochastic parrots'): a prompted LM is more confident on its demonstrations, so "
        "the probability of a text's correct label tells whether it was in the prompt; "
        f"averaging the label distributions of {PROMPTS} prompts with disjoint "
        "demonstrations dilutes each member's own prompt. Task: standard-library "
        "docstrings (first three words) labelled by their module's topic (net, file, text, "
        "code). Model: a tiny word-level GPT-2 trained here on prompts built from texts "
        "that are not audited; to make a model this small read its context, 3 of 4 "
        "training queries repeat a demonstration and half the training prompts permute "
        "the label words (stated construction, see memjax/audit/icl.py). Then "
        f"{PROMPTS} prompts of {K} held-out demonstrations; every audited text is queried "
        "under every prompt: single-prompt score = correct label's probability (over the "
        "label words) under the text's own prompt (non-members: a prompt assigned "
        "round-robin); ensemble score = the same under the average distribution. The "
        "tiny model's task accuracy from three words stays near the majority-topic rate: "
        "the section shows the leak and its mitigation, not a useful classifier. "
        "`memjax mia icl` runs the same attacks on any causal LM and JSONL data.")
    return Section(TITLE, text, metrics,
                   figures=[("icl_roc.png", "ROC of the attack: single prompt vs ensemble")])
