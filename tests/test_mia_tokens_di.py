"""Token-level MIAs and dataset inference vs independent float64 NumPy implementations."""

from __future__ import annotations

import zlib as zlib_mod

import numpy as np
import pytest
from scipy import stats

from memjax.errors import InputError
from memjax.mia import _inference as di
from memjax.mia import _tokens as tokens


def _random_tokens(rng, n=7, t=13):
    logp = -rng.exponential(2.0, (n, t))
    # Ties: repeat a few values within rows.
    logp[:, 1] = logp[:, 0]
    logp[::2, 2] = logp[::2, 0]
    mask = rng.random((n, t)) < 0.7
    mask[:, 0] = True
    mask[0] = False
    mask[0, 3] = True  # a row with a single token
    mask[1] = True  # a full row
    logp[~mask] = np.nan  # padding must never be read
    return logp, mask


def _ref_lowest_k_mean(values, mask, k):
    out = []
    for row, m in zip(values, mask, strict=True):
        v = sorted(row[m].tolist())
        cnt = max(1, int(len(v) * k))
        out.append(np.mean(v[:cnt]))
    return np.array(out)


@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0])
def test_min_k_matches_reference(k, rng):
    logp, mask = _random_tokens(rng)
    got = tokens.min_k(logp, mask, k)
    np.testing.assert_allclose(got, _ref_lowest_k_mean(logp, mask, k), rtol=1e-12)
    assert got[0] == logp[0, 3]  # single-token row: the token itself
    if k == 1.0:
        np.testing.assert_allclose(got, [r[m].mean() for r, m in zip(logp, mask, strict=True)])


def test_min_k_all_ties_and_float_count():
    logp = np.full((2, 10), -1.5)
    mask = np.ones((2, 10), bool)
    np.testing.assert_allclose(tokens.min_k(logp, mask, 0.3), [-1.5, -1.5])
    # 10 * 0.3 = 3.0000000000000004 -> 3 tokens, like mimir's int(len * k).
    row = np.arange(10.0)[None] - 10
    np.testing.assert_allclose(tokens.min_k(row, np.ones((1, 10), bool), 0.3), [-9.0])


@pytest.mark.parametrize("k", [0.1, 0.2, 1.0])
def test_min_k_plus_plus_matches_reference(k, rng):
    logp, mask = _random_tokens(rng)
    mu = -rng.exponential(3.0, logp.shape)
    sigma = rng.exponential(1.0, logp.shape)
    sigma[1, 4] = 0.0  # floored at SIGMA_EPS
    mu[~mask] = np.nan
    z = (np.nan_to_num(logp) - np.nan_to_num(mu)) / np.maximum(sigma, tokens.SIGMA_EPS)
    got = tokens.min_k_plus_plus(logp, mu, sigma, mask, k)
    np.testing.assert_allclose(got, _ref_lowest_k_mean(z, mask, k), rtol=1e-12)
    assert np.isfinite(got).all()


def test_loss_zlib_reference(rng):
    ml = rng.exponential(2.0, 4)
    np.testing.assert_array_equal(tokens.loss(ml), -ml)
    texts = ["the cat sat on the mat", "a" * 500, "Ünïcödé ✓ text 日本語", ""]
    lens = [len(zlib_mod.compress(bytes(t, "utf-8"))) for t in texts]
    np.testing.assert_array_equal(tokens.zlib_entropy(texts), lens)
    np.testing.assert_allclose(tokens.zlib(ml, texts), -ml / np.array(lens), rtol=1e-15)
    # Repetitive text compresses well, so the same loss gives a more negative score.
    assert tokens.zlib([1.0, 1.0], ["a" * 500, "the cat sat on the mat"])[0] < -1 / 30
    ref = rng.exponential(2.0, 4)
    np.testing.assert_allclose(tokens.reference(ml, ref), ref - ml)


