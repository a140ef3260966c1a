"""Dataset-inference calibration (issue 16): are the p-values of memjax's three aggregators
uniform under the null, and how much power do they have against a small shift?

Null: the suspect and validation sets come from the same distribution, so a calibrated test
gives p ~ Uniform(0, 1). Two null tables, 200 rows per set, 6 features:

- "gaussian": correlated Gaussian features (a fresh random covariance per seed), one of them
  replaced by a Student-t(2) feature (heavy tails: clipping matters);
- "real_permuted": six skewed, correlated real measurements (scikit-learn's bundled breast
  cancer table: 569 real examples) with the rows randomly permuted and split into suspect
  and validation.

Per method and table, SEEDS seeds: the KS test of the p-values against Uniform(0, 1), the
fractions below 0.05 and 0.01, and the mean and sd of the t statistic (a calibrated Welch
test on 100-200 rows per set: about 0 and 1). Methods: ``memjax.mia.dataset_inference``
with "maini" (one-sided Welch, memjax's default), "cdi" (two-sided Welch; the default
held-out "split" scoring, and "cdi_cross_fit": ``cdi_scoring="cross-fit"``, the reference's
cdi_perf.py) and "iar" (two-sided Welch); for "cdi", "cdi_cross_fit" and "iar" also the
reference code's summary, the mean p-value over 20 random subsets of 100 rows per set (not
a p-value: a mean of uniform p-values concentrates at 0.5); and the Maini et al. reference
code's own procedure ("maini_reference": each set clipped at its own 2.5% order statistics
over all its rows, both z-scored with the suspect set's statistics, half of each set to
train, Student's one-sided test), re-implemented here in NumPy.

The methods' seeds are the data seeds plus METHOD_SEED_OFFSET: a method seeded with the
very seed that drew the data would split the rows with the same random stream that drew
them, and its splits would depend on the data.

Power: the Gaussian table with the suspect features shifted by SHIFT standard deviations
(every feature, toward "member" = higher), fraction of seeds with p < 0.05 and < 0.01.

Run: ``PYTHONPATH=. python -m bench.di_calibration [--quick]`` (writes
bench/results/di_calibration.json).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats
from scipy.special import expit

from bench.common import machine_info, result_name, write_json
from memjax.mia import dataset_inference

N_PER_SET = 200
FEATURES = 6
SHIFT = 0.05
#: Added to the data seed to seed the methods (module docstring).
METHOD_SEED_OFFSET = 1_000_000
#: Reported variants: (name, method, cdi_scoring).
VARIANTS = (("maini", "maini", "split"), ("cdi", "cdi", "split"),
            ("cdi_cross_fit", "cdi", "cross-fit"), ("iar", "iar", "split"))
#: Skewed, correlated columns of scikit-learn's breast cancer table (mean area, mean
#: concavity, area error, concavity error, fractal dimension error, worst area).
REAL_COLUMNS = (3, 6, 13, 16, 19, 23)


def gaussian_sets(seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(FEATURES, FEATURES)) / np.sqrt(FEATURES)

    def draw(n):
        x = rng.normal(size=(n, FEATURES)) @ mix
        x[:, -1] = rng.standard_t(2, n)
        return x

    suspect, validation = draw(N_PER_SET), draw(N_PER_SET)
    scale = np.concatenate([suspect, validation]).std(0)
    return suspect + shift * scale, validation


def real_sets(seed: int, table: np.ndarray):
    perm = np.random.default_rng(seed).permutation(len(table))
    return table[perm[:N_PER_SET]], table[perm[N_PER_SET:2 * N_PER_SET]]


def _order_clip(x, remove_frac=0.05):
    """The reference code's remove_outliers(..., outliers="clip") per column."""
    out = x.copy()
    k = int(len(x) * remove_frac / 2)
    for j in range(x.shape[1]):
        order = np.argsort(x[:, j])
        low, high = order[:k], order[-k:]
        out[high, j] = x[high[0], j]
        out[low, j] = x[low[-1], j]
    return out


