"""The robustness audit section's finding on seed 0: robust accuracy of the digits probe
falls with every doubling of ε and collapses at 32/255, while the embedding shift grows
about linearly in ε. Bounds sit below the worst of seeds 0, 1, 2 (bench/robustness_demo.py,
8 devices; values written beside each assertion as seed0/seed1/seed2, then in brackets the
same run on this VM's slower CPU of 2026-12-01, where a few of ~900 digits change side
under float32 differences of the probe fit and the gradient signs)."""

from __future__ import annotations

import jax
import numpy as np

from memjax.audit.robustness import EPSILON_STEPS, robustness_demo, robustness_section


def test_robust_accuracy_falls_and_the_shift_grows_with_epsilon(tmp_path):
    demo = robustness_demo(0)
    result = demo["result"]
    accuracy, shift = result["robust_accuracy"], result["mean_shift_l2"]
    assert EPSILON_STEPS == (0, 1, 2, 4, 8, 16, 32)
    assert accuracy[0] == result["clean_accuracy"]  # ε = 0: no perturbation
    assert result["clean_accuracy"] > 0.93  # 0.968/0.966/0.967 [0.968/0.964/0.967]
    # every step of ε lowers robust accuracy: smallest decrease 0.0077/0.0033/0.0044
    # [0.0066/0.0022/0.0044]
    assert np.diff(accuracy).max() < -0.002
    assert accuracy[0] - accuracy[-1] > 0.6  # drop to 32/255: 0.789/0.773/0.829 [.785/.771/.830]
    assert accuracy[-1] < 0.3  # at 32/255: 0.179/0.192/0.138 [.182/.194/.137]
    assert shift[0] == 0
    # doubling ε about doubles the shift: smallest ratio 1.982/1.981/1.982
    assert (shift[2:] / shift[1:-1]).min() > 1.8
    section = robustness_section(tmp_path)
    metrics = dict(section.metrics)
    assert metrics["robust accuracy, ε = 32/255"] == float(accuracy[-1])
    for name in ("robustness.png", "robustness_head.npz", "robustness_digits.npz"):
        assert (tmp_path / name).is_file()
    from memjax.convert import load

    saved = load(tmp_path / "robustness_encoder")  # what `memjax robustness --model` opens
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(demo["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
