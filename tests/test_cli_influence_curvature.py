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
    (["self", "--curvature", "cg"], "--curvature cg: applies to 'scores', 'store' and"),
    (["query", "--curvature", "ekfac", "--test", "TEST", "--store", "S"],
     "preconditioning only the query is unbiased"),
    (["store", "--curvature", "cg", "--store", "S"], "which K-FAC/EK-FAC give"),
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


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_scores_with_kfac_found_in_the_jaxpr(method, mlp, tmp_path, capsys):
    """--curvature kfac/ekfac on the saved MLP: the dense layers the jaxpr walk finds, with
    the empirical Fisher, give the scores of the hand-written MLP factors
    (memjax.influence.kfac_batch_stats, tested against float64 NumPy)."""
    from memjax.influence import (
        ekfac_batch_stats,
        ekfac_factors,
        ekfac_preconditioner,
        forward_inf,
        kfac_batch_stats,
        kfac_factors,
    )

    folder, train, test = mlp
    out = tmp_path / method
    assert main(["influence", "scores", "--model", str(folder / "model"), "--train",
                 str(folder / "train.npz"), "--test", str(folder / "test.npz"), "--mode",
                 "first_order", "--lr", "1", "--curvature", method, "--fisher", "empirical",
                 "--batch-size", "40", "--out", str(out), "--no-progress"]) == 0
    table = pq.read_table(out / "scores.parquet").to_pandas()
    got = np.stack([table[f"score[{t}]"] for t in range(N_TEST)])

    loaded = memjax.load(folder / "model")
    x = train["image"].reshape(N_TRAIN, -1)
    factors = kfac_factors(kfac_batch_stats(loaded.params, x, train["label"],
                                            fisher="empirical"))
    if method == "ekfac":
        factors = ekfac_factors(factors, ekfac_batch_stats(loaded.params, factors, x,
                                                           train["label"], fisher="empirical"))
    want = forward_inf(functools.partial(cross_entropy_loss, loaded.apply), loaded.params,
                       test, train, mode="first_order", lr=1.0, batch_size=40,
                       precondition=ekfac_preconditioner(factors, method=method))
    import json

    metrics = json.loads((out / "metrics.json").read_text())["Forward-INF influence"]
    # Both dense layers found, with their biases paired (no leaf left to the diagonal).
    assert metrics["K-FAC layers"] == "layers/0/w, layers/1/w"
    assert metrics["diagonal Fisher leaves"] == 0
    # float32 factors from two summation orders (per batch of 40 vs all at once) and
    # eigendecompositions: 1e-3 of the largest score (the scores span ~4 orders).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_gpt2_checkpoint_with_ekfac_and_cg(tmp_path_factory, tmp_path):
    """A Hugging Face GPT-2 folder from the CLI: EK-FAC (empirical Fisher, every attention
    and MLP projection found in the jaxpr) and CG on the Gauss-Newton matrix give the
    Python API's scores on the same data (the factors themselves are checked against
    float64 NumPy in test_influence_capture, the gradients against PyTorch in
    test_cli_methods)."""
    import json

    from memjax.data import open_source
    from memjax.influence import (
        causal_lm_loss,
        causal_lm_outputs,
        curvature_preconditioner,
        fit_kfac,
        forward_inf,
        gauss_newton_preconditioner,
        next_token_cross_entropy,
    )
    from tests import hf_tiny

    pytest.importorskip("transformers")
    folder, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    path = tmp_path / "texts.jsonl"
    corpus = [" ".join(t.split()[:3 + i]) for i, t in enumerate(hf_tiny.corpus(24)[::3][:8])]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    common = ["influence", "scores", "--model", str(folder), "--train", f"jsonl:{path}",
              "--test", f"jsonl:{path}", "--max-length", "16", "--mode", "first_order",
              "--lr", "1", "--batch-size", "8", "--no-progress"]
    model = memjax.load(folder)
    source = open_source(f"jsonl:{path}", model=model, max_length=16)
    rows = source.read(np.arange(8))
    fields = {k: rows[k] for k in ("input_ids", "attention_mask")}
    loss = functools.partial(causal_lm_loss, model.apply)
    for method in ("ekfac", "cg"):
        out = tmp_path / method
        assert main([*common, "--curvature", method, "--damping", "0.01", "--out",
                     str(out)]) == 0
        table = pq.read_table(out / "scores.parquet").to_pandas()
        got = np.stack([table[f"score[{t}]"] for t in range(8)])
        metrics = json.loads((out / "metrics.json").read_text())["Forward-INF influence"]
        if method == "ekfac":
            assert metrics["fisher"] == "empirical"  # the only one for a causal LM
            found = metrics["K-FAC layers"].split(", ")
            assert sum(p.endswith("c_attn/kernel") for p in found) == 2  # both blocks
            assert all(p.endswith("/kernel") for p in found)
            factors = fit_kfac(loss, model.params, source, method="ekfac", batch_size=8)
            precondition = curvature_preconditioner(factors, damping=0.01)
        else:
            outputs = functools.partial(causal_lm_outputs, model.apply)
            precondition, _ = gauss_newton_preconditioner(
                "cg", outputs, next_token_cross_entropy, loss, model.params, fields, fields,
                damping=0.01)
        want = forward_inf(loss, model.params, fields, source, mode="first_order", lr=1.0,
                           batch_size=8, precondition=precondition)
        assert np.all(np.isfinite(got)) and np.ptp(want) > 0
        # The same float32 program, but the CLI's and this call's factor sums and CG
        # iterations may run in another order: 1e-4 of the largest score.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_factorized_gradient_store_from_the_cli(mlp, tmp_path):
    """--factor-dim: LoGra's store (k² columns per dense layer of the saved MLP, from its
    activations and output gradients) equals the Python API's, and query ranks by it."""
    from memjax.engine import ScoreStore
    from memjax.influence import gradient_store, query_vectors

    folder, train, test = mlp
    store = tmp_path / "grads"
    assert main(["influence", "store", "--model", str(folder / "model"), "--train",
                 str(folder / "train.npz"), "--store", str(store), "--projection-dim", "8",
                 "--factor-dim", "4", "--batch-size", "40", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    rows = ScoreStore(store / "rows").read()["grad"]
    assert rows.shape == (N_TRAIN, 2 * 16)  # two dense layers (biases paired), no rest
    loaded = memjax.load(folder / "model")
    loss = functools.partial(cross_entropy_loss, loaded.apply)
    api = gradient_store(loss, loaded.params, train, tmp_path / "api", projection_dim=8,
                         factor_dim=4, batch_size=40).read()["grad"]
    np.testing.assert_allclose(rows, api, rtol=0, atol=1e-6 * np.abs(api).max())
    assert main(["influence", "query", "--store", str(store), "--test",
                 str(folder / "test.npz"), "--k", "3", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "q" / "scores.parquet").to_pydict()
    queries = np.asarray(query_vectors(loss, loaded.params, test, projection_dim=8,
                                       factor_dim=4), np.float64)
    scores = queries @ rows.astype(np.float64).T
    for t in range(N_TEST):
        assert table["supporting_ids"][t] == list(np.argsort(-scores[t], kind="stable")[:3])


def test_whitened_gradient_store(mlp, tmp_path):
    """store --curvature ekfac whitens every row by W = (F + λI)^(-1/2) (EK-FAC's basis, the
    square root of its damped eigenvalues) and query whitens the queries alike, so a score
    is (RᵀWg_i)·(RᵀWg_t), an estimate of g_iᵀ(F + λI)⁻¹g_t; W·W is the inverse exactly."""
    from memjax.engine import ScoreStore
    from memjax.influence import curvature_preconditioner, fit_kfac, query_vectors

    folder, train, test = mlp
    store = tmp_path / "grads"
    assert main(["influence", "store", "--model", str(folder / "model"), "--train",
                 str(folder / "train.npz"), "--store", str(store), "--projection-dim", "256",
                 "--curvature", "ekfac", "--fisher", "empirical", "--damping", "0.05",
                 "--batch-size", "40", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["influence", "query", "--store", str(store), "--test",
                 str(folder / "test.npz"), "--k", "3", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    rows = ScoreStore(store / "rows").read()["grad"].astype(np.float64)
    loaded = memjax.load(folder / "model")
    loss = functools.partial(cross_entropy_loss, loaded.apply)
    factors = fit_kfac(loss, loaded.params, train, method="ekfac", batch_size=40)
    half = curvature_preconditioner(factors, 0.05, power=-0.5)
    inverse = curvature_preconditioner(factors, 0.05)
    grads = jax.grad(loss)(loaded.params, {k: v[0] for k, v in train.items()})
    twice = jax.tree.leaves(half(half(grads)))
    for a, b in zip(twice, jax.tree.leaves(inverse(grads)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())  # float32
    queries = np.asarray(query_vectors(loss, loaded.params, test, projection_dim=256,
                                       precondition=half), np.float64)
    scores = queries @ rows.T
    table = pq.read_table(tmp_path / "q" / "scores.parquet").to_pydict()
    for t in range(N_TEST):
        assert table["supporting_ids"][t] == list(np.argsort(-scores[t], kind="stable")[:3])
    # The whitened rows estimate the EK-FAC influence g_iᵀ(F + λI)⁻¹g_t: with k = 256 for
    # P = 460 parameters the estimate correlates with the exact product (measured 0.97).
    exact = np.stack([[float(sum(np.vdot(a, b) for a, b in zip(
        jax.tree.leaves(inverse(jax.grad(loss)(loaded.params, {k: v[t] for k, v in
                                                               test.items()}))),
        jax.tree.leaves(jax.grad(loss)(loaded.params, {k: v[i] for k, v in train.items()})),
        strict=True))) for i in range(N_TRAIN)] for t in range(N_TEST)])
    correlation = np.mean([np.corrcoef(exact[t], scores[t])[0, 1] for t in range(N_TEST)])
    print(f"whitened store vs exact EK-FAC influence: Pearson {correlation:.3f}")
    assert correlation > 0.8
