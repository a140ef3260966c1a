"""Membership and dataset inference on real data: a tiny GPT-2 trained on real texts.

One module-scoped model (memjax.audit.text): a byte-level GPT-2 trained on 500 random
first paragraphs of standard-library docstrings; the rest of the corpus are non-members.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from memjax.audit.text import (
    MEMBERS,
    TITLE,
    demo_section,
    di_features,
    run_dataset_inference,
    run_text_demo,
    text_attacks,
)
from memjax.errors import InputError
from memjax.metrics import auc_confidence_interval, roc_auc
from memjax.models.gpt2 import GPT2Config
from memjax.train.lm import byte_tokens, fit_gpt2, train_gpt2s


@pytest.fixture(scope="module")
def text_demo():
    """The audit's text demo at seed 0: texts, is_member, params, engine signals."""
    return run_text_demo(seed=0)


def test_loss_and_min_k_plus_plus_detect_training_texts(text_demo):
    attacks = text_attacks(text_demo["signals"], text_demo["texts"])
    is_member = text_demo["is_member"]
    for name in ("LOSS", "Min-K%++ (k=0.2)"):
        low, high = auc_confidence_interval(attacks[name], is_member)
        assert roc_auc(attacks[name], is_member) > 0.5 and low > 0.5, (name, low, high)


def test_dataset_inference_on_real_mia_features(text_demo):
    """Maini et al. 2024: members vs non-members is detected (p < 0.01); two halves of the
    non-members are not (p > 0.05), with DI seed 0 fixed in advance."""
    is_member = text_demo["is_member"]
    features, names = di_features(text_demo["signals"], text_demo["texts"])
    assert is_member.sum() == MEMBERS >= 500 and (~is_member).sum() >= 500
    assert features.shape == (len(is_member), len(names)) and np.isfinite(features).all()
    members_vs_rest, false_positive = run_dataset_inference(features, is_member, seed=0)
    assert members_vs_rest.p_value < 0.01, members_vs_rest.p_value
    assert false_positive.p_value > 0.05, false_positive.p_value


def test_train_gpt2s_equals_separate_fits():
    texts = ["first text of the tiny corpus", "second one, a bit longer than that",
             "third", "a fourth text for the fourth row"]
    ids, mask = byte_tokens(texts, 16)
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    keep = np.array([[True, False, True, True], [False, True, True, False]])
    stacked = train_gpt2s(jax.random.key(3), ids, mask, keep, config=config, steps=3)
    fit = jax.jit(functools.partial(fit_gpt2, config=config, steps=3))
    for m, key in enumerate(jax.random.split(jax.random.key(3), 2)):
        alone = fit(key, ids, mask, keep[m])
        jax.tree.map(lambda a, b, m=m: np.testing.assert_allclose(a[m], b, atol=1e-5),
                     stacked, alone)
    with pytest.raises(InputError, match="boolean"):
        train_gpt2s(jax.random.key(0), ids, mask, keep.astype(np.int32), config=config,
                    steps=1)


def _sklearn_tpr_at(scores, is_member, fpr: float) -> float:
    """The largest TPR among ROC points with FPR <= fpr, from scikit-learn's full curve."""
    from sklearn.metrics import roc_curve

    curve_fpr, curve_tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    return float(curve_tpr[curve_fpr <= fpr].max())


def _auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC estimate."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return float(np.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2)
                          + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)))


