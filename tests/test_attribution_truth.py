"""Ground truth by retraining (memjax.train.attribution): LDS subset models trained in one
vmapped program (Park et al., ICML 2023, "TRAK") and exact leave-one-out by retraining from
the same initialisation (Koh & Liang, ICML 2017), against separate runs and float64 NumPy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.special

from memjax.errors import InputError
from memjax.train import MLPConfig, fit_classifier
from memjax.train.attribution import (
    MIN_SUBSETS,
    loo_retraining,
    random_subsets,
    retraining_effects,
    subset_outputs,
)

CONFIG = MLPConfig((5,), 3, hidden=(8,))
RECIPE = dict(config=CONFIG, steps=40, learning_rate=2e-2)


def _problem(rng, n=30, t=4):
    """Random inputs [n, 5] with labels from a random linear rule (learnable, so training
    moves the test losses), and t test examples."""
    w = rng.normal(size=(5, 3))
    x = rng.normal(size=(n + t, 5)).astype(np.float32)
    y = np.argmax(x @ w + rng.gumbel(size=(n + t, 3)), axis=1).astype(np.int32)
    return x[:n], y[:n], {"image": x[n:], "label": y[n:]}


def _np_ce(params, test):
    """Float64 NumPy cross-entropy [T] of the MLP 5-8-3 (ReLU) at ``params``."""
    (h, out) = ([{k: np.float64(np.asarray(v)) for k, v in layer.items()}
                 for layer in params["layers"]])
    x = np.float64(test["image"])
    logits = np.maximum(x @ h["w"] + h["b"], 0.0) @ out["w"] + out["b"]
    return scipy.special.logsumexp(logits, axis=1) - logits[np.arange(len(x)), test["label"]]


@jax.jit
def _jit_fit(key, x, y, keep):
    return fit_classifier(key, x, y, keep, **RECIPE)


def _fit(key, x, y, keep):
    """One separately trained model: :func:`fit_classifier` on the 0/1 mask ``keep``."""
    return _jit_fit(key, x, y, keep.astype(np.float32))


def test_subset_outputs_equal_separate_fits(rng, seed):
    x, y, test = _problem(rng)
    s = MIN_SUBSETS
    subsets, outputs = subset_outputs(x, y, test, n_subsets=s, fraction=0.4, seed=seed,
                                      **RECIPE)
    assert subsets.shape == (s, 30) and outputs.shape == (s, 4)
    np.testing.assert_array_equal(subsets.sum(1), 12)  # exactly round(0.4·30) each
    np.testing.assert_array_equal(subsets, random_subsets(s, 30, 0.4, seed))
    keys = jax.random.split(jax.random.key(seed), s)
    for m in rng.choice(s, 2, replace=False):
        want = -_np_ce(_fit(keys[m], x, y, subsets[m]), test)
        # The vmapped program sums each model's loss over its gathered rows, the separate fit
        # over all rows weighted by the mask: float32 summation order only, which 40 Adam
        # steps carry to <= 8e-7 on O(1) losses (measured, 3 seeds); 1e-4 leaves 100x margin
        # and is far below a wrong subset or init (outputs of two subsets differ by O(1)).
        np.testing.assert_allclose(outputs[m], want, rtol=0, atol=1e-4)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the subsets do differ


def test_retraining_with_nothing_left_out_is_exactly_zero(rng, seed):
    """Same init per seed and deterministic full-batch training: a 'retrained' model on the
    full training set IS the full model, bit for bit, even beside other models in the vmap."""
    x, y, test = _problem(rng)
    masks = np.ones((3, 30), bool)
    masks[1, rng.integers(30)] = False  # a real leave-out beside two no-ops
    effects = retraining_effects(x, y, test, masks, seeds=[seed % 1000, seed % 1000 + 1],
                                 **RECIPE)
    assert effects.shape == (4, 3)
    np.testing.assert_array_equal(effects[:, 0], 0.0)
    np.testing.assert_array_equal(effects[:, 2], 0.0)
    assert np.abs(effects[:, 1]).max() > 0  # leaving one out does change something


def test_loo_equals_separately_trained_models(rng, seed):
    x, y, test = _problem(rng, n=20, t=3)
    rows = rng.choice(20, 3, replace=False)
    seeds = [seed % 1000, seed % 1000 + 7]
    got = loo_retraining(x, y, test, rows, seeds=seeds, **RECIPE)
    assert got.shape == (3, 3)
    want = np.zeros((3, 3))
    for s in seeds:
        key = jax.random.key(s)
        base = _np_ce(_fit(key, x, y, np.ones(20, bool)), test)
        for j, i in enumerate(rows):
            keep = np.ones(20, bool)
            keep[i] = False
            want[:, j] += (_np_ce(_fit(key, x, y, keep), test) - base) / len(seeds)
    assert np.abs(want).max() > 1e-3  # the effects are not all ~0
    # Float32 training, gathered rows vs a masked sum (summation order only): measured
    # <= 3e-7 on effects of O(0.3) (3 seeds); 1e-4 leaves 300x margin and is far below a
    # wrong init or a wrong left-out row (O(0.1) changes).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bad_inputs_are_refused(rng):
    x, y, test = _problem(rng)
    with pytest.raises(InputError, match="n_subsets=99"):
        subset_outputs(x, y, test, n_subsets=99, **RECIPE)
    with pytest.raises(InputError, match="fraction=1.0"):
        subset_outputs(x, y, test, fraction=1.0, **RECIPE)
    with pytest.raises(InputError, match="rows: expected distinct"):
        loo_retraining(x, y, test, [3, 3], seeds=[0], **RECIPE)
    with pytest.raises(InputError, match="rows: expected distinct"):
        loo_retraining(x, y, test, [30], seeds=[0], **RECIPE)
    with pytest.raises(InputError, match="masks: expected bool"):
        retraining_effects(x, y, test, np.ones((2, 29), bool), seeds=[0], **RECIPE)
    with pytest.raises(InputError, match="seeds"):
        retraining_effects(x, y, test, np.ones((2, 30), bool), seeds=[], **RECIPE)
    with pytest.raises(InputError, match="test: expected"):
        loo_retraining(x, y, {"image": test["image"][:, :4], "label": test["label"]}, [0],
                       seeds=[0], **RECIPE)
    with pytest.raises(InputError, match="labels: expected"):
        loo_retraining(x, y[:-1], test, [0], seeds=[0], **RECIPE)


# ---- the audit's curvature helpers (memjax.audit.influence), against float64 NumPy ----

def test_mean_fisher_eigenvalue_is_the_sampled_fisher_trace_over_p(rng, seed):
    """EK-FAC's corrected eigenvalues sum to E||g||² (an orthonormal rotation keeps squared
    norms), so their mean is tr(F)/P: checked against per-example gradients by hand."""
    from memjax.audit.influence import mean_fisher_eigenvalue, true_fisher_ekfac
    from memjax.influence import sample_labels

    params = CONFIG.init(jax.random.key(seed))
    x = rng.normal(size=(25, 5)).astype(np.float32)
    key = jax.random.key(seed + 1)
    factors = true_fisher_ekfac(params, x, key, samples=2)
    xs = np.repeat(x, 2, axis=0)
    ys = np.asarray(sample_labels(params, xs, key))  # the draws true_fisher_ekfac used
    (h, out) = ([{k: np.float64(np.asarray(v)) for k, v in layer.items()}
                 for layer in params["layers"]])
    pre = np.float64(xs) @ h["w"] + h["b"]
    hidden = np.maximum(pre, 0.0)
    resid = scipy.special.softmax(hidden @ out["w"] + out["b"], axis=1) - np.eye(3)[ys]
    back = (resid @ out["w"].T) * (pre > 0)
    squared = ((hidden ** 2).sum(1) * (resid ** 2).sum(1) + (resid ** 2).sum(1)
               + (np.float64(xs) ** 2).sum(1) * (back ** 2).sum(1) + (back ** 2).sum(1))
    n_params = 5 * 8 + 8 + 8 * 3 + 3
    # float32 factors, eigenbases and rotations: measured <= 3e-7 relative (3 seeds); 1e-4
    # leaves 300x margin, while a wrong count or a missing layer is off by > 10%.
    np.testing.assert_allclose(mean_fisher_eigenvalue(factors), squared.mean() / n_params,
                               rtol=1e-4)


def test_convex_gauss_newton_is_the_hessian_of_the_loo_objective(rng):
    """The CG matvec of the convex check: ∇²J v for J = mean CE + (l2/2)||W||² + ½(Σb)²,
    against the float64 NumPy Hessian (diag p − ppᵀ) ⊗ x xᵀ averaged, plus l2 and 11ᵀ."""
    from memjax.audit.influence import _convex_gauss_newton

    n, d, k, l2 = 15, 4, 3, 0.05
    w, b = rng.normal(size=(d, k)), rng.normal(size=k)
    x, y = rng.normal(size=(n, d)), rng.integers(0, k, n)
    vw, vb = rng.normal(size=(d, k)), rng.normal(size=k)
    params = {"layers": [{"w": np.float32(w), "b": np.float32(b)}]}
    train = {"x": np.float32(x), "y": y.astype(np.int32)}
    got = _convex_gauss_newton(params, train, l2)(
        {"layers": [{"w": np.float32(vw), "b": np.float32(vb)}]})["layers"][0]
    w32, b32, x32 = (np.float64(np.float32(a)) for a in (w, b, x))  # the inputs as used
    p = scipy.special.softmax(x32 @ w32 + b32, axis=1)
    z = x32 @ vw + vb  # the logits' tangent per example
    hz = p * z - p * (p * z).sum(1, keepdims=True)
    # float32 products summed over 15 examples, results O(0.1..1): measured <= 2.4e-7
    # (3 seeds); 1e-5 leaves 40x margin, far below a missing term (O(0.05) or more).
    np.testing.assert_allclose(got["w"], x32.T @ hz / n + l2 * vw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["b"], hz.mean(0) + vb.sum(), rtol=0, atol=1e-5)
