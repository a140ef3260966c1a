"""Privacy accounting of the DPPL mechanisms: the Gaussian mechanism under zero-concentrated
DP (zCDP) and the analytic Gaussian mechanism, and the exponential mechanism's scale.

Facts used (each function cites its source):

* Bun & Steinke 2016, "Concentrated Differential Privacy: Simplifications, Extensions, and
  Lower Bounds", Prop. 1.6: adding N(0, σ²I) to a function of L2 sensitivity Δ is
  ρ-zCDP with ρ = Δ² / (2σ²); Prop. 1.3: ρ-zCDP implies (ε, δ)-DP for every δ > 0 with
  ε = ρ + 2·sqrt(ρ·log(1/δ)).
* Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy", Thm. 8:
  N(0, σ²I) on a function of L2 sensitivity Δ is (ε, δ)-DP if and only if
  Φ(Δ/(2σ) − εσ/Δ) − e^ε·Φ(−Δ/(2σ) − εσ/Δ) ≤ δ.
* Bun & Steinke 2016, Prop. 1.4: a pure ε-DP mechanism is (ε²/2)-zCDP. DPPL's reference
  code puts its methods on this one scale: "ε" means the zCDP budget ρ = ε²/2
  (``accountant="pure-zcdp"``), which is not (ε, δ)-DP at that ε.
* Cesar & Rogers 2021, "Bounding, Concentrating, and Truncating: Unifying Privacy Loss
  Composition for Data Analytics": the ε-DP exponential mechanism is (ε²/8)-zCDP, so at a
  zCDP budget ρ it may run with ε = sqrt(8ρ) (the reference code's DPPL-Public).
* McSherry & Talwar 2007: choosing candidate j with probability ∝ exp(ε·u_j / (2Δ)),
  Δ the sensitivity of the utility, is ε-DP; when every utility moves in the same direction
  between neighbours (monotone, e.g. sums under add/remove-one), ∝ exp(ε·u_j / Δ) is.
"""

from __future__ import annotations

import math

from memjax.errors import InputError


def _check_epsilon_delta(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and not math.isnan(epsilon)):
        raise InputError(f"epsilon={epsilon!r}: expected a number > 0")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise InputError(f"delta={delta!r}: expected a number in (0, 1)")


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """ε of (ε, δ)-DP implied by ρ-zCDP: ε = ρ + 2·sqrt(ρ·log(1/δ)) (Bun & Steinke 2016,
    Prop. 1.3)."""
    if not rho >= 0:
        raise InputError(f"rho={rho!r}: expected a number >= 0")
    _check_epsilon_delta(1.0, delta)
    return float(rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta)))


def epsilon_to_zcdp(epsilon: float, delta: float) -> float:
    """The largest ρ whose zCDP → (ε, δ) conversion (:func:`zcdp_to_epsilon`) gives at
    most ``epsilon``: ρ = (sqrt(log(1/δ) + ε) − sqrt(log(1/δ)))² (the positive root of
    ε = ρ + 2·sqrt(ρ·L), L = log(1/δ), solved for sqrt(ρ)). ε = inf gives inf."""
    _check_epsilon_delta(epsilon, delta)
    if math.isinf(epsilon):
        return math.inf
    log_inv_delta = math.log(1.0 / delta)
    return float((math.sqrt(log_inv_delta + epsilon) - math.sqrt(log_inv_delta)) ** 2)


def gaussian_sigma_zcdp(rho: float, sensitivity: float) -> float:
    """σ of the Gaussian mechanism that is ρ-zCDP for L2 sensitivity Δ: σ = Δ / sqrt(2ρ)
    (Bun & Steinke 2016, Prop. 1.6); ρ = inf gives 0 (no noise)."""
    if not rho > 0:
        raise InputError(f"rho={rho!r}: expected a number > 0")
    if not sensitivity > 0:
        raise InputError(f"sensitivity={sensitivity!r}: expected a number > 0")
    return 0.0 if math.isinf(rho) else float(sensitivity / math.sqrt(2.0 * rho))