def test_text_section_reports_attacks_and_dataset_inference(text_demo, tmp_path):
    from sklearn.metrics import roc_auc_score

    section = demo_section(tmp_path, text_demo, seed=0)
    metrics = dict(section.metrics)
    assert section.title == TITLE and metrics["texts (standard-library docstrings)"] > 1000
    is_member = text_demo["is_member"]
    attacks = text_attacks(text_demo["signals"], text_demo["texts"])
    for attack in ("LOSS", "Min-K% (k=0.2)", "Min-K%++ (k=0.2)", "zlib"):
        assert 0.0 <= metrics[f"{attack} TPR@0.1%FPR"] <= metrics[f"{attack} TPR@1%FPR"]
        assert 0.0 <= metrics[f"{attack} AUC"] <= 1.0
        # The reported numbers are scikit-learn's on the same scores (ties: sklearn's
        # roc_curve moves tied scores together, as memjax.metrics does).
        scores = attacks[attack]
        auc = metrics[f"{attack} AUC"]
        assert auc == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
        for fpr, name in ((0.01, "1%"), (0.001, "0.1%")):
            assert metrics[f"{attack} TPR@{name}FPR"] == pytest.approx(
                _sklearn_tpr_at(scores, is_member, fpr), abs=1e-12)
        # The finding: every attack tells the training texts apart, by more than three
        # standard errors of the AUC (seed 0: AUC 0.56 (zlib) to 0.62 (Min-K%++), SE ~0.014).
        se = _auc_standard_error(auc, int(is_member.sum()), int((~is_member).sum()))
        assert auc > 0.5 + 3 * se, (attack, auc, se)
    for file, _ in section.figures:
        assert (tmp_path / file).stat().st_size > 0


def test_byte_tokenizer_gives_byte_tokens(tmp_path):
    """The saved Hugging Face tokenizer's ids and mask are :func:`byte_tokens`' (multi-byte
    characters, a cut inside one, empty text, padding)."""
    from memjax.data.text import load_tokenizer
    from memjax.train.lm import save_byte_tokenizer

    tokenizer = load_tokenizer(save_byte_tokenizer(tmp_path))
    texts = ["héllo wörld\n\ttabs", "x" * 60, "", "日本語 text", "a\u00a0b\u00ffc"]
    encoded = tokenizer(texts, max_length=12, truncation=True, padding="max_length")
    ids, mask = byte_tokens(texts, 12)
    np.testing.assert_array_equal(np.asarray(encoded["input_ids"]), ids)
    np.testing.assert_array_equal(np.asarray(encoded["attention_mask"]), mask)


def test_bench_section_runs_the_grid_on_saved_gpt2_and_llama(text_demo, tmp_path):
    """The audit's mia-bench section: the GPT-2 cell, scored from the saved folder through
    its byte tokenizer and JSONL files, has the in-memory demo's token signals; the table
    is the attacks on the stored signals; the grid's TOML reruns from the CLI to the same
    table (from the stores); the Llama trained on the members is detected."""
    import tomllib

    from memjax.audit.llm_bench import bench_section
    from memjax.audit.text import CONFIG, LEARNING_RATE, LENGTH, STEPS
    from memjax.cli import main
    from memjax.engine import ScoreStore
    from memjax.mia import attacks_from_signals

    section = bench_section(tmp_path, text_demo, seed=0, length=LENGTH, gpt2_config=CONFIG,
                            steps=STEPS, learning_rate=LEARNING_RATE)
    root = tmp_path / "llm-bench"
    is_member = text_demo["is_member"]
    order = np.concatenate([np.flatnonzero(is_member), np.flatnonzero(~is_member)])
    stored = ScoreStore(root / "result.stores" / "gpt2__docstrings").read()
    # Chunked vocabulary statistics at chunk 8,192 vs the demo's 64: fp32 rounding only.
    np.testing.assert_allclose(stored["mean_loss"], text_demo["signals"]["mean_loss"][order],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored["scored"], text_demo["signals"]["scored"][order])
    metrics = dict(section.metrics)
    members = np.arange(len(order)) < is_member.sum()
    loss_auc = roc_auc(attacks_from_signals(stored)["LOSS"], members)
    assert metrics["gpt2 / docstrings / LOSS AUC [95% CI]"].startswith(f"{loss_auc:.3f} [")
    low = float(metrics["llama / docstrings / LOSS AUC [95% CI]"].split("[")[1].split(",")[0])
    assert low > 0.5, metrics["llama / docstrings / LOSS AUC [95% CI]"]
    first = (root / "table.csv").read_text()
    assert tomllib.loads((root / "grid.toml").read_text())["models"][1]["name"] == "llama"
    assert main(["mia", "bench", str(root / "grid.toml"), "--no-progress"]) == 0
    assert (root / "result" / "table.csv").read_text() == first
