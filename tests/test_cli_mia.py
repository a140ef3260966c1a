"""``memjax mia`` end to end through ``memjax.cli.main``: per-example scores against
PyTorch (tiny GPT-2 and CLIP from tests/hf_tiny.py) and against the Python API (LiRA and
RMIA from arrays), and membership files that are refused with a message naming them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memjax.cli import main
from memjax.metrics import roc_auc, tpr_at_fpr
from memjax.mia import choose_a, lira, rmia


def read_run(out):
    """(per-example table as {column: array}, the metrics of the run)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pydict()
    metrics = json.loads((out / "metrics.json").read_text())["Membership inference"]
    return {k: np.asarray(v) for k, v in table.items()}, metrics


def assert_metrics(metrics, name, scores, is_member):
    """The run's AUC / TPR rows of ``name`` are those of its finite scores."""
    scored = ~np.isnan(scores)
    s, m = scores[scored], is_member[scored]
    assert metrics[f"{name} AUC"] == pytest.approx(roc_auc(s, m), abs=1e-12)
    assert metrics[f"{name} TPR@1%FPR"] == pytest.approx(tpr_at_fpr(s, m, 0.01), abs=1e-12)
    if not scored.all():
        assert metrics[f"{name} unscored examples"] == int((~scored).sum())
    else:
        assert f"{name} unscored examples" not in metrics


# --------------------------------------------------------------------------- arrays


def random_keep(rng, m, n, *, population=12, no_in=3, no_out=3):
    """An ordinary random keep matrix [M, N] (each model trains on a random half) with a
    population (no model trains on it) and, among the reference models 1..M-1, examples
    with no IN and with no OUT model (the target's own row stays random)."""
    keep = rng.random((m, n)) < 0.5
    cols = rng.permutation(n)
    keep[:, cols[:population]] = False
    gap_in = cols[population:population + no_in]
    gap_out = cols[population + no_in:population + no_in + no_out]
    keep[1:, gap_in] = False
    keep[0, gap_in] = True  # members the references never saw
    keep[1:, gap_out] = True
    return keep


@pytest.mark.parametrize("missing", ["offline", "skip"])
def test_lira_from_signal_arrays_equals_the_python_api(missing, rng, tmp_path, capsys):
    # A target and 8 reference models with a random keep matrix, 2 augmentations each.
    m, n, n_aug = 9, 160, 2
    keep = random_keep(rng, m, n)
    perm = rng.permutation(m)  # attack a model other than 0: rows are permuted
    keep = keep[perm]
    target = int(np.flatnonzero(perm == 0)[0])
    phi = rng.normal(size=(m, n, n_aug)) + 1.5 * keep[..., None]
    np.savez(tmp_path / "signals.npz", phi=phi, keep=keep)
    out = tmp_path / "lira"
    assert main(["mia", "lira", "--signals", str(tmp_path / "signals.npz"), "--target",
                 str(target), "--missing", missing, "--out", str(out)]) == 0
    assert "LiRA online AUC" in capsys.readouterr().out
    table, metrics = read_run(out)

    population = ~keep.any(0)
    ev = ~population
    refs = np.arange(m) != target
    args = (phi[target][ev], phi[refs][:, ev], keep[refs][:, ev])
    want = {"LiRA online": lira(*args, missing=missing),
            "LiRA online, fixed variance": lira(*args, fixed_variance=True, missing=missing),
            "LiRA offline": lira(*args, online=False),
            "LOSS": -np.logaddexp(0, -phi[target][ev]).mean(-1)}
    np.testing.assert_array_equal(table["id"], np.arange(n))
    np.testing.assert_array_equal(table["member"], keep[target])
    np.testing.assert_array_equal(table["population"], population)
    for name, scores in want.items():
        assert np.isnan(table[name][population]).all()
        # The Python API on the same arrays: bit-identical (same float64 arithmetic),
        # except the LOSS column, derived here independently (softplus of -φ).
        tol = dict(rtol=1e-12) if name == "LOSS" else dict(rtol=0, atol=0)
        np.testing.assert_allclose(table[name][ev], scores, **tol)
        assert_metrics(metrics, name, scores, keep[target, ev])
    no_in, no_out = ~keep[refs][:, ev].any(0), keep[refs][:, ev].all(0)
    assert no_in.sum() >= 3 and no_out.sum() >= 3  # the run really had gaps
    assert metrics["evaluation examples without an IN reference model"] == no_in.sum()
    assert metrics["evaluation examples without an OUT reference model"] == no_out.sum()
    unscored = no_out | (no_in if missing == "skip" else False)
    np.testing.assert_array_equal(np.isnan(table["LiRA online"][ev]), unscored)


