"""The audit's influence section: Forward-INF applications and LAVA on real data.

Forward-INF (Ko et al., CVPR 2024) scores training examples by how their loss moves when
the model unlearns a test example (or, for self-influence, the example itself):

- mislabeled data: digits with 10% of the training labels flipped; rank training examples
  by self-influence and compare with the loss baseline and with LAVA (Just et al. 2023,
  class-wise optimal transport to clean validation data);
- data leakage: test examples that are near-duplicates of training examples; the most
  supporting training example should be the source (top-1 / top-5 hit rate);
- memorization: the most self-influential training examples of a clean model, shown;
- training-document tracing: a tiny GPT-2 and corrupted copies of its training texts;
  Forward-INF should point each copy at the text it came from.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np

from memjax.data import digits, stdlib_docstrings
from memjax.influence import (
    RANKING,
    cross_entropy_loss,
    forward_inf,
    hit_rates,
    lava_values,
    relative_first_order,
    self_influence,
)
from memjax.metrics import roc_auc
from memjax.report import Section, plot_top_images
from memjax.train import MLPConfig, classifier_logits, fit_classifier

TITLE = "Influence: Forward-INF applications and LAVA data valuation"
FLIP_FRACTION = 0.1
#: One SGD step of ascent on the example itself (lr 0.1): self-influence, Forward-INF.
SELF_INFLUENCE = {"mode": "finite", "optimizer": "sgd", "lr": 0.1}
#: Unlearning a test example: one SGD ascent step; oriented scores (positive = supports).
TRACING = {"mode": "finite", "optimizer": "sgd", "lr": 0.1, "direction": "ascent"}
#: Forward-INF's loss for the audit's MLPs: cross-entropy of one example.
classifier_loss = functools.partial(cross_entropy_loss, classifier_logits)


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(noisy labels, flipped [N] bool): a random ``fraction`` moved to another class."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(labels.shape[0]) < fraction
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, int(flipped.sum()))) % 10
    return noisy, flipped


def train_digits(images: np.ndarray, labels: np.ndarray, seed: int, steps: int = 300):
    """An MLP 64-128-10 trained (full-batch Adam) on all the given examples."""
    config = MLPConfig(images.shape[1:], 10, hidden=(128,))
    fit = jax.jit(functools.partial(fit_classifier, config=config, steps=steps,
                                    learning_rate=2e-3))
    return fit(jax.random.key(seed), images, labels, np.ones(len(labels), np.float32))


def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, order): all digits and ``seed``'s permutation of them (the first
    1,300 are the training examples of every digits experiment here)."""
    data = digits().arrays
    images, labels = data["image"], data["label"]
    return images, labels, np.random.default_rng(seed).permutation(len(labels))


def clean_model(seed: int = 0):
    """The MLP trained on the 1,300 clean-label training digits of ``seed``'s split.

    :func:`leakage_detection` and :func:`datamodeling_check` use the same model: the
    section trains it once and passes it to both.
    """
    images, labels, order = _digits_split(seed)
    return train_digits(images[order[:1300]], labels[order[:1300]], seed)


def mislabeled_detection(seed: int = 0) -> dict:
    """Self-influence vs loss vs LAVA at finding flipped labels (AUROC), one model."""
    images, labels, order = _digits_split(seed)
    train, val = order[:1300], order[1300:]
    noisy, flipped = flip_labels(labels[train], FLIP_FRACTION, seed)
    params = train_digits(images[train], noisy, seed)
    source = {"image": images[train], "label": noisy}
    start = time.perf_counter()
    influence = self_influence(classifier_loss, params, source, **SELF_INFLUENCE)
    seconds = time.perf_counter() - start
    losses = np.asarray(jax.vmap(classifier_loss, in_axes=(None, 0))(params, source))
    values = np.asarray(lava_values(images[train].reshape(len(train), -1), noisy,
                                    images[val].reshape(len(val), -1), labels[val]))
    return {"flipped": flipped, "self_influence": influence, "loss": losses,
            "lava": values, "seconds": seconds, "n_train": len(train)}


