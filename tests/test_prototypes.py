"""DPPL (Wahdany et al., NeurIPS 2024): the mechanisms against independent float64 NumPy /
SciPy implementations, their noise scales against the stated formulas, empirical checks of
the Gaussian (KS) and exponential (chi-square) mechanisms' output distributions, the
accounting conversions, the engine runner and ``memjax prototypes`` end to end."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats

from memjax.errors import InputError
from memjax.prototypes import (
    COINPRESS_SPLIT,
    analytic_gaussian_delta,
    analytic_gaussian_sigma,
    class_sums,
    classify,
    clip_embeddings,
    dppl_mean,
    dppl_public,
    embed,
    epsilon_to_zcdp,
    evaluate_prototypes,
    exponential_epsilon_of_zcdp,
    exponential_mechanism,
    exponential_mechanism_scale,
    gaussian_sigma,
    gaussian_sigma_zcdp,
    prototype_membership_scores,
    public_utilities,
    pure_epsilon_to_zcdp,
    zcdp_budget,
    zcdp_to_epsilon,
)

# float32 on device against float64 NumPy on values of order 1-100: 1e-5 relative
# (a few float32 ulps accumulated over sums of up to ~50 terms).
F32 = {"rtol": 1e-5, "atol": 1e-5}


def unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def random_set(rng, n=60, d=7, k=4):
    # Varied norms (0.1 .. 10) so both normalising and clipping do something.
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, size=(n, 1))
    return x.astype(np.float32), rng.integers(0, k, n), k


# ---------------------------------------------------------------- accounting


def test_zcdp_conversions_match_their_formulas(rng):
    for _ in range(20):
        rho, delta = rng.uniform(1e-4, 5.0), 10.0 ** rng.uniform(-9, -2)
        eps = rho + 2.0 * np.sqrt(rho * np.log(1.0 / delta))  # Bun & Steinke Prop. 1.3
        assert zcdp_to_epsilon(rho, delta) == pytest.approx(eps, rel=1e-12)
        # The inverse is exact algebra: float64 round trip.
        assert epsilon_to_zcdp(eps, delta) == pytest.approx(rho, rel=1e-9)
        sens = rng.uniform(0.1, 3.0)
        assert gaussian_sigma_zcdp(rho, sens) == pytest.approx(sens / np.sqrt(2 * rho),
                                                               rel=1e-12)
        assert gaussian_sigma(eps, delta, sens, "zcdp") == pytest.approx(
            sens / np.sqrt(2 * rho), rel=1e-9)
    assert epsilon_to_zcdp(math.inf, 1e-5) == math.inf
    assert gaussian_sigma(math.inf, 1e-5, 1.0) == 0.0


def test_pure_zcdp_scale_of_the_reference_code(rng):
    eps, sens = rng.uniform(0.1, 10.0), rng.uniform(0.1, 3.0)
    assert pure_epsilon_to_zcdp(eps) == pytest.approx(eps ** 2 / 2, rel=1e-12)
    assert zcdp_budget(eps, 1e-5, "pure-zcdp") == pytest.approx(eps ** 2 / 2, rel=1e-12)
    # ρ = ε²/2 and σ = Δ/sqrt(2ρ) = Δ/ε.
    assert gaussian_sigma(eps, 1e-5, sens, "pure-zcdp") == pytest.approx(sens / eps, rel=1e-12)
    # The exponential mechanism at ρ runs at ε' = sqrt(8ρ) = 2ε: factor ε'/(2Δ) = ε/Δ.
    assert exponential_epsilon_of_zcdp(eps ** 2 / 2) == pytest.approx(2 * eps, rel=1e-12)
    assert exponential_mechanism_scale(eps, sens, accountant="pure-zcdp") == pytest.approx(
        eps / sens, rel=1e-12)
    with pytest.raises(InputError, match="accountant"):
        zcdp_budget(eps, 1e-5, "analytic")


def test_analytic_gaussian_sigma_is_the_smallest_private_sigma(rng):
    for _ in range(10):
        eps, delta, sens = rng.uniform(0.05, 20.0), 10.0 ** rng.uniform(-9, -3), \
            rng.uniform(0.1, 3.0)
        sigma = analytic_gaussian_sigma(eps, delta, sens)
        # The bisection stops within 1e-12 relative: private at σ, not 1e-6 below it.
        assert balle_wang_delta(sigma, eps, sens) <= delta * (1 + 1e-6)
        assert balle_wang_delta(sigma * (1 - 1e-6), eps, sens) > delta
        # Same formula, log-space implementation: agreement to float64 rounding of ~1e-6
        # differences of CDFs.
        assert analytic_gaussian_delta(sigma, eps, sens) == pytest.approx(
            balle_wang_delta(sigma, eps, sens), rel=1e-6, abs=1e-15)
        # Never noisier than the zCDP route (which is only an upper bound).
        assert sigma <= gaussian_sigma(eps, delta, sens, "zcdp")


def balle_wang_delta(sigma, eps, sens):
    """Balle & Wang 2018 Thm. 8 evaluated directly with scipy.stats.norm (float64)."""
    a, b = sens / (2 * sigma), eps * sigma / sens
    return scipy.stats.norm.cdf(a - b) - np.exp(eps) * scipy.stats.norm.cdf(-a - b)


def test_exponential_mechanism_scale_formula():
    assert exponential_mechanism_scale(0.8, 2.0) == pytest.approx(0.8 / 4.0)
    assert exponential_mechanism_scale(0.8, 2.0, monotone=True) == pytest.approx(0.4)
    with pytest.raises(InputError, match="epsilon"):
        exponential_mechanism_scale(0.0)


# ---------------------------------------------------------------- DPPL-Mean


@pytest.mark.parametrize("normalize", [True, False])
def test_clip_and_class_sums_match_numpy(rng, normalize):
    x, y, k = random_set(rng)
    radius = float(rng.uniform(0.5, 3.0))
    xd = x.astype(np.float64)
    norms = np.linalg.norm(xd, axis=1, keepdims=True)
    want = xd * (radius / norms if normalize else np.minimum(1.0, radius / norms))
    got = np.asarray(clip_embeddings(x, radius, normalize=normalize))
    np.testing.assert_allclose(got, want, **F32)
    assert np.linalg.norm(got, axis=1).max() <= radius * (1 + 1e-6)
    sums = np.stack([want[y == c].sum(0) for c in range(k)])
    np.testing.assert_allclose(np.asarray(class_sums(got, y, k)), sums, rtol=1e-5, atol=1e-4)


def test_dppl_mean_matches_numpy_with_the_noise_fixed(rng, seed):
    x, y, k = random_set(rng)
    eps, delta, clip = float(rng.uniform(0.5, 5.0)), 1e-6, float(rng.uniform(0.5, 2.0))
    key = jax.random.key(seed)
    out = dppl_mean(key, x, y, k, epsilon=eps, delta=delta, clip=clip)
    rho = (np.sqrt(np.log(1 / delta) + eps) - np.sqrt(np.log(1 / delta))) ** 2
    assert out["sigma"] == pytest.approx(clip / np.sqrt(2 * rho), rel=1e-9)
    # The same standard normal draw, then everything else in float64.
    z = np.asarray(jax.random.normal(key, (k, x.shape[1]))).astype(np.float64)
    xd = x.astype(np.float64)
    clipped = clip * xd / np.linalg.norm(xd, axis=1, keepdims=True)
    noisy = np.stack([clipped[y == c].sum(0) for c in range(k)]) + out["sigma"] * z
    np.testing.assert_allclose(out["estimates"], noisy, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["prototypes"], unit(noisy), **F32)
    # ε = inf: no noise, the class means' directions.
    exact = dppl_mean(key, x, y, k, epsilon=math.inf)
    means = np.stack([unit(xd)[y == c].mean(0) for c in range(k)])
    assert exact["sigma"] == 0.0
    np.testing.assert_allclose(exact["prototypes"], unit(means), **F32)


def test_gaussian_mechanism_output_is_normal_at_the_stated_sigma(seed):
    # One private example per class: the class sums are known, so (noisy - true) / σ must be
    # N(0, 1). 4 classes × 25,000 dims = 100,000 draws; KS at σ passes (p > 1e-7: a
    # 1-in-10-million false alarm, as the seed is fresh every run) and at σ/2 fails hard
    # (p < 1e-12: the KS distance of N(0, 4) from N(0, 1) is ~0.16, against 0.009 at
    # p = 1e-7 and n = 100,000, which a σ off by 4% already exceeds).
    d, k = 25_000, 4
    x = np.eye(k, d, dtype=np.float32) * 3.0
    y = np.arange(k)
    out = dppl_mean(jax.random.key(seed), x, y, k, epsilon=1.0, delta=1e-5)
    residual = (out["estimates"] - np.eye(k, d)).ravel()  # clipped to unit norm: e_c
    sigma = out["sigma"]
    assert scipy.stats.kstest(residual / sigma, "norm").pvalue > 1e-7
    assert scipy.stats.kstest(residual / (sigma / 2), "norm").pvalue < 1e-12


def coinpress_reference(key, x, rhos, radius, beta=0.01):
    """CoinPress (Biswas et al. 2020; the clipping radius of its code) in float64 NumPy,
    with the implementation's standard normal draws (fold_in(key, step))."""
    n, d = x.shape
    center, r, sigmas = np.zeros(d), radius, []
    gamma = np.sqrt(d + 2 * np.sqrt(d * np.log(1 / beta)) + 2 * np.log(1 / beta))
    for step, rho in enumerate(rhos):
        clip = min(np.sqrt(r ** 2 + 6 * r + gamma ** 2), r + gamma)
        offset = x - center
        norms = np.linalg.norm(offset, axis=1, keepdims=True)
        clipped = center + offset * np.minimum(1.0, clip / norms)
        sigma = 2 * clip / n / np.sqrt(2 * rho)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, step), (d,)), np.float64)
        center = clipped.mean(0) + sigma * z
        r = gamma * np.sqrt(1 / n + sigma ** 2)
        sigmas.append(sigma)
    return center, np.array(sigmas)


