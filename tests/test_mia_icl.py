"""memjax.mia's in-context-learning membership attack (Duan et al. 2023): label
log-probabilities against PyTorch transformers, the normalisation / ensemble / score
arithmetic against float64 NumPy, refusals, and ``memjax mia icl`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memjax.errors import InputError
from memjax.mia import (
    PromptTemplate,
    build_prompt,
    draw_demonstration_sets,
    icl_label_distribution,
    icl_label_log_probs,
    icl_membership,
    icl_scores,
)
from tests import hf_tiny

TEMPLATE = PromptTemplate(labels=("yes", "no", "maybe"), query="Q: {text}\nA:")
TEXTS = ["Return the sum.", "Open a file.", "Parse the header.", "Close it.",
         "Read bytes.", "Join paths."]
LABELS = ["yes", "no", "maybe", "yes", "no", "maybe"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    import memjax

    folder, hf = hf_tiny.cached(tmp_path_factory, "gpt2")
    return memjax.load(folder), hf, folder


def torch_answer_log_probs(hf, tokenizer, context: str, answers: list[str]) -> np.ndarray:
    """float64 reference: sum of log-softmax(logits) over the answer's tokens, with the
    answer's tokens those of ``tokenizer(context + answer)`` after the context's."""
    import torch

    n = len(tokenizer(context)["input_ids"])
    out = []
    for answer in answers:
        ids = tokenizer(context + answer)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
    return np.asarray(out)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_label_log_probs_match_transformers(tmp_path_factory, name):
    import memjax

    folder, hf = hf_tiny.cached(tmp_path_factory, name)
    model = memjax.load(folder)
    tokenizer = hf_tiny.transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [build_prompt(TEMPLATE, TEXTS[:2], [0, 1]),
               build_prompt(TEMPLATE, TEXTS[2:3], [2]), ""]
    queries = [TEXTS[3], TEXTS[4], TEXTS[5]]
    got = icl_label_log_probs(model, prompts, queries, TEMPLATE, batch_size=8)
    answers = [TEMPLATE.answer.format(label=w) for w in TEMPLATE.labels]
    contexts = [p + TEMPLATE.query.format(text=q) for p, q in zip(prompts, queries, strict=True)]
    want = np.stack([torch_answer_log_probs(hf, tokenizer, c, answers) for c in contexts])
    assert got.shape == (3, 3)
    # float32 forward (memjax) vs float32 forward then float64 log-softmax (torch) over
    # <= 64 positions of a 2-layer model; log-probs of 1-3 tokens
    # summed (|log p| ~ 6 per token): float32 rounding is ~1e-5 relative, 1e-4 absolute
    # leaves a margin and still fails for any off-by-one token or wrong position.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def reference_scores(logp, labels, sets, normalize):
    """float64 NumPy reference of the attacks, written out loop by loop."""
    m, n, n_labels = logp.shape
    prompt_of = {}
    for p in range(m):
        for i in sets[p]:
            prompt_of[int(i)] = p
    nonmembers = [i for i in range(n) if i not in prompt_of]
    for j, i in enumerate(nonmembers):
        prompt_of[i] = j % m
    single, ensemble = np.zeros(n), np.zeros(n)
    for i in range(n):
        dists = []
        for p in range(m):
            row = logp[p, i]
            d = np.exp(row) if normalize == "none" else np.exp(row) / np.exp(row).sum()
            dists.append(d)
        single[i] = dists[prompt_of[i]][labels[i]]
        ensemble[i] = np.mean([d[labels[i]] for d in dists])
    return single, ensemble


@pytest.mark.parametrize("normalize", ["labels", "none"])
def test_scores_match_numpy_reference(rng, normalize):
    m, k, n, n_labels = 3, 2, 11, 4
    logp = rng.normal(size=(m, n, n_labels)) * 3 - 2
    labels = rng.integers(0, n_labels, n)
    sets = draw_demonstration_sets(n, k, m, int(rng.integers(1 << 30)))
    got = icl_scores(logp, labels, sets, normalize)
    single, ensemble = reference_scores(logp, labels, sets, normalize)
    # Same float64 arithmetic in a different order (max-shifted softmax): 1e-12 relative.
    np.testing.assert_allclose(got.single_prompt, single, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.ensemble, ensemble, rtol=1e-12, atol=0)
    assert got.is_member.sum() == m * k
    assert (np.sort(np.flatnonzero(got.is_member)) == np.sort(sets.ravel())).all()
    dist = icl_label_distribution(logp, normalize).mean(0)
    assert (got.ensemble_prediction == dist.argmax(1)).all()


def test_labels_distribution_sums_to_one(rng):
    logp = rng.normal(size=(5, 3)) * 50  # large spread: the max shift keeps it finite
    dist = icl_label_distribution(logp)
    np.testing.assert_allclose(dist.sum(-1), 1.0, rtol=1e-12)


def test_refusals(gpt2):
    model, _, _ = gpt2
    with pytest.raises(InputError, match="disjoint"):
        icl_scores(np.zeros((2, 5, 3)), np.zeros(5, int), [[0, 1], [1, 2]])
    with pytest.raises(InputError, match="not one of the label words"):
        build_prompt(TEMPLATE, ["a"], ["perhaps"])
    with pytest.raises(InputError, match="examples needed"):
        draw_demonstration_sets(5, 2, 3, 0)
    with pytest.raises(InputError, match="distinct"):
        PromptTemplate(labels=("a", "a"))
    with pytest.raises(InputError, match="prompt 0 with query 0: .* longer than the model's"):
        icl_label_log_probs(model, ["word " * 80], ["x"], TEMPLATE)
    with pytest.raises(InputError, match="causal LM"):
        icl_label_log_probs(model.replace(kind="classifier"), [""], ["x"], TEMPLATE)


def test_membership_end_to_end(gpt2):
    model, _, _ = gpt2
    result = icl_membership(model, TEXTS, LABELS, TEMPLATE, [[0], [1]], batch_size=8)
    assert result.label_log_probs.shape == (2, 6, 3)
    assert result.is_member.tolist() == [True, True, False, False, False, False]
    assert result.prompt_index.tolist() == [0, 1, 0, 1, 0, 1]
    metrics = result.metrics()
    assert set(metrics) == {"auc_single_prompt", "auc_ensemble", "accuracy_single_prompt",
                            "accuracy_ensemble"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_end_to_end(gpt2, tmp_path):
    import pyarrow.parquet as pq

    from memjax.cli import main

    _, _, folder = gpt2
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y}
                                              for t, y in zip(TEXTS, LABELS, strict=True)])
    out = tmp_path / "out"
    code = main(["mia", "icl", "--model", str(folder), "--data", f"jsonl:{data}", "--k", "1",
                 "--prompts", "2", "--query", "Q: {text}\nA:", "--labels", "yes", "no",
                 "maybe", "--out", str(out)])
    assert code == 0
    table = pq.read_table(out / "scores.parquet").to_pydict()
    assert sum(table["member"]) == 2 and len(table["id"]) == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AUC (ensemble of 2 prompts)" in json.dumps(metrics)


@pytest.mark.parametrize("args, message", [
    (["--labels", "yes", "no", "--k", "1"], "not one of the label words"),
    (["--k", "4", "--prompts", "2"], "examples needed"),
    (["--query", "no text field"], "{text}"),
    (["--k", "1", "--prompts", "2", "--query", "{text} " * 40], "longer than the model's"),
])
def test_cli_bad_input(gpt2, tmp_path, capsys, args, message):
    from memjax.cli import main

    _, _, folder = gpt2
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y}
                                              for t, y in zip(TEXTS, LABELS, strict=True)])
    code = main(["mia", "icl", "--model", str(folder), "--data", f"jsonl:{data}",
                 "--out", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
