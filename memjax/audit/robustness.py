"""The audit's robustness section: embedding-space and downstream PGD on a digits encoder.

Kowalczuk, Dubiński, Boenisch and Dziedzic, "Benchmarking Robust Self-Supervised Learning
Across Diverse Downstream Tasks" (2024): an encoder is attacked in its embedding space
(maximise ||f(x + δ) − f(x)||₂) and through a linear probe on its embeddings (maximise
the probe's cross-entropy), with L∞ PGD of radius ε in pixel units. Here the encoder is
the penultimate layer (``dense2``) of a small memjax.train MLP trained on a random half of
the real 8×8 digits (pixels in [0, 1]); the probe is a logistic regression on the training
half's embeddings; the other half is attacked at ε = 0, 1/255, ..., 32/255.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from memjax.audit import member_mask
from memjax.audit.data import read_only
from memjax.data import digits
from memjax.models import Model
from memjax.report import Section
from memjax.robustness import encode_images, encoder_robustness, fit_linear_probe, image_encoder
from memjax.train import MLPConfig, fit_classifier, save_model

TITLE = "Adversarial robustness: PGD on a digits encoder and its linear probe"
#: The encoder: 64 pixels -> 64 -> 32 (the representation, tap ``dense2``) -> 10 classes.
ENCODER = MLPConfig((8, 8, 1), 10, hidden=(64, 32))
LAYER = "dense2"
TRAINING = {"steps": 300, "learning_rate": 1e-3}
#: Radii in [0, 1] pixel units (k / 255 of an 8-bit image).
EPSILON_STEPS = (0, 1, 2, 4, 8, 16, 32)
EPSILONS = tuple(k / 255 for k in EPSILON_STEPS)
PGD_STEPS = 10
PROBE_L2 = 1e-3


@functools.lru_cache(maxsize=4)
def robustness_demo(seed: int = 0) -> dict:
    """Train the encoder and probe on a random half of the digits, attack the other half.

    Returns (read-only): ``params``, ``head``, the held-out ``test`` arrays, ``result`` of
    :func:`memjax.robustness.encoder_robustness`, ``train_accuracy`` of the probe and the
    seconds spent training and attacking.
    """
    source = digits()
    data = source.read(np.arange(len(source)))
    train = member_mask(len(source), seed)
    start = time.perf_counter()
    params = fit_classifier(jax.random.key(seed), jnp.asarray(data["image"]),
                            jnp.asarray(data["label"]), jnp.asarray(train, jnp.float32),
                            config=ENCODER, **TRAINING)
    model = Model.from_classifier(jax.tree.map(np.asarray, params), ENCODER)
    encoder = image_encoder(model, layer=LAYER, normalize=None)
    fit = {k: v[train] for k, v in data.items()}
    embeddings = encode_images(encoder, model.params, fit, batch_size=256, progress=False)
    head = fit_linear_probe(embeddings, fit["label"], num_classes=10, l2=PROBE_L2)
    train_accuracy = float(np.mean(np.argmax(embeddings @ head["weight"] + head["bias"], 1)
                                   == fit["label"]))
    train_seconds = time.perf_counter() - start
    test = {k: v[~train] for k, v in data.items()}
    start = time.perf_counter()
    result = encoder_robustness(model, test, epsilons=EPSILONS, steps=PGD_STEPS, head=head,
                                seed=seed, batch_size=256, layer=LAYER, normalize=None,
                                progress=False)
    return read_only({"params": model.params, "head": head, "test": test, "result": result,
                      "train_accuracy": train_accuracy, "train_seconds": train_seconds,
                      "attack_seconds": time.perf_counter() - start})


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(EPSILON_STEPS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(x, result["robust_accuracy"], "o-")
    left.set(xlabel="ε (× 1/255)", ylabel="accuracy under downstream PGD",
             title="Linear probe: robust accuracy", xscale="symlog", ylim=(0, 1.02))
    right.plot(x, result["mean_shift_l2"], "o-", color="C1")
    right.set(xlabel="ε (× 1/255)", ylabel="mean ||f(x+δ) − f(x)||₂",
              title="Embedding-space PGD: shift", xscale="symlog")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """The section: the table of robust accuracy and embedding shift per ε, the figure and
    the encoder, probe and held-out digits for ``memjax robustness`` to reproduce it."""
    demo = robustness_demo(seed)
    result = demo["result"]
    save_model(folder / "robustness_encoder", demo["params"], ENCODER)
    np.savez(folder / "robustness_head.npz", **demo["head"])
    np.savez(folder / "robustness_digits.npz", **demo["test"])
    _plot(result, folder / "robustness.png")
    metrics = [("digits attacked (held-out half)", len(result["id"])),
               ("PGD steps (α = 2.5 ε / steps)", PGD_STEPS),
               ("probe accuracy on its training half", demo["train_accuracy"]),
               ("training seconds (encoder + probe)", round(demo["train_seconds"], 1)),
               ("attack seconds (all ε)", round(demo["attack_seconds"], 1))]
    for k, accuracy, shift in zip(EPSILON_STEPS, result["robust_accuracy"],
                                  result["mean_shift_l2"], strict=True):
        metrics += [(f"robust accuracy, ε = {k}/255", float(accuracy)),
                    (f"mean embedding shift (L2), ε = {k}/255", float(shift))]
    text = (f"Kowalczuk et al. (2024) attack vision encoders in their embedding space and "
            f"through downstream heads. The encoder here is the 32-d penultimate layer of a "
            f"small MLP trained ({TRAINING['steps']} Adam steps) on a random half of the real "
            "8×8 digits; a logistic-regression probe is fitted on that half's embeddings. "
            "Every held-out digit is attacked with L∞ PGD in [0, 1] pixel units (random start "
            "keyed by the digit's id, 10 signed-gradient steps, projected onto the ball and "
            "onto [0, 1]): embedding-space PGD maximises the L2 shift of the representation, "
            "downstream PGD the probe's cross-entropy. Robust accuracy falls and the shift "
            "grows with ε. Reproduce: memjax robustness --model robustness_encoder --data "
            "robustness_digits.npz --layer dense2 --head robustness_head.npz --normalize none "
            "--epsilon 0 1/255 2/255 4/255 8/255 16/255 32/255.")
    return Section(TITLE, text, metrics,
                   figures=[("robustness.png", "Robust accuracy and embedding shift vs ε")],
                   files=[("robustness_encoder", "the digits encoder (memjax robustness "
                           "--model, --layer dense2)"),
                          ("robustness_head.npz", "the linear probe (--head)"),
                          ("robustness_digits.npz", "the attacked held-out digits (--data)")])
