"""The mirrored-influence convex check (Ko et al. 2024) on real digits, exact LOO in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.data.arrays import digits
from memjax.engine import make_mesh
from memjax.errors import InputError
from memjax.influence import (
    dual_loo_influence,
    fit_logistic,
    forward_inf,
    logistic_loss,
    loo_influence,
)

# Strict dtype promotion: these code paths promote no dtype implicitly (conftest).
pytestmark = pytest.mark.strict_dtypes

L2 = 0.01  # sklearn C = 1/(n·0.01), the reference setting
N_TRAIN, N_TOP = 200, 10


@pytest.fixture(scope="module")
def convex():
    d = digits()
    x = d.arrays["image"].reshape(len(d.arrays["image"]), -1).astype(np.float64)
    y = d.arrays["label"]
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    fit = fit_logistic(x[tr], y[tr], l2=L2, n_classes=10)
    per = jax.vmap(logistic_loss, in_axes=(None, 0, 0))
    with jax.enable_x64(True):
        losses = np.asarray(per(jax.tree.map(jnp.asarray, fit.params), x[te], y[te]))
    top = te[np.argsort(-losses)[:N_TOP]]  # the 10 highest-loss test examples
    loo, loo_grad = loo_influence(x[tr], y[tr], x[top], y[top], l2=L2, n_classes=10)
    return x[tr], y[tr], x[top], y[top], fit, loo, loo_grad


def pearson(a, b):
    return np.array([np.corrcoef(a[k], b[k])[0, 1] for k in range(len(a))])


def test_fits_converge(convex):
    *_, fit, loo, loo_grad = convex
    assert fit.grad_norm < 1e-12 and loo_grad < 1e-12
    assert loo.shape == (N_TOP, N_TRAIN)


def test_dual_loo_mirrors_loo(convex):
    x, y, tx, ty, _, loo, _ = convex
    dual, grad = dual_loo_influence(x, y, tx, ty, l2=L2, n_classes=10)
    assert grad < 1e-12
    r = pearson(loo, dual)
    print("Pearson(LOO, DualLOO) per test example:", np.round(r, 4), "mean", r.mean())
    assert r.mean() >= 0.95  # the paper: ≈0.997 on MNIST


def _sklearn_losses(x, y, eval_x, eval_y, *, c):
    """CE of (eval_x, eval_y) under scikit-learn's multinomial logistic regression fitted
    on (x, y): sklearn minimises C·Σ CE + ½||W||² with the intercept unpenalised."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    log_p = fit.fit(x, y).predict_log_proba(eval_x)
    assert fit.n_iter_.max() < 1000 and log_p.shape[1] == 3  # converged; multinomial
    return -log_p[np.arange(len(eval_y)), eval_y]


def test_loo_and_dual_loo_equal_explicit_retraining_with_sklearn(rng):
    """Both exact influences against an independent solver: scikit-learn refitted from
    scratch on each changed training set. memjax's J = (1/n)Σ CE + (l2/2)||W||² is sklearn's
    objective divided by C·n with C = 1/(n·l2), n the FULL training-set size: removing z_i
    (LOO) or adding t (DualLOO) changes the sum, not the 1/n in front, so every refit uses
    the same C. Newton-Cholesky converges quadratically to max|∇| <= 1e-12, so both solvers
    reach the optimum to ~1e-12 in the parameters; measured agreement ~2e-11 over seeds
    (L-BFGS would stop at ~6e-7: its 64·eps relative-decrease rule ends first)."""
    n, d, k, n_test, l2 = 100, 5, 3, 4, 0.05  # n = 100: every refit converges (n = 40 need not)
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, k)) + rng.gumbel(size=(n, k)), axis=1)
    tx, ty = rng.normal(size=(n_test, d)), rng.integers(0, k, n_test)
    c = 1.0 / (n * l2)
    loo, loo_grad = loo_influence(x, y, tx, ty, l2=l2, n_classes=k)
    dual, dual_grad = dual_loo_influence(x, y, tx, ty, l2=l2, n_classes=k)
    assert loo_grad < 1e-12 and dual_grad < 1e-12

    base_test = _sklearn_losses(x, y, tx, ty, c=c)
    want_loo = np.stack([_sklearn_losses(np.delete(x, i, 0), np.delete(y, i), tx, ty, c=c)
                         for i in range(n)], axis=1) - base_test[:, None]
    base_train = _sklearn_losses(x, y, x, y, c=c)
    want_dual = -(np.stack([_sklearn_losses(np.r_[x, tx[t:t + 1]], np.r_[y, ty[t:t + 1]],
                                            x, y, c=c) for t in range(n_test)])
                  - base_train[None])
    assert np.abs(want_loo).max() > 0.05 and np.abs(want_dual).max() > 0.05  # not all ~0
    np.testing.assert_allclose(loo, want_loo, rtol=0, atol=1e-9)
    np.testing.assert_allclose(dual, want_dual, rtol=0, atol=1e-9)


def test_forward_inf_on_convex_model(convex):
    x, y, tx, ty, fit, loo, _ = convex
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), fit.params)

    def loss_fn(p, ex):
        return logistic_loss(p, ex["x"], ex["y"])

    test = {"x": tx.astype(np.float32), "y": ty}
    train = {"x": x.astype(np.float32), "y": y}
    mesh = make_mesh(devices=jax.devices()[:1])
    first = forward_inf(loss_fn, params, test, train, mode="first_order", lr=1e-3,
                        batch_size=100, mesh=mesh)
    r = pearson(loo, first)
    print("Pearson(LOO, Forward-INF one SGD step, first order):", np.round(r, 4), "mean",
          r.mean())
    # One plain gradient step ignores the Hessian that LOO carries (g_i·g_t vs
    # g_i·H⁻¹g_t/n): clearly positive, far below the exact mirrored fit's 0.99.
    assert 0.3 < r.mean() < 0.9
    assert np.all(np.sign(first.sum(1)) == np.sign(loo.sum(1)))


def test_bad_input():
    with pytest.raises(InputError, match="l2="):
        fit_logistic(np.zeros((3, 2)), np.zeros(3, np.int32), l2=0.0)
    with pytest.raises(InputError, match="labels: expected integers"):
        fit_logistic(np.zeros((3, 2)), np.array([0, 1, 5]), l2=0.1, n_classes=3)