def leakage_detection(seed: int = 0, n_leaked: int = 50, noise: float = 0.05, *,
                      params=None) -> dict:
    """Near-duplicates of training digits as test examples: is their source found?

    ``params``: :func:`clean_model` of the same ``seed`` (default: trained here).
    """
    images, labels, order = _digits_split(seed)
    train = order[:1300]
    if params is None:
        params = clean_model(seed)
    rng = np.random.default_rng(seed + 1)
    source = rng.choice(len(train), n_leaked, replace=False)
    leaked = np.clip(images[train][source] + rng.normal(0, noise, images[train][source].shape),
                     0, 1).astype(np.float32)
    test = {"image": leaked, "label": labels[train][source]}
    train_set = {"image": images[train], "label": labels[train]}
    scores = forward_inf(classifier_loss, params, test, train_set, **TRACING)
    influence = self_influence(classifier_loss, params, train_set, **SELF_INFLUENCE)
    relative = relative_first_order(classifier_loss, params, test, train_set)
    return {"hits": hit_rates(scores, source), "relative_hits": hit_rates(relative, source),
            "n_leaked": n_leaked, "noise": noise,
            "self_influence": influence, "images": images[train], "labels": labels[train]}


def datamodeling_check(seed: int = 0, n_subsets: int = 32, n_test: int = 20, *,
                       params=None) -> dict:
    """Linear datamodeling score (Park et al. 2023) of Forward-INF and grad-dot on digits.

    ``n_subsets`` MLPs with the full model's recipe are trained at once (vmap) on random
    halves of the 1,300 training digits; each subset model's output on a test example is
    its negative loss (higher = better supported). The LDS of a method is the Spearman
    correlation, over subsets, between that output and the sum of the method's scores
    over the subset, averaged over the test examples. ``params``: the full model,
    :func:`clean_model` of the same ``seed`` (default: trained here).
    """
    from memjax.influence import grad_dot, lds
    from memjax.train import balanced_keep, train_classifiers

    images, labels, order = _digits_split(seed)
    train, test_rows = order[:1300], order[1300:1300 + n_test]
    train_set = {"image": images[train], "label": labels[train]}
    test = {"image": images[test_rows], "label": labels[test_rows]}
    if params is None:
        params = clean_model(seed)
    subsets = balanced_keep(n_subsets, len(train), seed + 2)
    config = MLPConfig(images.shape[1:], 10, hidden=(128,))
    stacked = train_classifiers(jax.random.key(seed + 3), images[train], labels[train],
                                subsets, config=config, steps=300, learning_rate=2e-3)
    outputs = -np.asarray(jax.vmap(lambda p: jax.vmap(classifier_loss, in_axes=(None, 0))(
        p, test))(stacked))  # [S, T]
    methods = {
        "Forward-INF (finite, one SGD ascent step)": forward_inf(classifier_loss, params, test,
                                                                 train_set, **TRACING),
        "Forward-INF (first order)": forward_inf(classifier_loss, params, test, train_set,
                                                 **RANKING),
        "grad-dot (TracIn, final checkpoint)": np.asarray(grad_dot(classifier_loss, params,
                                                                   test, train_set)),
    }
    return {"lds": {name: float(lds(scores, subsets, outputs).mean)
                    for name, scores in methods.items()},
            "n_subsets": n_subsets, "n_test": n_test}


def text_tracing(seed: int = 0, n_texts: int = 128, n_queries: int = 32,
                 corrupt: float = 0.15) -> dict:
    """A tiny GPT-2 on real texts; queries are training texts with ``corrupt`` of their
    bytes replaced at random; Forward-INF should rank each query's source first."""
    from flax import nnx

    from memjax.audit.text import CONFIG, LEARNING_RATE
    from memjax.train.lm import byte_tokens, fit_gpt2, gpt2_graph, next_token_loss

    texts = stdlib_docstrings()
    chosen = np.random.default_rng(seed).choice(len(texts), n_texts, replace=False)
    ids, mask = byte_tokens([texts[i] for i in chosen], CONFIG.n_positions)
    fit = jax.jit(functools.partial(fit_gpt2, config=CONFIG, steps=150,
                                    learning_rate=LEARNING_RATE))
    params = fit(jax.random.key(seed), ids, mask, np.ones(n_texts, bool))
    graph = gpt2_graph(CONFIG)

    def text_loss(p, example):
        return next_token_loss(nnx.merge(graph, p), example["input_ids"][None],
                               example["attention_mask"][None], np.ones(1, np.float32))

    rng = np.random.default_rng(seed + 1)
    source = rng.choice(n_texts, n_queries, replace=False)
    queries = ids[source].copy()
    swap = (rng.random(queries.shape) < corrupt) & (mask[source] != 0)
    queries[swap] = rng.integers(32, 127, int(swap.sum()))
    test = {"input_ids": queries, "attention_mask": mask[source]}
    train = {"input_ids": ids, "attention_mask": mask}
    # A smaller step than for the MLP: one SGD step of 0.1 on a language model's mean token
    # loss moves it far outside the small-step regime.
    step = {**TRACING, "lr": 0.01}
    scores = forward_inf(text_loss, params, test, train, **step, batch_size=64)
    relative = relative_first_order(text_loss, params, test, train, batch_size=64)
    return {"hits": hit_rates(scores, source), "relative_hits": hit_rates(relative, source),
            "n_texts": n_texts, "n_queries": n_queries,
            "corrupt": corrupt}


