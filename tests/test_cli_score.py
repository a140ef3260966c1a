"""``memjax score`` on tiny random Hugging Face models against PyTorch's own numbers.

Positive tests of the options that had none: ``--signal contrastive`` (a CLIP), the
``--model-parallel 2`` sharded path (a GPT-2, params split over pairs of the 8 forced CPU
devices) and ``--allow-pickle`` (a ViT classifier saved only as a pickled
``pytorch_model.bin``, converted or scored directly). Each stored score is compared with the
same quantity computed by the PyTorch model.

Then the store as a user manages it: a failed run leaves nothing or a store to resume,
``--overwrite`` replaces one, a resume does not depend on how paths are typed, and
``memjax convert`` keeps the checkpoint's tokenizer and preprocessing files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from memjax.cli import main  # noqa: E402
from memjax.engine import ScoreStore  # noqa: E402

# Strict dtype promotion: the ports and the score path promote no dtype implicitly.
pytestmark = pytest.mark.strict_dtypes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 ports against float32 PyTorch on tiny models: the same operations in another
# order, so agreement to a few float32 ulps of the values' scale. Measured over 3 seeds:
# cosine <= 2e-7 (values in [-1, 1]), log p <= 1.9e-6 (|log p| <= ~6), cross-entropy
# <= 7e-7 (<= ~3.5); each tolerance is ~5x its measured maximum.
COSINE_TOL, LOGP_TOL, LOSS_TOL = 1e-6, 1e-5, 4e-6


def _score(*args: str) -> dict[str, np.ndarray]:
    out = args[args.index("--out") + 1]
    assert main(["score", *args, "--no-progress"]) == 0
    return ScoreStore(out).read()


def _randomised(model, seed: int, scale: float = 0.15):
    """Every weight redrawn around its init (norm scales around 1): no trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(noise + 1.0 if p.ndim == 1 and name.endswith("weight") else noise)
    return model.eval()


def test_score_contrastive_equals_the_pytorch_clip_cosine(tmp_path, seed):
    """--signal contrastive stores, per pair, the cosine of CLIP's projected image and text
    embeddings: PyTorch's normalised ``image_embeds · text_embeds``."""
    rng = np.random.default_rng(seed)
    vocab, length, eos = 99, 10, 98
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=length, bos_token_id=0, pad_token_id=1,
                         eos_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=24)
    torch.manual_seed(seed)
    hf = _randomised(transformers.CLIPModel(config), seed)
    hf.save_pretrained(tmp_path / "clip")

    n = 20  # not a multiple of the batch: a padded last batch
    pixels = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)  # NCHW, as PyTorch takes
    valid = rng.integers(2, length + 1, n)
    ids = rng.integers(3, eos, (n, length))
    ids[np.arange(n), valid - 1] = eos  # each text ends with its EOS; pooled there
    mask = (np.arange(length)[None] < valid[:, None]).astype(np.int32)
    ids[mask == 0] = 1  # padding
    np.savez(tmp_path / "pairs.npz", image=pixels.transpose(0, 2, 3, 1),
             input_ids=ids.astype(np.int32), attention_mask=mask)

    stored = _score("--model", str(tmp_path / "clip"), "--data", str(tmp_path / "pairs.npz"),
                    "--signal", "contrastive", "--batch-size", "8", "--out",
                    str(tmp_path / "store"))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask))
    want = (out.image_embeds * out.text_embeds).sum(-1).numpy()  # both unit-normalised
    np.testing.assert_array_equal(stored["id"], np.arange(n))
    np.testing.assert_allclose(stored["cosine"], want, rtol=0, atol=COSINE_TOL)
    assert np.ptp(want) > 0.1  # the pairs differ: not a constant to agree on


def test_score_model_parallel_equals_pytorch_gpt2_logp(tmp_path, seed):
    """--model-parallel 2 (params sharded over device pairs, 4-way data parallel) stores
    GPT-2's log p of every next token and the mean loss, as PyTorch's log-softmax."""
    rng = np.random.default_rng(seed)
    vocab, length, n = 96, 12, 13  # vocab even: the embedding is sharded too
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=4)
    torch.manual_seed(seed)
    hf = _randomised(transformers.GPT2LMHeadModel(config), seed)
    hf.save_pretrained(tmp_path / "gpt2")
    ids = rng.integers(0, vocab, (n, length))
    mask = (np.arange(length)[None] < rng.integers(3, length + 1, (n, 1))).astype(np.int32)
    np.savez(tmp_path / "texts.npz", input_ids=ids.astype(np.int32), attention_mask=mask)

    stored = _score("--model", str(tmp_path / "gpt2"), "--data", str(tmp_path / "texts.npz"),
                    "--signal", "tokens", "--model-parallel", "2", "--batch-size", "8",
                    "--out", str(tmp_path / "store"))
    with torch.no_grad():
        logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    want = torch.gather(logp, -1, torch.tensor(ids[:, 1:, None])).squeeze(-1).numpy()
    scored = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)  # position t predicts token t + 1
    np.testing.assert_array_equal(np.asarray(stored["scored"], bool)[:, :-1], scored)
    assert not np.asarray(stored["scored"], bool)[:, -1].any()
    ours = np.asarray(stored["logp"], np.float64)[:, :-1]
    np.testing.assert_allclose(ours[scored], want[scored], rtol=0, atol=LOGP_TOL)
    mean_loss = -(np.where(scored, want, 0.0).sum(1) / scored.sum(1))
    np.testing.assert_allclose(stored["mean_loss"], mean_loss, rtol=0, atol=LOGP_TOL)