def softmax_true(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return np.take_along_axis(p, labels[None, :, None], axis=-1)[..., 0]


@pytest.mark.parametrize("variant,missing", [("paper", "online"), ("privacy-meter", "skip")])
def test_rmia_from_logit_arrays_equals_the_python_api(variant, missing, rng, tmp_path):
    m, n, c = 9, 150, 4
    keep = random_keep(rng, m, n, population=30)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(m, n, c))
    logits[np.arange(m)[:, None], np.arange(n)[None], labels[None]] += 2.0 * keep
    np.savez(tmp_path / "signals.npz", logits=logits, labels=labels, keep=keep)
    out = tmp_path / "rmia"
    assert main(["mia", "rmia", "--signals", str(tmp_path / "signals.npz"), "--missing",
                 missing, "--population-variant", variant, "--out", str(out)]) == 0
    table, metrics = read_run(out)

    p = softmax_true(logits, labels)  # [M, N], float64 softmax written out
    pop, ev = ~keep.any(0), keep.any(0)
    ref_in, ref_p, pop_ref_p = keep[1:][:, ev], p[1:][:, ev], p[1:][:, pop]
    options = dict(missing=missing, population_variant=variant)
    a = choose_a(ref_p, ref_in, pop_ref_p, **options)  # holds out reference model 1
    assert metrics["a (chosen on reference model 1 as the target)"] == a
    want = rmia(p[0, ev], ref_p, ref_in, p[0, pop], pop_ref_p, a=a, **options)
    name = f"RMIA offline (a={a:g})"
    # Probabilities from logits in float64 two ways (memjax: sigmoid of φ): counts of
    # strict wins can only differ where two ratios tie within ~1e-15; none do here.
    np.testing.assert_array_equal(table[name][ev], want)
    assert_metrics(metrics, name, want, keep[0, ev])
    assert np.isnan(want).sum() == (keep[1:][:, ev].all(0).sum() if missing == "skip" else 0)


