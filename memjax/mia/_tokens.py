"""Token-level membership-inference attacks for causal language models.

Inputs are the engine's per-token signals (:func:`memjax.signals.tokens`, stacked over a
batch): ``logp`` [N, T] (log-probability of each target token), ``mu`` and ``sigma``
[N, T] (mean and standard deviation of log p over the model's own next-token
distribution), per-example ``mean_loss`` [N], and a boolean ``mask`` [N, T] marking the
real (scored) tokens of each row. Values at masked-out positions are never read, so padding
may hold anything (including NaN).

Every score follows memjax's convention: **higher = more likely member**. Where a paper or
its reference code (mimir) uses the opposite sign, the function negates and says so.
"""

from __future__ import annotations

import zlib as _zlib
from collections.abc import Mapping, Sequence

import numpy as np

from memjax.errors import InputError

#: Floor on σ_t in Min-K%++: a (near-)deterministic next-token distribution has σ_t ≈ 0,
#: and then log p_t − μ_t ≈ 0 too; flooring keeps z_t finite instead of 0/0.
SIGMA_EPS = 1e-8


def _as_float_array(x, name: str, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: expected a numeric array, got {type(x).__name__}") from e
    if a.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{name}: expected a non-empty array, got shape {a.shape}")
    return a


def _check_finite(a: np.ndarray, name: str, where: np.ndarray | None = None) -> None:
    bad = ~np.isfinite(a) if where is None else (~np.isfinite(a)) & where
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        scope = "" if where is None else " at masked-in positions"
        raise InputError(f"{name}: expected finite values{scope}, got {a[idx]} at index {idx}")


def _check_mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise InputError(f"mask: expected a boolean array, got dtype {m.dtype}")
    if m.shape != shape:
        raise InputError(f"mask: expected shape {shape} (same as token_logp), got {m.shape}")
    empty = ~m.any(axis=1)
    if empty.any():
        raise InputError(f"mask: row {int(np.argmax(empty))} has no masked-in token")
    return m


def _check_k(k) -> float:
    try:
        kf = float(k)
    except (TypeError, ValueError) as e:
        raise InputError(f"k: expected a number in (0, 1], got {k!r}") from e
    if not (0.0 < kf <= 1.0):
        raise InputError(f"k: expected a number in (0, 1], got {k!r}")
    return kf


def _mean_lowest_k(values: np.ndarray, mask: np.ndarray, k: float) -> np.ndarray:
    """Mean of the ``max(1, floor(k * n))`` smallest masked-in values of each row."""
    n = mask.sum(axis=1)
    # Same float arithmetic as mimir's ``int(len(x) * k)``, so counts match it exactly.
    count = np.maximum(1, np.floor(n * k).astype(np.int64))
    # Masked-out entries sort last (+inf), so the first n columns are the row's real tokens.
    s = np.sort(np.where(mask, values, np.inf), axis=1)
    take = np.arange(values.shape[1])[None, :] < count[:, None]
    return np.where(take, s, 0.0).sum(axis=1) / count


def loss(mean_loss) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018, "Privacy Risk in Machine Learning").

    Args:
        mean_loss: [...] per-example loss (any shape, e.g. [N] mean token cross-entropy),
            or the engine's signals dict: its ``loss`` (classification) or ``mean_loss``
            (tokens) field is used.

    Returns:
        float64 array of the same shape: ``-mean_loss`` (negated: low loss = member).
    """
    if isinstance(mean_loss, Mapping):
        field = next((k for k in ("loss", "mean_loss") if k in mean_loss), None)
        if field is None:
            raise InputError(f"signals: expected a 'loss' or 'mean_loss' field, got "
                             f"{sorted(mean_loss)}")
        mean_loss = mean_loss[field]
    a = np.asarray(mean_loss, dtype=np.float64)
    if a.size == 0:
        raise InputError(f"mean_loss: expected a non-empty array, got shape {a.shape}")
    _check_finite(a, "mean_loss")
    return -a


def min_k(token_logp, mask, k: float = 0.2) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models").

    Mean of the lowest k-fraction of a row's masked-in token log-probabilities. The number
    of tokens is ``max(1, floor(k * n))`` for n masked-in tokens — mimir's
    ``int(len * k)``, floored at one token so that short rows still get a score. mimir
    returns the negated mean (lower = member); memjax returns the mean itself.

    Args:
        token_logp: [N, T] per-token log p(x_t | x_<t).
        mask: [N, T] bool, True for scored tokens; every row needs at least one.
        k: fraction in (0, 1].

    Returns:
        [N] float64 scores, higher = more likely member.
    """
    logp = _as_float_array(token_logp, "token_logp", 2)
    m = _check_mask(mask, logp.shape)
    kf = _check_k(k)
    _check_finite(logp, "token_logp", m)
    return _mean_lowest_k(logp, m, kf)