def test_token_features_match_loops(rng):
    """Dataset-inference features: LOSS, zlib, then Min-K%, Max-K% and Min-K%++ per k, each
    against a per-row float64 loop (Max-K%: the mean of the highest k-fraction)."""
    logp, mask = _random_tokens(rng)
    mu = -rng.exponential(3.0, logp.shape)
    sigma = rng.exponential(1.0, logp.shape) + 0.1
    mean_loss = rng.exponential(2.0, logp.shape[0])
    texts = [f"text {i} " * (i + 1) for i in range(logp.shape[0])]
    ks = (0.1, 0.5)
    got, names = tokens.token_features(logp, mu, sigma, mask, mean_loss, texts, ks=ks)
    assert names == ["LOSS", "zlib", "Min-K% 0.1", "Max-K% 0.1", "Min-K%++ 0.1",
                     "Min-K% 0.5", "Max-K% 0.5", "Min-K%++ 0.5"]
    z = (logp - mu) / sigma
    want = [-mean_loss,
            -mean_loss / np.array([len(zlib_mod.compress(t.encode())) for t in texts])]
    for k in ks:
        highest = []
        for row, m in zip(logp, mask, strict=True):
            v = sorted(row[m].tolist(), reverse=True)
            highest.append(np.mean(v[:max(1, int(len(v) * k))]))
        want += [_ref_lowest_k_mean(logp, mask, k), np.array(highest),
                 _ref_lowest_k_mean(z, mask, k)]
    np.testing.assert_allclose(got, np.stack(want, 1), rtol=1e-12)
    # Without texts there is no zlib column.
    assert tokens.token_features(logp, mu, sigma, mask, mean_loss, ks=ks)[1][1] == "Min-K% 0.1"