def test_lira_cli_refuses_bad_signal_files(rng, tmp_path, capsys):
    keep = rng.random((3, 20)) < 0.5
    np.savez(tmp_path / "bad.npz", phi=rng.normal(size=(3, 20)), keep=keep.astype(np.int8))
    assert main(["mia", "lira", "--signals", str(tmp_path / "bad.npz"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "keep: dtype int8; expected a boolean" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    np.savez(tmp_path / "ok.npz", phi=rng.normal(size=(3, 20)), keep=keep)
    assert main(["mia", "lira", "--signals", str(tmp_path / "ok.npz"), "--keep", "k.npy",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--keep: only with --target-model" in capsys.readouterr().err


# --------------------------------------------------------------------------- members


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A score store of classification signals (loss, phi) of 50 examples, and the
    member mask they were drawn with (members: lower loss)."""
    from memjax.engine import score

    rng = np.random.default_rng(7)
    member = rng.random(50) < 0.5
    loss = rng.exponential(1.0, 50) + np.where(member, 0.0, 0.7)
    phi = np.log(np.expm1(loss)) * -1.0  # φ with softplus(-φ) = loss
    path = tmp_path_factory.mktemp("mia_store") / "store"
    score(_stored_fields, {}, {"loss": loss.astype(np.float32), "phi": phi.astype(np.float32)},
          batch_size=8, store=path, progress=False)
    return path, member


def _stored_fields(params, example):
    return {"loss": example["loss"], "phi": example["phi"]}


def test_stored_writes_per_example_scores(store, tmp_path):
    path, member = store
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(str(i) for i in np.flatnonzero(member)) + "\n\n")
    for flag, value in (("--member-ids", ids_file), ("--members", tmp_path / "mask.npy")):
        np.save(tmp_path / "mask.npy", member)
        out = tmp_path / flag.strip("-")
        assert main(["mia", "stored", "--scores", str(path), flag, str(value), "--out",
                     str(out)]) == 0
        table, metrics = read_run(out)
        np.testing.assert_array_equal(table["id"], np.arange(50))
        np.testing.assert_array_equal(table["member"], member)
        from memjax.engine import ScoreStore

        loss = ScoreStore(path).read()["loss"].astype(np.float64)
        np.testing.assert_array_equal(table["LOSS"], -loss)
        assert_metrics(metrics, "LOSS", -loss, member)


def bad_membership_files(tmp_path):
    """(flag, file, what the message says) for every refused membership file (50 ids)."""
    cases = []

    def npy(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    def text(name, body):
        (tmp_path / name).write_text(body)
        return tmp_path / name

    mask = np.zeros(50, bool)
    mask[::2] = True
    cases.append(("--members", npy("zero_one.npy", mask.astype(np.int64)),
                  "dtype int64; expected a boolean mask by example id (for member ids use "
                  "--member-ids"))
    cases.append(("--members", npy("floats.npy", mask.astype(np.float32)),
                  "dtype float32; expected a boolean mask"))
    cases.append(("--members", npy("short.npy", mask[:49]),
                  "shape (49,); expected a 1-D boolean mask with one entry per example id, "
                  "shape (50,)"))
    cases.append(("--members", tmp_path / "absent.npy", "no such file"))
    cases.append(("--member-ids", npy("range.npy", np.array([0, 4, 50])),
                  "id 50 (entry 2) is out of range; expected example ids in [0, 50)"))
    cases.append(("--member-ids", npy("negative.npy", np.array([3, -1])),
                  "id -1 (entry 1) is out of range"))
    cases.append(("--member-ids", npy("twice.npy", np.array([3, 8, 3])),
                  "id 3 is listed 2 times"))
    cases.append(("--member-ids", npy("float_ids.npy", np.array([1.0, 2.0])),
                  "expected a 1-D array of integer example ids"))
    cases.append(("--member-ids", text("ids.txt", "1\n2\nseven\n"),
                  "line 3: 'seven' is not an integer"))
    cases.append(("--member-ids", text("dup.txt", "4\n4\n"), "id 4 is listed 2 times"))
    cases.append(("--members", npy("all.npy", np.ones(50, bool)),
                  "50 of the 50 examples are members; expected both"))
    return cases


def test_membership_files_are_refused_naming_the_file(store, tmp_path, capsys):
    path, _ = store
    for flag, file, message in bad_membership_files(tmp_path):
        out = tmp_path / f"out_{file.stem}"
        assert main(["mia", "stored", "--scores", str(path), flag, str(file), "--out",
                     str(out)]) == 2, file
        err = capsys.readouterr().err
        assert err.startswith(f"memjax: error: {flag}"), err
        assert str(file) in err or file.name in err, err
        assert message in err, (message, err)
        assert "Traceback" not in err and not out.exists()
    # Both flags, or neither: argparse's one-line error.
    assert main(["mia", "stored", "--scores", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "--members" in capsys.readouterr().err


# --------------------------------------------------------------------------- tokens


def torch_token_scores(torch_model, tokenizer, texts, max_length, k):
    """(-mean loss, Min-K%++ at k, number of truncated texts) per text, from the PyTorch
    GPT-2's logits in float64: position t predicts token t+1 of the text's own tokens."""
    import torch

    losses, mkpp, cut = [], [], 0
    for text in texts:
        cut += len(tokenizer(text)["input_ids"]) > max_length
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        with torch.no_grad():
            logits = torch_model(torch.tensor([ids])).logits[0].double().numpy()
        logp_all = logits - logits.max(-1, keepdims=True)
        logp_all = logp_all - np.log(np.exp(logp_all).sum(-1, keepdims=True))
        logp = logp_all[np.arange(len(ids) - 1), ids[1:]]
        p = np.exp(logp_all[:-1])
        mu = (p * logp_all[:-1]).sum(-1)
        sigma = np.sqrt((p * (logp_all[:-1] - mu[:, None]) ** 2).sum(-1))
        z = np.sort((logp - mu) / sigma)
        losses.append(-(-logp).mean())
        mkpp.append(z[:max(1, int(len(z) * k))].mean())
    return np.array(losses), np.array(mkpp), cut


def test_tokens_loss_and_min_k_plus_plus_equal_pytorch(tmp_path_factory, tmp_path, capsys):
    import zlib

    from tests import hf_tiny

    folder, torch_model = hf_tiny.cached(tmp_path_factory, "gpt2")
    ref_folder, torch_ref = hf_tiny.cached(tmp_path_factory, "gpt2", seed=1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = hf_tiny.corpus(24)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    members = np.arange(24) % 3 == 0
    np.save(tmp_path / "ids.npy", np.flatnonzero(members))
    out = tmp_path / "tokens"
    assert main(["mia", "tokens", "--model", str(folder), "--data", f"jsonl:{data}",
                 "--member-ids", str(tmp_path / "ids.npy"), "--k", "0.3", "--reference",
                 str(ref_folder), "--dataset-inference", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    loss, mkpp, cut = torch_token_scores(torch_model, tokenizer, texts, 64, 0.3)
    assert cut > 0  # the context (64 tokens) cuts some texts, and the run says how many
    assert f"{cut} of 24 texts are longer than 64 tokens" in capsys.readouterr().err
    table, metrics = read_run(out)
    np.testing.assert_array_equal(table["id"], np.arange(24))
    np.testing.assert_array_equal(table["member"], members)
    # The float32 JAX port and float32 PyTorch logits (reduced in float64 here): measured
    # max differences 1.2e-6 on losses up to 5.7 and 1.0e-6 on Min-K%++ up to 1.4.
    np.testing.assert_allclose(table["LOSS"], loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table["Min-K%++ (k=0.3)"], mkpp, rtol=1e-5, atol=1e-5)
    sizes = np.array([len(zlib.compress(t.encode())) for t in texts])
    np.testing.assert_allclose(table["zlib"], loss / sizes, rtol=1e-5)
    # Another GPT-2 (seed 1, same tokenizer) as the reference: −(target − reference loss).
    ref_loss, _, _ = torch_token_scores(torch_ref, tokenizer, texts, 64, 0.3)
    np.testing.assert_allclose(table["reference-calibrated LOSS"], loss - ref_loss, atol=1e-5)
    for name in ("LOSS", "Min-K%++ (k=0.3)", "zlib", "reference-calibrated LOSS"):
        assert_metrics(metrics, name, table[name], members)
    assert 0 <= metrics["dataset inference p-value (members vs non-members)"] <= 1
    assert (out / "dataset_inference.png").is_file() and (out / "roc.png").is_file()


# --------------------------------------------------------------------------- clip


def write_pairs(folder, n, rng, texts, name):
    """``n`` image-caption pairs (random crops of scikit-learn's photos, of varied sizes)
    listed in ``folder / name`` (JSONL, image paths relative to it)."""
    from PIL import Image

    from tests import hf_tiny

    photos = hf_tiny.sample_photos()
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = rng.integers(24, 160, 2)
        y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        path = f"img/{name}_{i}.png"
        Image.fromarray(photo[y:y + h, x:x + w]).save(folder / path)
        rows.append({"image": path, "text": texts[i][:50]})
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def torch_clip_embeddings(torch_model, folder, rows, base, views=None):
    """(image [N, D], text [N, D]) from PyTorch's CLIPModel on transformers' own image
    processor and tokenizer; with ``views`` [N, K, H, W, C] the views' image embeddings."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    images = [np.asarray(Image.open(base / r["image"]).convert("RGB")) for r in rows]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # transformers 5: get_*_features' pooler_output is projected
        img = torch_model.get_image_features(pixel_values=pixels).pooler_output
        txt = []
        for r in rows:
            ids = tokenizer(r["text"], truncation=True, max_length=24, return_tensors="pt")
            txt.append(torch_model.get_text_features(**ids).pooler_output[0])
        out = [np.asarray(img, np.float64), np.stack([np.asarray(t, np.float64) for t in txt])]
        if views is not None:
            flat = torch.tensor(np.asarray(views).reshape(-1, *views.shape[2:]))
            emb = torch_model.get_image_features(pixel_values=flat.permute(0, 3, 1, 2))
            out.append(np.asarray(emb.pooler_output, np.float64).reshape(*views.shape[:2], -1))
    return out, pixels.permute(0, 2, 3, 1).numpy()


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_clip_csa_and_aea_equal_pytorch(tmp_path_factory, tmp_path, rng):
    import jax

    from memjax.augment import keyed_views
    from memjax.mia import AEAView
    from tests import hf_tiny

    folder, torch_model = hf_tiny.cached(tmp_path_factory, "clip")
    texts = hf_tiny.corpus(40)
    rows = write_pairs(tmp_path, 10, rng, texts, "pairs.jsonl")
    known = write_pairs(tmp_path, 6, rng, texts[20:], "known.jsonl")
    members = np.zeros(10, bool)
    members[rng.permutation(10)[:4]] = True
    np.save(tmp_path / "members.npy", members)
    out = tmp_path / "clip"
    assert main(["mia", "clip", "--model", str(folder), "--data",
                 f"pairs:{tmp_path / 'pairs.jsonl'}", "--members",
                 str(tmp_path / "members.npy"), "--augmentations", "2", "--seed", "5",
                 "--known-nonmembers", f"pairs:{tmp_path / 'known.jsonl'}", "--lam", "0",
                 "--wsa-classifier", "logistic", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table, metrics = read_run(out)
    np.testing.assert_array_equal(table["id"], np.arange(10))
    np.testing.assert_array_equal(table["name"], [r["image"] for r in rows])
    np.testing.assert_array_equal(table["member"], members)
    # AEA's views: AEAView keyed by (seed, example id, view) on the processor's pixels.
    (img, txt), pixels = torch_clip_embeddings(torch_model, folder, rows, tmp_path)
    views = np.stack([np.asarray(keyed_views(AEAView(), jax.numpy.asarray(p), 5, i, 2))
                      for i, p in enumerate(pixels)])
    (_, _, view_emb), _ = torch_clip_embeddings(torch_model, folder, rows, tmp_path, views)
    # float32 port and memjax's preprocessing vs float32 PyTorch on transformers' pixels:
    # measured max |Δ cosine| 1.3e-7 (CSA) and 9e-8 (AEA) over random crops and sizes.
    np.testing.assert_allclose(table["CSA"], cosine(img, txt), atol=1e-6)
    np.testing.assert_allclose(table["AEA (mean over 2 views)"],
                               cosine(view_emb, txt[:, None]).mean(1), atol=1e-6)
    assert_metrics(metrics, "CSA", table["CSA"], members)
    assert metrics["known non-members"] == len(known)
    assert np.isfinite(table["WSA"]).all()
    assert 0 <= metrics["text-only control AUC (pairs vs known non-members; ~0.5 = no shift)"] <= 1


# --------------------------------------------------------------------------- model folders


def test_lira_on_model_folders_equals_pytorch_signals(tmp_path_factory, tmp_path, rng):
    """memjax mia lira --target-model/--reference-models: any checkpoint memjax.load
    opens (tiny Hugging Face ViTs here), scored on arrays, attacked like the arrays."""
    import torch

    from tests import hf_tiny

    vits = [hf_tiny.cached(tmp_path_factory, "vit", seed=s) for s in range(4)]
    n = 20
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    np.savez(tmp_path / "data.npz", image=images, label=labels)
    keep = np.zeros((4, n), bool)  # each reference trains on half; 4 examples: population
    for m in range(4):
        keep[m, rng.permutation(n - 4)[: (n - 4) // 2]] = True
    np.save(tmp_path / "keep.npy", keep)
    out = tmp_path / "lira"
    assert main(["mia", "lira", "--target-model", str(vits[0][0]), "--reference-models",
                 *(str(v[0]) for v in vits[1:]), "--keep", str(tmp_path / "keep.npy"),
                 "--data", str(tmp_path / "data.npz"), "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table, metrics = read_run(out)
    with torch.no_grad():
        pixels = torch.tensor(images).permute(0, 3, 1, 2)
        logits = np.stack([v[1](pixel_values=pixels).logits.double().numpy() for v in vits])
    from memjax.mia import phi_from_logits

    phi = phi_from_logits(logits, labels)  # [4, N], float64 from PyTorch's logits
    ev = keep.any(0)
    z = logits - logits.max(-1, keepdims=True)
    loss = np.log(np.exp(z).sum(-1)) - z[np.arange(4)[:, None], np.arange(n), labels]
    # float32 JAX ViT vs float32 PyTorch: measured max difference 1.4e-7 on the losses.
    np.testing.assert_allclose(table["LOSS"][ev], -loss[0, ev], rtol=1e-5, atol=1e-5)
    # With 3 reference models σ often comes from one model and hits the floor (scores of
    # 1e58 whose relative error is that of φ − μ); the pooled-σ variant is well
    # conditioned: measured max |Δ| / (1 + |score|) 1.1e-6 over three draws.
    want = lira(phi[0, ev], phi[1:, ev], keep[1:, ev], fixed_variance=True)
    np.testing.assert_allclose(table["LiRA online, fixed variance"][ev], want, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.isnan(table["LiRA offline"][ev]), keep[1:, ev].all(0))
    assert metrics["models"] == 4 and metrics["target model"] == 0
