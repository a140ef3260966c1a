"""The audit's private-prototypes section: DPPL-Mean and DPPL-Public (Wahdany et al.,
"Beyond the Mean: Differentially Private Prototypes for Private Transfer Learning",
NeurIPS 2024) on digits with an imbalanced private set.

The digits are split per class into a public part (60 per class: it trains the encoder and
is DPPL-Public's candidate pool), a test part (40 per class) and a private pool (the rest),
in which classes 5-9 are made 10× rarer. A random half of the private pool is the private
set (members), the other half the non-members of the membership check: same classes, same
imbalance. The encoder is the hidden layer (``dense1``, 64 units, ReLU) of an MLP
classifier trained on the public part only (full-batch Adam, a few hundred steps): the
paper's "public pre-trained encoder" at digit scale. Prototypes are released at several ε
(δ = 1e-5, zCDP accounting for DPPL-Mean; pure ε-DP for DPPL-Public) and evaluated by
nearest-prototype accuracy on the test part and by a membership attack (cosine of an
example to its class prototype; AUC members vs non-members).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import numpy as np

from memjax.audit import member_mask
from memjax.audit.data import read_only
from memjax.data import digits
from memjax.metrics import roc_auc
from memjax.models import Model
from memjax.prototypes import embed, evaluate_prototypes
from memjax.report import Section
from memjax.train import MLPConfig, fit_classifier, save_model

TITLE = "Private prototypes: DPPL-Mean and DPPL-Public on imbalanced digits"
#: ε = 100 is no privacy to speak of; it shows DPPL-Mean reaching the non-private accuracy
#: once the noise is small next to the rare classes' sums of 2-5 unit vectors.
EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, math.inf)
DELTA = 1e-5
PUBLIC_PER_CLASS, TEST_PER_CLASS = 60, 40
RARE_CLASSES, RARE_FACTOR = (5, 6, 7, 8, 9), 10
ENCODER = MLPConfig((8, 8, 1), 10, hidden=(64,))
ENCODER_TRAINING = {"steps": 300, "learning_rate": 3e-3}
LAYER = "dense1"
#: DPPL-Public's utility counts positive cosine only (a = 1 on the 1 + cos scale).
PUBLIC_MIN_SCORE = 1.0


def prototype_splits(seed: int) -> dict[str, np.ndarray]:
    """Row indices of the digits: ``public``, ``test``, ``members``, ``nonmembers`` (the
    imbalanced private pool's two random halves)."""
    labels = digits().arrays["label"]
    rng = np.random.default_rng(seed)
    public, test, pool = [], [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        public.append(rows[:PUBLIC_PER_CLASS])
        test.append(rows[PUBLIC_PER_CLASS:PUBLIC_PER_CLASS + TEST_PER_CLASS])
        rest = rows[PUBLIC_PER_CLASS + TEST_PER_CLASS:]
        pool.append(rest[:len(rest) // RARE_FACTOR] if c in RARE_CLASSES else rest)
    pool = np.sort(np.concatenate(pool))
    keep = member_mask(len(pool), seed)
    return {"public": np.sort(np.concatenate(public)), "test": np.sort(np.concatenate(test)),
            "members": pool[keep], "nonmembers": pool[~keep]}


def train_encoder(splits: dict[str, np.ndarray], seed: int) -> tuple[Model, float]:
    """The MLP classifier trained on the public part, as a Model (its ``dense1`` tap is
    the encoder), and the training seconds."""
    data = digits().arrays
    start = time.perf_counter()
    keep = np.zeros(len(data["label"]), np.float32)
    keep[splits["public"]] = 1.0
    params = fit_classifier(jax.random.key(seed), data["image"], data["label"], keep,
                            config=ENCODER, **ENCODER_TRAINING)
    params = jax.block_until_ready(params)
    return Model.from_classifier(params, ENCODER), time.perf_counter() - start


@functools.lru_cache(maxsize=4)
def prototypes_demo(seed: int = 0) -> dict:
    """Train the encoder, embed every digit through the engine, and evaluate DPPL-Mean
    and DPPL-Public at each ε of :data:`EPSILONS`.

    Returns (read-only arrays): ``splits``; ``mean`` / ``public`` / ``coinpress`` (DPPL-Mean
    with the CoinPress estimator at the same (ε, δ)): ``{"epsilon",
    "accuracy", "auc", "rare_auc", "noise"}`` arrays over ε (``rare_auc``: the membership
    AUC over the rare classes' members and non-members only); ``counts`` [10] private
    examples per class; ``params`` of the encoder; ``train_seconds``, ``seconds``.
    """
    start = time.perf_counter()
    splits = prototype_splits(seed)
    model, train_seconds = train_encoder(splits, seed)
    data = digits().arrays
    out = embed(model, {"image": data["image"], "label": data["label"]}, layer=LAYER,
                batch_size=256)
    z, y = out["embedding"], out["label"]
    m, n, t, p = (splits[k] for k in ("members", "nonmembers", "test", "public"))
    results = {}
    runs = {"mean": ("mean", {"delta": DELTA}),
            "public": ("public", {"public": z[p], "min_score": PUBLIC_MIN_SCORE}),
            "coinpress": ("mean", {"delta": DELTA, "estimator": "coinpress"})}
    for position, (name, (method, options)) in enumerate(runs.items()):
        rows = evaluate_prototypes(
            jax.random.fold_in(jax.random.key(seed), 1000 + position), method, z[m], y[m],
            z[t], y[t], 10, epsilons=EPSILONS, nonmembers=z[n], nonmember_labels=y[n],
            **options)
        results[name] = {key: np.array([row[key] for row in rows], np.float64)
                         for key in ("epsilon", "accuracy", "auc", "noise")}
        results[name]["rare_auc"] = np.array([rare_class_auc(row, y[m], y[n])
                                              for row in rows])
    return read_only({"splits": splits, **results, "params": model.params,
                      "counts": np.bincount(y[m], minlength=10),
                      "train_seconds": train_seconds,
                      "seconds": time.perf_counter() - start})


def rare_class_auc(row: dict, member_labels: np.ndarray,
                   nonmember_labels: np.ndarray) -> float:
    """The membership AUC of one ε's scores restricted to :data:`RARE_CLASSES`."""
    rare_m = np.isin(member_labels, RARE_CLASSES)
    rare_n = np.isin(nonmember_labels, RARE_CLASSES)
    scores = np.concatenate([row["member_scores"][rare_m], row["nonmember_scores"][rare_n]])
    is_member = np.concatenate([np.ones(rare_m.sum(), bool), np.zeros(rare_n.sum(), bool)])
    return roc_auc(scores, is_member)


def save_demo_files(result: dict, folder: Path) -> list[tuple[str, str]]:
    """The encoder (``encoder/``, a memjax model folder; its ``dense1`` tap is the
    embedding) and the four splits as ``.npz`` (``image``, ``label``) in ``folder``, so
    ``memjax prototypes`` reproduces the section; returns the (file, caption) rows."""
    data = digits().arrays
    save_model(folder / "encoder", result["params"], ENCODER)
    files = [("encoder", "the encoder's model folder (memjax.load; --layer dense1)")]
    for name in ("members", "nonmembers", "test", "public"):
        rows = result["splits"][name]
        np.savez(folder / f"{name}.npz", image=data["image"][rows], label=data["label"][rows])
        files.append((f"{name}.npz", f"the {name} digits (image, label)"))
    return files


def plot_prototypes(result: dict, path: Path) -> None:
    """Accuracy and membership AUC against ε (log axis; ε = inf drawn at the right end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.isfinite(result["mean"]["epsilon"])
    positions = np.where(finite, result["mean"]["epsilon"], 100.0)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    for method, label in (("mean", "DPPL-Mean"), ("public", "DPPL-Public"),
                          ("coinpress", "DPPL-Mean, CoinPress")):
        axes[0].plot(positions, result[method]["accuracy"], marker="o", label=label)
        axes[1].plot(positions, result[method]["auc"], marker="o", label=label)
    for ax, name in zip(axes, ("test accuracy", "membership AUC"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("ε (rightmost point: not private)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    axes[1].plot(positions, result["mean"]["rare_auc"], marker="s", ls="--",
                 label="DPPL-Mean, rare classes")
    axes[1].legend(fontsize=8)
    axes[1].axhline(0.5, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def prototypes_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """The section: text, accuracy and AUC per ε for both methods, ``prototypes.png``."""
    result = prototypes_demo(seed)
    plot_prototypes(result, folder / "prototypes.png")
    counts = result["counts"]
    metrics: list[tuple[str, object]] = [
        ("private examples per class (members)", " ".join(map(str, counts))),
        ("non-members / test / public examples",
         f"{len(result['splits']['nonmembers'])} / {len(result['splits']['test'])} / "
         f"{len(result['splits']['public'])}"),
        ("encoder training seconds", round(result["train_seconds"], 2)),
    ]
    for method, label, noise in (("mean", "DPPL-Mean", "σ"),
                                 ("public", "DPPL-Public", "ε/(2Δ)"),
                                 ("coinpress", "DPPL-Mean (CoinPress)", "last-step σ")):
        for eps, acc, auc, scale in zip(*(result[method][k] for k in
                                          ("epsilon", "accuracy", "auc", "noise")),
                                        strict=True):
            name = "not private" if math.isinf(eps) else f"ε = {eps:g}"
            scale_text = "inf" if math.isinf(scale) else f"{scale:.3g}"
            metrics.append((f"{label}, {name}: accuracy / membership AUC / {noise}",
                            f"{acc:.3f} / {auc:.3f} / {scale_text}"))
    for eps, auc in zip(result["mean"]["epsilon"], result["mean"]["rare_auc"], strict=True):
        name = "not private" if math.isinf(eps) else f"ε = {eps:g}"
        metrics.append((f"DPPL-Mean, {name}: membership AUC on the rare classes", float(auc)))
    text = (
        "DPPL (Wahdany et al., NeurIPS 2024) releases one prototype per class from a public "
        "encoder's embeddings of a private labelled set; a test example gets the class of "
        "the nearest prototype (cosine). DPPL-Mean: the Gaussian mechanism on each class's "
        "sum of unit-normalised embeddings (sensitivity 1 under add/remove-one, classes "
        "disjoint: parallel composition; σ from (ε, δ = 1e-5) by zCDP, ρ = 1/(2σ²), "
        "ε = ρ + 2·sqrt(ρ·log(1/δ))), and with the paper's CoinPress estimator at the same "
        "(ε, δ) (three steps, ρ split 5/64, 7/64, 52/64, starting from the ball of radius "
        "sqrt(d) around 0; class counts public): on these 64-d embeddings its first steps' "
        "wide balls cost more than its refinement gains, so it trails the clipped sum. "
        "DPPL-Public: per class, a public example chosen by the exponential mechanism, "
        "P ∝ exp(ε·u/2), u = the sum over the class's private examples of their cosine to "
        "the candidate clipped to [0, 1]. "
        f"Setting: digits, encoder = hidden layer of an MLP trained on a public part "
        f"({PUBLIC_PER_CLASS} per class), private set with classes 5-9 {RARE_FACTOR}× rarer, "
        f"balanced test part ({TEST_PER_CLASS} per class). The membership check scores an "
        "example by its cosine to its class prototype: members (the private set) against "
        "non-members drawn from the same imbalanced pool. Each member of a common class is "
        "one of ~40 in its class sum and barely moves it, so the attack is near chance "
        "even without noise; in the rare classes (2-5 members) the non-private prototype "
        "leaks membership and the noise of a small ε removes it. "
        "Reproduce with `memjax prototypes --model encoder --layer dense1 --private "
        "members.npz --nonmembers nonmembers.npz --test test.npz --method mean --epsilon "
        "0.1 1 inf` (DPPL-Public: `--method public --public public.npz --min-score 1`; "
        "other noise draws, but the ε = inf numbers match).")
    return Section(TITLE, text, metrics,
                   figures=[("prototypes.png", "Test accuracy and membership AUC vs ε")],
                   files=save_demo_files(result, folder))
