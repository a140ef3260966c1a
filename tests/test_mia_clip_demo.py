"""Membership inference on a real CLIP-style model: a tiny CLIP trained on half of the
digit image-caption pairs; CSA detects members, WSA at least matches CSA at 1% FPR
(averaged over five targets trained at once with vmap)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from memjax.audit.clip import (
    TRAINING,
    WSA_OPTIONS,
    clipscore_rows,
    clipscore_section,
    embed_pairs,
    split_pairs,
)
from memjax.audit.data import digit_caption_pairs
from memjax.errors import InputError
from memjax.metrics import auc_confidence_interval, roc_auc, tpr_at_fpr
from memjax.mia._clip import csa, wsa
from memjax.train.clip import ClipConfig, fit_clip, train_clips

SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def pairs():
    images, captions, words, _ = digit_caption_pairs(0)
    config = ClipConfig(image_shape=images.shape[1:], vocab_size=len(words),
                        caption_length=captions.shape[1])
    return images, captions, config


@pytest.fixture(scope="module")
def trained(pairs):
    """Five tiny CLIPs, each trained on its own random half of the pairs (split seeds 0-4),
    all five in one vmapped program; with their (member, known) splits."""
    images, captions, config = pairs
    splits = [split_pairs(len(images), seed) for seed in SEEDS]
    member = np.stack([m for m, _ in splits])
    stacked = train_clips(jax.random.key(0), images, captions, member, config=config,
                          **TRAINING)
    return [(jax.tree.map(lambda a, m=m: a[m], stacked), split)
            for m, split in enumerate(splits)]


@pytest.fixture(scope="module")
def attacked(pairs, trained):
    """CSA and WSA scores over the candidate pools of five tiny CLIPs, each trained on its
    own random half of the pairs (split seeds 0-4), all five in one vmapped program.

    Each pool is the model's members plus half of the other pairs; WSA's known non-members
    are the remaining pairs, disjoint from the pool.
    """
    images, captions, config = pairs
    results = []
    for m, (params, (is_member, known)) in enumerate(trained):
        img, txt = embed_pairs(params, images, captions)
        pool = ~known
        scores = {"CSA": np.asarray(csa(img[pool], txt[pool])),
                  "WSA": np.asarray(wsa(img[pool], txt[pool], img[known], txt[known],
                                        seed=SEEDS[m], **WSA_OPTIONS).scores)}
        results.append((scores, is_member[pool]))
    return results


def test_csa_detects_training_pairs(attacked):
    for scores, is_member in attacked:
        low, high = auc_confidence_interval(scores["CSA"], is_member)
        assert roc_auc(scores["CSA"], is_member) > 0.5 and low > 0.5, (low, high)


def test_wsa_matches_or_beats_csa_at_low_fpr(attacked):
    # Averaged over five independently trained targets: with ~450 pool non-members, TPR at
    # 1% FPR rests on about 4 false positives, so one model's comparison is noisy (WSA won
    # on 4 of 5 single models when this recipe was set).
    per_model = {name: [tpr_at_fpr(scores[name], is_member, 0.01)
                        for scores, is_member in attacked] for name in ("CSA", "WSA")}
    print("TPR@1%FPR per model:", {k: np.round(v, 3).tolist() for k, v in per_model.items()},
          "AUC CSA:", [round(roc_auc(s["CSA"], m), 3) for s, m in attacked])
    tpr = {name: np.mean(values) for name, values in per_model.items()}
    assert tpr["WSA"] >= tpr["CSA"], tpr


def test_clipscore_prefers_right_captions_and_is_inflated_on_training_pairs(pairs, trained):
    """The audit's CLIPScore section on the five targets: right captions outscore the same
    captions with the class word swapped, and training pairs outscore unseen ones;
    RefCLIPScore with same-class references separates right from swapped further."""
    images, captions, config = pairs
    found = []
    for params, (is_member, known) in trained:
        scores = clipscore_rows(params, config, images[~known], captions[~known],
                                is_member[~known], seed=0)
        section = dict(clipscore_section(scores).metrics)
        found.append((section["AUC right vs swapped captions"],
                      section["mean CLIPScore, training pairs (members)"]
                      - section["mean CLIPScore, unseen pairs"],
                      section["AUC right vs swapped captions, RefCLIPScore (2 references "
                              "per pair)"]))
    print("AUC right vs swapped, member - unseen mean CLIPScore, RefCLIPScore AUC:",
          np.round(found, 4).tolist())
    auc, gap, ref_auc = np.asarray(found).T
    # Measured over the five targets (8 devices): AUC 0.980-0.984, gap 0.267-0.336 (of a
    # scale 0-2.5), RefCLIPScore AUC 0.990-0.994, above CLIPScore's by 0.0084-0.0110 on
    # every target; the bounds sit below the worst target.
    assert auc.min() > 0.95 and gap.min() > 0.2, found
    assert ref_auc.min() > 0.985 and (ref_auc - auc).min() > 0.005, found


def test_train_clips_equals_separate_fits(pairs):
    images, captions, config = pairs
    images, captions = images[:96], captions[:96]
    keep = np.random.default_rng(1).random((2, 96)) < 0.5
    kwargs = {"config": config, "steps": 4, "learning_rate": 2e-3, "batch_size": 32}
    stacked = train_clips(jax.random.key(3), images, captions, keep, **kwargs)
    fit = jax.jit(functools.partial(fit_clip, **kwargs))
    for m, key in enumerate(jax.random.split(jax.random.key(3), 2)):
        single = fit(key, images, captions, keep[m])
        jax.tree.map(lambda a, b, m=m: np.testing.assert_allclose(a[m], b, atol=1e-5),
                     stacked, single)


@pytest.mark.parametrize("keep", [np.ones((1, 10), np.int32), np.ones((1, 9), bool),
                                  np.ones(10, bool)])
def test_train_clips_rejects_bad_keep(pairs, keep):
    images, captions, config = pairs
    with pytest.raises(InputError):
        train_clips(jax.random.key(0), images[:10], captions[:10], keep, config=config,
                    steps=1, batch_size=4)

