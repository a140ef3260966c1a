"""Demo data of the audit: digit image-caption pairs for the tiny CLIPs.

The digits themselves are a bundled data source (:func:`memjax.data.digits`); this
module builds what only the demonstrations need on top of them.
"""

from __future__ import annotations

import jax
import numpy as np

from memjax.data import digits
from memjax.errors import InputError


def read_only(result: dict) -> dict:
    """Freeze the NumPy arrays of a cached demo result (nested dicts included), so no
    caller can change another's; returns ``result``."""
    for leaf in jax.tree.leaves(result):
        if isinstance(leaf, np.ndarray):
            leaf.setflags(write=False)
    return result


CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
#: Attribute words of the digit captions: things the 8x8 image does not show (where or by
#: whom it was written, on what, in which colour), like real alt-text.
ATTRIBUTE_WORDS = tuple("""
red orange yellow green blue purple pink brown black white grey golden silver crimson
teal violet amber ivory wooden paper glass metal stone cotton velvet plastic marble
kitchen garden office school library harbour forest desert island mountain river
bridge station market museum castle village city tram bicycle boat train kite lantern
umbrella letter postcard notebook receipt envelope ticket diary morning evening winter
summer autumn spring rainy sunny windy foggy quiet noisy ancient modern tiny giant
happy sleepy brave shy clever lucky fancy plain smooth rough shiny dusty fresh
""".split())


def digit_caption_pairs(seed: int = 0, n_attributes: int = 3
                        ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Real digit images paired with captions: class word + random attribute words.

    Each caption is the digit's class name ("zero".."nine") followed by ``n_attributes``
    distinct words drawn at random (seeded) from :data:`ATTRIBUTE_WORDS`. The attributes are
    not determined by the image, like real alt-text ("a seven, on a receipt, in the
    harbour"): a model can align an image with its attribute words only by having trained
    on that very pair, so membership shows up in the pair's image-text cosine -- the
    setting of Ko et al. 2023's attacks. The class word gives the model something
    generalisable to learn, so non-members are still roughly aligned.

    Returns:
      (images float32 [N, 8, 8, 1] in [0, 1] (sklearn digits, N = 1797),
      captions int32 [N, 1 + n_attributes] token ids (0 = padding, unused here),
      words: the vocabulary, ``words[id]`` (``words[0]`` = "<pad>"),
      texts: the captions as strings).
    """
    if not 0 <= n_attributes <= len(ATTRIBUTE_WORDS):
        raise InputError(f"n_attributes={n_attributes}: expected 0..{len(ATTRIBUTE_WORDS)}")
    source = digits()
    images, labels = source.arrays["image"], source.arrays["label"]
    words = ["<pad>", *CLASS_WORDS, *ATTRIBUTE_WORDS]
    first_attribute = 1 + len(CLASS_WORDS)
    rng = np.random.default_rng(seed)
    attrs = np.stack([rng.choice(len(ATTRIBUTE_WORDS), n_attributes, replace=False)
                      for _ in range(len(labels))]).reshape(len(labels), n_attributes)
    captions = np.concatenate([labels[:, None] + 1, attrs + first_attribute], axis=1)
    texts = [" ".join(words[i] for i in row) for row in captions]
    return images, captions.astype(np.int32), words, texts