def test_coinpress_matches_numpy_with_the_noise_fixed(rng, seed):
    k, d = 3, 5
    y = np.repeat(np.arange(k), [40, 25, 12])
    x = rng.normal(size=(len(y), d)) + 2.0 * y[:, None]
    x[rng.choice(len(y), 6, replace=False)] *= 30.0  # outliers the first ball clips
    x = x.astype(np.float32)
    eps, delta = float(rng.uniform(1.0, 20.0)), 1e-6
    key = jax.random.key(seed)
    out = dppl_mean(key, x, y, k, epsilon=eps, delta=delta, estimator="coinpress")
    rho = epsilon_to_zcdp(eps, delta)
    for c in range(k):
        want, sigmas = coinpress_reference(jax.random.fold_in(key, c),
                                           x[y == c].astype(np.float64),
                                           rho * np.array(COINPRESS_SPLIT), np.sqrt(d))
        # σ is host float64 arithmetic on n, ρ_i and the radii: exact.
        np.testing.assert_allclose(out["sigma"][c], sigmas, rtol=1e-12)
        # Three float32 steps on values up to ~300 (the outliers): 1e-4 relative to them.
        np.testing.assert_allclose(out["estimates"][c], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(x).max())
    assert out["noise"] == pytest.approx(out["sigma"][:, -1].max())
    exact = dppl_mean(key, x, y, k, epsilon=math.inf, estimator="coinpress")
    means = np.stack([x[y == c].astype(np.float64).mean(0) for c in range(k)])
    np.testing.assert_allclose(exact["estimates"], means, rtol=1e-5, atol=1e-4)
    with pytest.raises(InputError, match="class 3 has no private"):
        dppl_mean(key, x, y, k + 1, epsilon=1.0, estimator="coinpress")
    with pytest.raises(InputError, match="accountant"):
        dppl_mean(key, x, y, k, epsilon=1.0, estimator="coinpress", accountant="analytic")
    with pytest.raises(InputError, match="rho_split"):
        dppl_mean(key, x, y, k, epsilon=1.0, estimator="coinpress", rho_split=(0.5, 0.6))


