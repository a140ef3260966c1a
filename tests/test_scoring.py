"""End to end: a Hugging Face GPT-2 folder scored with token signals from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memjax.cli import main
from memjax.data import stdlib_docstrings
from memjax.engine import ScoreStore


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random GPT-2 and a word-level tokenizer trained on the texts (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lm")
    texts = stdlib_docstrings(40)
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]",
                                                                                   "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                   pad_token="[PAD]")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=fast.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                        n_head=4)
    GPT2LMHeadModel(config).eval().save_pretrained(root / "hf")
    (root / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return root, texts, fast


def torch_mean_losses(folder, texts, tokenizer, max_length):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = batch["input_ids"][:, 1:]
    token_logp = logp.gather(-1, target[..., None])[..., 0]
    mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    return ((-token_logp * mask).sum(1) / mask.sum(1)).numpy(), mask.sum(1).numpy()


def test_token_signals_of_hf_and_converted_gpt2_match_pytorch(lm_folder, tmp_path):
    root, texts, tokenizer = lm_folder
    expected, n_tokens = torch_mean_losses(root / "hf", texts, tokenizer, 24)
    assert main(["convert", str(root / "hf"), str(tmp_path / "converted")]) == 0
    for model in (root / "hf", tmp_path / "converted"):
        out = tmp_path / f"store-{model.name}"
        assert main(["score", "--model", str(model), "--signal", "tokens", "--data",
                     f"jsonl:{root / 'texts.jsonl'}", "--tokenizer", str(root / "tokenizer"),
                     "--max-length", "24", "--batch-size", "8", "--out", str(out),
                     "--no-progress"]) == 0
        scores = ScoreStore(out).read()
        assert scores["logp"].shape == (len(texts), 24)
        np.testing.assert_array_equal(scores["n_tokens"], n_tokens)
        np.testing.assert_allclose(scores["mean_loss"], expected, rtol=1e-5)


def test_wrong_signal_for_the_model_is_refused(lm_folder, tmp_path, capsys):
    root, _, _ = lm_folder
    code = main(["score", "--model", str(root / "hf"), "--signal", "contrastive", "--data",
                 f"jsonl:{root / 'texts.jsonl'}", "--tokenizer", str(root / "tokenizer"),
                 "--out", str(tmp_path / "s"), "--no-progress", "--batch-size", "8"])
    assert code == 2
    assert "needs a CLIP model; GPT2LMHeadModel is not one" in capsys.readouterr().err


def score_tokens(root, store, *, max_length: int):
    """memjax score --signal tokens of the fixture's HF GPT-2 on its texts -> store path."""
    assert main(["score", "--model", str(root / "hf"), "--signal", "tokens", "--data",
                 f"jsonl:{root / 'texts.jsonl'}", "--tokenizer", str(root / "tokenizer"),
                 "--max-length", str(max_length), "--batch-size", "8", "--out", str(store),
                 "--no-progress"]) == 0
    return store


def test_mia_on_stored_token_signals(lm_folder, tmp_path, capsys):
    """memjax mia --scores runs LOSS, Min-K%, Min-K%++ and zlib on a token store; the
    stored scored mask equals the PyTorch reference's, and the AUCs equal direct calls."""
    from memjax.metrics import roc_auc
    from memjax.mia import loss, min_k, min_k_plus_plus, zlib

    root, texts, tokenizer = lm_folder
    store = score_tokens(root, tmp_path / "store", max_length=24)
    signals = ScoreStore(store).read()
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=24,
                      return_tensors="np")
    mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).astype(bool)
    np.testing.assert_array_equal(signals["scored"][:, :-1], mask)
    assert not signals["scored"][:, -1].any()

    members = np.zeros(len(texts), bool)
    members[::3] = True
    np.save(tmp_path / "members.npy", members)
    out = tmp_path / "mia"
    assert main(["mia", "stored", "--scores", str(store), "--members",
                 str(tmp_path / "members.npy"), "--texts", str(root / "texts.jsonl"), "--k",
                 "0.3", "--out", str(out)]) == 0
    assert "Min-K%++ (k=0.3) AUC" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["Membership inference"]
    logp, full = signals["logp"], np.pad(mask, ((0, 0), (0, 1)))
    expected = {"LOSS": loss(signals["mean_loss"]), "Min-K% (k=0.3)": min_k(logp, full, 0.3),
                "Min-K%++ (k=0.3)": min_k_plus_plus(logp, signals["mu"], signals["sigma"],
                                                    full, 0.3),
                "zlib": zlib(signals["mean_loss"], texts)}
    for name, scores in expected.items():
        assert metrics[f"{name} AUC"] == pytest.approx(roc_auc(scores, members), abs=1e-12)


def test_mia_on_stored_signals_refuses_bad_members(lm_folder, tmp_path, capsys):
    root, texts, _ = lm_folder
    store = score_tokens(root, tmp_path / "store", max_length=16)
    np.save(tmp_path / "short.npy", np.ones(5, bool))
    np.save(tmp_path / "floats.npy", np.ones(len(texts)))
    np.save(tmp_path / "all.npy", np.ones(len(texts), bool))
    for name, message in (("short", "expected a 1-D boolean mask with one entry per example"),
                          ("floats", "dtype float64; expected a boolean mask by example id"),
                          ("all", "expected both members and non-members")):
        assert main(["mia", "stored", "--scores", str(store), "--members",
                     str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
    assert main(["mia", "stored", "--scores", str(store), "--out", str(tmp_path / "x")]) == 2
    assert "one of the arguments --members --member-ids is required" in \
        capsys.readouterr().err
    assert main(["mia"]) == 2
    assert "the following arguments are required: ATTACK" in capsys.readouterr().err
