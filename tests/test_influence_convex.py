"""The mirrored-influence convex check (Ko et al. 2024) on real digits, exact LOO in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from memjax.data.arrays import digits
from memjax.engine import make_mesh
from memjax.errors import InputError
from memjax.influence import (
    dual_loo_influence,
    fit_logistic,
    forward_inf,
    logistic_loss,
    loo_influence,
    refit_logistic,
)

# Strict dtype promotion: these code paths promote no dtype implicitly (conftest). A ground
# truth must never be silently wrong: an unconverged fit's RuntimeWarning fails the test.
pytestmark = [pytest.mark.strict_dtypes,
              pytest.mark.filterwarnings("error:.*did not converge:RuntimeWarning")]

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
    assert fit.grad_norm < 1e-11 and loo_grad < 1e-11  # the default tol
    assert loo.shape == (N_TOP, N_TRAIN)


def test_dual_loo_mirrors_loo(convex):
    x, y, tx, ty, _, loo, _ = convex
    dual, grad = dual_loo_influence(x, y, tx, ty, l2=L2, n_classes=10)
    assert grad < 1e-11  # the default tol
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
    the same C. Newton-Cholesky converges quadratically to max|∇| <= 1e-12 and memjax to
    < 1e-11 (its default tol), so both reach the optimum to ~1e-10 in the parameters or
    better; measured agreement ~2e-11 over seeds
    (L-BFGS would stop at ~6e-7: its 64·eps relative-decrease rule ends first)."""
    n, d, k, n_test, l2 = 100, 5, 3, 4, 0.05  # n = 100: every refit converges (n = 40 need not)
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, k)) + rng.gumbel(size=(n, k)), axis=1)
    tx, ty = rng.normal(size=(n_test, d)), rng.integers(0, k, n_test)
    c = 1.0 / (n * l2)
    loo, loo_grad = loo_influence(x, y, tx, ty, l2=l2, n_classes=k)
    dual, dual_grad = dual_loo_influence(x, y, tx, ty, l2=l2, n_classes=k)
    assert loo_grad < 1e-11 and dual_grad < 1e-11  # the default tol

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
    with pytest.raises(InputError, match="max_iter=0"):
        fit_logistic(np.zeros((3, 2)), np.array([0, 1, 2]), l2=0.1, max_iter=0)


def _numpy_objective(theta, x, y, coef, l2, k):
    """Float64 NumPy J(θ̃) = Σ coef_i CE_i + (l2/2)||W||² + ½(Σb)², θ̃ = [W; b] row-major
    ([D + 1, K] flattened), with its gradient and Hessian (Σ coef_i x̃x̃ᵀ ⊗ (diag p − ppᵀ))."""
    d = x.shape[1]
    wb = theta.reshape(d + 1, k)
    xt = np.c_[x, np.ones(len(x))]
    logits = xt @ wb
    prob = scipy.special.softmax(logits, axis=1)
    ce = scipy.special.logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]
    value = coef @ ce + 0.5 * l2 * np.sum(wb[:d] ** 2) + 0.5 * np.sum(wb[d]) ** 2
    grad = xt.T @ (coef[:, None] * (prob - np.eye(k)[y]))
    grad[:d] += l2 * wb[:d]
    grad[d] += np.sum(wb[d])
    hess = sum(c * np.kron(np.outer(r, r), np.diag(q) - np.outer(q, q))
               for c, r, q in zip(coef, xt, prob, strict=True))
    hess += np.diag(np.r_[np.full(d * k, l2), np.zeros(k)])
    hess[d * k:, d * k:] += 1.0
    return value, grad.ravel(), hess


def _scipy_fit(x, y, coef, l2, k):
    """θ̃ = [W; b] minimising _numpy_objective by scipy's trust-region exact Newton, then
    polished by NumPy Newton steps."""
    res = scipy.optimize.minimize(
        lambda t: _numpy_objective(t, x, y, coef, l2, k)[:2], np.zeros((x.shape[1] + 1) * k),
        jac=True, hess=lambda t: _numpy_objective(t, x, y, coef, l2, k)[2],
        method="trust-exact", options={"gtol": 1e-13, "maxiter": 500})
    theta = res.x
    for _ in range(3):  # trust-exact stalls near 1e-12; plain Newton steps polish to rounding
        _, grad, hess = _numpy_objective(theta, x, y, coef, l2, k)
        theta = theta - np.linalg.solve(hess, grad)
    assert np.abs(_numpy_objective(theta, x, y, coef, l2, k)[1]).max() < 1e-13  # converged
    return theta


