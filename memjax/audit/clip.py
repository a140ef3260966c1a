"""The audit's CLIP section: CSA, AEA and WSA against a tiny CLIP on digit image-caption pairs.

A tiny CLIP (:mod:`memjax.train.clip`, Radford et al. 2021) is trained on a random half of
the digit pairs (:func:`memjax.audit.data.digit_caption_pairs`: class word + random
attribute words the image does not show). The other half is split in two: one part joins
the members in the candidate pool (unknown membership to the attacker), the other is the
attacker's known non-members, which only WSA uses (Ko et al. 2023). Every attack is scored
on the same pool; the text-only control checks that captions alone cannot tell the pool
from the known non-members (they are drawn from the same distribution here).

A second section scores the pool with CLIPScore and RefCLIPScore (Hessel et al. 2021) on
the engine's embeddings (:func:`memjax.mia.clip_score`, as :func:`memjax.mia.clipscore`
computes it): right captions against the same captions with the class word
swapped, and the metric's bias on pairs the CLIP trained on.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from memjax.audit.data import digit_caption_pairs
from memjax.metrics import plot_roc, roc_auc, tpr_at_fpr
from memjax.mia import (
    aea,
    best_reference_cosine,
    clip_score,
    csa,
    ref_clip_score,
    text_only_baseline,
    wsa,
)
from memjax.mia import embed_pairs as engine_embed_pairs
from memjax.report import Section
from memjax.train.clip import ClipConfig, clip_embed, clip_model, train_clips

TITLE = "Membership inference: tiny CLIP on digit image\u2013caption pairs"
CLIPSCORE_TITLE = "CLIPScore of the tiny CLIP: right vs wrong captions, members vs not"
#: The target's recipe: minibatch Adam on the CLIP loss, about 10 epochs over the members
#: (898 pairs / 128 per step): a model that has seen each pair a few times, as large CLIPs
#: do, rather than one trained until it has memorised every pair.
TRAINING = {"steps": 70, "learning_rate": 2e-3, "batch_size": 128}
#: WSA as in Ko et al. 2023 (lam = 1.5, the reference attack MLP), with the elementwise
#: product features: the image-text alignment is a product of the two embeddings, which
#: a 15-epoch MLP on their concatenation barely represents (see memjax.mia.wsa).
WSA_OPTIONS = {"lam": 1.5, "classifier": "mlp", "features": "concat_product"}
#: AEA's views: the image and its one-pixel shifts (zero fill), cheap augmentations.
SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def split_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(member [N], known [N]) bool masks: the target trains on a random half (member);
    the other half is split evenly into pool non-members and the attacker's known
    non-members (known). The candidate pool is ``~known``: members + pool non-members."""
    order = np.random.default_rng(seed).permutation(n)
    member = np.zeros(n, bool)
    member[order[: n // 2]] = True
    known = np.zeros(n, bool)
    known[order[n // 2 + (n - n // 2) // 2:]] = True
    return member, known


def shift_image(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """[N, H, W, C] images shifted by (dy, dx) pixels, vacated pixels set to 0."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        images[:, max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


# One jitted function at module level, so repeated calls (AEA's views) reuse its compilation.
_embed_batch = jax.jit(jax.vmap(clip_embed, in_axes=(None, 0, 0)))


def embed_pairs(params, images: np.ndarray, captions: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb [N, D], text_emb [N, D]) of every pair under one model."""
    img, txt = _embed_batch(params, images, captions)
    return np.asarray(img), np.asarray(txt)


def train_target(images: np.ndarray, captions: np.ndarray, member: np.ndarray,
                 config: ClipConfig, seed: int):
    """The target CLIP's params (trained on ``member``) and the training seconds."""
    start = time.perf_counter()
    stacked = train_clips(jax.random.key(seed), images, captions, member[None],
                          config=config, **TRAINING)
    seconds = time.perf_counter() - start
    return jax.tree.map(lambda a: a[0], stacked), seconds


def clip_attacks(params, images: np.ndarray, captions: np.ndarray, known: np.ndarray, *,
                 seed: int) -> tuple[dict[str, np.ndarray], object, object]:
    """CSA, AEA (mean over :data:`SHIFTS`) and WSA scores over the pool ``~known``.

    Returns:
      ({attack: [pool] scores}, the WSA result, the text-only control's result).
    """
    pool = ~known
    img, txt = embed_pairs(params, images, captions)
    views = np.stack([embed_pairs(params, shift_image(images[pool], dy, dx),
                                  captions[pool])[0] for dy, dx in SHIFTS], axis=1)
    result = wsa(img[pool], txt[pool], img[known], txt[known], seed=seed, **WSA_OPTIONS)
    control = text_only_baseline(txt[pool], txt[known], seed=seed)
    attacks = {"CSA": np.asarray(csa(img[pool], txt[pool])),
               f"AEA ({len(SHIFTS)} shifted views)": np.asarray(aea(views, txt[pool])),
               "WSA": np.asarray(result.scores)}
    return attacks, result, control


@dataclasses.dataclass(frozen=True)
class WordIds:
    """The tiny CLIP's tokenizer: a caption's words -> their vocabulary ids (a callable
    text -> list[int], as :class:`memjax.data.TextTokens` takes)."""

    words: tuple[str, ...]

    def __call__(self, text: str) -> list[int]:
        return [self.words.index(word) for word in text.split()]


def write_shards(folder: Path, images: np.ndarray, texts: list[str], shards: int = 2
                 ) -> str:
    """The pairs as WebDataset shards (LAION's layout: ``key.png`` 8-bit greyscale +
    ``key.txt`` caption) in ``folder``; returns the ``wds:`` pattern."""
    import io
    import tarfile

    from PIL import Image

    per_shard = -(-len(images) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"digits-{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, min((s + 1) * per_shard, len(images))):
                png = io.BytesIO()
                Image.fromarray(to_8bit(images[i])[..., 0], mode="L").save(png, "PNG")
                for name, data in ((f"{i:05d}.png", png.getvalue()),
                                   (f"{i:05d}.txt", texts[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{folder}/digits-{{000..{shards - 1:03d}}}.tar"


def to_8bit(images: np.ndarray) -> np.ndarray:
    """[0, 1] pixels rounded to 8 bits, as a PNG file holds them (uint8)."""
    return np.round(np.asarray(images) * 255).astype(np.uint8)


def _pair_embeddings(params, example):
    image, text = clip_embed(params, example["image"][..., :1], example["input_ids"])
    return {"image": image, "text": text}


def csa_from_shards(params, images: np.ndarray, texts: list[str], words: list[str],
                    caption_length: int, *, progress: bool = False) -> np.ndarray:
    """CSA [N] of the pairs written to WebDataset shards and read back the way a user's
    data is (``open_source("wds:...")``: tar index, PNG decoding, captions tokenised by
    :class:`WordIds`), scored by the engine."""
    from memjax.data import open_source
    from memjax.engine import score

    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), images, texts)
        source = open_source(pattern, tokenizer=WordIds(tuple(words)),
                             max_length=caption_length)
        result = score(_pair_embeddings, params, source, batch_size=64, progress=progress)
    return np.asarray(csa(result["image"], result["text"]), np.float64)


def swap_class_words(captions: np.ndarray, seed: int) -> np.ndarray:
    """The captions with each class word (column 0, ids 1..10) replaced by a different class
    word drawn at random (seeded); the attribute words are kept."""
    shift = np.random.default_rng(seed).integers(1, 10, len(captions))
    out = captions.copy()
    out[:, 0] = (captions[:, 0] - 1 + shift) % 10 + 1
    return out


#: RefCLIPScore's references in the audit: the right captions of this many other pool pairs
#: of the same class (same class word, other attribute words).
N_REFERENCES = 2


def same_class_partners(captions: np.ndarray, k: int = N_REFERENCES) -> np.ndarray:
    """[N, k] rows of the next ``k`` other pairs (cyclically) with the same class word."""
    partners = np.empty((len(captions), k), np.int64)
    for word in np.unique(captions[:, 0]):
        rows = np.flatnonzero(captions[:, 0] == word)
        for shift in range(1, k + 1):
            partners[rows, shift - 1] = np.roll(rows, -shift)
    return partners


def clipscore_rows(params, config: ClipConfig, images: np.ndarray, captions: np.ndarray,
                   is_member: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """CLIPScore (w = 2.5) of each pair with its caption (``right``) and with its class word
    swapped (``wrong``), from embeddings through the engine (as :func:`memjax.mia.clipscore`
    computes it); the captions are word ids (no prefix). With ``ref_`` the RefCLIPScores,
    each pair's references being :func:`same_class_partners`' right captions."""
    model = clip_model(params, config)
    emb = {name: engine_embed_pairs(model, {"image": images, "text": ids})
           for name, ids in (("right", captions), ("wrong", swap_class_words(captions, seed)))}
    candidate_of_ref = np.repeat(np.arange(len(captions)), N_REFERENCES)
    ref_of = same_class_partners(captions).reshape(-1)
    out = {"member": is_member}
    for name, pair in emb.items():
        out[name] = np.asarray(clip_score(pair["image_emb"], pair["text_emb"]))
        best = best_reference_cosine(pair["text_emb"], emb["right"]["text_emb"],
                                     candidate_of_ref, ref_of)
        out[f"ref_{name}"] = np.asarray(ref_clip_score(out[name], best))
    return out


def clipscore_section(scores: dict[str, np.ndarray]) -> Section:
    """The CLIPScore findings: right vs wrong captions, members vs non-members."""
    right, wrong, member = scores["right"], scores["wrong"], scores["member"]
    both = np.concatenate([right, wrong])
    is_right = np.arange(len(both)) < len(right)
    metrics = [("pairs", int(len(right))),
               ("mean CLIPScore, right captions", float(right.mean())),
               ("mean CLIPScore, class word swapped", float(wrong.mean())),
               ("AUC right vs swapped captions", roc_auc(both, is_right)),
               ("mean CLIPScore, training pairs (members)", float(right[member].mean())),
               ("mean CLIPScore, unseen pairs", float(right[~member].mean())),
               ("membership AUC of CLIPScore", roc_auc(right, member)),
               (f"AUC right vs swapped captions, RefCLIPScore ({N_REFERENCES} references per "
                "pair)", roc_auc(np.concatenate([scores["ref_right"], scores["ref_wrong"]]),
                                 is_right))]
    text = (
        "CLIPScore (Hessel et al. 2021, EMNLP: 2.5 · max(cos(image, caption), 0), the image-"
        "text quality score ToxicBench and text-to-image evaluations report) of the CSA pool "
        "under the same tiny CLIP, memjax.mia.clip_score of the engine's embeddings (the "
        "captions are word ids, so no 'A photo depicts' prefix). It ranks each image's right "
        "caption above the same caption with its class word swapped, and it is higher on the "
        "pairs the CLIP trained on than on unseen pairs of the same distribution: a CLIPScore "
        "computed with a model that saw the evaluated pairs is inflated, which is the "
        "membership signal CSA reads (CLIPScore is CSA scaled and clipped at 0). RefCLIPScore "
        "(the paper's Eq. 2: the harmonic mean of CLIPScore and the caption's best cosine to "
        f"reference captions) with the captions of {N_REFERENCES} other pairs of the same "
        "class as references separates right from swapped captions further: the references "
        "carry the class word the swapped caption lost.")
    return Section(CLIPSCORE_TITLE, text, metrics)


def clip_section(folder: Path, *, seed: int = 0, progress: bool = False) -> list[Section]:
    """Train the tiny CLIP, run CSA / AEA / WSA and the text-only control (one Section with
    ``folder / "roc_clip.png"``), then CLIPScore on the same pool (a second Section)."""
    def say(message: str) -> None:
        if progress:
            print(f"[clip] {message}", file=sys.stderr, flush=True)

    images, captions, words, texts = digit_caption_pairs(seed)
    member, known = split_pairs(len(images), seed)
    config = ClipConfig(image_shape=images.shape[1:], vocab_size=len(words),
                        caption_length=captions.shape[1])
    say(f"training a tiny CLIP on {int(member.sum())} pairs")
    params, train_seconds = train_target(images, captions, member, config, seed)
    say("embedding and attacking")
    attacks, result, control = clip_attacks(params, images, captions, known, seed=seed)
    is_member = member[~known]
    say("the pool again, from WebDataset shards on disk")
    pool_texts = [t for t, k in zip(texts, known, strict=True) if not k]
    from_files = csa_from_shards(params, images[~known], pool_texts, words,
                                 captions.shape[1], progress=progress)
    same_pixels = np.asarray(csa(*embed_pairs(params, to_8bit(images[~known]) / np.float32(255),
                                              captions[~known])), np.float64)

    plot_roc({name: (s, is_member) for name, s in attacks.items()}, folder / "roc_clip.png",
             title="Tiny CLIP on digit pairs: CSA / AEA / WSA")
    metrics: list[tuple[str, object]] = [
        ("training seconds (target CLIP, incl. compilation)", round(train_seconds, 2)),
        ("pool members", int(is_member.sum())),
        ("pool non-members", int((~is_member).sum())),
        ("known non-members (WSA only)", int(known.sum())),
        ("WSA pseudo-members (pool CSA >= tau)", result.n_pseudo),
        ("WSA threshold tau", round(result.tau, 4)),
    ]
    for name, scores in attacks.items():
        metrics += [(f"{name} AUC", roc_auc(scores, is_member)),
                    (f"{name} TPR at 1% FPR", tpr_at_fpr(scores, is_member, 0.01)),
                    (f"{name} TPR at 0.1% FPR", tpr_at_fpr(scores, is_member, 0.001))]
    metrics.append(("text-only control AUC (pool vs known non-members; ~0.5 = no shift)",
                    control.auc))
    metrics += [("CSA AUC, pool read back from WebDataset shards (8-bit PNG + caption text)",
                 roc_auc(from_files, is_member)),
                ("max |CSA from shards - CSA of the same 8-bit pixels in memory|",
                 float(np.abs(from_files - same_pixels).max()))]
    steps, batch = TRAINING["steps"], TRAINING["batch_size"]
    text = (
        f"A tiny CLIP (Radford et al. 2021: MLP image tower on 8x8 digits, bag-of-words text "
        f"tower, {config.embed_dim}-d shared space, symmetric InfoNCE, {steps} Adam steps of "
        f"{batch} in-batch pairs) is trained on a random half of the digits, each captioned "
        "with its class word and three random attribute words the image does not show, as "
        "real alt-text carries. A model can align an image with those words only by training "
        "on the pair, which is what the attacks of Ko et al. 2023 (ICCV, 'Practical "
        "Membership Inference Attacks Against Large-Scale Multi-Modal Models') detect. CSA "
        "scores a pair by its image-text cosine; AEA averages it over one-pixel shifts of the "
        "image; WSA sets a threshold mean + 1.5 std on the cosines of known non-members, "
        "pseudo-labels the pool, and trains the reference attack MLP on the normalised "
        "embeddings and their elementwise product. All attacks are scored on the same pool "
        "(members and unseen pairs); the known non-members are disjoint from it. The "
        "text-only control trains the same classifier on caption embeddings alone: near 0.5 "
        "means WSA's gain is not distribution shift between the sets (CLIP-MIA-Bench's "
        "caveat). The last rows take the path of a user's data: the pool written as "
        "WebDataset shards (LAION's layout, key.png + key.txt), read back by memjax.data "
        "(tar index, random access, PNG decoding, captions tokenised) and scored by the "
        "engine: the same CSA as the same 8-bit pixels in memory."
    )
    say("CLIPScore of the pool")
    scores = clipscore_rows(params, config, images[~known], captions[~known], is_member, seed)
    return [Section(TITLE, text, metrics,
                    figures=[("roc_clip.png", "Log-log ROC of CSA, AEA and WSA on the pool")]),
            clipscore_section(scores)]