def test_convert_allow_pickle_then_score_equals_pytorch_vit_loss(tmp_path, seed, capsys):
    """A ViT classifier saved only as pickled weights: refused by default, converted with
    --allow-pickle, then scored; the stored loss is PyTorch's cross-entropy."""
    rng = np.random.default_rng(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=38, image_size=16, patch_size=8,
                                    num_labels=5)
    torch.manual_seed(seed)
    hf = _randomised(transformers.ViTForImageClassification(config), seed)
    folder = tmp_path / "pickled"
    hf.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")

    assert main(["convert", str(folder), str(tmp_path / "refused")]) == 2
    assert "only pickled weights (pytorch_model.bin)" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main(["convert", str(folder), str(tmp_path / "converted"), "--allow-pickle"]) == 0

    n = 20
    pixels = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 5, n)
    np.savez(tmp_path / "images.npz", image=pixels.transpose(0, 2, 3, 1),
             label=labels.astype(np.int32))
    stored = _score("--model", str(tmp_path / "converted"), "--data",
                    str(tmp_path / "images.npz"), "--batch-size", "8", "--out",
                    str(tmp_path / "store"))
    with torch.no_grad():
        logits = hf(torch.tensor(pixels)).logits
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(labels),
                                                 reduction="none").numpy()
    np.testing.assert_allclose(stored["loss"], want, rtol=0, atol=LOSS_TOL)
    assert np.ptp(want) > 0.1
    # memjax score reads the pickled checkpoint itself only when allowed, too.
    direct = ["--model", str(folder), "--data", str(tmp_path / "images.npz"), "--batch-size",
              "8", "--out", str(tmp_path / "direct")]
    assert main(["score", *direct, "--no-progress"]) == 2
    assert "only pickled weights (pytorch_model.bin)" in capsys.readouterr().err
    assert not (tmp_path / "direct").exists()
    np.testing.assert_array_equal(_score(*direct, "--allow-pickle")["loss"], stored["loss"])


# ---------------------------------------------------------------- stores a user can manage


