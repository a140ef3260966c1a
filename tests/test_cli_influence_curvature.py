"""``memjax influence scores --curvature`` and the gradient store (``store`` / ``query``)
from the CLI, on a saved memjax MLP, against float64 references (issue 15 items 3 and 5)."""

import functools

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

import memjax
from memjax.cli import main
from memjax.data import digits
from memjax.influence import (
    classifier_outputs,
    cross_entropy_loss,
    dense_curvature,
    gnhvp,
    label_cross_entropy,
    param_paths,
)
from memjax.influence._gradients import projection_matrix
from memjax.train import MLPConfig, fit_classifier, save_model

N_TRAIN, N_TEST = 120, 4


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A 64-6-10 MLP (460 parameters: small enough for a dense float64 curvature) trained
    on 120 digits, saved in memjax's model format, with its data as .npz files."""
    folder = tmp_path_factory.mktemp("curvature_cli")
    data = digits().arrays
    images, labels = data["image"][:N_TRAIN], data["label"][:N_TRAIN]
    config = MLPConfig(images.shape[1:], 10, hidden=(6,))
    params = fit_classifier(jax.random.key(0), images, labels, np.ones(N_TRAIN, np.float32),
                            config=config, steps=200, learning_rate=1e-2)
    save_model(folder / "model", params, config)
    test = {"image": data["image"][1500:1500 + N_TEST], "label": data["label"][1500:1500 + N_TEST]}
    np.savez(folder / "train.npz", image=images, label=labels)
    np.savez(folder / "test.npz", **test)
    return folder, {"image": images, "label": labels}, test