def min_k_plus_plus(token_logp, mu, sigma, mask, k: float = 0.2) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training
    Data from Large Language Models").

    ``z_t = (log p_t(x_t) - mu_t) / max(sigma_t, SIGMA_EPS)``, then the mean of the lowest
    ``max(1, floor(k * n))`` values of z over the n masked-in tokens (the reference code's
    ``int(len * k)``, floored at one). The reference returns the negated mean; memjax
    returns the mean (higher = member).

    Args:
        token_logp: [N, T] per-token log p(x_t | x_<t).
        mu: [N, T] mean of log p over the model's next-token distribution.
        sigma: [N, T] standard deviation of log p over that distribution (>= 0).
        mask: [N, T] bool, True for scored tokens; every row needs at least one.
        k: fraction in (0, 1].

    Returns:
        [N] float64 scores, higher = more likely member.
    """
    logp = _as_float_array(token_logp, "token_logp", 2)
    mu_a = _as_float_array(mu, "mu", 2)
    sig = _as_float_array(sigma, "sigma", 2)
    for name, a in (("mu", mu_a), ("sigma", sig)):
        if a.shape != logp.shape:
            raise InputError(f"{name}: expected shape {logp.shape} (same as token_logp), "
                             f"got {a.shape}")
    m = _check_mask(mask, logp.shape)
    kf = _check_k(k)
    for name, a in (("token_logp", logp), ("mu", mu_a), ("sigma", sig)):
        _check_finite(a, name, m)
    neg = (sig < 0) & m
    if neg.any():
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        raise InputError(f"sigma: expected non-negative values, got {sig[idx]} at index {idx}")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = (logp - mu_a) / np.maximum(sig, SIGMA_EPS)
    return _mean_lowest_k(z, m, kf)


def zlib_entropy(texts: Sequence[str]) -> np.ndarray:
    """[N] int64 length in bytes of ``zlib.compress(text.encode("utf-8"))`` (level 6)."""
    return np.array([len(_zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.int64)


def zlib(mean_loss, texts: Sequence[str]) -> np.ndarray:
    """zlib-calibrated loss (Carlini et al. 2021, "Extracting Training Data from Large
    Language Models").

    ``-mean_loss / len(zlib.compress(text.encode("utf-8")))``: mimir's ``loss /
    zlib_entropy`` (default compression level, length in bytes), negated so that higher =
    member.

    Args:
        mean_loss: [N] per-example mean token loss.
        texts: N strings, the texts the losses were computed on.

    Returns:
        [N] float64 scores, higher = more likely member.
    """
    a = _as_float_array(mean_loss, "mean_loss", 1)
    _check_finite(a, "mean_loss")
    if isinstance(texts, str | bytes):
        raise InputError("texts: expected a sequence of strings, got a single string")
    texts = list(texts)
    if len(texts) != a.shape[0]:
        raise InputError(f"texts: expected {a.shape[0]} strings (one per mean_loss), "
                         f"got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"texts: expected str at index {i}, got {type(t).__name__}")
    return -a / zlib_entropy(texts)


def reference(target_loss, ref_loss) -> np.ndarray:
    """Reference-model calibration (Carlini et al. 2021; Mireshghallah et al. 2022).

    Args:
        target_loss: [...] per-example loss under the target model.
        ref_loss: same shape, loss under a reference model not trained on the candidates.

    Returns:
        float64 array ``-(target_loss - ref_loss)``, higher = more likely member.
    """
    t = np.asarray(target_loss, dtype=np.float64)
    r = np.asarray(ref_loss, dtype=np.float64)
    if t.size == 0:
        raise InputError(f"target_loss: expected a non-empty array, got shape {t.shape}")
    if r.shape != t.shape:
        raise InputError(f"ref_loss: expected shape {t.shape} (same as target_loss), "
                         f"got {r.shape}")
    _check_finite(t, "target_loss")
    _check_finite(r, "ref_loss")
    return -(t - r)


#: Fractions k of Min-K% / Max-K% / Min-K%++ used as dataset-inference features (the range
#: of Maini et al. 2024's feature set).
FEATURE_KS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def token_features(token_logp, mu, sigma, mask, mean_loss, texts: Sequence[str] | None = None,
                   *, ks: Sequence[float] = FEATURE_KS) -> tuple[np.ndarray, list[str]]:
    """Per-example MIA features for dataset inference (Maini et al. 2024): ([N, F], names).

    LOSS, the zlib ratio (when ``texts`` are given), and for each k in ``ks``: Min-K%,
    Max-K% (the mean of the highest k-fraction of token log-probabilities,
    ``-min_k(-logp)``) and Min-K%++. Orientation does not matter: the aggregator of
    :func:`memjax.mia.dataset_inference` learns each feature's sign and weight.

    Args:
        token_logp, mu, sigma, mask: as in :func:`min_k_plus_plus` ([N, T]).
        mean_loss: [N] per-example mean token loss.
        texts: N strings for the zlib feature (optional).
        ks: the fractions k.
    """
    logp = _as_float_array(token_logp, "token_logp", 2)
    columns = {"LOSS": loss(mean_loss)}
    if texts is not None:
        columns["zlib"] = zlib(mean_loss, texts)
    for k in ks:
        columns[f"Min-K% {k}"] = min_k(logp, mask, k)
        columns[f"Max-K% {k}"] = -min_k(np.where(np.asarray(mask), -logp, 0.0), mask, k)
        columns[f"Min-K%++ {k}"] = min_k_plus_plus(logp, mu, sigma, mask, k)
    return np.stack(list(columns.values()), axis=1), list(columns)