def _mlp_loss(params, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Float64 NumPy cross-entropy of memjax.train's MLP (relu hidden layers)."""
    h = images.reshape(len(images), -1).astype(np.float64)
    *hidden, last = params["layers"]
    for layer in hidden:
        h = np.maximum(h @ np.float64(layer["w"]) + np.float64(layer["b"]), 0.0)
    logits = h @ np.float64(last["w"]) + np.float64(last["b"])
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return lse - logits[np.arange(len(logits)), labels]


def test_a_failed_score_leaves_nothing_or_a_store_to_resume(tmp_path, seed, capsys):
    """A run failing before its first chunk leaves no store; one failing later keeps its
    chunks and says how to resume; a run on other data is refused, and --overwrite
    replaces the store."""
    import jax

    from memjax.models.classifier import MLPConfig
    from memjax.train import save_model

    rng = np.random.default_rng(seed)
    config = MLPConfig(input_shape=(8, 8, 1), num_classes=10, hidden=(16,))
    params = jax.tree.map(np.asarray, config.init(jax.random.key(seed % (1 << 30))))
    save_model(tmp_path / "mlp", params, config)
    images = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    out = tmp_path / "store"
    args = ["score", "--model", str(tmp_path / "mlp"), "--batch-size", "8", "--chunk-size",
            "16", "--out", str(out), "--no-progress"]

    def data(bad_index: int | None) -> str:
        bad = labels.copy()
        if bad_index is not None:
            bad[bad_index] = 12
        path = tmp_path / f"data_{bad_index}.npz"
        np.savez(path, image=images, label=bad)
        return str(path)

    assert main([*args, "--data", data(3)]) == 2
    err = capsys.readouterr().err
    assert "at index 3 is 12" in err and "--resume" not in err
    assert not out.exists()  # nothing left to refuse the corrected run

    assert main([*args, "--data", data(30)]) == 2  # after chunk 0 ([0, 16)) was written
    err = capsys.readouterr().err
    assert "at index 30 is 12" in err and "keeps 1/3 finished chunks" in err
    assert "--resume" in err and "--overwrite" in err
    assert ScoreStore(out).done_chunks() == {0}
    assert main([*args, "--data", data(None)]) == 2  # without --resume: refused
    assert "already holds a store (1/3 chunks done)" in capsys.readouterr().err
    assert main([*args, "--data", data(None), "--resume"]) == 2  # other data: refused
    assert "different run" in capsys.readouterr().err
    assert main([*args, "--data", data(None), "--overwrite"]) == 0
    stored = ScoreStore(out).read()
    # float32 MLP against float64 NumPy: |loss| <= ~10, a few float32 ulps of it.
    np.testing.assert_allclose(stored["loss"], _mlp_loss(params, images, labels), rtol=0,
                               atol=1e-5)


def _texts(path, n: int = 24) -> None:
    from tests import hf_tiny

    lines = hf_tiny.corpus(n)
    path.write_text("".join(__import__("json").dumps({"text": t}) + "\n" for t in lines))


def test_score_resumes_with_the_paths_typed_another_way(tmp_path, tmp_path_factory,
                                                        monkeypatch, capsys):
    """The store's fingerprint holds contents, not paths: a run interrupted with
    ``--model gpt2`` (the model's own tokenizer) resumes with ``--model ./gpt2/
    --tokenizer /abs/gpt2`` and absolute data and store paths, to the scores of an
    uninterrupted run, bit for bit; a tokenizer with other contents is refused."""
    import shutil

    from tests import hf_tiny

    folder, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    shutil.copytree(folder, tmp_path / "gpt2")
    _texts(tmp_path / "texts.jsonl", 40)
    monkeypatch.chdir(tmp_path)

    def run(model: str, data: str, out: str, *extra: str) -> int:
        return main(["score", "--model", model, "--data", data, "--out", out, "--signal",
                     "tokens", "--batch-size", "8", "--chunk-size", "8", "--max-length", "24",
                     "--no-progress", *extra])

    written: list[int] = []
    real_write = ScoreStore.write_chunk

    def recording(self, index, *rest, **kwargs):
        if len(written) == 2 and not self.path.is_absolute():
            raise KeyboardInterrupt  # the first run, after its second chunk
        written.append(index)
        return real_write(self, index, *rest, **kwargs)

    monkeypatch.setattr(ScoreStore, "write_chunk", recording)
    assert run("gpt2", "jsonl:texts.jsonl", "store") == 130
    assert "keeps 2/5 finished chunks" in capsys.readouterr().err
    assert run("./gpt2/", f"jsonl:{tmp_path / 'texts.jsonl'}", str(tmp_path / "store"),
               "--tokenizer", str(tmp_path / "gpt2"), "--resume") == 0
    assert sorted(written[2:]) == [2, 3, 4]  # only the chunks the first run had not made
    monkeypatch.setattr(ScoreStore, "write_chunk", real_write)
    assert run("gpt2", "jsonl:texts.jsonl", "clean") == 0
    resumed, clean = ScoreStore("store").read(), ScoreStore("clean").read()
    assert set(resumed) == set(clean)
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key], err_msg=key)
    assert np.asarray(clean["n_tokens"]).min() > 1  # real texts, tokenised

    other = transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2",
                                                       local_files_only=True)
    other.add_tokens(["<an added token>"])
    other.save_pretrained(tmp_path / "other_tokenizer")
    assert run("gpt2", "jsonl:texts.jsonl", "store", "--tokenizer", "other_tokenizer",
               "--resume") == 2
    err = capsys.readouterr().err
    assert "different run" in err and "tokenizer" in err


@pytest.mark.parametrize("name", ["clip", "vit"])
def test_convert_copies_the_tokenizer_and_preprocessing(tmp_path, tmp_path_factory, name):
    """memjax convert keeps the checkpoint's tokenizer files and preprocessor_config.json:
    memjax.load of the converted folder prepares inputs exactly as the checkpoint does."""
    import memjax

    folder, _ = hf_tiny_cached(tmp_path_factory, name)
    assert main(["convert", str(folder), str(tmp_path / "converted")]) == 0
    original, converted = memjax.load(folder), memjax.load(tmp_path / "converted")
    assert converted.preprocess == original.preprocess is not None
    assert converted.fingerprint == original.fingerprint
    copied = sorted(p.name for p in (tmp_path / "converted").iterdir()
                    if p.name not in ("params", "memjax_model.json"))
    assert copied == sorted(p.name for p in folder.iterdir() if p.name in (
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"))
    for file in copied:
        assert (tmp_path / "converted" / file).read_bytes() == (folder / file).read_bytes()
    if name == "vit":
        assert converted.tokenizer is None
        return
    from tests import hf_tiny

    texts = hf_tiny.corpus(20)
    want = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)(texts)
    got = transformers.AutoTokenizer.from_pretrained(converted.tokenizer,
                                                     local_files_only=True)(texts)
    assert got["input_ids"] == want["input_ids"]


def hf_tiny_cached(tmp_path_factory, name: str):
    from tests import hf_tiny

    return hf_tiny.cached(tmp_path_factory, name)
