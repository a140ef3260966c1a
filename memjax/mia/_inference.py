"""Dataset inference: did a model train on a *suspect* set? One module, three aggregators.

Given per-example membership features (higher or lower = member, any mix) for a suspect set
and for a validation set known not to be in training, each method aggregates the features
into one score per example and t-tests suspect scores against validation scores. Select
with ``dataset_inference(..., method=...)``:

- ``"maini"`` (Maini et al. 2024, "LLM Dataset Inference: Did you train on my dataset?";
  reference code pratyushmaini/llm_dataset_inference, ``linear_di.py``). memjax's default.

  1. Split each set in half with one seeded permutation per set: the first ``n // 2``
     permuted examples train the aggregator, the rest are held out.
  2. Per feature, clip both halves at the ``clip`` and ``1 - clip`` quantiles (NumPy's
     linear interpolation) of the *training half* (suspect and validation training halves
     pooled), then z-score with that pooled half's mean and standard deviation (ddof 0; a
     constant feature gets std 1, i.e. becomes 0).
  3. Fit a linear aggregator (logistic regression ``s = x @ w + b``, zero initialisation,
     mean BCE, full-batch Adam, lr 0.01, 1000 steps) separating suspect (label 1) from
     validation (label 0).
  4. Score the held-out halves and t-test that suspect scores exceed validation scores:
     Welch's test, one-sided (``alternative="greater"``) by default.

  Where memjax differs from the reference code, and why:

  - Clipping: the reference clips *each set separately* at its own order statistics
    (``int(0.025 n)`` values at each end) computed over *all* its rows, held-out rows
    included. memjax clips both sets at the same pooled quantiles of the training halves:
    one transform for both sets and none of the held-out rows in it, so suspect and
    validation scores differ only through the features (per-set clipping alone moves the
    two sets apart; the reference's null p-values come out anti-conservative).
  - Normalisation: the reference z-scores both sets with the suspect set's mean and std
    (all rows); memjax with the pooled training halves (same reasons).
  - Split: the reference trains on the first ``num_samples`` (default 1000) shuffled rows
    of each set and tests on the rest; memjax trains on half of each set.
  - Test: the reference labels suspect 0 and runs Student's pooled test with
    ``alternative="less"``; memjax labels suspect 1 and tests ``"greater"`` (the same
    one-sided question with higher = member), with Welch's test by default because the
    two score distributions need not share a variance; ``test="student"`` and
    ``alternative="two-sided"`` are available.
  - Optimiser: the reference starts from PyTorch's random ``nn.Linear`` initialisation;
    memjax from zero (the loss is convex, so only the path differs).
  - Curve: both take the first n held-out scores of each set (nested prefixes); memjax's
    sizes are :func:`default_curve_sizes`.

- ``"cdi"`` (Dubiński et al. 2025, "CDI: Copyrighted Data Identification in Diffusion
  Models"; reference code sprintml/copyrighted_data_identification). Two scorings, chosen
  with ``cdi_scoring``:

  ``"split"`` (default; the reference's ``CDIComputer`` and its ``features_ablation.py`` /
  ``trainset_size_ablation.py`` experiments). The scoring model never sees a tested row:

  1. Split each set with one seeded permutation per set: the first ``round(fit_fraction *
     n)`` permuted rows (``fit_fraction`` 0.2 by default) fit the scoring model, the rest
     are held out.
  2. Fit a standard scaler (mean, std with ddof 0, constant feature -> scale 1) on the
     fitting rows of both sets pooled, then an L2-regularised logistic regression
     (suspect 1, validation 0) on them: minimise ``0.5 |w|^2 + C sum_i BCE_i`` with ``C =
     1`` and the intercept not penalised (scikit-learn's default ``lbfgs`` objective, which
     that code uses). Score the held-out rows by the predicted probability of "suspect".
  3. Welch's t-test, two-sided, between the held-out suspect and validation scores: this
     is ``p_value``, a valid p-value (the scores are independent draws given the model;
     ``bench/di_calibration.py``, 400 seeds per null table, 200 rows per set: 5.0% and
     4.25% of null p-values below 0.05, t mean -0.01 / 0.04, sd 0.99 / 1.02).
  4. The curve: for each n, ``resamples`` random subsets of n held-out scores of each set
     (the model is not refitted), the t-test on each, and the arithmetic mean of the
     p-values, as the reference reads it (1000 resamples; the smallest n whose mean
     p-value is <= 0.01 is its headline number).

  Differences: the reference fits on the *last* ``train_samples + valid_samples`` rows of
  each set (5000 of 25000 in its ablations: a fifth, hence ``fit_fraction=0.2``) and tests
  the first ``n_samples_eval`` (20000), in dataset order; memjax takes a seeded random
  fifth. The reference draws one index set for both sets (paired rows, equal sizes);
  memjax draws the suspect and validation subsets independently (the sets need not be the
  same size). The reference fits lbfgs to its default tolerance; memjax solves the same
  convex objective by damped Newton in float64 to convergence. The mean p-value of the
  curve is the reference's summary, not itself a p-value (a mean of uniform p-values
  concentrates at 0.5): read ``p_value`` for the test, and the curve only to read off
  :func:`smallest_n`.

  ``"cross-fit"`` (the reference's ``experiments/cdi_perf.py``, ``contamination_ablation
  .py``): every row is scored by a model that did not see it, but the scores are
  dependent. ITS P-VALUES ARE ANTI-CONSERVATIVE UNDER THE NULL: fold j's model is fitted
  on fold k's rows and vice versa, so with no difference between the sets the t statistic
  is over-dispersed and biased negative (``bench/di_calibration.py``, 400 seeds per null
  table, 200 rows per set: t mean -0.24 / -0.14, sd 1.42 / 1.39 where a calibrated test
  gives 0 and 1; 16.5% and 15.75% of null p-values below 0.05, 8.25% and 5.5% below
  0.01). Use it to reproduce the reference's numbers, never as evidence on its own.

  1. Split each set into ``folds`` (5) folds: fold k's rows are ``perm[start_k:stop_k]``
     of a seeded permutation of the set, with scikit-learn's ``KFold`` block sizes (the
     first ``n % folds`` folds one longer).
  2. Per fold k: the scaler on the other folds of both sets pooled, and the L2 logistic
     regression on them with ``C = 1`` and the intercept penalised (scikit-learn's
     liblinear objective, which ``cdi_perf.py`` uses); score fold k's rows.
  3. Welch's t-test, two-sided, between all suspect and all validation scores.
  4. The curve: for each n, ``resamples`` random subsets of n rows of each set, steps 1-3
     on each (refitted), and the mean p-value (the reference: 1000 resamples).

  Differences: the reference draws one index set for both sets (paired rows) and splits
  with ``KFold(shuffle=True, random_state=0)`` every time; memjax draws the suspect and
  validation rows independently and the folds from the seed.

- ``"iar"`` (Kowalczuk et al. 2025, "Privacy Attacks on Image AutoRegressive Models";
  reference code sprintml/privacy_attacks_against_iars, ``analysis/di.py``). No learned
  weights.

  1. Min-max scale each feature over the suspect and validation rows pooled (a constant
     feature scales to 0, as scikit-learn's ``MinMaxScaler``) and sum the scaled features
     per example. Sign convention (the reference's): features are summed as given, no
     per-feature sign is learned, so orient them alike (memjax's: higher = member). The
     reference sums its raw features (losses: lower = member) and reports, beside the
     two-sided p-value, whether the t statistic has the sign its ``members_lower`` flag
     expects; memjax reports the signed statistic (positive = suspect sums higher).
  2. Welch's t-test, two-sided.
  3. The curve: for each n, ``resamples`` random subsets of n rows of each set, steps 1-2
     on each (the scaler refitted on the subset), and the mean p-value (the reference:
     1000 resamples, then the smallest n with mean p <= 0.01).

  Differences: the reference draws one index set for both sets (paired rows); memjax
  draws them independently. The reference replaces NaN features by 0; memjax refuses
  non-finite features. ``p_value`` is the run on all rows.

The statistic is positive when suspect scores are higher, for every method. False-positive
mode (every method; Maini et al. 2024 and CDI's sanity check): ignore the suspect set,
permute the validation set, use its first half as pseudo-suspect and its second half as
validation; the p-value should then be roughly uniform. ``bench/di_calibration.py``
measures the calibration of every method's ``p_value`` under the null (400 seeds, two
null tables, 200 rows per set; fraction of null p-values below 0.05: "maini" 0.06 / 0.04,
"cdi" split 0.05 / 0.0425, "cdi" cross-fit 0.165 / 0.1575, "iar" 0.0625 / 0.0825, the
Maini et al. reference procedure 0.085 / 0.1025).

Random draws, in order, from one ``np.random.default_rng(seed)`` (tests reproduce them):
the false-positive permutation of the validation rows (if asked); then "maini": a
permutation of each set (suspect first); "cdi": a permutation of each set (split: the
fitting rows; cross-fit: the folds of the full run); then, "cdi" and "iar", for each curve
size n and each resample: ``rng.choice(Hs, n, replace=False)``, ``rng.choice(Hv, n,
replace=False)`` (Hs, Hv: the held-out rows for split, every row otherwise) and, "cdi"
cross-fit only, ``rng.permutation(n)`` twice (the folds of the suspect and validation
subsets).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special, stats

from memjax._checks import check_choice, check_positive_int
from memjax.errors import InputError

METHODS = ("maini", "cdi", "iar")
#: ``cdi_scoring`` choices: held-out split (calibrated) or cross-fitted (anti-conservative).
CDI_SCORINGS = ("split", "cross-fit")
_TESTS = ("welch", "student")
_ALTERNATIVES = ("greater", "two-sided")
#: Each method's default ``alternative``: its reference code's.
DEFAULT_ALTERNATIVE = {"maini": "greater", "cdi": "two-sided", "iar": "two-sided"}


@dataclasses.dataclass(frozen=True)
class DatasetInferenceResult:
    """Outcome of :func:`dataset_inference`.

    Attributes:
        p_value: p-value of the t-test on all scored examples ("maini": the held-out
            halves; "cdi": the held-out rows (split) or every row, cross-fitted, whose
            p-value is anti-conservative (cross-fit); "iar": every row).
        statistic: t statistic (positive when suspect scores are higher).
        weights: [F] float64 aggregator weights: "maini" the learned weights (on clipped,
            z-scored features); "cdi" split: the scoring model's (on standardised
            features); "cdi" cross-fit: the mean over the fold models of the full run (for
            inspection, each fold scores with its own model); "iar" ones (the sum).
        bias: the intercept ("cdi" cross-fit: the fold mean; "iar": 0).
        scores_suspect: [Hs] float64 aggregated suspect scores ("maini" logits, "cdi"
            probabilities, "iar" sums of scaled features), in the order of
            ``heldout_suspect``.
        scores_val: [Hv] float64 aggregated validation scores.
        heldout_suspect: [Hs] int64 row indices (into the suspect input, or into the
            validation input in false-positive mode) of the scored suspect examples.
        heldout_val: [Hv] int64 row indices into the validation input.
        curve_n: [C] int64 numbers of the owner's examples per set.
        curve_p: [C] float64 p-values at each n ("maini": from the first n held-out scores
            of each set; "cdi", "iar": the mean over ``curve_p_resamples``' row, the
            reference's summary, not itself a p-value).
        method: "maini", "cdi" or "iar".
        curve_p_resamples: [C, R] float64 p-value of each resample ("cdi", "iar"), or None.
        test: the t-test run, "welch" or "student".
        alternative: the alternative tested, "greater" or "two-sided".
        cdi_scoring: "split" or "cross-fit" for "cdi", else None.
    """

    p_value: float
    statistic: float
    weights: np.ndarray
    bias: float
    scores_suspect: np.ndarray
    scores_val: np.ndarray
    heldout_suspect: np.ndarray
    heldout_val: np.ndarray
    curve_n: np.ndarray
    curve_p: np.ndarray
    method: str = "maini"
    curve_p_resamples: np.ndarray | None = None
    test: str = "welch"
    alternative: str = "greater"
    cdi_scoring: str | None = None

    def smallest_n(self, p: float = 0.01) -> int | None:
        """:func:`smallest_n` of this result's curve."""
        return smallest_n(self, p)


def _check_features(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: expected a numeric [N, F] array, got {type(x).__name__}") from e
    if a.ndim != 2 or a.shape[1] == 0:
        raise InputError(f"{name}: expected a [N, F] array with F >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InputError(f"{name}: expected finite values, got {a[idx]} at index {idx}")
    return a


def _check_options(test: str, alternative: str) -> None:
    check_choice("test", test, _TESTS)
    check_choice("alternative", alternative, _ALTERNATIVES)


def default_curve_sizes(n_max: int) -> np.ndarray:
    """[C] sizes 10, 20, 50, 100, 200, 500, ... below ``n_max``, then ``n_max`` itself."""
    sizes = []
    base = 10
    while base < n_max:
        sizes.extend(s for s in (base, 2 * base, 5 * base) if s < n_max)
        base *= 10
    sizes.append(n_max)
    return np.array(sizes, dtype=np.int64)


def reference_curve_sizes(n_max: int, start: int = 2) -> np.ndarray:
    """[C] the CDI / IAR code's grid: ``start``..10, 20..100 by 10, 200..1000 by 100,
    2000..10000 by 1000, 20000, cut at ``n_max``, then ``n_max`` itself."""
    grid = np.r_[np.arange(start, 11), np.arange(20, 110, 10), np.arange(200, 1100, 100),
                 np.arange(2000, 11000, 1000), 20000]
    grid = grid[grid < n_max]
    return np.append(grid, n_max).astype(np.int64)


def t_test(scores_suspect, scores_val, *, test: str = "welch",
           alternative: str = "greater") -> tuple[float, float]:
    """``(statistic, p_value)`` of scipy's ``ttest_ind`` (``equal_var`` for Student)."""
    _check_options(test, alternative)
    res = stats.ttest_ind(np.asarray(scores_suspect, np.float64),
                          np.asarray(scores_val, np.float64),
                          equal_var=(test == "student"), alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def p_value_curve(scores_suspect, scores_val, sizes=None, *, test: str = "welch",
                  alternative: str = "greater") -> tuple[np.ndarray, np.ndarray]:
    """p-value as a function of the number of examples (Maini et al. 2024, Fig. 4).

    The subset of size n is the first n scores of each set (nested prefixes; the held-out
    scores of :func:`dataset_inference` are already in a seeded random order), as in the
    reference code's ``get_p_value_list``.

    Args:
        scores_suspect: [Hs] aggregated suspect scores.
        scores_val: [Hv] aggregated validation scores.
        sizes: [C] ints in [2, min(Hs, Hv)]; default :func:`default_curve_sizes`.
        test: "welch" or "student".
        alternative: "greater" or "two-sided".

    Returns:
        ``(sizes, p_values)``, [C] int64 and [C] float64.
    """
    s = np.asarray(scores_suspect, np.float64)
    v = np.asarray(scores_val, np.float64)
    if s.ndim != 1 or v.ndim != 1:
        raise InputError(f"scores_suspect, scores_val: expected 1-D arrays, got shapes "
                         f"{s.shape} and {v.shape}")
    n_max = min(s.size, v.size)
    if n_max < 2:
        raise InputError(f"scores_suspect, scores_val: expected at least 2 scores each, "
                         f"got {s.size} and {v.size}")
    ns = _check_sizes(sizes, default_curve_sizes(n_max), 2, n_max)
    ps = np.array([t_test(s[:n], v[:n], test=test, alternative=alternative)[1] for n in ns])
    return ns, ps


def _check_sizes(sizes, default: np.ndarray, lowest: int, n_max: int) -> np.ndarray:
    ns = default if sizes is None else np.asarray(sizes, np.int64).ravel()
    if ns.size == 0 or ns.min() < lowest or ns.max() > n_max:
        raise InputError(f"sizes: expected non-empty integers in [{lowest}, {n_max}], "
                         f"got {ns}")
    return ns


def smallest_n(curve, p: float = 0.01) -> int | None:
    """The smallest number of the owner's examples whose p-value is at most ``p``.

    As the IAR code's summary (the smallest n with mean p-value <= 0.01), over the curve's
    sizes; None when no size reaches ``p``.

    Args:
        curve: a :class:`DatasetInferenceResult`, or ``(sizes, p_values)`` ([C] each).
        p: the significance level, in (0, 1).
    """
    if isinstance(curve, DatasetInferenceResult):
        ns, ps = curve.curve_n, curve.curve_p
    else:
        try:
            ns, ps = (np.asarray(a, np.float64).ravel() for a in curve)
        except (TypeError, ValueError) as e:
            raise InputError("curve: expected a DatasetInferenceResult or (sizes, "
                             "p_values)") from e
    if len(ns) != len(ps):
        raise InputError(f"curve: sizes and p_values differ in length ({len(ns)} vs "
                         f"{len(ps)})")
    if not (isinstance(p, int | float) and 0 < p < 1):
        raise InputError(f"p: expected a number in (0, 1), got {p!r}")
    reached = np.asarray(ns)[np.asarray(ps) <= p]
    return int(reached.min()) if reached.size else None


# ----------------------------------------------------------------------------- maini


@partial(jax.jit, static_argnames=("epochs",))
def _fit_logistic(x, y, lr, epochs: int):
    """Full-batch Adam on mean BCE of ``sigmoid(x @ w + b)``; zero init (the loss is convex)."""
    params = (jnp.zeros(x.shape[1], x.dtype), jnp.zeros((), x.dtype))
    opt = optax.adam(lr)

    def bce(p):
        return optax.sigmoid_binary_cross_entropy(x @ p[0] + p[1], y).mean()

    def step(_, carry):
        p, state = carry
        g = jax.grad(bce)(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, epochs, step, (params, opt.init(params)))
    return params


def _maini(xs, xv, rng, *, clip, epochs, lr, test, alternative, curve_sizes):
    ps, pv = rng.permutation(xs.shape[0]), rng.permutation(xv.shape[0])
    hs, hv = xs.shape[0] // 2, xv.shape[0] // 2
    train = np.concatenate([xs[ps[:hs]], xv[pv[:hv]]])
    lo = np.quantile(train, clip, axis=0)
    hi = np.quantile(train, 1.0 - clip, axis=0)
    train = np.clip(train, lo, hi)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def prep(x):
        return (np.clip(x, lo, hi) - mean) / std

    y = np.concatenate([np.ones(hs), np.zeros(hv)])
    # Training in float32 (JAX's default); scoring is redone in float64 with the weights.
    w, b = _fit_logistic(jnp.asarray((train - mean) / std, jnp.float32),
                         jnp.asarray(y, jnp.float32), jnp.float32(lr), int(epochs))
    w = np.asarray(w, np.float64)
    b = float(b)
    s_s = prep(xs[ps[hs:]]) @ w + b
    s_v = prep(xv[pv[hv:]]) @ w + b
    statistic, p = t_test(s_s, s_v, test=test, alternative=alternative)
    curve_n, curve_p = p_value_curve(s_s, s_v, curve_sizes, test=test, alternative=alternative)
    return dict(p_value=p, statistic=statistic, weights=w, bias=b, scores_suspect=s_s,
                scores_val=s_v, heldout_suspect=ps[hs:], heldout_val=pv[hv:],
                curve_n=curve_n, curve_p=curve_p)


# ----------------------------------------------------------------------------- cdi


def kfold_bounds(n: int, folds: int) -> np.ndarray:
    """[folds + 1] block boundaries of scikit-learn's ``KFold``: the first ``n % folds``
    blocks hold ``n // folds + 1`` positions, the others ``n // folds``."""
    sizes = np.full(folds, n // folds, np.int64)
    sizes[: n % folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def fit_l2_logistic(x, y, weight, c: float = 1.0, *, penalize_intercept: bool = True,
                    tol: float = 1e-10, max_steps: int = 100) -> np.ndarray:
    """Batched L2 logistic regression (scikit-learn's objectives), solved by damped Newton.

    Minimises ``0.5 |theta|^2 + c sum_m weight[m] BCE(x[m] @ w + b, y[m])`` over
    ``theta = [w, b]``, the intercept penalised as scikit-learn's ``LogisticRegression(
    solver="liblinear")`` with ``intercept_scaling=1``; with ``penalize_intercept=False``,
    ``0.5 |w|^2 + ...``, scikit-learn's default (``lbfgs``) objective. Convex, and strictly
    so when both labels carry weight: Newton steps with Armijo backtracking from zero
    converge to the unique optimum.

    Args:
        x: [B, M, F] float64 inputs, one problem per leading index.
        y: [M] labels in {0, 1}.
        weight: [B, M] per-row weights (1 = trained on, 0 = ignored).
        c: inverse regularisation strength (scikit-learn's ``C``).
        penalize_intercept: include ``b`` in the penalty (liblinear) or not (lbfgs).
        tol: when every problem's max |gradient| <= tol * (1 + c * M), take one last full
            Newton step and stop.
        max_steps: Newton steps at most.

    Returns:
        [B, F + 1] float64 ``[w, b]`` per problem.
    """
    xb = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
    theta = np.zeros((x.shape[0], xb.shape[2]))
    penalty = np.ones(xb.shape[2])
    penalty[-1] = 1.0 if penalize_intercept else 0.0

    def objective(t):
        z = np.einsum("bmd,bd->bm", xb, t)
        return (0.5 * (penalty * t * t).sum(1)
                + c * (weight * (np.logaddexp(0.0, z) - y * z)).sum(1))

    limit = tol * (1.0 + c * x.shape[1])
    for _ in range(max_steps):
        z = np.einsum("bmd,bd->bm", xb, theta)
        prob = special.expit(z)
        grad = penalty * theta + c * np.einsum("bm,bmd->bd", weight * (prob - y), xb)
        hess = np.diag(penalty) + c * np.einsum("bm,bmd,bme->bde",
                                                weight * prob * (1 - prob), xb, xb)
        step = -np.linalg.solve(hess, grad[..., None])[..., 0]
        if np.abs(grad).max() <= limit:
            # One more full Newton step: quadratic convergence takes the gradient from
            # <= limit to rounding level, so the answer does not depend on where the
            # tolerance happened to be crossed.
            return theta + step
        f0, slope = objective(theta), (grad * step).sum(1)
        t = np.ones(x.shape[0])
        # Near the optimum the objective's change is below its rounding: take full steps.
        tiny = -slope <= 1e-12 * (1.0 + np.abs(f0))
        for _ in range(40):
            ok = tiny | (objective(theta + t[:, None] * step) <= f0 + 1e-4 * t * slope)
            if ok.all():
                break
            t = np.where(ok, t, 0.5 * t)
        theta = theta + t[:, None] * step
    return theta


def fit_rows(n: int, fit_fraction: float) -> int:
    """How many of ``n`` rows fit CDI's split scoring model: ``round(fit_fraction * n)``
    (halves rounded up)."""
    return int(np.floor(fit_fraction * n + 0.5))


def cdi_split_scores(xs, xv, fit_s, fit_v, held_s, held_v, *, c: float = 1.0):
    """CDI's held-out scores (module docstring, "cdi" split steps 1-2).

    Args:
        xs: [Ns, F] suspect features; xv: [Nv, F] validation features.
        fit_s: [Ms] suspect rows that fit the scaler and the model; fit_v: [Mv] validation.
        held_s: [Hs] suspect rows to score; held_v: [Hv] validation rows to score.
        c: the logistic regression's ``C`` (intercept not penalised).

    Returns:
        ``(scores_s [Hs], scores_v [Hv], theta [F + 1])``: probabilities of "suspect" and
        the model's ``[w, b]`` on standardised features.
    """
    train = np.concatenate([xs[fit_s], xv[fit_v]])
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    y = np.concatenate([np.ones(len(fit_s)), np.zeros(len(fit_v))])
    theta = fit_l2_logistic(((train - mean) / std)[None], y, np.ones((1, y.size)), c,
                            penalize_intercept=False)[0]

    def score(x):
        return special.expit((x - mean) / std @ theta[:-1] + theta[-1])

    return score(xs[held_s]), score(xv[held_v]), theta


def cdi_scores(xs, xv, perm_s, perm_v, *, folds: int = 5, c: float = 1.0):
    """CDI's cross-fitted scores (module docstring, "cdi" cross-fit steps 1-2).

    Args:
        xs: [Ns, F] suspect features; xv: [Nv, F] validation features.
        perm_s: [Ns] permutation of the suspect rows (fold k: ``perm_s[kfold_bounds]``).
        perm_v: [Nv] permutation of the validation rows.
        folds: number of folds, <= min(Ns, Nv).
        c: the logistic regression's ``C``.

    Returns:
        ``(scores_s [Ns], scores_v [Nv], theta [folds, F + 1])``: probabilities of
        "suspect" in row order, and each fold model's ``[w, b]``.
    """
    ns, nv = xs.shape[0], xv.shape[0]
    fold_s = np.empty(ns, np.int64)
    fold_v = np.empty(nv, np.int64)
    for fold_of, perm, n in ((fold_s, perm_s, ns), (fold_v, perm_v, nv)):
        b = kfold_bounds(n, folds)
        for k in range(folds):
            fold_of[perm[b[k]:b[k + 1]]] = k
    data = np.concatenate([xs, xv])
    fold = np.concatenate([fold_s, fold_v])
    y = np.concatenate([np.ones(ns), np.zeros(nv)])
    train = fold[None, :] != np.arange(folds)[:, None]  # [K, M]
    counts = train.sum(1, keepdims=True)
    mean = (train[..., None] * data).sum(1) / counts
    var = (train[..., None] * (data - mean[:, None]) ** 2).sum(1) / counts
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)
    scaled = (data - mean[:, None]) / std[:, None]  # [K, M, F]
    theta = fit_l2_logistic(scaled, y, train.astype(np.float64), c)
    logits = np.einsum("kmf,kf->km", scaled, theta[:, :-1]) + theta[:, -1:]
    own = logits[fold, np.arange(fold.size)]
    scores = special.expit(own)
    return scores[:ns], scores[ns:], theta


# ----------------------------------------------------------------------------- iar


def iar_scores(xs, xv):
    """The IAR code's scores: min-max scale each feature over both sets pooled (constant
    -> 0) and sum per example. [Ns, F], [Nv, F] -> ([Ns], [Nv])."""
    data = np.concatenate([xs, xv])
    lo, hi = data.min(0), data.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    summed = ((data - lo) / span).sum(1)
    return summed[: xs.shape[0]], summed[xs.shape[0]:]


def _resampled_curve(xs, xv, rng, sizes, resamples, one_run):
    """[C] mean and [C, R] p-values of ``one_run(xs_sub, xv_sub, rng)`` over subsets (of
    the rows of ``xs`` [Ns, ...] and ``xv`` [Nv, ...])."""
    all_p = np.empty((len(sizes), resamples))
    for i, n in enumerate(sizes):
        for r in range(resamples):
            sub_s = rng.choice(xs.shape[0], int(n), replace=False)
            sub_v = rng.choice(xv.shape[0], int(n), replace=False)
            all_p[i, r] = one_run(xs[sub_s], xv[sub_v], rng)
    return all_p.mean(1), all_p


def _cdi_split(xs, xv, rng, *, fit_fraction, c, resamples, test, alternative,
               curve_sizes):
    perm_s, perm_v = rng.permutation(xs.shape[0]), rng.permutation(xv.shape[0])
    ms, mv = fit_rows(xs.shape[0], fit_fraction), fit_rows(xv.shape[0], fit_fraction)
    s_s, s_v, theta = cdi_split_scores(xs, xv, perm_s[:ms], perm_v[:mv], perm_s[ms:],
                                       perm_v[mv:], c=c)
    statistic, p = t_test(s_s, s_v, test=test, alternative=alternative)
    n_max = min(s_s.size, s_v.size)
    sizes = _check_sizes(curve_sizes, reference_curve_sizes(n_max), 2, n_max)

    def one_run(a, b, _):  # subsets of the held-out scores; the model is not refitted
        return t_test(a, b, test=test, alternative=alternative)[1]

    curve_p, all_p = _resampled_curve(s_s, s_v, rng, sizes, resamples, one_run)
    return dict(p_value=p, statistic=statistic, weights=theta[:-1], bias=float(theta[-1]),
                scores_suspect=s_s, scores_val=s_v, heldout_suspect=perm_s[ms:],
                heldout_val=perm_v[mv:], curve_n=sizes, curve_p=curve_p,
                curve_p_resamples=all_p)


def _cdi(xs, xv, rng, *, folds, c, resamples, test, alternative, curve_sizes):
    perm_s, perm_v = rng.permutation(xs.shape[0]), rng.permutation(xv.shape[0])
    s_s, s_v, theta = cdi_scores(xs, xv, perm_s, perm_v, folds=folds, c=c)
    statistic, p = t_test(s_s, s_v, test=test, alternative=alternative)
    n_max = min(xs.shape[0], xv.shape[0])
    sizes = _check_sizes(curve_sizes, reference_curve_sizes(n_max, max(folds, 2)),
                         max(folds, 2), n_max)

    def one_run(a, b, r):
        sa, sb, _ = cdi_scores(a, b, r.permutation(a.shape[0]), r.permutation(b.shape[0]),
                               folds=folds, c=c)
        return t_test(sa, sb, test=test, alternative=alternative)[1]

    curve_p, all_p = _resampled_curve(xs, xv, rng, sizes, resamples, one_run)
    return dict(p_value=p, statistic=statistic, weights=theta[:, :-1].mean(0),
                bias=float(theta[:, -1].mean()), scores_suspect=s_s, scores_val=s_v,
                heldout_suspect=np.arange(xs.shape[0]), heldout_val=np.arange(xv.shape[0]),
                curve_n=sizes, curve_p=curve_p, curve_p_resamples=all_p)


def _iar(xs, xv, rng, *, resamples, test, alternative, curve_sizes):
    s_s, s_v = iar_scores(xs, xv)
    statistic, p = t_test(s_s, s_v, test=test, alternative=alternative)
    n_max = min(xs.shape[0], xv.shape[0])
    sizes = _check_sizes(curve_sizes, reference_curve_sizes(n_max), 2, n_max)

    def one_run(a, b, _):
        return t_test(*iar_scores(a, b), test=test, alternative=alternative)[1]

    curve_p, all_p = _resampled_curve(xs, xv, rng, sizes, resamples, one_run)
    return dict(p_value=p, statistic=statistic, weights=np.ones(xs.shape[1]), bias=0.0,
                scores_suspect=s_s, scores_val=s_v, heldout_suspect=np.arange(xs.shape[0]),
                heldout_val=np.arange(xv.shape[0]), curve_n=sizes, curve_p=curve_p,
                curve_p_resamples=all_p)


# ----------------------------------------------------------------------------- entry


def _check_number(value, name: str, low: float, high: float, closed_high: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        raise InputError(f"{name}: expected a number in [{low}, {high}"
                         f"{']' if closed_high else ')'}, got {value!r}")


def dataset_inference(features_suspect, features_val, *, method: str = "maini",
                      test: str = "welch", alternative: str | None = None,
                      clip: float = 0.025, epochs: int = 1000, lr: float = 0.01,
                      cdi_scoring: str = "split", fit_fraction: float = 0.2,
                      folds: int = 5, c: float = 1.0, resamples: int = 100, seed: int = 0,
                      false_positive: bool = False,
                      curve_sizes=None) -> DatasetInferenceResult:
    """Dataset inference: aggregate features, t-test suspect vs validation (module docstring).

    Args:
        features_suspect: [Ns, F] per-example features of the suspect set ("maini", "cdi":
            any orientation, the aggregator learns each feature's sign; "iar": all
            oriented alike, they are summed).
        features_val: [Nv, F] the same features on a validation (non-member) set.
        method: "maini" (default), "cdi" or "iar".
        test: "welch" (default) or "student".
        alternative: "greater" (suspect scores higher) or "two-sided"; default the
            method's reference: "greater" for "maini", "two-sided" for "cdi" and "iar".
        clip: "maini": tail fraction in [0, 0.5) clipped at each end of each feature.
        epochs: "maini": Adam steps (full batch), >= 1.
        lr: "maini": Adam learning rate, > 0.
        cdi_scoring: "cdi": "split" (default: the model fitted on ``fit_fraction`` of each
            set, tested on the rest; calibrated) or "cross-fit" (the reference's
            ``cdi_perf.py``; its p-values are anti-conservative under the null: about 16%
            of null p-values below 0.05 in ``bench/di_calibration.py``).
        fit_fraction: "cdi" split: fraction of each set that fits the model, in (0, 1)
            (reference 0.2); at least 1 row must fit and 2 stay held out per set.
        folds: "cdi" cross-fit: number of folds, >= 2 (reference 5).
        c: "cdi": the logistic regression's inverse L2 strength, > 0 (reference 1).
        resamples: "cdi", "iar": random subsets per curve size, >= 1 (reference 1000).
        seed: seeds every draw (the module docstring lists them in order).
        false_positive: ignore the suspect set (it is still validated), permute the
            validation set, use its first half as pseudo-suspect and its second half as
            validation, then run the same procedure; the p-value should then be roughly
            uniform.
        curve_sizes: sizes for ``curve_p``; default :func:`default_curve_sizes` ("maini",
            up to the held-out size) or :func:`reference_curve_sizes` ("cdi" split from 2
            up to the smaller held-out set; "cdi" cross-fit from ``folds`` and "iar" from 2,
            up to min(Ns, Nv)).

    Returns:
        :class:`DatasetInferenceResult`.
    """
    check_choice("method", method, METHODS)
    xs = _check_features(features_suspect, "features_suspect")
    xv = _check_features(features_val, "features_val")
    if xs.shape[1] != xv.shape[1]:
        raise InputError(f"features_val: expected {xs.shape[1]} features (as "
                         f"features_suspect), got shape {xv.shape}")
    alternative = DEFAULT_ALTERNATIVE[method] if alternative is None else alternative
    _check_options(test, alternative)
    _check_number(clip, "clip", 0.0, 0.5, False)
    check_positive_int(epochs, "epochs")
    if not (isinstance(lr, int | float) and np.isfinite(lr) and lr > 0):
        raise InputError(f"lr: expected a finite number > 0, got {lr!r}")
    if check_positive_int(folds, "folds") < 2:
        raise InputError(f"folds: expected an integer >= 2, got {folds!r}")
    if not (isinstance(c, int | float) and np.isfinite(c) and c > 0):
        raise InputError(f"c: expected a finite number > 0, got {c!r}")
    check_positive_int(resamples, "resamples")
    check_choice("cdi_scoring", cdi_scoring, CDI_SCORINGS)
    _check_number(fit_fraction, "fit_fraction", 0.0, 1.0, False)
    if fit_fraction == 0.0:
        raise InputError(f"fit_fraction: expected a number in (0, 1), got {fit_fraction!r}")
    split = method == "cdi" and cdi_scoring == "split"

    rng = np.random.default_rng(seed)
    idx_s = np.arange(xs.shape[0])
    idx_v = np.arange(xv.shape[0])
    if false_positive:
        if xv.shape[0] < 8:
            raise InputError(f"features_val: expected at least 8 rows in false_positive "
                             f"mode, got {xv.shape[0]}")
        perm = rng.permutation(xv.shape[0])
        half = xv.shape[0] // 2
        idx_s, idx_v = perm[:half], perm[half:]
        xs, xv = xv[idx_s], xv[idx_v]
    least = {"maini": 4, "cdi": 3 if split else max(folds, 2), "iar": 2}[method]
    why = {"maini": "2 to train, 2 to test",
           "cdi": "1 to fit, 2 to test" if split else "one per fold, 2 to test",
           "iar": "2 to test"}[method]
    for name, x in (("features_suspect", xs), ("features_val", xv)):
        if x.shape[0] < least:
            raise InputError(f"{name}: expected at least {least} rows ({why}), got "
                             f"{x.shape[0]}")
        if split and not 1 <= fit_rows(x.shape[0], fit_fraction) <= x.shape[0] - 2:
            raise InputError(f"fit_fraction={fit_fraction!r}: fits "
                             f"{fit_rows(x.shape[0], fit_fraction)} of the {x.shape[0]} "
                             f"rows of {name}; expected at least 1 to fit and 2 held out")

    if method == "maini":
        out = _maini(xs, xv, rng, clip=clip, epochs=epochs, lr=lr, test=test,
                     alternative=alternative, curve_sizes=curve_sizes)
    elif split:
        out = _cdi_split(xs, xv, rng, fit_fraction=float(fit_fraction), c=float(c),
                         resamples=resamples, test=test, alternative=alternative,
                         curve_sizes=curve_sizes)
    elif method == "cdi":
        out = _cdi(xs, xv, rng, folds=folds, c=float(c), resamples=resamples, test=test,
                   alternative=alternative, curve_sizes=curve_sizes)
    else:
        out = _iar(xs, xv, rng, resamples=resamples, test=test, alternative=alternative,
                   curve_sizes=curve_sizes)
    out["heldout_suspect"] = idx_s[out["heldout_suspect"]].astype(np.int64)
    out["heldout_val"] = idx_v[out["heldout_val"]].astype(np.int64)
    return DatasetInferenceResult(method=method, test=test, alternative=alternative,
                                  cdi_scoring=cdi_scoring if method == "cdi" else None, **out)