def test_token_errors():
    logp = np.zeros((2, 3))
    mask = np.ones((2, 3), bool)
    with pytest.raises(InputError, match="mask: expected a boolean"):
        tokens.min_k(logp, mask.astype(int), 0.2)
    with pytest.raises(InputError, match=r"mask: expected shape \(2, 3\)"):
        tokens.min_k(logp, mask[:, :2], 0.2)
    bad = mask.copy()
    bad[1] = False
    with pytest.raises(InputError, match="mask: row 1 has no masked-in token"):
        tokens.min_k(logp, bad, 0.2)
    with pytest.raises(InputError, match="k: expected a number in"):
        tokens.min_k(logp, mask, 0.0)
    with pytest.raises(InputError, match="k: expected a number in"):
        tokens.min_k(logp, mask, 1.5)
    nan = logp.copy()
    nan[0, 1] = np.nan
    with pytest.raises(InputError, match=r"token_logp: expected finite.*\(0, 1\)"):
        tokens.min_k(nan, mask, 0.2)
    with pytest.raises(InputError, match="token_logp: expected a 2-D"):
        tokens.min_k(np.zeros(3), mask, 0.2)
    with pytest.raises(InputError, match="sigma: expected shape"):
        tokens.min_k_plus_plus(logp, logp, np.ones((2, 4)), mask)
    with pytest.raises(InputError, match="sigma: expected non-negative"):
        tokens.min_k_plus_plus(logp, logp, -np.ones((2, 3)), mask)
    with pytest.raises(InputError, match="mu: expected finite"):
        tokens.min_k_plus_plus(logp, np.full((2, 3), np.inf), np.ones((2, 3)), mask)
    with pytest.raises(InputError, match="texts: expected 2 strings"):
        tokens.zlib([1.0, 2.0], ["a"])
    with pytest.raises(InputError, match="texts: expected str at index 1"):
        tokens.zlib([1.0, 2.0], ["a", b"b"])
    with pytest.raises(InputError, match="mean_loss: expected finite"):
        tokens.loss([1.0, np.inf])
    with pytest.raises(InputError, match="mean_loss: expected a non-empty"):
        tokens.loss([])
    with pytest.raises(InputError, match="ref_loss: expected shape"):
        tokens.reference([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- dataset inference


def _ref_dataset_inference(xs, xv, res, clip, epochs, lr):
    """Independent float64 pipeline given the held-out indices memjax chose."""
    ts = np.setdiff1d(np.arange(len(xs)), res.heldout_suspect)
    tv = np.setdiff1d(np.arange(len(xv)), res.heldout_val)
    train = np.concatenate([xs[ts], xv[tv]])
    lo, hi = np.quantile(train, [clip, 1 - clip], axis=0)
    ctrain = np.clip(train, lo, hi)
    mean, std = ctrain.mean(0), ctrain.std(0)
    x = (ctrain - mean) / std
    y = np.r_[np.ones(len(ts)), np.zeros(len(tv))]
    theta = np.zeros(x.shape[1] + 1)
    xb = np.c_[x, np.ones(len(x))]
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    for t in range(1, epochs + 1):  # Adam as in optax (b1=.9, b2=.999, eps=1e-8)
        g = xb.T @ (1 / (1 + np.exp(-xb @ theta)) - y) / len(y)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        theta -= lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8)

    def score(z):
        return ((np.clip(z, lo, hi) - mean) / std) @ theta[:-1] + theta[-1]

    return theta, score(xs[res.heldout_suspect]), score(xv[res.heldout_val])


def test_dataset_inference_shifted_matches_reference(rng):
    xs = rng.normal(0.3, 1.0, (1000, 5))
    xv = rng.normal(0.0, 1.0, (1000, 5))
    xs[:, 4] = rng.standard_t(2, 1000)  # heavy tails: clipping matters
    res = di.dataset_inference(xs, xv, seed=3)
    assert res.p_value < 0.01 and res.statistic > 0
    assert res.scores_suspect.shape == (500,) and res.scores_val.shape == (500,)
    # Held-out halves are disjoint from the training halves and cover half of each set.
    assert len(np.unique(res.heldout_suspect)) == 500 and len(np.unique(res.heldout_val)) == 500
    theta, ss, sv = _ref_dataset_inference(xs, xv, res, 0.025, 1000, 0.01)
    # Measured over 60 fresh seeds (|weights| ~0.5, |scores| ~2): weights within 1.9e-5 of
    # the float64 Adam path, the bias within 4.6e-3 (58 of 60 seeds below 7.5e-4), the
    # scores minus the bias within 4.6e-5. Near the optimum the bias's gradient, a float32
    # mean of 1000 terms (p - y), is rounding noise, and Adam's normalised step m/sqrt(v)
    # turns noise into steps of up to lr = 0.01: the bias drifts apart from the float64
    # path by a fraction of lr, and every score carries the same offset. The weights'
    # gradients stay far above the noise, so they converge alike. Tolerances: ~5x the
    # measured maximum for the weights and the bias-free scores; the bias and the scores
    # keep their tolerances (the bias's is already close to its measured maximum).
    np.testing.assert_allclose(res.weights, theta[:-1], atol=1e-4)
    np.testing.assert_allclose(res.bias, theta[-1], atol=5e-3)  # float32 Adam jitter
    np.testing.assert_allclose(res.scores_suspect, ss, atol=1e-2)
    np.testing.assert_allclose(res.scores_val, sv, atol=1e-2)
    np.testing.assert_allclose(res.scores_suspect - res.bias, ss - theta[-1], atol=2e-4)
    np.testing.assert_allclose(res.scores_val - res.bias, sv - theta[-1], atol=2e-4)
    # Deterministic by seed.
    again = di.dataset_inference(xs, xv, seed=3)
    np.testing.assert_array_equal(again.scores_suspect, res.scores_suspect)
    # The p-value curve: nested prefixes, ends at the full-set p-value, decreases (weakly).
    np.testing.assert_array_equal(res.curve_n, [10, 20, 50, 100, 200, 500])
    assert res.curve_p[-1] == pytest.approx(res.p_value)
    assert res.curve_p[-1] <= res.curve_p.min() + 1e-300
    assert res.curve_p[-1] < res.curve_p[0]
    assert res.curve_p[3] == pytest.approx(
        stats.ttest_ind(res.scores_suspect[:100], res.scores_val[:100], equal_var=False,
                        alternative="greater").pvalue)


@pytest.mark.parametrize("test", ["welch", "student"])
@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_t_tests_match_scipy(test, alternative, rng):
    xs = rng.normal(0.1, 1.5, (300, 3))
    xv = rng.normal(0.0, 1.0, (200, 3))
    res = di.dataset_inference(xs, xv, test=test, alternative=alternative, epochs=200)
    ref = stats.ttest_ind(res.scores_suspect, res.scores_val, equal_var=(test == "student"),
                          alternative=alternative)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)