# ---------------------------------------------------------------- DPPL-Public


def test_public_utilities_match_numpy(rng):
    x, y, k = random_set(rng)
    public = rng.normal(size=(30, x.shape[1])).astype(np.float32)
    cos = unit(x.astype(np.float64)) @ unit(public.astype(np.float64)).T
    a, b = np.sort(rng.uniform(0.0, 2.0, size=2))
    for low, high in ((0.0, 2.0), (1.0, 2.0), (a, b)):
        score = (np.clip(1.0 + cos, low, high) - low) / (high - low)
        want = np.stack([score[y == c].sum(0) for c in range(k)])
        got = np.asarray(public_utilities(x, y, public, k, float(low), float(high)))
        # float32 cosines (1e-6) divided by b - a (>= ~0.01 with fresh a, b).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 / (high - low))


def test_exponential_mechanism_frequencies_match_the_probabilities(seed):
    # 400,000 independent selections (one per row) among 4 candidates with utilities 0..3 at
    # ε = 1, Δ = 1: probabilities ∝ exp(ε u / 2). Chi-square passes there (p > 1e-7: a
    # 1-in-10-million false alarm for a fresh seed) and fails (p < 1e-12) against exp(ε u),
    # the factor a wrong sensitivity would give.
    u = np.arange(4.0, dtype=np.float32)
    rows = 400_000
    picks = np.asarray(exponential_mechanism(jax.random.key(seed), np.tile(u, (rows, 1)),
                                             exponential_mechanism_scale(1.0)))
    counts = np.bincount(picks, minlength=4)
    ud = u.astype(np.float64)
    right = np.exp(ud / 2.0) / np.exp(ud / 2.0).sum()
    wrong = np.exp(ud) / np.exp(ud).sum()
    assert scipy.stats.chisquare(counts, rows * right).pvalue > 1e-7
    assert scipy.stats.chisquare(counts, rows * wrong).pvalue < 1e-12


