"""The audit's memorization section: SSLMem, LayerMem and UnitMem of SimCLR digit encoders
and CLIPMem of tiny CLIPs with mis-captioned pairs.

The leave-out design of Wang et al. 2024 ("Memorization in Self-Supervised Learning
Improves Downstream Generalization", ICLR; "Localizing Memorization in SSL Vision
Encoders", NeurIPS): encoder f is trained on a shared set plus a candidate set, encoder g
on the shared set plus an independent set of the same size; both in one vmapped SimCLR
program (:func:`memjax.train.simclr.train_simclrs`) from the same initialisation, so
their difference is what the candidates did (with two random initialisations the
per-layer gap between f and g drowns the candidates' signal at this scale). A few
candidates are atypical: injected outliers (digits with inverted intensities) or a class
g never sees. Memorization of a candidate = how much better f aligns its augmented views
than g does.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import numpy as np

from memjax.audit.data import read_only
from memjax.augment import SmallImageView
from memjax.data import digits
from memjax.memorization import layermem, unitmem
from memjax.metrics import auc_confidence_interval, roc_auc
from memjax.report import Section, plot_top_images
from memjax.train import CNNConfig
from memjax.train.simclr import encoder_model, train_simclrs

TITLE = "Memorization: SSLMem, LayerMem and UnitMem of SimCLR digit encoders"
SEED_VIEWS = 0
#: The encoder f and g share: a small native ResNet (conv16 -> pool -> residual block,
#: conv32 -> pool -> residual block, dense64, 32-d embedding), trained without BatchNorm.
ENCODER = CNNConfig((8, 8, 1), 32, channels=(16, 32), hidden=(64,), residual=True)
#: The same widths without residual blocks (bench/memorization_demo.py --encoder cnn).
CNN_ENCODER = CNNConfig((8, 8, 1), 32, channels=(16, 32), hidden=(64,))
# ~100 epochs of the 1,300 training examples: memorization grows with training (at 300
# steps the embedding's SSLMem AUROC for rare-class candidates was 0.74, at 1,000 0.85).
TRAINING = {"steps": 1000, "batch_size": 128, "temperature": 0.5, "learning_rate": 2e-3}
LAYERS = ("conv1", "conv2", "dense1", "embedding")
UNITMEM_VIEWS = 10  # the reference code's n_aug
CLIP_STEPS = 150  # ~15 epochs: with 400 the CLIPs memorise every pair and CLIPMem flattens


#: The views of the 8×8 digits: crops of at least half the area (smaller crops leave no
#: digit) and brightness/contrast jitter (grayscale: no saturation or hue), keyed by
#: ``view_key(SEED_VIEWS, example id, augmentation id)``.
digit_views = SmallImageView(min_scale=0.5, brightness=0.4, contrast=0.4, p=0.8)


def leave_out_split(images: np.ndarray, shared: np.ndarray, candidates: np.ndarray,
                    independent: np.ndarray, outlier: np.ndarray) -> dict[str, np.ndarray]:
    """The splits dict: ``keep`` [2, N] (row 0: f = shared + candidates; row 1: g = shared
    + independent), ``candidates`` [N] bool, ``outlier`` [N] bool, ``images``."""
    keep = np.zeros((2, len(images)), bool)
    keep[:, shared] = True
    keep[0, candidates] = True
    keep[1, independent] = True
    is_candidate = np.zeros(len(images), bool)
    is_candidate[candidates] = True
    return {"images": images, "keep": keep, "candidates": is_candidate, "outlier": outlier}


def memorization_splits(seed: int, n_shared: int = 1000, n_candidates: int = 300,
                        n_outliers: int = 30) -> dict[str, np.ndarray]:
    """Digits split into shared / candidate / independent sets; ``n_outliers`` random
    candidates get inverted intensities (1 − x): atypical examples.

    Returns:
      ``images`` [N, 8, 8, 1], ``keep`` [2, N] bool (row 0: f = shared + candidates;
      row 1: g = shared + independent), ``candidates`` [N] bool, ``outlier`` [N] bool.
    """
    data = digits().arrays
    images = data["image"].copy()
    order = np.random.default_rng(seed).permutation(len(images))
    shared = order[:n_shared]
    candidates = order[n_shared:n_shared + n_candidates]
    independent = order[n_shared + n_candidates:n_shared + 2 * n_candidates]
    outlier = np.zeros(len(images), bool)
    outlier[np.random.default_rng(seed + 1).choice(candidates, n_outliers, replace=False)] = 1
    images[outlier] = 1.0 - images[outlier]
    return leave_out_split(images, shared, candidates, independent, outlier)


def rare_class_splits(seed: int, n_shared: int = 1000, n_candidates: int = 300,
                      n_rare: int = 30, rare_class: int = 7) -> dict[str, np.ndarray]:
    """The other atypical setting: ``rare_class`` appears only among the candidates
    (``n_rare`` examples), so f sees 30 examples of it and g none. Same outputs as
    :func:`memorization_splits` (``outlier`` marks the rare-class candidates)."""
    data = digits().arrays
    images, labels = data["image"].copy(), data["label"]
    rng = np.random.default_rng(seed)
    common = rng.permutation(np.flatnonzero(labels != rare_class))
    rare = rng.permutation(np.flatnonzero(labels == rare_class))[:n_rare]
    n_common = n_candidates - n_rare
    shared = common[:n_shared]
    candidates = np.concatenate([common[n_shared:n_shared + n_common], rare])
    independent = common[n_shared + n_common:n_shared + n_common + n_candidates]
    outlier = np.zeros(len(images), bool)
    outlier[rare] = True
    return leave_out_split(images, shared, candidates, independent, outlier)


def train_encoders(splits: dict[str, np.ndarray], seed: int, encoder: CNNConfig = ENCODER):
    """(f params, g params, seconds): both SimCLR encoders in one vmapped program, from
    the same initialisation."""
    start = time.perf_counter()
    stacked = train_simclrs(jax.random.key(seed), splits["images"],
                            np.arange(len(splits["images"])), splits["keep"],
                            config=encoder, views_fn=digit_views, view_seed=SEED_VIEWS,
                            same_init=True, **TRAINING)
    seconds = time.perf_counter() - start
    return (jax.tree.map(lambda a: a[0], stacked), jax.tree.map(lambda a: a[1], stacked),
            seconds)




# Deterministic and expensive (two encoders trained for 1,000 steps): cached, so the audit
# and the tests that assert on the same setting train once per process.
@functools.lru_cache(maxsize=4)
def run_memorization_demo(seed: int = 0, n_aug: int = 5, setting: str = "inverted",
                          encoder: CNNConfig = ENCODER) -> dict:
    """Train f and g, then LayerMem (SSLMem per layer) on the candidates and UnitMem of f
    over its training set. ``setting``: "inverted" outliers or a "rare" class; ``encoder``:
    :data:`ENCODER` (the small ResNet) or e.g. :data:`CNN_ENCODER`. Cached: the arrays
    of the result are read-only and shared by every caller with the same arguments."""
    splits = (memorization_splits if setting == "inverted" else rare_class_splits)(seed)
    params_f, params_g, seconds = train_encoders(splits, seed, encoder)
    rows = np.flatnonzero(splits["candidates"])
    source = {"image": splits["images"][rows]}
    f, g = encoder_model(params_f, encoder), encoder_model(params_g, encoder)
    per_layer = layermem(f, g, source, views_fn=digit_views, seed=SEED_VIEWS, n_aug=n_aug,
                         layers=LAYERS, batch_size=64, progress=False)
    train_rows = np.flatnonzero(splits["keep"][0])
    units = unitmem(f, {"image": splits["images"][train_rows]}, layers=LAYERS,
                    n_aug=UNITMEM_VIEWS, batch_size=64, progress=False)
    return read_only({"splits": splits, "rows": rows, "train_rows": train_rows,
                       "layermem": per_layer, "unitmem": units, "seconds": seconds,
                       "n_aug": n_aug})


def unit_enrichment(result: dict, top: int = 10) -> dict[str, float]:
    """Are the highest-UnitMem units' argmax examples atypical more often than chance?

    Pools the ``top`` highest-UnitMem units of every layer; ``hits`` of their ``units``
    argmax examples are atypical, against a base rate = the atypical fraction of f's
    training set; ``p_value`` = binomial tail P(X >= hits) under that base rate;
    ``all_units_fraction``: the same fraction over every unit (context: bright outliers
    top many units whatever their UnitMem)."""
    from scipy.stats import binom

    atypical = result["splits"]["outlier"][result["train_rows"]]
    hits = units = 0
    for layer in result["unitmem"].layers.values():
        best = np.argsort(-layer.scores, kind="stable")[:top]
        hits += int(atypical[layer.argmax[best]].sum())
        units += len(best)
    base = float(atypical.mean())
    every = np.concatenate([atypical[layer.argmax] for layer in result["unitmem"].layers.values()])
    return {"hits": hits, "units": units, "fraction": hits / units, "base_rate": base,
            "p_value": float(binom.sf(hits - 1, units, base)),
            "all_units_fraction": float(every.mean())}


@functools.lru_cache(maxsize=4)
def clipmem_demo(seed: int = 0, n_miscaptioned: int = 30, steps: int = CLIP_STEPS,
                 n_aug: int = 5) -> dict:
    """CLIPMem (Wang et al. 2025) of candidate image–caption pairs, ``n_miscaptioned`` of
    them with the caption of a random pair of another class: tiny CLIPs f (shared +
    candidates) and g (shared + independent) trained in one vmapped program from the same
    initialisation.

    Returns:
      ``{"clipmem": [300], "miscaptioned": [300] bool, "images": [300, 8, 8, 1],
      "labels": [300], "caption_class": [300]}`` over the candidates.
    """

    from memjax.audit.data import digit_caption_pairs
    from memjax.memorization import clipmem
    from memjax.train.clip import ClipConfig, clip_model, train_clips

    images, captions, words, _ = digit_caption_pairs(seed)
    labels = digits().arrays["label"]
    caption_class = labels.copy()  # the digit each caption names (changed when swapped)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    shared, candidates, independent = order[:1000], order[1000:1300], order[1300:1600]
    miscaptioned = rng.choice(candidates, n_miscaptioned, replace=False)
    captions = captions.copy()
    for i in miscaptioned:
        donor = rng.choice(np.flatnonzero(labels != labels[i]))
        captions[i], caption_class[i] = captions[donor], labels[donor]
    keep = leave_out_split(images, shared, candidates, independent,
                           np.isin(np.arange(len(images)), miscaptioned))["keep"]
    config = ClipConfig(image_shape=images.shape[1:], vocab_size=len(words),
                        caption_length=captions.shape[1])
    stacked = train_clips(jax.random.key(seed), images, captions, keep, config=config,
                          steps=steps, learning_rate=2e-3, batch_size=128, same_init=True)
    f, g = (clip_model(jax.tree.map(lambda a, m=m: a[m], stacked), config) for m in (0, 1))
    result = clipmem(f, g, {"image": images[candidates], "text": captions[candidates]},
                     views_fn=digit_views, seed=SEED_VIEWS, n_aug=n_aug, batch_size=64,
                     progress=False)
    return read_only({"clipmem": result["raw"],
                       "miscaptioned": np.isin(candidates, miscaptioned),
                       "images": images[candidates], "labels": labels[candidates],
                       "caption_class": caption_class[candidates]})


def plot_memorization(result: dict, path: Path) -> None:
    """LayerMem / ΔLayerMem per layer (mean over candidates, atypical vs typical) and the
    UnitMem histogram of every layer, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer, units = result["layermem"], result["unitmem"]
    atypical = result["splits"]["outlier"][result["rows"]]
    names = list(per_layer["layers"])
    fig, axes = plt.subplots(1, 1 + len(units.layers), figsize=(4 + 3 * len(units.layers), 3))
    ax = axes[0]
    for mask, label in ((atypical, "outliers"), (~atypical, "other candidates")):
        ax.plot(names, per_layer["raw"][mask].mean(0), marker="o", label=f"LayerMem, {label}")
    ax.plot(names, per_layer["raw"].mean(0), marker="o", color="k", label="LayerMem, all")
    ax.plot(names, per_layer["delta_raw"].mean(0), marker="s", ls="--", label="ΔLayerMem, all")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title("SSLMem per layer (raw)", fontsize=9)
    ax.legend(fontsize=6)
    for ax, (name, layer) in zip(axes[1:], units.layers.items(), strict=True):
        ax.hist(layer.scores, bins=20, range=(0, 1))
        ax.set_title(f"UnitMem, {name} ({len(layer.scores)} units)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _auc_rows(name: str, scores: np.ndarray, positive: np.ndarray) -> list[tuple[str, object]]:
    low, high = auc_confidence_interval(scores, positive)
    # The interval's row names its AUC: metrics.json is keyed by row name, and a shared
    # name let the last section's interval stand for every AUC there.
    return [(name, roc_auc(scores, positive)), (f"  {name}: bootstrap 95% interval",
                                                f"[{low:.3f}, {high:.3f}]")]


def top_fraction(scores: np.ndarray, positive: np.ndarray) -> float:
    """Fraction of positives among the ``positive.sum()`` highest scores (precision at
    the number of positives)."""
    top = np.argsort(-scores, kind="stable")[:int(positive.sum())]
    return float(positive[top].mean())


def memorization_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """Train f and g (inverted-outlier setting), LayerMem on the candidates, UnitMem of f,
    and CLIPMem of two tiny CLIPs; one Section with ``memorization.png``,
    ``most_memorized.png`` and ``clipmem.png``."""
    result = run_memorization_demo(seed, setting="inverted")
    per_layer, units = result["layermem"], result["unitmem"]
    atypical = result["splits"]["outlier"][result["rows"]]
    last = per_layer["raw"][:, -1]
    gain = per_layer["raw"][:, -1] - per_layer["raw"][:, 0]
    plot_memorization(result, folder / "memorization.png")
    plot_top_images(result["splits"]["images"][result["rows"]], last,
                    lambda i: ("outlier " if atypical[i] else "") + f"{last[i]:+.2f}",
                    folder / "most_memorized.png",
                    "Highest SSLMem candidates (f trained with them, g without)")
    enrichment = unit_enrichment(result)
    clip = clipmem_demo(seed)
    bad = clip["miscaptioned"]
    plot_top_images(clip["images"], clip["clipmem"],
                    lambda i: f"{'MIS ' if bad[i] else ''}cap {clip['caption_class'][i]}",
                    folder / "clipmem.png",
                    "Highest CLIPMem pairs (MIS: mis-captioned; cap: the caption's digit)")
    metrics: list[tuple[str, object]] = [
        ("candidates (f trains on them, g does not)", len(result["rows"])),
        ("outlier candidates (inverted intensities)", int(atypical.sum())),
        ("training seconds (f and g, one vmapped program)", round(result["seconds"], 2)),
        ("views per example (SSLMem pairs / UnitMem views)",
         f"{result['n_aug']} / {UNITMEM_VIEWS}"),
    ]
    for j, name in enumerate(per_layer["layers"]):
        metrics.append((f"LayerMem {name} (mean raw SSLMem)",
                        float(per_layer["raw"][:, j].mean())))
    metrics.append((f"LayerMem {LAYERS[-1]} - {LAYERS[0]} (mean over candidates)",
                    float(gain.mean())))
    metrics += _auc_rows("SSLMem (last layer) AUROC outliers vs others", last, atypical)
    for name, layer in units.layers.items():
        metrics += [(f"UnitMem {name}: mean", layer.summary["mean"]),
                    (f"UnitMem {name}: fraction of units above 0.5",
                     layer.summary["frac_above_0.5"])]
    metrics += [
        ("top-10 UnitMem units per layer whose argmax example is an outlier",
         f"{enrichment['hits']} of {enrichment['units']} (base rate "
         f"{enrichment['base_rate']:.3f}, binomial p = {enrichment['p_value']:.1e})"),
        ("  the same over all units", enrichment["all_units_fraction"]),
        ("CLIP candidate pairs / mis-captioned", f"{len(bad)} / {int(bad.sum())}"),
    ]
    metrics += _auc_rows("CLIPMem AUROC mis-captioned vs others", clip["clipmem"], bad)
    metrics.append((f"mis-captioned among the {int(bad.sum())} highest CLIPMem",
                    top_fraction(clip["clipmem"], bad)))
    text = (
        "SSLMem (Wang et al. 2024, ICLR) compares an encoder f trained on a shared set plus "
        "candidates with an encoder g trained on the shared set plus independent examples "
        "(same initialisation, one vmapped program): a candidate's SSLMem is how much "
        "better f aligns two augmented views of it than g (distance of L2-normalised "
        "representations; 5 view pairs keyed by example id). LayerMem applies it to every "
        "layer's output from one forward pass per view; UnitMem (Wang et al. 2024, "
        "NeurIPS) scores each unit of f by how much its most activating training example "
        "stands out from the others (10 views). Setting: SimCLR encoders, a small ResNet "
        f"({ENCODER.describe()}: a residual block after each conv stage, no BatchNorm) "
        f"trained for {TRAINING['steps']} steps on digits; {int(atypical.sum())} of the "
        f"{len(result['rows'])} candidates are outliers (inverted intensities). CLIPMem "
        "(Wang et al. 2025) applies the design to tiny CLIPs on digit-caption pairs, 30 of "
        "300 candidate pairs carrying the caption of another digit. Inverted digits are "
        "bright images, so many units' argmax examples are outliers whatever their UnitMem; "
        "bench/README.md has a rare-class setting and several seeds."
    )
    return Section(TITLE, text, metrics,
                   figures=[("memorization.png", "LayerMem / ΔLayerMem per layer and the "
                             "UnitMem histogram per layer"),
                            ("most_memorized.png", "Candidates with the highest SSLMem"),
                            ("clipmem.png", "Pairs with the highest CLIPMem")])
