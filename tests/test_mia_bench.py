"""``memjax mia bench``: two tiny GPT-2s x two text datasets in one command; every cell
equals ``memjax mia tokens`` on that pair alone, and a rerun (a store removed, as a killed
run leaves it) gives the same table."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from memjax.cli import main
from tests import hf_tiny

ATTACKS = ["LOSS", "zlib", "Min-K%", "Min-K%++", "reference", "dataset inference"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    a, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    b, _ = hf_tiny.cached(tmp_path_factory, "gpt2", seed=1)
    texts = hf_tiny.corpus(160)
    for d, (start, n) in {"docs": (0, 40), "more": (80, 30)}.items():
        for part, offset in (("members", 0), ("nonmembers", n)):
            (root / f"{d}_{part}.jsonl").write_text("".join(
                json.dumps({"body": t}) + "\n" for t in texts[start + offset:start + offset + n]))
    config = root / "grid.toml"
    config.write_text(f"""
out = "result"
attacks = {json.dumps(ATTACKS)}
k = 0.2
batch_size = 8
[[models]]
name = "a"
path = "{a}"
reference = "{b}"
[[models]]
name = "b"
path = "{b}"
[[datasets]]
name = "docs"
members = "docs_members.jsonl"
nonmembers = "docs_nonmembers.jsonl"
text_field = "body"
max_length = 32
[[datasets]]
name = "more"
members = "more_members.jsonl"
nonmembers = "more_nonmembers.jsonl"
text_field = "body"
max_length = 32
""")
    assert main(["mia", "bench", str(config), "--no-progress"]) == 0
    table = pq.read_table(root / "result" / "scores.parquet").to_pandas()
    return root, config, table, {"a": a, "b": b}


def test_every_cell_equals_mia_tokens_alone(grid, tmp_path):
    root, _, table, models = grid
    assert len(table) == 2 * 2 * 4 + 2 + 2 * 2  # attacks x cells, reference, DI per cell
    for (model, dataset), cell in table.groupby(["model", "dataset"]):
        data = root / "result.stores" / "data" / f"{dataset}.jsonl"
        n = sum(1 for _ in (root / f"{dataset}_members.jsonl").open())
        (tmp_path / "ids.txt").write_text("\n".join(map(str, range(n))))
        out = tmp_path / f"{model}_{dataset}"
        argv = ["mia", "tokens", "--model", str(models[model]), "--data", f"jsonl:{data}",
                "--member-ids", str(tmp_path / "ids.txt"), "--text-field", "body",
                "--max-length", "32", "--batch-size", "8", "--dataset-inference",
                "--out", str(out), "--no-progress"]
        if model == "a":
            argv[argv.index("--dataset-inference")] = "--reference"
            argv.insert(argv.index("--reference") + 1, str(models["b"]))
        assert main(argv) == 0
        alone = json.loads((out / "metrics.json").read_text())["Membership inference"]
        names = {"LOSS": "LOSS", "zlib": "zlib", "Min-K%": "Min-K% (k=0.2)",
                 "Min-K%++": "Min-K%++ (k=0.2)", "reference": "reference-calibrated LOSS"}
        for _, row in cell.iterrows():
            if row["attack"] == "dataset inference":
                if model == "b":  # mia tokens without --reference: the same features
                    assert row["p-value"] == pytest.approx(alone[
                        "dataset inference p-value (members vs non-members)"], rel=1e-12)
                continue
            name = names[row["attack"]]
            for metric in ("AUC", "TPR@1%FPR", "TPR@0.1%FPR"):
                assert row[metric] == pytest.approx(alone[f"{name} {metric}"], abs=1e-12), \
                    (model, dataset, name, metric)
            assert row["AUC low"] <= row["AUC"] <= row["AUC high"]


def test_rerun_resumes_to_the_same_table(grid):
    root, config, table, _ = grid
    shutil.rmtree(root / "result.stores" / "b__more")  # as if killed before that cell
    assert main(["mia", "bench", str(config), "--no-progress"]) == 0
    again = pq.read_table(root / "result" / "scores.parquet").to_pandas()
    assert again.equals(table)
    assert (root / "result" / "table.csv").is_file()


def test_bad_configs_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('attacks = ["LOSS", "telepathy"]\n[[models]]\nname="m"\npath="m"\n')
    assert main(["mia", "bench", str(bad)]) == 2
    assert "telepathy" in capsys.readouterr().err
    bad.write_text("[[models]\n")
    assert main(["mia", "bench", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def longest_confident_run(signals, texts, k):
    """A plug-in attack: the fraction of scored tokens with log p above -1 (higher =
    member)."""
    import numpy as np

    scored = signals["scored"].astype(bool)
    return ((signals["logp"] > -1.0) & scored).sum(1) / np.maximum(scored.sum(1), 1)


def test_a_plugin_attack_runs_from_python_and_from_the_config(grid):
    """``register_attack`` (Python) and ``plugins = [...]`` (config) add an attack; the
    cells come from the stores the first run wrote, and the row equals the metric computed
    by hand from those stored signals."""
    import numpy as np

    from memjax.engine import ScoreStore
    from memjax.metrics import roc_auc, tpr_at_fpr
    from memjax.mia import ATTACKS, bench_config, run_bench

    root, _, _, paths = grid
    spec = {"out": "result", "attacks": ["LOSS"],
            "plugins": ["tests.test_mia_bench:longest_confident_run"], "batch_size": 8,
            "models": [{"name": "a", "path": paths["a"]}],
            "datasets": [{"name": "docs", "members": "docs_members.jsonl",
                          "nonmembers": "docs_nonmembers.jsonl", "text_field": "body",
                          "max_length": 32}]}
    try:
        config = bench_config(dict(spec, attacks=["LOSS", "longest_confident_run"]), root)
        result = run_bench(config, progress=False, log=lambda line: None)
    finally:
        ATTACKS.pop("longest_confident_run", None)
    row = next(r for r in result.rows if r["attack"] == "longest_confident_run")
    signals = ScoreStore(root / "result.stores" / "a__docs").read()
    is_member = np.arange(len(signals["mean_loss"])) < 40
    scores = longest_confident_run(signals, None, 0.2)
    assert row["AUC"] == roc_auc(scores, is_member)
    assert row["TPR@1%FPR"] == tpr_at_fpr(scores, is_member, 0.01)
