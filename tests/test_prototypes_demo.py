"""The private-prototypes demonstration of the audit (memjax.audit.prototypes), asserted
with margins, and reproduced from the CLI on the files the section saves.

Seed 0 is tested (the audit's run, cached); the margins were measured over seeds 0-2 under
the tests' 8 CPU devices (bench/prototypes_demo.py, bench/results/prototypes_demo.json),
written beside each assertion as seed0/seed1/seed2; every bound holds for each of them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from memjax.audit.prototypes import EPSILONS, prototypes_demo, prototypes_section
from memjax.cli import main

SMALLEST, LARGEST_FINITE = 0, len(EPSILONS) - 2


@pytest.fixture(scope="module")
def demo():
    return prototypes_demo(0)


def test_epsilons_end_with_the_non_private_release():
    assert EPSILONS[0] == min(EPSILONS) and math.isinf(EPSILONS[-1])


def test_accuracy_increases_with_epsilon_to_the_non_private_accuracy(demo):
    for method in ("mean", "public"):
        acc = demo[method]["accuracy"]
        rank = scipy.stats.spearmanr(acc[:-1], np.arange(len(acc) - 1)).statistic
        assert rank >= 0.9  # mean 1.0/1.0/0.991, public 0.964/1.0/0.964
        assert acc[-1] > 0.88  # mean .928/.930/.933, public .918/.905/.913
        assert abs(acc[-1] - acc[LARGEST_FINITE]) < 0.05  # mean .037/.023/.022,
        #                                                   public .005/.010/.015
        assert acc[SMALLEST] < 0.25  # near chance (0.1): mean .100/.128/.038,
        #                              public .193/.033/.140


def test_membership_attack_is_near_chance_at_the_smallest_epsilon(demo):
    for method in ("mean", "public"):
        assert abs(demo[method]["auc"][SMALLEST] - 0.5) < 0.08  # mean .545/.547/.506,
        #                                                         public .535/.522/.489


def test_non_private_mean_leaks_membership_of_rare_classes(demo):
    assert demo["mean"]["rare_auc"][-1] > 0.6  # .891/.644/.734


def test_section_and_cli_reproduce_the_non_private_numbers(demo, tmp_path):
    (tmp_path / "audit").mkdir()
    section = prototypes_section(tmp_path / "audit", seed=0)
    names = {f for f, _ in section.files}
    assert {"encoder", "members.npz", "test.npz", "public.npz"} <= names
    assert (tmp_path / "audit" / "prototypes.png").is_file()
    a = tmp_path / "audit"
    common = ["prototypes", "--model", str(a / "encoder"), "--layer", "dense1", "--private",
              str(a / "members.npz"), "--nonmembers", str(a / "nonmembers.npz"), "--test",
              str(a / "test.npz"), "--epsilon", "inf", "--no-progress"]
    assert main([*common, "--method", "mean", "--out", str(tmp_path / "mean")]) == 0
    assert main([*common, "--method", "public", "--public", str(a / "public.npz"),
                 "--min-score", "1", "--out", str(tmp_path / "public")]) == 0
    for method in ("mean", "public"):
        metrics = next(iter(json.loads((tmp_path / method / "metrics.json").read_text())
                            .values()))
        # Deterministic at ε = inf: the same encoder, embeddings and prototypes.
        assert metrics["accuracy (epsilon=inf)"] == pytest.approx(demo[method]["accuracy"][-1])
        assert metrics["membership AUC (epsilon=inf)"] == pytest.approx(
            demo[method]["auc"][-1], abs=1e-6)