def test_dppl_public_selects_by_utility(rng, seed):
    x, y, k = random_set(rng)
    public = rng.normal(size=(25, x.shape[1])).astype(np.float32)
    best = dppl_public(jax.random.key(seed), x, y, public, k, epsilon=math.inf, min_score=1.0)
    cos = unit(x.astype(np.float64)) @ unit(public.astype(np.float64)).T
    want = np.stack([np.clip(cos[y == c], 0, 1).sum(0) for c in range(k)]).argmax(1)
    np.testing.assert_array_equal(best["indices"], want)  # ε = inf: the argmax
    np.testing.assert_allclose(best["prototypes"], unit(public[want].astype(np.float64)), **F32)
    noisy = dppl_public(jax.random.key(seed), x, y, public, k, epsilon=2.0)
    assert noisy["scale"] == 1.0  # ε / (2Δ), Δ = 1
    assert dppl_public(jax.random.key(seed), x, y, public, k, epsilon=2.0,
                       monotone=True)["scale"] == 2.0
    # The selection is the Gumbel-max of (scale·u + G) with the key's Gumbel draw.
    g = np.asarray(jax.random.gumbel(jax.random.key(seed), noisy["utilities"].shape))
    np.testing.assert_array_equal(noisy["indices"], (noisy["utilities"] + g).argmax(1))


# ---------------------------------------------------------------- classification, attack


