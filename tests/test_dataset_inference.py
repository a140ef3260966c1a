"""Dataset inference's three aggregators (memjax.mia._inference) against their reference
pipelines re-implemented here from the reference code's procedure (scikit-learn
StandardScaler / LogisticRegression / MinMaxScaler / KFold, scipy's ttest_ind, NumPy) on the
same features and the same splits (drawn from the seed in the documented order); p-value
curves, smallest_n, false-positive mode, and ``memjax mia di`` end to end."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from memjax.cli import Parser, _distributed, _mia_di, _run, subcommands
from memjax.errors import InputError
from memjax.mia import _inference as di


def _welch(a, b, alternative="two-sided"):
    return stats.ttest_ind(a, b, equal_var=False, alternative=alternative)


# ----------------------------------------------------------------------------- cdi reference


def _ref_cdi_scores(xs, xv, perm_s, perm_v, folds=5):
    """CDI's cdi_perf.get_data_attack: per KFold fold, StandardScaler on the other folds of
    both sets, liblinear L2 logistic regression (C=1), predict_proba on the fold. Folds: the
    permuted positions split by KFold without shuffling (memjax's documented folds).
    liblinear run to tol 1e-12 so that both sides are the optimum of the same objective."""
    ss, sv = np.empty(len(xs)), np.empty(len(xv))
    coefs = []
    splits = zip(KFold(folds).split(perm_s), KFold(folds).split(perm_v), strict=True)
    for (tr_s, te_s), (tr_v, te_v) in splits:
        a, b = perm_s[tr_s], perm_v[tr_v]
        train = np.r_[xs[a], xv[b]]
        scaler = StandardScaler().fit(train)
        clf = LogisticRegression(solver="liblinear", tol=1e-12, max_iter=100_000,
                                 random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn deprecation notes on liblinear
            clf.fit(scaler.transform(train), np.r_[np.ones(len(a)), np.zeros(len(b))])
        ss[perm_s[te_s]] = clf.predict_proba(scaler.transform(xs[perm_s[te_s]]))[:, 1]
        sv[perm_v[te_v]] = clf.predict_proba(scaler.transform(xv[perm_v[te_v]]))[:, 1]
        coefs.append(np.r_[clf.coef_[0], clf.intercept_])
    return ss, sv, np.array(coefs)


def _ref_cdi_split(xs, xv, fit_s, fit_v, held_s, held_v):
    """CDI's CDIComputer / features_ablation.get_data_attack: StandardScaler on the fitting
    rows of both sets, scikit-learn's default LogisticRegression (lbfgs, C=1, intercept not
    penalised) on them, predict_proba on the held-out rows. lbfgs run to tol 1e-14 so that
    both sides are the optimum of the same objective."""
    train = np.r_[xs[fit_s], xv[fit_v]]
    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(tol=1e-14, max_iter=100_000)
    clf.fit(scaler.transform(train), np.r_[np.ones(len(fit_s)), np.zeros(len(fit_v))])
    a = clf.predict_proba(scaler.transform(xs[held_s]))[:, 1]
    b = clf.predict_proba(scaler.transform(xv[held_v]))[:, 1]
    return a, b, np.r_[clf.coef_[0], clf.intercept_]


def test_cdi_split_matches_reference_pipeline(rng):
    seed = int(rng.integers(1 << 30))
    xs = rng.normal(0.3, 1.0, (53, 4))
    xv = rng.normal(0.0, 1.5, (41, 4))
    xv[:, 3] = 2.0  # a constant validation column: the scaler's std stays > 0 pooled
    sizes, resamples = [2, 9, 33], 3
    res = di.dataset_inference(xs, xv, method="cdi", seed=seed, curve_sizes=sizes,
                               resamples=resamples)
    assert res.cdi_scoring == "split" and res.alternative == "two-sided"
    g = np.random.default_rng(seed)
    perm_s, perm_v = g.permutation(53), g.permutation(41)
    ms, mv = 11, 8  # round(0.2 * 53) and round(0.2 * 41): the reference's fifth
    assert (di.fit_rows(53, 0.2), di.fit_rows(41, 0.2)) == (ms, mv)
    a, b, coef = _ref_cdi_split(xs, xv, perm_s[:ms], perm_v[:mv], perm_s[ms:], perm_v[mv:])
    # lbfgs stops short of the optimum even at tol 1e-14 (memjax's Newton at rounding).
    # Over 20 seeds: scores within 1.7e-7, weights and bias within 1.2e-7, t within 2.1e-7
    # relative, p-values within 8.9e-6 relative (small p amplifies the t error; curve
    # p-values 6.9e-6); tolerances 5-11x.
    np.testing.assert_allclose(res.scores_suspect, a, atol=1e-6)
    np.testing.assert_allclose(res.scores_val, b, atol=1e-6)
    np.testing.assert_allclose(res.weights, coef[:-1], atol=1e-6)
    assert res.bias == pytest.approx(coef[-1], abs=1e-6)
    np.testing.assert_array_equal(res.heldout_suspect, perm_s[ms:])
    np.testing.assert_array_equal(res.heldout_val, perm_v[mv:])
    ref = _welch(a, b)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-4)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-6)
    # The curve: subsets of the held-out scores, the model not refitted; mean p-value.
    ref_p = np.array([[_welch(a[g.choice(42, n, replace=False)],
                              b[g.choice(33, n, replace=False)]).pvalue
                       for _ in range(resamples)] for n in sizes])
    np.testing.assert_allclose(res.curve_p_resamples, ref_p, rtol=1e-4)
    np.testing.assert_allclose(res.curve_p, ref_p.mean(1), rtol=1e-4)
    np.testing.assert_array_equal(res.curve_n, sizes)
    default = di.dataset_inference(xs, xv, method="cdi", seed=seed, resamples=1)
    np.testing.assert_array_equal(default.curve_n, di.reference_curve_sizes(33))


def test_cdi_split_is_calibrated_where_cross_fit_is_not():
    """The point of the split: under the null, cross-fitted scores give a t statistic
    biased negative and over-dispersed; held-out scores give a t statistic. 400 Gaussian
    nulls, 60 rows per set, 3 features (the data drawn from a stream other than the
    method's seed, so that the split does not depend on the data)."""
    t_split, t_cross = [], []
    for seed in range(400):
        g = np.random.default_rng([7, seed])
        xs, xv = g.normal(size=(60, 3)), g.normal(size=(60, 3))
        t_split.append(di.dataset_inference(xs, xv, method="cdi", seed=seed,
                                            curve_sizes=[2], resamples=1).statistic)
        t_cross.append(di.dataset_inference(xs, xv, method="cdi", cdi_scoring="cross-fit",
                                            seed=seed, curve_sizes=[5],
                                            resamples=1).statistic)
    # Measured on these seeds: split mean 0.02, sd 1.00 (Welch's t on 48 + 48 rows: 0 and
    # 1.01); cross-fit mean -0.23, sd 1.38. Standard errors over 400 draws: 0.05 for the
    # mean, 0.04 for the sd; the bounds sit 4 or more standard errors from both.
    assert abs(np.mean(t_split)) < 0.2 and 0.85 < np.std(t_split) < 1.17
    assert np.std(t_cross) > 1.2


def test_cdi_matches_reference_pipeline(rng):
    seed = int(rng.integers(1 << 30))
    xs = rng.normal(0.3, 1.0, (43, 4))
    xv = rng.normal(0.0, 1.5, (37, 4))
    xv[:, 3] = 2.0  # a constant validation column: the scaler's std stays > 0 pooled
    sizes, resamples = [5, 12], 3
    res = di.dataset_inference(xs, xv, method="cdi", cdi_scoring="cross-fit", seed=seed,
                               curve_sizes=sizes, resamples=resamples)
    assert res.cdi_scoring == "cross-fit"
    g = np.random.default_rng(seed)
    ss, sv, coefs = _ref_cdi_scores(xs, xv, g.permutation(43), g.permutation(37))
    # liblinear stops with a gradient of ~5e-8 even at tol 1e-12 (measured), memjax's
    # Newton at ~1e-14. Over 15 seeds: scores within 4.0e-8, fold-mean weights within
    # 5.0e-8, p-values within 1.4e-6 relative (curve p-values 2.3e-7); tolerances ~7-25x.
    np.testing.assert_allclose(res.scores_suspect, ss, atol=1e-6)
    np.testing.assert_allclose(res.scores_val, sv, atol=1e-6)
    np.testing.assert_allclose(res.weights, coefs[:, :-1].mean(0), atol=1e-6)
    np.testing.assert_allclose(res.bias, coefs[:, -1].mean(), atol=1e-6)
    np.testing.assert_array_equal(res.heldout_suspect, np.arange(43))
    ref = _welch(ss, sv)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-5, abs=1e-9)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-5)
    assert res.alternative == "two-sided" and res.test == "welch"
    ref_p = np.empty((2, resamples))
    for i, n in enumerate(sizes):
        for r in range(resamples):
            sub_s, sub_v = g.choice(43, n, replace=False), g.choice(37, n, replace=False)
            a, b, _ = _ref_cdi_scores(xs[sub_s], xv[sub_v], g.permutation(n), g.permutation(n))
            ref_p[i, r] = _welch(a, b).pvalue
    np.testing.assert_allclose(res.curve_p_resamples, ref_p, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(res.curve_p, ref_p.mean(1), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(res.curve_n, sizes)


def test_newton_reaches_the_liblinear_optimum(rng):
    x = rng.normal(0, 1, (3, 50, 4))
    y = (rng.random(50) < 0.5).astype(float)
    weight = (rng.random((3, 50)) < 0.8).astype(float)
    theta = di.fit_l2_logistic(x, y, weight, 0.7)
    for b in range(3):
        xb = np.c_[x[b], np.ones(50)]
        grad = theta[b] + 0.7 * xb.T @ (weight[b] * (expit(xb @ theta[b]) - y))
        # float64 Newton converged: the objective's gradient is at rounding level.
        assert np.abs(grad).max() < 1e-9
    # lbfgs's objective: the intercept is not penalised.
    theta = di.fit_l2_logistic(x, y, weight, 0.7, penalize_intercept=False)
    for b in range(3):
        xb = np.c_[x[b], np.ones(50)]
        grad = np.r_[theta[b, :-1], 0.0] + 0.7 * xb.T @ (weight[b] * (expit(xb @ theta[b]) - y))
        assert np.abs(grad).max() < 1e-9


# ----------------------------------------------------------------------------- iar reference


def _ref_iar(members, nonmembers):
    """The IAR code's preprocess_features + get_p_value (MinMaxScaler over both, sum,
    two-sided Welch)."""
    data = MinMaxScaler().fit_transform(np.concatenate([members, nonmembers]))
    a, b = data[: len(members)].sum(1), data[len(members):].sum(1)
    return a, b, _welch(a, b)


def test_iar_matches_reference_pipeline(rng):
    seed = int(rng.integers(1 << 30))
    xs = rng.normal(0.2, 1.0, (30, 5))
    xv = rng.normal(0.0, 1.0, (26, 5))
    xs[:, 2] = xv[:, 2] = 1.5  # constant feature: scaled to 0 by both
    sizes, resamples = [2, 7, 26], 4
    res = di.dataset_inference(xs, xv, method="iar", seed=seed, curve_sizes=sizes,
                               resamples=resamples)
    a, b, ref = _ref_iar(xs, xv)
    # Same float64 arithmetic up to operation order (x * (1/range) vs (x - min) / range).
    np.testing.assert_allclose(res.scores_suspect, a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.scores_val, b, rtol=1e-12, atol=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-9)
    np.testing.assert_array_equal(res.weights, np.ones(5))
    g = np.random.default_rng(seed)
    ref_p = np.array([[_ref_iar(xs[g.choice(30, n, replace=False)],
                                xv[g.choice(26, n, replace=False)])[2].pvalue
                       for _ in range(resamples)] for n in sizes])
    np.testing.assert_allclose(res.curve_p_resamples, ref_p, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(res.curve_p, ref_p.mean(1), rtol=1e-9)


@pytest.mark.parametrize("method", ["cdi", "cdi-cross-fit", "iar"])
@pytest.mark.parametrize("test,alternative", [("student", "greater"), ("welch", "greater"),
                                              ("student", "two-sided")])
def test_tests_and_alternatives(method, test, alternative, rng):
    xs, xv = rng.normal(0.1, 1, (20, 3)), rng.normal(0, 1, (24, 3))
    scoring = "cross-fit" if method.endswith("cross-fit") else "split"
    res = di.dataset_inference(xs, xv, method=method[:3], cdi_scoring=scoring, test=test,
                               alternative=alternative, curve_sizes=[10], resamples=1)
    ref = stats.ttest_ind(res.scores_suspect, res.scores_val, equal_var=test == "student",
                          alternative=alternative)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert (res.test, res.alternative) == (test, alternative)


@pytest.mark.parametrize("method", ["maini", "cdi", "cdi-cross-fit", "iar"])
def test_power_and_false_positive_mode(method, rng):
    """A clear shift is found (p < 1e-3); false-positive mode ignores the suspect set and
    runs on two halves of the validation set."""
    xs = rng.normal(0.8, 1.0, (200, 3))
    xv = rng.normal(0.0, 1.0, (200, 3))
    kw = dict(method=method.split("-")[0], resamples=2, epochs=200,
              cdi_scoring="cross-fit" if method.endswith("cross-fit") else "split")
    res = di.dataset_inference(xs, xv, **kw)
    # 0.8 sd shift on 3 features, 100-200 rows per set: t ~ 10, p ~ 1e-20.
    assert res.p_value < 1e-3 and res.statistic > 0
    fp = di.dataset_inference(xs, xv, false_positive=True, seed=4, **kw)
    fp2 = di.dataset_inference(xs + 100.0, xv, false_positive=True, seed=4, **kw)
    assert fp.p_value == fp2.p_value  # the suspect set is not used
    assert np.isin(fp.heldout_suspect, np.arange(200)).all()
    assert not np.intersect1d(fp.heldout_suspect, fp.heldout_val).size
    perm = np.random.default_rng(4).permutation(200)
    if method == "iar":  # no draws after the permutation: the halves themselves
        assert fp.p_value == pytest.approx(_ref_iar(xv[perm[:100]], xv[perm[100:]])[2].pvalue,
                                           rel=1e-9)


def test_smallest_n_and_curves(rng):
    assert di.smallest_n(([5, 10, 20, 50], [0.3, 0.009, 0.02, 0.001])) == 10
    assert di.smallest_n(([5, 10], [0.3, 0.2]), p=0.01) is None
    assert di.smallest_n(([5, 10], [0.3, 0.04]), p=0.05) == 10
    xs, xv = rng.normal(1.0, 1, (60, 2)), rng.normal(0, 1, (60, 2))
    res = di.dataset_inference(xs, xv, method="iar", resamples=5)
    np.testing.assert_array_equal(res.curve_n, di.reference_curve_sizes(60))
    expect = res.curve_n[res.curve_p <= 0.01]
    assert res.smallest_n() == (int(expect.min()) if expect.size else None)
    np.testing.assert_array_equal(di.reference_curve_sizes(25, 5),
                                  [5, 6, 7, 8, 9, 10, 20, 25])
    np.testing.assert_array_equal(di.reference_curve_sizes(1000)[-3:], [800, 900, 1000])
    np.testing.assert_array_equal(di.kfold_bounds(12, 5), [0, 3, 6, 8, 10, 12])
    with pytest.raises(InputError, match="curve: sizes and p_values differ"):
        di.smallest_n(([1, 2], [0.1]))
    with pytest.raises(InputError, match="p: expected"):
        di.smallest_n(([1], [0.1]), p=1.5)


def test_method_errors(rng):
    x = rng.normal(size=(10, 2))
    with pytest.raises(InputError, match="method="):
        di.dataset_inference(x, x, method="lira")
    with pytest.raises(InputError, match="folds: expected an integer >= 2"):
        di.dataset_inference(x, x, method="cdi", folds=1)
    with pytest.raises(InputError, match="features_val: expected at least 5 rows"):
        di.dataset_inference(x, x[:4], method="cdi", cdi_scoring="cross-fit")
    with pytest.raises(InputError, match="features_val: expected at least 3 rows"):
        di.dataset_inference(x, x[:2], method="cdi")
    with pytest.raises(InputError, match="fit_fraction=0.04: fits 0 of the 10 rows"):
        di.dataset_inference(x, x, method="cdi", fit_fraction=0.04)
    with pytest.raises(InputError, match="fit_fraction=0.9: fits 9 of the 10 rows"):
        di.dataset_inference(x, x, method="cdi", fit_fraction=0.9)
    with pytest.raises(InputError, match="fit_fraction: expected"):
        di.dataset_inference(x, x, method="cdi", fit_fraction=0.0)
    with pytest.raises(InputError, match="cdi_scoring="):
        di.dataset_inference(x, x, method="cdi", cdi_scoring="kfold")
    with pytest.raises(InputError, match="sizes: expected"):
        di.dataset_inference(x, x, method="cdi", cdi_scoring="cross-fit", curve_sizes=[4])
    with pytest.raises(InputError, match="sizes: expected"):  # 8 held out of 10
        di.dataset_inference(x, x, method="cdi", curve_sizes=[9])
    with pytest.raises(InputError, match="resamples"):
        di.dataset_inference(x, x, method="iar", resamples=0)
    with pytest.raises(InputError, match="c: expected"):
        di.dataset_inference(x, x, method="cdi", c=0.0)


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    """``memjax mia di`` through the CLI's own runner (exit codes, error handling)."""
    parser = Parser(prog="memjax")
    mia = parser.add_subparsers(dest="command").add_parser("mia")
    _mia_di.register(mia.add_subparsers(dest="attack"))
    for leaf in subcommands(parser).values():  # as memjax.cli.build_parser does
        _distributed.add_options(leaf)
    return _run(parser, argv)


def _write(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _read(out):
    import pyarrow.parquet as pq

    metrics = json.loads((out / "metrics.json").read_text())[_mia_di.TITLE]
    return metrics, pq.read_table(out / "p_value_curve.parquet").to_pydict()


@pytest.mark.parametrize("method", ["cdi", "iar"])
def test_cli_end_to_end(method, tmp_path, rng):
    n = 60
    member = rng.random(n) < 0.5
    f = rng.normal(size=(n, 3)) + 0.7 * member[:, None]
    _write(tmp_path / "t.parquet", {"id": np.arange(n), "name": [f"x{i}" for i in range(n)],
                                    "loss": f[:, 0], "zlib": f[:, 1], "k": f[:, 2],
                                    "member": member})
    out = tmp_path / "out"
    assert _cli(["mia", "di", "--features", str(tmp_path / "t.parquet"), "--member-column",
                 "member", "--method", method, "--resamples", "3", "--seed", "5",
                 "--out", str(out)]) == 0
    metrics, curve = _read(out)
    res = di.dataset_inference(f[member], f[~member], method=method, resamples=3, seed=5)
    fp = di.dataset_inference(f[member], f[~member], method=method, resamples=3, seed=5,
                              false_positive=True)
    # Same computation; cdi's BLAS sums may round differently with the arrays' alignment.
    assert metrics["p-value"] == pytest.approx(res.p_value, rel=1e-9)
    assert metrics["t statistic"] == pytest.approx(res.statistic, rel=1e-9)
    assert metrics["features"] == 3
    assert metrics["method"] == ("cdi (split)" if method == "cdi" else method)
    assert metrics["smallest n with p <= 0.01"] == res.smallest_n(0.01)
    assert metrics["p-value (false-positive check on the validation set)"] == pytest.approx(
        fp.p_value, rel=1e-9)
    np.testing.assert_array_equal(curve["n"], res.curve_n)
    np.testing.assert_allclose(curve["p_value"], res.curve_p, rtol=1e-9)
    assert (out / "p_value_curve.png").stat().st_size > 0
    # Two tables, chosen columns, Student, one-sided.
    _write(tmp_path / "s.parquet", {"id": np.arange(member.sum()), "loss": f[member, 0],
                                    "k": f[member, 2]})
    _write(tmp_path / "v.parquet", {"k": f[~member, 2], "loss": f[~member, 0]})
    out2 = tmp_path / "out2"
    assert _cli(["mia", "di", "--suspect", str(tmp_path / "s.parquet"), "--validation",
                 str(tmp_path / "v.parquet"), "--columns", "k", "loss", "--method", method,
                 "--test", "student", "--alternative", "greater", "--resamples", "2",
                 "--out", str(out2)]) == 0
    res2 = di.dataset_inference(f[member][:, [2, 0]], f[~member][:, [2, 0]], method=method,
                                test="student", alternative="greater", resamples=2)
    assert _read(out2)[0]["p-value"] == pytest.approx(res2.p_value, rel=1e-9)


def test_cli_cdi_cross_fit_warns(tmp_path, rng, capsys):
    n = 50
    member = np.arange(n) < 25
    f = rng.normal(size=(n, 2)) + 0.5 * member[:, None]
    _write(tmp_path / "t.parquet", {"a": f[:, 0], "b": f[:, 1], "m": member})
    base = ["mia", "di", "--features", str(tmp_path / "t.parquet"), "--member-column", "m",
            "--method", "cdi", "--resamples", "2"]
    assert _cli([*base, "--out", str(tmp_path / "split"), "--fit-fraction", "0.4"]) == 0
    assert "warning" not in capsys.readouterr().err
    split = di.dataset_inference(f[member], f[~member], method="cdi", fit_fraction=0.4,
                                 resamples=2)
    assert _read(tmp_path / "split")[0]["p-value"] == pytest.approx(split.p_value, rel=1e-9)
    assert _cli([*base, "--out", str(tmp_path / "cross"), "--cdi-scoring", "cross-fit"]) == 0
    assert _mia_di.CROSS_FIT_WARNING in capsys.readouterr().err
    metrics = _read(tmp_path / "cross")[0]
    cross = di.dataset_inference(f[member], f[~member], method="cdi", cdi_scoring="cross-fit",
                                 resamples=2)
    assert metrics["method"] == "cdi (cross-fit)"
    assert metrics["p-value"] == pytest.approx(cross.p_value, rel=1e-9)
    assert "anti-conservative" in (tmp_path / "cross" / "index.html").read_text()
    assert _cli([*base, "--out", str(tmp_path / "bad"), "--fit-fraction", "1.5"]) == 2
    assert "--fit-fraction" in capsys.readouterr().err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    n = 12
    _write(tmp_path / "t.parquet", {"id": np.arange(n), "a": np.arange(n, dtype=float),
                                    "label": ["x"] * n, "m": np.arange(n) % 2,
                                    "three": np.arange(n) % 3, "b": np.ones(n)})
    _write(tmp_path / "tiny.parquet", {"a": [1.0, 2.0, 3.0], "m": [1, 0, 1]})
    (tmp_path / "junk.parquet").write_text("not parquet")
    t, out = str(tmp_path / "t.parquet"), str(tmp_path / "o")
    cases = [
        (["--features", t, "--member-column", "m"], "column 'label' is string, not numeric"),
        (["--features", t, "--member-column", "m", "--columns", "a", "nope"],
         "no column 'nope'"),
        (["--features", t, "--member-column", "zz", "--columns", "a"],
         "--member-column 'zz': no such column"),
        (["--features", t, "--member-column", "three", "--columns", "a"],
         "expected true/false or 1/0"),
        (["--features", t, "--columns", "a"], "--member-column is required"),
        (["--features", t, "--member-column", "m", "--suspect", t, "--columns", "a"],
         "not both"),
        (["--suspect", t], "give both"),
        (["--features", str(tmp_path / "missing.parquet"), "--member-column", "m"],
         "no such file"),
        (["--features", str(tmp_path / "junk.parquet"), "--member-column", "m"],
         "not a readable Parquet table"),
        (["--features", str(tmp_path / "tiny.parquet"), "--member-column", "m", "--method",
          "iar"], "features_val: expected at least 2 rows"),
    ]
    for extra, message in cases:
        assert _cli(["mia", "di", *extra, "--out", out]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