def analytic_gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest δ for which N(0, σ²) on an L2-sensitivity-Δ function is (ε, δ)-DP:
    Φ(Δ/(2σ) − εσ/Δ) − e^ε·Φ(−Δ/(2σ) − εσ/Δ) (Balle & Wang 2018, Thm. 8; the second term
    in log space, so a large ε does not overflow)."""
    from scipy.special import log_ndtr, ndtr

    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(max(ndtr(a - b) - math.exp(epsilon + log_ndtr(-a - b)), 0.0))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float,
                            *, rtol: float = 1e-12) -> float:
    """The smallest σ for which the Gaussian mechanism is (ε, δ)-DP (Balle & Wang 2018,
    Thm. 8, solved by bisection on σ, which :func:`analytic_gaussian_delta` decreases);
    ε = inf gives 0. ``rtol``: relative width of the final bracket (its upper end, the
    private side, is returned)."""
    _check_epsilon_delta(epsilon, delta)
    if not sensitivity > 0:
        raise InputError(f"sensitivity={sensitivity!r}: expected a number > 0")
    if math.isinf(epsilon):
        return 0.0
    low, high = 1e-6 * sensitivity, sensitivity
    while analytic_gaussian_delta(high, epsilon, sensitivity) > delta:
        low, high = high, 2.0 * high
    while analytic_gaussian_delta(low, epsilon, sensitivity) <= delta:
        low /= 2.0
    while high - low > rtol * high:
        middle = 0.5 * (low + high)
        if analytic_gaussian_delta(middle, epsilon, sensitivity) > delta:
            low = middle
        else:
            high = middle
    return float(high)


ACCOUNTANTS = ("zcdp", "analytic", "pure-zcdp")


def pure_epsilon_to_zcdp(epsilon: float) -> float:
    """ρ = ε²/2: the zCDP of a pure ε-DP mechanism (Bun & Steinke 2016, Prop. 1.4), the
    budget DPPL's reference code gives every method at "ε"; ε = inf gives inf."""
    if not (epsilon > 0 and not math.isnan(epsilon)):
        raise InputError(f"epsilon={epsilon!r}: expected a number > 0")
    return math.inf if math.isinf(epsilon) else float(epsilon ** 2 / 2.0)


def exponential_epsilon_of_zcdp(rho: float) -> float:
    """ε = sqrt(8ρ): the ε-DP exponential mechanism is ρ-zCDP at this ε (Cesar & Rogers
    2021)."""
    if not rho > 0:
        raise InputError(f"rho={rho!r}: expected a number > 0")
    return float(math.sqrt(8.0 * rho))


def zcdp_budget(epsilon: float, delta: float, accountant: str = "zcdp") -> float:
    """The total zCDP budget ρ for "ε": ``"zcdp"``: the largest ρ whose conversion is
    (ε, δ)-DP (:func:`epsilon_to_zcdp`); ``"pure-zcdp"``: ε²/2 (:func:`pure_epsilon_to_zcdp`,
    the reference code's scale). ``"analytic"`` is no zCDP accounting and is refused."""
    from memjax._checks import check_choice

    check_choice("accountant", accountant, ("zcdp", "pure-zcdp"))
    if accountant == "pure-zcdp":
        return pure_epsilon_to_zcdp(epsilon)
    return epsilon_to_zcdp(epsilon, delta)


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float,
                   accountant: str = "zcdp") -> float:
    """σ of the Gaussian mechanism for L2 sensitivity Δ at privacy "ε".

    ``accountant="zcdp"``: (ε, δ)-DP through zCDP, ρ = :func:`epsilon_to_zcdp` (ε, δ),
    σ = Δ / sqrt(2ρ). ``"analytic"``: (ε, δ)-DP with the exact (smallest) σ of Balle & Wang
    2018 (:func:`analytic_gaussian_sigma`), never larger. ``"pure-zcdp"``: ρ = ε²/2-zCDP
    (the reference code's scale; ``delta`` unused), σ = Δ / ε.
    """
    from memjax._checks import check_choice

    check_choice("accountant", accountant, ACCOUNTANTS)
    if accountant == "analytic":
        return analytic_gaussian_sigma(epsilon, delta, sensitivity)
    return gaussian_sigma_zcdp(zcdp_budget(epsilon, delta, accountant), sensitivity)


EXPONENTIAL_ACCOUNTANTS = ("pure", "pure-zcdp")


def exponential_mechanism_scale(epsilon: float, sensitivity: float = 1.0, *,
                                monotone: bool = False, accountant: str = "pure") -> float:
    """The factor λ in P(j) ∝ exp(λ·u_j): ε' / (2Δ), or ε' / Δ for a monotone utility
    (McSherry & Talwar 2007). ``accountant="pure"``: ε' = ε (ε-DP); ``"pure-zcdp"``: the
    reference code's scale, ρ = ε²/2 and ε' = sqrt(8ρ) = 2ε (ρ-zCDP, Cesar & Rogers 2021).
    ε = inf gives inf (argmax)."""
    from memjax._checks import check_choice

    check_choice("accountant", accountant, EXPONENTIAL_ACCOUNTANTS)
    if not (epsilon > 0 and not math.isnan(epsilon)):
        raise InputError(f"epsilon={epsilon!r}: expected a number > 0")
    if not sensitivity > 0:
        raise InputError(f"sensitivity={sensitivity!r}: expected a number > 0")
    if accountant == "pure-zcdp" and not math.isinf(epsilon):
        epsilon = exponential_epsilon_of_zcdp(pure_epsilon_to_zcdp(epsilon))
    return float(epsilon / (sensitivity if monotone else 2.0 * sensitivity))
