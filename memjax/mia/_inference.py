"""LLM dataset inference (Maini et al. 2024, "LLM Dataset Inference: Did you train on my
dataset?"; CDI, Dubiński et al. 2025).

Given per-example MIA features (e.g. perplexity, Min-K% at several k, zlib ratio) for a
*suspect* set and for a *validation* set known not to be in training, decide whether the
suspect set was trained on:

1. Split each set in half with one seeded permutation per set: the first ``n // 2``
   permuted examples train the aggregator, the rest are held out.
2. Per feature, clip both halves at the ``clip`` and ``1 - clip`` quantiles (NumPy's
   linear interpolation) of the *training half* (suspect and validation training halves
   pooled), then z-score with that pooled half's mean and standard deviation (ddof 0; a
   constant feature gets std 1, i.e. becomes 0).
3. Fit a linear aggregator (logistic regression ``s = x @ w + b``, zero initialisation,
   mean BCE, full-batch Adam) that separates suspect (label 1) from validation (label 0).
4. Score the held-out halves and t-test that suspect scores exceed validation scores
   (Welch by default, as CDI and the IAR code; Student's pooled test as Maini et al.'s code).

Sign: the reference code labels suspect 0 and tests ``alternative='less'``; memjax labels
suspect 1 and tests ``'greater'``, the same test with higher = member.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from memjax._checks import check_choice, check_positive_int
from memjax.errors import InputError

_TESTS = ("welch", "student")
_ALTERNATIVES = ("greater", "two-sided")


@dataclasses.dataclass(frozen=True)
class DatasetInferenceResult:
    """Outcome of :func:`dataset_inference`.

    Attributes:
        p_value: p-value of the t-test on all held-out scores.
        statistic: t statistic (positive when suspect scores are higher).
        weights: [F] float64 learned aggregator weights (on clipped, z-scored features).
        bias: learned intercept.
        scores_suspect: [Hs] float64 held-out aggregated suspect scores (logits), in the
            order of ``heldout_suspect``.
        scores_val: [Hv] float64 held-out aggregated validation scores.
        heldout_suspect: [Hs] int64 row indices (into the suspect input, or into the
            validation input in false-positive mode) of the held-out suspect scores.
        heldout_val: [Hv] int64 row indices into the validation input.
        curve_n: [C] int64 numbers of held-out examples per set used for ``curve_p``.
        curve_p: [C] float64 p-values from the first n held-out scores of each set.
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
    ns = default_curve_sizes(n_max) if sizes is None else np.asarray(sizes, np.int64).ravel()
    if ns.size == 0 or ns.min() < 2 or ns.max() > n_max:
        raise InputError(f"sizes: expected non-empty integers in [2, {n_max}], got {ns}")
    ps = np.array([t_test(s[:n], v[:n], test=test, alternative=alternative)[1] for n in ns])
    return ns, ps


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


def dataset_inference(features_suspect, features_val, *, test: str = "welch",
                      alternative: str = "greater", clip: float = 0.025, epochs: int = 1000,
                      lr: float = 0.01, seed: int = 0, false_positive: bool = False,
                      curve_sizes=None) -> DatasetInferenceResult:
    """Dataset inference with a learned linear aggregator and a t-test (module docstring).

    Args:
        features_suspect: [Ns, F] per-example features of the suspect set (any orientation:
            the aggregator learns each feature's sign).
        features_val: [Nv, F] the same features on a validation (non-member) set.
        test: "welch" (default) or "student".
        alternative: "greater" (suspect scores higher) or "two-sided".
        clip: tail fraction in [0, 0.5) clipped at each end of each feature.
        epochs: Adam steps (full batch), >= 1.
        lr: Adam learning rate, > 0.
        seed: seeds the splits (one ``np.random.default_rng(seed)`` for all permutations).
        false_positive: sanity check (Maini et al. 2024, CDI): ignore the suspect set (it is
            still validated), permute the validation set, use its first half as pseudo
            suspect and its second half as validation, then run the same procedure; the
            p-value should then be roughly uniform.
        curve_sizes: sizes for ``curve_p``; default :func:`default_curve_sizes`.

    Returns:
        :class:`DatasetInferenceResult`.
    """
    xs = _check_features(features_suspect, "features_suspect")
    xv = _check_features(features_val, "features_val")
    if xs.shape[1] != xv.shape[1]:
        raise InputError(f"features_val: expected {xs.shape[1]} features (as "
                         f"features_suspect), got shape {xv.shape}")
    _check_options(test, alternative)
    if not (isinstance(clip, int | float) and 0.0 <= clip < 0.5):
        raise InputError(f"clip: expected a number in [0, 0.5), got {clip!r}")
    check_positive_int(epochs, "epochs")
    if not (isinstance(lr, int | float) and np.isfinite(lr) and lr > 0):
        raise InputError(f"lr: expected a finite number > 0, got {lr!r}")

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
    for name, x in (("features_suspect", xs), ("features_val", xv)):
        if x.shape[0] < 4:
            raise InputError(f"{name}: expected at least 4 rows (2 to train, 2 to test), "
                             f"got {x.shape[0]}")

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
    return DatasetInferenceResult(
        p_value=p, statistic=statistic, weights=w, bias=b, scores_suspect=s_s,
        scores_val=s_v, heldout_suspect=idx_s[ps[hs:]].astype(np.int64),
        heldout_val=idx_v[pv[hv:]].astype(np.int64), curve_n=curve_n, curve_p=curve_p)