def test_classify_and_membership_scores_match_numpy(rng):
    x, y, k = random_set(rng)
    protos = rng.normal(size=(k, x.shape[1])).astype(np.float32)
    cos = unit(x.astype(np.float64)) @ unit(protos.astype(np.float64)).T
    np.testing.assert_array_equal(classify(x, protos), cos.argmax(1))
    np.testing.assert_allclose(prototype_membership_scores(x, y, protos),
                               cos[np.arange(len(y)), y], **F32)


def test_evaluate_prototypes_scores_and_auc(rng, seed):
    x, y, k = random_set(rng, n=80)
    rows = evaluate_prototypes(jax.random.key(seed), "mean", x[:40], y[:40], x[40:], y[40:],
                               k, epsilons=(0.5, math.inf))
    from memjax.metrics import roc_auc

    exact = rows[1]
    means = unit(np.stack([unit(x[:40].astype(np.float64))[y[:40] == c].sum(0)
                           for c in range(k)]))
    cos = unit(x.astype(np.float64)) @ means.T
    assert exact["accuracy"] == pytest.approx(np.mean(cos[40:].argmax(1) == y[40:]))
    own = cos[np.arange(80), y]
    assert exact["auc"] == pytest.approx(roc_auc(own, np.arange(80) < 40), abs=1e-6)
    assert rows[0]["noise"] > 0 and exact["noise"] == 0.0


def test_embed_runs_a_model_tap_through_the_engine(rng):
    from memjax.models import Model
    from memjax.train import MLPConfig

    config = MLPConfig((4, 4, 1), 3, hidden=(6,))
    params = jax.tree.map(np.asarray, config.init(jax.random.key(0)))
    images = rng.uniform(size=(20, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 20)
    out = embed(Model.from_classifier(params, config), {"image": images, "label": labels},
                layer="dense1", batch_size=8)
    w, b = params["layers"][0]["w"].astype(np.float64), params["layers"][0]["b"]
    np.testing.assert_allclose(out["embedding"],
                               np.maximum(images.reshape(20, -1) @ w + b, 0.0), **F32)
    np.testing.assert_array_equal(out["label"], labels)
    with pytest.raises(InputError, match="'label'"):
        embed(Model.from_classifier(params, config), {"image": images}, batch_size=8)


def test_embed_takes_a_clip_image_tower(tmp_path_factory, rng):
    import torch

    import memjax
    from tests import hf_tiny

    folder, hf = hf_tiny.cached(tmp_path_factory, "clip")
    pixels = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)  # preprocessed, NHWC
    out = embed(memjax.load(folder), {"image": pixels, "label": np.arange(6)}, batch_size=8)
    with torch.no_grad():
        want = hf.double().get_image_features(
            pixel_values=torch.tensor(pixels.astype(np.float64).transpose(0, 3, 1, 2)))
    want = getattr(want, "pooler_output", want).numpy()
    hf.float()  # the cached model is shared: leave it as built
    # float32 port vs float64 PyTorch through two transformer layers: 1e-5 absolute on
    # embeddings of size ~1 (tests/test_model_protocol.py's tolerance).
    np.testing.assert_allclose(out["embedding"], want, rtol=0, atol=1e-5)


def test_bad_inputs_name_themselves(rng):
    x, y, k = random_set(rng)
    key = jax.random.key(0)
    with pytest.raises(InputError, match="epsilon"):
        dppl_mean(key, x, y, k, epsilon=-1.0)
    with pytest.raises(InputError, match="delta"):
        dppl_mean(key, x, y, k, epsilon=1.0, delta=1.5)
    with pytest.raises(InputError, match="labels"):
        dppl_mean(key, x, y + k, k, epsilon=1.0)
    with pytest.raises(InputError, match="embeddings"):
        dppl_mean(key, x[:, 0], y, k, epsilon=1.0)
    with pytest.raises(InputError, match="public"):
        dppl_public(key, x, y, x[:, :3], k, epsilon=1.0)
    with pytest.raises(InputError, match="min_score"):
        dppl_public(key, x, y, x, k, epsilon=1.0, min_score=1.5, max_score=1.0)
    with pytest.raises(InputError, match="accountant"):
        gaussian_sigma(1.0, 1e-5, 1.0, "moments")


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from memjax.data import digits
    from memjax.train import MLPConfig, save_model

    root = tmp_path_factory.mktemp("prototypes_cli")
    config = MLPConfig((8, 8, 1), 10, hidden=(16,))
    save_model(root / "mlp", jax.tree.map(np.asarray, config.init(jax.random.key(0))), config)
    data = digits().arrays
    for name, rows in (("private", slice(0, 120)), ("test", slice(120, 200)),
                       ("public", slice(200, 260))):
        np.savez(root / f"{name}.npz", image=data["image"][rows], label=data["label"][rows])
    np.savez(root / "unlabelled.npz", image=data["image"][:10])
    return root


