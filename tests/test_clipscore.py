"""CLIPScore and RefCLIPScore (Hessel et al. 2021): the formulas against float64 NumPy, and
``memjax clipscore`` / :func:`memjax.mia.clipscore` on a tiny Hugging Face CLIP against
PyTorch's CLIPModel on transformers' own image processor and tokenizer, with the reference
code's caption prefix (on references too, as its ``get_refonlyclipscore``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from memjax.cli import main
from memjax.errors import InputError
from memjax.mia import (
    CLIPSCORE_PREFIX,
    best_reference_cosine,
    clip_score,
    clipscore,
    ref_clip_score,
)
from tests.test_cli_mia import cosine, torch_clip_embeddings, write_pairs


def clipscore64(image, text, weight=2.5):
    """The reference code's get_clip_score in float64: rows L2-normalised, w * clip(dot, 0)."""
    image = np.asarray(image, np.float64)
    text = np.asarray(text, np.float64)
    image = image / np.sqrt((image ** 2).sum(1, keepdims=True))
    text = text / np.sqrt((text ** 2).sum(1, keepdims=True))
    return weight * np.clip((image * text).sum(1), 0, None)


@pytest.mark.parametrize("weight", [2.5, 100.0])
def test_clip_score_matches_float64_numpy(rng, weight):
    image = rng.normal(size=(64, 12)).astype(np.float32)
    # Half the pairs aligned (positive cosine), half not: both sides of the clip at 0.
    text = (np.where(np.arange(64)[:, None] < 32, 1.0, -1.0) * image
            + rng.normal(size=(64, 12))).astype(np.float32)
    got = np.asarray(clip_score(image, text, weight=weight))
    want = clipscore64(image, text, weight)
    assert got.dtype == np.float32 and (want == 0).any() and (want > 0).any()
    # float32 cosines of 12-d vectors: a few ulp of 1, times w.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=weight * 1e-6)


def refclipscore64(clip_scores, text, refs, owners):
    """RefCLIPScore in float64, loop by loop: for candidate i, the best cosine to the
    references r with i in owners[r], clipped at 0 (the paper's Eq. 2), then the harmonic
    mean with its CLIPScore (0 when both are 0)."""
    out, best_cos = [], []
    for i, caption in enumerate(np.asarray(text, np.float64)):
        best = max(float(caption @ ref / np.linalg.norm(caption) / np.linalg.norm(ref))
                   for ref, owner in zip(np.asarray(refs, np.float64), owners, strict=True)
                   if i in owner)
        c, r = float(clip_scores[i]), max(best, 0.0)
        out.append(0.0 if c + r == 0 else 2 * c * r / (c + r))
        best_cos.append(best)
    return np.asarray(out), np.asarray(best_cos)