def influence_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """Run the four applications and LAVA; one Section with its figure."""
    mislabeled = mislabeled_detection(seed)
    clean = clean_model(seed)  # one clean-label MLP for the leakage and LDS checks
    leakage = leakage_detection(seed, params=clean)
    tracing = text_tracing(seed)
    datamodels = datamodeling_check(seed, params=clean)
    labels = leakage["labels"]
    plot_top_images(leakage["images"], leakage["self_influence"],
                    lambda i: f"label {labels[i]}", folder / "self_influence.png",
                    "Most self-influential training digits (clean labels)")
    flipped = mislabeled["flipped"]
    metrics = [
        ("training examples (digits)", mislabeled["n_train"]),
        ("flipped labels", int(flipped.sum())),
        ("mislabeled AUROC: Forward-INF self-influence", roc_auc(mislabeled["self_influence"],
                                                                 flipped)),
        ("mislabeled AUROC: loss baseline", roc_auc(mislabeled["loss"], flipped)),
        ("mislabeled AUROC: LAVA (pixels, OT to clean validation)",
         roc_auc(mislabeled["lava"], flipped)),
        ("self-influence seconds (all training examples)", round(mislabeled["seconds"], 2)),
        ("leaked near-duplicates (test)", leakage["n_leaked"]),
        ("leakage: source is top-1 (raw Forward-INF)", leakage["hits"][1]),
        ("leakage: source in top-5 (raw Forward-INF)", leakage["hits"][5]),
        ("leakage: source is top-1 (first order, relative: gradient cosine)",
         leakage["relative_hits"][1]),
        ("leakage: source in top-5 (first order, relative: gradient cosine)",
         leakage["relative_hits"][5]),
        *((f"LDS ({datamodels['n_subsets']} half-data MLPs, {datamodels['n_test']} test "
           f"digits): {name}", value) for name, value in datamodels["lds"].items()),
        ("GPT-2 tracing: corrupted training texts queried", tracing["n_queries"]),
        ("GPT-2 tracing: source is top-1 (raw Forward-INF)", tracing["hits"][1]),
        ("GPT-2 tracing: source in top-5 (raw Forward-INF)", tracing["hits"][5]),
        ("GPT-2 tracing: source is top-1 (first order, relative: gradient cosine)",
         tracing["relative_hits"][1]),
        ("GPT-2 tracing: source in top-5 (first order, relative: gradient cosine)",
         tracing["relative_hits"][5]),
    ]
    text = (
        "Forward-INF (Ko et al., CVPR 2024, 'The Mirrored Influence Hypothesis') estimates "
        "the influence of training example i on test example t from forward passes: take "
        f"one SGD step of gradient ascent on t (lr {TRACING['lr']}), then score every "
        "training example by the change of its loss (positive = i supports t). "
        f"Mislabeled data: {FLIP_FRACTION:.0%} of 1,300 training digits get a wrong label; "
        "an MLP is trained on them; each example's self-influence (ascent on itself, change "
        "of its own loss) ranks the flipped ones first, next to the loss itself and LAVA "
        "(Just et al. 2023: the calibrated gradient of the class-wise OT dual between the "
        "training set and the 497 clean held-out digits). Leakage: test digits that are "
        f"training digits plus Gaussian noise (σ {leakage['noise']}); the hit rate is how "
        "often the most supporting training example is the source, ranked by the raw "
        "finite-step score and by first-order influence relative to self-influence "
        "(RelatIF-style, Barshan et al. 2020: the cosine of the two loss gradients, which "
        "stops examples with large gradients from topping every ranking). Tracing: a tiny byte "
        f"GPT-2 trained on {tracing['n_texts']} docstrings, queried with copies of its "
        f"training texts with {tracing['corrupt']:.0%} of their bytes replaced at random. "
        "Ground truth for attribution: the linear datamodeling score (LDS, Park et al. "
        f"2023), from {datamodels['n_subsets']} MLPs trained at once with vmap on random "
        "halves of the training digits: how well the summed scores of a subset rank the "
        "test loss of the model trained on it."
    )
    return Section(TITLE, text, metrics,
                   figures=[("self_influence.png", "The most self-influential digits of a "
                             "model trained on clean labels (atypical writing)")])
