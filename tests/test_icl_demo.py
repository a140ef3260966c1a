"""The in-context-learning membership demonstration (memjax.audit.icl), asserted with
margins: the single-prompt attack beats chance and the ensemble of 16 prompts with
disjoint demonstrations is clearly weaker (Duan et al. 2023).

Seed 0 is tested; the values beside each assertion were measured on seeds 0-2 under the
tests' 8 CPU devices (bench/icl_demo.py --devices 8, bench/results/icl_demo.json), and
every bound holds for each of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from memjax.audit.icl import (
    LABEL_WORDS,
    TEMPLATE,
    HashedWords,
    K,
    icl_demo,
    icl_section,
    prompt_ids,
)
from memjax.mia import build_prompt


@pytest.fixture(scope="module")
def demo():
    return icl_demo(0)


def test_single_prompt_attack_beats_chance(demo):
    assert demo["metrics"]["auc_single_prompt"] > 0.6  # 0.682/0.704/0.631


def test_ensemble_weakens_the_attack(demo):
    m = demo["metrics"]
    assert m["auc_ensemble"] < 0.58  # 0.513/0.495/0.542
    assert m["auc_single_prompt"] - m["auc_ensemble"] > 0.05  # 0.169/0.209/0.089


def test_members_are_the_demonstrations(demo):
    assert demo["is_member"].sum() == 64
    assert not demo["is_member"].flags.writeable  # cached result is read-only


def test_training_prompts_are_the_template_tokens(rng):
    """The training ids equal the tokenizer on the template's text of the same prompt."""
    words = ["alpha beta gamma", "return the value", "open a file", "make it so",
             "parse this text"]
    tokenizer = HashedWords()
    word_ids = np.asarray([tokenizer(w) for w in words], np.int32)
    labels = rng.integers(0, len(LABEL_WORDS), len(words))
    demos = rng.permutation(len(words))[None, :K]
    query = demos[:, 1]
    ids, weight = prompt_ids(word_ids, labels, demos, query, np.arange(4)[None, :])
    text = (build_prompt(TEMPLATE, [words[i] for i in demos[0]], labels[demos[0]])
            + TEMPLATE.query.format(text=words[query[0]])
            + TEMPLATE.answer.format(label=LABEL_WORDS[labels[query[0]]]))
    assert ids[0].tolist() == tokenizer(text)
    assert weight[0].sum() == K + 3  # K demonstration labels, query words 2-3, its label


def test_section(demo, tmp_path):
    section = icl_section(tmp_path)
    assert (tmp_path / "icl_roc.png").is_file()
    assert dict(section.metrics)["AUC, single prompt"] == demo["metrics"]["auc_single_prompt"]