def _x64_dense_scores(model, train, test, damping):
    """Float64 first-order scores lr·g_i·(G + λI)⁻¹g_t [T, N] with the dense Gauss-Newton
    matrix G of the mean loss over all training examples (exact solve)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), model.params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        outputs = functools.partial(classifier_outputs, model.apply)
        gn = dense_curvature(functools.partial(gnhvp, outputs, label_cross_entropy, params,
                                               {k: np.asarray(v, np.float64) if k == "image"
                                                else v for k, v in train.items()}), params)
        loss = functools.partial(cross_entropy_loss, model.apply)

        def grads(batch):
            return jax.vmap(lambda ex: jax.flatten_util.ravel_pytree(jax.grad(loss)(
                params, ex))[0])({"image": np.asarray(batch["image"], np.float64),
                                  "label": batch["label"]})

        g_train, g_test = np.asarray(grads(train)), np.asarray(grads(test))
        solved = np.linalg.solve(np.asarray(gn) + damping * np.eye(flat.shape[0]), g_test.T).T
        return solved @ g_train.T, g_train, g_test


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_scores_with_matrix_free_curvature(method, mlp, tmp_path, capsys):
    folder, train, test = mlp
    out = tmp_path / method
    assert main(["influence", "scores", "--model", str(folder / "model"), "--train",
                 str(folder / "train.npz"), "--test", str(folder / "test.npz"), "--mode",
                 "first_order", "--lr", "1", "--curvature", method, "--damping", "0.01",
                 "--curvature-examples", "500", "--out", str(out), "--no-progress"]) == 0
    assert "curvature worst_relative_residual" in capsys.readouterr().out
    table = pq.read_table(out / "scores.parquet").to_pandas()
    got = np.stack([table[f"score[{t}]"] for t in range(N_TEST)])  # [T, N]
    want, _, _ = _x64_dense_scores(memjax.load(folder / "model"), train, test, 0.01)
    # The solve's relative residual is 1e-4 (CG) / 1e-3 (LiSSA) at the damping's condition
    # number; float32 gradients. The error bound is residual x condition (~1e2 here).
    tol = {"cg": 1e-2, "lissa": 5e-2}[method]
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    # The curvature changes the ranking: not the identity's scores.
    _, g_train, g_test = _x64_dense_scores(memjax.load(folder / "model"), train, test, 0.01)
    identity = g_test @ g_train.T
    assert np.corrcoef(identity.ravel(), got.ravel())[0, 1] < 0.95


def test_gradient_store_and_query(mlp, tmp_path, capsys):
    folder, train, test = mlp
    model = str(folder / "model")
    common = ["--model", model, "--train", str(folder / "train.npz"), "--no-progress",
              "--batch-size", "32"]
    store = tmp_path / "grads"
    args = ["influence", "store", *common, "--store", str(store), "--projection-dim", "64",
            "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "stored")]) == 0
    from memjax.engine import ScoreStore

    rows = ScoreStore(store / "rows").read()["grad"]
    loaded = memjax.load(model)
    _, g_train, g_test = _x64_dense_scores(loaded, train, test, 1.0)  # (gradients only)
    r = np.asarray(projection_matrix(g_train.shape[1], 64, seed=3), np.float64)
    # param_paths order = ravel order of the params: the stored rows are Rᵀg_i.
    assert len(param_paths(loaded.params)) == 4
    np.testing.assert_allclose(rows, g_train @ r, rtol=0, atol=1e-4 * np.abs(rows).max())
    # A rerun resumes the finished store: identical rows.
    assert main([*args, "--out", str(tmp_path / "stored2")]) == 0
    np.testing.assert_array_equal(ScoreStore(store / "rows").read()["grad"], rows)

    for curvature in ("none", "projected"):
        out = tmp_path / f"query_{curvature}"
        assert main(["influence", "query", "--store", str(store), "--test",
                     str(folder / "test.npz"), "--k", "5", "--curvature", curvature,
                     "--out", str(out), "--no-progress"]) == 0
        table = pq.read_table(out / "scores.parquet").to_pydict()
        queries = g_test @ r
        if curvature == "projected":  # TRAK: (ΦᵀΦ/N + λI)⁻¹ with λ = 0.1·trace/k
            gram = (g_train @ r).T @ (g_train @ r) / N_TRAIN
            lam = 0.1 * np.trace(gram) / 64
            queries = np.linalg.solve(gram + lam * np.eye(64), queries.T).T
        scores = queries @ (g_train @ r).T  # [T, N] float64
        for t in range(N_TEST):
            order = np.argsort(-scores[t], kind="stable")
            assert table["supporting_ids"][t] == list(order[:5])
            assert table["opposing_ids"][t] == list(order[::-1][:5])
            np.testing.assert_allclose(table["supporting_scores"][t], scores[t, order[:5]],
                                       rtol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["self", "--curvature", "cg"], "--curvature cg: applies to 'scores' and 'query'"),
    (["scores", "--curvature", "projected", "--test", "TEST"], "exists only for 'query'"),
    (["query", "--test", "TEST"], "needs --store FOLDER"),
    (["scores", "--curvature", "cg", "--damping", "-1", "--test", "TEST"], "--damping -1.0"),
])
def test_curvature_cli_errors(args, message, mlp, tmp_path, capsys):
    folder, _, _ = mlp
    args = [a.replace("TEST", str(folder / "test.npz")) for a in args]
    code = main(["influence", *args, "--model", str(folder / "model"), "--train",
                 str(folder / "train.npz"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_store_refuses_a_foreign_folder_and_other_settings(mlp, tmp_path, capsys):
    folder, _, _ = mlp
    common = ["influence", "store", "--model", str(folder / "model"), "--train",
              str(folder / "train.npz"), "--no-progress", "--projection-dim", "8"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([*common, "--store", str(tmp_path / "busy"), "--out",
                 str(tmp_path / "o1")]) == 2
    assert "is not a gradient store" in capsys.readouterr().err
    assert main([*common, "--store", str(tmp_path / "g"), "--out", str(tmp_path / "o2")]) == 0
    assert main([*common[:-1], "16", "--store", str(tmp_path / "g"), "--out",
                 str(tmp_path / "o3")]) == 2
    assert "other settings (projection_dim)" in capsys.readouterr().err