def test_cli_end_to_end(cli_files, tmp_path):
    from memjax.cli import main
    from memjax.data import digits
    from memjax.models import Model
    from memjax.train import load_model

    r = cli_files
    common = ["prototypes", "--model", str(r / "mlp"), "--layer", "dense1", "--private",
              str(r / "private.npz"), "--test", str(r / "test.npz"), "--no-progress"]
    assert main([*common, "--method", "mean", "--epsilon", "2", "inf", "--accountant",
                 "analytic", "--out", str(tmp_path / "mean")]) == 0
    assert main([*common, "--method", "public", "--public", str(r / "public.npz"),
                 "--epsilon", "inf", "--out", str(tmp_path / "public")]) == 0
    metrics = json.loads((tmp_path / "mean" / "metrics.json").read_text())
    section = next(iter(metrics.values()))
    assert section["sigma (epsilon=2)"] == pytest.approx(analytic_gaussian_sigma(2, 1e-5, 1))
    saved = np.load(tmp_path / "mean" / "prototypes.npz")
    assert saved["prototypes"].shape == (2, 10, 16)
    table = pq.read_table(tmp_path / "mean" / "predictions.parquet").to_pydict()
    # The non-private prototypes and predictions, recomputed from the same encoder.
    params, config = load_model(r / "mlp")
    data = digits().arrays
    model = Model.from_classifier(params, config)
    z = embed(model, {"image": data["image"][:200], "label": data["label"][:200]},
              layer="dense1", batch_size=40)["embedding"]
    exact = dppl_mean(jax.random.key(0), z[:120], data["label"][:120], 10,
                      epsilon=math.inf)["prototypes"]
    np.testing.assert_allclose(saved["prototypes"][1], exact, **F32)
    np.testing.assert_array_equal(table["prediction (epsilon=inf)"], classify(z[120:], exact))
    assert section["accuracy (epsilon=inf)"] == pytest.approx(
        np.mean(classify(z[120:], exact) == data["label"][120:200]))
    public = np.load(tmp_path / "public" / "prototypes.npz")
    assert public["indices"].shape == (1, 10)


@pytest.mark.parametrize("extra, message", [
    (["--method", "public"], "--public"),
    (["--epsilon", "0"], "argument --epsilon"),
    (["--delta", "2"], "argument --delta"),
    (["--nonmembers", "{r}/unlabelled.npz"], "--nonmembers"),
    (["--num-classes", "3"], "--num-classes 3"),
    (["--accountant", "pure"], "--accountant pure"),
    (["--estimator", "coinpress", "--accountant", "analytic"], "--accountant analytic"),
    (["--method", "public", "--public", "{r}/public.npz", "--min-score", "2"],
     "--min-score 2.0"),
])
def test_cli_bad_inputs(cli_files, tmp_path, capsys, extra, message):
    from memjax.cli import main

    r = cli_files
    argv = ["prototypes", "--model", str(r / "mlp"), "--layer", "dense1", "--private",
            str(r / "private.npz"), "--test", str(r / "test.npz"), "--no-progress",
            "--out", str(tmp_path / "out")]
    if "--epsilon" not in extra:
        argv += ["--epsilon", "1"]
    argv += [e.replace("{r}", str(r)) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
