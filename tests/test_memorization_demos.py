"""The memorization papers' qualitative findings on real data (digits), asserted with
margins: the audit's settings (memjax.audit.memorization), so the report shows what is
tested here.

SimCLR encoders (the audit's small ResNet) f (shared + 300 candidates, 30 of them
inverted-intensity outliers) and g (shared + 300 independent digits), same
initialisation, 1,000 steps, one vmapped program (Wang et al. 2024, ICLR and NeurIPS);
tiny CLIPs with 30 of 300 candidate pairs mis-captioned (Wang et al. 2025). Seed 0 is
tested; bench/memorization_demo.py measured seeds 0-2 (bench/README.md), and every
margin below holds for each of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from memjax.audit.memorization import (
    LAYERS,
    clipmem_demo,
    run_memorization_demo,
    top_fraction,
    unit_enrichment,
)
from memjax.metrics import auc_confidence_interval, roc_auc


@pytest.fixture(scope="module")
def simclr():
    return run_memorization_demo(0, setting="inverted")


def test_outliers_have_higher_sslmem(simclr):
    """SSLMem (the embedding's) ranks the outliers above the typical candidates.
    Seeds 0-2: AUROC 0.993, 1.000, 0.984."""
    outlier = simclr["splits"]["outlier"][simclr["rows"]]
    last = simclr["layermem"]["raw"][:, -1]
    auc = roc_auc(last, outlier)
    low, _ = auc_confidence_interval(last, outlier)
    print(f"SSLMem AUROC outliers vs typical {auc:.3f} (lower bound {low:.3f})")
    assert auc >= 0.85 and low >= 0.75
    assert last[outlier].mean() > 5 * max(last[~outlier].mean(), 1e-3)


def test_layermem_increases_from_first_to_last_layer(simclr):
    """LayerMem of the embedding exceeds that of the first conv layer, for the candidates
    on average (paired bootstrap lower bound above 0.01; seeds 0-2: mean gain 0.076,
    0.071, 0.095) and for the outliers alone; both dense layers' mean LayerMem exceeds
    both conv layers' (seeds 0-2: conv <= 0.016 < 0.055 <= dense)."""
    per_layer = simclr["layermem"]
    assert per_layer["layers"] == LAYERS
    raw = per_layer["raw"]
    gain = raw[:, -1] - raw[:, 0]
    rng = np.random.default_rng(0)
    boot = np.array([gain[rng.integers(0, len(gain), len(gain))].mean() for _ in range(2000)])
    low = np.quantile(boot, 0.025)
    print("mean LayerMem per layer", dict(zip(LAYERS, raw.mean(0).round(4), strict=True)),
          f"gain {gain.mean():.4f} (lower bound {low:.4f})")
    assert low > 0.01
    outlier = simclr["splits"]["outlier"][simclr["rows"]]
    assert raw[outlier, -1].mean() - raw[outlier, 0].mean() > 0.1
    # ΔLayerMem sums back to LayerMem: the increments are consistent with the levels.
    np.testing.assert_allclose(per_layer["delta_raw"].sum(1), raw[:, -1], atol=1e-12)
    means = raw.mean(0)
    assert min(means[2:]) > max(means[:2]) + 0.01


def test_top_unitmem_units_point_at_outliers(simclr):
    """The argmax examples of the 10 highest-UnitMem units of every layer are outliers far
    more often than the outliers' 2.3% share of f's training set (binomial p < 1e-6;
    seeds 0-2: 15, 11, 9 of 40; seed 2's p = 5e-7)."""
    enrichment = unit_enrichment(simclr)
    print(enrichment)
    assert enrichment["units"] == 10 * len(LAYERS)
    assert enrichment["fraction"] >= 5 * enrichment["base_rate"]
    assert enrichment["p_value"] < 1e-6


def test_miscaptioned_pairs_have_the_highest_clipmem():
    """CLIPMem ranks the 30 mis-captioned pairs above the 270 others (seeds 0-3: AUROC
    0.83, 0.77, 0.74, 0.83; bootstrap lower bounds 0.75, 0.68, 0.63 for seeds 0-2) and
    they fill the top 30 at 3x+ their 10% share (seeds 0-2: 43%, 33%, 50%)."""
    out = clipmem_demo(0)
    score, bad = out["clipmem"], out["miscaptioned"]
    assert bad.sum() == 30 and len(bad) == 300
    auc = roc_auc(score, bad)
    low, _ = auc_confidence_interval(score, bad)
    top = top_fraction(score, bad)
    print(f"CLIPMem AUROC {auc:.3f} (lower bound {low:.3f}); top-30 {top:.2f}")
    assert auc >= 0.7 and low >= 0.6
    assert top >= 3 * bad.mean()
    assert np.all(out["caption_class"][bad] != out["labels"][bad])
    assert np.all(out["caption_class"][~bad] == out["labels"][~bad])