def test_ref_clip_score_matches_float64_numpy(rng):
    n, r, d = 24, 40, 12
    text = rng.normal(size=(n, d)).astype(np.float32)
    refs = rng.normal(size=(r, d)).astype(np.float32)
    # Candidates 0-5 own two references each, pointing away from them (best cosine < 0:
    # the clip at 0); references 12-29 give candidates 6-23 one each, and the rest serve
    # one or two of them (a reference shared by two captioning systems on one image).
    owners = [{j // 2} for j in range(12)] + [{6 + k} for k in range(18)]
    owners += [set(rng.choice(np.arange(6, n), size=rng.integers(1, 3), replace=False))
               for _ in range(r - 30)]
    for j in range(12):
        refs[j] = -text[j // 2] + 0.1 * rng.normal(size=d)
    pairs = [(i, j) for j, o in enumerate(owners) for i in sorted(o)]
    candidate_of_ref, ref_of = (np.asarray(c) for c in zip(*pairs, strict=True))
    scores = rng.uniform(0, 2.5, size=n).astype(np.float32)
    scores[[0, 6]] = 0.0  # candidate 0: both sides 0 (0/0 -> 0); 6: one side 0
    want, want_cos = refclipscore64(scores, text, refs, owners)
    got_cos = np.asarray(best_reference_cosine(text, refs, candidate_of_ref, ref_of))
    got = np.asarray(ref_clip_score(scores, got_cos))
    assert (want_cos[:6] < 0).all() and (want[:7] == 0).all() and (want[7:] > 0).any()
    # float32 cosines of 12-d vectors: a few ulp of 1.
    np.testing.assert_allclose(got_cos, want_cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_clip_score_refuses_bad_weight(rng):
    emb = rng.normal(size=(3, 4)).astype(np.float32)
    for weight in (0, -1.0, float("nan")):
        with pytest.raises(InputError, match="weight"):
            clip_score(emb, emb, weight=weight)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests import hf_tiny

    return hf_tiny.cached(tmp_path_factory, "clip")


def test_clipscore_cli_and_python_equal_pytorch(tiny_clip, tmp_path, rng):
    import memjax
    from tests import hf_tiny

    folder, torch_model = tiny_clip
    rows = write_pairs(tmp_path, 9, rng, hf_tiny.corpus(20), "pairs.jsonl")
    prefixed = [{**r, "text": CLIPSCORE_PREFIX + r["text"]} for r in rows]
    (img, txt), _ = torch_clip_embeddings(torch_model, folder, prefixed, tmp_path)
    want = 2.5 * np.clip(cosine(img, txt), 0, None)
    assert (want > 0).any()

    out = tmp_path / "out"
    assert main(["clipscore", "--model", str(folder), "--data",
                 f"pairs:{tmp_path / 'pairs.jsonl'}", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table = pq.read_table(out / "scores.parquet").to_pydict()
    metrics = json.loads((out / "metrics.json").read_text())["CLIPScore"]
    np.testing.assert_array_equal(table["id"], np.arange(9))
    np.testing.assert_array_equal(table["name"], [r["image"] for r in rows])
    # float32 port and memjax's preprocessing vs float32 PyTorch on transformers' pixels:
    # cosines agree to ~1e-7 (tests/test_cli_mia.py), times w = 2.5.
    np.testing.assert_allclose(table["clipscore"], want, atol=2.5e-6)
    np.testing.assert_allclose(metrics["mean CLIPScore"], want.mean(), atol=2.5e-6)
    assert metrics["caption prefix"] == CLIPSCORE_PREFIX and metrics["weight w"] == 2.5

    model = memjax.load(folder)
    result = clipscore(model, f"pairs:{tmp_path / 'pairs.jsonl'}", batch_size=8)
    np.testing.assert_allclose(result["clipscore"], table["clipscore"], rtol=0, atol=0)
    # Raw captions, torchmetrics' scaling: a different number, from the same function.
    (img_raw, txt_raw), _ = torch_clip_embeddings(torch_model, folder, rows, tmp_path)
    raw = clipscore(model, f"pairs:{tmp_path / 'pairs.jsonl'}", prefix="", weight=100.0)
    np.testing.assert_allclose(raw["clipscore"], 100 * np.clip(cosine(img_raw, txt_raw), 0, None),
                               atol=1e-4)


def test_refclipscore_cli_and_python_equal_pytorch(tiny_clip, tmp_path, rng):
    import memjax
    from tests import hf_tiny

    folder, torch_model = tiny_clip
    texts = hf_tiny.corpus(30)
    rows = write_pairs(tmp_path, 6, rng, texts, "candidates.jsonl")
    # 1-3 references per image, in another order, the paths typed another way ("./img/..."):
    # references match by the image file, not by the string.
    owners = [i for i in range(6) for _ in range(1 + i % 3)][::-1]
    refs = [{"image": "./" + rows[i]["image"], "text": texts[10 + k][:40]}
            for k, i in enumerate(owners)]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))

    def prefixed(items):
        return [{**r, "text": CLIPSCORE_PREFIX + r["text"]} for r in items]

    (img, txt), _ = torch_clip_embeddings(torch_model, folder, prefixed(rows), tmp_path)
    (_, ref_txt), _ = torch_clip_embeddings(torch_model, folder, prefixed(refs), tmp_path)
    clip = 2.5 * np.clip(cosine(img, txt), 0, None)
    best = np.array([max(cosine(txt[i], ref_txt[j]) for j, o in enumerate(owners) if o == i)
                     for i in range(6)])
    want = 2 * clip * np.clip(best, 0, None) / (clip + np.clip(best, 0, None))
    # (The random tiny CLIP scores about half the pairs 0 on either side, so both branches
    # of the harmonic mean occur on most seeds; test_ref_clip_score_matches_float64_numpy
    # covers them by construction.)

    out = tmp_path / "out"
    assert main(["clipscore", "--model", str(folder), "--data",
                 f"pairs:{tmp_path / 'candidates.jsonl'}", "--references",
                 f"pairs:{tmp_path / 'refs.jsonl'}", "--out", str(out), "--no-progress"]) == 0
    table = pq.read_table(out / "scores.parquet").to_pydict()
    metrics = json.loads((out / "metrics.json").read_text())["CLIPScore"]
    # float32 port vs float32 PyTorch: cosines agree to ~1e-7 (tests/test_cli_mia.py); the
    # harmonic mean's partial derivatives are at most 4 (w = 2.5 on one side).
    np.testing.assert_allclose(table["reference_cosine"], best, atol=1e-6)
    np.testing.assert_allclose(table["refclipscore"], want, atol=1e-5)
    np.testing.assert_allclose(metrics["mean RefCLIPScore"], want.mean(), atol=1e-5)
    assert metrics["reference captions"] == len(refs)

    model = memjax.load(folder)
    result = clipscore(model, f"pairs:{tmp_path / 'candidates.jsonl'}",
                       references=f"pairs:{tmp_path / 'refs.jsonl'}")
    np.testing.assert_allclose(result["refclipscore"], table["refclipscore"], rtol=0, atol=0)
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs
                                                if r["image"] != "./" + rows[4]["image"]))
    with pytest.raises(InputError, match=r"no reference caption for 1 candidate.*_4\.png"):
        clipscore(model, f"pairs:{tmp_path / 'candidates.jsonl'}",
                  references=f"pairs:{tmp_path / 'few.jsonl'}")


def test_clipscore_refuses_a_source_without_the_prefix(tiny_clip, tmp_path, rng):
    import memjax
    from memjax.data import open_source
    from tests import hf_tiny

    folder, _ = tiny_clip
    write_pairs(tmp_path, 2, rng, hf_tiny.corpus(4), "pairs.jsonl")
    model = memjax.load(folder)
    raw = open_source(f"pairs:{tmp_path / 'pairs.jsonl'}", model=model)
    with pytest.raises(InputError, match="text_prefix=''"):
        clipscore(model, raw)  # opened without the prefix the score asks for
    arrays = {name: np.asarray(value) for name, value in raw.read(np.arange(2)).items()
              if name != "text"}
    with pytest.raises(InputError, match="already tokenised"):
        clipscore(model, arrays)
    assert clipscore(model, arrays, prefix=None)["clipscore"].shape == (2,)
    with pytest.raises(InputError, match="only pairs:FILE"):
        open_source("digits", text_prefix="A photo depicts ")