def test_identical_distributions_not_significant():
    data = np.random.default_rng(1234)
    xs = data.normal(0.0, 1.0, (1000, 4))
    xv = data.normal(0.0, 1.0, (1000, 4))
    assert di.dataset_inference(xs, xv, seed=0).p_value > 0.05
    # False-positive mode ignores the (here strongly shifted) suspect set: across seeds the
    # p-value is roughly uniform, so only a few land below 0.05.
    shifted = xs + 1.0
    ps = np.array([di.dataset_inference(shifted, xv, seed=s, false_positive=True).p_value
                   for s in range(20)])
    assert (ps < 0.05).sum() <= 4
    assert 0.2 < np.median(ps) < 0.8
    fp = di.dataset_inference(shifted, xv, seed=0, false_positive=True)
    assert set(fp.heldout_suspect).isdisjoint(fp.heldout_val)
    assert fp.scores_suspect.shape == (250,) and fp.scores_val.shape == (250,)


def test_p_value_curve_and_sizes(rng):
    np.testing.assert_array_equal(di.default_curve_sizes(7), [7])
    np.testing.assert_array_equal(di.default_curve_sizes(10), [10])
    np.testing.assert_array_equal(di.default_curve_sizes(1234),
                                  [10, 20, 50, 100, 200, 500, 1000, 1234])
    s, v = rng.normal(1, 1, 40), rng.normal(0, 1, 30)
    ns, ps = di.p_value_curve(s, v, [5, 30], test="student")
    np.testing.assert_allclose(ps, [stats.ttest_ind(s[:n], v[:n], alternative="greater").pvalue
                                    for n in (5, 30)], rtol=1e-12)
    with pytest.raises(InputError, match="sizes: expected"):
        di.p_value_curve(s, v, [31])


def test_dataset_inference_errors():
    x = np.zeros((10, 3))
    with pytest.raises(InputError, match="features_val: expected 3 features"):
        di.dataset_inference(x, np.zeros((10, 2)))
    with pytest.raises(InputError, match="features_suspect: expected a \\[N, F\\]"):
        di.dataset_inference(np.zeros(10), x)
    nan = x.copy()
    nan[2, 1] = np.nan
    with pytest.raises(InputError, match=r"features_val: expected finite.*\(2, 1\)"):
        di.dataset_inference(x, nan)
    with pytest.raises(InputError, match="test=.*: expected one of"):
        di.dataset_inference(x, x, test="z")
    with pytest.raises(InputError, match="alternative=.*: expected one of"):
        di.dataset_inference(x, x, alternative="less")
    with pytest.raises(InputError, match="clip: expected"):
        di.dataset_inference(x, x, clip=0.5)
    with pytest.raises(InputError, match="epochs: expected"):
        di.dataset_inference(x, x, epochs=0)
    with pytest.raises(InputError, match="lr: expected"):
        di.dataset_inference(x, x, lr=-1.0)
    with pytest.raises(InputError, match="features_suspect: expected at least 4 rows"):
        di.dataset_inference(x[:3], x)
    with pytest.raises(InputError, match="features_val: expected at least 8 rows"):
        di.dataset_inference(x, x[:7], false_positive=True)