def maini_reference(suspect, validation, seed, epochs=1000, lr=0.01):
    """(p-value, t) of Maini et al.'s linear_di.py procedure (module docstring)."""
    s, v = _order_clip(suspect), _order_clip(validation)
    mean, std = s.mean(0), s.std(0)
    s, v = (s - mean) / std, (v - mean) / std
    rng = np.random.default_rng(seed)
    s, v = s[rng.permutation(len(s))], v[rng.permutation(len(v))]
    hs, hv = len(s) // 2, len(v) // 2
    x = np.c_[np.r_[s[:hs], v[:hv]], np.ones(hs + hv)]
    y = np.r_[np.ones(hs), np.zeros(hv)]
    theta, m1, m2 = np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for t in range(1, epochs + 1):  # Adam on mean BCE
        g = x.T @ (expit(x @ theta) - y) / len(y)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        theta -= lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8)
    score_s = np.c_[s[hs:], np.ones(len(s) - hs)] @ theta
    score_v = np.c_[v[hv:], np.ones(len(v) - hv)] @ theta
    res = stats.ttest_ind(score_s, score_v, alternative="greater")
    return float(res.pvalue), float(res.statistic)


def run_methods(suspect, validation, seed, averaged: bool) -> dict[str, tuple]:
    """(p-value, t statistic or None) of every method on one draw."""
    n = min(len(suspect), len(validation))
    seed = seed + METHOD_SEED_OFFSET
    out = {}
    for name, method, scoring in VARIANTS:
        # maini's curve is over the held-out half; the others': random subsets of 100 rows
        res = dataset_inference(suspect, validation, method=method, cdi_scoring=scoring,
                                seed=seed, curve_sizes=[n // 2],
                                resamples=20 if averaged else 1)
        out[name] = (res.p_value, res.statistic)
        if averaged and method != "maini":
            out[f"{name}_mean_of_20_resamples"] = (float(res.curve_p[-1]), None)
    out["maini_reference"] = maini_reference(suspect, validation, seed)
    return out


def calibration(rows: list[tuple]) -> dict[str, float]:
    ps = np.array([p for p, _ in rows])
    ks = stats.kstest(ps, "uniform")
    out = {"ks_statistic": float(ks.statistic), "ks_p_value": float(ks.pvalue),
           "fraction_below_0.05": float((ps < 0.05).mean()),
           "fraction_below_0.01": float((ps < 0.01).mean()), "median_p": float(np.median(ps))}
    if rows[0][1] is not None:
        ts = np.array([t for _, t in rows])
        out.update(t_mean=float(ts.mean()), t_sd=float(ts.std()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 seeds")
    parser.add_argument("--seeds", type=int, default=400)
    args = parser.parse_args()
    seeds = 20 if args.quick else args.seeds
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer().data[:, REAL_COLUMNS].astype(np.float64)
    start = time.perf_counter()
    nulls = {"gaussian": lambda s: gaussian_sets(s),
             "real_permuted": lambda s: real_sets(s, table)}
    results: dict = {"null": {}, "power": {}}
    for name, draw in nulls.items():
        rows = [run_methods(*draw(seed), seed, averaged=True) for seed in range(seeds)]
        results["null"][name] = {m: calibration([r[m] for r in rows]) for m in rows[0]}
        print(name, {m: round(v["ks_p_value"], 3) for m, v in results["null"][name].items()},
              flush=True)
    rows = [run_methods(*gaussian_sets(seed, SHIFT), seed, averaged=False)
            for seed in range(seeds, 2 * seeds)]
    results["power"]["gaussian_shift"] = {
        m: {"fraction_below_0.05": float(np.mean([r[m][0] < 0.05 for r in rows])),
            "fraction_below_0.01": float(np.mean([r[m][0] < 0.01 for r in rows]))}
        for m in rows[0]}
    print("power", results["power"], flush=True)
    payload = {"benchmark": "di_calibration", "seeds": seeds, "rows_per_set": N_PER_SET,
               "features": FEATURES, "shift_in_sd": SHIFT,
               "method_seed_offset": METHOD_SEED_OFFSET,
               "real_table": "sklearn load_breast_cancer columns " + str(REAL_COLUMNS),
               "seconds": time.perf_counter() - start, "machine": machine_info(), **results}
    print(write_json(result_name("di_calibration", args.quick), payload))


if __name__ == "__main__":
    main()
