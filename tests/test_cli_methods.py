"""``memjax influence`` and ``memjax memorization`` on tiny Hugging Face checkpoints
(tests/hf_tiny.py), run through ``memjax.cli.main`` with data opened by the model's own
preprocessing (``images:DIR`` of PNG files, ``jsonl:FILE`` of texts).

References:
- Forward-INF: the PyTorch model in float64: one SGD ascent step on the test example's
  loss (``torch.autograd``), then each training example's loss change; pixels from
  transformers' own image processor, tokens from the checkpoint's tokenizer, the LM loss
  from ``GPT2LMHeadModel(labels=...)``.
- UnitMem, LayerMem, CLIPMem: the Python API on the same data (the CLI is an adapter: the
  values must be identical).
- déjà vu: the ``--embeddings`` path on the embeddings the model path saved, and those
  embeddings against the PyTorch model on the cropped, resized, normalised pixels.

Tolerances: memjax computes in float32. A Forward-INF score is the difference of two
losses, each the output of a float32 forward pass (through the updated and through the
original parameters), so its error is a few float32 ulps of the larger LOSS, not of the
score: 32 ulps of the largest loss involved (``SCORE_ULPS``). Measured against float64:
ViT 9.4e-7 (largest loss ~3, bound 1.1e-5), ViT with only the head updated 4.4e-6 (losses
up to ~19 after the ascent step, bound 7e-5), GPT-2 2.4e-6 (losses ~5.8, bound 2.2e-5).
Embeddings are compared at 1e-5 relative to their scale (float32 forward vs float64, plus
a bilinear resize computed in float32).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import hf_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import memjax  # noqa: E402
from memjax.augment import SimCLRView, TokenMaskView  # noqa: E402
from memjax.cli import main  # noqa: E402
from memjax.data import open_source  # noqa: E402
from memjax.memorization import clipmem, layermem, periphery_box, unitmem  # noqa: E402

CLASSES, PER_CLASS, LR = 4, 3, 0.5
SCORE_ULPS = 32 * float(np.finfo(np.float32).eps)  # x the largest loss; module docstring
FLAGS = ["--batch-size", "8", "--no-progress"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """images:DIR of random RGB PNGs of several sizes, one folder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    from PIL import Image

    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            shape = (int(rng.integers(32, 48)), int(rng.integers(32, 48)), 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


def folder_files(root):
    """The images of an images:DIR folder in the source's order (sorted relative paths)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def pixels(folder, root, **overrides) -> np.ndarray:
    """transformers' image processor on the folder's images: [N, C, H, W] float64."""
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    images = [Image.open(root / f).convert("RGB") for f in folder_files(root)]
    return processor(images, return_tensors="np", **overrides)["pixel_values"].astype(np.float64)


def labels_of(root) -> np.ndarray:
    return np.asarray([int(f.split("/")[0][len("class"):]) for f in folder_files(root)])


def results(folder) -> tuple[dict, dict]:
    """(scores.parquet as {column: array}, metrics.json) of a results folder."""
    table = pq.read_table(folder / "scores.parquet").to_pydict()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (folder / "index.html").is_file()
    return {k: np.asarray(v) for k, v in table.items()}, metrics


def unnormalized(model):
    """The model with its preprocessing minus mean/std, and (mean, std)."""
    pre = dict(model.preprocess)
    pre["do_normalize"] = False
    return model.replace(preprocess=pre), (np.asarray(model.preprocess["image_mean"]),
                                           np.asarray(model.preprocess["image_std"]))


# --------------------------------------------------------------------------- Forward-INF


def torch_forward_inf(model, loss, train, test, lr, trainable=lambda name: True):
    """([N, T] float64 loss change of every training example after one SGD ascent step of
    lr on each test example's loss (only the parameters ``trainable(name)`` move), the
    absolute tolerance for float32 scores: SCORE_ULPS x the largest loss involved)."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        base = torch.stack([loss(model, z) for z in train])
    out = []
    for t in test:
        moved = copy.deepcopy(model)
        params = [p for n, p in moved.named_parameters() if trainable(n)]
        grads = torch.autograd.grad(loss(moved, t), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p += lr * g  # ascent: unlearn t
            out.append(torch.stack([loss(moved, z) for z in train]) - base)
    scores = torch.stack(out, dim=1).numpy()
    largest = float(np.abs(base.numpy()[:, None] + scores).max())
    return scores, SCORE_ULPS * max(largest, 1.0)


def vit_loss(model, example):
    image, label = example
    logits = model(pixel_values=image[None]).logits
    return torch.nn.functional.cross_entropy(logits, label[None])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return hf_tiny.cached(tmp_path_factory, "vit", num_labels=CLASSES)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return hf_tiny.cached(tmp_path_factory, "resnet", num_labels=CLASSES)


@pytest.fixture(scope="module")
def vit_examples(vit, image_folder):
    x = torch.from_numpy(pixels(vit[0], image_folder))
    y = torch.from_numpy(labels_of(image_folder))
    return list(zip(x, y, strict=True))


@pytest.mark.parametrize("trainable", [None, "classifier/*"])
def test_forward_inf_vit_equals_pytorch(vit, vit_examples, image_folder, tmp_path, trainable):
    """Forward-INF scores of the tiny ViT (finite, one SGD ascent step) equal PyTorch's;
    --trainable classifier/* equals PyTorch updating only the classifier head."""
    folder, hf = vit
    test_rows = [0, 5, 10]
    out = tmp_path / "out"
    extra = ["--trainable", trainable] if trainable else []
    assert main(["influence", "scores", "--model", str(folder), "--train",
                 f"images:{image_folder}", "--test", f"images:{image_folder}", "--lr", str(LR),
                 "--out", str(out), *extra, *FLAGS]) == 0
    table, metrics = results(out)
    assert list(table["id"]) == list(range(len(vit_examples)))
    # Names: the source's stable ids of its files (relative or absolute paths).
    assert [Path(n).name for n in table["name"]] == [Path(f).name for f in
                                                     folder_files(image_folder)]
    assert len(set(table["name"])) == len(vit_examples)
    # The test set is the whole folder: every column score[t] is one test example.
    got = np.stack([table[f"score[{t}]"] for t in range(len(vit_examples))], axis=1)
    only = (lambda name: name.startswith("classifier.")) if trainable else (lambda name: True)
    want, tol = torch_forward_inf(hf, vit_loss, vit_examples,
                                  [vit_examples[t] for t in test_rows], LR, only)
    np.testing.assert_allclose(got[:, test_rows], want, atol=tol, rtol=0)
    assert np.ptp(want) > 1e3 * tol
    section = metrics["Forward-INF influence"]
    assert section["trainable"] == (trainable or "all float parameters")


def test_self_influence_resnet_frozen_batchnorm_equals_pytorch(resnet, image_folder,
                                                               tmp_path):
    """Self-influence of the tiny ResNet equals PyTorch in eval mode: BatchNorm normalises
    with its running statistics, which the ascent step leaves unchanged (its affine scale
    and shift are parameters and move)."""
    folder, hf = resnet
    out = tmp_path / "out"
    assert main(["influence", "self", "--model", str(folder), "--train",
                 f"images:{image_folder}", "--lr", str(LR), "--out", str(out), *FLAGS]) == 0
    table, _ = results(out)
    examples = list(zip(torch.from_numpy(pixels(folder, image_folder)),
                        torch.from_numpy(labels_of(image_folder)), strict=True))
    per_example = [torch_forward_inf(hf, vit_loss, [z], [z], LR) for z in examples]
    want = np.asarray([scores[0, 0] for scores, _ in per_example])
    tol = max(t for _, t in per_example)
    np.testing.assert_allclose(table["self_influence"], want, atol=tol, rtol=0)
    assert np.ptp(want) > 1e2 * tol


def test_trainable_pattern_matching_nothing_lists_paths(vit, image_folder, tmp_path, capsys):
    assert main(["influence", "self", "--model", str(vit[0]), "--train",
                 f"images:{image_folder}", "--trainable", "head/*", "--out",
                 str(tmp_path / "x"), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "['head/*'] match no parameter" in err and "classifier/kernel" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return hf_tiny.cached(tmp_path_factory, "gpt2")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    # Texts of 2 to 9 words: 6 to 44 tokens, so at 24 tokens some are padded, some cut.
    corpus = [" ".join(t.split()[:2 + i]) for i, t in enumerate(hf_tiny.corpus(40)[::4][:8])]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return path, corpus


def test_forward_inf_gpt2_equals_pytorch(gpt2, texts, tmp_path):
    """Forward-INF of the tiny GPT-2 with the per-sequence loss (mean token cross-entropy
    over the attention mask) equals PyTorch's GPT2LMHeadModel(labels=...) loss change."""
    folder, hf = gpt2
    path, corpus = texts
    length = 24
    out = tmp_path / "out"
    assert main(["influence", "scores", "--model", str(folder), "--train", f"jsonl:{path}",
                 "--test", f"jsonl:{path}", "--max-length", str(length), "--lr", str(LR),
                 "--out", str(out), *FLAGS]) == 0
    table, _ = results(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(corpus, padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")
    real = enc["attention_mask"].sum(1)
    assert int(real.min()) >= 2 and int(real.min()) < length  # padded sequences ...
    assert int(real.max()) == length  # ... and full ones

    def lm_loss(model, example):
        ids, mask = example
        labels = ids.masked_fill(mask == 0, -100)
        return model(input_ids=ids[None], attention_mask=mask[None], labels=labels[None]).loss

    examples = list(zip(enc["input_ids"], enc["attention_mask"], strict=True))
    want, tol = torch_forward_inf(hf, lm_loss, examples, examples[:3], LR)
    got = np.stack([table[f"score[{t}]"] for t in range(3)], axis=1)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.ptp(want) > 1e2 * tol


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return hf_tiny.cached(tmp_path_factory, "clip")


def test_forward_inf_clip_zero_shot_equals_pytorch(clip, image_folder, tmp_path):
    """Forward-INF of a CLIP zero-shot classifier (logits = exp(logit_scale) x cosine of the
    image with one prompt per class) equals PyTorch's CLIPModel logits_per_image
    cross-entropy, the prompts' embeddings moving with the update."""
    folder, hf = clip
    out = tmp_path / "out"
    # The class name first: this tiny CLIP pools its causal text tower at the highest token
    # id (Hugging Face's rule for eos_token_id == 2), which a shared prefix would hold.
    classes = ["dog", "cat", "ship", "frog"]
    assert main(["influence", "scores", "--model", str(folder), "--train",
                 f"images:{image_folder}", "--test", f"images:{image_folder}", "--lr", str(LR),
                 "--classes", *classes, "--prompt", "{} in a photo", "--out", str(out),
                 *FLAGS]) == 0
    table, _ = results(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = tokenizer([f"{name} in a photo" for name in classes], padding="max_length",
                        max_length=24, return_tensors="pt")

    def zero_shot(model, example):
        image, label = example
        logits = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                       pixel_values=image[None]).logits_per_image
        return torch.nn.functional.cross_entropy(logits, label[None])

    examples = list(zip(torch.from_numpy(pixels(folder, image_folder)),
                        torch.from_numpy(labels_of(image_folder)), strict=True))
    want, tol = torch_forward_inf(hf, zero_shot, examples, examples[::5], LR)
    got = np.stack([table[f"score[{t}]"] for t in range(0, len(examples), 5)], axis=1)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.ptp(want) > 1e2 * tol


# --------------------------------------------------------------------------- UnitMem / LayerMem


@pytest.mark.parametrize("name, layers", [("vit", ["layers.*.mlp_hidden"]),
                                          ("resnet", ["stages.1.out", "embedder"])])
def test_unitmem_cli_equals_python_api(name, layers, vit, resnet, image_folder, tmp_path):
    """UnitMem from the CLI (views in [0, 1] at the model's input size, normalised after)
    equals the Python API with the same preprocessing and normalize=(mean, std)."""
    folder = {"vit": vit, "resnet": resnet}[name][0]
    out = tmp_path / "out"
    assert main(["memorization", "unitmem", "--model", str(folder), "--data",
                 f"images:{image_folder}", "--layers", *layers, "--n-aug", "2",
                 "--out", str(out), *FLAGS]) == 0
    table, metrics = results(out)
    model = memjax.load(folder)
    data_model, normalize = unnormalized(model)
    source = open_source(f"images:{image_folder}", model=data_model)
    want = unitmem(model, source, layers=layers, n_aug=2, views_fn=SimCLRView(),
                   normalize=normalize, batch_size=8)
    assert list(want.layers) == list(dict.fromkeys(table["layer"]))
    for layer, result in want.layers.items():
        rows = table["layer"] == layer
        np.testing.assert_array_equal(table["unit"][rows], np.arange(len(result.scores)))
        np.testing.assert_allclose(table["unitmem"][rows], result.scores, rtol=1e-12)
        np.testing.assert_array_equal(table["argmax_id"][rows], result.argmax_id)
        assert metrics["UnitMem"][f"UnitMem {layer}: mean"] == pytest.approx(
            result.summary["mean"], abs=1e-12)
    names = np.asarray(source.names())
    np.testing.assert_array_equal(table["argmax_name"], names[table["argmax_id"]])


def test_unitmem_unknown_layer_lists_activations(vit, image_folder, tmp_path, capsys):
    assert main(["memorization", "unitmem", "--model", str(vit[0]), "--data",
                 f"images:{image_folder}", "--layers", "blocks.*", "--out",
                 str(tmp_path / "x"), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "blocks.*" in err and "layers.0.mlp_hidden" in err


def test_layermem_cli_equals_python_api(vit, image_folder, tmp_path_factory, tmp_path):
    """LayerMem of two tiny ViT checkpoints (f, g: different seeds) equals the Python API."""
    g = hf_tiny.cached(tmp_path_factory, "vit", num_labels=CLASSES, seed=1)[0]
    out = tmp_path / "out"
    assert main(["memorization", "layermem", "--model", str(vit[0]), "--reference", str(g),
                 "--data", f"images:{image_folder}", "--layers", "layers.0.out,final",
                 "--n-aug", "2", "--out", str(out), *FLAGS]) == 0
    table, _ = results(out)
    f_model = memjax.load(vit[0])
    data_model, normalize = unnormalized(f_model)
    source = open_source(f"images:{image_folder}", model=data_model)
    want = layermem(f_model, memjax.load(g), source, views_fn=SimCLRView(), n_aug=2,
                    layers=["layers.0.out", "final"], normalize=normalize, batch_size=8,
                    progress=False)
    for j, layer in enumerate(want["layers"]):
        np.testing.assert_allclose(table[f"{layer}_layermem"], want["raw"][:, j], rtol=1e-12)
        np.testing.assert_allclose(table[f"{layer}_delta"], want["delta_raw"][:, j],
                                   rtol=1e-12, atol=1e-15)
    assert np.ptp(want["raw"]) > 0


def test_layermem_bert_masking_views(tmp_path_factory, texts, tmp_path):
    """LayerMem of two tiny BERTs with token-masking views equals the Python API, and the
    views never touch special tokens or padding."""
    f = hf_tiny.cached(tmp_path_factory, "bert")[0]
    g = hf_tiny.cached(tmp_path_factory, "bert", seed=1)[0]
    path, _ = texts
    out = tmp_path / "out"
    assert main(["memorization", "layermem", "--model", str(f), "--reference", str(g),
                 "--data", f"jsonl:{path}", "--max-length", "24", "--layers", "layers.*.out",
                 "--mask-rate", "0.3", "--n-aug", "2", "--out", str(out), *FLAGS]) == 0
    table, _ = results(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(f)
    view = TokenMaskView(mask_id=tokenizer.mask_token_id, rate=0.3,
                         keep_ids=tuple(sorted(tokenizer.all_special_ids)))
    f_model, g_model = memjax.load(f), memjax.load(g)
    source = open_source(f"jsonl:{path}", model=f_model, max_length=24)
    want = layermem(f_model, g_model, source, views_fn=view, n_aug=2, layers=["layers.*.out"],
                    batch_size=8, progress=False)
    assert want["layers"] == ("layers.0.out", "layers.1.out")
    for j, layer in enumerate(want["layers"]):
        np.testing.assert_allclose(table[f"{layer}_layermem"], want["raw"][:, j], rtol=1e-12)
    fields = source.read(np.arange(len(source)))
    import jax

    masked = np.asarray(jax.vmap(view)({k: fields[k] for k in ("input_ids", "attention_mask")},
                                       jax.random.split(jax.random.key(0), len(source)))
                        ["input_ids"])
    changed = masked != fields["input_ids"]
    special = np.isin(fields["input_ids"], tokenizer.all_special_ids)
    assert changed.any() and not (changed & (special | (fields["attention_mask"] == 0))).any()
    assert (masked[changed] == tokenizer.mask_token_id).all()


def test_clipmem_cli_equals_python_api(clip, image_folder, tmp_path_factory, tmp_path):
    """CLIPMem of two tiny CLIPs on pairs:FILE (image paths and captions) equals the Python
    API on the same pairs, views made in [0, 1] and normalised with CLIP's mean/std."""
    g = hf_tiny.cached(tmp_path_factory, "clip", seed=1)[0]
    pairs = tmp_path / "pairs.jsonl"
    captions = hf_tiny.corpus(12)
    pairs.write_text("".join(json.dumps({"image": str(image_folder / f), "text": c[:60]}) + "\n"
                             for f, c in zip(folder_files(image_folder), captions, strict=True)))
    out = tmp_path / "out"
    assert main(["memorization", "clipmem", "--model", str(clip[0]), "--reference", str(g),
                 "--data", f"pairs:{pairs}", "--n-aug", "2", "--out", str(out), *FLAGS]) == 0
    table, _ = results(out)
    f_model = memjax.load(clip[0])
    data_model, normalize = unnormalized(f_model)
    source = open_source(f"pairs:{pairs}", model=data_model)
    want = clipmem(f_model, memjax.load(g), source, views_fn=SimCLRView(), n_aug=2,
                   normalize=normalize, batch_size=8, progress=False)
    np.testing.assert_allclose(table["clipmem"], want["raw"], rtol=1e-12)
    np.testing.assert_allclose(table["align_g"], want["align_g"], rtol=1e-12)
    assert np.ptp(want["raw"]) > 0


def test_unitmem_bert_averages_units_over_real_tokens(tmp_path_factory, texts, tmp_path):
    """UnitMem of a tiny BERT with token-masking views: the CLI equals the Python API, whose
    mu is each unit's activation averaged over the REAL tokens of each view (padding left
    out) and over the views, checked against NumPy on the activations of explicit views."""
    import jax

    from memjax.augment import view_key

    folder = hf_tiny.cached(tmp_path_factory, "bert")[0]
    path, _ = texts
    layer = "layers.1.mlp_hidden"
    out = tmp_path / "out"
    assert main(["memorization", "unitmem", "--model", str(folder), "--data", f"jsonl:{path}",
                 "--max-length", "24", "--layers", layer, "--n-aug", "2", "--out", str(out),
                 *FLAGS]) == 0
    table, _ = results(out)
    model = memjax.load(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    view = TokenMaskView(mask_id=tokenizer.mask_token_id,
                         keep_ids=tuple(sorted(tokenizer.all_special_ids)))
    source = open_source(f"jsonl:{path}", model=model, max_length=24)
    want = unitmem(model, source, layers=[layer], n_aug=2, views_fn=view, batch_size=8,
                   return_mu=True)
    np.testing.assert_allclose(table["unitmem"], want.layers[layer].scores, rtol=1e-12)

    fields = source.read(np.arange(len(source)))
    mask = fields["attention_mask"]
    assert (mask == 0).any()  # some texts are padded
    mu = np.zeros_like(want.layers[layer].mu)
    for k in range(2):
        keys = jax.vmap(lambda i, k=k: view_key(0, i, k))(np.asarray(fields["id"], np.int32))
        views = jax.vmap(view)({"input_ids": fields["input_ids"], "attention_mask": mask},
                               keys)
        acts = np.asarray(jax.vmap(model.activations([layer]), in_axes=(None, 0))(
            model.params, views)[layer], np.float64)[:, 0]  # [N, T, U]
        real = mask[:, :, None] > 0
        mu += (acts * real).sum(axis=1) / real.sum(axis=1) / 2
    np.testing.assert_allclose(want.layers[layer].mu, mu, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- déjà vu


def test_dejavu_from_models_equals_embeddings_path(vit, image_folder, tmp_path_factory,
                                                  tmp_path):
    """dejavu --model computes periphery-crop embeddings (equal to PyTorch on the cropped,
    resized, normalised pixels) and gives the same results as --embeddings on them."""
    g = hf_tiny.cached(tmp_path_factory, "vit", num_labels=CLASSES, seed=1)[0]
    saved = tmp_path / "emb.npz"
    common = ["--public", f"images:{image_folder}", "--k", "3", *FLAGS]
    assert main(["memorization", "dejavu", "--model", str(vit[0]), "--reference", str(g),
                 "--images", f"images:{image_folder}", "--crop", "periphery",
                 "--save-embeddings", str(saved), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["memorization", "dejavu", "--embeddings", str(saved), "--k", "3",
                 "--out", str(tmp_path / "b")]) == 0
    table_a, metrics_a = results(tmp_path / "a")
    table_b, metrics_b = results(tmp_path / "b")
    assert metrics_a == metrics_b
    for column in ("target_top1", "target_confidence", "reference_top1", "label"):
        np.testing.assert_array_equal(table_a[column], table_b[column])

    arrays = dict(np.load(saved))
    np.testing.assert_array_equal(arrays["labels"], labels_of(image_folder))
    np.testing.assert_array_equal(arrays["public_labels"], labels_of(image_folder))
    # PyTorch: the [0, 1] pixels, the periphery box of a 32x32 image with the central half
    # excluded (the left strip, 32 x 8, first of the four equal strips), bilinearly resized
    # (align_corners=False, as memjax.augment.resample_box), normalised, through the HF ViT
    # in float64.
    assert periphery_box(32, 32, 0.5) == (0, 0, 32, 8)
    folder, hf = vit
    x01 = torch.from_numpy(pixels(folder, image_folder, do_normalize=False))
    crop = torch.nn.functional.interpolate(x01[:, :, :, 0:8], size=(32, 32), mode="bilinear",
                                           align_corners=False, antialias=False)
    with torch.no_grad():
        want = copy.deepcopy(hf).double()(pixel_values=(crop - 0.5) / 0.5).logits.numpy()
    np.testing.assert_allclose(arrays["target"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    with torch.no_grad():
        whole = copy.deepcopy(hf).double()(pixel_values=(x01 - 0.5) / 0.5).logits.numpy()
    np.testing.assert_allclose(arrays["target_public"], whole, rtol=0,
                               atol=1e-5 * np.abs(whole).max())


def test_dejavu_background_crops_from_boxes(vit, image_folder, tmp_path_factory, tmp_path):
    """dejavu --boxes: the query is the largest background rectangle outside the object
    boxes, cut from the ORIGINAL image (box coordinates in its pixels) and then preprocessed
    by the model's processor; its embedding equals PyTorch on transformers' pixels of that
    crop."""
    from PIL import Image

    g = hf_tiny.cached(tmp_path_factory, "vit", num_labels=CLASSES, seed=1)[0]
    files = folder_files(image_folder)
    rows, crops = ["image,label,x0,y0,x1,y1"], []
    for n, name in enumerate(files):
        with Image.open(image_folder / name) as image:
            w, h = image.size
            crops.append(image.convert("RGB").crop((0, 0, w, 10)))  # the strip above the box
        # One box: all but the top 10 rows; the path relative to the CSV file's folder.
        relative = os.path.relpath(image_folder / name, tmp_path)
        rows.append(f"{relative},{n % CLASSES},0,10,{w},{h}")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    saved = tmp_path / "emb.npz"
    assert main(["memorization", "dejavu", "--model", str(vit[0]), "--reference", str(g),
                 "--boxes", str(tmp_path / "boxes.csv"), "--public",
                 f"images:{image_folder}", "--k", "3", "--save-embeddings", str(saved),
                 "--out", str(tmp_path / "out"), *FLAGS]) == 0
    arrays = dict(np.load(saved))
    np.testing.assert_array_equal(arrays["labels"], np.arange(len(files)) % CLASSES)
    processor = transformers.AutoImageProcessor.from_pretrained(vit[0])
    x = torch.from_numpy(processor(crops, return_tensors="np")["pixel_values"]).double()
    with torch.no_grad():
        want = copy.deepcopy(vit[1]).double()(pixel_values=x).logits.numpy()
    np.testing.assert_allclose(arrays["target"], want, rtol=0, atol=1e-5 * np.abs(want).max())