def _flat(params, i=None):
    w, b = (params["w"], params["b"]) if i is None else (params["w"][i], params["b"][i])
    return np.r_[w.ravel(), b]


def _hard_problem(rng):
    """Random logistic data plus extra examples: three ordinary ones and one far-out point
    with its least likely label, whose DualLOO refit moves θ far from θ̂ (the fixed
    preconditioner does not contract there; damped Newton must finish it)."""
    n, d, k, l2 = 40, 3, 3, 0.05
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, k)) + rng.gumbel(size=(n, k)), axis=1)
    fit = fit_logistic(x, y, l2=l2, n_classes=k)
    # A fixed distance (8·√d, the typical norm of 8·N(0, I_d)): a random 8·N(0, I) point can
    # land close to the data, and then its refit needs no Newton phase (seed 3503089270).
    direction = rng.normal(size=(1, d))
    far = 8.0 * np.sqrt(d) * direction / np.linalg.norm(direction)
    far_label = np.argmin(far @ fit.params["w"] + fit.params["b"], axis=1)
    ex = np.r_[rng.normal(size=(3, d)), far]
    ey = np.r_[rng.integers(0, k, 3), far_label]
    return x, y, ex, ey, fit, l2, k


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_fit_and_refits_match_scipy(sign, rng):
    """Full fit and every refit (LOO removal / DualLOO addition, J ± CE(z)/n with n and l2
    fixed) equal an independent float64 NumPy objective minimised by scipy. memjax stops at
    max|∇| < 1e-11 (default tol), the reference at < 1e-13; ∇²J ⪰ ~l2 = 0.05, so the
    parameters differ by at most ~√P·1e-11/0.05 ≈ 7e-10: 1e-8 is that bound with margin."""
    x, y, ex, ey, fit, l2, k = _hard_problem(rng)
    if sign < 0:  # LOO: remove training examples 0, 7 and 19
        ex, ey = x[[0, 7, 19]], y[[0, 7, 19]]
    n = len(x)
    assert fit.grad_norm < 1e-11
    np.testing.assert_allclose(_flat(fit.params), _scipy_fit(x, y, np.full(n, 1 / n), l2, k),
                               rtol=0, atol=1e-8)
    refits = refit_logistic(fit, x, y, ex, ey, sign, l2=l2)
    assert refits.grad_norms.shape == (len(ex),) and np.all(refits.grad_norms < 1e-11)
    for i in range(len(ex)):
        coef = np.r_[np.full(n, 1 / n), sign / n]
        want = _scipy_fit(np.r_[x, ex[i:i + 1]], np.r_[y, ey[i]], coef, l2, k)
        np.testing.assert_allclose(_flat(refits.params, i), want, rtol=0, atol=1e-8)
        # The reported norm is the true one: NumPy's gradient there, to rounding (~1e-15).
        got = _numpy_objective(_flat(refits.params, i), np.r_[x, ex[i:i + 1]],
                               np.r_[y, ey[i]], coef, l2, k)[1]
        assert abs(np.abs(got).max() - refits.grad_norms[i]) < 1e-14
    if sign > 0:
        assert refits.newton_refits >= 1  # the far-out point needed the Newton phase


def test_nonconvergence_is_reported(rng):
    """An iteration cap too small to reach tol warns with the count, the worst gradient norm
    and the cap, and the per-refit norms it reports are the true (NumPy) ones."""
    x, y, ex, ey, fit, l2, k = _hard_problem(rng)
    with pytest.warns(RuntimeWarning, match=r"fit_logistic: 1 of 1 did not converge.*"
                                            r"max_iter=1\b.*Raise max_iter"):
        short = fit_logistic(x, y, l2=l2, n_classes=k, max_iter=1)
    assert short.grad_norm >= 1e-11
    with pytest.warns(RuntimeWarning, match=r"refits\): [1-4] of 4 did not converge"):
        refits = refit_logistic(fit, x, y, ex, ey, 1.0, l2=l2, max_iter=1)
    n = len(x)
    coef = np.r_[np.full(n, 1 / n), 1 / n]
    true = [np.abs(_numpy_objective(_flat(refits.params, i), np.r_[x, ex[i:i + 1]],
                                    np.r_[y, ey[i]], coef, l2, k)[1]).max()
            for i in range(len(ex))]
    np.testing.assert_allclose(refits.grad_norms, true, rtol=1e-9, atol=1e-15)
    assert np.isclose(refits.grad_norm, max(true), rtol=1e-9, atol=0)  # the max of them
    assert refits.grad_norm >= 1e-11
